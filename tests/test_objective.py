"""What a study optimizes and how its result is judged: the aggregate of task scores over per-task references,
pruning inside tasks (chunked evaluation), and the held-out comparison against the plain merges with a winner
picked on one half of the held-out items and reported on the other, with a paired bootstrap interval."""

from __future__ import annotations

import math

import optuna
import pytest
import yaml
from studyfiles import write_study

from search.compare import WORST_TIE_BREAK, Candidate, aggregate, bootstrap_gap, results_table, worst_ratio
from search.loop import open_study, references_of, run_search
from search.space import SearchSpace
from search.study import load_study

WEIGHTS = {"a": 1.0, "b": 1.0}
REFS = {"a": 0.5, "b": 1.0}


def test_aggregates():
    scores = {"a": 0.25, "b": 0.9}
    assert aggregate(scores, "mean", WEIGHTS) == pytest.approx(0.575)
    assert aggregate(scores, "normalized", WEIGHTS, REFS) == pytest.approx((0.5 + 0.9) / 2)
    assert worst_ratio(scores, WEIGHTS, REFS) == pytest.approx(0.5)              # a kept half as well as its parent
    assert aggregate(scores, "worst", WEIGHTS, REFS) == pytest.approx(0.5 + WORST_TIE_BREAK * 0.7)
    assert aggregate(scores, "normalized", {"a": 0.0, "b": 1.0}, REFS) == pytest.approx(0.9)   # weight 0: ignored
    assert math.isnan(aggregate({}, "mean", WEIGHTS))


def test_worst_ranks_merges_that_lose_the_same_skill():
    """Two merges that both drop task a entirely: worst alone calls them equal (0); the tie-break prefers the one
    that keeps b better, so a rank-based sampler still has a direction to go."""
    keeps_b = aggregate({"a": 0.0, "b": 0.9}, "worst", WEIGHTS, REFS)
    loses_b = aggregate({"a": 0.0, "b": 0.2}, "worst", WEIGHTS, REFS)
    assert 0 < loses_b < keeps_b < aggregate({"a": 0.05, "b": 0.2}, "worst", WEIGHTS, REFS)   # keeping some of a wins
    assert aggregate({"a": 0.1, "b": 0.0}, "worst", WEIGHTS, REFS) < aggregate({"a": 0.1, "b": 0.3}, "worst", WEIGHTS, REFS)
    assert aggregate({"a": 0.5, "b": 0.5}, "worst", WEIGHTS, REFS) > aggregate({"a": 0.0, "b": 1.0}, "worst", WEIGHTS, REFS)


def _candidate(label: str, kind: str, a: list[float], b: list[float], trial=None) -> Candidate:
    return Candidate(label, kind, {"a": {f"a{i}": v for i, v in enumerate(a)}, "b": {f"b{i}": v for i, v in enumerate(b)}},
                     trial)


def test_bootstrap_gap_of_a_clear_winner_excludes_zero_and_of_a_tie_does_not():
    n = 60
    strong = _candidate("found", "found", [1.0] * n, [1.0] * (n - 5) + [0.0] * 5)
    weak = _candidate("plain", "plain", [1.0] * 10 + [0.0] * (n - 10), [1.0] * (n - 5) + [0.0] * 5)
    half = {"a": {f"a{i}": 0 for i in range(n)}.keys(), "b": {f"b{i}": 0 for i in range(n)}.keys()}
    half = {t: set(v) for t, v in half.items()}
    gap, low, high = bootstrap_gap(strong, weak, half, "mean", WEIGHTS, REFS, resamples=500)
    assert low <= gap <= high and low > 0
    gap, low, high = bootstrap_gap(weak, weak, half, "mean", WEIGHTS, REFS, resamples=200)
    assert gap == 0 and low <= 0 <= high


