"""The span-wise magnitude trim (rank order + RankWindow) keeps exactly what keep_ranks keeps, ties included,
however the flat tensor is cut into spans."""

from __future__ import annotations

import random

import pytest
import torch

from merge_core.methods import base
from merge_core.methods.sparsify import keep_ranks, magnitude_order, rank_window, sorted_values


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
            assert torch.equal(_apply(rank_window(x, order, start, stop), x), expected), (n, levels, start, stop)
