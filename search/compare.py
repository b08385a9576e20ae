"""The comparison a user can trust: the objective's aggregate of task scores (mean, normalized, worst), the plain
merges a user would write by hand, and the results table on held-out items, with the winner picked on one half
of them, every row reported on the other half, and a paired bootstrap interval for the winner's margin.

Owns these computations; evaluates nothing itself (the loop hands it scores) and writes no files.
"""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass, field

from search import StudyError

AGGREGATES = ("mean", "normalized", "worst")
TA_SCALES = (0.25, 0.5, 0.75, 1.0)        # the grid of task-arithmetic scales a user would try
BOOTSTRAP_RESAMPLES = 2000
WORST_TIE_BREAK = 1e-3      # worst's share of the normalized mean: what ranks merges that lose the same skill


# ---- the objective ----------------------------------------------------------------------------------------
def aggregate(scores: dict[str, float], how: str, weights: dict[str, float],
              references: dict[str, float] | None = None) -> float:
    """One number from per-task scores (higher is better).

    mean: the weighted mean of the scores. normalized: the weighted mean of score / reference (1.0: the task kept
    as well as its best parent does). worst: the smallest score / reference over the tasks with weight > 0 (a
    merge that drops one skill scores low however well it keeps the others), plus WORST_TIE_BREAK x normalized:
    without that small term every merge that loses one skill entirely scores 0, and a rank-based sampler (CMA-ES,
    TPE) learns nothing from them (on SmolLM2 the first dozen trials of a search all lost JSON)."""
    tasks = [t for t in scores if weights.get(t, 1.0) > 0 and not math.isnan(scores[t])]
    if not tasks:
        return math.nan
    if how == "mean":
        total = sum(weights.get(t, 1.0) for t in tasks)
        return sum(weights.get(t, 1.0) * scores[t] for t in tasks) / total
    ratios = {t: scores[t] / references[t] for t in tasks}
    if how == "normalized":
        total = sum(weights.get(t, 1.0) for t in tasks)
        return sum(weights.get(t, 1.0) * ratios[t] for t in tasks) / total
    if how == "worst":
        return worst_ratio(scores, weights, references) + WORST_TIE_BREAK * aggregate(scores, "normalized", weights,
                                                                                       references)
    raise ValueError(f"unknown aggregate {how!r}")


def worst_ratio(scores: dict[str, float], weights: dict[str, float], references: dict[str, float]) -> float:
    """The smallest score / reference over the tasks with weight > 0 (the table's `worst` column)."""
    ratios = [scores[t] / references[t] for t in scores if weights.get(t, 1.0) > 0 and not math.isnan(scores[t])]
    return min(ratios) if ratios else math.nan


def item_weights(how: str, references: dict[str, float]) -> dict[str, float]:
    """What one item's score is multiplied by in per-item reports (its share of `how`, up to a constant)."""
    return {task: 1.0 if how == "mean" else 1.0 / ref for task, ref in references.items()}


def check_references(references: dict[str, float], where: str) -> dict[str, float]:
    """Every reference must be > 0: a task no parent scores on (or none could be scored on) cannot be normalized."""
    for task, value in references.items():
        if not value > 0:
            why = "no parent could be scored" if math.isnan(value) else f"the best parent scores {value:g}"
            raise StudyError(f"task {task}: {why} on the search items, so its scores cannot be normalized: give the "
                             f"task a `reference:` (the score that counts as keeping the skill) or use objective: "
                             f"{{aggregate: mean}}", where)
    return references


# ---- the plain merges a user would try first ----------------------------------------------------------------
def plain_merges(merge_raw: dict) -> dict[str, list[dict]]:
    """label -> candidate configs (mergekit dicts) over the study's models; a label with several candidates is a
    grid whose best member (on the select half) is reported. Delta methods only when the study has a base."""
    models = [m["model"] if isinstance(m, dict) else m for m in merge_raw.get("models", [])]
    base = merge_raw.get("base_model")
    common = {"dtype": merge_raw["dtype"]} if merge_raw.get("dtype") else {}
    if base:
        models = [m for m in models if m != base]

    def entries(**params) -> list[dict]:
        return [{"model": m, "parameters": dict(params)} for m in models]

    out = {"linear (average)": [{"merge_method": "linear", **common, "models": entries(weight=1.0)}]}
    if not base:
        return out
    delta = {"base_model": base, **common}
    out["task arithmetic (w=1)"] = [{"merge_method": "task_arithmetic", **delta, "models": entries(weight=1.0)}]
    out["task arithmetic (best w in " + "/".join(f"{s:g}" for s in TA_SCALES) + ")"] = [
        {"merge_method": "task_arithmetic", **delta, "models": entries(weight=s)} for s in TA_SCALES]
    out["ties (defaults: w=1, d=1)"] = [{"merge_method": "ties", **delta, "models": entries(weight=1.0, density=1.0)}]
    out["ties (w=1, d=0.5)"] = [{"merge_method": "ties", **delta, "models": entries(weight=1.0, density=0.5)}]
    out["dare_ties (w=1, d=0.5)"] = [{"merge_method": "dare_ties", **delta, "models": entries(weight=1.0, density=0.5)}]
    return out


