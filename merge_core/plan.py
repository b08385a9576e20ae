"""Output-tensor planning (which source tensors make each output tensor, at which gradient position) and the
per-tensor merge step: resolve parameters, seed, call the method. Plus a plain reference loop over a state dict.

Reads no files (callers pass tensor names, layer counts and a reader) and keeps no state between calls.
"""

from __future__ import annotations

import hashlib
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from merge_core.architectures import Architecture, Weight, guess_architecture
from merge_core.config import MergeConfig, Parameters
from merge_core.errors import MergeConfigError
from merge_core.methods import MergeMethod, TensorInputs, get_method
from merge_core.params import resolve_params
from merge_core.sources import check_compatible, torch_dtype


@dataclass(frozen=True)
class TensorTask:
    """One output tensor: its sources (model reference, tensor name in that model) in merge order, and where its
    parameters come from.

    base_index: position of the base model in `sources` for methods that use a base, else None.
    t: gradient position (layer i of an n-layer slice: i / (n - 1), 1 for n = 1; 0 outside the layers).
    slice_index: the `slices` entry whose slice/source parameters apply (None for a `models:` config).
    origins: per source, its index in `models` (or in that slice's `sources`), None for a base that mergekit adds.
    param_names: per source, the tensor name its filters are matched against (the template name; differs from
        the read name only for a tied head read from the embeddings).
    layer: the output layer this tensor belongs to (None before and after the layers).
    """

    out_name: str
    sources: tuple[tuple[str, str], ...]
    base_index: int | None
    t: float
    slice_index: int | None = None
    origins: tuple[int | None, ...] = ()
    param_names: tuple[str, ...] = ()
    layer: int | None = None


@dataclass(frozen=True)
class _Source:
    ref: str
    start: int
    origin: int | None
    field: str          # config field naming this source, for errors


@dataclass(frozen=True)
class _Group:
    slice_index: int | None
    sources: tuple[_Source, ...]
    length: int
    base_index: int | None


def _groups(cfg: MergeConfig, method: MergeMethod, num_layers: dict[str, int]) -> list[_Group]:
    """The config as output slices, as mergekit normalizes it (a `models:` config is one slice, base appended)."""
    def layers_of(ref: str, field: str) -> int:
        if ref not in num_layers:
            raise MergeConfigError(f"no layer count for model {ref!r}", field)
        return num_layers[ref]

    def base_index(refs: list[str], base: str | None) -> int | None:
        return refs.index(base) if method.uses_base and base in refs else None

    if cfg.models:
        sources = [_Source(m.model, 0, i, f"models[{i}]") for i, m in enumerate(cfg.models)]
        if cfg.base_model and cfg.base_model not in [s.ref for s in sources]:
            sources.append(_Source(cfg.base_model, 0, None, "base_model"))
        counts = {s.ref: layers_of(s.ref, s.field) for s in sources}
        if len(set(counts.values())) > 1:
            raise MergeConfigError(f"the models have different layer counts {counts}; use slices: to "
                                   "choose layers", "models")
        refs = [s.ref for s in sources]
        return [_Group(None, tuple(sources), next(iter(counts.values())), base_index(refs, cfg.base_model))]

    groups = []
    for i, out_slice in enumerate(cfg.slices):
        sources = []
        for j, src in enumerate(out_slice.sources):
            field = f"slices[{i}].sources[{j}]"
            if src.layer_range[1] > layers_of(src.model, field):
                raise MergeConfigError(f"layer_range {list(src.layer_range)} goes past the "
                                       f"{num_layers[src.model]} layers of {src.model}", f"{field}.layer_range")
            sources.append(_Source(src.model, src.layer_range[0], j, field))
        base = out_slice.base_model or cfg.base_model
        groups.append(_Group(i, tuple(sources), out_slice.num_layers, base_index([s.ref for s in sources], base)))
    return groups


