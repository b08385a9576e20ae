"""`mergesearch demo` end to end, as CI runs it: quick models, a small budget, every output written."""

import json

import pytest
import yaml
from conftest import run_cli

pytestmark = pytest.mark.slow
MARGIN = 0.1     # the objective on the report half; measured: see the README's demo table


def test_demo_quick_runs_end_to_end(tmp_path):
    out = tmp_path / "run"
    proc = run_cli("demo", "--quick", "--out", out, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ["best_config.yaml", "model/model.safetensors", "model/README.md", "report/report.html",
                 "report/history.png", "trials.csv", "soup/soup_config.yaml", "soup/soup_table.md",
                 "demo_summary.md", "demo_summary.json", "demo.yaml"]:
        assert (out / name).is_file(), name
    config = yaml.safe_load((out / "best_config.yaml").read_text())
    assert config["merge_method"] and config["models"]
    rows = {row["label"]: row for row in json.loads((out / "demo_summary.json").read_text())["comparison"]["rows"]}
    for label in ["parent spec_rev", "linear (average)", "task arithmetic (w=1)", "ties (w=1, d=0.5)", "best found"]:
        assert label in rows, sorted(rows)
    summary = (out / "demo_summary.md").read_text()
    assert "best found" in summary and "95% paired bootstrap interval" in summary


def test_full_demo_beats_every_parent_and_plain_merge(tmp_path):
    """The demo's promise, as CI measures it: the real family (built or cached in models/demo; the same bytes on
    every x86-64 CPU with AVX2), the real study. On the report half of the held-out items, the found merge must
    beat each parent and each plain merge on the study's objective by a clear margin, with a bootstrap interval
    above 0, and the greedy soup must beat the uniform soup and match or beat the best single checkpoint."""
    out = tmp_path / "run"
    proc = run_cli("demo", "--out", out, timeout=2400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "demo_summary.json").read_text())
    comparison = summary["comparison"]
    rows = {row["label"]: row for row in comparison["rows"]}
    best = rows.pop("best found")
    assert {"parent spec_rev", "parent spec_shift", "parent spec_sort", "linear (average)", "task arithmetic (w=1)",
            "ties (defaults: w=1, d=1)", "ties (w=1, d=0.5)", "dare_ties (w=1, d=0.5)"} <= set(rows), sorted(rows)
    runner_up = max(row["value"] for row in rows.values())
    assert best["value"] >= runner_up + MARGIN, (best, rows)
    assert comparison["gap"]["beats"] and comparison["gap"]["low"] > 0, comparison["gap"]
    soup = summary["soup"]["holdout"]
    assert soup["greedy soup"] >= soup["best single"] > soup["uniform soup"], soup
