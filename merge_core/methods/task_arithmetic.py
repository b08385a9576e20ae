"""The generalized task-arithmetic family: trim each task vector -> (sign consensus) -> weighted combine -> base + .

task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs, breadcrumbs_ties, della, della_linear, as mergekit
0.1.5 declares them (same parameters, defaults, normalize/rescale choices). Pure functions of TensorInputs.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from merge_core.methods import sparsify
from merge_core.methods.base import MergeMethod, Param, TensorInputs, register

Trim = Callable[[TensorInputs, int, dict[str, Any], "torch.Generator | None"], "torch.Tensor | None"]


def _magnitude(inputs, j, p, gen):
    return sparsify.magnitude_mask(inputs, j, p["density"])


def _outliers(inputs, j, p, gen):
    return sparsify.outlier_mask(inputs, j, p["density"], p["gamma"])


def _bernoulli(inputs, j, p, gen):
    return sparsify.bernoulli_mask(inputs, j, p["density"], gen)


def _della(inputs, j, p, gen):
    return sparsify.della_mask(inputs, j, p["density"], p["epsilon"], gen)


def trimmed(inputs: TensorInputs, j: int, mask: torch.Tensor | None, rescale: bool) -> tuple[torch.Tensor, float]:
    """delta_j * mask (the delta itself when mask is None: read only) and its L1 rescale factor (1 if not rescaling)."""
    delta = inputs.deltas[j]
    if mask is None:
        return delta, 1.0
    kept = delta * mask
    return kept, (sparsify.l1_rescale(inputs, j, kept) if rescale else 1.0)


def combine(inputs: TensorInputs, params: dict[str, Any], model_params: list[dict[str, Any]],
            generator: torch.Generator | None, trim: Trim | None, consensus: bool) -> torch.Tensor:
    """base + lambda * sum_i w_i trim(delta_i) [agreeing with the elected sign] / (sum of those w_i, if normalize).

    The elected sign is that of sum_i w_i trim(delta_i), with 0 counted positive; an element agrees when its
    weighted value has that sign (zeros never agree). Without consensus the divisor is sum_i w_i (1 when ~0).
    """
    base = inputs.base
    deltas = inputs.deltas
    if not deltas:
        return base.clone()
    others = [model_params[i] for i in inputs.delta_indices]
    weights = [p["weight"] for p in others]
    lam = params["lambda"]
    masks = [trim(inputs, j, p, generator) if trim else None for j, p in enumerate(others)]
    if not consensus:
        total = sum(weights)
        scale = lam / (total if params["normalize"] and abs(total) >= 1e-8 else 1.0)
        out = base.clone()
        for j, (w, mask) in enumerate(zip(weights, masks)):
            if mask is not None and not params["rescale"]:
                out.addcmul_(deltas[j], mask, value=w * scale)   # fused trim + accumulate
            else:
                kept, factor = trimmed(inputs, j, mask, params["rescale"])
                out.add_(kept, alpha=w * factor * scale)
        return out

    return _elect_and_combine(inputs, weights, masks, params)


def _elect_and_combine(inputs: TensorInputs, weights: list[float], masks: list[torch.Tensor | None],
                       params: dict[str, Any]) -> torch.Tensor:
    """TIES sign election with float accumulators instead of per-model boolean masks (much faster on CPU).

    With S_j = w_j * kept_j, the elected sign s = sign(sum_j S_j) (0 -> +) and g_j = sign(kept_j):
        sum_j S_j [sign S_j = s]  =  (sum_j S_j + s * sum_j |S_j|) / 2
        sum_j w_j [sign S_j = s]  =  (sum_j w_j g_j^2 + s * sum_j |w_j| g_j) / 2
    """
    base = inputs.base
    total, size = torch.zeros_like(base), torch.zeros_like(base)
    normalize = params["normalize"]
    if normalize:
        count, lean = torch.zeros_like(base), torch.zeros_like(base)
    for j, (w, mask) in enumerate(zip(weights, masks)):
        kept, factor = trimmed(inputs, j, mask, params["rescale"])
        c = w * factor
        total.add_(kept, alpha=c)
        g = torch.sign(kept)
        size.addcmul_(kept, g, value=abs(c))
        if normalize:
            lean.add_(g, alpha=abs(w))
            count.addcmul_(g, g, value=w)
    s = torch.ones_like(total).copysign_(total)   # -0.0 only when every S_j is 0: then all terms vanish
    mixed = size.mul_(s).add_(total)
    if normalize:
        divisor = lean.mul_(s).add_(count)
        mixed.div_(divisor.masked_fill_(divisor == 0, 1))   # the halves cancel
    else:
        mixed.mul_(0.5)
    lam = params["lambda"]
    if lam != 1:
        mixed.mul_(lam)
    return mixed.add_(base)


def _declare(name: str, trim: Trim | None, consensus: bool, normalize: bool, rescale: bool,
             extra: dict[str, Param] | None = None) -> MergeMethod:
    def merge(inputs, params, model_params, generator):
        return combine(inputs, params, model_params, generator, trim, consensus)

    merge.__name__ = f"merge_{name}"
    return register(MergeMethod(
        name=name,
        merge=merge,
        params={"int8_mask": Param(False, bool),   # only picks mergekit's mask dtype: no effect on values
                "normalize": Param(normalize, bool),
                "rescale": Param(rescale, bool), "lambda": Param(1.0, float)},
        model_params={"weight": Param(None, float, required=True), "density": Param(1.0, float, 0.0, 1.0),
                      **(extra or {})},
        requires_base=True,
        delta_based=True,
        random=trim in (_bernoulli, _della),
    ))


GAMMA = {"gamma": Param(0.01, float, 0.0, 1.0)}
EPSILON = {"epsilon": Param(0.15, float, 0.0, 1.0)}

_declare("task_arithmetic", None, consensus=False, normalize=False, rescale=False)
_declare("ties", _magnitude, consensus=True, normalize=True, rescale=False)
_declare("dare_ties", _bernoulli, consensus=True, normalize=False, rescale=True)
_declare("dare_linear", _bernoulli, consensus=False, normalize=False, rescale=True)
_declare("breadcrumbs", _outliers, consensus=False, normalize=False, rescale=False, extra=GAMMA)
_declare("breadcrumbs_ties", _outliers, consensus=True, normalize=False, rescale=False, extra=GAMMA)
_declare("della", _della, consensus=True, normalize=True, rescale=True, extra=EPSILON)
_declare("della_linear", _della, consensus=False, normalize=False, rescale=True, extra=EPSILON)
