"""The in-memory engine and the streaming writer give the reference loop's tensors (hence mergekit's),
per trial without disk I/O or new model objects, and `mergesearch merge` writes loadable, atomic folders."""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml
from conftest import run_cli
from mergekit_oracle import max_abs_diff, read_folder, run_mergekit, run_ours

from merge_core.config import parse_config


def ties_cfg(zoo, weight=(0.3, 0.7), density=0.5, method="ties"):
    return {"merge_method": method, "base_model": str(zoo["base"]), "dtype": "float32",
            "models": [{"model": str(zoo["ft_add"]), "parameters": {"weight": list(weight), "density": density}},
                       {"model": str(zoo["ft_reverse"]),
                        "parameters": {"weight": 0.5, "density": [{"filter": "mlp", "value": 0.9},
                                                                   {"value": [0.2, 0.8]}]}}]}


CONFIGS = {
    "ties": lambda z: ties_cfg(z),
    "dare_ties": lambda z: ties_cfg(z, method="dare_ties"),
    "task_arithmetic": lambda z: ties_cfg(z, method="task_arithmetic"),
    "breadcrumbs_ties": lambda z: ties_cfg(z, method="breadcrumbs_ties"),
    "linear": lambda z: {"merge_method": "linear", "dtype": "float32",
                         "models": [{"model": str(z["ft_add"]), "parameters": {"weight": [1.0, 0.2]}},
                                    {"model": str(z["ft_upper"]), "parameters": {"weight": 0.6}}]},
    "slerp": lambda z: {"merge_method": "slerp", "base_model": str(z["base"]), "dtype": "float32",
                        "models": [{"model": str(z["base"])}, {"model": str(z["ft_add"])}],
                        "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 1]}, {"value": 0.3}]}},
    "tied": lambda z: {"merge_method": "ties", "base_model": str(z["tied_base"]), "dtype": "float32",
                       "models": [{"model": str(z["tied_ft"]), "parameters": {"weight": 1.0, "density": 0.6}}]},
}


def live_tensors(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_engine_materialize_equals_reference_loop(name, zoo):
    from merge_core.engine import MergeEngine

    raw = CONFIGS[name](zoo)
    cfg = parse_config(raw)
    engine = MergeEngine(cfg, device="cpu", seed=0)
    model = engine.materialize(cfg)
    ours = live_tensors(model)
    ref = run_ours(raw, seed=0)
    for key, value in ref.items():
        assert torch.equal(ours[key], value), key
    if "lm_head.weight" not in ref:   # tied: the head is the embedding
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_engine_rematerializes_in_place_without_disk_io(zoo, monkeypatch):
    from merge_core.engine import MergeEngine
    from merge_core.sources import ModelSource

    first = parse_config(ties_cfg(zoo, weight=(0.3, 0.7), density=0.5))
    second_raw = ties_cfg(zoo, weight=(1.0, 0.1), density=0.9)
    engine = MergeEngine(first, device="cpu")
    model = engine.materialize(first)
    ptrs = {k: p.data_ptr() for k, p in model.named_parameters()}

    def no_reads(*args, **kwargs):
        raise AssertionError("disk read during a trial")

    monkeypatch.setattr(ModelSource, "read", no_reads)
    again = engine.materialize(parse_config(second_raw))
    assert again is model
    assert {k: p.data_ptr() for k, p in again.named_parameters()} == ptrs
    ref = run_ours(second_raw)
    assert max_abs_diff(live_tensors(again), ref)[0] == 0.0


def test_engine_refuses_a_structurally_different_config(zoo):
    from merge_core import MergeConfigError
    from merge_core.engine import MergeEngine

    engine = MergeEngine(parse_config(ties_cfg(zoo)), device="cpu")
    other = ties_cfg(zoo)
    other["models"] = other["models"][:1]
    with pytest.raises(MergeConfigError, match="different merge"):
        engine.materialize(parse_config(other))


def test_engine_flags_non_finite_candidates(zoo):
    from merge_core.engine import MergeEngine, NonFiniteMerge

    raw = CONFIGS["linear"](zoo)
    raw["models"][0]["parameters"]["weight"] = 0.0
    raw["models"][1]["parameters"]["weight"] = 0.0     # zero weight sum: mergekit gives nan too
    cfg = parse_config(raw)
    engine = MergeEngine(cfg, device="cpu")
    with pytest.raises(NonFiniteMerge):
        engine.materialize(cfg, check_finite=True)


def test_engine_output_runs_forward(zoo):
    from transformers import AutoModelForCausalLM

    from merge_core.engine import MergeEngine

    raw = CONFIGS["ties"](zoo)
    engine = MergeEngine(parse_config(raw), device="cpu")
    model = engine.materialize()
    ids = engine.tokenizer("12+30=", return_tensors="pt", add_special_tokens=False)["input_ids"]
    ours = model(ids).logits
    ref_model = AutoModelForCausalLM.from_pretrained(zoo["base"])
    ref_model.load_state_dict(run_ours(raw), strict=False)
    assert torch.allclose(ours, ref_model(ids).logits, atol=1e-5)


@pytest.mark.parametrize("name", ["ties", "slerp", "linear", "tied"])
def test_cli_merge_matches_mergekit(name, zoo, tmp_path):
    raw = CONFIGS[name](zoo)
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    proc = run_cli("merge", path, out, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    theirs = run_mergekit(raw, tmp_path / "mk")
    ours = read_folder(out)
    assert set(ours) == set(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in theirs)
    diff, where = max_abs_diff(ours, theirs)
    assert diff <= 1e-5, (diff, where)
    for f in ["config.json", "README.md", "mergekit_config.yml", "tokenizer.json"]:
        assert (out / f).is_file(), f
    assert "```yaml" in (out / "README.md").read_text()
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]


def test_merged_folder_loads_and_shards(zoo, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from merge_core.writer import merge_to_folder

    cfg = parse_config(CONFIGS["ties"](zoo))
    out = merge_to_folder(cfg, tmp_path / "sharded", device="cpu", max_shard_bytes=100_000)
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 2
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    model = AutoModelForCausalLM.from_pretrained(out)
    AutoTokenizer.from_pretrained(out)
    ref = run_ours(CONFIGS["ties"](zoo))
    assert max_abs_diff(live_tensors(model), ref)[0] == 0.0


def test_lazy_streaming_gives_the_same_bytes(zoo, tmp_path):
    from merge_core.writer import merge_to_folder

    cfg = parse_config(CONFIGS["dare_ties"](zoo))
    a = merge_to_folder(cfg, tmp_path / "a", device="cpu", lazy=True, seed=3)
    b = merge_to_folder(cfg, tmp_path / "b", device="cpu", lazy=False, seed=3)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


def test_failed_write_leaves_no_partial_folder(zoo, tmp_path, monkeypatch):
    from merge_core import MergeConfigError
    from merge_core import writer

    cfg = parse_config(CONFIGS["ties"](zoo))
    existing = tmp_path / "out"
    existing.mkdir()
    (existing / "keep.txt").write_text("old")

    def disk_full(self, name, tensor):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer.SafetensorsStream, "write", disk_full)
    with pytest.raises(MergeConfigError, match="No space left"):
        writer.merge_to_folder(cfg, existing, device="cpu", force=True)
    assert (existing / "keep.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_killed_writers_partial_folder_is_removed_by_the_next_write(zoo, tmp_path):
    import subprocess
    import sys

    from merge_core.writer import merge_to_folder

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()                                   # a PID that no longer runs
    stale = tmp_path / f".out.partial-{dead.pid}"
    (stale / "x").mkdir(parents=True)
    alive = tmp_path / f".out.partial-{os.getppid()}"   # a live process's folder: not ours to delete
    alive.mkdir()
    unrelated = tmp_path / ".out.notes-1"
    unrelated.mkdir()
    merge_to_folder(parse_config(CONFIGS["linear"](zoo)), tmp_path / "out", device="cpu")
    assert not stale.exists() and alive.is_dir() and unrelated.is_dir()


def test_cli_user_errors_are_one_line(zoo, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("merge_method: tie\nmodels:\n  - model: x\n")
    proc = run_cli("merge", bad, tmp_path / "o")
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "merge_method" in proc.stderr
    missing = tmp_path / "missing.yaml"
    missing.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": str(tmp_path / "nope"), "parameters": {"weight": 1.0}},
        {"model": str(zoo["base"]), "parameters": {"weight": 1.0}}]}))
    proc = run_cli("merge", missing, tmp_path / "o")
    assert proc.returncode == 2 and "not found" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
