"""Outputs a user can trust: exports that run from any folder, nothing created before every check passed, no
model folder replaced without --force (never an input), global flags anywhere, machine-readable summaries,
output that reads well when piped."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import run_cli, run_here, snapshot
from safetensors.torch import load_file


def fresh_study(finished_run: Path, tmp_path: Path) -> Path:
    """The finished run's inputs without its run/ folder: a study that was never searched."""
    root = tmp_path / "fresh"
    shutil.copytree(finished_run, root, ignore=shutil.ignore_patterns("run", "merged"))
    return root


def tree(root: Path) -> set[str]:
    """Every file and folder under root (lock files aside)."""
    return {str(p.relative_to(root)) for p in root.rglob("*") if not p.name.endswith(".lock")}


def edit(path: Path, change) -> None:
    data = yaml.safe_load(path.read_text())
    change(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def one_line_error(proc: subprocess.CompletedProcess, command: str) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"mergesearch {command}: error: ") and "Traceback" not in proc.stderr
    return lines[0]


BREAKS = {
    "bad-task-file": (lambda d: (d / "data" / "add.jsonl").write_text('{"query": "1+1=", "choices": [\n'),
                      ("search", "study.yaml"), "add.jsonl:1"),
    "missing-model": (lambda d: shutil.rmtree(d / "models" / "ft_reverse"), ("search", "study.yaml"), "ft_reverse"),
    "no-cuda": (None, ("search", "study.yaml", "--device", "cuda"), "CUDA"),
    "all-weights-zero": (lambda d: edit(d / "study.yaml", lambda s: [t.update(weight=0)
                                                                    for t in s["evaluation"]["tasks"]]),
                         ("search", "study.yaml"), "weight"),
    "sampler-option-typo": (lambda d: edit(d / "study.yaml", lambda s: s.update(sampler={"name": "tpe", "nope": 1})),
                            ("search", "study.yaml"), "nope"),
    "export-before-search": (None, ("export", "study.yaml"), "mergesearch search"),
    "report-before-search": (None, ("report", "study.yaml"), "mergesearch search"),
    "export-model-before-search": (None, ("export", "study.yaml", "--write-model", "out"), "mergesearch search"),
}


@pytest.mark.parametrize("case", list(BREAKS))
def test_an_error_in_a_fresh_study_creates_nothing(case, finished_run, tmp_path):
    """Errors found late used to leave an empty output_dir or a study.db behind: every check now runs first."""
    root = fresh_study(finished_run, tmp_path)
    setup, args, expect = BREAKS[case]
    if setup is not None:
        setup(root)
    before = tree(root)
    proc = run_here(*args, *(("--no-progress",) if args[0] == "search" else ()), cwd=root)
    assert expect in one_line_error(proc, args[0])
    assert tree(root) == before, sorted(tree(root) - before)


def test_validate_says_what_a_search_would_use_and_creates_nothing(finished_run, tmp_path):
    root = fresh_study(finished_run, tmp_path)
    before = tree(root)
    proc = run_here("validate", "study.yaml", "--json", cwd=root)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["valid"] and summary["merge_method"] == "ties"
    assert [g["name"] for g in summary["genes"]] == ["weight.m0", "weight.m1", "density.m0", "density.m1"]
    assert summary["tasks"]["add"]["search"] + summary["tasks"]["add"]["holdout"] == 16
    assert summary["storage"].endswith("run/study.db") and summary["storage_exists"] is False
    for text in ("is valid", "4 genes", "add", "would be created", str(root / "run")):
        assert text in proc.stderr, proc.stderr
    assert tree(root) == before
    broken = run_here("validate", "study.yaml", "--device", "cuda", cwd=root)
    assert "CUDA" in one_line_error(broken, "validate") and tree(root) == before
    assert "CMA-ES" not in proc.stderr and summary["skip_uninformative"] is False
    data = yaml.safe_load((root / "study.yaml").read_text())       # settings worth a line of their own
    data.update(sampler={"name": "cmaes", "seed": 0}, pruner={"name": "wilcoxon"})
    data["evaluation"]["skip_uninformative"] = True
    (root / "study.yaml").write_text(yaml.safe_dump(data))
    noted = run_here("validate", "study.yaml", "--json", cwd=root)
    assert noted.returncode == 0 and json.loads(noted.stdout)["skip_uninformative"] is True
    assert "CMA-ES learns here from completed trials only" in noted.stderr and "skip_uninformative" in noted.stderr


def test_exports_run_from_any_folder(finished_run, tmp_path):
    """best_config.yaml and an exported model's mergekit_config.yml carry absolute model paths: mergesearch merge
    and mergekit-yaml both run them from another working directory and give the same tensors."""
    night = tmp_path / "night"
    shutil.copytree(finished_run, night)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    best = night / "run" / "best_config.yaml"
    config = yaml.safe_load(best.read_text())
    refs = [config["base_model"], *(m["model"] for m in config["models"])]
    assert all(Path(r).is_absolute() and Path(r).is_dir() and ".." not in r for r in refs), refs
    ours = run_here("merge", best, "ours", "--device", "cpu", cwd=elsewhere)
    assert ours.returncode == 0, ours.stderr
    card = yaml.safe_load((night / "run" / "model" / "mergekit_config.yml").read_text())
    assert all(Path(m["model"]).is_absolute() for m in card["models"])
    mergekit = shutil.which("mergekit-yaml", path=str(Path(sys.executable).parent))
    if mergekit is None:
        pytest.skip("mergekit-yaml is not installed")
    theirs = subprocess.run([mergekit, str(best), "theirs"], cwd=elsewhere, capture_output=True, text=True,
                            timeout=300)
    assert theirs.returncode == 0, theirs.stderr
    a, b = load_file(elsewhere / "ours" / "model.safetensors"), load_file(elsewhere / "theirs" / "model.safetensors")
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5