def plan_merge(cfg: MergeConfig, tensor_names: dict[str, list[str]], num_layers: dict[str, int],
               architecture: Architecture | None = None, configs: dict[str, dict] | None = None
               ) -> list[TensorTask]:
    """Every output tensor of the merge, in output order: before the layers, layers (renumbered across slices), after.

    Which tensors exist, in which layer, is the architecture table's (`architecture`, the models' shared entry;
    guessed from the first model's tensor names when not given). tensor_names / num_layers / configs: per model
    reference as written in the config (names as the sources list them, i.e. under the table's names; configs for
    tables whose layers depend on the config). Tensors before the layers come from the first slice's models, those
    after from the last's (as mergekit's planner). An optional tensor no model has is not planned; a head missing
    from some models is read from their embeddings (its tied names). Raises MergeConfigError for missing tensors,
    bad layer ranges and unresolvable parameters.
    """
    method = get_method(cfg.merge_method)
    names: dict[str, frozenset[str]] = {}
    for ref in cfg.referenced_models():
        if ref not in tensor_names:
            raise MergeConfigError(f"no tensor list for model {ref!r}", "models")
        names[ref] = frozenset(tensor_names[ref])
    arch = architecture or guess_architecture(names[cfg.referenced_models()[0]])
    groups = _groups(cfg, method, num_layers)
    model_configs = {ref: _with_layers(arch, (configs or {}).get(ref, {}), num_layers.get(ref)) for ref in names}
    out_ref = cfg.base_model if cfg.base_model in names else cfg.referenced_models()[0]
    out_layers = sum(g.length for g in groups)
    out_config = _with_layers(arch, model_configs[out_ref], out_layers, force=True)

    first, last = groups[0], groups[-1]
    # mergekit pairs the last slice's models with as many template entries as the first slice has sources
    last = _Group(last.slice_index, last.sources[:len(first.sources)], last.length, last.base_index)
    tasks = []
    for weight in arch.pre_weights(out_config):
        tasks += _plan_weight(weight, [weight] * len(first.sources), first, names, 0.0, None)
    out_layer = 0
    for group in groups:
        for offset in range(group.length):
            t = offset / (group.length - 1) if group.length > 1 else 1.0
            out_weights = arch.layer_weights(out_config, out_layer)
            in_weights = [arch.layer_weights(model_configs[s.ref], s.start + offset) for s in group.sources]
            for s, weights in zip(group.sources, in_weights):
                if len(weights) != len(out_weights):
                    raise MergeConfigError(f"layer {s.start + offset} of {s.ref} has other tensors than output "
                                           f"layer {out_layer}", s.field)
            for k, weight in enumerate(out_weights):
                tasks += _plan_weight(weight, [w[k] for w in in_weights], group, names, t, out_layer)
            out_layer += 1
    for weight in arch.post_weights(out_config):
        tasks += _plan_weight(weight, [weight] * len(last.sources), last, names, 0.0, None)
    for task in tasks:
        _check_params(cfg, method, task)
    return tasks


def _with_layers(arch: Architecture, config: dict, layers: int | None, force: bool = False) -> dict:
    """`config` with its layer count set (when it has none, or with `force`) under the architecture's key."""
    out = dict(config)
    if layers is not None and (force or not any(k in out for k in (arch.layers_key, "num_hidden_layers", "n_layer"))):
        out[layer_count_key(arch, out)] = layers
    return out


def layer_count_key(arch: Architecture | None, config: dict) -> str:
    """The key of `config` that holds its layer count (the architecture's, or the one the config uses)."""
    keys = ((arch.layers_key,) if arch is not None else ()) + ("num_hidden_layers", "n_layer")
    return next((k for k in keys if k in config), keys[0])


def output_layers(plan: list[TensorTask]) -> int | None:
    """The number of layers of the merged model (None for a plan without layers)."""
    layers = [t.layer for t in plan if t.layer is not None]
    return max(layers) + 1 if layers else None


