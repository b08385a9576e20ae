"""Trims of a task vector (magnitude top-k, outlier-then-magnitude, Bernoulli, DELLA) as masks, with L1 rescale.

Helpers for the method modules, not methods. Every per-trial trim is O(n): orderings are computed once per
input and kept with `TensorInputs.cached`; nothing here modifies an input tensor.
"""

from __future__ import annotations

import torch

from merge_core.errors import MergeConfigError
from merge_core.methods.base import TensorInputs

RESCALE_EPS = 1e-7  # mergekit skips the L1 rescale when either norm is below this


def sorted_values(values: torch.Tensor) -> torch.Tensor:
    """The flattened values in ascending order: the trial-independent order statistics of a trim."""
    return values.reshape(-1).sort().values


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


def magnitude_mask(inputs: TensorInputs, j: int, density: float) -> torch.Tensor | None:
    """Keep the k = max(1, int(density * n)) largest |delta_j| (TIES); None = keep all."""
    delta = inputs.deltas[j]
    if density >= 1:
        return None
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    k = max(1, int(density * delta.numel()))
    return keep_ranks(delta.abs(), _abs_order(inputs, j), 0, k)


def outlier_mask(inputs: TensorInputs, j: int, density: float, gamma: float) -> torch.Tensor | None:
    """Model Breadcrumbs: drop the int(gamma * n) largest |delta_j|, then keep the next int(density * n).

    When the two do not fit in n, the largest are dropped less (mergekit: keep the int(density * n) smallest).
    """
    delta = inputs.deltas[j]
    if density >= 1:
        return None
    n = delta.numel()
    target, top = int(density * n), int(gamma * n)
    bottom = max(0, n - target - top)
    return keep_ranks(delta.abs(), _abs_order(inputs, j), n - bottom - target, n - bottom)


def _abs_order(inputs: TensorInputs, j: int) -> torch.Tensor:
    return inputs.cached(f"abs_sorted/{j}", lambda: sorted_values(inputs.deltas[j].abs()))


def bernoulli_mask(inputs: TensorInputs, j: int, density: float, generator: torch.Generator | None
                   ) -> torch.Tensor | None:
    """DARE: keep each element with probability `density`."""
    delta = inputs.deltas[j]
    if density >= 1:
        return None
    return _uniform(delta, generator) < density


def della_mask(inputs: TensorInputs, j: int, density: float, epsilon: float, generator: torch.Generator | None
               ) -> torch.Tensor | None:
    """DELLA MagPrune: keep with probability (density - eps) + 2 eps * rank/(m - 1), rank by |delta| within rows."""
    delta = inputs.deltas[j]
    if density >= 1:
        return None
    if density <= 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise MergeConfigError(f"della needs 0 < density - epsilon and density + epsilon < 1 "
                               f"(density={density}, epsilon={epsilon})", inputs.name)
    rank = inputs.cached(f"della_rank/{j}", lambda: _row_rank(delta))
    probs = rank * (2 * epsilon)
    probs += density - epsilon
    return _uniform(delta, generator) < probs


def _row_rank(delta: torch.Tensor) -> torch.Tensor:
    """Rank of |delta| along dim 1 (a 1-D tensor is one row), scaled to [0, 1]; float32, shaped like delta."""
    mags = delta.abs().unsqueeze(0) if delta.dim() < 2 else delta.abs()
    order = mags.argsort(dim=1)
    rank = order.argsort(dim=1).to(torch.float32)
    width = mags.shape[1]
    return (rank / max(width - 1, 1)).reshape(delta.shape)


def _uniform(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(like.shape, generator=generator, device=like.device, dtype=torch.float32)


def l1_rescale(inputs: TensorInputs, j: int, kept: torch.Tensor) -> float:
    """mergekit's rescale after a trim: sum|delta| / sum|kept|, or 1 when either is below 1e-7."""
    before = inputs.cached(f"l1/{j}", lambda: float(inputs.deltas[j].abs().sum()))
    after = float(torch.linalg.vector_norm(kept, 1))
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return 1.0
    return before / after
