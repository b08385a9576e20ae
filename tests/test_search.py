"""The search loop as a user runs it: real study YAMLs, real SQLite storage, the CLI in a subprocess."""

from __future__ import annotations

import csv
import signal
import subprocess
import sys
import time

import optuna
import pytest
import yaml
from conftest import REPO, run_cli
from studyfiles import write_study

from search.study import load_study


def stored(path):
    """(study config, optuna study) of a finished run, loaded from the default storage."""
    cfg = load_study(path)
    return cfg, optuna.load_study(study_name=cfg.name, storage=cfg.storage_url())


def best_config_body(cfg) -> dict:
    return yaml.safe_load((cfg.output_dir / "best_config.yaml").read_text())


def test_search_runs_to_budget_and_writes_outputs(zoo, tmp_path):
    path = write_study(tmp_path, zoo, trials=7, sampler="tpe", per_filter=["mlp"])
    proc = run_cli("search", path, "--no-progress")
    assert proc.returncode == 0, proc.stderr
    cfg, study = stored(path)
    states = [t.state for t in study.trials]
    assert len(states) == 7 and all(s == optuna.trial.TrialState.COMPLETE for s in states)
    for t in study.trials:
        assert {"config", "scores", "score", "merge_s", "eval_s"} <= set(t.user_attrs)
        assert yaml.safe_load(t.user_attrs["config"])["merge_method"] == "ties"
    seeds = {t.user_attrs.get("seed") for t in study.trials} - {None}
    assert {"parent ft_add", "parent ft_reverse", "uniform", "defaults"} <= seeds
    winner = study.user_attrs["holdout_winner"]
    winner_trial = next(t for t in study.trials if t.number == winner)
    assert best_config_body(cfg) == yaml.safe_load(winner_trial.user_attrs["config"])
    header = (cfg.output_dir / "best_config.yaml").read_text().splitlines()[:3]
    assert f"trial {winner}" in header[0] and "held-out" in header[1]
    with open(cfg.output_dir / "trials.csv") as f:
        assert len(list(csv.DictReader(f))) == 7
    for name in ["history.png", "profile.png", "report.html"]:
        assert (cfg.output_dir / "report" / name).is_file(), name
    assert "best found" in proc.stderr or "*" in proc.stderr


def test_search_resumes_and_extends_the_budget(zoo, tmp_path):
    path = write_study(tmp_path, zoo, trials=3, sampler="random")
    assert run_cli("search", path, "--no-progress").returncode == 0
    cfg, study = stored(path)
    first = {t.number: t.params for t in study.trials if t.state.is_finished()}
    assert len(first) == 3
    proc = run_cli("search", path, "--trials", "6", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    _, study = stored(path)
    assert len(study.trials) == 6
    assert {t.number: t.params for t in study.trials[:3]} == first
    assert "3 trials already done" in proc.stderr


def test_changed_space_is_refused_unless_new_study(zoo, tmp_path):
    path = write_study(tmp_path, zoo, trials=2)
    assert run_cli("search", path, "--no-progress").returncode == 0
    write_study(tmp_path, zoo, trials=2, params={"weight": [0.0, 1.0]})
    proc = run_cli("search", path, "--no-progress")
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "different search space" in proc.stderr
    assert (tmp_path / "run" / "best_config.yaml").is_file()
    proc = run_cli("search", path, "--no-progress", "--new-study")
    assert proc.returncode == 0, proc.stderr


def test_faulty_candidate_fails_with_reason_and_the_study_goes_on(zoo, tmp_path):
    from search.loop import run_search, open_study
    from search.space import SearchSpace

    path = write_study(tmp_path, zoo, method="linear", params={"weight": [0.0, 1.0]}, granularity="global",
                       trials=4, extra={"seed_trials": []})
    cfg = load_study(path)
    space = SearchSpace(cfg)
    study = open_study(cfg, space=space)
    study.enqueue_trial({n: 0.0 for n in space.names})   # zero weight sum: NaN weights
    assert run_search(cfg, trials=4, timeout=None) == 0
    trials = study.get_trials()
    assert len(trials) == 4
    failed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    assert len(failed) == 1 and "non-finite" in failed[0].user_attrs["fail_reason"]
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials) == 3


