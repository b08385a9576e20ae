"""Numerical faults: NaN/inf in merged weights or in the loss, float16/bfloat16 overflow, and candidates
whose parameter values a method refuses. Each is a FAILED trial with its reason; the search goes on."""

from __future__ import annotations

import shutil
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from optuna.trial import TrialState
from safetensors.torch import load_file, save_file
from conftest import run_here
from studyfiles import addition_items, write_jsonl

from merge_core.config import parse_config
from merge_core.engine import MergeEngine, NonFiniteMerge
from search.loop import open_study, run_search
from search.space import SearchSpace
from search.study import load_study

TENSOR = "model.layers.0.mlp.up_proj.weight"


def loud_model(zoo, root: Path, value: float, name: str = "loud") -> Path:
    """ft_add with TENSOR set to `value` everywhere (finite in float32), as a model folder under root."""
    folder = root / name
    shutil.copytree(zoo["ft_add"], folder)
    tensors = load_file(folder / "model.safetensors")
    tensors[TENSOR] = torch.full_like(tensors[TENSOR], value)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def engine_for(zoo, root: Path, loud: Path, weight: float, **dtypes) -> tuple[MergeEngine, object]:
    config = parse_config({"merge_method": "task_arithmetic", "base_model": str(zoo["base"]), **dtypes,
                           "models": [{"model": str(loud), "parameters": {"weight": weight}}]}, base_dir=root)
    return MergeEngine(config, device="cpu"), config


# ---- the engine: every overflow is caught where it happens ----------------------------------------------
@pytest.mark.parametrize("dtypes, value, weight, why", [
    ({"dtype": "float16"}, 4e4, 2.0, None),                             # float16 arithmetic overflows
    ({"dtype": "bfloat16"}, 2e38, 2.0, None),                           # so does bfloat16, near its max
    ({"dtype": "float32", "out_dtype": "float16"}, 4e4, 2.0, "overflow on the cast"),   # finite, then cast
    # 3.40e38 is below float32's max (3.4028e38) and above bfloat16's largest finite value (3.3895e38)
    ({"dtype": "float32", "out_dtype": "bfloat16"}, 3.40e38, 1.0, "overflow on the cast"),
], ids=["float16", "bfloat16", "cast-to-float16", "cast-to-bfloat16"])
def test_overflow_is_a_non_finite_merge_naming_the_tensor(zoo, tmp_path, dtypes, value, weight, why):
    loud = loud_model(zoo, tmp_path, value)
    engine, config = engine_for(zoo, tmp_path, loud, weight, **dtypes)
    with pytest.raises(NonFiniteMerge, match=TENSOR) as err:
        engine.materialize(config, check_finite=True)
    assert why is None or why in str(err.value)
    # the same engine goes on: a small weight merges to finite values
    ok = parse_config({**yaml.safe_load(yaml.safe_dump({"merge_method": "task_arithmetic",
                                                        "base_model": str(zoo["base"]), **dtypes})),
                       "models": [{"model": str(loud), "parameters": {"weight": 1e-3}}]}, base_dir=tmp_path)
    model = engine.materialize(ok, check_finite=True)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_nan_in_a_source_is_a_non_finite_merge(zoo, tmp_path):
    loud = loud_model(zoo, tmp_path, float("nan"))
    engine, config = engine_for(zoo, tmp_path, loud, 0.5, dtype="float32")
    with pytest.raises(NonFiniteMerge, match=TENSOR):
        engine.materialize(config, check_finite=True)


@pytest.mark.parametrize("value, dtype", [(float("nan"), "float32"), (4e4, "float16")], ids=["nan-source", "float16"])
def test_merge_cli_refuses_to_write_non_finite_weights(zoo, tmp_path, value, dtype):
    from conftest import run_cli

    loud = loud_model(zoo, tmp_path, value)
    config = tmp_path / "merge.yaml"
    config.write_text(yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": str(zoo["base"]),
                                      "dtype": dtype, "models": [{"model": str(loud), "parameters": {"weight": 2.0}}]}))
    proc = run_cli("merge", config, tmp_path / "out")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and TENSOR in lines[0] and "NaN/inf" in lines[0], proc.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


# ---- the search: faulty candidates fail with a reason, the others run ------------------------------------
def write_loud_study(zoo, root: Path, loud: Path, trials: int, merge_extra: dict | None = None,
                     params: dict | None = None, method: str = "task_arithmetic") -> Path:
    write_jsonl(root / "data" / "add.jsonl", addition_items(12))
    study = {
        "name": "loud", "output_dir": "run",
        "merge": {"merge_method": method, "base_model": str(zoo["base"]), "dtype": "float16",
                  "models": [{"model": str(loud)}], **(merge_extra or {})},
        "space": {"granularity": "global", "params": params or {"weight": [0.0, 3.0]}},
        "evaluation": {"tasks": [{"name": "add", "kind": "multiple_choice", "path": "data/add.jsonl"}]},
        "sampler": {"name": "random", "seed": 0}, "seed_trials": [], "budget": {"trials": trials},
        # the loud parent itself overflows in float16: no reference to normalize by (see the test below)
        "objective": {"aggregate": "mean"},
    }
    path = root / "loud.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def run_with(path: Path, queued: list[dict], trials: int):
    cfg = load_study(path)
    space = SearchSpace(cfg)
    study = open_study(cfg, space=space)
    for genome in queued:
        study.enqueue_trial({name: genome[name.split(".")[0]] for name in space.names})
    assert run_search(cfg, trials=trials, timeout=None, device="cpu") == 0
    return cfg, {t.number: t for t in study.get_trials()}


