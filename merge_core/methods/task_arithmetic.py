"""The generalized task-arithmetic family: trim each task vector -> (sign consensus) -> weighted combine -> base + .

task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs, breadcrumbs_ties, della, della_linear, as mergekit
0.1.5 declares them (same parameters, defaults, normalize/rescale choices). Pure functions of TensorInputs.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from merge_core.methods import sparsify
from merge_core.methods.base import MergeMethod, Param, TensorInputs, register, spans

Trim = Callable[[TensorInputs, int, dict[str, Any], "torch.Generator | None"], "sparsify.Keep | None"]


def _magnitude(inputs, j, p, gen):
    return sparsify.magnitude_mask(inputs, j, p["density"])


def _outliers(inputs, j, p, gen):
    return sparsify.outlier_mask(inputs, j, p["density"], p["gamma"])


def _bernoulli(inputs, j, p, gen):
    return sparsify.bernoulli_mask(inputs, j, p["density"], gen)


def _della(inputs, j, p, gen):
    return sparsify.della_mask(inputs, j, p["density"], p["epsilon"], gen)


def combine(inputs: TensorInputs, params: dict[str, Any], model_params: list[dict[str, Any]],
            generator: torch.Generator | None, trim: Trim | None, consensus: bool) -> torch.Tensor:
    """base + lambda * sum_i w_i trim(delta_i) [agreeing with the elected sign] / (sum of those w_i, if normalize).

    The elected sign is that of sum_i w_i trim(delta_i), with 0 counted positive; an element agrees when its
    weighted value has that sign (zeros never agree). Without consensus the divisor is sum_i w_i (1 when ~0).
    A trim rescaled to the L1 norm of its task vector weighs w_i * factor_i in the sums (not in the divisor).
    The per-tensor scalars come first; then the elementwise work runs span by span (in cache, see `spans`).
    """
    base = inputs.base
    deltas = inputs.deltas
    if not deltas:
        return base.clone()
    others = [model_params[i] for i in inputs.delta_indices]
    weights = [p["weight"] for p in others]
    keeps = [trim(inputs, j, p, generator) if trim else None for j, p in enumerate(others)]
    factors = [sparsify.l1_rescale(inputs, j, keep) if params["rescale"] else 1.0 for j, keep in enumerate(keeps)]
    coeffs = [w * f for w, f in zip(weights, factors)]
    lam = params["lambda"]
    if not consensus:
        total = sum(weights)
        scale = lam / (total if params["normalize"] and abs(total) >= 1e-8 else 1.0)
        coeffs = [c * scale for c in coeffs]

    out = inputs.new_output(base)
    flat_out, flat_base, flat_deltas = out.view(-1), base.reshape(-1), [d.reshape(-1) for d in deltas]
    ranges = list(spans(flat_base, [c for keep in keeps if keep is not None for c in keep.cuts]))
    scratch = torch.empty(5, max((hi - lo for lo, hi in ranges), default=0), dtype=base.dtype, device=base.device)
    for lo, hi in ranges:
        kept = [d[lo:hi] if keep is None else keep.kept(d[lo:hi], lo) for d, keep in zip(flat_deltas, keeps)]
        if not consensus:
            mixed = torch.mul(kept[0], coeffs[0], out=scratch[0, :hi - lo])
            for k, c in zip(kept[1:], coeffs[1:]):
                mixed.add_(k, alpha=c)
            torch.add(flat_base[lo:hi], mixed, out=flat_out[lo:hi])
            continue
        twice_sum, twice_weight = _elect(kept, weights, coeffs, params["normalize"], scratch[:, :hi - lo])
        if twice_weight is None:
            torch.add(flat_base[lo:hi], twice_sum, alpha=lam / 2, out=flat_out[lo:hi])
        else:
            torch.addcdiv(flat_base[lo:hi], twice_sum, twice_weight, value=lam, out=flat_out[lo:hi])
    return out


def _elect(kept: list[torch.Tensor], weights: list[float], coeffs: list[float], normalize: bool,
           scratch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """TIES sign election with float accumulators instead of per-model boolean masks (much faster on CPU).

    With S_j = c_j * kept_j, the elected sign s = sign(sum_j S_j) (0 -> +) and g_j = sign(kept_j):
        sum_j S_j [sign S_j = s]  =  (sum_j S_j + s * sum_j |S_j|) / 2
        sum_j w_j [sign S_j = s]  =  (sum_j w_j g_j^2 + s * sum_j |w_j| g_j) / 2
    (sign S_j = sign(w_j) g_j: the factors c_j / w_j are positive.) Returns twice each (the second only when
    normalizing; where it is 0 nothing agrees, the sum is 0 too, and it is made non-zero).
    `scratch`: 5 buffers shaped like kept[0].
    """
    total, size, count, lean = scratch[:4].zero_()
    s = scratch[4]
    for k, w, c in zip(kept, weights, coeffs):
        total.add_(k, alpha=c)
        g = torch.sign(k)
        size.addcmul_(k, g, value=abs(c))
        if normalize:
            lean.add_(g, alpha=abs(w))
            count.addcmul_(g, g, value=w)
    torch.copysign(s.fill_(1), total, out=s)   # -0.0 only when every S_j is 0: then all terms vanish
    twice_sum = total.addcmul_(size, s)
    if not normalize:
        return twice_sum, None
    twice_weight = count.addcmul_(lean, s)
    if min(weights) > 0:
        twice_weight.clamp_(min=torch.finfo(twice_weight.dtype).tiny)   # 0 only where nothing agrees
    else:
        twice_weight.add_(1 - twice_weight.abs().sign())   # 0 -> 1 (float math: bool masks are slow on CPU)
    return twice_sum, twice_weight


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
