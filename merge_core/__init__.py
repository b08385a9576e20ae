"""merge_core: a mergekit-compatible config -> merged tensors, on disk or in a live model.

Owns parsing, parameter resolution, merge methods, source loading, the in-memory
engine and the writer. Knows nothing of Optuna or evaluation.
"""

from merge_core.errors import MergeConfigError

__all__ = ["MergeConfigError"]