def _plan_weight(out: Weight, inputs: list[Weight], group: _Group, names: dict[str, frozenset[str]], t: float,
                 layer: int | None) -> list[TensorTask]:
    """The task for one output tensor (none for an optional tensor no model has): which tensor each source reads."""
    present = [w.name in names[s.ref] for s, w in zip(group.sources, inputs)]
    if out.optional and not any(present):
        return []
    reads = []
    for s, w, here in zip(group.sources, inputs, present):
        if here:
            reads.append(w.name)
            continue
        tied = next((n for n in w.tied if n in names[s.ref]), None)
        if tied is None:
            holder = next((o.ref for o, p in zip(group.sources, present) if p), None)
            raise MergeConfigError(f"model {s.ref!r} has no tensor {w.name!r}"
                                   + (f" (present in {holder})" if holder is not None else ""), s.field)
        reads.append(tied)
    return [TensorTask(out.name, tuple((s.ref, r) for s, r in zip(group.sources, reads)), group.base_index, t,
                       group.slice_index, tuple(s.origin for s in group.sources), tuple(w.name for w in inputs),
                       layer)]


def plan_sources(cfg: MergeConfig, sources: dict) -> list[TensorTask]:
    """Check that the opened sources (reference -> ModelSource) agree, then plan the merge from their table entry."""
    check_compatible(sources, same_layers=not cfg.slices)
    lead = sources[cfg.base_model] if cfg.base_model in sources else next(iter(sources.values()))
    return plan_merge(cfg, {ref: s.tensor_names for ref, s in sources.items()},
                      {ref: s.num_layers for ref, s in sources.items()}, architecture=lead.require_arch(),
                      configs={ref: s.config for ref, s in sources.items()})


# ---- parameters ------------------------------------------------------------------------------------

def _scopes(cfg: MergeConfig, task: TensorTask) -> tuple[Parameters | None, list[Parameters | None]]:
    """The slice-level parameters and, per source, its own parameters (None where it has none)."""
    if task.slice_index is None:
        return None, [cfg.models[o].parameters if o is not None else None for o in task.origins]
    out_slice = cfg.slices[task.slice_index]
    return out_slice.parameters, [out_slice.sources[o].parameters if o is not None else None for o in task.origins]


