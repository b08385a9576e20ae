"""Spherical interpolation of two tensors: slerp (base -> other, parameter t) and nuslerp (two task vectors or two
models, t from their weights), as mergekit 0.1.5.

Angles are cached per tensor (trial-independent), so a trial is one fused combination. Pure functions.
"""

from __future__ import annotations

import math

import torch

from merge_core.methods.base import MergeMethod, Param, TensorInputs, register, spans

DOT_THRESHOLD = 0.9995   # slerp: closer to (anti)parallel than this -> linear interpolation
NORM_EPS = 1e-8


def _angle(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """The angle between the flattened tensors, or None when |cos| > DOT_THRESHOLD (then slerp is linear).

    Dot products in float64, span by span (no full-size float64 copies: 6x faster on CPU).
    """
    x, y = a.reshape(-1), b.reshape(-1)
    xx = yy = xy = 0.0
    for lo, hi in spans(x):
        xs, ys = x[lo:hi].double(), y[lo:hi].double()
        xx, yy, xy = xx + float(xs.dot(xs)), yy + float(ys.dot(ys)), xy + float(xs.dot(ys))
    nx, ny = math.sqrt(xx), math.sqrt(yy)
    nx, ny = (nx if nx > NORM_EPS else 1.0), (ny if ny > NORM_EPS else 1.0)
    dot = max(-1.0, min(1.0, xy / (nx * ny)))
    return None if abs(dot) > DOT_THRESHOLD else math.acos(dot)


def merge_slerp(inputs: TensorInputs, params: dict, model_params: list[dict], generator=None) -> torch.Tensor:
    """slerp(t; base, other) = sin((1-t)θ)/sinθ · base + sin(tθ)/sinθ · other, on the whole flattened tensors.

    Written as (c0 + c1) · base + c1 · delta so that only base and the task vector need to be resident.
    """
    t = params["t"]
    other = 1 - inputs.base_index
    base, delta = inputs.base, inputs.deltas[0]
    theta = inputs.cached("slerp_angle", lambda: _angle(base, inputs.tensors[other]))
    out = inputs.new_output(base)
    if theta is None:
        return torch.add(base, delta, alpha=t, out=out)
    sin = math.sin(theta)
    c0, c1 = math.sin((1 - t) * theta) / sin, math.sin(t * theta) / sin
    return torch.mul(base, c0 + c1, out=out).add_(delta, alpha=c1)


register(MergeMethod(
    name="slerp",
    merge=merge_slerp,
    params={"t": Param(None, float, required=True)},
    requires_base=True,
    min_models=2,
    max_models=2,
    delta_based=True,
))


def _nuslerp_angles(v0: torch.Tensor, v1: torch.Tensor, flatten: bool, row_wise: bool
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """θ per vector (whole tensor when flatten; columns when row_wise; else rows) and a 'colinear' mask."""
    x, y = v0.double(), v1.double()
    if flatten:
        x, y = x.reshape(-1), y.reshape(-1)
    dim = 0 if (row_wise and not flatten) else -1
    ux = x / x.norm(dim=dim, keepdim=True).clamp(min=1e-7)
    uy = y / y.norm(dim=dim, keepdim=True).clamp(min=1e-7)
    cos = (ux * uy).sum(dim=dim, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= NORM_EPS ** 2
    return torch.acos(torch.where(colinear, 0, cos)), colinear


def merge_nuslerp(inputs: TensorInputs, params: dict, model_params: list[dict], generator=None) -> torch.Tensor:
    """nuslerp: slerp between the two non-base inputs (task vectors when there is a base), t = w1 / (w0 + w1)."""
    idx = [i for i in range(len(inputs.models)) if i != inputs.base_index]
    w0, w1 = (model_params[i]["weight"] for i in idx)
    total = w0 + w1
    t = 0.5 if abs(total) < 1e-6 else w1 / total
    base = inputs.base
    v0, v1 = inputs.deltas if base is not None else [inputs.tensors[i] for i in idx]
    flatten, row_wise = params["nuslerp_flatten"], params["nuslerp_row_wise"]
    theta, colinear = inputs.cached(f"nuslerp_angle/{flatten}/{row_wise}",
                                    lambda: _nuslerp_angles(v0, v1, flatten, row_wise))
    sin = torch.sin(theta)
    c0 = torch.where(colinear, 1 - t, torch.sin((1 - t) * theta) / sin)
    c1 = torch.where(colinear, t, torch.sin(t * theta) / sin)
    if flatten:
        c0, c1 = float(c0), float(c1)
        out = torch.mul(v0, c0).add_(v1, alpha=c1)
    else:
        out = torch.mul(v0, c0.to(v0.dtype)).addcmul_(v1, c1.to(v1.dtype))
    return out.add_(base) if base is not None else out


register(MergeMethod(
    name="nuslerp",
    merge=merge_nuslerp,
    params={"nuslerp_row_wise": Param(False, bool), "nuslerp_flatten": Param(True, bool)},
    model_params={"weight": Param(None, float, required=True)},
    optional_base=True,
    min_non_base=2,
    max_non_base=2,
    delta_based=True,
))
