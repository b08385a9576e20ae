"""Task specs and local JSONL task items: parsing, row validation, stable ids, subsets and the holdout split.

Knows nothing about models or tokenizers; never scores anything.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from evaluators import EvalError

LOCAL_KINDS = ("multiple_choice", "generate", "perplexity")
KINDS = (*LOCAL_KINDS, "lm_eval")
SPLITS = ("search", "holdout", "all", "select", "report")   # select + report: the two halves of holdout
MC_METRICS = ("acc", "acc_norm")
DEFAULT_METRIC = {"multiple_choice": "acc", "generate": "exact_match", "perplexity": "neg_nll"}


@dataclass(frozen=True)
class TaskSpec:
    """One task of a suite. Local kinds read `path` (JSONL); `lm_eval` runs the lm-eval task `task`.

    `limit` caps the items of each split (None: all); `metric` picks acc/acc_norm for multiple_choice
    or the lm-eval metric to report (default: the task's first metric). `chat_template`: format each prompt
    with the tokenizer's chat template as lm-eval's `apply_chat_template` does (a user turn, then the
    assistant's generation prompt), with `system` as a system turn (lm-eval's `system_instruction`).
    """

    name: str
    kind: str
    path: Path | None = None
    task: str | None = None
    include_path: Path | None = None
    limit: int | None = None
    weight: float = 1.0
    metric: str | None = None
    max_new_tokens: int = 32
    num_fewshot: int | None = None
    holdout_path: Path | None = None   # a separate held-out file: its items are the holdout split
    reference: float | None = None     # the score that counts as "kept the skill" (default: the best parent's)
    chat_template: bool = False        # prompts through the tokenizer's chat template (multiple_choice, generate, lm_eval)
    system: str | None = None          # a system turn; needs chat_template

    @classmethod
    def from_dict(cls, raw: Any, base_dir: Path | str = ".", where: str = "task") -> TaskSpec:
        """Validate a task mapping (e.g. one entry of a study's `evaluation.tasks`); relative paths
        resolve against `base_dir`. Raises EvalError naming the field."""
        if not isinstance(raw, dict):
            raise EvalError(f"a task must be a mapping, got {type(raw).__name__}", where)
        unknown = sorted(set(raw) - set(cls.__dataclass_fields__))
        if unknown:
            raise EvalError(f"unknown key(s) {', '.join(map(repr, unknown))}; allowed: "
                            f"{', '.join(cls.__dataclass_fields__)}", where)
        kind = raw.get("kind")
        if kind not in KINDS:
            raise EvalError(f"must be one of {', '.join(KINDS)}, got {kind!r}", f"{where}.kind")
        base_dir = Path(base_dir)
        path = _optional_path(raw, "path", base_dir, where)
        include_path = _optional_path(raw, "include_path", base_dir, where)
        holdout_path = _optional_path(raw, "holdout_path", base_dir, where)
        task = raw.get("task")
        if kind == "lm_eval":
            if not isinstance(task, str) or not task:
                raise EvalError("an lm_eval task needs `task: NAME`", f"{where}.task")
            if path is not None or holdout_path is not None:
                key = "path" if path is not None else "holdout_path"
                raise EvalError(f"lm_eval tasks take `task` (and `include_path`), not `{key}`", f"{where}.{key}")
        else:
            if path is None:
                raise EvalError(f"a {kind} task needs `path: FILE.jsonl`", f"{where}.path")
            for key in ("task", "include_path", "num_fewshot"):
                if raw.get(key) is not None:
                    raise EvalError(f"only lm_eval tasks take `{key}`", f"{where}.{key}")
        name = raw.get("name", task if kind == "lm_eval" else path.stem)
        if not isinstance(name, str) or not name:
            raise EvalError("must be a non-empty string", f"{where}.name")
        metric = raw.get("metric")
        if kind == "multiple_choice" and metric not in (None, *MC_METRICS):
            raise EvalError(f"must be one of {', '.join(MC_METRICS)}", f"{where}.metric")
        if kind in ("generate", "perplexity") and metric not in (None, DEFAULT_METRIC[kind]):
            raise EvalError(f"a {kind} task reports {DEFAULT_METRIC[kind]!r} only", f"{where}.metric")
        if metric is not None and not isinstance(metric, str):
            raise EvalError("must be a string", f"{where}.metric")
        chat = raw.get("chat_template", False)
        if not isinstance(chat, bool):
            raise EvalError(f"must be true or false, got {chat!r}", f"{where}.chat_template")
        if chat and kind == "perplexity":
            raise EvalError("a perplexity task scores raw text: it takes no chat template", f"{where}.chat_template")
        system = raw.get("system")
        if system is not None:
            if not isinstance(system, str) or not system:
                raise EvalError("must be a non-empty string", f"{where}.system")
            if not chat:
                raise EvalError("a system prompt needs `chat_template: true`", f"{where}.system")
        return cls(
            name=name, kind=kind, path=path, task=task, include_path=include_path,
            limit=_optional_int(raw, "limit", where, minimum=1),
            weight=_weight(raw.get("weight", 1.0), f"{where}.weight"),
            metric=metric if metric is not None else DEFAULT_METRIC.get(kind),
            max_new_tokens=_optional_int(raw, "max_new_tokens", where, minimum=1) or 32,
            num_fewshot=_optional_int(raw, "num_fewshot", where, minimum=0),
            holdout_path=holdout_path,
            reference=_reference(raw.get("reference"), f"{where}.reference"),
            chat_template=chat,
            system=system,
        )


@dataclass(frozen=True)
class EvaluationConfig:
    """The `evaluation:` block of a study/soup YAML: the tasks, the holdout fraction, the split seed, and whether
    the search skips the items every parent and the base score alike (`skip_uninformative`)."""

    tasks: list[TaskSpec]
    holdout: float = 0.0
    seed: int = 0
    skip_uninformative: bool = False

    @property
    def has_holdout(self) -> bool:
        """Whether a holdout split exists: a holdout fraction, or a task with its own holdout file."""
        return self.holdout > 0 or any(t.holdout_path is not None for t in self.tasks)


@dataclass(frozen=True)
class MultipleChoiceItem:
    id: str
    query: str
    choices: tuple[str, ...]
    gold: int


@dataclass(frozen=True)
class GenerateItem:
    id: str
    prompt: str
    target: str
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class PerplexityItem:
    id: str
    text: str


Item = MultipleChoiceItem | GenerateItem | PerplexityItem
T = TypeVar("T")


def parse_evaluation_block(block: Any, base_dir: Path | str = ".", where: str = "evaluation") -> EvaluationConfig:
    """Validate an `evaluation:` mapping {tasks: [...], holdout: 0.5, seed: 0, skip_uninformative: false}; raises
    EvalError naming the field."""
    if not isinstance(block, dict):
        raise EvalError("must be a mapping with `tasks:`", where)
    allowed = ("tasks", "holdout", "seed", "skip_uninformative")
    unknown = sorted(set(block) - set(allowed))
    if unknown:
        raise EvalError(f"unknown key(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(allowed)}", where)
    raw_tasks = block.get("tasks")
    if not isinstance(raw_tasks, list) or not raw_tasks:
        raise EvalError("must be a non-empty list of tasks", f"{where}.tasks")
    specs = [TaskSpec.from_dict(t, base_dir, f"{where}.tasks[{i}]") for i, t in enumerate(raw_tasks)]
    check_unique_names(specs, f"{where}.tasks")
    if sum(s.weight for s in specs) <= 0:
        raise EvalError("every task has weight 0: give at least one task a weight > 0", f"{where}.tasks")
    holdout = block.get("holdout", 0.0)
    if isinstance(holdout, bool) or not isinstance(holdout, int | float) or not 0.0 <= holdout < 1.0:
        raise EvalError(f"must be a fraction in [0, 1), got {holdout!r}", f"{where}.holdout")
    seed = block.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise EvalError(f"must be an integer, got {seed!r}", f"{where}.seed")
    skip = block.get("skip_uninformative", False)
    if not isinstance(skip, bool):
        raise EvalError(f"must be true or false, got {skip!r}", f"{where}.skip_uninformative")
    return EvaluationConfig(tasks=specs, holdout=float(holdout), seed=seed, skip_uninformative=skip)


def parse_task_arg(text: str, base_dir: Path | str = ".") -> TaskSpec:
    """A command-line task: `KIND:PATH[:LIMIT]` for local JSONL, or `lm_eval:NAME[:LIMIT]`."""
    kind, sep, rest = text.partition(":")
    if not sep or not rest:
        raise EvalError("expected KIND:PATH[:LIMIT] or lm_eval:NAME[:LIMIT]", f"--tasks {text}")
    raw: dict[str, Any] = {"kind": kind}
    head, sep, tail = rest.rpartition(":")
    if sep and tail.isdigit():
        raw["limit"], rest = int(tail), head
    raw["task" if kind == "lm_eval" else "path"] = rest
    return TaskSpec.from_dict(raw, base_dir, where=f"--tasks {text}")


def check_unique_names(specs: Sequence[TaskSpec], where: str) -> None:
    """Task names key results and objectives: they must be unique."""
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            raise EvalError(f"two tasks are named {spec.name!r}; give one a `name:`", where)
        seen.add(spec.name)


def load_items(spec: TaskSpec, path: Path | None = None) -> list[Item]:
    """Read and validate every row of a local task's JSONL (`path`, default the task's own file); raises
    EvalError with `file:LINE` on a bad row."""
    path = path or spec.path
    if spec.kind not in LOCAL_KINDS or path is None:
        raise EvalError(f"not a local JSONL task (kind {spec.kind})", spec.name)
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()   # a BOM (Windows editors) is not data
    except FileNotFoundError:
        raise EvalError("task file not found", str(path)) from None
    except (OSError, UnicodeDecodeError) as err:
        raise EvalError(f"cannot read task file: {err}", str(path)) from None
    items: list[Item] = []
    first_line: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        item = parse_row(spec.kind, _json_row(line, where), where)
        if item.id in first_line:
            raise EvalError(f"duplicate item id {item.id!r} (first on line {first_line[item.id]})", where)
        first_line[item.id] = number
        items.append(item)
    if not items:
        raise EvalError("task file has no items", str(path))
    return items


def parse_row(kind: str, row: dict, where: str) -> Item:
    """Validate one JSONL object of task `kind` into an item with a stable id."""
    if kind == "multiple_choice":
        query = _field(row, "query", str, where)
        choices = _field(row, "choices", list, where)
        if not choices:
            raise EvalError("`choices` is empty", where)
        for i, choice in enumerate(choices):
            if not isinstance(choice, str) or not choice:
                raise EvalError(f"choices[{i}] must be a non-empty string, got {choice!r}", where)
        gold = _field(row, "gold", int, where)
        if not 0 <= gold < len(choices):
            raise EvalError(f"`gold` {gold} is out of range for {len(choices)} choices", where)
        content = {"query": query, "choices": choices, "gold": gold}
        return MultipleChoiceItem(_item_id(row, content, where), query, tuple(choices), gold)
    if kind == "generate":
        prompt = _field(row, "prompt", str, where)
        if not prompt:
            raise EvalError("`prompt` is empty", where)
        target = _field(row, "target", str, where)
        stop = row.get("stop", [])
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise EvalError(f"`stop` must be a list of non-empty strings, got {stop!r}", where)
        content = {"prompt": prompt, "target": target, "stop": stop}
        return GenerateItem(_item_id(row, content, where), prompt, target, tuple(stop))
    if kind == "perplexity":
        text = _field(row, "text", str, where)
        if not text:
            raise EvalError("`text` is empty", where)
        return PerplexityItem(_item_id(row, {"text": text}, where), text)
    raise EvalError(f"unknown task kind {kind!r}", where)


def content_id(content: Any) -> str:
    """A stable id from an item's content (canonical JSON -> sha256 prefix): survives re-ordering the file."""
    canonical = json.dumps(content, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return "h" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def select_split(items: Sequence[T], ids: Iterable[str], *, split: str, holdout: float, seed: int,
                 limit: int | None) -> list[T]:
    """The items of `split` (search | holdout | all), at most `limit` per split, in a seeded stable order.

    Holdout membership depends only on (id, seed): an item's side never changes when the file grows or is
    re-ordered, and the two splits are disjoint. `limit` takes a seeded choice, nested in `limit`.
    """
    if split not in ("search", "holdout", "all"):
        raise EvalError(f"split must be search, holdout or all, got {split!r}")
    keyed = list(zip(ids, items, strict=True))
    sides = ("search", "holdout") if split == "all" else (split,)
    chosen: list[tuple[float, str, T]] = []
    for side in sides:
        pool = [(_unit_hash("order", seed, i), i, item) for i, item in keyed
                if (_unit_hash("holdout", seed, i) < holdout) == (side == "holdout")]
        pool.sort(key=lambda entry: entry[:2])
        chosen.extend(pool[:limit] if limit is not None else pool)
    chosen.sort(key=lambda entry: entry[:2])
    return [item for _, _, item in chosen]


def in_report_half(item_id: str, seed: int) -> bool:
    """Which half of the held-out items an item is in: `report` (True) or `select` (False). Stable in (id, seed).

    A search's winner is picked among its best trials on the select half and every result is reported on the
    report half, so that the score reported for the winner is not the score that picked it."""
    return _unit_hash("report", seed, item_id) < 0.5


def halves(positions: Sequence[T], ids: Sequence[str], seed: int) -> dict[str, list[T]]:
    """The select and report halves of a held-out split (its positions, with their item ids)."""
    report = [in_report_half(i, seed) for i in ids]
    return {"select": [p for p, r in zip(positions, report, strict=True) if not r],
            "report": [p for p, r in zip(positions, report, strict=True) if r]}


def _unit_hash(salt: str, seed: int, item_id: str) -> float:
    digest = hashlib.sha256(f"{salt}:{seed}:{item_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _item_id(row: dict, content: dict, where: str) -> str:
    if "id" not in row:
        return content_id(content)
    value = row["id"]
    if isinstance(value, bool) or not isinstance(value, str | int) or value == "":
        raise EvalError(f"`id` must be a non-empty string or an integer, got {value!r}", where)
    return str(value)


def _json_row(line: str, where: str) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise EvalError(f"bad JSON: {err.msg} (column {err.colno})", where) from None
    if not isinstance(row, dict):
        raise EvalError(f"each line must be a JSON object, got {type(row).__name__}", where)
    return row


def _field(row: dict, name: str, kind: type, where: str) -> Any:
    if name not in row:
        raise EvalError(f"missing field `{name}`", where)
    value = row[name]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise EvalError(f"`{name}` must be {kind.__name__}, got {type(value).__name__}", where)
    return value


def _optional_path(raw: dict, key: str, base_dir: Path, where: str) -> Path | None:
    value = raw.get(key)
    if value is None:
        return None
    if not isinstance(value, str | Path) or not str(value):
        raise EvalError("must be a path", f"{where}.{key}")
    path = Path(value).expanduser()
    return Path(os.path.normpath(path if path.is_absolute() else base_dir / path))


def _optional_int(raw: dict, key: str, where: str, minimum: int) -> int | None:
    value = raw.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise EvalError(f"must be an integer >= {minimum}, got {value!r}", f"{where}.{key}")
    return value


def _reference(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise EvalError(f"must be a number > 0 (the score that counts as keeping the skill), got {value!r}", where)
    return float(value)


def _weight(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise EvalError(f"must be a number >= 0, got {value!r}", where)
    return float(value)


__all__ = [
    "KINDS", "LOCAL_KINDS", "SPLITS", "EvaluationConfig", "GenerateItem", "Item", "MultipleChoiceItem",
    "PerplexityItem", "TaskSpec", "check_unique_names", "content_id", "load_items", "parse_evaluation_block",
    "parse_row", "parse_task_arg", "select_split",
]
