"""The lm-eval 0.4 bridge: tasks loaded once, run on the live in-memory model, per-item scores with stable ids.

Never loads a model from disk and never lets lm-eval read or write its request cache.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, redirect_stderr
from numbers import Number
from typing import Any

from evaluators import EvalError, NonFiniteError
from evaluators.tasks import TaskSpec, content_id

log = logging.getLogger(__name__)

FEWSHOT_SEED = 1234  # lm-eval's default fewshot_random_seed


def quiet_lm_eval() -> None:
    """Silence lm-eval's per-call info and warning logs (unless our own logging is at DEBUG)."""
    if log.isEnabledFor(logging.DEBUG):
        return
    for name in ("lm-eval", "lm_eval"):
        logging.getLogger(name).setLevel(logging.ERROR)


class LmEvalBridge:
    """Owns the lm-eval TaskManagers (one per include_path) and one HFLM around the live model.

    The HFLM is rebuilt only when a different model object is passed; lm-eval keeps nothing between
    calls, so weights written in place into the same model are seen by the next evaluation.
    """

    def __init__(self, tokenizer, *, batch_size: int = 32, autocast: bool = True):
        quiet_lm_eval()
        self.tokenizer, self.batch_size, self.autocast = tokenizer, batch_size, autocast
        self._managers: dict[tuple[str | None, bool], Any] = {}
        self._lm = None

    def load(self, spec: TaskSpec) -> LmEvalTask:
        """Load an lm-eval task (or group: its leaf tasks pooled) once; raises EvalError if unknown."""
        include = str(spec.include_path) if spec.include_path else None
        if include and not os.path.isdir(include):
            raise EvalError("include_path is not a folder", f"{spec.name}.include_path")
        loaded = None
        for defaults in ((False, True) if include else (True,)):
            try:
                loaded = self._manager(include, defaults).load([spec.task])
                break
            except KeyError:
                continue
            except Exception as err:  # datasets / YAML errors surface as many types
                raise EvalError(f"cannot load lm-eval task {spec.task!r}: {err}", spec.name) from err
        if loaded is None or not loaded["tasks"]:
            raise EvalError(f"lm-eval knows no task or group {spec.task!r}", spec.name)
        if spec.chat_template and not getattr(self.tokenizer, "chat_template", None):
            raise EvalError("the tokenizer has no chat template (chat_template: true needs one)", spec.name)
        return LmEvalTask(spec, loaded, self)

    def _manager(self, include: str | None, defaults: bool):
        key = (include, defaults)
        if key not in self._managers:
            from lm_eval.tasks import TaskManager

            self._managers[key] = TaskManager(include_path=include, include_defaults=defaults)
        return self._managers[key]

    def lm(self, model):
        """The HFLM wrapped around `model` (the same object between calls; never a copy)."""
        if self._lm is None or self._lm.model is not model:
            import torch
            from lm_eval.models.huggingface import HFLM

            param = next(model.parameters())
            amp = "bfloat16" if self.autocast and param.device.type == "cuda" and param.dtype == torch.float32 else None
            self._lm = HFLM(pretrained=model, tokenizer=self.tokenizer, batch_size=self.batch_size,
                            device=str(param.device), mixed_precision_dtype=amp)
        return self._lm


