"""Passthrough: the single input tensor, optionally times `scale` (used with slices to stack layers).

Pure function; returns a fresh tensor.
"""

from __future__ import annotations

import torch

from merge_core.methods.base import MergeMethod, Param, TensorInputs, register


def merge_passthrough(inputs: TensorInputs, params: dict, model_params: list[dict], generator=None
                      ) -> torch.Tensor:
    x = inputs.tensors[0]
    scale = model_params[0]["scale"]
    return x.clone() if scale is None else x * scale


register(MergeMethod(
    name="passthrough",
    merge=merge_passthrough,
    model_params={"scale": Param(None, float)},
    max_models=1,
))
