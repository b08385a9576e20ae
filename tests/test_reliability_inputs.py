"""Bad input, as users make it: every case runs the real CLI on real files and must exit 2 with exactly one
line that names the file, field or line at fault, and leave every existing output byte for byte as it was.

Each case starts from a copy of one finished run (study YAML with relative paths, model folders, task
files, run/ with study.db, best_config.yaml, trials.csv, report/ and an exported model/, plus a merged/
folder from `mergesearch merge`), breaks one thing, and runs one command.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml
from conftest import REPO, run_cli, run_here, snapshot
from safetensors.torch import load_file, save_file
from studyfiles import addition_items, write_jsonl

MODELS = ("base", "ft_add", "ft_reverse")


# ---- ways to break things --------------------------------------------------------------------------------
def edit_study(change: Callable[[dict], object]) -> Callable[[Path, dict], None]:
    def setup(d: Path, zoo: dict) -> None:
        data = yaml.safe_load((d / "study.yaml").read_text())
        change(data)
        (d / "study.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return setup


def edit_merge_yaml(change: Callable[[dict], object]) -> Callable[[Path, dict], None]:
    def setup(d: Path, zoo: dict) -> None:
        data = yaml.safe_load((d / "merge.yaml").read_text())
        change(data)
        (d / "merge.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return setup


def write_text(rel: str, text: str) -> Callable[[Path, dict], None]:
    return lambda d, zoo: (d / rel).write_text(text)


def edit_lines(rel: str, line: int, text: str) -> Callable[[Path, dict], None]:
    """Replace line `line` (1-based) of a text file."""
    def setup(d: Path, zoo: dict) -> None:
        lines = (d / rel).read_text().splitlines()
        lines[line - 1] = text
        (d / rel).write_text("\n".join(lines) + "\n")
    return setup


def edit_row(rel: str, line: int, change: Callable[[dict], object]) -> Callable[[Path, dict], None]:
    def setup(d: Path, zoo: dict) -> None:
        lines = (d / rel).read_text().splitlines()
        row = json.loads(lines[line - 1])
        change(row)
        lines[line - 1] = json.dumps(row)
        (d / rel).write_text("\n".join(lines) + "\n")
    return setup


def replace_model(name: str, zoo_name: str) -> Callable[[Path, dict], None]:
    def setup(d: Path, zoo: dict) -> None:
        shutil.rmtree(d / "models" / name)
        shutil.copytree(zoo[zoo_name], d / "models" / name)
    return setup


def edit_weights(name: str, change: Callable[[dict], object]) -> Callable[[Path, dict], None]:
    def setup(d: Path, zoo: dict) -> None:
        file = d / "models" / name / "model.safetensors"
        tensors = load_file(file)
        change(tensors)
        save_file(tensors, file, metadata={"format": "pt"})
    return setup


def truncate_weights(name: str) -> Callable[[Path, dict], None]:
    def setup(d: Path, zoo: dict) -> None:
        file = d / "models" / name / "model.safetensors"
        data = file.read_bytes()
        file.write_bytes(data[: len(data) // 2])
    return setup


def garble_header(name: str) -> Callable[[Path, dict], None]:
    def setup(d: Path, zoo: dict) -> None:
        file = d / "models" / name / "model.safetensors"
        data = bytearray(file.read_bytes())
        data[8:40] = b"\x00not json at all, just garbage!!"
        file.write_bytes(bytes(data))
    return setup


def pickle_weights(name: str) -> Callable[[Path, dict], None]:
    def setup(d: Path, zoo: dict) -> None:
        folder = d / "models" / name
        torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
        (folder / "model.safetensors").unlink()
    return setup


class _RunsCode:
    """Unpickling this runs `touch PWNED` (what a malicious checkpoint does)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def evil_pickle(name: str) -> Callable[[Path, dict], None]:
    def setup(d: Path, zoo: dict) -> None:
        folder = d / "models" / name
        tensors: dict = load_file(folder / "model.safetensors")
        tensors["model.embed_tokens.weight"] = _RunsCode(d / "PWNED")
        torch.save(tensors, folder / "pytorch_model.bin")
        (folder / "model.safetensors").unlink()
    return setup


