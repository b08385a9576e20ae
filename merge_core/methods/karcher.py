"""Karcher: the equal-weight Riemannian (Karcher) mean of the inputs' directions, times their mean norm, as
mergekit 0.1.5.

Parameter-free per trial: the mean for the last (max_iter, tol) asked for is cached per tensor. Pure function.
"""

from __future__ import annotations

from typing import Annotated

import torch

from merge_core.methods.base import NonNegative, Range, TensorInputs, merge_method


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


@merge_method("karcher", reference="https://arxiv.org/abs/2603.04972")
def karcher(inputs: TensorInputs, *, max_iter: Annotated[int, Range(0, None)] = 10, tol: NonNegative = 1e-5
            ) -> torch.Tensor:
    if len(inputs.models) == 1:
        return inputs.tensors[0].clone()
    slot = inputs.cached("karcher", dict)          # one cached mean: the last (max_iter, tol) asked for
    if slot.get("key") != (max_iter, tol):
        slot.update(key=(max_iter, tol), mean=karcher_mean(inputs.tensors, max_iter, tol))
    return slot["mean"].clone()
