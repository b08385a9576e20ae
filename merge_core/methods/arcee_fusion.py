"""Arcee Fusion: keep the task-vector entries whose importance |delta| · KL(softmax(x) || softmax(base)) (per row)
exceeds median + 1.5 IQR of the importances, as mergekit 0.1.5.

Parameter-free: the mask is computed once per tensor and cached. Quantiles are exact here; mergekit estimates
them from 1e6 random samples on tensors larger than that (identical below that size). Pure function.
"""

from __future__ import annotations

import torch

from merge_core.methods.base import TensorInputs, merge_method

QUANTILES = (0.25, 0.5, 0.75)


def fusion_mask(x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    p = torch.softmax(x, dim=-1) + 1e-8
    q = torch.softmax(base, dim=-1) + 1e-8
    kl = (p * torch.log(p / q)).sum(dim=-1, keepdim=True)
    importance = (x - base).abs() * kl
    ordered = importance.reshape(-1).sort().values
    positions = (torch.tensor(QUANTILES) * (ordered.numel() - 1)).long().to(ordered.device)
    q1, median, q3 = ordered[positions]
    return importance >= median + 1.5 * (q3 - q1)


@merge_method("arcee_fusion", reference="https://arcee.ai", base="required", models=(2, 2), delta_based=True)
def arcee_fusion(inputs: TensorInputs) -> torch.Tensor:
    other = 1 - inputs.base_index
    mask = inputs.cached("fusion_mask", lambda: fusion_mask(inputs.tensors[other], inputs.base))
    return torch.addcmul(inputs.base, inputs.deltas[0], mask)
