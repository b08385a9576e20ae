"""Barycentric means on the hypersphere: multislerp (tangent-space barycentre) and karcher (Riemannian mean),
as mergekit 0.1.5.

Norms, Gram matrices and the (parameter-free) Karcher mean are cached per tensor. Pure functions.
"""

from __future__ import annotations

import torch

from merge_core.errors import MergeConfigError
from merge_core.methods.base import MergeMethod, Param, TensorInputs, register


def _gram(vectors: list[torch.Tensor]) -> torch.Tensor:
    """Pairwise dot products in float64 (elementwise product + sum: float64 BLAS dot can be very slow on CPU)."""
    flat = [v.reshape(-1).double() for v in vectors]
    return torch.tensor([[float((a * b).sum()) for b in flat] for a in flat], dtype=torch.float64)


def merge_multislerp(inputs: TensorInputs, params: dict, model_params: list[dict], generator=None) -> torch.Tensor:
    """Project the (unit) vectors to the tangent space at their weighted mean direction m, average, map back,
    scale by the weighted mean norm. The weighted tangent vectors sum to zero at m itself, so the exponential map
    returns m: the result is m · sum_i w_i |v_i| with m = normalize(sum_i w_i v_i / (|v_i| + eps)), computed here
    in closed form from cached norms and Gram matrix (one fused combination per trial). Vectors are task vectors
    when there is a base model.
    """
    eps = params["eps"]
    idx = [i for i in range(len(inputs.models)) if i != inputs.base_index]
    base = inputs.base
    if len(idx) == 1:
        return inputs.tensors[idx[0]].clone()
    vectors = inputs.deltas if base is not None else [inputs.tensors[i] for i in idx]
    weights = torch.tensor([model_params[i]["weight"] for i in idx], dtype=torch.float64)
    if params["normalize_weights"]:
        weights = weights / weights.sum()
    gram = inputs.cached("gram", lambda: _gram(vectors))
    norms = gram.diagonal().sqrt()
    coef = weights / (norms + eps)                       # mean = sum_i coef_i v_i
    mean_norm = max(0.0, float((coef[:, None] * gram * coef[None, :]).sum())) ** 0.5
    if mean_norm < eps:
        if len(idx) != 2:
            raise MergeConfigError("multislerp: the weighted sum of the inputs is zero (antipodal inputs with "
                                   "balancing weights); use other weights", inputs.name)
        coef = weights                                   # mergekit's linear fallback for two inputs
    else:
        coef = coef * (float((norms * weights).sum()) / mean_norm)
    out = torch.mul(vectors[0], float(coef[0]))
    for v, c in zip(vectors[1:], coef[1:].tolist()):
        out.add_(v, alpha=c)
    return out.add_(base) if base is not None else out


register(MergeMethod(
    name="multislerp",
    merge=merge_multislerp,
    params={"normalize_weights": Param(True, bool), "eps": Param(1e-8, float, 0.0)},
    model_params={"weight": Param(None, float, required=True)},
    optional_base=True,
    min_non_base=1,
    delta_based=True,
))


def karcher_mean(tensors: list[torch.Tensor], max_iter: int, tol: float) -> torch.Tensor:
    """The equal-weight Karcher mean of the directions, by Riemannian gradient steps, times the mean norm."""
    alphas = [1.0 / len(tensors)] * len(tensors)
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    norms = [torch.linalg.vector_norm(x.to(dtype)) for x in tensors]
    units = [torch.zeros_like(x) if n.item() == 0.0 else (x / n).to(x.dtype) for x, n in zip(tensors, norms)]
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    total = sum(alphas[i] for i in valid)
    weights = [alphas[i] / total for i in valid]
    points = [units[i] for i in valid]

    mean = torch.zeros_like(points[0])
    for a, u in zip(weights, points):
        mean += a * u
    mean_norm = torch.linalg.vector_norm(mean.to(dtype))
    mean = points[0].clone() if mean_norm.item() < tol else (mean / mean_norm).to(mean.dtype)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        flat_mean = mean.reshape(-1)
        for a, u in zip(weights, points):
            dot = torch.clamp(torch.dot(flat_mean, u.reshape(-1)), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += a * (theta / torch.sin(theta)) * (u - dot * mean)
        step = torch.linalg.vector_norm(tangent.to(dtype))
        if step.item() < tol:
            break
        mean = (torch.cos(step) * mean + torch.sin(step) * (tangent / step)).to(mean.dtype)
        unit_norm = torch.linalg.vector_norm(mean.to(dtype))
        if unit_norm.item() > tol:
            mean = (mean / unit_norm).to(mean.dtype)
    scale = sum(a * n for a, n in zip(alphas, norms))
    return (scale * mean).to(tensors[0].dtype)


def merge_karcher(inputs: TensorInputs, params: dict, model_params: list[dict], generator=None) -> torch.Tensor:
    max_iter, tol = params["max_iter"], params["tol"]
    if len(inputs.models) == 1:
        return inputs.tensors[0].clone()
    slot = inputs.cached("karcher", dict)          # one cached mean: the last (max_iter, tol) asked for
    if slot.get("key") != (max_iter, tol):
        slot.update(key=(max_iter, tol), mean=karcher_mean(inputs.tensors, max_iter, tol))
    return slot["mean"].clone()


register(MergeMethod(
    name="karcher",
    merge=merge_karcher,
    params={"max_iter": Param(10, int, 0), "tol": Param(1e-5, float, 0.0)},
))
