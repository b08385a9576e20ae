"""One trial: genome -> merge config -> materialize in place -> staged evaluation -> value(s).

Owns the per-worker resident engine and suite, pruning reports, and turning numerical faults,
out-of-memory and evaluator errors into FAILED trials with a reason. Writes no files.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time

import optuna
import torch

from evaluators import EvalError
from evaluators.suite import Suite
from evaluators.tasks import LOCAL_KINDS, load_items
from merge_core import MergeConfigError
from merge_core.config import dump_config
from merge_core.engine import MergeEngine, NonFiniteMerge
from merge_core.prepare import load_tokenizer, prepare
from search.compare import aggregate, check_references, item_weights
from search.space import SearchSpace
from search.study import StudyConfig

log = logging.getLogger(__name__)


class Interrupted(Exception):
    """The user asked the search to stop (SIGINT/SIGTERM) while a trial was running."""


class TrialFault(Exception):
    """A candidate that cannot be scored (NaN/inf weights or loss, out of memory, evaluator error)."""


def fault_reason(err: BaseException) -> str | None:
    """A one-line reason when `err` is a fault of the candidate (the study goes on), else None."""
    if isinstance(err, NonFiniteMerge):
        return f"non-finite merge: {err}"
    if isinstance(err, MergeConfigError):
        # The engine was built from this study's merge, so within a trial only the candidate's values can
        # be at fault (e.g. della's density + epsilon >= 1): this candidate fails, the study goes on.
        return f"invalid merge parameters: {err}"
    if isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower():
        return f"out of memory: {str(err).splitlines()[0][:200]}"
    if isinstance(err, EvalError):
        return f"evaluation error: {err}"
    if isinstance(err, TrialFault):
        return str(err)
    return None


def check_inputs(study: StudyConfig, space: SearchSpace, device: str | None = None, tokenize: bool = False):
    """The cheap half of building a TrialRunner, run before the storage or output_dir is touched: the device
    exists, every model folder opens (safetensors headers only) and agrees with the others, every local task
    file parses; with `tokenize`, the suite is built too (tokenizer, lm-eval tasks, splits) and returned.
    Raises the same one-line user errors (MergeConfigError, EvalError) the runner would."""
    config = space.config(space.constant(space.default_values()))
    prepared = prepare(config, device or study.device, study.allow_pickle)
    for spec in study.evaluation.tasks:
        if spec.kind in LOCAL_KINDS:
            load_items(spec)
            if spec.holdout_path is not None:
                load_items(spec, spec.holdout_path)
    if not tokenize:
        return None
    return Suite.from_config(study.evaluation, load_tokenizer(prepared.tokenizer_folder()))


class TrialRunner:
    """A worker's resident merge engine and evaluation suite; runs trials and re-evaluations.

    `references` (task -> score): what a task's score is normalized by (the objective's aggregate); None until
    `measure_references` or the study's stored ones set it. `known_items` ({task: {item id: value}}): search
    items every trial counts with these values instead of scoring them (`evaluation.skip_uninformative`)."""

    def __init__(self, study: StudyConfig, space: SearchSpace, device: str | None = None,
                 stop: threading.Event | None = None, references: dict[str, float] | None = None,
                 known_items: dict[str, dict[str, float]] | None = None):
        self.study = study
        self.space = space
        self.stop = stop or threading.Event()
        self.references = references
        self.known_items = known_items
        self._parent_results: list = []     # what measure_references scored: (label, SuiteResult or reason)
        t0 = time.perf_counter()
        first = space.config(space.constant(space.default_values()))
        self.engine = MergeEngine(first, device=device or study.device, seed=study.seed,
                                  allow_pickle=study.allow_pickle)
        self.suite = Suite.from_config(study.evaluation, self.engine.tokenizer, device=self.engine.device)
        self.weights = {spec.name: spec.weight for spec in study.evaluation.tasks}
        self.setup_seconds = time.perf_counter() - t0

    # ---- evaluation -----------------------------------------------------------------------------
    def evaluate(self, config, split: str = "search", callback=None, chunk_size: int | None = None):
        """Materialize `config` and score it on `split`; returns (SuiteResult, merge_s, eval_s)."""
        t0 = time.perf_counter()
        model = self.engine.materialize(config, check_finite=True)
        t1 = time.perf_counter()
        known = self.known_items if split == "search" else None
        result = self.suite.evaluate(model, split=split, callback=callback, chunk_size=chunk_size, known=known)
        t2 = time.perf_counter()
        bad = [task.name for task in result.tasks if not math.isfinite(task.score)]
        if bad:
            raise TrialFault(f"non-finite score on task {bad[0]} (NaN/inf loss)")
        return result, t1 - t0, t2 - t1

    def value(self, scores: dict[str, float]) -> float:
        """The study's objective from per-task scores (its aggregate over the references)."""
        return aggregate(scores, self.study.aggregate, self.weights, self.references)

    def measure_references(self) -> dict[str, float]:
        """Per task, the best parent's score on the search items: each searched model alone (its parent seed genome,
        merged by this engine), or, where the space cannot express a parent, the model itself. A parent that
        cannot be scored (NaN/inf, out of memory) is left out with a warning; a task no parent could be scored
        on gets NaN (check_references then asks for a `reference:`)."""
        best = {spec.name: math.nan for spec in self.study.evaluation.tasks}
        self._parent_results = self._parent_scores()
        for label, result in self._parent_results:
            if isinstance(result, str):
                log.warning("reference: parent %s cannot be scored (%s); left out", label, result)
                continue
            for task in result.tasks:
                best[task.name] = task.score if math.isnan(best[task.name]) else max(best[task.name], task.score)
        return best

    def uninformative_items(self) -> dict[str, dict[str, float]]:
        """{task: {item id: value}}: the search items on which every parent and the base (each alone) score the
        same value. They cannot tell merges of these models apart, as far as the models themselves show, so the
        search counts them with that value instead of scoring them (`evaluation.skip_uninformative`). Uses the
        parents `measure_references` scored, plus the base; nothing when some model could not be scored."""
        results = list(self._parent_results or self._parent_scores())
        base = self.space.base_ref
        base_scored = base in self.space.parent_refs() or any(label == "base" for label, _ in results)
        if base is not None and not base_scored:
            results.append(("base", self._alone_result(self.space.alone_config(base))))
        if len(results) < 2 or any(isinstance(result, str) for _, result in results):
            return {}
        out: dict[str, dict[str, float]] = {}
        for spec in self.study.evaluation.tasks:
            tables = [result.task(spec.name).per_item for _, result in results]
            out[spec.name] = {item: value for item, value in tables[0].items()
                              if all(table.get(item) == value for table in tables[1:])}
        return out

    def _parent_scores(self) -> list[tuple[str, object]]:
        """(label, SuiteResult on the search items, or why it could not be scored) of each parent alone."""
        parents = self.space.parent_genomes()
        if parents is not None:
            return [(label, self._scored(lambda g=genome: self.evaluate(self.space.config(g), "search")[0]))
                    for label, genome in parents]
        return [(self.space.model_refs[m], self._alone_result(self.space.parent_config(m)))
                for m in self.space.searched_models]

    def _alone_result(self, alone):
        """One model alone, on the search items (every one of them), through a small engine of its own."""
        engine = MergeEngine(alone, device=self.engine.device, allow_pickle=self.study.allow_pickle)
        return self._scored(lambda: self.suite.evaluate(engine.materialize(alone, check_finite=True), "search"))

    @staticmethod
    def _scored(evaluate):
        """The SuiteResult of `evaluate()`, or why the candidate could not be scored."""
        try:
            return evaluate()
        except Exception as err:  # noqa: BLE001 - faults of a candidate; anything else propagates
            reason = fault_reason(err)
            if reason is None:
                raise
            return reason

    # ---- one trial ------------------------------------------------------------------------------
    def __call__(self, trial: optuna.Trial):
        genome = {g.name: trial.suggest_float(g.name, g.low, g.high) for g in self.space.genes}
        config = self.space.config(genome)
        # As written in the study (paths relative to its YAML): exports rebase them, so a moved run still exports.
        trial.set_user_attr("config", dump_config(config))
        result, merge_s, eval_s = self.evaluate(config, "search", self._reporter(trial), self.study.pruner.every)
        scores = {t.name: t.score for t in result.tasks}
        trial.set_user_attr("scores", scores)
        trial.set_user_attr("score", self.value(scores))
        trial.set_user_attr("merge_s", round(merge_s, 4))
        trial.set_user_attr("eval_s", round(eval_s, 4))
        trial.set_user_attr("n_items", sum(t.n for t in result.tasks))
        if self.study.multi_objective:
            return list(result.objectives)
        return self.value(scores)

    def _reporter(self, trial: optuna.Trial):
        """The staged-evaluation callback, once per chunk (`pruner.every` items of one task, the tasks taking
        turns): honour a stop request, report to the pruner (one storage write a chunk), prune.

        Chunk k of task t reports at step k * tasks + t: the same items in every trial, steps increasing in the
        round-robin order. Wilcoxon sees the chunk's mean item score weighted as in the objective (item /
        reference for normalized and worst; see store.WilcoxonPruner); the other pruners see the objective over
        everything scored so far."""
        paired = self.study.pruner.name == "wilcoxon"
        prunes = self.study.pruner.name != "none" and not self.study.multi_objective
        per_item = item_weights(self.study.aggregate, self.references or {})
        # Seed trials (each parent, the uniform merge, ...) are the reference rows of every table: they report,
        # so the pruner can compare against them, but are never pruned themselves (a specialist parent scores
        # ~0 on the other tasks and would be pruned on its first items).
        may_prune = "seed" not in trial.user_attrs
        tasks = [spec.name for spec in self.study.evaluation.tasks]
        chunks = {name: itertools.count() for name in tasks}

        def report(progress) -> None:
            if self.stop.is_set():
                raise Interrupted("stopped by the user")
            step = next(chunks[progress.task]) * len(tasks) + tasks.index(progress.task)   # chunk k of task t
            if not prunes:
                return
            if paired:
                weight = per_item.get(progress.task, 1.0)
                value = weight * sum(score for _, score in progress.new) / len(progress.new)
            else:
                value = self.value({t.name: t.score for t in progress.result.tasks if t.n})
            trial.report(value, step)
            if may_prune and trial.should_prune():
                raise optuna.TrialPruned(f"pruned after {progress.done} of {progress.total} items")

        return report


