"""Passthrough: the single input tensor, optionally times `scale` (used with slices to stack layers).

Pure function; returns a fresh tensor.
"""

from __future__ import annotations

import torch

from merge_core.methods.base import PerModel, TensorInputs, merge_method


@merge_method("passthrough", reference="https://github.com/arcee-ai/mergekit", models=(1, 1))
def passthrough(inputs: TensorInputs, *, scale: PerModel[float] = None) -> torch.Tensor:
    x = inputs.tensors[0]
    return x.clone() if scale[0] is None else x * scale[0]