def test_winner_is_picked_on_one_half_and_reported_on_the_other():
    """Two trials: one lucky on the select half only. The winner is the one that is better there; its reported
    score is its report-half score, not the one that picked it."""
    n = 40
    ids = [f"a{i}" for i in range(n)]
    report = set(ids[::2]) | {f"b{i}" for i in range(0, n, 2)}
    lucky = _candidate("found", "found", [1.0 if i % 2 else 0.0 for i in range(n)], [0.5] * n, trial=1)
    steady = _candidate("found", "found", [0.6] * n, [0.5] * n, trial=2)
    parent = _candidate("parent x", "parent", [0.5] * n, [1.0] * n, trial=0)
    table = results_table([parent], [lucky, steady], "mean", WEIGHTS, REFS, report)
    assert table["winner"] == 1                                  # 1.0 on the select half (odd items)
    found = next(r for r in table["rows"] if r["kind"] == "found")
    assert found["scores"]["a"] == 0.0 and found["extra"]["select_value"] == pytest.approx(0.75)
    assert table["gap"]["vs"] == "parent x" and table["gap"]["value"] < 0 and not table["gap"]["beats"]


def test_references_are_measured_once_stored_and_overridable(zoo, tmp_path, monkeypatch):
    from search import objective

    calls = []
    original = objective.TrialRunner.measure_references
    monkeypatch.setattr(objective.TrialRunner, "measure_references",
                        lambda self: calls.append(1) or original(self))
    path = write_study(tmp_path, zoo, trials=5, sampler="random", extra={"final": {"baselines": False}})
    cfg = load_study(path)
    assert run_search(cfg, trials=5, timeout=None) == 0
    assert run_search(cfg, trials=7, timeout=None) == 0          # resumed: the stored references are used
    assert len(calls) == 1
    study = open_study(cfg, space=SearchSpace(cfg))
    measured = study.user_attrs["references"]["measured"]
    parents = {t.user_attrs["seed"]: t.user_attrs["scores"] for t in study.trials
               if str(t.user_attrs.get("seed", "")).startswith("parent")}
    for task in ("add", "rev"):                                   # the best parent's search score per task
        assert measured[task] == pytest.approx(max(s[task] for s in parents.values()))
    for t in study.trials:
        if t.state == optuna.trial.TrialState.COMPLETE:
            expected = aggregate(t.user_attrs["scores"], cfg.aggregate, {"add": 1.0, "rev": 1.0}, measured)
            assert t.user_attrs["score"] == pytest.approx(expected) and t.value == pytest.approx(expected)
    data = yaml.safe_load(path.read_text())                      # a task's own `reference:` wins
    data["evaluation"]["tasks"][0]["reference"] = 0.5
    path.write_text(yaml.safe_dump(data))
    assert references_of(study, load_study(path)) == {"add": 0.5, "rev": measured["rev"]}


def test_pruning_stops_trials_inside_a_task_and_never_a_seed(zoo, tmp_path):
    """Chunks of 4 items, the tasks taking turns: the median pruner acts after every chunk, so a bad trial stops
    before it has seen all of its first task's items; the seed trials report but always run to the end."""
    path = write_study(tmp_path, zoo, trials=14, sampler="random", n_items=48,
                       extra={"pruner": {"name": "median", "n_startup_trials": 1, "n_warmup_steps": 0, "every": 4},
                              "final": {"baselines": False}})
    cfg = load_study(path)
    assert run_search(cfg, trials=14, timeout=None) == 0
    study = open_study(cfg, space=SearchSpace(cfg))
    chunks = max(len(t.intermediate_values) for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE)
    assert chunks >= 8
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert pruned, [t.state for t in study.trials]
    assert min(len(t.intermediate_values) for t in pruned) <= 2      # stopped in the first round of chunks
    seeds = [t for t in study.trials if "seed" in t.user_attrs]
    assert seeds and all(t.state == optuna.trial.TrialState.COMPLETE for t in seeds)
    assert all(len(t.intermediate_values) == chunks for t in seeds)


