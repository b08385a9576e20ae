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
