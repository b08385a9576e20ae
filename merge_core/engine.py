"""The hot path: sources loaded once and kept resident, candidates materialized in place into one live model.

Owns the live transformers model and the resident inputs (base, task vectors, cached statistics).
Per `materialize` call it does only merge arithmetic: no disk I/O, no new model objects, no state-dict copies.

Memory (resident, per parameter of the model): bytes_per_param(compute dtype) x copies, where copies =
  delta methods (task_arithmetic, ties, dare_*, della*, breadcrumbs*, sce):  1 base + n task vectors
      + for magnitude trims (ties, breadcrumbs*) n rank orders of |delta|, 4 bytes a parameter each (int32),
        for della* n row ranks, 2 bytes a parameter each (16-bit positions in the row)
  other methods (linear, slerp, nuslerp, ...):  n + 1 raw tensors (+ small per-tensor statistics)
plus the live model itself (1 copy, out dtype). E.g. ties over 2 fine-tunes of a 7B base in float16 on a GPU:
2 bytes x 7e9 x (1 + 2 + 1) + 4 bytes x 7e9 x 2 = 112 GB; with `offload=True` the inputs stay in CPU memory
(pinned when a GPU is used) and only the live model (14 GB) plus one tensor's inputs at a time live on the GPU.
Measured on CPU at 1B parameters: allocated memory 1.07-1.12x this (buffers, the first trial's sort, what the
allocator keeps). An input read in its stored dtype stays a mapping of its file (page cache, shared between
workers); the source files are closed once the inputs are loaded.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from merge_core.config import MergeConfig
from merge_core.errors import MergeConfigError
from merge_core.lora import AdapterSource, build_inputs
from merge_core.methods import TensorInputs, get_method
from merge_core.plan import TensorTask, all_finite, merge_one, one_thread_per_op
from merge_core.prepare import build_model, load_tokenizer, pick_device, prepare, stored_float_dtype
from merge_core.sources import ModelSource, check_compatible, torch_dtype

log = logging.getLogger(__name__)


class NonFiniteMerge(RuntimeError):
    """A candidate produced NaN or inf weights (a numerical fault of the recipe, not a user error)."""


@dataclass
class MaterializeStats:
    seconds: float
    tensors: int


class MergeEngine:
    """Resident sources + one live model; `materialize(config)` rewrites the model's weights in place.

    Build once per study (worker); call `materialize` once per trial with configs that differ from the
    first only in parameter values (same method, models, slices, dtypes).
    """

    def __init__(self, config: MergeConfig, device: str | torch.device = "auto", *, offload: bool = False,
                 allow_pickle: bool = False, seed: int = 0):
        self.config = config
        self.prepared = prepare(config, device, allow_pickle)
        self.device = self.prepared.device
        self.offload = offload and self.device.type != "cpu"
        self.seed = seed
        self.method = get_method(config.merge_method)
        self.sources, self.plan = self.prepared.sources, self.prepared.plan
        self.compute_dtype, self.out_dtype = self.prepared.compute_dtype, self.prepared.out_dtype
        t0 = time.perf_counter()
        self.model = build_model(self.prepared.model_config(), self.device, self.out_dtype)
        self._targets = self._bind_targets()
        self._inputs = self._load_inputs()
        for source in self.sources.values():    # mapped files would stay in RSS (page cache) for the study's life
            (source.base if isinstance(source, AdapterSource) else source).release()
        self._tokenizer = None
        self.last = MaterializeStats(0.0, 0)
        log.info("engine ready: %d tensors, %.1f MB resident inputs, %.2fs", len(self.plan),
                 self.resident_bytes() / 1e6, time.perf_counter() - t0)

    # ---- set-up (once) -----------------------------------------------------------------------
    def _bind_targets(self) -> list[torch.Tensor]:
        params = dict(self.model.named_parameters(remove_duplicate=False))
        buffers = dict(self.model.named_buffers(remove_duplicate=False))   # merged buffers (GLM-4-MoE's bias)
        targets = []
        for task in self.plan:
            place = params.get(task.out_name, buffers.get(task.out_name))
            if place is None:
                raise MergeConfigError(f"merged tensor {task.out_name!r} has no place in the "
                                       f"{type(self.model).__name__} model", "plan")
            targets.append(place.data)
        planned = {t.out_name for t in self.plan}
        tied = {name for name, p in params.items() if name not in planned
                and any(p.data_ptr() == t.data_ptr() for t in targets)}
        missing = sorted(set(params) - planned - tied)
        if missing:
            raise MergeConfigError(f"no merged value for model parameter {missing[0]!r}", "plan")
        return targets

    def _load_inputs(self) -> list[TensorInputs]:
        store = "cpu" if self.offload else self.device
        read: dict[tuple[str, str], torch.Tensor] = {}     # tensors read, while a later task still needs them
        uses = Counter(key for task in self.plan for key in task.sources)
        shared: dict[tuple, torch.Tensor] = {}
        inputs = []
        for task, target in zip(self.plan, self._targets):
            item = build_inputs(task, self.sources, self.method, self.compute_dtype, store, shared)
            if item is not None:            # LoRA sources: the base held once, updates low-rank where possible
                if self.method.delta_based:
                    item.drop_raw()
                item.out, item.reused = target, True
                inputs.append(item)
                continue
            tensors = []
            for key in task.sources:
                if key not in read:
                    tensor = self.sources[key[0]].read(key[1], self.compute_dtype, store)
                    read[key] = tensor.pin_memory() if self.offload else tensor
                uses[key] -= 1
                # the last use lets go: a delta method keeps base + task vectors, not every model's raw tensor
                tensors.append(read[key] if uses[key] else read.pop(key))
            item = TensorInputs(task.out_name, [ref for ref, _ in task.sources], tensors, task.base_index)
            if self.method.delta_based:
                item.drop_raw()
            item.out = target           # methods that can write the merge straight into the live parameter
            item.reused = True          # statistics that make later trials cheaper are worth computing
            inputs.append(item)
        return inputs

    # ---- per trial ---------------------------------------------------------------------------
    @torch.no_grad()
    def materialize(self, config: MergeConfig | None = None, seed: int | None = None,
                    check_finite: bool = False):
        """Write the merge described by `config` into the live model in place and return the model.

        Each tensor is merged with single-threaded operations (`one_thread_per_op`); on CPU, as many tensors at
        once as torch has threads.
        """
        config = config or self.config
        if config.structure != self.config.structure:
            raise MergeConfigError("this engine was built for a different merge (method, models, slices or "
                                   "dtypes changed); build a new engine", "config")
        seed = self.seed if seed is None else seed
        t0 = time.perf_counter()
        jobs = list(zip(self.plan, self._inputs, self._targets))

        @torch.no_grad()   # grad mode is per thread
        def write(job) -> None:
            task, inputs, target = job
            merged = self._merge(task, inputs, config, seed)
            if merged is not target:
                target.copy_(merged)
            # Checked in the live model's dtype: a finite merge can still overflow on the cast to out_dtype.
            if check_finite and not all_finite(target):
                why = "" if merged is target or not all_finite(merged) else (
                    f" (overflow on the cast from {self.compute_dtype} to {self.out_dtype})")
                raise NonFiniteMerge(f"non-finite values in merged tensor {task.out_name}{why}")

        with one_thread_per_op() as threads:
            if threads > 1 and self.device.type == "cpu":
                with ThreadPoolExecutor(threads) as pool:
                    for _ in pool.map(write, jobs):
                        pass
            else:
                for job in jobs:
                    write(job)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.last = MaterializeStats(time.perf_counter() - t0, len(self.plan))
        return self.model

    def _merge(self, task: TensorTask, inputs: TensorInputs, config: MergeConfig, seed: int) -> torch.Tensor:
        if not self.offload:
            return merge_one(task, inputs, config, self.method, seed)
        on_device = inputs.to(self.device, non_blocking=True)
        merged = merge_one(task, on_device, config, self.method, seed)
        inputs.keep_memo_from(on_device)
        return merged

    # ---- facts -------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        """The tokenizer of the config's tokenizer source (base model, else first model), loaded once."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_source())
        return self._tokenizer

    def tokenizer_source(self) -> Path:
        return self.prepared.tokenizer_folder()

    def resident_bytes(self) -> int:
        return sum(i.resident_bytes() for i in self._inputs)