def test_the_final_comparison_has_every_plain_merge_and_an_interval(zoo, tmp_path):
    path = write_study(tmp_path, zoo, trials=6, sampler="random", n_items=40, extra={"objective": {"aggregate": "worst"}})
    cfg = load_study(path)
    assert run_search(cfg, trials=6, timeout=None) == 0
    study = open_study(cfg, space=SearchSpace(cfg))
    final = study.user_attrs["final"]
    labels = [row["label"] for row in final["rows"]]
    assert labels[:2] == ["parent ft_add", "parent ft_reverse"] and labels[-1] == "best found"
    for plain in ("linear (average)", "task arithmetic (w=1)", "ties (defaults: w=1, d=1)", "ties (w=1, d=0.5)",
                  "dare_ties (w=1, d=0.5)"):
        assert plain in labels, labels
    assert any(label.startswith("task arithmetic (best w") for label in labels)
    found = final["rows"][-1]
    assert found["value"] == pytest.approx(found["worst"] + WORST_TIE_BREAK * found["normalized"])
    assert final["aggregate"] == "worst"
    gap = final["gap"]
    assert gap["low"] <= gap["value"] <= gap["high"] and gap["vs"] in labels
    assert final["winner"] == study.user_attrs["holdout_winner"]
    held = study.user_attrs["holdout"][str(final["winner"])]["items"]
    for task, items in held.items():                              # two halves of the held-out items
        assert final["items"]["select"][task] + final["items"]["report"][task] == len(items)
    header = (cfg.output_dir / "best_config.yaml").read_text()
    assert "report half" in header and "95% interval" in header


def test_wilcoxon_pruner_statistic_is_scipys_normal_approximation():
    """The pruner's one-sided signed-rank p-value equals scipy's (zsplit, asymptotic) on tied and zero differences:
    per-chunk accuracies, where scipy's default method would run a permutation test per report."""
    import numpy as np
    import scipy.stats

    from search.store import wilcoxon_p

    rng = np.random.default_rng(0)
    for _ in range(300):
        d = np.round(rng.normal(rng.normal(0, 0.3), 1, int(rng.integers(2, 40))) * 4) / 4
        if d.any():
            expected = scipy.stats.wilcoxon(d, alternative="less", zero_method="zsplit", method="asymptotic").pvalue
            assert wilcoxon_p(d) == pytest.approx(expected, abs=1e-12)


def test_wilcoxon_pruner_prunes_a_clearly_worse_trial_only():
    from search.store import WilcoxonPruner

    pruner = WilcoxonPruner(p_threshold=0.1, n_startup_steps=4)
    study = optuna.create_study(direction="maximize", pruner=pruner)
    best = study.ask()
    for step in range(12):
        best.report(0.8 + 0.01 * (step % 3), step)
    study.tell(best, 0.8)

    def trial_with(values):
        return optuna.trial.create_trial(state=optuna.trial.TrialState.RUNNING,
                                         intermediate_values=dict(enumerate(values)))

    assert pruner.prune(study, trial_with([0.2] * 12))                 # worse at every step
    assert not pruner.prune(study, trial_with([0.2] * 3))              # too few steps yet
    assert not pruner.prune(study, trial_with([0.9] * 12))             # better: never
    assert not pruner.prune(study, trial_with([0.8 + 0.01 * (s % 3) for s in range(12)]))   # the same values


