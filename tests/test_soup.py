"""Greedy and uniform soups on real checkpoints: the algorithm, the in-memory running sum, the exported
mergekit config, the CLI and its outputs."""

from __future__ import annotations

import pytest
import torch
import yaml
from conftest import run_cli
from mergekit_oracle import max_abs_diff, read_folder, run_mergekit
from studyfiles import addition_items, write_jsonl

from search.soup import greedy_soup, load_soup, run_soup, soup_config_dict


@pytest.fixture(scope="module")
def checkpoints(zoo, tmp_path_factory):
    """Five real fine-tune checkpoints of the zoo base on addition: three sensible, two overheated."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tiny_models import _texts, save_model, train_steps

    root = tmp_path_factory.mktemp("ckpts")
    tok = AutoTokenizer.from_pretrained(zoo["base"])
    runs = [(1, 2e-3), (2, 3e-3), (3, 2e-3), (4, 5e-2), (5, 8e-2)]
    for i, (seed, lr) in enumerate(runs):
        model = AutoModelForCausalLM.from_pretrained(zoo["base"])
        train_steps(model, tok, _texts("add", 256, seed), steps=25, lr=lr, seed=seed)
        save_model(model, tok, root / f"checkpoint-{(i + 1) * 100}")
    return root


def write_soup(folder, checkpoints, mode="greedy", strict=True):
    write_jsonl(folder / "add.jsonl", addition_items(80, seed=5))
    path = folder / "soup.yaml"
    path.write_text(yaml.safe_dump({
        "name": "s", "output_dir": "out", "checkpoints": [str(checkpoints / "checkpoint-*")], "mode": mode,
        "strict": strict, "device": "cpu",
        "evaluation": {"tasks": [{"name": "add", "kind": "multiple_choice", "path": "add.jsonl"}],
                       "holdout": 0.5, "seed": 0}}))
    return path


def test_greedy_algorithm_matches_the_paper():
    scores = [0.5, 0.7, 0.6, 0.2]
    table = {(1, 2): 0.72, (1, 2, 0): 0.71, (1, 2, 3): 0.9}

    def soup_score(kept, candidate):
        return table.get(tuple(kept) + (candidate,), 0.0)

    chosen, trace = greedy_soup(scores, soup_score)
    assert chosen == [1, 2, 3]
    assert [(i, k) for i, _, k in trace] == [(2, True), (0, False), (3, True)]
    chosen, _ = greedy_soup([0.5, 0.5], lambda kept, c: 0.5, strict=True)
    assert chosen == [0]
    chosen, _ = greedy_soup([0.5, 0.5], lambda kept, c: 0.5, strict=False)
    assert chosen == [0, 1]


def reference_greedy(folders, suite, model, strict=True):
    """Straightforward greedy soup: average state dicts from disk, load, score; no running sums."""
    def score_of(members):
        states = [read_folder(folders[i]) for i in members]
        avg = {k: sum(s[k] for s in states) / len(states) for k in states[0]}
        model.load_state_dict(avg, strict=False)
        return suite.evaluate(model, "search").score

    singles = [score_of([i]) for i in range(len(folders))]
    order = sorted(range(len(folders)), key=lambda i: (-singles[i], i))
    chosen, best = [order[0]], singles[order[0]]
    for i in order[1:]:
        s = score_of(chosen + [i])
        if (s > best) if strict else (s >= best):
            chosen, best = chosen + [i], s
    return chosen, singles


def test_greedy_soup_equals_reference_and_beats_best_single(checkpoints, tmp_path):
    from transformers import AutoModelForCausalLM

    from evaluators.suite import Suite

    cfg = load_soup(write_soup(tmp_path, checkpoints))
    assert [p.name for p in cfg.checkpoints] == [f"checkpoint-{i}" for i in (100, 200, 300, 400, 500)]
    result = run_soup(cfg)
    model = AutoModelForCausalLM.from_pretrained(cfg.checkpoints[0])
    suite = Suite.from_config(cfg.evaluation, __import__("transformers").AutoTokenizer.from_pretrained(
        cfg.checkpoints[0]))
    chosen, singles = reference_greedy(cfg.checkpoints, suite, model)
    assert result.chosen == chosen
    assert result.individual == pytest.approx(singles, abs=1e-9)
    assert result.greedy_score >= max(singles)
    assert result.holdout["greedy soup"] >= result.holdout["best single"]
    assert {"greedy soup", "uniform soup", "best single"} <= set(result.holdout)


def test_exported_config_reproduces_the_soup_in_mergekit(checkpoints, tmp_path):
    from merge_core.engine import SoupEngine

    folders = sorted(checkpoints.glob("checkpoint-*"))
    chosen = [0, 2, 3]
    engine = SoupEngine(folders, device="cpu")
    for i in chosen[:-1]:
        engine.keep(i)
    ours = {k: v.clone() for k, v in engine.show_with(chosen[-1]).state_dict().items()}
    theirs = run_mergekit(soup_config_dict(folders, chosen, "float32"), tmp_path / "mk")
    assert max_abs_diff({k: ours[k] for k in theirs}, theirs)[0] <= 1e-6


def test_soup_memory_is_a_running_sum(checkpoints):
    from merge_core.engine import SoupEngine

    folders = sorted(checkpoints.glob("checkpoint-*"))
    engine = SoupEngine(folders, device="cpu")
    for i in range(len(folders)):
        engine.keep(i)
    assert len(engine._sum) == len(engine.names)          # one sum per tensor, whatever the count
    avg = engine.show_with(None).state_dict()
    ref = {k: torch.stack([read_folder(f)[k] for f in folders]).mean(0) for k in read_folder(folders[0])}
    assert max_abs_diff({k: avg[k] for k in ref}, ref)[0] <= 1e-6


def test_soup_cli_writes_table_config_plot(checkpoints, tmp_path):
    path = write_soup(tmp_path, checkpoints)
    proc = run_cli("soup", path, "--write-model", tmp_path / "model")
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out"
    for name in ["soup_config.yaml", "soup_table.csv", "soup_table.md", "soup_steps.png"]:
        assert (out / name).is_file(), name
    config = yaml.safe_load((out / "soup_config.yaml").read_text())
    assert config["merge_method"] == "linear"
    assert "greedy soup" in proc.stderr and "uniform soup" in proc.stderr
    assert (tmp_path / "model" / "model.safetensors").is_file()
    proc = run_cli("soup", path, "--mode", "uniform")
    assert proc.returncode == 0, proc.stderr
    assert len(yaml.safe_load((out / "soup_config.yaml").read_text())["models"]) == 5


def test_soup_user_errors(tmp_path, checkpoints):
    path = write_soup(tmp_path, checkpoints)
    data = yaml.safe_load(path.read_text())
    data["checkpoints"] = [str(tmp_path / "nothing-*")]
    path.write_text(yaml.safe_dump(data))
    proc = run_cli("soup", path)
    assert proc.returncode == 2 and "no checkpoint folder matches" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_home_relative_paths_expand(tmp_path, checkpoints, monkeypatch):
    monkeypatch.setenv("HOME", str(checkpoints.parent))
    path = write_soup(tmp_path, checkpoints)
    data = yaml.safe_load(path.read_text())
    data["checkpoints"] = [f"~/{checkpoints.name}/checkpoint-*"]
    data["output_dir"] = "~/soup-out"
    path.write_text(yaml.safe_dump(data))
    cfg = load_soup(path)
    assert [p.name for p in cfg.checkpoints] == [f"checkpoint-{i}00" for i in range(1, 6)]
    assert cfg.output_dir == checkpoints.parent / "soup-out"


def test_soup_never_replaces_a_model_without_force_nor_a_checkpoint(checkpoints, tmp_path):
    """Checked before the soup runs: nothing is scored, nothing written, one line names the fix."""
    path = write_soup(tmp_path, checkpoints)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "keep.txt").write_text("mine")
    refused = run_cli("soup", path, "--write-model", tmp_path / "model")
    assert refused.returncode == 2 and "already exists (pass --force" in refused.stderr, refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    first = sorted(checkpoints.glob("checkpoint-*"))[0]
    before = sorted(p.name for p in first.iterdir())
    over_input = run_cli("soup", path, "--write-model", first, "--force")
    assert over_input.returncode == 2 and "one of this merge's inputs" in over_input.stderr, over_input.stderr
    assert sorted(p.name for p in first.iterdir()) == before
    assert (tmp_path / "model" / "keep.txt").read_text() == "mine"
