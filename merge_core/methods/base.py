"""What every merge method sees and declares: the inputs of one output tensor, parameter specs, the registry.

Methods are pure functions over `TensorInputs`; they never read files or know about trials.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch

from merge_core.errors import MergeConfigError


class TensorInputs:
    """The source tensors of one output tensor, in merge order, plus a memo for trial-independent statistics.

    `tensors[i]` comes from `models[i]`; `base_index` says which one is the base model (or None).
    `deltas` are the task vectors x_i - base of the non-base models, in order (`delta_models`).
    The engine keeps one TensorInputs per output tensor alive across trials, so whatever a method
    stores with `cached(key, fn)` (sorted |delta|, norms, angles, ...) is computed once per study;
    the streaming writer builds a fresh one per tensor. After `drop_raw()`, non-base raw tensors are
    rebuilt from base + delta on demand (not kept), so delta-based methods hold base + deltas only.
    `out`, when set (the engine sets the live parameter), is where a method may write its result instead of
    into a new tensor (`new_output`); the inputs never alias it.
    """

    out: torch.Tensor | None = None

    def __init__(self, name: str, models: list[str], tensors: list[torch.Tensor], base_index: int | None):
        if len(models) != len(tensors):
            raise ValueError("one tensor per model")
        self.name = name
        self.models = list(models)
        self.base_index = base_index
        self._tensors: list[torch.Tensor] | None = list(tensors)
        self._base = tensors[base_index] if base_index is not None else None
        self._deltas: list[torch.Tensor] | None = None
        self._memo: dict[str, Any] = {}

    # ---- raw inputs -------------------------------------------------------------------------
    @property
    def base(self) -> torch.Tensor | None:
        return self._base

    @property
    def tensors(self) -> list[torch.Tensor]:
        if self._tensors is not None:
            return self._tensors
        deltas = iter(self._deltas)
        return [self._base if i == self.base_index else self._base + next(deltas) for i in range(len(self.models))]

    @property
    def delta_indices(self) -> list[int]:
        """Positions (in `models`) of the non-base models, the order of `deltas`."""
        return [i for i in range(len(self.models)) if i != self.base_index]

    @property
    def deltas(self) -> list[torch.Tensor]:
        if self._base is None:
            raise MergeConfigError("this merge method needs a base_model", "base_model")
        if self._deltas is None:
            self._deltas = [self._tensors[i] - self._base for i in self.delta_indices]
        return self._deltas

    def drop_raw(self) -> None:
        """Keep only base + deltas resident (for delta-based methods)."""
        if self._base is not None:
            self.deltas  # noqa: B018 - computes and keeps them
            self._tensors = None

    def new_output(self, like: torch.Tensor) -> torch.Tensor:
        """A tensor shaped, typed and placed like `like` for the merged result: `out` when it fits, else new."""
        out = self.out
        if (out is not None and out.shape == like.shape and out.dtype == like.dtype and out.device == like.device
                and out.is_contiguous()):
            return out
        return torch.empty_like(like, memory_format=torch.contiguous_format)

    # ---- trial-independent statistics -----------------------------------------------------------
    def cached(self, key: str, compute: Callable[[], Any]) -> Any:
        """Memoize a statistic that depends only on the inputs (never on trial parameters)."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "TensorInputs":
        """A shallow copy on `device` (for streaming offloaded inputs to the GPU one tensor at a time)."""
        copy = TensorInputs.__new__(TensorInputs)
        copy.name, copy.models, copy.base_index = self.name, self.models, self.base_index
        copy._tensors = _move(self._tensors, device, non_blocking)
        copy._base = _move(self._base, device, non_blocking)
        copy._deltas = _move(self._deltas, device, non_blocking)
        copy._memo = {k: _move(v, device, non_blocking) for k, v in self._memo.items()}
        copy.out = self.out
        return copy

    def keep_memo_from(self, other: "TensorInputs") -> None:
        """Adopt statistics that `other` (a device copy) computed, stored on this object's device."""
        for key, value in other._memo.items():
            if key not in self._memo:
                self._memo[key] = _move(value, self.device)

    @property
    def device(self) -> torch.device:
        return (self._base if self._base is not None else self._tensors[0]).device

    def resident_bytes(self) -> int:
        """Bytes held: raw tensors, deltas and cached tensors."""
        seen: dict[int, int] = {}
        pools = [self._tensors or [], self._deltas or [], [self._base] if self._base is not None else []]
        for value in self._memo.values():
            pools.append(value if isinstance(value, (list, tuple)) else [value])
        for pool in pools:
            for t in pool:
                if isinstance(t, torch.Tensor):
                    seen[t.data_ptr()] = t.numel() * t.element_size()
        return sum(seen.values())


