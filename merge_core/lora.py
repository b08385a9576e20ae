"""LoRA adapters as merge sources: a PEFT adapter folder applied in memory to its base model, tensor by tensor, with
the same arithmetic as PEFT's merge_and_unload (what mergekit runs for `BASE+ADAPTER`), and kept low-rank in the
engine where the method allows it (linear, task_arithmetic).

Reads adapter folders (adapter_config.json + adapter_model.safetensors) and never writes one; builds no PEFT model.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from merge_core.errors import MergeConfigError
from merge_core.hub import not_found_hint
from merge_core.methods.base import MergeMethod, TensorInputs
from merge_core.sources import ModelSource

PREFIX = "base_model.model."
LOW_RANK_METHODS = ("linear", "task_arithmetic")


@dataclass
class LowRank:
    """delta = (b @ a) * scale, transposed for Conv1D layers and embeddings; a and b as PEFT holds them (float32)."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float
    transpose: bool
    embedding: bool

    def delta(self) -> torch.Tensor:
        """PEFT's get_delta_weight, in float32: transpose(b @ a) * scale."""
        out = self.b @ self.a
        return (out.T if self.transpose else out) * self.scale

    def factors(self, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(left, right) with left @ right == delta (up to rounding), in `dtype` on `device`."""
        if self.transpose:
            left, right = self.a.T, self.b.T * self.scale
        else:
            left, right = self.b * self.scale, self.a
        return left.to(device=device, dtype=dtype).contiguous(), right.to(device=device, dtype=dtype).contiguous()


class Adapter:
    """A PEFT LoRA adapter: per tensor of the model, a low-rank update, a replacement (modules_to_save, saved
    embedding layers) or a bias update (lora_bias)."""

    def __init__(self, folder: Path, where: str, allow_pickle: bool = False):
        self.folder = Path(folder)
        self.where = where
        self.config = self._config()
        self.low_rank: dict[str, LowRank] = {}
        self.replace: dict[str, torch.Tensor] = {}
        self.bias: dict[str, torch.Tensor] = {}
        self._parse(self._tensors(allow_pickle))

    # ---- reading ---------------------------------------------------------------------------------
    def _config(self) -> dict:
        path = self.folder / "adapter_config.json"
        if not self.folder.is_dir():
            name = self.where.removeprefix("model ").partition("+")[2].partition("@")[0]
            raise MergeConfigError(f"adapter folder not found at {self.folder}{not_found_hint(name)}", self.where)
        if not path.is_file():
            raise MergeConfigError(f"no adapter_config.json in {self.folder} (a PEFT LoRA adapter folder)", self.where)
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise MergeConfigError(f"unreadable adapter_config.json: {err}", self.where) from None
        if config.get("peft_type", "LORA") != "LORA":
            raise MergeConfigError(f"adapter type {config.get('peft_type')} is not supported (LoRA only)", self.where)
        unsupported = [key for key in ("use_dora", "trainable_token_indices", "target_parameters",
                                       "layer_replication", "lora_ga_config", "use_bdlora", "alora_invocation_tokens")
                       if config.get(key)]
        if unsupported:
            raise MergeConfigError(f"LoRA adapters with {unsupported[0]} are not supported (plain LoRA, rsLoRA, "
                                   "rank/alpha patterns, modules_to_save and lora_bias are)", self.where)
        return config

    def _tensors(self, allow_pickle: bool) -> dict[str, torch.Tensor]:
        st = self.folder / "adapter_model.safetensors"
        if st.is_file():
            try:
                return load_file(str(st))
            except Exception as err:  # noqa: BLE001
                raise MergeConfigError(f"corrupt or truncated {st.name}: {err}", self.where) from None
        pickled = self.folder / "adapter_model.bin"
        if not pickled.is_file():
            raise MergeConfigError(f"no adapter_model.safetensors in {self.folder}", self.where)
        if not allow_pickle:
            raise MergeConfigError("has only a pickle adapter (adapter_model.bin), which can run code when loaded; "
                                   "pass --allow-pickle if you trust it", self.where)
        try:
            return torch.load(pickled, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001
            raise MergeConfigError(f"refused or unreadable adapter_model.bin: {str(err).splitlines()[0]}",
                                   self.where) from None

    def _parse(self, tensors: dict[str, torch.Tensor]) -> None:
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            name = key[len(PREFIX):] if key.startswith(PREFIX) else key
            for suffix, slot in ((".lora_A.weight", "a"), (".lora_B.weight", "b"), (".lora_embedding_A", "ea"),
                                 (".lora_embedding_B", "eb"), (".lora_B.bias", "bias")):
                if name.endswith(suffix):
                    pairs.setdefault(name[:-len(suffix)], {})[slot] = value
                    break
            else:
                if ".lora_" in name or "lora_magnitude_vector" in name:
                    raise MergeConfigError(f"adapter tensor {key!r} is not a plain LoRA weight", self.where)
                # modules_to_save copies and saved embedding layers replace the model's tensor
                self.replace[name.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")] = value
        for module, slots in pairs.items():
            embedding = "ea" in slots
            a, b = (slots.get("ea"), slots.get("eb")) if embedding else (slots.get("a"), slots.get("b"))
            if a is None or b is None or a.dim() != 2 or b.dim() != 2:
                raise MergeConfigError(f"adapter module {module!r}: expected 2-D lora A and B weights (convolution "
                                       "LoRA is not supported)", self.where)
            rank, alpha = self._rank_alpha(module)
            if a.shape[0] != rank or b.shape[1] != rank:
                raise MergeConfigError(f"adapter module {module!r}: rank {a.shape[0]} differs from the config's {rank}",
                                       self.where)
            scale = alpha / math.sqrt(rank) if self.config.get("use_rslora") else alpha / rank
            self.low_rank[f"{module}.weight"] = LowRank(a.float(), b.float(), scale, embedding, embedding)
            if "bias" in slots:
                self.bias[f"{module}.bias"] = slots["bias"].float() * scale

    def _rank_alpha(self, module: str) -> tuple[int, float]:
        """r and lora_alpha of a module, after rank_pattern / alpha_pattern (PEFT's matching: the key is a suffix of
        the module name on a dot boundary, as a regex)."""
        def pick(patterns: dict, default):
            for key, value in (patterns or {}).items():
                if re.match(rf"(.*\.)?({key})$", module):
                    return value
            return default

        return int(pick(self.config.get("rank_pattern"), self.config.get("r", 8))), float(
            pick(self.config.get("alpha_pattern"), self.config.get("lora_alpha", 8)))

    @property
    def names(self) -> set[str]:
        """The model tensors this adapter changes."""
        return set(self.low_rank) | set(self.replace) | set(self.bias)


class AdapterSource(ModelSource):
    """A base ModelSource with a LoRA adapter applied on read: same tensor names and shapes, new values."""

    def __init__(self, base: ModelSource, adapter_folder: Path, ref: str, allow_pickle: bool = False):
        self.__dict__.update(base.__dict__)      # the base's config, index and open file handles, shared
        self.base = base
        self.ref = ref
        self.adapter = Adapter(adapter_folder, f"model {ref}", allow_pickle)
        self.adapter_path = Path(adapter_folder)
        self._check()

    def _check(self) -> None:
        for name in sorted(self.adapter.names):
            if name not in self.meta:
                raise MergeConfigError(f"the adapter changes {name!r}, which {self.base.ref} does not have "
                                       "(an adapter for another model?)", f"model {self.ref}")
        for name, update in self.adapter.low_rank.items():
            shape = self.meta[name].shape
            rows, cols = update.b.shape[0], update.a.shape[1]
            if update.embedding:                 # lora_embedding_B @ lora_embedding_A is [dim, vocab]
                if (cols, rows) != shape:
                    raise MergeConfigError(f"the adapter's embedding update of {name!r} has shape [{cols}, {rows}], "
                                           f"the tensor {list(shape)}", f"model {self.ref}")
                continue
            if (rows, cols) == shape and (cols, rows) != shape:
                update.transpose = False
            elif (cols, rows) == shape and (rows, cols) != shape:
                update.transpose = True
            elif (rows, cols) == shape:      # square: Conv1D layers (GPT-2) hold the transpose, as PEFT knows
                update.transpose = name.removesuffix(".weight") in _conv1d_modules(self.config)
            else:
                raise MergeConfigError(f"the adapter's update of {name!r} has shape [{rows}, {cols}], the tensor "
                                       f"{list(shape)}", f"model {self.ref}")

    def read(self, name: str, dtype: torch.dtype | None = None, device=None) -> torch.Tensor:
        """The base's tensor with the adapter applied as PEFT merges it, then cast to dtype and moved to device."""
        tensor = self.base.read(name)
        tensor = self._dense(name, tensor)
        update = self.adapter.low_rank.get(name)
        if update is not None:
            delta = update.delta()
            if update.embedding:                               # PEFT: weight += delta.to(weight.dtype)
                tensor = tensor + delta.to(tensor.dtype)
            else:                                              # PEFT: weight += delta (computed in float32)
                tensor = torch.add(tensor, delta).to(tensor.dtype)
        if dtype is not None and tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        return tensor.to(device) if device is not None else tensor

    def _dense(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """The tensor before its low-rank update: replaced (modules_to_save) and with its LoRA bias added."""
        if name in self.adapter.replace:
            tensor = self.adapter.replace[name].to(tensor.dtype)
        if name in self.adapter.bias:
            tensor = torch.add(tensor, self.adapter.bias[name]).to(tensor.dtype)
        return tensor

    # ---- the low-rank view (engine) -------------------------------------------------------------------
    def dense_key(self, name: str) -> tuple:
        if name in self.adapter.replace or name in self.adapter.bias:
            return ("adapter", str(self.adapter_path), name)
        return dense_key(self.base, name)

    def read_dense(self, name: str, dtype: torch.dtype, device) -> torch.Tensor:
        return self._dense(name, self.base.read(name)).to(dtype).to(device)

    def factors(self, name: str) -> LowRank | None:
        return self.adapter.low_rank.get(name)


def dense_key(source: ModelSource, name: str) -> tuple:
    """What identifies the full-rank part of `name` in `source`: sources sharing it read it once."""
    if isinstance(source, AdapterSource):
        return source.dense_key(name)
    return ("model", str(source.path.resolve()), name)


@lru_cache(maxsize=32)
def _conv1d_modules_cached(config_json: str) -> frozenset[str]:
    try:   # transformers (~1 s to import) only for adapters on Conv1D models: `merge` starts without it
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.pytorch_utils import Conv1D

        config = json.loads(config_json)
        hf_config = AutoConfig.for_model(config.pop("model_type"), **config)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=False)
        return frozenset(n for n, m in model.named_modules() if isinstance(m, Conv1D))
    except Exception:  # noqa: BLE001 - an architecture transformers cannot build here: no Conv1D known
        return frozenset()


def _conv1d_modules(config: dict) -> frozenset[str]:
    """Names of the transformers Conv1D modules (weights stored [in, out]) of a model with this config."""
    return _conv1d_modules_cached(json.dumps(config, sort_keys=True))


# ---- low-rank merges in the engine ---------------------------------------------------------------------

class LowRankInputs(TensorInputs):
    """The inputs of one output tensor where some sources are a full-rank tensor plus a LoRA update: the full-rank
    tensors once each (sources of one base share it) and the updates as factors, so that n adapters of one base
    cost one dense copy plus their factors. linear and task_arithmetic merge from the factors directly; any other
    method sees dense tensors built on demand (never kept)."""

    def __init__(self, name: str, models: list[str], dense: list[torch.Tensor], keys: list[tuple],
                 factors: list[tuple[torch.Tensor, torch.Tensor] | None], base_index: int | None, dtype: torch.dtype):
        self.name = name
        self.models = list(models)
        self.base_index = base_index
        self.dense, self.keys, self.factors = dense, keys, factors
        self.dtype = dtype
        self._memo: dict[str, Any] = {}
        self._tensors = None
        self._deltas = None
        self._base = None

    def _full(self, i: int) -> torch.Tensor:
        f = self.factors[i]
        return self.dense[i] if f is None else torch.addmm(self.dense[i].reshape(f[0].shape[0], -1), *f
                                                           ).reshape(self.dense[i].shape)

    @property
    def base(self) -> torch.Tensor | None:
        return self._full(self.base_index) if self.base_index is not None else None

    @property
    def tensors(self) -> list[torch.Tensor]:
        return [self._full(i) for i in range(len(self.models))]

    @property
    def deltas(self) -> list[torch.Tensor]:
        if self.base_index is None:
            raise MergeConfigError("this merge method needs a base_model", "base_model")
        base = self.base
        return [self._full(i) - base for i in self.delta_indices]

    def drop_raw(self) -> None:
        pass

    @property
    def device(self) -> torch.device:
        return self.dense[0].device

    def to(self, device, non_blocking: bool = False) -> "LowRankInputs":
        move = (lambda t: t.to(device, non_blocking=non_blocking))
        copy = LowRankInputs(self.name, self.models, [move(d) for d in self.dense], self.keys,
                             [None if f is None else (move(f[0]), move(f[1])) for f in self.factors],
                             self.base_index, self.dtype)
        copy.out, copy.reused = self.out, self.reused
        return copy

    def resident_bytes(self) -> int:
        seen: dict[int, int] = {}
        for t in [*self.dense, *(x for f in self.factors if f is not None for x in f)]:
            seen[t.data_ptr()] = t.numel() * t.element_size()
        return sum(seen.values())

    # ---- the merges -----------------------------------------------------------------------------------
    def merge_low_rank(self, method: MergeMethod, params: dict, model_params: list[dict]) -> torch.Tensor | None:
        """linear / task_arithmetic as sum_k c_k dense_k + (sum_i c_i L_i R_i); None for other methods."""
        if method.name == "linear":
            weights = [p["weight"] for p in model_params]
            if params["normalize"] and sum(weights) == 0:
                return None                      # the dense path gives mergekit's inf/nan
            coeffs = [w / sum(weights) for w in weights] if params["normalize"] else weights
            dense_terms: dict[tuple, list] = {}
            for i, c in enumerate(coeffs):
                dense_terms.setdefault(self.keys[i], [self.dense[i], 0.0])[1] += c
            return self._combine(None, list(dense_terms.values()), coeffs)
        if method.name == "task_arithmetic" and self.base_index is not None:
            others = self.delta_indices
            weights = [model_params[i]["weight"] for i in others]
            total = sum(weights)
            scale = params["lambda"] / (total if params["normalize"] and abs(total) >= 1e-8 else 1.0)
            coeffs = [0.0] * len(self.models)
            for i, w in zip(others, weights):
                coeffs[i] = w * scale
            b = self.base_index
            coeffs[b] = -sum(coeffs)
            dense_terms = {}
            for i in others:
                if self.keys[i] != self.keys[b]:
                    entry = dense_terms.setdefault(self.keys[i], [self.dense[i], 0.0])
                    entry[1] += coeffs[i]
            # base + sum_k C_k (dense_k - base_dense) + low-rank terms (the base's own update weighted 1 - sum c)
            moved = sum(c for _, c in dense_terms.values())
            terms = list(dense_terms.values()) + ([[self.dense[b], -moved]] if dense_terms else [])
            coeffs[b] += 1.0
            return self._combine(self.dense[b], terms, coeffs)
        return None

    def _combine(self, start: torch.Tensor | None, dense_terms: list, coeffs: list[float]) -> torch.Tensor:
        like = self.dense[0]
        work = torch.float64 if like.dtype == torch.float64 else torch.float32
        out = torch.zeros(like.shape, dtype=work, device=like.device) if start is None else start.to(work).clone()
        for tensor, c in dense_terms:
            if c != 0.0:
                out.add_(tensor.to(work), alpha=c)
        lefts = [f[0] * c for f, c in zip(self.factors, coeffs) if f is not None and c != 0.0]
        rights = [f[1] for f, c in zip(self.factors, coeffs) if f is not None and c != 0.0]
        if lefts:
            flat = out.view(lefts[0].shape[0], -1)
            flat.addmm_(torch.cat(lefts, dim=1).to(work), torch.cat(rights, dim=0).to(work))
        result = out.to(like.dtype)
        target = self.new_output(result)
        if target is not result:
            target.copy_(result)
        return target


def build_inputs(task, sources: dict[str, ModelSource], method: MergeMethod, dtype: torch.dtype, device,
                 cache: dict) -> TensorInputs | None:
    """The engine's resident inputs of a task with an adapter among its sources (None without one: the engine reads
    as usual). `cache` (shared across tasks) holds each tensor once: sources that leave a tensor as their base has
    it read one copy. Where the method merges from factors (linear, task_arithmetic), updates stay low-rank
    (LowRankInputs, which keeps no dense task vectors); for other methods adapted tensors are held dense.
    """
    if not any(isinstance(sources[ref], AdapterSource) for ref, _ in task.sources):
        return None
    ups = [sources[ref].factors(name) if isinstance(sources[ref], AdapterSource) else None
           for ref, name in task.sources]
    low_rank = method.name in LOW_RANK_METHODS      # also where no adapter updates it: no dense deltas kept

    def load(key, read):
        if key not in cache:
            cache[key] = read()
        return cache[key]

    dense, keys, factors = [], [], []
    for (ref, name), up in zip(task.sources, ups):
        source = sources[ref]
        if up is None or low_rank:
            key = dense_key(source, name)
            part = (lambda s=source, n=name: s.read_dense(n, dtype, device)) if isinstance(source, AdapterSource) \
                else (lambda s=source, n=name: s.read(n, dtype, device))
        else:
            key, part = ("full", ref, name), (lambda s=source, n=name: s.read(n, dtype, device))
        dense.append(load(key, part))
        keys.append(key)
        work = torch.float64 if dtype == torch.float64 else torch.float32
        factors.append(up.factors(work, device) if up is not None and low_rank else None)
    refs = [ref for ref, _ in task.sources]
    if low_rank and dense[0].is_floating_point():
        return LowRankInputs(task.out_name, refs, dense, keys, factors, task.base_index, dtype)
    if low_rank:        # a non-float tensor: no factors to keep
        dense = [sources[ref].read(name, dtype, device) for ref, name in task.sources]
    return TensorInputs(task.out_name, refs, dense, task.base_index)
