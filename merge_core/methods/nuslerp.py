"""NuSLERP: spherical interpolation between two task vectors (with a base) or two models, t = w1 / (w0 + w1) from
their weights, per row, per column or on the whole flattened tensors, as mergekit 0.1.5.

Angles are cached per tensor (trial-independent), so a trial is one fused combination. Pure function.
"""

from __future__ import annotations

import torch

from merge_core.methods.base import PerModel, TensorInputs, merge_method

NORM_EPS = 1e-8


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


@merge_method("nuslerp", reference="https://github.com/arcee-ai/mergekit", base="optional", non_base=(2, 2),
              delta_based=True)
def nuslerp(inputs: TensorInputs, *, weight: PerModel[float], nuslerp_row_wise: bool = False,
            nuslerp_flatten: bool = True) -> torch.Tensor:
    """slerp between the two non-base inputs (task vectors when there is a base), t = w1 / (w0 + w1)."""
    idx = [i for i in range(len(inputs.models)) if i != inputs.base_index]
    w0, w1 = (weight[i] for i in idx)
    total = w0 + w1
    t = 0.5 if abs(total) < 1e-6 else w1 / total
    base = inputs.base
    v0, v1 = inputs.deltas if base is not None else [inputs.tensors[i] for i in idx]
    flatten, row_wise = nuslerp_flatten, nuslerp_row_wise
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
