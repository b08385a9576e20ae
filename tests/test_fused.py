"""The fused loop (fused.c) and the torch operations compute the same task-arithmetic merges; without a compiler
the torch operations run."""

from __future__ import annotations

import math
import random

import pytest
import torch

from merge_core.methods import TensorInputs, fused, get_method

needs_cc = pytest.mark.skipif(fused.library() is None, reason="no C compiler: only the torch path exists here")


def _merge(method: str, tensors: list[torch.Tensor], params: dict, model_params: list[dict], use_fused: bool,
           monkeypatch) -> torch.Tensor:
    monkeypatch.setattr(fused, "_loaded", [] if use_fused else [None])
    inputs = TensorInputs("t", [f"m{i}" for i in range(len(tensors))], tensors, 0)
    return get_method(method).merge(inputs, params, model_params, torch.Generator().manual_seed(5))


@needs_cc
@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties", "dare_linear",
                                    "dare_ties", "della", "della_linear"])
def test_fused_equals_torch_operations(method, monkeypatch):
    rng, gen = random.Random(0), torch.Generator().manual_seed(0)
    for _ in range(12):
        n = rng.choice([1, 37, 5000, 70001])
        base = torch.randn(n, generator=gen)
        tensors = [base] + [base + torch.randn(n, generator=gen).mul_(0.01).round_(decimals=4)   # runs of ties
                            for _ in range(rng.choice([1, 2, 3]))]
        model_params = [{}] + [{"weight": rng.choice([0.3, 0.7, 1.0, -0.4142]), "density": rng.choice([0.2, 0.5, 1.0]),
                                "gamma": 0.02, "epsilon": 0.1} for _ in tensors[1:]]
        params = {"normalize": rng.random() < 0.5, "rescale": rng.random() < 0.5, "lambda": rng.choice([1.0, 0.7])}
        ours = _merge(method, tensors, params, model_params, True, monkeypatch)
        theirs = _merge(method, tensors, params, model_params, False, monkeypatch)
        assert torch.allclose(ours, theirs, rtol=1e-6, atol=1e-7), (method, n, params, model_params)


@needs_cc
def test_fused_divides_by_one_where_agreeing_weights_cancel(monkeypatch):
    """mergekit sets a zero divisor to 1: with weights 0.5 and -0.5 on opposite-signed deltas both agree."""
    base = torch.zeros(4)
    tensors = [base, torch.tensor([1.0, 2.0, -1.0, 0.0]), torch.tensor([-1.0, -2.0, 1.0, 0.0])]
    model_params = [{}, {"weight": 0.5, "density": 1.0}, {"weight": -0.5, "density": 1.0}]
    for use_fused in (True, False):
        out = _merge("ties", tensors, {"normalize": True}, model_params, use_fused, monkeypatch)
        assert torch.equal(out, torch.tensor([1.0, 2.0, -1.0, 0.0])), use_fused


@needs_cc
@pytest.mark.parametrize("where", ["base", "delta"])
def test_fused_lets_nan_through(where, monkeypatch):
    base = torch.randn(100)
    ft = base + 0.01
    (base if where == "base" else ft)[7] = float("nan")
    out = _merge("ties", [base, ft], {}, [{}, {"weight": 1.0, "density": 0.5}], True, monkeypatch)
    assert torch.isnan(out[7])


