"""Parameter settings -> one value per tensor: gradients, filters and the fallback chain, as mergekit 0.1.5.

Pure functions over already-validated settings (merge_core.config); no tensors, no file access.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from merge_core.config import FilteredValue, Scalar, Setting
from merge_core.errors import MergeConfigError
from merge_core.methods.base import Param


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def interpolate(values: tuple[Scalar, ...], t: float) -> Scalar:
    """A gradient at position t in [0, 1]: s = t * (m - 1), linear between entries floor(s) and floor(s) + 1.

    Non-numeric gradients (booleans, strings) select entry int(s) instead.
    """
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    if not (_is_number(values[i0]) and _is_number(values[i1])):   # parsed gradients hold one type
        return values[i0]
    frac = scaled - i0
    return (1 - frac) * values[i0] + frac * values[i1]


def resolve_setting(setting: Setting, tensor_name: str, t: float) -> Scalar | None:
    """The value of one setting for `tensor_name` at gradient position `t`, or None when no filter matches.

    A filter list is searched in order: the first entry whose `filter` text occurs in the tensor name
    wins; an entry without filter (or `*`) matches any tensor.
    """
    if not isinstance(setting, tuple):
        return setting
    if not setting:
        return None
    if isinstance(setting[0], FilteredValue):
        for entry in setting:
            if entry.filter is None or entry.filter == "*" or (tensor_name and entry.filter in tensor_name):
                return resolve_setting(entry.value, tensor_name, t)
        return None
    return interpolate(setting, t)


def resolve_param(name: str, spec: Param, scopes: Iterable[Mapping[str, Setting] | None], tensor_name: str,
                  t: float) -> Any:
    """The value of parameter `name`: the first scope (highest precedence first) that yields one, else the default.

    Raises MergeConfigError when a required parameter has no value for this tensor.
    """
    for scope in scopes:
        if scope and name in scope:
            value = resolve_setting(scope[name], tensor_name, t)
            if value is not None:
                if spec.kind is int and not isinstance(value, int):
                    if value != int(value):
                        raise MergeConfigError(f"{name} resolves to {value}, not an integer, for {tensor_name}",
                                               name)
                    value = int(value)
                return value
    if spec.required:
        raise MergeConfigError(f"missing required parameter {name!r} for tensor {tensor_name}", name)
    return spec.default


def resolve_params(specs: Mapping[str, Param], scopes: tuple[Mapping[str, Setting] | None, ...], tensor_name: str,
                   t: float) -> dict[str, Any]:
    """Every parameter in `specs` resolved through the same chain of scopes."""
    return {name: resolve_param(name, spec, scopes, tensor_name, t) for name, spec in specs.items()}
