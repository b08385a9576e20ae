"""Our merge math against mergekit 0.1.5, tensor by tensor, on the tiny zoo.

Deterministic methods: same tensor names and shapes, max |ours - mergekit| <= 1e-5 in float32. Random methods
(dare_*, della*): reproducible from a seed here, and the same in distribution as mergekit (kept fraction,
L1-rescaled norms). Plus the engine's use: cached statistics never leak one trial's parameters into the next.
"""

from __future__ import annotations

import math

import pytest
import torch

from merge_core.config import parse_config
from merge_core.methods import REGISTRY, TensorInputs, get_method
from merge_core.methods.sparsify import keep_ranks, sorted_values
from merge_core.plan import merge_one, plan_merge
from tests.mergekit_oracle import _cached_folder, max_abs_diff, run_mergekit, run_ours

TOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors on a shared 2-core machine: intra-op threads only contend (60x slower merges)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def m(zoo, name, **params):
    entry = {"model": str(zoo[name])}
    if params:
        entry["parameters"] = params
    return entry


def src(zoo, name, start, end, **params):
    return {**m(zoo, name, **params), "layer_range": [start, end]}


ATTN_MLP_REST = [{"filter": "self_attn", "value": [0.0, 0.5, 0.3, 0.7, 1.0]},
                 {"filter": "mlp", "value": [1.0, 0.6, 0.2]}, {"value": 0.5}]

