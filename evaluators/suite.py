"""A weighted suite of tasks built once per worker: per-item scores on a split, staged in chunks, one score or a vector.

Scores whatever live model it is handed; never loads, merges, moves or copies weights, and never imports optuna.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from evaluators import EvalError
from evaluators.native import make_scorer
from evaluators.tasks import SPLITS, halves, EvaluationConfig, TaskSpec, check_unique_names, load_items, select_split

log = logging.getLogger(__name__)


@dataclass
class TaskResult:
    """One task's score on a split: the mean of its per-item `metric` values (higher is better)."""

    name: str
    kind: str
    metric: str
    score: float
    stderr: float
    n: int
    per_item: dict[str, float]
    seconds: float = 0.0

    @classmethod
    def from_items(cls, name: str, kind: str, metric: str, per_item: dict[str, float],
                   seconds: float = 0.0) -> TaskResult:
        values = list(per_item.values())
        score = statistics.fmean(values) if values else math.nan
        stderr = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan
        return cls(name, kind, metric, score, stderr, len(values), dict(per_item), seconds)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "metric": self.metric, "score": _json_float(self.score),
                "stderr": _json_float(self.stderr), "n": self.n, "seconds": round(self.seconds, 4),
                "per_item": {k: _json_float(v) for k, v in self.per_item.items()}}


@dataclass
class SuiteResult:
    """Per-task results on one split; `score` is their weighted mean, `objectives` one score per task."""

    split: str
    tasks: list[TaskResult]
    weights: dict[str, float] = field(default_factory=dict)

    @property
    def score(self) -> float:
        """Weighted mean of the scored tasks' scores (NaN until some task has items)."""
        scored = [(self.weights.get(t.name, 1.0), t.score) for t in self.tasks if t.n]
        total = sum(w for w, _ in scored)
        return sum(w * s for w, s in scored) / total if total > 0 else math.nan

    @property
    def objectives(self) -> list[float]:
        """One score per task, in suite order (all higher-is-better), for multi-objective search."""
        return [t.score for t in self.tasks]

    def task(self, name: str) -> TaskResult:
        for result in self.tasks:
            if result.name == name:
                return result
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {"split": self.split, "score": _json_float(self.score),
                "objectives": [_json_float(v) for v in self.objectives],
                "weights": dict(self.weights), "tasks": [t.to_dict() for t in self.tasks]}


@dataclass(frozen=True)
class Progress:
    """What a staged-evaluation callback receives after each chunk.

    `new`: (step, score) for each item just scored, where `step` is the item's stable index in the suite
    split (the same item has the same step in every trial); `result`: the running partial SuiteResult.
    """

    new: list[tuple[int, float]]
    result: SuiteResult
    task: str
    done: int
    total: int


Callback = Callable[[Progress], None]


@dataclass
class _Task:
    spec: TaskSpec
    scorer: Any               # native.*Scorer or lm_eval_adapter.LmEvalTask: .score(model, which) -> [dict]
    metric: str
    ids: list[str]
    splits: dict[str, list[int]]