def edit_model_config(name: str, **changes) -> Callable[[Path, dict], None]:
    def setup(d: Path, zoo: dict) -> None:
        file = d / "models" / name / "config.json"
        config = json.loads(file.read_text())
        config.update(changes)
        file.write_text(json.dumps(config))
    return setup


def fill_disk(existing: str) -> Callable[[Path, dict], None]:
    """Copy an existing output (file or folder) onto the tmpfs at full/, then fill the tmpfs up."""
    def setup(d: Path, zoo: dict) -> None:
        source = d / ("run" if existing == "best_config.yaml" else "") / existing
        if source.is_dir():
            shutil.copytree(source, d / "full" / existing)
        else:
            shutil.copyfile(source, d / "full" / existing)
        with open(d / "full" / "filler", "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError:
                pass
    return setup


def both(*setups: Callable[[Path, dict], None]) -> Callable[[Path, dict], None]:
    def setup(d: Path, zoo: dict) -> None:
        for s in setups:
            s(d, zoo)
    return setup


def _params(**params):
    def change(data):
        data["space"]["params"] = params
    return change


def _set(path: str, value):
    """Set a dotted path (list indices as numbers) in a loaded YAML mapping."""
    def change(data):
        keys = [int(k) if k.isdigit() else k for k in path.split(".")]
        node = data
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value
    return change


def _drop(path: str):
    def change(data):
        keys = path.split(".")
        node = data
        for k in keys[:-1]:
            node = node[k]
        del node[keys[-1]]
    return change


# ---- the corpus ------------------------------------------------------------------------------------------
SEARCH = ("search", "study.yaml", "--no-progress")


@dataclass
class Case:
    id: str
    setup: Callable[[Path, dict], None] | None
    args: tuple[str, ...]
    expect: tuple[str, ...]                      # all of these appear in the one line
    limits: dict = field(default_factory=dict)   # resource limits for the command (RLIMIT_FSIZE)
    absent: tuple[str, ...] = ()                 # none of these appear (secrets)
    tmpfs: str | None = None                     # mount a small tmpfs here before the set-up


CASES = [
    # the study file
    Case("yaml-syntax", write_text("study.yaml", "name: night\nmerge: [unclosed\nspace: {}\n"), SEARCH,
         ("study.yaml:", "invalid YAML")),
    Case("yaml-not-a-mapping", write_text("study.yaml", "- just\n- a list\n"), SEARCH,
         ("study.yaml", "mapping")),
    Case("study-file-missing", None, ("search", "nope.yaml", "--no-progress"), ("nope.yaml", "not found")),
    Case("unknown-top-level-key", edit_study(_set("sampeler", "tpe")), SEARCH,
         ("study.yaml: sampeler", "unknown key")),
    Case("unknown-merge-method", edit_study(_set("merge.merge_method", "tiez")), SEARCH,
         ("merge_method", "tiez")),
    Case("unknown-search-parameter", edit_study(_params(wieght=[0.0, 1.0])), SEARCH,
         ("space.params.wieght", "no parameter")),
    Case("unknown-merge-parameter", edit_study(_set("merge.parameters", {"lambada": 1.0})), SEARCH,
         ("merge.parameters.lambada", "unknown parameter")),
    Case("density-outside-0-1", edit_study(_set("merge.models.0.parameters", {"density": 1.5})), SEARCH,
         ("models[0].parameters.density", "must be in [0.0, 1.0]", "1.5")),
    Case("density-bounds-outside-0-1", edit_study(_params(weight=[0.0, 1.0], density=[0.1, 1.5])), SEARCH,
         ("space.params.density", "allowed range")),
    Case("bounds-reversed", edit_study(_params(weight=[1.0, 0.0])), SEARCH, ("space.params.weight", "low")),
    Case("empty-gradient-list", edit_study(_set("merge.models.0.parameters", {"weight": []})), SEARCH,
         ("models[0].parameters.weight", "empty gradient list")),
    Case("unknown-sampler", edit_study(_set("sampler", {"name": "cma"})), SEARCH,
         ("study.yaml: sampler.name", "'cma'")),
    Case("bad-trial-budget", edit_study(_set("budget.trials", -3)), SEARCH, ("budget.trials", "positive")),
    Case("bad-timeout", None, (*SEARCH, "--timeout", "soon"), ("--timeout", "'soon'")),
    Case("seed-not-an-integer", edit_study(_set("seed", "abc")), SEARCH, ("study.yaml: seed", "integer", "'abc'")),
    Case("sampler-seed-not-an-integer", edit_study(_set("sampler", {"name": "random", "seed": "abc"})), SEARCH,
         ("sampler.seed", "integer")),
    Case("sampler-option-typo", edit_study(_set("sampler", {"name": "tpe", "n_startup_trialz": 3})), SEARCH,
         ("sampler.n_startup_trialz", "no option", "n_startup_trials")),
    Case("sampler-flag-a-string", edit_study(_set("sampler", {"name": "cmaes", "consider_pruned_trials": "false"})),
         SEARCH, ("sampler.consider_pruned_trials", "true or false", "'false'")),     # "false" would be truthy
    Case("pruner-bad-value", edit_study(_set("pruner", {"name": "median", "n_startup_trials": -1})), SEARCH,
         ("pruner", "median")),
    Case("top-k-not-an-integer", edit_study(_set("final", {"top_k": "abc"})), SEARCH, ("final.top_k", "integer")),
    Case("top-k-zero", edit_study(_set("final", {"top_k": 0})), SEARCH, ("final.top_k", "at least 1", "holdout: 0")),
    Case("per-model-not-a-boolean", edit_study(_set("space.per_model", "no")), SEARCH,
         ("space.per_model", "true or false", "'no'")),
    Case("more-anchors-than-layers", edit_study(_set("space.granularity", "anchors:100")), SEARCH,
         ("space.granularity", "anchors:100", "4")),
    Case("trials-negative", None, (*SEARCH, "--trials", "-5"), ("--trials", "positive integer", "-5")),
    Case("trials-zero", None, (*SEARCH, "--trials", "0"), ("--trials", "positive integer")),
    Case("workers-zero", None, (*SEARCH, "--workers", "0"), ("--workers", "positive integer")),
    Case("device-not-available", None, (*SEARCH, "--device", "cuda"), ("--device", "CUDA")),
    Case("device-typo-in-yaml", edit_study(_set("device", "gpu")), SEARCH, ("study.yaml: device", "'gpu'")),
    # models
    Case("missing-model-folder", edit_study(_set("merge.models.0.model", "models/ft_mul")), SEARCH,
         ("models/ft_mul", "not found")),
    Case("pickle-weights-refused", pickle_weights("ft_add"), SEARCH,
         ("models/ft_add", "pickle", "--allow-pickle")),
    Case("pickle-with-code-refused-even-when-allowed", evil_pickle("ft_add"),
         ("merge", "merge.yaml", "merged", "--device", "cpu", "--force", "--allow-pickle"),
         ("models/ft_add", "pytorch_model.bin", "could run code", "posix.system")),
    Case("truncated-safetensors", truncate_weights("ft_add"), SEARCH,
         ("models/ft_add", "model.safetensors", "truncated")),
    Case("corrupt-safetensors-header", garble_header("ft_reverse"), SEARCH,
         ("models/ft_reverse", "model.safetensors", "corrupt")),
    Case("architecture-mismatch", replace_model("ft_add", "qwen2"), SEARCH, ("models/", "architecture")),
    Case("layer-count-mismatch", replace_model("ft_reverse", "llama_6l"), SEARCH, ("models/ft_reverse", "layers")),
    Case("tensor-shape-mismatch",
         edit_weights("ft_add", lambda t: t.update({"model.layers.1.mlp.up_proj.weight":
                                                     t["model.layers.1.mlp.up_proj.weight"][:-8].clone()})),
         SEARCH, ("models/ft_add", "model.layers.1.mlp.up_proj.weight", "shape")),
    Case("vocab-size-mismatch", both(edit_model_config("ft_reverse", vocab_size=128),
                                     edit_weights("ft_reverse", lambda t: t.update(
                                         {"model.embed_tokens.weight": torch.zeros(128, 64),
                                          "lm_head.weight": torch.zeros(128, 64)}))),
         SEARCH, ("models/ft_reverse", "vocab size")),
    Case("tensor-missing-in-one-source", edit_weights("ft_add", lambda t: t.pop("model.layers.2.self_attn.k_proj.weight")),
         SEARCH, ("models/ft_add", "model.layers.2.self_attn.k_proj.weight", "missing")),
    Case("layer-range-out-of-bounds",
         edit_merge_yaml(lambda m: (m.pop("models"), m.update(merge_method="passthrough", slices=[
             {"sources": [{"model": "models/base", "layer_range": [0, 9]}]}]))),
         ("merge", "merge.yaml", "merged", "--device", "cpu", "--force"),
         ("slices[0].sources[0].layer_range", "4 layers")),
    # tasks
    Case("no-tasks", edit_study(_set("evaluation.tasks", [])), SEARCH, ("evaluation.tasks", "non-empty")),
    Case("no-evaluation-block", edit_study(_drop("evaluation")), SEARCH, ("evaluation", "missing")),
    Case("task-bad-json-row", edit_lines("data/add.jsonl", 3, '{"query": "1+1=", "choices": ["2", "3"'), SEARCH,
         ("add.jsonl:3", "bad JSON")),
    Case("task-row-missing-field", edit_row("data/rev.jsonl", 5, lambda r: r.pop("choices")), SEARCH,
         ("rev.jsonl:5", "choices")),
    Case("gold-out-of-range", edit_row("data/add.jsonl", 2, lambda r: r.update(gold=7)), SEARCH,
         ("add.jsonl:2", "gold", "out of range")),
    Case("empty-task-file", write_text("data/rev.jsonl", "\n"), SEARCH, ("rev.jsonl", "no items")),
    Case("task-file-missing", edit_study(_set("evaluation.tasks.0.path", "data/mul.jsonl")), SEARCH,
         ("mul.jsonl", "not found")),
    Case("unknown-task-kind", edit_study(_set("evaluation.tasks.1.kind", "mcq")), SEARCH,
         ("tasks[1].kind", "'mcq'")),
    Case("holdout-not-a-fraction", edit_study(_set("evaluation.holdout", 1.0)), SEARCH,
         ("evaluation.holdout", "[0, 1)")),
    Case("every-task-weight-zero", edit_study(lambda d: [t.update(weight=0) for t in d["evaluation"]["tasks"]]),
         SEARCH, ("evaluation.tasks", "weight")),
    Case("eval-suite-yaml-syntax", write_text("study.yaml", "name: night\nevaluation: [unclosed\nseed: 1\n"),
         ("eval", "models/base", "--suite", "study.yaml", "--device", "cpu"), ("study.yaml:3", "invalid YAML")),
    Case("eval-task-bad-row", edit_lines("data/add.jsonl", 4, "not json"),
         ("eval", "models/base", "--tasks", "multiple_choice:data/add.jsonl", "--device", "cpu"),
         ("add.jsonl:4", "bad JSON")),
    # outputs and storage
    Case("output-dir-under-a-file", both(write_text("blocker", "a file, not a folder\n"),
                                         edit_study(_set("output_dir", "blocker/run"))), SEARCH,
         ("blocker/run", "not writable")),
    Case("merge-output-exists", None, ("merge", "merge.yaml", "merged", "--device", "cpu"),
         ("merged", "already exists", "--force")),
    Case("merge-output-under-a-file", write_text("blocker", "a file\n"),
         ("merge", "merge.yaml", "blocker/merged", "--device", "cpu"),
         ("blocker/merged", "cannot create the output folder", "blocker is a file, not a folder")),
    Case("unreachable-storage", None, (*SEARCH, "--storage", "postgresql://mergesearch:hunter2@127.0.0.1:9/night"),
         ("cannot open storage", "127.0.0.1:9"), absent=("hunter2",)),
    Case("unreachable-storage-two-workers", None,
         (*SEARCH, "--workers", "2", "--storage", "postgresql://mergesearch:hunter2@127.0.0.1:9/night"),
         ("cannot open storage", "127.0.0.1:9"), absent=("hunter2",)),
    Case("storage-url-nonsense", None, (*SEARCH, "--storage", "mongodb://localhost/night"),
         ("cannot open storage", "mongodb")),
    Case("different-search-space", edit_study(_params(weight=[0.0, 2.0], density=[0.2, 1.0])), SEARCH,
         ("study.yaml", "different search space", "--new-study")),
    Case("export-unknown-trial", None, ("export", "study.yaml", "--trial", "99"), ("--trial", "no trial 99")),
    Case("export-model-exists", None, ("export", "study.yaml", "--write-model", "run/model", "--device", "cpu"),
         ("run/model", "already exists", "--force")),
    Case("export-model-over-an-input", None,
         ("export", "study.yaml", "--write-model", "models/ft_add", "--device", "cpu", "--force"),
         ("models/ft_add", "one of this merge's inputs")),
    Case("export-model-over-a-folder-of-inputs", None,
         ("export", "study.yaml", "--write-model", "models", "--device", "cpu", "--force"),
         ("models", "holds one of this merge's inputs")),
    Case("merge-over-its-input", None, ("merge", "merge.yaml", "models/ft_reverse", "--device", "cpu", "--force"),
         ("models/ft_reverse", "one of this merge's inputs")),
    Case("export-config-to-a-folder", None, ("export", "study.yaml", "--out", "run"), ("run", "is a folder")),
    Case("eval-out-is-a-folder", None,
         ("eval", "models/base", "--tasks", "multiple_choice:data/add.jsonl", "--device", "cpu", "--out", "run"),
         ("--out", "is a folder")),
    Case("eval-batch-size-zero", None,
         ("eval", "models/base", "--tasks", "multiple_choice:data/add.jsonl", "--batch-size", "0"),
         ("--batch-size", "positive integer")),
    # a full disk: RLIMIT_FSIZE makes writes past the limit fail with EFBIG (the CLI ignores SIGXFSZ)
    Case("disk-full-exporting-model", None,
         ("export", "study.yaml", "--write-model", "run/model", "--device", "cpu", "--force"),
         ("run/model", "writing failed", "File too large"), limits={"fsize": 64 * 1024}),
    # a really full disk: a small tmpfs, filled up (skipped where mounting is not allowed)
    Case("disk-full-writing-best-config", fill_disk("best_config.yaml"),
         ("export", "study.yaml", "--out", "full/best_config.yaml"),
         ("full/best_config.yaml", "cannot write", "No space left on device"), tmpfs="full"),
    Case("disk-full-replacing-a-model", fill_disk("merged"),
         ("merge", "merge.yaml", "full/merged", "--device", "cpu", "--force"),
         ("full/merged", "writing failed", "No space left on device"), tmpfs="full"),
]


def _limited(limits: dict):
    def apply() -> None:
        if "fsize" in limits:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limits["fsize"], limits["fsize"]))
    return apply


