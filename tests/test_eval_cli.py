"""`mergesearch eval`: model folders and study suites -> a table and JSON; user errors are one line, exit 2."""

import json
import shutil
from pathlib import Path

import pytest

from conftest import REPO, run_cli
from search.cli import main
from test_eval_native import gen_rows, mc_rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("evaldata")
    write_jsonl(folder / "mc.jsonl", mc_rows(20))
    write_jsonl(folder / "gen.jsonl", gen_rows(6))
    write_jsonl(folder / "ppl.jsonl", [{"text": f"{i}+{i}={2 * i}"} for i in range(8)])
    return folder


def run(capsys, *args):
    code = main(["eval", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_eval_tasks_prints_a_table_and_writes_json(zoo, data, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(data)
    out = tmp_path / "res" / "result.json"
    code, stdout, stderr = run(capsys, zoo["ft_add"], "--tasks", "multiple_choice:mc.jsonl:8", "generate:gen.jsonl",
                               f"perplexity:{data / 'ppl.jsonl'}", "--batch-size", "4", "--out", out)
    assert code == 0, stderr
    for word in ("mc", "gen", "ppl", "acc", "exact_match", "neg_nll", "weighted score"):
        assert word in stdout
    report = json.loads(out.read_text())
    assert [t["name"] for t in report["tasks"]] == ["mc", "gen", "ppl"]
    assert [t["n"] for t in report["tasks"]] == [8, 6, 8] and report["split"] == "all"
    assert len(report["tasks"][0]["per_item"]) == 8 and report["device"] == "cpu"


def test_eval_suite_reads_the_evaluation_block(zoo, data, tmp_path, capsys):
    study = tmp_path / "study.yaml"
    shutil.copy(data / "mc.jsonl", tmp_path / "mc.jsonl")
    study.write_text("name: demo\nmerge: {merge_method: linear}\nevaluation:\n  tasks:\n"
                     "    - {name: math, kind: multiple_choice, path: mc.jsonl, metric: acc_norm}\n"
                     "  holdout: 0.5\n  seed: 2\n")
    out = tmp_path / "r.json"
    code, _, stderr = run(capsys, zoo["base"], "--suite", study, "--split", "holdout", "--out", out)
    assert code == 0, stderr
    task = json.loads(out.read_text())["tasks"][0]
    assert task["name"] == "math" and task["metric"] == "acc_norm" and 0 < task["n"] < 32


def test_user_errors_are_one_line(zoo, data, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(data)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "a", "choices": ["x"], "gold": 0}\n{"query": "a", "choices": ["x"], "gold": 3}\n')
    pickle_only = tmp_path / "pickled"
    pickle_only.mkdir()
    shutil.copy(zoo["base"] / "config.json", pickle_only / "config.json")
    (pickle_only / "pytorch_model.bin").write_bytes(b"not really")
    no_block = tmp_path / "study.yaml"
    no_block.write_text("name: x\n")
    cases = [
        ((tmp_path / "missing", "--tasks", "perplexity:ppl.jsonl"), "model folder not found"),
        ((zoo["base"], "--tasks", f"multiple_choice:{bad}"), f"{bad}:2: `gold` 3 is out of range"),
        ((pickle_only, "--tasks", "perplexity:ppl.jsonl"), "pickle"),
        ((zoo["base"], "--suite", no_block), "no `evaluation:` block"),
        ((zoo["base"], "--tasks", "perplexity:ppl.jsonl", "perplexity:./ppl.jsonl"), "two tasks are named 'ppl'"),
        ((zoo["base"], "--tasks", "perplexity:nope.jsonl"), "nope.jsonl: task file not found"),
    ]
    for args, message in cases:
        code, _, stderr = run(capsys, *args)
        assert code == 2, args
        assert message in stderr and len(stderr.strip().splitlines()) == 1, stderr


def test_cli_subprocess_user_error(zoo):
    bad = run_cli("eval", zoo["ft_add"], "--tasks", "multiple_choice:/nonexistent.jsonl")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
    assert "/nonexistent.jsonl: task file not found" in bad.stderr


def test_eval_merge_config(zoo, data, tmp_path, capsys):
    engine = pytest.importorskip("merge_core.engine")
    if Path(engine.__file__).parent != REPO / "merge_core":  # e.g. another checkout's, via an editable install
        pytest.skip("this checkout has no merge_core.engine yet")
    config = tmp_path / "merge.yaml"
    config.write_text(f"merge_method: linear\ndtype: float32\nmodels:\n  - model: {zoo['ft_add']}\n"
                      f"    parameters: {{weight: 0.5}}\n  - model: {zoo['ft_reverse']}\n"
                      f"    parameters: {{weight: 0.5}}\n")
    code, stdout, stderr = run(capsys, config, "--tasks", f"perplexity:{data / 'ppl.jsonl'}")
    assert code == 0, stderr
    assert "neg_nll" in stdout
