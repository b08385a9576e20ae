"""NearSwap: move each base weight to the other model's value where they are close: base + clamp(t / |delta|, 0, 1)
· delta (|delta| floored at 1e-6), as mergekit 0.1.5.

1 / |delta| is cached per tensor, so a trial is one multiply-clamp and one fused multiply-add. Pure function.
"""

from __future__ import annotations

import torch

from merge_core.methods.base import TensorInputs, merge_method


@merge_method("nearswap", reference="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001", base="required",
              models=(2, 2), delta_based=True)
def nearswap(inputs: TensorInputs, *, t: float) -> torch.Tensor:
    delta = inputs.deltas[0]
    inverse = inputs.cached("inv_absdiff", lambda: delta.abs().clamp_(min=1e-6).reciprocal_())
    weight = torch.mul(inverse, t).clamp_(0, 1)
    return torch.addcmul(inputs.base, weight, delta)
