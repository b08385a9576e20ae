"""MultiSLERP: the barycentre of several tensors on the hypersphere (tangent space at their weighted mean
direction), as mergekit 0.1.5.

Norms and the Gram matrix are cached per tensor. Pure function.
"""

from __future__ import annotations

import torch

from merge_core.errors import MergeConfigError
from merge_core.methods.base import NonNegative, PerModel, TensorInputs, merge_method


def _gram(vectors: list[torch.Tensor]) -> torch.Tensor:
    """Pairwise dot products in float64 (elementwise product + sum: float64 BLAS dot can be very slow on CPU)."""
    flat = [v.reshape(-1).double() for v in vectors]
    return torch.tensor([[float((a * b).sum()) for b in flat] for a in flat], dtype=torch.float64)


@merge_method("multislerp", reference="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
              base="optional", non_base=(1, None), delta_based=True)
def multislerp(inputs: TensorInputs, *, weight: PerModel[float], normalize_weights: bool = True,
               eps: NonNegative = 1e-8) -> torch.Tensor:
    """Project the (unit) vectors to the tangent space at their weighted mean direction m, average, map back,
    scale by the weighted mean norm. The weighted tangent vectors sum to zero at m itself, so the exponential map
    returns m: the result is m · sum_i w_i |v_i| with m = normalize(sum_i w_i v_i / (|v_i| + eps)), computed here
    in closed form from cached norms and Gram matrix (one fused combination per trial). Vectors are task vectors
    when there is a base model.
    """
    idx = [i for i in range(len(inputs.models)) if i != inputs.base_index]
    base = inputs.base
    if len(idx) == 1:
        return inputs.tensors[idx[0]].clone()
    vectors = inputs.deltas if base is not None else [inputs.tensors[i] for i in idx]
    weights = torch.tensor([weight[i] for i in idx], dtype=torch.float64)
    if normalize_weights:
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
