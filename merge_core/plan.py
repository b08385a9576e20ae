"""Output-tensor planning (which source tensors make each output tensor, at which gradient position) and the
per-tensor merge step: resolve parameters, seed, call the method. Plus a plain reference loop over a state dict.

Reads no files (callers pass tensor names, layer counts and a reader) and keeps no state between calls.
"""

from __future__ import annotations

import hashlib
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from merge_core.config import MergeConfig, Parameters
from merge_core.errors import MergeConfigError
from merge_core.methods import MergeMethod, TensorInputs, get_method
from merge_core.params import resolve_params
from merge_core.sources import torch_dtype

LAYER_RE = re.compile(r"^(?P<prefix>(?:.+\.)?layers)\.(?P<index>\d+)\.(?P<rest>.+)$")
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)         # non-persistent buffers mergekit's templates leave out
TIED = {"lm_head.weight": "model.embed_tokens.weight"}  # an optional head read from the embeddings when absent


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
    """

    out_name: str
    sources: tuple[tuple[str, str], ...]
    base_index: int | None
    t: float
    slice_index: int | None = None
    origins: tuple[int | None, ...] = ()
    param_names: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Layout:
    """A model's tensor names split into non-layer tensors and layers (index -> suffixes, in file order)."""

    names: frozenset[str]
    outer: tuple[str, ...]
    prefix: str | None
    layers: dict[int, tuple[str, ...]]

    @staticmethod
    def of(names: list[str]) -> "_Layout":
        outer, layers, prefix = [], {}, None
        for name in names:
            if name.endswith(IGNORED_SUFFIXES):
                continue
            m = LAYER_RE.match(name)
            if m is None:
                outer.append(name)
                continue
            prefix = prefix or m["prefix"]
            layers.setdefault(int(m["index"]), []).append(m["rest"])
        return _Layout(frozenset(names), tuple(outer), prefix, {i: tuple(v) for i, v in layers.items()})


def _is_pre_layer(name: str) -> bool:
    """Embeddings come before the layers; every other non-layer tensor (final norm, head) after them."""
    return "embed" in name or "wte" in name or "wpe" in name


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


def plan_merge(cfg: MergeConfig, tensor_names: dict[str, list[str]], num_layers: dict[str, int]
               ) -> list[TensorTask]:
    """Every output tensor of the merge, in output order: embeddings, layers (renumbered across slices), the rest.

    tensor_names / num_layers: per model reference as written in the config. Embeddings come from the first
    slice's models, the final norm and head from the last's (as mergekit's planner). A head missing from some
    models (tied embeddings) is read from their embeddings; missing from all, it is not planned (mergekit
    skips it too). Raises MergeConfigError for missing tensors, bad layer ranges and unresolvable parameters.
    """
    method = get_method(cfg.merge_method)
    layouts = {}
    for ref in cfg.referenced_models():
        if ref not in tensor_names:
            raise MergeConfigError(f"no tensor list for model {ref!r}", "models")
        layouts[ref] = _Layout.of(tensor_names[ref])
    groups = _groups(cfg, method, num_layers)

    first, last = groups[0], groups[-1]
    # mergekit pairs the last slice's models with as many template entries as the first slice has sources
    last = _Group(last.slice_index, last.sources[:len(first.sources)], last.length, last.base_index)
    tasks = _outer_tasks(first, layouts, pre=True)
    out_layer = 0
    for group in groups:
        for offset in range(group.length):
            t = offset / (group.length - 1) if group.length > 1 else 1.0
            tasks += _layer_tasks(group, layouts, offset, out_layer, t)
            out_layer += 1
    tasks += _outer_tasks(last, layouts, pre=False)
    for task in tasks:
        _check_params(cfg, method, task)
    return tasks


def _outer_tasks(group: _Group, layouts: dict[str, _Layout], pre: bool) -> list[TensorTask]:
    names = dict.fromkeys(n for s in group.sources for n in layouts[s.ref].outer if _is_pre_layer(n) == pre)
    tasks = []
    for name in names:
        reads = []
        for s in group.sources:
            if name in layouts[s.ref].names:
                reads.append(name)
            elif name in TIED and TIED[name] in layouts[s.ref].names:
                reads.append(TIED[name])
            else:
                raise MergeConfigError(f"model {s.ref!r} has no tensor {name!r}", s.field)
        tasks.append(TensorTask(name, tuple((s.ref, r) for s, r in zip(group.sources, reads)), group.base_index,
                                0.0, group.slice_index, tuple(s.origin for s in group.sources),
                                (name,) * len(group.sources)))
    return tasks


def _layer_tasks(group: _Group, layouts: dict[str, _Layout], offset: int, out_layer: int, t: float
                 ) -> list[TensorTask]:
    lead = group.sources[0]
    lead_layout = layouts[lead.ref]
    index = lead.start + offset
    if index not in lead_layout.layers:
        raise MergeConfigError(f"model {lead.ref!r} has no tensors for layer {index}", lead.field)
    tasks = []
    for rest in lead_layout.layers[index]:
        reads = []
        for s in group.sources:
            layout = layouts[s.ref]
            name = f"{layout.prefix}.{s.start + offset}.{rest}"
            if name not in layout.names:
                raise MergeConfigError(f"model {s.ref!r} has no tensor {name!r}", s.field)
            reads.append(name)
        tasks.append(TensorTask(f"{lead_layout.prefix}.{out_layer}.{rest}",
                                tuple((s.ref, r) for s, r in zip(group.sources, reads)), group.base_index, t,
                                group.slice_index, tuple(s.origin for s in group.sources), tuple(reads)))
    return tasks


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


def merge_one(task: TensorTask, inputs: TensorInputs, cfg: MergeConfig, method: MergeMethod, seed: int | None
              ) -> torch.Tensor:
    """Merge one output tensor: resolve its parameters, seed a generator for random methods, call the method.

    The result is a fresh tensor in the inputs' dtype, or `inputs.out` when the method wrote it there; the
    inputs are not modified (their memo may grow).
    With seed None a random method draws a fresh seed.
    """
    params, model_params = resolve_tensor_params(cfg, method, task)
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