# case id -> (methods covered, config builder)
CASES = {
    "linear-scalar-gradient": lambda z: {
        "merge_method": "linear", "models": [m(z, "ft_add", weight=1.0), m(z, "ft_reverse", weight=[0.2, 0.8, 0.5])]},
    "linear-base-topweight": lambda z: {
        "merge_method": "linear", "base_model": str(z["base"]), "parameters": {"weight": 0.3},
        "models": [m(z, "ft_add", weight=1.0), m(z, "ft_reverse", weight=0.5)]},
    "linear-filters-unnormalized": lambda z: {
        "merge_method": "linear", "parameters": {"normalize": False},
        "models": [m(z, "ft_add", weight=[{"filter": "self_attn", "value": [0, 1]}, {"filter": "mlp", "value": 0.3},
                                          {"value": 0.7}]), m(z, "ft_reverse", weight=1.0)]},
    "linear-bf16-to-f32": lambda z: {
        "merge_method": "linear", "dtype": "bfloat16", "out_dtype": "float32",
        "models": [m(z, "ft_add", weight=1.0), m(z, "ft_reverse", weight=[0.3, 0.6])]},
    "linear-tied": lambda z: {
        "merge_method": "linear", "models": [m(z, "tied_base", weight=1.0), m(z, "tied_ft", weight=0.3)]},
    "slerp-filters": lambda z: {
        "merge_method": "slerp", "base_model": str(z["base"]), "models": [m(z, "base"), m(z, "ft_add")],
        "parameters": {"t": ATTN_MLP_REST}},
    "slerp-spherical": lambda z: {  # unrelated models: the angle branch, not the linear fallback
        "merge_method": "slerp", "base_model": str(z["base"]), "models": [m(z, "tied_base")],
        "parameters": {"t": [0.1, 0.9]}},
    "nuslerp-base": lambda z: {
        "merge_method": "nuslerp", "base_model": str(z["base"]),
        "models": [m(z, "ft_add", weight=1.0), m(z, "ft_reverse", weight=[0.2, 2.0])]},
    "nuslerp-rows": lambda z: {
        "merge_method": "nuslerp", "parameters": {"nuslerp_flatten": False},
        "models": [m(z, "tied_base", weight=1.0), m(z, "base", weight=0.3)]},
    "nuslerp-columns": lambda z: {
        "merge_method": "nuslerp", "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True},
        "models": [m(z, "ft_add", weight=1.0), m(z, "ft_reverse", weight=0.4)]},
    "multislerp-base": lambda z: {
        "merge_method": "multislerp", "base_model": str(z["base"]),
        "models": [m(z, "ft_add", weight=1.0), m(z, "ft_reverse", weight=0.5), m(z, "ft_upper", weight=[0.1, 1])]},
    "multislerp-nobase": lambda z: {
        "merge_method": "multislerp", "parameters": {"normalize_weights": False},
        "models": [m(z, "tied_base", weight=1.0), m(z, "base", weight=0.3), m(z, "tied_ft", weight=0.5)]},
    "karcher": lambda z: {
        "merge_method": "karcher", "models": [m(z, "tied_base"), m(z, "base"), m(z, "ft_add")],
        "parameters": {"max_iter": 6}},
    "task_arithmetic": lambda z: {
        "merge_method": "task_arithmetic", "base_model": str(z["base"]), "parameters": {"lambda": 0.8},
        "models": [m(z, "ft_add", weight=1.0), m(z, "ft_reverse", weight=[0.2, 0.8]), m(z, "ft_upper", weight=-0.3)]},
    "ties": lambda z: {
        "merge_method": "ties", "base_model": str(z["base"]),
        "models": [m(z, "ft_add", weight=1.0, density=0.5), m(z, "ft_reverse", weight=[0.2, 0.8], density=[0.2, 0.9]),
                   m(z, "ft_upper", weight=0.5, density=ATTN_MLP_REST)]},
    "ties-rescale-lambda": lambda z: {
        "merge_method": "ties", "base_model": str(z["base"]),
        "parameters": {"rescale": True, "normalize": False, "lambda": 1.3, "int8_mask": True},
        "models": [m(z, "ft_add", weight=1.0, density=0.5), m(z, "ft_reverse", weight=0.6, density=0.3)]},
    "ties-tied-embeddings": lambda z: {  # tied_base has no lm_head: read from its embeddings, as mergekit
        "merge_method": "ties", "base_model": str(z["tied_base"]),
        "models": [m(z, "tied_ft", weight=1.0, density=0.4), m(z, "base", weight=0.5, density=0.5)]},
    "ties-slices": lambda z: {
        "merge_method": "ties", "base_model": str(z["base"]),
        "slices": [{"sources": [src(z, "base", 0, 2), src(z, "ft_add", 0, 2, weight=1.0, density=0.5)]},
                   {"sources": [src(z, "base", 2, 4), src(z, "ft_add", 2, 4, weight=[0.1, 0.9])],
                    "parameters": {"density": 0.2}}]},
    "breadcrumbs": lambda z: {
        "merge_method": "breadcrumbs", "base_model": str(z["base"]),
        "models": [m(z, "ft_add", weight=1.0, density=0.5, gamma=0.05), m(z, "ft_reverse", weight=0.6, density=0.8,
                                                                           gamma=0.3)]},
    "breadcrumbs_ties": lambda z: {
        "merge_method": "breadcrumbs_ties", "base_model": str(z["base"]), "parameters": {"normalize": True},
        "models": [m(z, "ft_add", weight=1.0, density=0.5), m(z, "ft_reverse", weight=0.6, density=0.9, gamma=0.2)]},
    "sce-topk": lambda z: {
        "merge_method": "sce", "base_model": str(z["base"]), "parameters": {"select_topk": [0.1, 0.6]},
        "models": [m(z, "ft_add"), m(z, "ft_reverse"), m(z, "ft_upper")]},
    "sce-all": lambda z: {
        "merge_method": "sce", "base_model": str(z["base"]), "models": [m(z, "ft_add"), m(z, "ft_reverse")]},
    "model_stock": lambda z: {
        "merge_method": "model_stock", "base_model": str(z["base"]),
        "models": [m(z, "ft_add"), m(z, "ft_reverse"), m(z, "ft_upper")]},
    "model_stock-filter_wise": lambda z: {
        "merge_method": "model_stock", "base_model": str(z["base"]), "parameters": {"filter_wise": True},
        "models": [m(z, "ft_add"), m(z, "ft_reverse")]},
    "nearswap": lambda z: {
        "merge_method": "nearswap", "base_model": str(z["base"]), "models": [m(z, "ft_add")],
        "parameters": {"t": [0.0001, 0.001]}},
    "arcee_fusion": lambda z: {
        "merge_method": "arcee_fusion", "base_model": str(z["base"]), "models": [m(z, "ft_add")]},
    "ram": lambda z: {
        "merge_method": "ram", "base_model": str(z["base"]), "parameters": {"epsilon": 1e-4},
        "models": [m(z, "ft_add"), m(z, "ft_reverse")]},
    "ramplus_tl": lambda z: {
        "merge_method": "ramplus_tl", "base_model": str(z["base"]), "parameters": {"epsilon": 1e-4, "r": 0.5},
        "models": [m(z, "ft_add"), m(z, "ft_reverse"), m(z, "ft_upper")]},
    "passthrough-slices": lambda z: {  # 3 + 1 + 2 layers from two models; a one-layer slice has t = 1
        "merge_method": "passthrough",
        "slices": [{"sources": [src(z, "base", 0, 3)]},
                   {"sources": [src(z, "llama_6l", 5, 6, scale=[0.5, 2.0])]},
                   {"sources": [src(z, "llama_6l", 2, 4, scale=[{"filter": "o_proj", "value": [0.5, 1.5]},
                                                                {"value": 1.0}])]}]},
    "passthrough-qwen2": lambda z: {  # q/k/v biases
        "merge_method": "passthrough", "models": [m(z, "qwen2", scale=[{"filter": "bias", "value": 2.0},
                                                                       {"value": 1.0}])]},
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_mergekit(case, zoo, tmp_path):
    config = CASES[case](zoo)
    theirs = run_mergekit(config, tmp_path / "mergekit")
    ours = run_ours(config)
    assert sorted(ours) == sorted(theirs)
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    assert all(ours[k].dtype == theirs[k].dtype for k in theirs)
    diff, where = max_abs_diff(ours, theirs)
    assert diff <= TOL, f"{case}: max |ours - mergekit| = {diff:.3g} at {where}"


def test_every_deterministic_method_is_compared(zoo):
    covered = {CASES[c](zoo)["merge_method"] for c in CASES}
    deterministic = {name for name, method in REGISTRY.items() if not method.random}
    assert deterministic <= covered, sorted(deterministic - covered)


# ---- random methods ----------------------------------------------------------------------------------------

RANDOM = ["dare_ties", "dare_linear", "della", "della_linear"]


def _random_config(zoo, method: str, density: float = 0.4) -> dict:
    return {"merge_method": method, "base_model": str(zoo["base"]),
            "models": [m(zoo, "ft_add", weight=1.0, density=density), m(zoo, "ft_reverse", weight=0.7,
                                                                         density=density)]}


@pytest.mark.parametrize("method", RANDOM)
def test_random_methods_reproducible_from_seed(method, zoo):
    assert get_method(method).random
    config = _random_config(zoo, method)
    first, again, other = run_ours(config, seed=3), run_ours(config, seed=3), run_ours(config, seed=4)
    assert all(torch.equal(first[k], again[k]) for k in first)
    changed = [k for k in first if not torch.equal(first[k], other[k])]
    assert len(changed) > 0.9 * len(first)


def test_random_seed_is_per_tensor_not_per_order(zoo):
    """One tensor merged alone equals the same tensor merged within the whole loop (same seed)."""
    config = _random_config(zoo, "dare_ties")
    cfg = parse_config(config)
    whole = run_ours(config, seed=11)
    refs = cfg.referenced_models()
    names = {r: list(_cached_folder(str(cfg.resolve_model(r)))) for r in refs}
    tasks = plan_merge(cfg, names, {r: 4 for r in refs})
    task = tasks[len(tasks) // 2]
    tensors = [_cached_folder(str(cfg.resolve_model(r)))[n] for r, n in task.sources]
    inputs = TensorInputs(task.out_name, [r for r, _ in task.sources], tensors, task.base_index)
    alone = merge_one(task, inputs, cfg, get_method("dare_ties"), seed=11)
    assert torch.equal(alone, whole[task.out_name])


def _single_model_stats(merged, base, ft, density_epsilon=None):
    """Kept fraction, per-tensor L1 ratio |merged - base|_1 / |delta|_1, and (della) kept fractions of the larger
    and smaller half of |delta| per row, over all trainable 2-D tensors."""
    kept = total = 0
    ratios, big, small = [], [0, 0], [0, 0]
    for name, ref in base.items():
        delta = ft[name] - ref
        if delta.dim() != 2 or not delta.any():
            continue
        out = merged[name] - ref
        nonzero = delta != 0
        keep = (out != 0) & nonzero
        kept += int(keep.sum())
        total += int(nonzero.sum())
        ratios.append(float(out.abs().sum() / delta.abs().sum()))
        median = delta.abs().median(dim=1, keepdim=True).values
        upper = delta.abs() > median
        big[0] += int((keep & upper).sum())
        big[1] += int((upper & nonzero).sum())
        small[0] += int((keep & ~upper & nonzero).sum())
        small[1] += int((~upper & nonzero).sum())
    return kept / total, total, ratios, big[0] / big[1], small[0] / small[1]


@pytest.mark.parametrize("method", ["dare_linear", "della_linear"])
def test_random_trims_match_mergekit_in_distribution(method, zoo, tmp_path):
    """One task vector, weight 1: the output delta is the trimmed, L1-rescaled task vector.

    Kept fraction: Binomial(n, density) over n ~ 1.2e5 entries, sd = sqrt(d(1-d)/n) ~ 1.4e-3; both sides must lie
    within 5 sd of the density and within 5 sqrt(2) sd of each other. The L1 rescale is exact by construction:
    each tensor's |out - base|_1 equals |delta|_1 up to float32 rounding of base + x - base (< 1e-3 relative).
    DELLA keeps larger entries more often: (density +- epsilon/2) on the upper/lower half of each row.
    """
    density, epsilon = 0.4, 0.15
    config = {"merge_method": method, "base_model": str(zoo["base"]),
              "models": [m(zoo, "ft_add", weight=1.0, density=density)]}
    base, ft = _cached_folder(str(zoo["base"])), _cached_folder(str(zoo["ft_add"]))
    stats = {"ours": _single_model_stats(run_ours(config, seed=5), base, ft),
             "mergekit": _single_model_stats(run_mergekit(config, tmp_path / "mk", seed=5), base, ft)}
    fractions = {}
    for side, (fraction, n, ratios, upper, lower) in stats.items():
        sd = math.sqrt(density * (1 - density) / n)
        assert abs(fraction - density) < 5 * sd, (side, fraction)
        assert all(abs(r - 1) < 1e-3 for r in ratios), (side, min(ratios), max(ratios))
        if method == "della_linear":
            half_sd = math.sqrt(0.25 / (n / 2))
            assert abs(upper - (density + epsilon / 2)) < 6 * half_sd, (side, upper)
            assert abs(lower - (density - epsilon / 2)) < 6 * half_sd, (side, lower)
        fractions[side] = fraction
    assert abs(fractions["ours"] - fractions["mergekit"]) < 5 * math.sqrt(2) * sd


@pytest.mark.parametrize("method", ["dare_ties", "della"])
def test_random_consensus_methods_match_mergekit_in_distribution(method, zoo, tmp_path):
    """Two task vectors with sign election: the share of changed entries and the total L1 of the merged delta
    agree with mergekit's. Each is a mean over ~1.2e5 nearly independent entries (relative sd well below 1%);
    tolerances: 0.01 absolute on the share, 3% relative on the L1 total."""
    config = _random_config(zoo, method, density=0.5)
    base = _cached_folder(str(zoo["base"]))
    results = {"ours": run_ours(config, seed=7), "mergekit": run_mergekit(config, tmp_path / "mk", seed=7)}
    summary = {}
    for side, merged in results.items():
        changed = total = 0
        l1 = 0.0
        for name, ref in base.items():
            if ref.dim() != 2:
                continue
            out = merged[name] - ref
            changed += int((out != 0).sum())
            total += out.numel()
            l1 += float(out.abs().sum())
        summary[side] = (changed / total, l1)
    (share_ours, l1_ours), (share_mk, l1_mk) = summary["ours"], summary["mergekit"]
    assert abs(share_ours - share_mk) < 0.01, summary
    assert abs(l1_ours - l1_mk) < 0.03 * l1_mk, summary


# ---- the engine's use: one TensorInputs across trials ------------------------------------------------------

TRIALS = {  # method -> (config-level parameters of trial A, of trial B); models get weight/density from below
    "ties": ({"density": 0.3}, {"density": 0.7}),
    "breadcrumbs_ties": ({"density": 0.3, "gamma": 0.1}, {"density": 0.8, "gamma": 0.01}),
    "della": ({"density": 0.3, "epsilon": 0.1}, {"density": 0.6, "epsilon": 0.2}),
    "dare_linear": ({"density": 0.3}, {"density": 0.6}),
    "sce": ({"select_topk": 0.2}, {"select_topk": 0.7}),
    "slerp": ({"t": 0.2}, {"t": 0.9}),
    "nuslerp": ({"nuslerp_flatten": False}, {"nuslerp_flatten": True}),
    "multislerp": ({"weight": 0.2}, {"weight": 2.0}),
    "karcher": ({"max_iter": 2}, {"max_iter": 8}),
    "model_stock": ({"filter_wise": True}, {"filter_wise": False}),
    "nearswap": ({"t": 0.0001}, {"t": 0.01}),
    "linear": ({"weight": 0.2}, {"weight": 3.0}),
}


def _trial_config(zoo, method: str, params: dict) -> dict:
    spec = get_method(method)
    others = ["ft_add", "ft_reverse"] if method not in ("slerp", "nearswap") else ["ft_add"]
    models = [m(zoo, n, **({"weight": 1.0} if "weight" in spec.model_params and n == "ft_add" else {}))
              for n in others]
    config = {"merge_method": method, "models": models, "parameters": dict(params)}
    if spec.uses_base:
        config["base_model"] = str(zoo["base"])
    if "weight" in spec.model_params:
        config["parameters"].setdefault("weight", 0.5)
    return config


@pytest.mark.parametrize("method", list(TRIALS))
def test_cached_statistics_do_not_leak_between_trials(method, zoo):
    """Trial A then trial B on one resident TensorInputs (deltas only, for delta methods) equals trial B on fresh
    inputs: nothing a method caches depends on trial parameters. The inputs themselves stay untouched."""
    spec = get_method(method)
    cfg_a, cfg_b = (parse_config(_trial_config(zoo, method, p)) for p in TRIALS[method])
    refs = cfg_a.referenced_models()
    folders = {r: _cached_folder(str(cfg_a.resolve_model(r))) for r in refs}
    tasks = plan_merge(cfg_a, {r: list(f) for r, f in folders.items()}, {r: 4 for r in refs})
    for task in tasks[::5]:
        tensors = [folders[r][n] for r, n in task.sources]
        originals = [t.clone() for t in tensors]
        resident = TensorInputs(task.out_name, [r for r, _ in task.sources], tensors, task.base_index)
        if spec.delta_based:
            resident.drop_raw()
        merge_one(task, resident, cfg_a, spec, seed=1)
        again = merge_one(task, resident, cfg_b, spec, seed=1)
        fresh = merge_one(task, TensorInputs(task.out_name, [r for r, _ in task.sources], tensors, task.base_index),
                          cfg_b, spec, seed=1)
        assert torch.allclose(again, fresh, rtol=0, atol=1e-6), task.out_name
        assert all(torch.equal(t, o) for t, o in zip(tensors, originals)), task.out_name
        if task.base_index is not None:
            base = originals[task.base_index]
            expected = [o - base for i, o in enumerate(originals) if i != task.base_index]
            assert all(torch.equal(d, e) for d, e in zip(resident.deltas, expected)), task.out_name


# ---- the top-k mask ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("start,stop", [(0, 3), (0, 4), (2, 6), (1, 9), (0, 10), (5, 5), (3, 12), (6, 8)])
def test_keep_ranks_keeps_exactly_the_ranks_even_through_ties(start, stop):
    values = torch.tensor([0.5, 0.2, 0.2, 0.9, 0.2, 0.1, 0.7, 0.2, 0.3, 0.5])   # runs of 0.5 and of 0.2
    mask = keep_ranks(values, sorted_values(values), start, stop)
    kept = values if mask is None else values[mask]
    expected = sorted(values.tolist(), reverse=True)[start:stop]
    assert sorted(kept.tolist()) == sorted(expected)


def test_keep_ranks_leaves_zero_runs_whole_which_changes_nothing():
    values = torch.tensor([0.3, 0.0, 0.0, 0.0, 0.1])
    mask = keep_ranks(values, sorted_values(values), 0, 3)   # k = 3 ends inside the zeros
    assert bool(mask[0]) and bool(mask[4])
    assert float((values * mask).abs().sum()) == pytest.approx(0.4)


def test_keep_ranks_on_heavily_tied_values_keeps_exactly_k():
    """bf16-like data: few distinct magnitudes. Every k keeps exactly the top-k multiset (zeros aside)."""
    gen = torch.Generator().manual_seed(0)
    values = torch.randint(0, 40, (3000,), generator=gen).float() / 8
    ordered = sorted_values(values)
    top = sorted(values.tolist(), reverse=True)
    for k in [1, 7, 150, 1499, 2000, 2925]:
        mask = keep_ranks(values, ordered, 0, k)
        if top[k - 1] != 0:
            assert int(mask.sum()) == k
            assert sorted(values[mask].tolist(), reverse=True) == top[:k]
    mask = keep_ranks(values, ordered, 100, 1100)   # breadcrumbs: both ends inside runs
    assert int(mask.sum()) == 1000 and sorted(values[mask].tolist(), reverse=True) == top[100:1100]