class SoupEngine:
    """Uniform soups of many same-shaped checkpoints in one live model, O(1) memory in their number.

    Keeps a float32 running sum of the kept ingredients; `show_single(i)` and `show_with(i)` write x_i
    or (sum + x_i) / (k + 1) into the live model, streaming x_i tensor by tensor from disk (safetensors
    mmap); `keep(i)` adds x_i to the sum. The result equals mergekit's linear merge with equal weights.
    """

    def __init__(self, checkpoints: list[Path | str], device: str | torch.device = "auto",
                 dtype: str | None = None, allow_pickle: bool = False):
        self.device = pick_device(device)
        self.sources = [ModelSource(p, ref=str(p), allow_pickle=allow_pickle) for p in checkpoints]
        if not self.sources:
            raise MergeConfigError("no checkpoints to soup", "checkpoints")
        check_compatible({s.ref: s for s in self.sources})
        first = self.sources[0]
        self.out_dtype = torch_dtype(dtype, "dtype") or stored_float_dtype(self.sources)
        self.names = [n for n in first.tensor_names if not (n == "lm_head.weight" and first.tied_embeddings)]
        self.model = build_model(first.config, self.device, self.out_dtype)
        params = dict(self.model.named_parameters(remove_duplicate=False))
        unknown = [n for n in self.names if n not in params]
        if unknown:
            raise MergeConfigError(f"tensor {unknown[0]!r} has no place in the model", f"model {first.ref}")
        self._targets = {n: params[n].data for n in self.names}
        self._sum: dict[str, torch.Tensor] | None = None
        self.kept: list[int] = []
        self._tokenizer = None

    def _read(self, i: int, name: str) -> torch.Tensor:
        return self.sources[i].read(name, torch.float32, self.device)

    @torch.no_grad()
    def show_single(self, i: int):
        """Live model = checkpoint i."""
        for name, target in self._targets.items():
            target.copy_(self._read(i, name))
        return self.model

    @torch.no_grad()
    def show_with(self, i: int | None):
        """Live model = uniform average of the kept ingredients plus ingredient i (None: kept only)."""
        k = len(self.kept) + (i is not None)
        if k == 0:
            raise ValueError("empty soup")
        for name, target in self._targets.items():
            total = self._sum[name].clone() if self._sum is not None else None
            if i is not None:
                x = self._read(i, name)
                total = x if total is None else total.add_(x)
            target.copy_(total.div_(k))
        return self.model

    @torch.no_grad()
    def keep(self, i: int) -> None:
        """Add ingredient i to the running sum."""
        if self._sum is None:
            self._sum = {name: self._read(i, name).clone() for name in self.names}
        else:
            for name in self.names:
                self._sum[name].add_(self._read(i, name))
        self.kept.append(i)

    def reset(self) -> None:
        """Empty the soup."""
        self._sum = None
        self.kept = []

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.sources[0].path)
        return self._tokenizer

