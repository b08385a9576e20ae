"""RAM and RAM+ (tensor-local): entries changed by one model only are kept whole, shared entries are averaged
over the models that changed them (RAM+ boosts the unique part by 1 + r · clamp(shared/unique, 0, alpha)),
as mergekit 0.1.5. Pure functions.
"""

from __future__ import annotations

import torch

from merge_core.methods.base import NonNegative, TensorInputs, merge_method

REFERENCE = "https://arxiv.org/abs/2601.13572"


def _contributions(inputs: TensorInputs, epsilon: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The stacked task vectors with entries |x| <= epsilon zeroed, where they changed, and how many models
    changed each entry."""
    stacked = torch.stack(inputs.deltas)
    changed = stacked.abs() > epsilon
    return stacked.mul_(changed), changed, changed.sum(dim=0)


@merge_method("ram", reference=REFERENCE, base="required", delta_based=True)
def ram(inputs: TensorInputs, *, epsilon: NonNegative = 1e-5) -> torch.Tensor:
    if not inputs.deltas:
        return inputs.base.clone()
    stacked, _, counts = _contributions(inputs, epsilon)
    return (stacked.sum(dim=0) / counts.clamp(min=1)).add_(inputs.base)


@merge_method("ramplus_tl", reference=REFERENCE, base="required", delta_based=True)
def ramplus_tl(inputs: TensorInputs, *, r: float = 0.1, alpha: float = 0.2, epsilon: NonNegative = 1e-5
               ) -> torch.Tensor:
    if not inputs.deltas:
        return inputs.base.clone()
    stacked, changed, counts = _contributions(inputs, epsilon)
    unique, shared = counts == 1, counts > 1
    per_model = changed.reshape(len(stacked), -1)
    n_shared = (per_model & shared.reshape(1, -1)).sum(dim=1)
    n_unique = (per_model & unique.reshape(1, -1)).sum(dim=1)
    boost = 1 + r * (n_shared / n_unique.clamp(min=epsilon)).clamp(0, alpha)
    boost = boost.to(stacked.dtype).reshape(-1, *([1] * (stacked.dim() - 1)))
    merged = (stacked * torch.where(unique, boost, 1 / counts.clamp(min=1))).sum(dim=0)
    return merged.add_(inputs.base)