def run_limited(args, cwd: Path, limits: dict) -> subprocess.CompletedProcess:
    """run_cli with resource limits on the child."""
    env = {**os.environ, "MERGESEARCH_HEARTBEAT": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "search.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300, preexec_fn=_limited(limits))


# A few cases, one of each kind, run in the fast suite; the rest are marked slow (still run in CI).
FAST = {"yaml-syntax", "unknown-search-parameter", "truncated-safetensors", "tensor-missing-in-one-source",
        "task-bad-json-row", "different-search-space", "unreachable-storage", "disk-full-exporting-model",
        "sampler-option-typo", "trials-zero", "export-model-exists", "merge-over-its-input"}


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=() if c.id in FAST else pytest.mark.slow)
                                  for c in CASES])
def test_bad_input_is_one_line_and_touches_nothing(case: Case, finished_run, zoo, tmp_path):
    d = tmp_path / "night"
    shutil.copytree(finished_run, d)
    mounted = None
    try:
        if case.tmpfs:
            mounted = d / case.tmpfs
            mounted.mkdir()
            if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mounted)],
                              capture_output=True).returncode != 0:
                mounted = None
                pytest.skip("cannot mount a tmpfs here (needs root); the RLIMIT_FSIZE cases cover a full disk")
        if case.setup is not None:
            case.setup(d, zoo)
        before = snapshot(d)
        proc = run_limited(case.args, d, case.limits) if case.limits else run_here(*case.args, cwd=d)
        after = snapshot(d)
    finally:
        if mounted is not None:
            subprocess.run(["umount", str(mounted)], check=True)
    lines = proc.stderr.strip().splitlines()
    print(f"\n[{case.id}] rc={proc.returncode} {proc.stderr.strip()}")
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1, proc.stderr
    line = lines[0]
    assert line.startswith(f"mergesearch {case.args[0]}: error: "), line
    for text in case.expect:
        assert text in line, line
    for text in case.absent:
        assert text not in line, line
    assert "Traceback" not in proc.stderr
    assert after == before, "an existing output changed"
    assert not (d / "PWNED").exists()