def test_a_parent_that_cannot_be_scored_stops_a_normalized_search_before_it_starts(zoo, tmp_path):
    loud = loud_model(zoo, tmp_path, 3e4)
    path = write_loud_study(zoo, tmp_path, loud, trials=3)
    data = yaml.safe_load(path.read_text())
    data["objective"] = {"aggregate": "normalized"}
    path.write_text(yaml.safe_dump(data))
    proc = run_here("search", path, "--no-progress", "--device", "cpu", cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "no parent could be scored" in lines[-1] and "reference:" in lines[-1], proc.stderr


def test_float16_search_fails_overflowing_candidates_and_goes_on(zoo, tmp_path):
    # TENSOR's delta is 3e4: weight 1e-3 is harmless, weight 1 keeps the weights finite in float16 but the
    # MLP activations overflow (NaN loss), weight 3 overflows the weights themselves (inf).
    loud = loud_model(zoo, tmp_path, 3e4)
    path = write_loud_study(zoo, tmp_path, loud, trials=5)
    cfg, trials = run_with(path, [{"weight": 1e-3}, {"weight": 1.0}, {"weight": 3.0}], trials=5)
    assert len(trials) == 5
    assert trials[0].state == TrialState.COMPLETE
    assert trials[1].state == TrialState.FAIL
    assert "non-finite log-likelihoods" in trials[1].user_attrs["fail_reason"]
    assert trials[2].state == TrialState.FAIL
    assert trials[2].user_attrs["fail_reason"] == f"non-finite merge: non-finite values in merged tensor {TENSOR}"
    best = yaml.safe_load((cfg.output_dir / "best_config.yaml").read_text())
    assert best["models"][0]["parameters"]["weight"] < 1.0
    csv = (cfg.output_dir / "trials.csv").read_text()
    assert "non-finite merge" in csv and "non-finite log-likelihoods" in csv


def test_cast_to_out_dtype_overflow_fails_the_trial_with_that_reason(zoo, tmp_path):
    loud = loud_model(zoo, tmp_path, 3e4)
    path = write_loud_study(zoo, tmp_path, loud, trials=2, merge_extra={"dtype": "float32", "out_dtype": "float16"})
    _, trials = run_with(path, [{"weight": 1e-3}, {"weight": 3.0}], trials=2)
    assert trials[0].state == TrialState.COMPLETE
    assert trials[1].state == TrialState.FAIL
    assert "overflow on the cast from torch.float32 to torch.float16" in trials[1].user_attrs["fail_reason"]


def test_candidate_a_method_refuses_fails_and_the_search_goes_on(zoo, tmp_path):
    """della refuses density + epsilon >= 1: a box search space cannot exclude such corners."""
    path = write_loud_study(zoo, tmp_path, Path(zoo["ft_add"]), trials=3, method="della",
                            merge_extra={"dtype": "float32"},
                            params={"weight": [0.0, 1.0], "density": [0.5, 0.95], "epsilon": [0.05, 0.45]})
    _, trials = run_with(path, [{"weight": 0.5, "density": 0.6, "epsilon": 0.1},
                                {"weight": 0.5, "density": 0.9, "epsilon": 0.4},
                                {"weight": 0.5, "density": 0.7, "epsilon": 0.2}], trials=3)
    assert [t.state for t in trials.values()] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    assert "invalid merge parameters" in trials[1].user_attrs["fail_reason"]
    assert "density + epsilon < 1" in trials[1].user_attrs["fail_reason"]


def test_stored_trials_survive_a_faulty_candidate(zoo, tmp_path):
    """A failed candidate changes nothing that was stored before it: earlier trials and best_config.yaml."""
    loud = loud_model(zoo, tmp_path, 3e4)
    path = write_loud_study(zoo, tmp_path, loud, trials=1)
    cfg, _ = run_with(path, [{"weight": 1e-3}], trials=1)
    before = (cfg.output_dir / "best_config.yaml").read_text()
    study = optuna.load_study(study_name=cfg.name, storage=cfg.storage_url())
    first = study.trials[0]
    _, trials = run_with(path, [{"weight": 3.0}], trials=2)
    assert trials[0].value == first.value and trials[0].params == first.params
    assert trials[1].state == TrialState.FAIL
    body = lambda text: "\n".join(line for line in text.splitlines() if not line.startswith("#"))  # noqa: E731
    assert body((cfg.output_dir / "best_config.yaml").read_text()) == body(before)
