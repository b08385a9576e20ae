"""The generalized task-arithmetic family: trim each task vector -> (sign consensus) -> weighted combine -> base + .

task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs, breadcrumbs_ties, della, della_linear, as mergekit
0.1.5 declares them (same parameters, defaults, normalize/rescale choices). Pure functions of TensorInputs.
"""

from __future__ import annotations

import torch

from merge_core.methods import fused, sparsify
from merge_core.methods.base import (
    PerModel,
    TensorInputs,
    Unit,
    merge_method,
    non_base,
    spans,
)


def combine(inputs: TensorInputs, weight: list[float], keeps: list[sparsify.Keep | None] | None, *, consensus: bool,
            normalize: bool, rescale: bool, lam: float) -> torch.Tensor:
    """base + lam * sum_i w_i keep_i(delta_i) [agreeing with the elected sign] / (sum of those w_i, if normalize).

    `weight` is per model (aligned with inputs.models), `keeps` per task vector (None: no trim). The elected sign
    is that of sum_i w_i keep_i(delta_i), with 0 counted positive; an element agrees when its weighted value has
    that sign (zeros never agree). Without consensus the divisor is sum_i w_i (1 when ~0). A trim rescaled to
    the L1 norm of its task vector weighs w_i * factor_i in the sums (not in the divisor). The per-tensor
    scalars come first; then the elementwise work runs in one compiled pass (fused.c, on CPU where a C compiler
    exists), else as torch operations span by span (in cache, see `spans`).
    """
    base = inputs.base
    deltas = inputs.deltas
    if not deltas:
        return base.clone()
    weights = non_base(inputs, weight)
    keeps = keeps or [None] * len(deltas)
    factors = [sparsify.l1_rescale(inputs, j, keep) if rescale else 1.0 for j, keep in enumerate(keeps)]
    coeffs = [w * f for w, f in zip(weights, factors)]
    if not consensus:
        total = sum(weights)
        scale = lam / (total if normalize and abs(total) >= 1e-8 else 1.0)
        coeffs = [c * scale for c in coeffs]

    out = inputs.new_output(base)
    if all(keep is None or keep.fused for keep in keeps) and fused.usable(out, base, *deltas):
        fused.combine(out, base, deltas, keeps, coeffs, weights, consensus=consensus, normalize=normalize, lam=lam)
        return out
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
        twice_sum, twice_weight = _elect(kept, weights, coeffs, normalize, scratch[:, :hi - lo])
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
        twice_weight.add_(1 - twice_weight.abs().sign(), alpha=2)   # 0 -> 2: divisor 1 (bool masks are slow on CPU)
    return twice_sum, twice_weight


# ---- the methods: trim, consensus and default normalize / rescale as mergekit 0.1.5 declares them ---------
# `int8_mask` only picks mergekit's mask dtype (no effect on values); `density` is accepted by every method of the
# family, as in mergekit, and used by those that trim.
TA, TIES, DARE = "https://arxiv.org/abs/2212.04089", "https://arxiv.org/abs/2306.01708", "https://arxiv.org/abs/2311.03099"
CRUMBS, DELLA = "https://arxiv.org/abs/2312.06795", "https://arxiv.org/abs/2406.11617"


@merge_method("task_arithmetic", reference=TA, base="required", delta_based=True)
def task_arithmetic(inputs: TensorInputs, *, weight: PerModel[float], density: PerModel[Unit] = 1.0,
                    normalize: bool = False, rescale: bool = False, lambda_: float = 1.0, int8_mask: bool = False):
    return combine(inputs, weight, None, consensus=False, normalize=normalize, rescale=rescale, lam=lambda_)


@merge_method("ties", reference=TIES, base="required", delta_based=True)
def ties(inputs: TensorInputs, *, weight: PerModel[float], density: PerModel[Unit] = 1.0, normalize: bool = True,
         rescale: bool = False, lambda_: float = 1.0, int8_mask: bool = False):
    keeps = [sparsify.magnitude_mask(inputs, j, d) for j, d in enumerate(non_base(inputs, density))]
    return combine(inputs, weight, keeps, consensus=True, normalize=normalize, rescale=rescale, lam=lambda_)


@merge_method("dare_linear", reference=DARE, base="required", delta_based=True, bind={"consensus": False})
@merge_method("dare_ties", reference=DARE, base="required", delta_based=True, bind={"consensus": True})
def dare(inputs: TensorInputs, *, consensus: bool, weight: PerModel[float], density: PerModel[Unit] = 1.0,
         normalize: bool = False, rescale: bool = True, lambda_: float = 1.0, int8_mask: bool = False,
         generator: torch.Generator | None = None):
    """DARE: keep each task-vector entry with probability `density` (and rescale); with or without sign consensus."""
    keeps = [sparsify.bernoulli_mask(inputs, j, d, generator) for j, d in enumerate(non_base(inputs, density))]
    return combine(inputs, weight, keeps, consensus=consensus, normalize=normalize, rescale=rescale, lam=lambda_)


@merge_method("breadcrumbs", reference=CRUMBS, base="required", delta_based=True, bind={"consensus": False})
@merge_method("breadcrumbs_ties", reference=CRUMBS, base="required", delta_based=True, bind={"consensus": True})
def breadcrumbs(inputs: TensorInputs, *, consensus: bool, weight: PerModel[float], density: PerModel[Unit] = 1.0,
                gamma: PerModel[Unit] = 0.01, normalize: bool = False, rescale: bool = False, lambda_: float = 1.0,
                int8_mask: bool = False):
    """Model Breadcrumbs: drop the largest (gamma) and the smallest entries of each task vector, keep `density`."""
    keeps = [sparsify.outlier_mask(inputs, j, d, g)
             for j, (d, g) in enumerate(zip(non_base(inputs, density), non_base(inputs, gamma)))]
    return combine(inputs, weight, keeps, consensus=consensus, normalize=normalize, rescale=rescale, lam=lambda_)


@merge_method("della_linear", reference=DELLA, base="required", delta_based=True, bind={"consensus": False},
              defaults={"normalize": False})
@merge_method("della", reference=DELLA, base="required", delta_based=True, bind={"consensus": True})
def della(inputs: TensorInputs, *, consensus: bool, weight: PerModel[float], density: PerModel[Unit] = 1.0,
          epsilon: PerModel[Unit] = 0.15, normalize: bool = True, rescale: bool = True, lambda_: float = 1.0,
          int8_mask: bool = False, generator: torch.Generator | None = None):
    """DELLA: keep entries with a probability that grows with their magnitude rank (MagPrune), then rescale."""
    keeps = [sparsify.della_mask(inputs, j, d, e, generator)
             for j, (d, e) in enumerate(zip(non_base(inputs, density), non_base(inputs, epsilon)))]
    return combine(inputs, weight, keeps, consensus=consensus, normalize=normalize, rescale=rescale, lam=lambda_)