# ---- the references of the objective ---------------------------------------------------------------------
REFERENCES_ATTR = "references"     # {"measured": {task: best parent's search score},
                                   #  "uninformative": {task: {item id: value}} with skip_uninformative}


def ensure_references(study: optuna.Study, study_cfg: StudyConfig, make_runner) -> dict[str, float]:
    """The objective's per-task references, measured once per study on the search items (the best parent's score
    per task) and stored with it, so that a resumed search and every worker use the same ones; with
    `evaluation.skip_uninformative`, the items every parent and the base score alike, found at the same time."""
    if REFERENCES_ATTR not in study.user_attrs:
        runner = make_runner()
        measured = {"measured": runner.measure_references()}
        if study_cfg.evaluation.skip_uninformative:
            measured["uninformative"] = runner.uninformative_items()
        study.set_user_attr(REFERENCES_ATTR, measured)
    elif study_cfg.evaluation.skip_uninformative and "uninformative" not in study.user_attrs[REFERENCES_ATTR]:
        log.warning("evaluation.skip_uninformative applies from a study's first trial; this study began without it "
                    "and goes on scoring every item (start a new study to use it)")
    return references_of(study, study_cfg)


def known_items_of(study: optuna.Study, study_cfg: StudyConfig) -> dict[str, dict[str, float]] | None:
    """The search items trials count without scoring (evaluation.skip_uninformative), or None."""
    if not study_cfg.evaluation.skip_uninformative:
        return None
    return (study.user_attrs.get(REFERENCES_ATTR) or {}).get("uninformative")


def references_of(study: optuna.Study, study_cfg: StudyConfig) -> dict[str, float]:
    """The references in use: a task's own `reference:` where given, else the measured one."""
    measured = (study.user_attrs.get(REFERENCES_ATTR) or {}).get("measured", {})
    used = {spec.name: spec.reference if spec.reference is not None else measured.get(spec.name, math.nan)
            for spec in study_cfg.evaluation.tasks}
    return check_references(used, study_cfg.path.name) if study_cfg.aggregate != "mean" else used


