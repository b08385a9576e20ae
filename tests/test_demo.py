"""`mergesearch demo` end to end, as CI runs it: quick models, a small budget, every output written."""

import pytest
import yaml
from conftest import run_cli

pytestmark = pytest.mark.slow


def test_demo_quick_runs_end_to_end(tmp_path):
    out = tmp_path / "run"
    proc = run_cli("demo", "--quick", "--out", out, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ["best_config.yaml", "model/model.safetensors", "model/README.md", "report/report.html",
                 "report/history.png", "trials.csv", "soup/soup_config.yaml", "soup/soup_table.md",
                 "demo_summary.md", "demo.yaml"]:
        assert (out / name).is_file(), name
    config = yaml.safe_load((out / "best_config.yaml").read_text())
    assert config["merge_method"] and config["models"]
    summary = (out / "demo_summary.md").read_text()
    for row in ["parent", "linear average", "task arithmetic", "best found"]:
        assert row in summary, row
    assert "held-out" in proc.stderr


def _summary_rows(text: str) -> dict[str, tuple[float, float]]:
    """candidate -> (combined held-out, search) from demo_summary.md's table."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip().strip("*") for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0] not in ("candidate", "") and not cells[0].startswith("---"):
            rows[cells[0]] = (float(cells[-2]), float(cells[-1]))
    return rows


def test_full_demo_beats_every_parent_and_plain_merge(tmp_path):
    """The demo's promise, as CI measures it: the real family (built or cached in models/demo), the real study.
    The found merge must beat each parent and each plain merge on held-out items by a clear margin, and the
    greedy soup must beat the uniform soup and match or beat the best single checkpoint."""
    import re

    out = tmp_path / "run"
    proc = run_cli("demo", "--out", out, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = (out / "demo_summary.md").read_text()
    rows = _summary_rows(summary)
    best = next(v for k, v in rows.items() if k.startswith("best found"))
    others = {k: v for k, v in rows.items() if not k.startswith("best found")}
    assert {"parent spec_rev", "parent spec_shift", "parent spec_sort", "linear average",
            "task arithmetic (w=1)", "ties (mergekit defaults)"} <= set(others), rows
    runner_up = max(v[0] for v in others.values())
    assert best[0] >= runner_up + 0.1, rows                    # measured: +0.305
    assert abs(best[1] - best[0]) < 0.1, rows                  # search vs held-out gap (measured +0.021)
    soup = re.search(r"held-out ([\d.]+) vs best single \(.*?\) ([\d.]+) vs uniform soup ([\d.]+)", summary)
    greedy, single, uniform = map(float, soup.groups())
    assert greedy >= single > uniform, summary