def test_skip_uninformative_counts_settled_items_without_scoring_them(zoo, tmp_path):
    """evaluation.skip_uninformative: the items every parent and the base score alike are found once, at the
    study's start; trials count them with that value and score only the rest."""
    from merge_core.engine import MergeEngine
    from search.objective import TrialRunner

    path = write_study(tmp_path, zoo, trials=6, sampler="random", n_items=40, extra={"final": {"baselines": False}})
    data = yaml.safe_load(path.read_text())
    data["evaluation"]["skip_uninformative"] = True
    path.write_text(yaml.safe_dump(data))
    cfg = load_study(path)
    assert run_search(cfg, trials=6, timeout=None) == 0
    study = open_study(cfg, space=SearchSpace(cfg))
    skipped = study.user_attrs["references"]["uninformative"]

    space = SearchSpace(cfg)                       # each model alone on every search item, independently
    runner = TrialRunner(cfg, space, device="cpu")
    full = {}
    for ref in (zoo["base"], zoo["ft_add"], zoo["ft_reverse"]):
        alone = space.alone_config(str(ref))
        result = runner.suite.evaluate(MergeEngine(alone, device="cpu").materialize(alone), "search")
        full[str(ref)] = {t.name: t.per_item for t in result.tasks}
    tables = list(full.values())
    for task in ("add", "rev"):
        assert skipped[task] == {i: v for i, v in tables[0][task].items() if all(t[task][i] == v for t in tables[1:])}
    n_items = sum(len(items) for items in tables[0].values())
    assert 0 < sum(map(len, skipped.values())) < n_items

    # a parent's seed trial, counted with the skipped values, has the parent's score on every item
    seeds = [t.user_attrs["scores"] for t in study.trials if str(t.user_attrs.get("seed", "")).startswith("parent")]
    for task in ("add", "rev"):
        expected = sorted(sum(table[ref][task].values()) / len(table[ref][task])
                          for table in [full] for ref in (str(zoo["ft_add"]), str(zoo["ft_reverse"])))
        assert sorted(s[task] for s in seeds) == pytest.approx(expected)

    runner.known_items = skipped                   # and a trial scores only the other items
    scored = []
    runner.evaluate(space.config(space.constant(space.default_values())), "search",
                    callback=lambda progress: scored.append(len(progress.new)), chunk_size=8)
    assert sum(scored) == n_items - sum(map(len, skipped.values()))


def test_skip_uninformative_in_slerp_scores_the_base_once(zoo, tmp_path, monkeypatch):
    """SLERP's t = 0 parent is the base: the settled items come from the two parents' scores, with no extra
    evaluation of the base alone (there used to be one at every study start)."""
    from search.objective import TrialRunner

    path = write_study(tmp_path, zoo, method="slerp", params={"t": [0.0, 1.0]}, n_items=16)
    cfg = load_study(path)
    space = SearchSpace(cfg)
    assert space.parent_refs() == [str(zoo["base"]), str(zoo["ft_add"])]
    runner = TrialRunner(cfg, space, device="cpu")
    alone = []
    monkeypatch.setattr(TrialRunner, "_alone_result", lambda self, config: alone.append(config))
    settled = runner.uninformative_items()
    assert alone == [] and set(settled) == {"add", "rev"}
    parents = dict(runner._parent_scores())
    for task in ("add", "rev"):
        tables = [result.task(task).per_item for result in parents.values()]
        assert settled[task] == {i: v for i, v in tables[0].items() if tables[1][i] == v}


def test_wilcoxon_pruner_under_worst_tests_each_task_against_the_best_value():
    """With `worst`, a balanced candidate is not pruned against an unbalanced incumbent (its mean is lower, its
    minimum higher); a candidate with one task clearly below the incumbent's value is."""
    from search.store import WilcoxonPruner

    pruner = WilcoxonPruner(p_threshold=0.1, n_startup_steps=4, tasks=3, worst=True)
    study = optuna.create_study(direction="maximize", pruner=pruner)
    best = study.ask()
    for k in range(8):                                   # steps k * 3 + t: tasks at 0.9, 0.9 and 0.3
        for t, level in enumerate((0.9, 0.9, 0.3)):
            best.report(level + 0.02 * (k % 3), k * 3 + t)
    study.tell(best, 0.3)

    def trial_with(levels):
        values = {k * 3 + t: level + 0.02 * ((k + t) % 3) for k in range(8) for t, level in enumerate(levels)}
        return optuna.trial.create_trial(state=optuna.trial.TrialState.RUNNING, intermediate_values=values)

    assert not pruner.prune(study, trial_with((0.5, 0.5, 0.5)))     # balanced: worst 0.5 > 0.3
    assert pruner.prune(study, trial_with((0.9, 0.1, 0.9)))         # one task clearly below 0.3
    paired = WilcoxonPruner(p_threshold=0.1, n_startup_steps=4, tasks=3)
    assert paired.prune(study, trial_with((0.5, 0.5, 0.5)))         # what pairing (a mean) would have done