class Suite:
    """Tasks loaded, validated and tokenized once; `evaluate(model)` scores the live model on a split.

    Native tasks batch `batch_size` items per forward, lm-eval tasks `batch_size` requests. `device`: where
    the live model must be (None/"auto": wherever it is; it is never moved). `autocast`: bf16 autocast on
    CUDA for float32 weights, native and lm-eval alike. A model that produces NaN/inf log-likelihoods raises
    NonFiniteError (an EvalError): such a trial has no valid score.
    """

    def __init__(self, specs: Sequence[TaskSpec], tokenizer, *, holdout: float = 0.0, seed: int = 0,
                 device: str | None = None, batch_size: int = 32, autocast: bool = True):
        if not specs:
            raise EvalError("a suite needs at least one task")
        if not 0.0 <= holdout < 1.0:
            raise EvalError(f"holdout must be a fraction in [0, 1), got {holdout}")
        if batch_size < 1:
            raise EvalError(f"batch size must be >= 1, got {batch_size}")
        check_unique_names(specs, "tasks")
        if sum(s.weight for s in specs) <= 0:
            raise EvalError("at least one task needs a weight > 0", "tasks")
        self.holdout, self.seed, self.device = holdout, seed, device
        self.has_holdout = holdout > 0 or any(s.holdout_path is not None for s in specs)
        self._bridge = None
        self._tasks = [self._load(spec, tokenizer, batch_size, autocast) for spec in specs]
        for task in self._tasks:
            for split in ("search", "holdout") if self.has_holdout else ("search",):
                if not task.splits[split]:
                    raise EvalError(f"no items fall in the {split} split ({len(task.ids)} items, holdout "
                                    f"{holdout}): add items or change holdout", task.spec.name)

    @classmethod
    def from_config(cls, config: EvaluationConfig, tokenizer, **kwargs: Any) -> Suite:
        """A suite from a parsed `evaluation:` block (see tasks.parse_evaluation_block)."""
        return cls(config.tasks, tokenizer, holdout=config.holdout, seed=config.seed, **kwargs)

    def _load(self, spec: TaskSpec, tokenizer, batch_size: int, autocast: bool) -> _Task:
        started = time.perf_counter()
        if spec.kind == "lm_eval":
            if self._bridge is None:
                from evaluators.lm_eval_adapter import LmEvalBridge   # lm-eval: seconds to import; only for its tasks

                self._bridge = LmEvalBridge(tokenizer, batch_size=batch_size, autocast=autocast)
            scorer = self._bridge.load(spec)
            ids, metric = scorer.ids, scorer.metric
        else:
            items = load_items(spec)
            held = load_items(spec, spec.holdout_path) if spec.holdout_path is not None else []
            both = {item.id for item in items} & {item.id for item in held}
            if both:
                raise EvalError(f"item id {sorted(both)[0]!r} is in both the task file and its holdout file",
                                str(spec.holdout_path))
            scorer = make_scorer(spec.kind, items + held, tokenizer, name=spec.name, batch_size=batch_size,
                                 max_new_tokens=spec.max_new_tokens, autocast=autocast,
                                 chat_template=spec.chat_template, system=spec.system)
            ids, metric = [item.id for item in items + held], spec.metric
            if held:
                return _Task(spec, scorer, metric, ids, self._file_splits(ids, len(items), spec.limit))
        positions = list(range(len(ids)))
        splits = {split: select_split(positions, ids, split=split, holdout=self.holdout, seed=self.seed,
                                      limit=spec.limit) for split in ("search", "holdout", "all")}
        splits.update(halves(splits["holdout"], [ids[p] for p in splits["holdout"]], self.seed))
        log.info("task %s: %d items (search %d, holdout %d) ready in %.2fs", spec.name, len(ids),
                 len(splits["search"]), len(splits["holdout"]), time.perf_counter() - started)
        return _Task(spec, scorer, metric, ids, splits)

    def _file_splits(self, ids: list[str], n_search: int, limit: int | None) -> dict[str, list[int]]:
        """Splits of a task with a holdout file: the first n_search items search, the rest holdout."""
        def pick(lo: int, hi: int) -> list[int]:
            return select_split(list(range(lo, hi)), ids[lo:hi], split="search", holdout=0.0, seed=self.seed,
                                limit=limit)

        search, holdout = pick(0, n_search), pick(n_search, len(ids))
        return {"search": search, "holdout": holdout, "all": sorted(search + holdout),
                **halves(holdout, [ids[p] for p in holdout], self.seed)}

    @property
    def specs(self) -> list[TaskSpec]:
        return [t.spec for t in self._tasks]

    def steps(self, split: str = "search") -> list[tuple[int, str, str]]:
        """(step, task name, item id) for every item of `split`, in step order; stable across trials."""
        self._check_split(split)
        out, step = [], 0
        for task in self._tasks:
            for position in task.splits[split]:
                out.append((step, task.spec.name, task.ids[position]))
                step += 1
        return out

    def counts(self) -> dict[str, dict[str, int]]:
        """Items per task and split: {task: {"search": n, "holdout": n}}."""
        return {t.spec.name: {split: len(t.splits[split]) for split in ("search", "holdout")} for t in self._tasks}

    def size(self, split: str = "search") -> int:
        """Number of items evaluated on `split`."""
        self._check_split(split)
        return sum(len(t.splits[split]) for t in self._tasks)

    def evaluate(self, model, split: str = "search", callback: Callback | None = None,
                 chunk_size: int | None = None, known: dict[str, dict[str, float]] | None = None) -> SuiteResult:
        """Score `model` (as it is now) on `split`. Items are scored in chunks of `chunk_size` per task, the
        tasks taking turns; after each chunk `callback(Progress)` runs, and whatever it raises (e.g. a pruning
        signal) propagates out unchanged. Without chunk_size each task is one chunk.
        `known` ({task: {item id: value}}): items not scored but counted with these values (in every partial
        result too); the steps of the scored items are then their indices among the scored ones."""
        self._check_split(split)
        self._check_device(model)
        empty = [t.spec.name for t in self._tasks if not t.splits[split]]
        if empty:
            raise EvalError(f"no items in the {split} split for task(s) {', '.join(empty)}"
                            + (" (holdout is 0)" if split == "holdout" and not self.has_holdout else ""))
        if chunk_size is not None and chunk_size < 1:
            raise EvalError(f"chunk size must be >= 1, got {chunk_size}")
        known = {t.spec.name: {t.ids[p]: known[t.spec.name][t.ids[p]] for p in t.splits[split]
                               if t.ids[p] in known.get(t.spec.name, {})} for t in self._tasks} if known else {}
        per_item: dict[str, dict[str, float]] = {t.spec.name: dict(known.get(t.spec.name, {})) for t in self._tasks}
        seconds = {t.spec.name: 0.0 for t in self._tasks}
        schedule = self._schedule(split, chunk_size, known)
        total, done = sum(len(chunk) for _, _, chunk in schedule), 0
        for task, first_step, chunk in schedule:
            started = time.perf_counter()
            values = [scores[task.metric] for scores in task.scorer.score(model, chunk)]
            seconds[task.spec.name] += time.perf_counter() - started
            new = []
            for offset, (position, value) in enumerate(zip(chunk, values, strict=True)):
                per_item[task.spec.name][task.ids[position]] = value
                new.append((first_step + offset, value))
            done += len(chunk)
            if callback is not None:
                callback(Progress(new, self._result(split, per_item, seconds), task.spec.name, done, total))
        return self._result(split, per_item, seconds)

    def _schedule(self, split: str, chunk_size: int | None, known: dict[str, dict[str, float]]
                  ) -> list[tuple[_Task, int, list[int]]]:
        """(task, step of the chunk's first item, item positions): round-robin over tasks, chunk by chunk; the
        `known` items left out."""
        per_task, offset = [], 0
        for task in self._tasks:
            skip = known.get(task.spec.name, {})
            positions = [p for p in task.splits[split] if task.ids[p] not in skip]
            if not positions:
                continue
            size = chunk_size or len(positions)
            per_task.append([(task, offset + start, positions[start:start + size])
                             for start in range(0, len(positions), size)])
            offset += len(positions)
        rounds = max((len(chunks) for chunks in per_task), default=0)
        return [chunks[r] for r in range(rounds) for chunks in per_task if r < len(chunks)]

    def _result(self, split: str, per_item: dict[str, dict[str, float]], seconds: dict[str, float]) -> SuiteResult:
        tasks = [TaskResult.from_items(t.spec.name, t.spec.kind, t.metric, per_item[t.spec.name],
                                       seconds[t.spec.name]) for t in self._tasks]
        return SuiteResult(split, tasks, {t.spec.name: t.spec.weight for t in self._tasks})

    def _check_split(self, split: str) -> None:
        if split not in SPLITS:
            raise EvalError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")

    def _check_device(self, model) -> None:
        """Evaluators never move the live model: a suite built for one device refuses a model on another."""
        if self.device in (None, "auto"):
            return
        actual, wanted = next(model.parameters()).device, torch.device(self.device)
        if actual.type != wanted.type or (wanted.index is not None and actual.index != wanted.index):
            raise EvalError(f"the model is on {actual} but the suite was built for {self.device}", "device")


def _json_float(value: float) -> float | None:
    return value if math.isfinite(value) else None


__all__ = ["Callback", "Progress", "Suite", "SuiteResult", "TaskResult"]
