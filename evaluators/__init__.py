"""evaluators: a live model -> per-item scores on local JSONL or lm-eval tasks.

Owns task loading, subsets and splits, native scoring and the lm-eval bridge.
Never merges weights.
"""


class EvalError(ValueError):
    """A bad task file, task spec or evaluation failure, named by `where` (file:line or field)."""

    def __init__(self, message: str, where: str | None = None):
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)


class NonFiniteError(EvalError):
    """The model produced NaN/inf log-likelihoods (a broken merge): the trial has no valid score."""


__all__ = ["EvalError", "NonFiniteError"]

from evaluators.suite import Progress, Suite, SuiteResult, TaskResult  # noqa: E402  (after EvalError: they import it)
from evaluators.tasks import EvaluationConfig, TaskSpec, parse_evaluation_block  # noqa: E402

__all__ += ["EvaluationConfig", "Progress", "Suite", "SuiteResult", "TaskResult", "TaskSpec", "parse_evaluation_block"]
