"""RAM and RAM+ (tensor-local): entries changed by one model only are kept whole, shared entries are averaged
over the models that changed them (RAM+ boosts the unique part by 1 + r · clamp(shared/unique, 0, alpha)),
as mergekit 0.1.5. Pure functions.
"""

from __future__ import annotations

import torch

from merge_core.methods.base import MergeMethod, Param, TensorInputs, register


def _contributions(inputs: TensorInputs, epsilon: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The stacked task vectors with entries |x| <= epsilon zeroed, where they changed, and how many models
    changed each entry."""
    stacked = torch.stack(inputs.deltas)
    changed = stacked.abs() > epsilon
    return stacked.mul_(changed), changed, changed.sum(dim=0)


def merge_ram(inputs: TensorInputs, params: dict, model_params: list[dict], generator=None) -> torch.Tensor:
    if not inputs.deltas:
        return inputs.base.clone()
    stacked, _, counts = _contributions(inputs, params["epsilon"])
    return (stacked.sum(dim=0) / counts.clamp(min=1)).add_(inputs.base)


def merge_ramplus_tl(inputs: TensorInputs, params: dict, model_params: list[dict], generator=None) -> torch.Tensor:
    if not inputs.deltas:
        return inputs.base.clone()
    eps = params["epsilon"]
    stacked, changed, counts = _contributions(inputs, eps)
    unique, shared = counts == 1, counts > 1
    per_model = changed.reshape(len(stacked), -1)
    n_shared = (per_model & shared.reshape(1, -1)).sum(dim=1)
    n_unique = (per_model & unique.reshape(1, -1)).sum(dim=1)
    boost = 1 + params["r"] * (n_shared / n_unique.clamp(min=eps)).clamp(0, params["alpha"])
    boost = boost.to(stacked.dtype).reshape(-1, *([1] * (stacked.dim() - 1)))
    merged = (stacked * torch.where(unique, boost, 1 / counts.clamp(min=1))).sum(dim=0)
    return merged.add_(inputs.base)


register(MergeMethod(
    name="ram",
    merge=merge_ram,
    params={"epsilon": Param(1e-5, float, 0.0)},
    requires_base=True,
    delta_based=True,
))

register(MergeMethod(
    name="ramplus_tl",
    merge=merge_ramplus_tl,
    params={"r": Param(0.1, float), "alpha": Param(0.2, float), "epsilon": Param(1e-5, float, 0.0)},
    requires_base=True,
    delta_based=True,
))
