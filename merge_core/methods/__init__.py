"""The merge-method registry: importing this package registers every method (one module per family)."""

from merge_core.methods.base import REGISTRY, MergeMethod, Param, TensorInputs, get_method, register

__all__ = ["REGISTRY", "MergeMethod", "Param", "TensorInputs", "get_method", "register"]
