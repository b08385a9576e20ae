"""What every merge method sees and declares: the inputs of one output tensor, the `merge_method` decorator (a
function's typed signature is its parameter schema), and the registry.

Methods are pure functions over `TensorInputs`; they never read files or know about trials.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import (
    Annotated,
    Any,
    Callable,
    Generic,
    Iterable,
    Iterator,
    TypeVar,
    get_args,
    get_origin,
    get_type_hints,
)

import torch

from merge_core.errors import MergeConfigError

T = TypeVar("T")


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
    `reused` (the engine sets it) says the inputs serve many trials: a statistic that costs more than one merge but
    makes every later trial cheaper (a full rank order) is worth computing; the one-off writer leaves it False.
    """

    out: torch.Tensor | None = None
    reused: bool = False

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
        copy.out, copy.reused = self.out, self.reused
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


# ---- declaring a method ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Range:
    """Closed bounds of a numeric parameter (None: unbounded on that side); used inside Annotated[...]."""

    low: float | None = None
    high: float | None = None


Unit = Annotated[float, Range(0.0, 1.0)]            # a fraction: density, gamma, epsilon, select_topk
NonNegative = Annotated[float, Range(0.0, None)]


class PerModel(Generic[T]):
    """Annotation of a per-model parameter (mergekit's `models[i].parameters`): the method receives a list
    aligned with `inputs.models`, with None for the base of a base-using method (it takes no per-model values)."""


@dataclass(frozen=True)
class Param:
    """A declared method parameter: its type, default (None with required=False: optional without default),
    allowed closed range, and whether it must be given."""

    default: Any = None
    kind: type = float
    low: float | None = None
    high: float | None = None
    required: bool = False


