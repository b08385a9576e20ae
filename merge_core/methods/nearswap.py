"""NearSwap: move each base weight to the other model's value where they are close: base + clamp(t / |delta|, 0, 1)
· delta (|delta| floored at 1e-6), as mergekit 0.1.5.

1 / |delta| is cached per tensor, so a trial is one multiply-clamp and one fused multiply-add. Pure function.
"""

from __future__ import annotations

import torch

from merge_core.methods.base import MergeMethod, Param, TensorInputs, register


def merge_nearswap(inputs: TensorInputs, params: dict, model_params: list[dict], generator=None) -> torch.Tensor:
    delta = inputs.deltas[0]
    inverse = inputs.cached("inv_absdiff", lambda: delta.abs().clamp_(min=1e-6).reciprocal_())
    weight = torch.mul(inverse, params["t"]).clamp_(0, 1)
    return torch.addcmul(inputs.base, weight, delta)


register(MergeMethod(
    name="nearswap",
    merge=merge_nearswap,
    params={"t": Param(None, float, required=True)},
    requires_base=True,
    min_models=2,
    max_models=2,
    delta_based=True,
))
