"""The merge-method registry: importing this package registers every method (one module per family)."""

from merge_core.methods.base import (REGISTRY, MergeMethod, Param, TensorInputs, describe_param, get_method,
                                     register)
from merge_core.methods import (  # noqa: F401,E402 - each module registers its methods
    arcee_fusion,
    linear,
    model_stock,
    multislerp,
    nearswap,
    passthrough,
    ram,
    sce,
    slerp,
    task_arithmetic,
)

__all__ = ["REGISTRY", "MergeMethod", "Param", "TensorInputs", "describe_param", "get_method", "register"]