SPAN = 1 << 15   # elements per span on CPU: the few float buffers of one span's arithmetic stay in L2


def spans(flat: torch.Tensor, cuts: Iterable[int] = ()) -> Iterator[tuple[int, int]]:
    """[lo, hi) ranges covering the flat tensor in order, also split at `cuts`.

    On CPU a span is at most SPAN long, so elementwise work done span by span runs in cache instead of making
    one pass over memory per operation; on a GPU a span is the whole tensor (it streams memory fast enough).
    """
    n = flat.numel()
    step = SPAN if flat.device.type == "cpu" else max(n, 1)
    bounds = sorted({*range(0, n, step), *(c for c in cuts if 0 < c < n)})
    return zip(bounds, bounds[1:] + [n])


def _move(value: Any, device: torch.device | str, non_blocking: bool = False) -> Any:
    """Tensors (also inside lists/tuples) moved to `device`; anything else unchanged."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=non_blocking)
    if isinstance(value, (list, tuple)):
        return type(value)(_move(v, device, non_blocking) for v in value)
    if isinstance(value, dict):
        return {k: _move(v, device, non_blocking) for k, v in value.items()}
    return value


@dataclass(frozen=True)
class Param:
    """A declared method parameter: default (None = required), type and allowed closed range."""

    default: Any = None
    kind: type = float
    low: float | None = None
    high: float | None = None
    required: bool = False


def describe_param(spec: Param) -> str:
    """'float = 1.0 in [0, 1]', 'float (required)': a parameter as `mergesearch methods` lists it."""
    text = spec.kind.__name__ + (" (required)" if spec.required or spec.default is None and spec.kind is not bool
                                 and spec.required else f" = {spec.default}" if spec.default is not None else "")
    if spec.low is not None or spec.high is not None:
        low = "-inf" if spec.low is None else f"{spec.low:g}"
        high = "inf" if spec.high is None else f"{spec.high:g}"
        text += f" in [{low}, {high}]"
    return text


MergeFn = Callable[[TensorInputs, dict[str, Any], list[dict[str, Any]], "torch.Generator | None"], torch.Tensor]


@dataclass(frozen=True)
class MergeMethod:
    """A merge method: a pure function plus what it declares.

    merge(inputs, params, model_params, generator) -> merged tensor (compute dtype), where `params` are
    the method-level values resolved for this tensor and `model_params[i]` those of `inputs.models[i]`.
    """

    name: str
    merge: MergeFn
    params: dict[str, Param] = field(default_factory=dict)          # method-level (t, normalize, lambda, ...)
    model_params: dict[str, Param] = field(default_factory=dict)    # per model (weight, density, ...)
    requires_base: bool = False
    optional_base: bool = False  # uses the base when one is given (nuslerp, multislerp)
    min_models: int = 1          # counting the base model
    max_models: int | None = None
    min_non_base: int = 0        # models other than the base (only for methods that use a base)
    max_non_base: int | None = None
    delta_based: bool = False    # needs only base + deltas resident (TensorInputs.drop_raw is safe)
    random: bool = False         # draws from the generator

    @property
    def uses_base(self) -> bool:
        """Whether the base model is special to this method; if not, it is merged like any other input.

        As in mergekit, per-model parameters of a base-using method apply to the non-base models only;
        those of a base-ignoring method (linear, karcher, passthrough) apply to every input.
        """
        return self.requires_base or self.optional_base


REGISTRY: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    if method.name in REGISTRY:
        raise ValueError(f"merge method {method.name!r} registered twice")
    REGISTRY[method.name] = method
    return method


def get_method(name: str) -> MergeMethod:
    """The registered method `name`, or a MergeConfigError listing the known ones."""
    import merge_core.methods  # noqa: F401 - registers every method

    try:
        return REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(REGISTRY))
        raise MergeConfigError(f"unknown merge method {name!r} (known: {known})", "merge_method") from None