# ---- rows, halves, bootstrap --------------------------------------------------------------------------------
Items = dict[str, dict[str, float]]     # task -> item id -> score


@dataclass
class Candidate:
    """One row of the results table: its per-item held-out scores and where it came from."""

    label: str
    kind: str                             # "parent" | "plain" | "found" | "seed"
    items: Items
    trial: int | None = None
    search_score: float | None = None
    config: dict | None = None            # a plain merge's config (the chosen member of a grid)


@dataclass
class Scored:
    label: str
    kind: str
    trial: int | None
    scores: dict[str, float]              # per task, on the half
    value: float                          # the objective's aggregate
    mean: float
    normalized: float
    worst: float
    search_score: float | None = None
    extra: dict = field(default_factory=dict)


def score_half(candidate: Candidate, half: dict[str, set[str]], how: str, weights: dict[str, float],
               references: dict[str, float]) -> Scored:
    """A candidate's scores on one half of the held-out items (`half`: task -> item ids)."""
    scores = {t: statistics.fmean([candidate.items[t][i] for i in half[t]]) if half[t] else math.nan
              for t in candidate.items}
    return Scored(candidate.label, candidate.kind, candidate.trial, scores, aggregate(scores, how, weights, references),
                  aggregate(scores, "mean", weights, references), aggregate(scores, "normalized", weights, references),
                  worst_ratio(scores, weights, references), candidate.search_score)


def split_halves(items: Items, report: set[str]) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(select, report) item ids per task; `report`: the ids of the report half (evaluators.tasks.in_report_half).
    A task with too few held-out items for two halves uses all of them for both (the table says so)."""
    select_half, report_half = {}, {}
    for task, scores in items.items():
        ids = set(scores)
        r = ids & report
        s = ids - r
        select_half[task], report_half[task] = (s, r) if s and r else (ids, ids)
    return select_half, report_half


def bootstrap_gap(a: Candidate, b: Candidate, half: dict[str, set[str]], how: str, weights: dict[str, float],
                  references: dict[str, float], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
                  ) -> tuple[float, float, float]:
    """(gap, low, high): aggregate(a) - aggregate(b) on `half` and its 95% paired bootstrap interval. Items are
    resampled with replacement within each task, the same resample for both candidates (they were scored on the
    same items), so the interval reflects how much the margin depends on which items were drawn."""
    rng = random.Random(seed)
    ids = {t: sorted(half[t]) for t in half}

    def value(c: Candidate, sample: dict[str, list[str]]) -> float:
        scores = {t: statistics.fmean(c.items[t][i] for i in sample[t]) for t in sample}
        return aggregate(scores, how, weights, references)

    gap = value(a, ids) - value(b, ids)
    gaps = []
    for _ in range(resamples):
        sample = {t: [rng.choice(ids[t]) for _ in ids[t]] for t in ids}
        gaps.append(value(a, sample) - value(b, sample))
    gaps.sort()
    return gap, gaps[int(0.025 * resamples)], gaps[min(resamples - 1, int(0.975 * resamples))]


def results_table(candidates: list[Candidate], top: list[Candidate], how: str, weights: dict[str, float],
                  references: dict[str, float], report_ids: set[str], resamples: int = BOOTSTRAP_RESAMPLES) -> dict:
    """The final comparison: the winner among `top` (the best trials by search score) picked on the select half,
    every row (`candidates`: parents and plain merges; grids as several candidates with one label) scored on the
    report half, and the winner's margin over the best other row with a 95% paired bootstrap interval."""
    any_items = (top or candidates)[0].items
    select, report = split_halves(any_items, report_ids)
    on_select = {id(c): score_half(c, select, how, weights, references).value for c in candidates + top}
    winner = max(top, key=lambda c: (on_select[id(c)], -(c.trial or 0))) if top else None
    chosen: dict[str, Candidate] = {}
    for c in candidates:                      # a grid: its best member on the select half
        if c.label not in chosen or on_select[id(c)] > on_select[id(chosen[c.label])]:
            chosen[c.label] = c
    rows = [score_half(c, report, how, weights, references) for c in chosen.values()]
    for row in rows:
        if chosen[row.label].config is not None:
            row.extra["config"] = chosen[row.label].config
    out = {"aggregate": how, "references": references, "weights": weights,
           "items": {"select": {t: len(v) for t, v in select.items()}, "report": {t: len(v) for t, v in report.items()}},
           "halves_shared": any(select[t] == report[t] for t in select)}
    if winner is not None:
        found = score_half(winner, report, how, weights, references)
        found.extra["select_value"] = on_select[id(winner)]
        rows.append(found)
        others = [r for r in rows if r is not found]
        if others:
            runner_up = max(others, key=lambda r: r.value)
            gap, low, high = bootstrap_gap(winner, chosen[runner_up.label], report, how, weights, references,
                                           resamples)
            out["gap"] = {"vs": runner_up.label, "value": gap, "low": low, "high": high, "resamples": resamples,
                          "beats": low > 0}
        out["winner"] = winner.trial
    out["rows"] = [row.__dict__ for row in rows]
    return out
