"""Linear merge (model soup): sum_i w_i x_i, divided by sum_i w_i when `normalize`.

The base model, when given, is one more input with its own weight (as in mergekit). Pure function.
"""

from __future__ import annotations

import torch

from merge_core.methods.base import MergeMethod, Param, TensorInputs, register


def merge_linear(inputs: TensorInputs, params: dict, model_params: list[dict], generator=None) -> torch.Tensor:
    tensors = inputs.tensors
    weights = [p["weight"] for p in model_params]
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    first = tensors[0].to(dtype)
    out = torch.mul(first, weights[0], out=inputs.new_output(first))
    for x, w in zip(tensors[1:], weights[1:]):
        out.add_(x, alpha=w)
    if params["normalize"]:
        out.div_(sum(weights))   # a zero sum gives inf/nan, as in mergekit (the engine's finite check sees it)
    return out.to(tensors[0].dtype)


register(MergeMethod(
    name="linear",
    merge=merge_linear,
    params={"normalize": Param(True, bool)},
    model_params={"weight": Param(None, float, required=True)},
))
