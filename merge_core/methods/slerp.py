"""SLERP: spherical interpolation from the base to the other model by t, on the whole flattened tensors, as
mergekit 0.1.5 (linear where they are nearly (anti)parallel).

The angle is cached per tensor (trial-independent), so a trial is one weighted sum of the two models. Pure function.
"""

from __future__ import annotations

import math

import torch

from merge_core.methods import fused
from merge_core.methods.base import TensorInputs, merge_method, spans
from merge_core.methods.linear import weighted_sum

DOT_THRESHOLD = 0.9995   # slerp: closer to (anti)parallel than this -> linear interpolation
NORM_EPS = 1e-8


def _angle(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """The angle between the flattened tensors, or None when |cos| > DOT_THRESHOLD (then slerp is linear).

    Dot products in float64: one compiled pass on CPU (fused.c), else span by span (no full-size float64 copies).
    """
    x, y = a.reshape(-1), b.reshape(-1)
    if fused.usable(x, y):
        xx, yy, xy = fused.dots(x, y)
    else:
        xx = yy = xy = 0.0
        for lo, hi in spans(x):
            xs, ys = x[lo:hi].double(), y[lo:hi].double()
            xx, yy, xy = xx + float(xs.dot(xs)), yy + float(ys.dot(ys)), xy + float(xs.dot(ys))
    nx, ny = math.sqrt(xx), math.sqrt(yy)
    nx, ny = (nx if nx > NORM_EPS else 1.0), (ny if ny > NORM_EPS else 1.0)
    dot = max(-1.0, min(1.0, xy / (nx * ny)))
    return None if abs(dot) > DOT_THRESHOLD else math.acos(dot)


@merge_method("slerp", reference="https://en.wikipedia.org/wiki/Slerp", base="required", models=(2, 2))
def slerp(inputs: TensorInputs, *, t: float) -> torch.Tensor:
    """slerp(t; base, other) = sin((1-t)θ)/sinθ · base + sin(tθ)/sinθ · other, on the whole flattened tensors;
    (1-t) · base + t · other where they are nearly (anti)parallel. Base and other are held as they are (two
    tensors, as base + task vector would be): the merge is one weighted sum, as mergekit writes it."""
    base, other = inputs.tensors[inputs.base_index], inputs.tensors[1 - inputs.base_index]
    theta = inputs.cached("slerp_angle", lambda: _angle(base, other))
    if theta is None:
        return weighted_sum(inputs, [base, other], [1 - t, t])
    sin = math.sin(theta)
    return weighted_sum(inputs, [base, other], [math.sin((1 - t) * theta) / sin, math.sin(t * theta) / sin])