def test_wilcoxon_pruner_sees_paired_per_item_values(zoo, tmp_path):
    path = write_study(tmp_path, zoo, trials=8, pruner="wilcoxon", sampler="random", n_items=40)
    assert run_cli("search", path, "--no-progress").returncode == 0
    cfg, study = stored(path)
    finished = [t for t in study.trials if t.state != optuna.trial.TrialState.FAIL]
    steps = [set(t.intermediate_values) for t in finished if t.state == optuna.trial.TrialState.COMPLETE]
    assert steps and all(s == steps[0] for s in steps)          # same chunks, same steps, every trial
    assert steps[0] == set(range(len(steps[0]))) and len(steps[0]) >= 4     # one report per chunk of 16 items
    references = study.user_attrs["references"]["measured"]        # a chunk's mean item score / its reference
    assert all(0 <= v <= 1 / min(references.values()) for t in finished for v in t.intermediate_values.values())
    seeds = [t for t in study.trials if "seed" in t.user_attrs]
    assert seeds and all(t.state == optuna.trial.TrialState.COMPLETE for t in seeds)   # references, never pruned


@pytest.mark.parametrize(("pruner", "option", "counted"), [("hyperband", None, True), ("median", None, True),
                                                          ("wilcoxon", None, False), ("hyperband", False, False)])
def test_cmaes_counts_pruned_trials_where_the_pruner_reports_the_objective(zoo, tmp_path, pruner, option, counted):
    """CMA-ES under hyperband/median/halving tells its population a pruned trial at its last reported value (the
    objective over the items scored so far); under Wilcoxon (per-chunk values) or when the study says no, not,
    and validate says a pruned trial is then a sample lost to it."""
    from search.cli.commands import starved_sampler
    from search.loop import open_study
    from search.space import SearchSpace

    sampler = {"name": "cmaes", "seed": 0, **({} if option is None else {"consider_pruned_trials": option})}
    path = write_study(tmp_path, zoo, pruner=pruner, extra={"sampler": sampler})
    cfg = load_study(path)
    study = open_study(cfg, space=SearchSpace(cfg))
    assert isinstance(study.sampler, optuna.samplers.CmaEsSampler)
    assert study.sampler._consider_pruned_trials is counted
    assert (starved_sampler(cfg) is None) is counted


def test_export_writes_config_and_model_with_scores(zoo, tmp_path):
    from transformers import AutoModelForCausalLM

    path = write_study(tmp_path, zoo, trials=3)
    assert run_cli("search", path, "--no-progress").returncode == 0
    cfg, study = stored(path)
    out = tmp_path / "exported.yaml"
    proc = run_cli("export", path, "--trial", "2", "--out", out, "--write-model", tmp_path / "model",
                   "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(out.read_text()) == yaml.safe_load(study.trials[2].user_attrs["config"])
    card = (tmp_path / "model" / "README.md").read_text()
    assert "## Scores" in card and "| add |" in card
    AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert run_cli("export", path, "--trial", "99").returncode == 2


def test_multi_objective_nsga2_exports_a_pareto_plot(zoo, tmp_path):
    path = write_study(tmp_path, zoo, trials=5, sampler="nsga2", params={"weight": [0.0, 1.0]},
                       granularity="global")
    proc = run_cli("search", path, "--no-progress")
    assert proc.returncode == 0, proc.stderr
    cfg, study = stored(path)
    assert len(study.directions) == 2
    assert (cfg.output_dir / "report" / "pareto.png").is_file()
    assert (cfg.output_dir / "best_config.yaml").is_file()


@pytest.mark.slow
def test_sigint_stops_cleanly_and_resume_finishes(zoo, tmp_path):
    import os

    path = write_study(tmp_path, zoo, trials=400, sampler="random", n_items=40)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "search.cli", "search", str(path), "--no-progress"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    cfg = load_study(path)
    deadline = time.time() + 120
    while time.time() < deadline and not (cfg.output_dir / "best_config.yaml").exists():
        time.sleep(0.5)
    time.sleep(2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert f"run the same command to resume (mergesearch search {path})" in err, err
    _, study = stored(path)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert 0 < len(done) < 400
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    assert (cfg.output_dir / "report" / "report.html").is_file()
    proc = run_cli("search", path, "--trials", str(len(done) + 3), "--no-progress")
    assert proc.returncode == 0, proc.stderr
