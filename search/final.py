"""The end of a run: the held-out comparison (the top trials, the seed trials and the plain merges scored on
held-out items, see search.compare), the winner exported as best_config.yaml, trials.csv and the report.

Owns what finalizing scores and stores in the study; the statistics live in compare, the files in export/report.
"""

from __future__ import annotations

import optuna
from optuna.trial import TrialState

from evaluators.tasks import in_report_half
from merge_core.config import parse_config
from merge_core.engine import MergeEngine
from search.compare import Candidate, plain_merges, results_table
from search.export import folder_lock, maybe_write_best, write_best_config
from search.objective import TrialRunner, references_of
from search.report import publish_holdout, write_report
from search.space import SearchSpace
from search.store import holdout_results, top_trials, trial_by_number
from search.study import StudyConfig

PLAIN_ATTR = "plain_merges"        # "label#i" -> {label, config, score, scores, items} on the held-out items
FINAL_ATTR = "final"               # the results table (search.compare.results_table)


def finalize(study_cfg: StudyConfig, study: optuna.Study, space: SearchSpace, device: str | None, progress,
             runner=None) -> None:
    """The held-out comparison (the top-k trials, the seed trials and the plain merges, see search.compare), the
    winner exported as best_config.yaml, trials.csv and the report.
    `runner`: the search's TrialRunner, reused for the re-evaluations (default: build one)."""
    top = top_trials(study, study_cfg.top_k)
    if top and study_cfg.evaluation.has_holdout:
        seeds = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                 if "seed" in t.user_attrs and t.number not in {x.number for x in top}]
        try:
            runner = runner or TrialRunner(study_cfg, space, device=device,
                                           references=references_of(study, study_cfg))
            reevaluate_holdout(study_cfg, study, space, top + seeds, progress, runner)
            if study_cfg.baselines:
                score_plain_merges(study_cfg, study, progress, runner)
            compare(study_cfg, study, top)
        except KeyboardInterrupt:
            progress.note("held-out comparison cut short (interrupted again); exporting what was scored")
    final = study.user_attrs.get(FINAL_ATTR)
    if final and final.get("winner") is not None:
        trial = trial_by_number(study, final["winner"])
        found = next(row for row in final["rows"] if row["kind"] == "found")
        study.set_user_attr("holdout_winner", trial.number)
        publish_holdout(study, study_cfg, trial, found)
        extra = {"search score": trial.user_attrs.get("score"), "picked": "best of the top trials on the select half "
                 "of the held-out items; the scores above are on the other half (the report half)"}
        if final.get("gap"):
            gap = final["gap"]
            extra["margin"] = (f"{gap['value']:+.4f} over {gap['vs']} (95% interval {gap['low']:+.4f} .. "
                               f"{gap['high']:+.4f})")
        with folder_lock(study_cfg.output_dir, ".best.lock"):
            write_best_config(study_cfg.output_dir, trial, "held-out, report half", study_cfg.name,
                              study_cfg.base_dir, found["value"], found["scores"], extra=extra)
    elif top:
        maybe_write_best(study, study_cfg)
    write_report(study_cfg, study, space)
    progress.summary(study, study_cfg)


def reevaluate_holdout(study_cfg: StudyConfig, study: optuna.Study, space: SearchSpace, trials: list, progress,
                       runner: TrialRunner) -> None:
    """Score the given trials on the held-out split (skipping ones already done); store every item's score."""
    done = holdout_results(study)
    todo = [t for t in trials if t.number not in done]
    if not todo:
        return
    progress.note(f"held-out re-evaluation of {len(todo)} trials ({describe(todo)})")
    for trial in todo:
        result, _, _ = runner.evaluate(space.config(trial.params), "holdout")
        done[trial.number] = held_out(runner, result)
        study.set_user_attr("holdout", {str(k): v for k, v in done.items()})


def held_out(runner: TrialRunner, result) -> dict:
    """What is stored of a held-out evaluation: the objective, per-task scores and every item's score."""
    scores = {t.name: t.score for t in result.tasks}
    return {"score": runner.value(scores), "scores": scores, "stderr": {t.name: t.stderr for t in result.tasks},
            "items": {t.name: t.per_item for t in result.tasks}}


def score_plain_merges(study_cfg: StudyConfig, study: optuna.Study, progress, runner: TrialRunner) -> None:
    """The plain merges a user would write by hand (search.compare.plain_merges), each scored on the held-out
    items, stored in the study (once: a resumed finalize skips the ones done). Configs of one structure share
    one engine; each engine is freed before the next is built."""
    done = study.user_attrs.get(PLAIN_ATTR) or {}
    todo = [(label, i, raw) for label, raws in plain_merges(study_cfg.merge_raw).items()
            for i, raw in enumerate(raws) if f"{label}#{i}" not in done]
    if not todo:
        return
    progress.note(f"scoring {len(todo)} plain merges on the held-out items (linear, task arithmetic, ties, dare_ties)")
    engine = None
    for label, i, raw in todo:
        config = parse_config(raw, where=label, base_dir=study_cfg.base_dir)
        if engine is None or engine.config.structure != config.structure:
            engine = None
            engine = MergeEngine(config, device=runner.engine.device, seed=study_cfg.seed,
                                 allow_pickle=study_cfg.allow_pickle)
        result = runner.suite.evaluate(engine.materialize(config, check_finite=True), "holdout")
        done[f"{label}#{i}"] = {"label": label, "config": raw, **held_out(runner, result)}
        study.set_user_attr(PLAIN_ATTR, done)


def compare(study_cfg: StudyConfig, study: optuna.Study, top: list) -> None:
    """Pick the winner among the top trials on the select half of the held-out items, score every row on the
    report half, and the winner's margin with its bootstrap interval: the study's `final` attribute."""
    held = holdout_results(study)
    references = references_of(study, study_cfg)
    weights = {spec.name: spec.weight for spec in study_cfg.evaluation.tasks}
    candidates = [Candidate(t.user_attrs["seed"], "parent", held[t.number]["items"], t.number, t.user_attrs.get("score"))
                  for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                  if str(t.user_attrs.get("seed", "")).startswith("parent") and t.number in held]
    candidates += [Candidate(entry["label"], "plain", entry["items"], config=entry["config"])
                   for entry in (study.user_attrs.get(PLAIN_ATTR) or {}).values()]
    best = [Candidate("best found", "found", held[t.number]["items"], t.number, t.user_attrs.get("score"))
            for t in top if t.number in held]
    if not best:
        return
    items = best[0].items
    report_ids = {i for task in items.values() for i in task if in_report_half(i, study_cfg.evaluation.seed)}
    study.set_user_attr(FINAL_ATTR, results_table(candidates, best, study_cfg.aggregate, weights, references,
                                                  report_ids))


def describe(trials: list) -> str:
    """'the best 5 by search score + 3 seed trials' for a list of trials."""
    seeds = sum(1 for t in trials if "seed" in t.user_attrs)
    best = len(trials) - seeds
    parts = ([f"the best {best} by search score"] if best else []) + ([f"{seeds} seed trials"] if seeds else [])
    return " + ".join(parts)
