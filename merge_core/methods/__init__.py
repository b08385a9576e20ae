"""The merge methods: one module per family, each method declared once with `@merge_method` (its typed signature
is the schema). Importing this package registers them all; INDEX says where each one lives.
"""

from merge_core.errors import MergeConfigError
from merge_core.methods import (  # noqa: F401 - importing a module registers its methods
    arcee_fusion,
    karcher,
    linear,
    model_stock,
    multislerp,
    nearswap,
    nuslerp,
    passthrough,
    ram,
    sce,
    slerp,
    task_arithmetic,
)
from merge_core.methods.base import (
    REGISTRY,
    MergeMethod,
    Param,
    PerModel,
    Range,
    TensorInputs,
    describe_param,
    merge_method,
    register,
)

INDEX = {  # method name (mergekit's) -> module of merge_core.methods that declares it
    "linear": "linear", "slerp": "slerp", "nuslerp": "nuslerp", "multislerp": "multislerp", "karcher": "karcher",
    "task_arithmetic": "task_arithmetic", "ties": "task_arithmetic", "dare_ties": "task_arithmetic",
    "dare_linear": "task_arithmetic", "breadcrumbs": "task_arithmetic", "breadcrumbs_ties": "task_arithmetic",
    "della": "task_arithmetic", "della_linear": "task_arithmetic", "ram": "ram", "ramplus_tl": "ram",
    "model_stock": "model_stock", "nearswap": "nearswap", "arcee_fusion": "arcee_fusion", "sce": "sce",
    "passthrough": "passthrough",
}


def get_method(name: str) -> MergeMethod:
    """The registered method `name`, or a MergeConfigError listing the known ones."""
    try:
        return REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(REGISTRY))
        raise MergeConfigError(f"unknown merge method {name!r} (known: {known})", "merge_method") from None


__all__ = ["INDEX", "REGISTRY", "MergeMethod", "Param", "PerModel", "Range", "TensorInputs", "describe_param",
           "get_method", "merge_method", "register"]