@needs_cc
def test_the_random_stream_is_the_same_in_c_and_torch():
    """DARE's and DELLA's draws: fused.c's stream equals sparsify.uniform16's, from any offset (so spans agree)."""
    from merge_core.methods.sparsify import RandomKeep, RowRank, _row_rank, uniform16

    x = torch.ones(10_000)
    codes = _row_rank(torch.randn(10, 1000, generator=torch.Generator().manual_seed(3)))   # 16-bit positions
    floats = RowRank(torch.rand(10_000), 0.0)                                               # rows over 65536
    assert codes.codes.dtype == torch.int16 and codes.span == 999
    for key in (0, 12345, 2**63 - 2):
        for keep in (RandomKeep(key, 0.5), RandomKeep(key, 0.3, 0.4, codes), RandomKeep(key, 0.3, 0.4, floats)):
            assert fused.kept_abs_sum(x, keep) == float(keep.kept(x, 0).sum())
            for lo in (0, 1, 3, 517):       # a span from any position draws what the whole stream draws there
                assert torch.equal(keep.kept(x[lo:], lo), keep.kept(x, 0)[lo:])
        assert torch.equal(uniform16(key, 301, 50), uniform16(key, 0, 351)[301:])
    draws = uniform16(7, 0, 1_000_000).float()
    assert abs(float(draws.mean()) / 65536 - 0.5) < 2e-3 and float(draws.min()) >= 0 and float(draws.max()) < 65536
    assert abs(float((uniform16(7, 0, 1_000_000) < RandomKeep(7, 0.3).threshold).float().mean()) - 0.3) < 2e-3


def test_row_ranks_in_16_bits_are_the_float_ranks():
    """DELLA's 16-bit rank positions give the float32 ranks a double argsort gives, on CPU (numpy) and the torch
    path; rows wider than 65536 fall back to float32 values."""
    from merge_core.methods.sparsify import _row_rank

    gen = torch.Generator().manual_seed(4)
    for shape in [(7,), (5, 40000), (3, 4, 9)]:      # distinct magnitudes: no tie left to the sort's order
        n = math.prod(shape)
        delta = (torch.randperm(n, generator=gen).float() + 1).mul_(torch.randn(n, generator=gen).sign()).view(shape)
        mags = delta.abs().unsqueeze(0) if delta.dim() < 2 else delta.abs()
        expected = (mags.argsort(dim=1).argsort(dim=1).float() / max(mags.shape[1] - 1, 1)).reshape(-1)
        rank = _row_rank(delta)
        assert rank.codes.dtype == torch.int16
        assert torch.equal(rank.values(0, delta.numel()), expected), shape
        assert torch.equal(rank.values(11, 5), expected[11:16]), shape
    wide = _row_rank(torch.randn(1, (1 << 16) + 1, generator=gen))
    assert wide.codes.dtype == torch.float32 and wide.span == 0.0


@needs_cc
@pytest.mark.parametrize("method", ["ties", "dare_ties", "della", "breadcrumbs"])
def test_fused_bfloat16_is_the_float32_merge_rounded_once(method, monkeypatch):
    """On bfloat16 inputs the fused loop computes in float32 and rounds the output once (to nearest even). (Without
    the L1 rescale, whose norms torch sums to bfloat16.)"""
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(3, 5000, generator=gen).to(torch.bfloat16)
    tensors = [base] + [(base.float() + torch.randn(3, 5000, generator=gen) * 0.05).to(torch.bfloat16)
                        for _ in range(2)]
    model_params = [{}] + [{"weight": w, "density": 0.4, "gamma": 0.02, "epsilon": 0.1} for w in (0.6, 0.9)]
    ours = _merge(method, tensors, {"normalize": True, "rescale": False}, model_params, True, monkeypatch)
    # the same task vectors in float32 (a bfloat16 merge takes x - base in bfloat16, as mergekit does)
    wide_tensors = [base.float()] + [base.float() + (t - base).float() for t in tensors[1:]]
    assert all(torch.equal(w - wide_tensors[0], (t - base).float()) for w, t in zip(wide_tensors[1:], tensors[1:]))
    wide = _merge(method, wide_tensors, {"normalize": True, "rescale": False}, model_params, True, monkeypatch)
    assert ours.dtype == torch.bfloat16
    assert torch.equal(ours, wide.to(torch.bfloat16))
    torch_ops = _merge(method, tensors, {"normalize": True, "rescale": False}, model_params, False, monkeypatch)
    # torch rounds every step to bfloat16: a few ulps apart, except where that flips a sign election near a tie
    close = (ours.float() - torch_ops.float()).abs() <= 2 ** -6 * base.float().abs().max()
    assert float(close.float().mean()) > 0.999


