"""SCE: Select the elements where the task vectors vary most (top `select_topk` by variance), Calculate per-model
weights from their mean squares, Erase entries against the elected sign, then average, as mergekit 0.1.5.

The variance order is cached per tensor, so a trial's selection is one comparison. Pure function.
"""

from __future__ import annotations

import torch

from merge_core.methods.base import TensorInputs, Unit, merge_method
from merge_core.methods.sparsify import keep_ranks, sorted_values


def _variance(inputs: TensorInputs) -> tuple[torch.Tensor, torch.Tensor, int]:
    var = torch.var(torch.stack(inputs.deltas), dim=0, unbiased=False)
    return var, sorted_values(var), int(torch.count_nonzero(var))


@merge_method("sce", reference="https://arxiv.org/abs/2408.07990", base="required", delta_based=True)
def sce(inputs: TensorInputs, *, select_topk: Unit = 1.0, int8_mask: bool = False) -> torch.Tensor:
    """`int8_mask` only picks mergekit's mask dtype: no effect on the values."""
    base, deltas = inputs.base, inputs.deltas
    if not deltas:
        return base.clone()
    stacked = torch.stack(deltas)
    topk = select_topk
    if topk < 1:
        var, ordered, nonzero = inputs.cached("sce_variance", lambda: _variance(inputs))
        k = int(nonzero * topk) if topk > 0 else 0
        mask = keep_ranks(var, ordered, 0, k)
        if mask is not None:
            stacked.mul_(mask)
    positive = stacked.sum(dim=0) >= 0
    agree = torch.where(positive, stacked > 0, stacked < 0)
    energy = stacked.square().reshape(len(deltas), -1).mean(dim=1)
    total = float(energy.sum())
    weights = torch.full_like(energy, 1 / len(deltas)) if abs(total) < 1e-6 else energy / total
    weights = (weights.reshape(-1, *([1] * base.dim())) * agree)
    merged = (stacked * weights).sum(dim=0)
    merged /= weights.sum(dim=0).clamp_(min=1e-6)
    return merged.add_(base)
