"""Linear merge (model soup): sum_i w_i x_i, divided by sum_i w_i when `normalize`.

The base model, when given, is one more input with its own weight (as in mergekit). Pure function.
"""

from __future__ import annotations

import torch

from merge_core.methods import fused
from merge_core.methods.base import PerModel, TensorInputs, merge_method


@merge_method("linear", reference="https://arxiv.org/abs/2203.05482")
def linear(inputs: TensorInputs, *, weight: PerModel[float], normalize: bool = True) -> torch.Tensor:
    tensors = inputs.tensors
    # the divisor as mergekit sums it (in the compute precision); a zero sum gives inf/nan, as in mergekit (the
    # engine's finite check sees it)
    divisor = float(torch.tensor(list(weight), dtype=_work_dtype(tensors[0])).sum()) if normalize else 1.0
    return weighted_sum(inputs, tensors, list(weight), divisor)


def _work_dtype(tensor: torch.Tensor) -> torch.dtype:
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def weighted_sum(inputs: TensorInputs, tensors: list[torch.Tensor], weights: list[float],
                 divisor: float = 1.0) -> torch.Tensor:
    """sum_j weights[j] * tensors[j] / divisor, computed in float32 (float64 for float64 inputs), in the inputs' dtype.

    On CPU one compiled pass (fused.c) for float32 and bfloat16; torch operations otherwise (one per input).
    """
    out = inputs.new_output(tensors[0])
    if fused.usable(out, *tensors):
        fused.weighted_sum(out, tensors, weights, divisor)
        return out
    dtype = _work_dtype(tensors[0])
    first = tensors[0].to(dtype)
    acc = torch.mul(first, weights[0], out=out if out.dtype == dtype else None)
    for x, w in zip(tensors[1:], weights[1:]):
        acc.add_(x, alpha=w)
    if divisor != 1.0:
        acc.div_(divisor)
    return acc.to(tensors[0].dtype)
