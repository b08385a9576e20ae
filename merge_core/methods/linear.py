"""Linear merge (model soup): sum_i w_i x_i, divided by sum_i w_i when `normalize`.

The base model, when given, is one more input with its own weight (as in mergekit). Pure function.
"""

from __future__ import annotations

import torch

from merge_core.methods.base import PerModel, TensorInputs, merge_method


@merge_method("linear", reference="https://arxiv.org/abs/2203.05482")
def linear(inputs: TensorInputs, *, weight: PerModel[float], normalize: bool = True) -> torch.Tensor:
    tensors = inputs.tensors
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    first = tensors[0].to(dtype)
    out = torch.mul(first, weight[0], out=inputs.new_output(first))
    for x, w in zip(tensors[1:], weight[1:]):
        out.add_(x, alpha=w)
    if normalize:
        out.div_(sum(weight))   # a zero sum gives inf/nan, as in mergekit (the engine's finite check sees it)
    return out.to(tensors[0].dtype)
