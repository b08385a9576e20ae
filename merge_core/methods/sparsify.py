"""Trims of a task vector (magnitude top-k, outlier-then-magnitude, Bernoulli, DELLA) with the L1 rescale.

Helpers for the method modules, not methods. A trim is a `Keep`: it gives the kept part of any contiguous span
of the flattened task vector, so a merge can work span by span in cache. Every per-trial trim is O(n): rank
orders are computed once per input and kept with `TensorInputs.cached`; nothing here modifies an input tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from merge_core.errors import MergeConfigError
from merge_core.methods import fused
from merge_core.methods.base import TensorInputs, spans

RESCALE_EPS = 1e-7  # mergekit skips the L1 rescale when either norm is below this
_BITS = {torch.float32: (torch.int32, 0x7FFFFFFF), torch.float16: (torch.int16, 0x7FFF),
         torch.bfloat16: (torch.int16, 0x7FFF)}


# ---- order statistics ----------------------------------------------------------------------------
def sorted_values(values: torch.Tensor) -> torch.Tensor:
    """The flattened values in ascending order (numpy's vectorized sort on CPU: ~20x torch's there)."""
    flat = values.reshape(-1)
    if flat.device.type == "cpu" and flat.dtype in (torch.float32, torch.float64, torch.float16):
        return torch.from_numpy(np.sort(flat.numpy()))
    return flat.sort().values


def magnitude_order(x: torch.Tensor) -> torch.Tensor:
    """Flat positions of x from largest to smallest |x|, equal magnitudes in flattened order: rank r (0 = largest)
    is element order[r]. The trial-independent statistic of the magnitude trims; int32 (4 bytes an element).

    On CPU: one numpy sort of int64 keys (|x|'s bits, reversed, above the position; |x| >= 0 orders as its bits).
    """
    flat = x.reshape(-1)
    n = flat.numel()
    if flat.device.type == "cpu" and flat.dtype in _BITS and n < 2**31:
        bits = _magnitude_bits(flat).astype(np.int64)
        keys = ((_BITS[flat.dtype][1] - bits) << 32) | np.arange(n, dtype=np.int64)
        keys.sort()
        return torch.from_numpy((keys & 0xFFFFFFFF).astype(np.int32))
    order = torch.sort(flat.abs(), descending=True, stable=True).indices
    return order.to(torch.int32) if n < 2**31 else order


def _magnitude_bits(flat: torch.Tensor) -> np.ndarray:
    """|x| as integers that order as |x| does (a float's bits without the sign bit); a new numpy array."""
    int_type, top = _BITS[flat.dtype]
    return flat.view(int_type).numpy() & top


SAMPLE = 1 << 14     # elements sampled to bracket a rank (selection below): at most this many, 1 in 16 or fewer
CHUNK = 1 << 16      # elements per pass-chunk of the selection: its temporaries stay in cache


def rank_position(x: torch.Tensor, r: int) -> int:
    """Flat position of the element of rank r by |x| (0 = largest, equal |x| in flattened order), as
    `magnitude_order(x)[r]` but without sorting: O(n), one pass over x (plus a rare second one).

    A sample at random (seeded) positions brackets the rank's value, [lo, hi]; one pass, chunk by chunk, counts
    the elements above hi and gathers the positions of those inside (in flattened order); a partition of those
    few finds the value, and the run of elements equal to it, in flattened order, gives the position. A bracket
    that misses (rare) is widened to all values above or below it, so the answer never depends on the sample.
    """
    flat = x.reshape(-1)
    n = flat.numel()
    if flat.device.type != "cpu" or flat.dtype not in _BITS or n < 4096:
        return int(magnitude_order(x)[r])
    int_type, top = _BITS[flat.dtype]
    raw = flat.view(int_type).numpy()
    m = min(SAMPLE, n // 16)
    sample = raw[np.random.default_rng(0).integers(0, n, m)] & top       # random: a stride would follow rows
    guess, margin = m - 1 - r * m // n, 2 * math.isqrt(m) + 8      # ascending index of rank r's value, slack
    ends = max(0, guess - margin), min(m - 1, guess + margin)
    lo, hi = (int(v) for v in np.partition(sample, ends)[list(ends)])
    while True:
        above, inside = _bracket_pass(raw, top, lo, hi)
        if above > r:                        # rank r lies above the bracket
            lo, hi = hi + 1, top
        elif above + inside.size <= r:       # below it
            lo, hi = 0, lo - 1
        else:
            break
    values = raw[inside] & top
    need = r - above                         # rank r is the need-th largest inside the bracket (0-based)
    kth = values.size - 1 - need
    value = np.partition(values, kth)[kth]
    larger = int(np.count_nonzero(values > value))
    return int(inside[values == value][need - larger])


def _bracket_pass(raw: np.ndarray, top: int, lo: int, hi: int) -> tuple[int, np.ndarray]:
    """(how many |x| > hi, the flat positions with lo <= |x| <= hi in order), |x| = raw & top, chunk by chunk."""
    unsigned = raw.dtype.str.replace("i", "u")
    above, inside = 0, []
    for start in range(0, raw.size, CHUNK):
        bits = raw[start:start + CHUNK] & top
        above += int(np.count_nonzero(bits > hi))
        bits -= lo                                          # lo <= |x| <= hi as one unsigned comparison
        inside.append(np.flatnonzero(bits.view(unsigned) <= hi - lo) + start)
    return above, np.concatenate(inside)


def keep_ranks(values: torch.Tensor, ordered: torch.Tensor, start: int, stop: int) -> torch.Tensor | None:
    """Boolean mask of the elements whose rank in `values` (0 = largest) lies in [start, stop); None = all.

    `ordered` is `sorted_values(values)`. The mask is one or two comparisons against order statistics read by
    index. Where a boundary cuts through a run of equal non-zero values (common in large float32 tensors,
    the rule in bf16), the earliest elements in flattened order take the better ranks, so exactly
    stop - start elements are kept; mergekit's unstable sort keeps some such subset, which one is unspecified.
    Runs of zeros are left whole: a kept zero adds nothing to a merge, to a sign election or to an L1 norm,
    so the result is the same either way.
    """
    n = ordered.numel()
    start, stop = max(0, start), min(n, stop)
    if start == 0 and stop >= n:
        return None
    if stop <= start:
        return torch.zeros_like(values, dtype=torch.bool)
    mask, runs = None, []
    if stop < n:
        low = ordered[n - stop]                     # the smallest kept value
        mask = values >= low
        if ordered[n - stop - 1] == low:
            runs.append(low)
    if start > 0:
        high = ordered[n - 1 - start]               # the largest kept value
        mask = values <= high if mask is None else mask.logical_and_(values <= high)
        if ordered[n - start] == high and not (runs and runs[0] == high):
            runs.append(high)
    for value in runs:
        if value != 0:
            _split_run(values, ordered, value, start, stop, mask)
    return mask


def _split_run(values: torch.Tensor, ordered: torch.Tensor, value: torch.Tensor, start: int, stop: int,
               mask: torch.Tensor) -> None:
    """Within the run of elements equal to `value`, keep (in `mask`, in place) those ranked in [start, stop)."""
    n = ordered.numel()
    first = n - int(torch.searchsorted(ordered, value, right=True))     # how many are larger
    where = (values.reshape(-1) == value).nonzero().squeeze(1)          # the run, in flattened order
    rank = torch.arange(first, first + where.numel(), device=where.device)
    mask.view(-1)[where] = (rank >= start) & (rank < stop)


# ---- what a trim keeps --------------------------------------------------------------------------
class Keep:
    """The kept part of a task vector, span by span: `kept(x, lo)` for x = flat[lo:lo + len(x)].

    `cuts`: flat positions where the rule changes; callers split their spans there (see `base.spans`).
    `fused`: whether `fill_term` describes it to the fused loop (fused.c); its tensors are then float32 and
    contiguous whenever the task vector is.
    `l1`: sum |kept|, when the trim already computed it (else None).
    """

    cuts: tuple[int, ...] = ()
    l1: float | None = None
    fused = False

    def kept(self, x: torch.Tensor, lo: int) -> torch.Tensor:
        raise NotImplementedError

    def fill_term(self, term, lo: int) -> None:
        """Describe this trim for the segment starting at `lo` in a fused.Term."""
        raise NotImplementedError


@dataclass(frozen=True)
class RankWindow(Keep):
    """Keep the elements ranked [start, stop) by |x| (0 = largest; equal |x| ranked in flattened order).

    Given the rank order that is two thresholds, each of which changes at one position inside its run of
    equal |x| (the run's earlier elements have the better ranks):
      lower bound low:   |x| >= low up to position low_last, |x| > low after it     (None: no lower bound)
      upper bound high:  |x| < high before position high_first, |x| <= high from it (None: no upper bound)
    A bound is applied with `hardshrink(x, lam)` = x where |x| > lam, else 0: lam = low, or the largest value
    below low for ">=" (so `lows` / `highs` hold the two lambdas: up to / after the change).
    """

    lows: tuple[float, float] | None = None     # hardshrink lambdas at positions <= low_last, > low_last
    low_last: int = -1
    highs: tuple[float, float] | None = None    # lambdas at positions < high_first, >= high_first
    high_first: int = 0

    fused = True

    @property
    def cuts(self) -> tuple[int, ...]:
        return ((self.low_last + 1,) if self.lows else ()) + ((self.high_first,) if self.highs else ())

    def bounds(self, lo: int) -> tuple[float | None, float | None]:
        """The two lambdas in force from position lo to the next cut (None: no such bound)."""
        return (self.lows[lo > self.low_last] if self.lows else None,
                self.highs[lo >= self.high_first] if self.highs else None)

    def kept(self, x: torch.Tensor, lo: int) -> torch.Tensor:
        low, high = self.bounds(lo)
        out = x if low is None else torch.nn.functional.hardshrink(x, low)
        return out if high is None else out - torch.nn.functional.hardshrink(x, high)

    def fill_term(self, term, lo: int) -> None:
        low, high = self.bounds(lo)       # the same rule: kept where low < |x| <= high
        term.low = -1.0 if low is None else low
        term.high = math.inf if high is None else high


NOTHING = RankWindow(lows=(math.inf, math.inf))


def _below(value: float, dtype: torch.dtype) -> float:
    """The largest `dtype` value under `value` (|x| > it is |x| >= value); any negative number for value 0."""
    if value <= 0:
        return -1.0
    if dtype in _NUMPY:                     # numpy's scalar is ~20x cheaper than two torch tensors (per trial)
        kind = _NUMPY[dtype]
        return float(np.nextafter(kind(value), kind(-math.inf)))
    return float(torch.nextafter(torch.tensor(value, dtype=dtype), torch.tensor(-math.inf, dtype=dtype)))


_NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64}


def rank_window(x: torch.Tensor, position: Callable[[int], int], start: int, stop: int) -> RankWindow | None:
    """What keeps the ranks [start, stop) of |x|, given `position(r)`: the flat position of the element of rank r
    (`magnitude_order(x)[r]`, or `rank_position(x, r)`); None = everything."""
    n = x.numel()
    start, stop = max(0, start), min(n, stop)
    if start == 0 and stop >= n:
        return None
    if stop <= start:
        return NOTHING
    flat = x.reshape(-1)
    if flat.device.type == "cpu" and flat.dtype in _NUMPY:
        flat = flat.numpy()                      # reading one element: ~20x cheaper than through torch (per trial)
    window = {}
    if stop < n:
        last = position(stop - 1)                # the smallest kept, the last of its run that is kept
        low = abs(float(flat[last]))
        window.update(lows=(_below(low, x.dtype), low), low_last=last)
    if start > 0:
        first = position(start)                  # the largest kept, the first of its run that is kept
        high = abs(float(flat[first]))
        window.update(highs=(_below(high, x.dtype), high), high_first=first)
    return RankWindow(**window)


# ---- the trims ----------------------------------------------------------------------------------
def _ranked(inputs: TensorInputs, j: int) -> Callable[[int], int]:
    """position(r) of |delta_j| (see `rank_window`): from the full rank order, computed once and cached, when the
    inputs serve many trials (the engine: then a trial's trim costs O(1)); by selection otherwise (a one-off merge:
    O(n) instead of a sort)."""
    if not inputs.reused:
        return lambda r: rank_position(inputs.deltas[j], r)
    order = inputs.cached(f"abs_order/{j}", lambda: magnitude_order(inputs.deltas[j]))
    index = order.numpy() if order.device.type == "cpu" else order
    return lambda r: int(index[r])


def magnitude_mask(inputs: TensorInputs, j: int, density: float) -> Keep | None:
    """Keep the k = max(1, int(density * n)) largest |delta_j| (TIES); None = keep all."""
    delta = inputs.deltas[j]
    if density >= 1:
        return None
    if density <= 0 or delta.numel() == 0:
        return NOTHING
    k = max(1, int(density * delta.numel()))
    return rank_window(delta, _ranked(inputs, j), 0, k)


def outlier_mask(inputs: TensorInputs, j: int, density: float, gamma: float) -> Keep | None:
    """Model Breadcrumbs: drop the int(gamma * n) largest |delta_j|, then keep the next int(density * n).

    When the two do not fit in n, the largest are dropped less (mergekit: keep the int(density * n) smallest).
    """
    delta = inputs.deltas[j]
    if density >= 1:
        return None
    n = delta.numel()
    target, top = int(density * n), int(gamma * n)
    bottom = max(0, n - target - top)
    return rank_window(delta, _ranked(inputs, j), n - bottom - target, n - bottom)


def bernoulli_mask(inputs: TensorInputs, j: int, density: float, generator: torch.Generator | None
                   ) -> Keep | None:
    """DARE: keep each element with probability `density` (a uniform draw of the counter-based stream below it)."""
    if density >= 1:
        return None
    if density <= 0:
        return NOTHING
    return RandomKeep(stream_key(generator, j), density)


def della_mask(inputs: TensorInputs, j: int, density: float, epsilon: float, generator: torch.Generator | None
               ) -> Keep | None:
    """DELLA MagPrune: keep with probability (density - eps) + 2 eps * rank/(m - 1), rank by |delta| within rows."""
    delta = inputs.deltas[j]
    if density >= 1:
        return None
    if density <= 0:
        return NOTHING
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise MergeConfigError(f"della needs 0 < density - epsilon and density + epsilon < 1 "
                               f"(density={density}, epsilon={epsilon})", inputs.name)
    rank = inputs.cached(f"della_rank/{j}", lambda: _row_rank(delta))
    return RandomKeep(stream_key(generator, j), density - epsilon, 2 * epsilon, rank)


# ---- the random stream of the random trims ----------------------------------------------------------------
# Element i of a task vector draws u(i), a 16-bit uniform: quarter i % 4 (from the low bits) of SplitMix64's output
# for state key + (i // 4 + 1) * GOLDEN, the key derived from the tensor's seed (`stream_key`). A counter-based
# stream: any span draws its numbers on its own (no mask is kept: the L1 pass and the merge pass draw the same
# ones), the same on every device, in fused.c and below; one 64-bit hash serves four elements. Keep probabilities
# resolve to 2^-16, far below the sampling noise of any tensor.
GOLDEN, MIX1, MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def stream_key(generator: torch.Generator | None, j: int) -> int:
    """Task vector j's stream key: SplitMix64 of the (per-tensor) generator's seed and j, computed in Python (a
    draw of the generator costs ~10 us, 5% of a DELLA trial); from torch's global generator without one."""
    if generator is None:
        return int(torch.randint(0, 2**63 - 1, ()))
    z = (generator.initial_seed() + (j + 1) * GOLDEN) % 2**64
    z = ((z ^ (z >> 30)) * MIX1) % 2**64
    z = ((z ^ (z >> 27)) * MIX2) % 2**64
    return z ^ (z >> 31)


def uniform16(key: int, lo: int, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """u(lo) .. u(lo + n - 1) of the stream `key`, as int64 in [0, 65536)."""
    def signed(v: int) -> int:       # torch has no uint64: the same bits as int64 (products wrap alike)
        return v - 2**64 if v >= 2**63 else v

    def shift(z: torch.Tensor, bits: int) -> torch.Tensor:      # logical right shift
        return (z >> bits) & ((1 << (64 - bits)) - 1)

    at = torch.arange(lo, lo + n, dtype=torch.int64, device=device)
    z = ((at >> 2) + 1).mul_(signed(GOLDEN)).add_(signed(key))
    z = (z ^ shift(z, 30)).mul_(signed(MIX1))
    z = (z ^ shift(z, 27)).mul_(signed(MIX2))
    z ^= shift(z, 31)
    return (z >> ((at & 3) * 16)) & 0xFFFF


@dataclass(frozen=True)
class RandomKeep(Keep):
    """Keep element i where u(i) / 2^16 < a + b * rank[i] (rank None: a) in the stream `key`."""

    key: int
    a: float
    b: float = 0.0
    rank: RowRank | None = None
    fused = True

    @property
    def threshold(self) -> int:
        """Without ranks: kept where u < this (u / 2^16 < a exactly)."""
        return math.ceil(self.a * 65536)

    def kept(self, x: torch.Tensor, lo: int) -> torch.Tensor:
        u = uniform16(self.key, lo, x.numel(), x.device)
        if self.rank is None:
            keep = u < self.threshold
        else:
            keep = u.to(torch.float32).mul_(2.0**-16) < self.rank.values(lo, x.numel()) * self.b + self.a
        return x * keep.view(torch.uint8)       # x * bool is 3x slower on CPU

    def fill_term(self, term, lo: int) -> None:
        term.key, term.prob_a, term.prob_b, term.threshold = self.key, self.a, self.b, self.threshold
        term.random = 1 if self.rank is None else 2
        if self.rank is not None:
            self.rank.fill_term(term, lo)


@dataclass(frozen=True)
class RowRank:
    """Rank of |delta| within its row, scaled to [0, 1]: position r in the row stored in 16 bits (a uint16 in an
    int16 tensor), the rank r / (width - 1) computed where it is used (a float32 division, correctly rounded:
    the values float32 ranks had). Half the bytes per element of float32 ranks, in memory and in both passes of a
    DELLA trial. Rows longer than 65536 keep float32 values (`span` 0)."""

    codes: torch.Tensor                 # flat: int16 positions (unsigned bits), or float32 values
    span: float                         # width - 1 (at least 1), or 0 for float32 values

    def values(self, lo: int, n: int) -> torch.Tensor:
        """The float32 ranks of flat elements lo .. lo + n - 1."""
        part = self.codes[lo:lo + n]
        if not self.span:
            return part
        return (part.to(torch.int32) & 0xFFFF).to(torch.float32) / self.span

    def fill_term(self, term, lo: int) -> None:
        term.rank = self.codes.data_ptr() + self.codes.element_size() * lo
        term.span = self.span


def _row_rank(delta: torch.Tensor) -> RowRank:
    """Rank of |delta| along dim 1 (a 1-D tensor is one row), scaled to [0, 1] (see RowRank).

    On CPU: numpy's argsort per row (vectorized: 3x torch's there) and its inverse by one scatter instead of a
    second sort. Equal magnitudes get their ranks in the sort's (deterministic) order."""
    mags = delta.abs().unsqueeze(0) if delta.dim() < 2 else delta.abs()
    width = mags.shape[1]
    span = float(max(width - 1, 1))
    if width > 1 << 16:
        rank = mags.argsort(dim=1).argsort(dim=1).to(torch.float32)
        return RowRank((rank / span).reshape(-1), 0.0)
    if mags.device.type == "cpu" and mags.dim() == 2:
        rows = mags.float().numpy()
        order = np.argsort(rows, axis=1)
        codes = np.empty(rows.shape, dtype=np.uint16)
        np.put_along_axis(codes, order, np.arange(width, dtype=np.uint16)[None, :], axis=1)
        return RowRank(torch.from_numpy(codes.view(np.int16)).reshape(-1), span)
    rank = mags.argsort(dim=1).argsort(dim=1)
    return RowRank(torch.where(rank >= 1 << 15, rank - (1 << 16), rank).to(torch.int16).reshape(-1), span)


def l1_rescale(inputs: TensorInputs, j: int, keep: Keep | None) -> float:
    """mergekit's rescale after a trim: sum|delta| / sum|kept|, or 1 when either is below 1e-7."""
    if keep is None:
        return 1.0
    before = inputs.cached(f"l1/{j}", lambda: float(inputs.deltas[j].abs().sum()))
    after = keep.l1
    if after is None and keep.fused and fused.usable(inputs.deltas[j]):
        after = fused.kept_abs_sum(inputs.deltas[j], keep)
    elif after is None:
        flat = inputs.deltas[j].reshape(-1)
        after = sum(float(keep.kept(flat[lo:hi], lo).abs().sum()) for lo, hi in spans(flat, keep.cuts))
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return 1.0
    return before / after