class LmEvalTask:
    """One lm-eval task (or a group's leaf tasks pooled) as a list of docs with stable ids.

    `score(model, which)` runs lm-eval's own evaluate() on the docs at positions `which` and returns each
    doc's value of `metric` (the task's first metric unless the spec names one; `metric,filter` picks a filter).
    With `chat_template` it runs as `lm_eval --apply_chat_template [--system_instruction ...]` does (few-shot
    examples as a multi-turn chat, that command's default with a chat template).
    """

    def __init__(self, spec: TaskSpec, loaded: dict, bridge: LmEvalBridge):
        self.name, self.bridge = spec.name, bridge
        self.chat = {"apply_chat_template": True, "fewshot_as_multiturn": True,
                     "system_instruction": spec.system} if spec.chat_template else {}
        self.tasks: dict[str, Any] = dict(loaded["tasks"])
        for task in self.tasks.values():
            _set_fewshot(task, spec.num_fewshot)
        self.metric, self.filter = _metric(spec, next(iter(self.tasks.values())))
        self.metrics = (self.metric,)
        self.docs: list[tuple[str, int]] = []
        self.ids: list[str] = []
        self._index_docs(pooled=len(self.tasks) > 1)

    def _index_docs(self, pooled: bool) -> None:
        seen: dict[str, int] = {}
        for task_name, task in self.tasks.items():
            try:
                docs = task.eval_docs
            except Exception as err:
                raise EvalError(f"cannot read the documents of {task_name!r}: {err}", self.name) from err
            for index, doc in enumerate(docs):
                base = _doc_id(doc)
                base = f"{task_name}/{base}" if pooled else base
                seen[base] = seen.get(base, 0) + 1
                self.ids.append(base if seen[base] == 1 else f"{base}#{seen[base]}")
                self.docs.append((task_name, index))
        if not self.docs:
            raise EvalError("the lm-eval task has no documents", self.name)

    def score(self, model, which: Sequence[int]) -> list[dict[str, float]]:
        """{metric: value} for each doc position in `which`, from lm-eval's logged samples."""
        from lm_eval import evaluator

        samples: dict[str, list[int]] = {}
        for task_name, index in sorted({self.docs[p] for p in which}):
            samples.setdefault(task_name, []).append(index)  # sorted: lm-eval 0.4 mislabels doc_ids otherwise
        task_dict = {"tasks": {t: self.tasks[t] for t in samples}, "groups": {}, "group_map": {}}  # no group
        for task in task_dict["tasks"].values():
            task.set_fewshot_seed(FEWSHOT_SEED)  # the same few-shot examples per doc in every call
        with _progress_bars_hidden():
            out = evaluator.evaluate(lm=self.bridge.lm(model), task_dict=task_dict, samples=samples,
                                     bootstrap_iters=0, log_samples=True, **self.chat)
        values: dict[tuple[str, int], float] = {}
        for task_name in samples:
            for sample in out["samples"][task_name]:  # one per doc and filter; default: the first filter
                key = (task_name, sample["doc_id"])
                if (sample.get("filter") == self.filter) if self.filter else key not in values:
                    values[key] = self._value(sample)
        try:
            return [{self.metric: values[self.docs[p]]} for p in which]
        except KeyError as err:
            raise EvalError(f"lm-eval returned no {self.metric!r} for doc {err.args[0]}", self.name) from None

    def _value(self, sample: dict) -> float:
        if not all(math.isfinite(x) for x in _floats(sample.get("filtered_resps"))):
            raise NonFiniteError("the model produced non-finite log-likelihoods (NaN/inf in its weights or "
                                 "activations)", self.name)
        value = sample.get(self.metric)
        if isinstance(value, bool) or not isinstance(value, Number):
            raise EvalError(f"metric {self.metric!r} has no per-item number (got {type(value).__name__}); "
                            f"pick one with `metric:`", self.name)
        return float(value)


def _floats(value: Any) -> list[float]:
    """The float log-likelihoods inside lm-eval's (nested) responses."""
    if isinstance(value, float):
        return [value]
    if isinstance(value, list | tuple):
        return [x for v in value for x in _floats(v)]
    return []


@contextmanager
def _progress_bars_hidden() -> Iterator[None]:
    """lm-eval draws tqdm bars on stderr for every call (it passes `disable=False` explicitly): hide them
    unless we log at DEBUG."""
    if log.isEnabledFor(logging.DEBUG):
        yield
        return
    with open(os.devnull, "w") as sink, redirect_stderr(sink):
        yield


def _set_fewshot(task, num_fewshot: int | None) -> None:
    """As simple_evaluate does: a task's own 0 wins; otherwise the spec's value, else its default, else 0."""
    default = task.get_config("num_fewshot")
    if num_fewshot is not None and default != 0:
        task.set_config(key="num_fewshot", value=num_fewshot)
    elif default is None:
        task.set_config(key="num_fewshot", value=0)


def _metric(spec: TaskSpec, task) -> tuple[str, str | None]:
    names = [m["metric"] for m in (task.config.metric_list or []) if isinstance(m.get("metric"), str)]
    names = names or list(getattr(task, "_metric_fn_list", {}))
    if not spec.metric:
        if not names:
            raise EvalError("the lm-eval task declares no metric; name one with `metric:`", spec.name)
        return names[0], None
    metric, _, filt = spec.metric.partition(",")
    if names and metric not in names:
        raise EvalError(f"task has no metric {metric!r}; it has {', '.join(names)}", f"{spec.name}.metric")
    return metric, filt or None


def _doc_id(doc: Any) -> str:
    """A doc's own `id` when it has a scalar one, else a hash of its content: survives re-ordering."""
    if isinstance(doc, dict):
        value = doc.get("id")
        if isinstance(value, str | int) and not isinstance(value, bool) and value != "":
            return str(value)
        return content_id(doc)
    return content_id(repr(doc))


__all__ = ["LmEvalBridge", "LmEvalTask", "quiet_lm_eval"]