def resolve_tensor_params(cfg: MergeConfig, method: MergeMethod, task: TensorTask
                          ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The method-level values and the per-source values for this tensor, defaults applied.

    Precedence (mergekit): the source's own parameters (per-model values only), the slice's, the top-level ones,
    the method default. Method-level values see the output name; per-source values the source's tensor name.
    The base of a base-using method gets no per-model values (an empty dict).
    """
    slice_params, source_params = _scopes(cfg, task)
    top = cfg.parameters
    params = resolve_params(method.params, (slice_params, top), task.out_name, task.t)
    model_params = [
        {} if i == task.base_index
        else resolve_params(method.model_params, (own, slice_params, top), task.param_names[i], task.t)
        for i, own in enumerate(source_params)
    ]
    return params, model_params


def _check_params(cfg: MergeConfig, method: MergeMethod, task: TensorTask) -> None:
    """Resolve every value of the task once, re-raising a failure with the config field to fix."""
    slice_params, source_params = _scopes(cfg, task)
    scope = "parameters" if task.slice_index is None else f"slices[{task.slice_index}].parameters"
    try:
        resolve_params(method.params, (slice_params, cfg.parameters), task.out_name, task.t)
    except MergeConfigError as err:
        raise _located(err, scope, "") from None
    for i, own in enumerate(source_params):
        if i == task.base_index:
            continue
        try:
            resolve_params(method.model_params, (own, slice_params, cfg.parameters), task.param_names[i], task.t)
        except MergeConfigError as err:
            origin, hint = task.origins[i], ""
            if origin is None:
                field = "base_model"
                hint = (f" (mergekit merges base_model as one more input of {method.name}: list it under models: "
                        f"with its parameters, or set them at the top level)")
            elif task.slice_index is None:
                field = f"models[{origin}].parameters"
            else:
                field = f"slices[{task.slice_index}].sources[{origin}].parameters"
            raise _located(err, field, hint) from None


def _located(err: MergeConfigError, field: str, hint: str) -> MergeConfigError:
    message = str(err).split(": ", 1)[1] if err.where else str(err)
    return MergeConfigError(message + hint, f"{field}.{err.where}" if err.where else field)


# ---- merging -----------------------------------------------------------------------------------------

def tensor_seed(seed: int, out_name: str) -> int:
    """A 63-bit seed from (seed, tensor name): the same for every run and independent of tensor order."""
    digest = hashlib.blake2b(f"{seed}\x00{out_name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


@contextmanager
def one_thread_per_op() -> Iterator[int]:
    """Run torch ops on one intra-op thread inside the block; yields the caller's thread count, restored after.

    Every merge path (engine, streaming writer, reference loop) merges under it, so that results do not depend on
    the thread count (a multi-threaded reduction sums in another order) and so that parallelism, where wanted,
    comes from merging several tensors at once rather than from OpenMP teams inside each operation, which stall
    whenever one of their threads is descheduled (on a shared 2-core machine a 2-thread linear trial took 8x the
    CPU time of a 1-thread one).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield before
    finally:
        torch.set_num_threads(before)


def all_finite(x: torch.Tensor) -> bool:
    """Whether a tensor holds no NaN or inf: its min and max are finite (NaN propagates through both). One pass
    that allocates nothing, 40x faster on CPU than `isfinite(x).all()`, which writes a bool tensor first."""
    if not x.is_floating_point() or x.numel() == 0:
        return True
    low, high = torch.aminmax(x)
    return math.isfinite(float(low)) and math.isfinite(float(high))


def merge_one(task: TensorTask, inputs: TensorInputs, cfg: MergeConfig, method: MergeMethod, seed: int | None
              ) -> torch.Tensor:
    """Merge one output tensor: resolve its parameters, seed a generator for random methods, call the method.

    The result is a fresh tensor in the inputs' dtype, or `inputs.out` when the method wrote it there; the
    inputs are not modified (their memo may grow).
    With seed None a random method draws a fresh seed.
    """
    params, model_params = resolve_tensor_params(cfg, method, task)
    low_rank = getattr(inputs, "merge_low_rank", None)      # LoRA sources kept low-rank (merge_core.lora)
    if low_rank is not None:
        merged = low_rank(method, params, model_params)
        if merged is not None:
            return merged
    generator = None
    if method.random:
        generator = torch.Generator(device=inputs.device)
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(tensor_seed(seed, task.out_name))
    return method.merge(inputs, params, model_params, generator)




def merge_state_dict(cfg: MergeConfig, read_tensor: Callable[[str, str], torch.Tensor],
                     tensor_names: dict[str, list[str]], num_layers: dict[str, int], seed: int | None = 0
                     ) -> dict[str, torch.Tensor]:
    """The merged state dict, by a plain loop over the plan (the reference the engine and writer must match).

    Sources are cast to `dtype` (mergekit's default: no cast, the inputs' common dtype), merged, and cast to
    `out_dtype` (default: the compute dtype). Non-float tensors must agree across sources and are copied.
    """
    method = get_method(cfg.merge_method)
    dtype, out_dtype = torch_dtype(cfg.dtype), torch_dtype(cfg.out_dtype)
    merged: dict[str, torch.Tensor] = {}
    with one_thread_per_op():
        for task in plan_merge(cfg, tensor_names, num_layers):
            tensors = [read_tensor(ref, name) for ref, name in task.sources]
            shapes = {tuple(x.shape) for x in tensors}
            if len(shapes) > 1:
                raise MergeConfigError(f"shape mismatch between models: {sorted(shapes)}", task.out_name)
            if not all(x.is_floating_point() for x in tensors):
                if any(not torch.equal(x, tensors[0]) or x.dtype != tensors[0].dtype for x in tensors):
                    raise MergeConfigError("a non-float tensor differs between models", task.out_name)
                merged[task.out_name] = tensors[0].clone()
                continue
            compute = dtype
            if compute is None:
                compute = tensors[0].dtype
                for x in tensors[1:]:
                    compute = torch.promote_types(compute, x.dtype)
            inputs = TensorInputs(task.out_name, [ref for ref, _ in task.sources], [x.to(compute) for x in tensors],
                                  task.base_index)
            result = merge_one(task, inputs, cfg, method, seed)
            merged[task.out_name] = result.to(out_dtype or compute)
    return merged