def describe_param(spec: Param) -> str:
    """'float = 1.0 in [0, 1]', 'float (required)': a parameter as `mergesearch methods` lists it."""
    text = spec.kind.__name__ + (" (required)" if spec.required else f" = {spec.default}" if spec.default is not None
                                 else " (optional)")
    if spec.low is not None or spec.high is not None:
        low = "-inf" if spec.low is None else f"{spec.low:g}"
        high = "inf" if spec.high is None else f"{spec.high:g}"
        text += f" in [{low}, {high}]"
    return text


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method: its function and what the function's signature declares.

    `merge(inputs, params, model_params, generator)` calls the function with the method-level values resolved for
    one tensor (`params`) and, per input model, its per-model values (`model_params[i]`, {} for a base).
    """

    name: str
    function: Callable[..., torch.Tensor]
    reference: str
    params: dict[str, Param] = field(default_factory=dict)          # method-level (t, normalize, lambda, ...)
    model_params: dict[str, Param] = field(default_factory=dict)    # per model (weight, density, ...)
    arguments: dict[str, str] = field(default_factory=dict)         # parameter name -> Python argument name
    requires_base: bool = False
    optional_base: bool = False  # uses the base when one is given (nuslerp, multislerp)
    min_models: int = 1          # counting the base model
    max_models: int | None = None
    min_non_base: int = 0        # models other than the base (only for methods that use a base)
    max_non_base: int | None = None
    delta_based: bool = False    # needs only base + deltas resident (TensorInputs.drop_raw is safe)
    random: bool = False         # draws from a generator (takes a `generator` argument)
    bound: dict[str, Any] = field(default_factory=dict)              # arguments this registration fixes

    @property
    def uses_base(self) -> bool:
        """Whether the base model is special to this method; if not, it is merged like any other input.

        As in mergekit, per-model parameters of a base-using method apply to the non-base models only;
        those of a base-ignoring method (linear, karcher, passthrough) apply to every input.
        """
        return self.requires_base or self.optional_base

    def merge(self, inputs: TensorInputs, params: dict[str, Any], model_params: list[dict[str, Any]],
              generator: torch.Generator | None = None) -> torch.Tensor:
        kwargs = {**self.bound, **{self.arguments[name]: value for name, value in params.items()}}
        for name in self.model_params:
            kwargs[self.arguments[name]] = [values.get(name) for values in model_params]
        if self.random:
            kwargs["generator"] = generator
        return self.function(inputs, **kwargs)


def _spec(name: str, annotation: Any, default: Any) -> tuple[Param, bool]:
    """(Param, per_model) from one keyword argument of a method function."""
    per_model = get_origin(annotation) is PerModel
    if per_model:
        annotation = get_args(annotation)[0]
    low = high = None
    if get_origin(annotation) is Annotated:
        annotation, *extras = get_args(annotation)
        for extra in extras:
            if isinstance(extra, Range):
                low, high = extra.low, extra.high
    if annotation not in (bool, int, float, str):
        raise TypeError(f"parameter {name}: a merge parameter is a bool, int, float or str, not {annotation}")
    required = default is inspect.Parameter.empty
    return Param(None if required else default, annotation, low, high, required), per_model


def merge_method(name: str, *, reference: str, base: str = "none", models: tuple[int, int | None] = (1, None),
                 non_base: tuple[int, int | None] = (0, None), delta_based: bool = False,
                 bind: dict[str, Any] | None = None, defaults: dict[str, Any] | None = None):
    """Declare and register a merge method; the function's typed signature is its parameter schema.

    The function is `f(inputs: TensorInputs, *, <parameters>, [generator]) -> Tensor`. Each keyword-only
    argument is a parameter: its annotation gives the type (bool, int, float, str; `Annotated[float, Range(a, b)]`
    for bounds, e.g. `Unit`), `PerModel[...]` makes it per model, a default makes it optional, a trailing
    underscore is dropped from the name (`lambda_` is mergekit's `lambda`). A `generator` argument marks a
    random method. Input contract: `base` ("none" | "optional" | "required"), `models` (min, max) counting the
    base, `non_base` (min, max) besides it; `delta_based`: works on base + task vectors only.
    One function may serve several methods (decorators stacked): `bind` fixes arguments that are not parameters
    (e.g. `consensus`), `defaults` gives this method other defaults than the signature's.
    """
    bind, defaults = dict(bind or {}), dict(defaults or {})
    if base not in ("none", "optional", "required"):
        raise ValueError(f"base must be none, optional or required, got {base!r}")

    def declare(function: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        hints = get_type_hints(function, include_extras=True)
        params, model_params, arguments = {}, {}, {}
        signature = inspect.signature(function)
        for argument in list(signature.parameters.values())[1:]:
            if argument.name == "generator" or argument.name in bind:
                continue
            if argument.kind is not inspect.Parameter.KEYWORD_ONLY:
                raise TypeError(f"{name}: parameter {argument.name} must be keyword-only (after *)")
            key = argument.name.rstrip("_")
            spec, per_model = _spec(key, hints[argument.name], defaults.pop(argument.name, argument.default))
            (model_params if per_model else params)[key] = spec
            arguments[key] = argument.name
        register(MergeMethod(
            name=name, function=function, reference=reference, params=params, model_params=model_params,
            arguments=arguments, requires_base=base == "required", optional_base=base == "optional",
            min_models=models[0], max_models=models[1], min_non_base=non_base[0], max_non_base=non_base[1],
            delta_based=delta_based, random="generator" in signature.parameters, bound=bind))
        if defaults:
            raise TypeError(f"{name}: defaults for unknown parameters {sorted(defaults)}")
        return function

    return declare


def non_base(inputs: TensorInputs, values: list) -> list:
    """The entries of a per-model list that belong to the non-base models (the order of `inputs.deltas`)."""
    return [values[i] for i in inputs.delta_indices]


REGISTRY: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    if method.name in REGISTRY:
        raise ValueError(f"merge method {method.name!r} registered twice")
    REGISTRY[method.name] = method
    return method
