"""The span-wise magnitude trim (rank order + RankWindow) keeps exactly what keep_ranks keeps, ties included,
however the flat tensor is cut into spans."""

from __future__ import annotations

import random

import pytest
import torch

from merge_core.methods import base
from merge_core.methods import sparsify
from merge_core.methods.sparsify import keep_ranks, magnitude_order, rank_position, rank_window, sorted_values


def _apply(window, x: torch.Tensor) -> torch.Tensor:
    if window is None:
        return x.clone()
    flat, out = x.reshape(-1), torch.empty(x.numel(), dtype=x.dtype)
    for lo, hi in base.spans(flat, window.cuts):
        out[lo:hi] = window.kept(flat[lo:hi], lo)
    return out.view_as(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rank_window_equals_keep_ranks_through_ties(dtype, monkeypatch):
    monkeypatch.setattr(base, "SPAN", 64)   # many spans, so cuts fall inside and between them
    rng, gen = random.Random(0), torch.Generator().manual_seed(0)
    for _ in range(25):
        n, levels = rng.choice([1, 7, 300, 1001]), rng.choice([3, 40, 10**6])   # few levels: long tie runs
        x = (torch.randint(-levels, levels + 1, (n,), generator=gen).float() / levels * 0.01).to(dtype)
        order = magnitude_order(x)
        assert torch.equal(order.long(), torch.sort(x.abs().float(), descending=True, stable=True).indices)
        magnitudes = x.abs()
        ordered = sorted_values(magnitudes.float()).to(dtype)
        for _ in range(12):
            start = 0 if rng.random() < 0.5 else rng.randint(0, n)
            stop = rng.randint(start, n + 2)
            mask = keep_ranks(magnitudes, ordered, start, stop)
            expected = x.clone() if mask is None else x * mask
            assert torch.equal(_apply(rank_window(x, lambda r: int(order[r]), start, stop), x), expected), \
                (n, levels, start, stop)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rank_position_selects_what_the_full_order_gives(dtype, monkeypatch):
    """The one-off merge's selection (no sort) finds the same element of every rank as the engine's cached order,
    through long runs of equal |x| and zeros, and when the sampled bracket misses (a tiny sample)."""
    rng, gen = random.Random(1), torch.Generator().manual_seed(1)
    for sample in (64, 4):       # 4: brackets miss often and are widened
        monkeypatch.setattr(sparsify, "SAMPLE", sample)
        for _ in range(6):
            n, levels = rng.choice([5005, 20003]), rng.choice([5, 300, 10**6])
            x = (torch.randint(-levels, levels + 1, (n,), generator=gen).float() / levels * 0.01).to(dtype)
            if rng.random() < 0.5:
                x = x.reshape(-1, 7) if n % 7 == 0 else x.reshape(1, -1)
            order = magnitude_order(x)
            for r in [0, n - 1, *(rng.randrange(n) for _ in range(20))]:
                assert rank_position(x, r) == int(order[r]), (n, levels, r)