def test_no_model_folder_is_replaced_without_force_and_never_an_input(finished_run, tmp_path):
    night = tmp_path / "night"
    shutil.copytree(finished_run, night)
    model = night / "run" / "model"
    before = snapshot(model)
    refused = run_here("export", "study.yaml", "--write-model", "run/model", "--device", "cpu", cwd=night)
    assert "--force" in one_line_error(refused, "export") and snapshot(model) == before
    replaced = run_here("export", "study.yaml", "--write-model", "run/model", "--device", "cpu", "--force", cwd=night)
    assert replaced.returncode == 0, replaced.stderr
    assert not list(model.parent.glob(".model.*")), "the swap left a temporary folder"
    inputs = snapshot(night / "models")
    for target in ("models/base", "models/ft_add", "models", "."):
        proc = run_here("export", "study.yaml", "--write-model", target, "--device", "cpu", "--force", cwd=night)
        assert "inputs" in one_line_error(proc, "export"), target
    assert snapshot(night / "models") == inputs


def test_global_flags_before_or_after_the_command(finished_run, tmp_path):
    root = fresh_study(finished_run, tmp_path)
    for args in (("-v", "validate", "study.yaml"), ("validate", "study.yaml", "-v"), ("validate", "-v", "study.yaml")):
        proc = run_here(*args, cwd=root)
        assert proc.returncode == 0, (args, proc.stderr)
    broken = run_cli("validate", "nope.yaml", "-v", cwd=root)
    assert broken.returncode != 0 and "Traceback" in broken.stderr       # -v: the traceback is shown


def test_search_export_and_eval_print_json_summaries(finished_run, tmp_path):
    night = tmp_path / "night"
    shutil.copytree(finished_run, night)
    search = run_here("search", "study.yaml", "--no-progress", "--json", cwd=night)
    assert search.returncode == 0, search.stderr
    summary = json.loads(search.stdout)
    assert summary["study"] == "night" and summary["interrupted"] is False
    assert summary["outputs"]["best_config"] == str(night / "run" / "best_config.yaml")
    assert summary["best"]["holdout_score"] is not None and summary["trials"]["complete"] >= 2
    assert f"outputs in {night / 'run'}" in search.stderr
    import optuna                                   # the held-out winner, as Optuna tools show it

    study = optuna.load_study(study_name="night", storage=f"sqlite:///{night / 'run' / 'study.db'}")
    assert study.user_attrs["holdout_winner"] == summary["best"]["trial"]
    assert study.user_attrs["holdout_winner_summary"].startswith(f"trial {summary['best']['trial']}: held-out")
    from optuna_dashboard._note import get_note_from_system_attrs         # optuna-dashboard's study note

    note = get_note_from_system_attrs(study._storage.get_study_system_attrs(study._study_id), None)
    assert f"Held-out winner: trial {summary['best']['trial']}" in note["body"]
    export = run_here("export", "study.yaml", "--out", "best.yaml", "--json", cwd=night)
    assert export.returncode == 0, export.stderr
    exported = json.loads(export.stdout)
    assert exported["trial"] == summary["best"]["trial"] and exported["config"] == str(night / "best.yaml")
    evaluated = run_here("eval", "models/base", "--tasks", "multiple_choice:data/add.jsonl", "--device", "cpu",
                        "--json", cwd=night)
    assert evaluated.returncode == 0, evaluated.stderr
    result = json.loads(evaluated.stdout)
    assert result["tasks"]["add"]["n"] == 16 and 0 <= result["score"] <= 1


def test_methods_lists_every_method_and_its_parameters():
    proc = run_here("methods", "--json")
    assert proc.returncode == 0, proc.stderr
    methods = {m["method"]: m for m in json.loads(proc.stdout)["methods"]}
    assert {"linear", "slerp", "ties", "dare_ties", "task_arithmetic", "della", "model_stock", "nuslerp"} <= set(methods)
    assert "in [0, 1]" in methods["ties"]["per_model"]["density"]
    assert "required" in methods["slerp"]["parameters"]["t"]
    table = run_here("methods")
    assert table.returncode == 0 and "breadcrumbs_ties" in table.stderr


def test_piped_output_is_not_wrapped_and_paths_are_normalized(finished_run, tmp_path):
    deep = tmp_path / ("a-rather-long-folder-name-" * 3) / "night"
    shutil.copytree(finished_run, deep)
    study = deep / "study.yaml"
    edit(study, lambda s: s.update(output_dir="sub/../run"))
    proc = run_cli("search", study, "--no-progress", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"outputs in {deep / 'run'}:" in proc.stderr, proc.stderr
    assert "/../" not in proc.stderr
    assert "Warning" not in proc.stderr, proc.stderr                   # no third-party warnings without -v


def test_task_files_with_a_utf8_bom_are_read(finished_run, tmp_path):
    root = fresh_study(finished_run, tmp_path)
    data = root / "data" / "add.jsonl"
    data.write_bytes(b"\xef\xbb\xbf" + data.read_bytes())
    proc = run_here("validate", "study.yaml", cwd=root)
    assert proc.returncode == 0, proc.stderr


def test_allow_pickle_is_accepted_where_the_message_suggests_it(finished_run, tmp_path):
    import torch

    root = fresh_study(finished_run, tmp_path)
    folder = root / "models" / "ft_add"
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    refused = run_here("validate", "study.yaml", cwd=root)
    assert "--allow-pickle" in one_line_error(refused, "validate")
    allowed = run_here("validate", "study.yaml", "--allow-pickle", cwd=root)
    assert allowed.returncode == 0, allowed.stderr