# ---- code in model folders never runs; paths resolve against the YAML; writes stay in output_dir -----------
REMOTE_CODE = """from pathlib import Path
Path(__file__).with_name("PWNED").write_text("remote code ran")
"""


def remote_code_model(zoo, folder: Path, model_type: str = "llama") -> Path:
    """ft_add whose config and tokenizer point at a modeling file that marks that it ran."""
    shutil.copytree(zoo["ft_add"], folder)
    (folder / "evil.py").write_text(REMOTE_CODE)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type=model_type, auto_map={"AutoConfig": "evil.EvilConfig",
                                                   "AutoModelForCausalLM": "evil.EvilModel"})
    (folder / "config.json").write_text(json.dumps(config))
    tok = json.loads((folder / "tokenizer_config.json").read_text())
    tok["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(tok))
    return folder


@pytest.mark.slow
def test_code_in_a_model_folder_never_runs(zoo, tmp_path):
    known = remote_code_model(zoo, tmp_path / "known")                  # llama + auto_map: loads as llama
    unknown = remote_code_model(zoo, tmp_path / "unknown", "evil")      # only its own code could load it
    write_jsonl(tmp_path / "add.jsonl", addition_items(4))
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(
        {"merge_method": "linear", "models": [{"model": "unknown", "parameters": {"weight": 1.0}},
                                              {"model": str(zoo["ft_add"]), "parameters": {"weight": 1.0}}]}))
    tasks = ("--tasks", "multiple_choice:add.jsonl", "--device", "cpu")
    assert run_cli("eval", known, *tasks, cwd=tmp_path).returncode == 0
    for target in (unknown, "merge.yaml"):                              # a folder; the in-memory engine
        refused = run_cli("eval", target, *tasks, cwd=tmp_path)
        assert refused.returncode == 2, refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
        assert "unsupported model_type 'evil'" in refused.stderr and "trust_remote_code" not in refused.stderr
    assert run_cli("merge", "merge.yaml", "out", "--device", "cpu", cwd=tmp_path).returncode == 0
    assert not list(tmp_path.rglob("PWNED"))


@pytest.mark.slow
def test_paths_resolve_against_the_yaml_and_writes_stay_in_output_dir(finished_run, tmp_path):
    """Run from another folder that holds decoys at the same relative paths: the study's files are used,
    and the only changes anywhere are inside its output_dir."""
    night = tmp_path / "night"
    shutil.copytree(finished_run, night)
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "data").mkdir(parents=True)
    (elsewhere / "data" / "add.jsonl").write_text("not a task file\n")
    (elsewhere / "models" / "base").mkdir(parents=True)
    before = {p: snapshot(p) for p in (night, elsewhere)}
    proc = run_cli("search", night / "study.yaml", "--trials", "3", "--no-progress", cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr
    assert snapshot(elsewhere) == before[elsewhere]
    after = snapshot(night)
    changed = {p for p in set(after) | set(before[night]) if after.get(p) != before[night].get(p)}
    assert changed and all(p.startswith("run/") for p in changed), sorted(changed)