def test_without_a_working_compiler_the_torch_path_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", "false")
    monkeypatch.setenv("MERGESEARCH_CACHE", str(tmp_path))
    assert fused._load() is None
    monkeypatch.setattr(fused, "_loaded", [None])
    base = torch.randn(1000)
    out = _merge("ties", [base, base + 0.01], {}, [{}, {"weight": 1.0, "density": 0.5}], False, monkeypatch)
    assert out.shape == base.shape


def _mergekit_linear(tensors: list[torch.Tensor], weights: list[float], normalize: bool) -> torch.Tensor:
    """mergekit 0.1.5's linear arithmetic: float32 zeros, one addcmul_ per input, divided by the weights' sum."""
    w = torch.tensor(weights, dtype=torch.float32)
    result = torch.zeros_like(tensors[0], dtype=torch.float32)
    for x, c in zip(tensors, w.unbind(0)):
        result.addcmul_(x, c)
    if normalize:
        result.div_(w.sum())
    return result.to(tensors[0].dtype)


@needs_cc
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_linear_equals_mergekit_arithmetic(dtype, monkeypatch):
    """The multiply-adds of mergekit's addcmul_ as torch's kernels do them here (fused with SIMD, rounded twice
    without): the same values bit for bit under every ATEN_CPU_CAPABILITY (bfloat16 inputs have few mantissa bits,
    so one rounding more or less would flip many of them)."""
    rng, gen = random.Random(1), torch.Generator().manual_seed(1)
    for _ in range(10):
        n = rng.choice([1, 15, 37, 5000, 70001])
        tensors = [torch.randn(n, generator=gen).to(dtype) for _ in range(rng.choice([2, 3, 4]))]
        weights = [rng.choice([0.3, 0.6, 1.0, 0.45, -0.2]) for _ in tensors]
        normalize = rng.random() < 0.7
        expected = _mergekit_linear(tensors, weights, normalize)
        for use_fused in (True, False):
            ours = _merge("linear", tensors, {"normalize": normalize}, [{"weight": w} for w in weights], use_fused,
                          monkeypatch)
            assert ours.dtype == dtype
            assert torch.allclose(ours.float(), expected.float(), rtol=1e-6, atol=1e-6) if dtype == torch.float32 \
                else torch.allclose(ours.float(), expected.float(), rtol=8e-3, atol=1e-3), (n, weights, use_fused)
        ours = _merge("linear", tensors, {"normalize": normalize}, [{"weight": w} for w in weights], True, monkeypatch)
        assert torch.equal(ours, expected), (n, weights, normalize)


@needs_cc
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_dots_and_slerp_match_float64(dtype, monkeypatch):
    """SLERP's dot products in one pass equal float64 sums; the merge matches the torch operations."""
    gen = torch.Generator().manual_seed(2)
    for n in (1, 9, 4097, 100003):
        x, y = torch.randn(n, generator=gen).to(dtype), torch.randn(n, generator=gen).to(dtype)
        xd, yd = x.double(), y.double()
        monkeypatch.setattr(fused, "_loaded", [])
        got = fused.dots(x, y)
        want = (float(xd @ xd), float(yd @ yd), float(xd @ yd))
        assert all(abs(g - w) <= 1e-12 * (abs(w) + float(xd.norm() * yd.norm())) for g, w in zip(got, want)), n
        for t in (0.0, 0.3, 1.0):
            ours = _merge("slerp", [x, y], {"t": t}, [{}, {}], True, monkeypatch)
            theirs = _merge("slerp", [x, y], {"t": t}, [{}, {}], False, monkeypatch)
            tol = 1e-6 if dtype == torch.float32 else 8e-3
            assert torch.allclose(ours.float(), theirs.float(), rtol=tol, atol=tol), (n, t)
