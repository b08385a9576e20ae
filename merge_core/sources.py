"""Reading source models: local Hugging Face folders, sharded safetensors read lazily, architecture checks.

Owns every read of model weights from disk. Never downloads, never runs code from a model folder,
and reads pickle (.bin) weights only when explicitly allowed.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from merge_core.architectures import Architecture, find_architecture, require_architecture
from merge_core.errors import MergeConfigError
from merge_core.hub import not_found_hint

log = logging.getLogger(__name__)

SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64,
}


def torch_dtype(name: str | None, where: str = "dtype") -> torch.dtype | None:
    """The torch dtype for a config dtype name (None stays None)."""
    if name is None:
        return None
    try:
        return DTYPES[str(name).removeprefix("torch.")]
    except KeyError:
        raise MergeConfigError(f"unknown dtype {name!r} (use one of float32, float16, bfloat16)", where) from None


@dataclass(frozen=True)
class TensorMeta:
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class _Stored:
    """How a checkpoint stores one tensor of the architecture table: under another name (an alias), or as
    per-expert tensors to fuse (`parts[k][e]`: part k of expert e; stacked over e, parts concatenated on axis 1)."""

    alias: str | None = None
    parts: tuple[tuple[str, ...], ...] = ()


class ModelSource:
    """One local model folder: its config.json, a tensor index across shards, and lazy tensor reads.

    When the architecture is in the table (`arch`), tensors are seen under the table's names: a tensor stored under
    an alias (GPT-2 without `transformer.`), or per expert where transformers v5 fuses the experts (Mixtral,
    Qwen3-MoE), is listed (`meta`) and read under the table's name. Stored tensors the table does not name are
    listed as they are and never merged.
    """

    def __init__(self, path: Path | str, ref: str | None = None, allow_pickle: bool = False):
        self.path = Path(path)
        self.ref = ref or str(path)
        where = f"model {self.ref}"
        if not self.path.is_dir():
            name = self.ref.partition("+")[0].partition("@")[0]
            raise MergeConfigError(f"model folder not found at {self.path}{not_found_hint(name)}", where)
        config_file = self.path / "config.json"
        if not config_file.is_file():
            raise MergeConfigError(f"no config.json in {self.path}", where)
        try:
            self.config: dict = json.loads(config_file.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise MergeConfigError(f"unreadable config.json: {err}", where) from None
        self._handles: dict[Path, object] = {}
        self.pickle = False
        self.weight_map, self.stored_meta = self._index(allow_pickle)
        self.arch: Architecture | None = find_architecture(self.config)
        self._stored: dict[str, _Stored] = {}
        self.claimed: frozenset[str] = frozenset()
        self.meta: dict[str, TensorMeta] = dict(self.stored_meta)
        if self.arch is not None:
            self._map_to_table()

    # ---- the table's view ------------------------------------------------------------------------
    def _map_to_table(self) -> None:
        """Find each tensor of the table in the checkpoint: as named, under an alias, or as per-expert tensors."""
        stored = self.stored_meta
        claimed: dict[str, TensorMeta] = {}
        consumed: set[str] = set()
        for weight in self.arch.all_weights(self.config):
            if weight.name in stored:
                claimed[weight.name] = stored[weight.name]
                consumed.add(weight.name)
                continue
            alias = next((a for a in weight.aliases if a in stored), None)
            if alias is not None:
                self._stored[weight.name] = _Stored(alias=alias)
                claimed[weight.name] = stored[alias]
                consumed.add(alias)
                continue
            for way in weight.experts:
                parts = _expert_parts(way, stored)
                if parts:
                    self._stored[weight.name] = _Stored(parts=parts)
                    claimed[weight.name] = self._fused_meta(weight.name, parts)
                    consumed.update(n for part in parts for n in part)
                    break
        self.claimed = frozenset(claimed)
        self.meta = {**claimed, **{n: m for n, m in stored.items() if n not in consumed}}

    def _fused_meta(self, name: str, parts: tuple[tuple[str, ...], ...]) -> TensorMeta:
        metas = [self.stored_meta[n] for part in parts for n in part]
        first = metas[0]
        if any(m.shape != first.shape or m.dtype != first.dtype for m in metas):
            raise MergeConfigError(f"the per-expert tensors of {name!r} differ in shape or dtype",
                                   f"model {self.ref}")
        rows = first.shape[0] * len(parts) if first.shape else len(parts)
        return TensorMeta((len(parts[0]), rows, *first.shape[1:]), first.dtype)

    def require_arch(self) -> Architecture:
        """The table's entry for this model, or a one-line error naming its architecture and the known ones."""
        return self.arch or require_architecture(self.config, f"model {self.ref}")

    # ---- index -------------------------------------------------------------------------------
    def _index(self, allow_pickle: bool) -> tuple[dict[str, Path], dict[str, TensorMeta]]:
        files = self._safetensors_files()
        if not files:
            pickles = self._pickle_files()
            if not pickles:
                raise MergeConfigError(f"no model weights (*.safetensors) in {self.path}", f"model {self.ref}")
            if not allow_pickle:
                raise MergeConfigError(
                    "has only pickle weights (.bin), which can run code when loaded; convert to safetensors "
                    "or pass --allow-pickle if you trust it", f"model {self.ref}")
            return self._index_pickles(pickles)
        weight_map: dict[str, Path] = {}
        meta: dict[str, TensorMeta] = {}
        for file in files:
            handle = self._open(file)
            for name in handle.keys():
                sl = handle.get_slice(name)
                meta[name] = TensorMeta(tuple(sl.get_shape()), _safetensors_dtype(sl.get_dtype(), file))
                weight_map[name] = file
        return weight_map, meta

    def _safetensors_files(self) -> list[Path]:
        index = self.path / SAFETENSORS_INDEX
        if index.is_file():
            try:
                names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (OSError, json.JSONDecodeError, KeyError) as err:
                raise MergeConfigError(f"bad {SAFETENSORS_INDEX}: {err}", f"model {self.ref}") from None
            missing = [n for n in names if not (self.path / n).is_file()]
            if missing:
                raise MergeConfigError(f"shard {missing[0]} listed in {SAFETENSORS_INDEX} is missing",
                                       f"model {self.ref}")
            return [self.path / n for n in names]
        return sorted(self.path.glob("*.safetensors"))

    def _pickle_files(self) -> list[Path]:
        return sorted(self.path.glob("pytorch_model*.bin"))

    def _index_pickles(self, files: list[Path]) -> tuple[dict[str, Path], dict[str, TensorMeta]]:
        self.pickle = True
        self._pickled: dict[str, torch.Tensor] = {}
        weight_map, meta = {}, {}
        for file in files:
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as err:  # noqa: BLE001 - any unpickling failure is a bad file
                text = str(err)
                if "Weights only load failed" in text:   # torch's advice (weights_only=False) is not ours
                    found = re.search(r"GLOBAL (\S+)", text)
                    raise MergeConfigError(
                        f"refused {file.name}: it holds objects besides tensors"
                        f"{f' ({found.group(1)})' if found else ''}, which could run code when loaded",
                        f"model {self.ref}") from None
                first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
                raise MergeConfigError(f"cannot read {file.name}: {first}", f"model {self.ref}") from None
            for name, tensor in state.items():
                self._pickled[name] = tensor
                weight_map[name] = file
                meta[name] = TensorMeta(tuple(tensor.shape), tensor.dtype)
        return weight_map, meta

    def _open(self, file: Path):
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(file), framework="pt")
            except Exception as err:  # noqa: BLE001 - safetensors raises several types for bad files
                raise MergeConfigError(f"corrupt or truncated safetensors file {file.name}: {err}",
                                       f"model {self.ref}") from None
        return self._handles[file]

    # ---- facts -------------------------------------------------------------------------------
    @property
    def tensor_names(self) -> list[str]:
        return list(self.meta)

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or [self.config.get("model_type", "?")]
        return archs[0]

    @property
    def model_type(self) -> str:
        return self.config.get("model_type", "?")

    @property
    def num_layers(self) -> int:
        """The layer count its config declares (under the architecture's key: `n_layer` for GPT-2)."""
        if self.arch is not None:
            return self.arch.num_layers(self.config)
        return int(self.config.get("num_hidden_layers", 0))

    @property
    def vocab_size(self) -> int | None:
        return self.config.get("vocab_size")

    @property
    def tied_embeddings(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", False))

    def nbytes(self) -> int:
        return sum(_numel(m.shape) * _itemsize(m.dtype) for m in self.stored_meta.values())

    # ---- reads -------------------------------------------------------------------------------
    def read(self, name: str, dtype: torch.dtype | None = None, device: torch.device | str | None = None
             ) -> torch.Tensor:
        """Read one tensor (cast to dtype, moved to device)."""
        if name not in self.meta:
            raise MergeConfigError(f"tensor {name!r} is missing", f"model {self.ref}")
        how = self._stored.get(name)
        if how is None:
            tensor = self._read_stored(name)
        elif how.alias is not None:
            tensor = self._read_stored(how.alias)
        else:
            tensor = fuse_experts([[self._read_stored(n) for n in part] for part in how.parts])
        if dtype is not None and tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        if device is not None:
            tensor = tensor.to(device)
        return tensor


    def release(self) -> None:
        """Close the open weight files. Their mappings go with them, except where a tensor read without a copy still
        uses one (it keeps its own); a later read opens the file again."""
        self._handles.clear()

    def _read_stored(self, name: str) -> torch.Tensor:
        if self.pickle:
            return self._pickled[name]
        try:
            return self._open(self.weight_map[name]).get_tensor(name)
        except Exception as err:  # noqa: BLE001
            raise MergeConfigError(f"cannot read tensor {name!r} from {self.weight_map[name].name}: {err}",
                                   f"model {self.ref}") from None


def _expert_parts(way: tuple[str, ...], stored) -> tuple[tuple[str, ...], ...]:
    """Per part template (with `{e}`), the stored names of experts 0, 1, ... as long as every part has one."""
    count = 0
    while all(p.replace("{e}", str(count)) in stored for p in way):
        count += 1
    return tuple(tuple(p.replace("{e}", str(e)) for e in range(count)) for p in way) if count else ()


def fuse_experts(parts: list[list[torch.Tensor]]) -> torch.Tensor:
    """Per-expert tensors as transformers v5 fuses them: each part stacked over the experts, parts joined on axis 1."""
    stacked = [torch.stack(p) for p in parts]
    return stacked[0] if len(stacked) == 1 else torch.cat(stacked, dim=1)


def _safetensors_dtype(code: str, file: Path) -> torch.dtype:
    table = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}
    if code not in table:
        raise MergeConfigError(f"unsupported tensor dtype {code}", str(file))
    return table[code]


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def check_compatible(sources: dict[str, ModelSource], same_layers: bool = True) -> None:
    """Sources must share architecture, vocabulary size and (unless slicing) tensor names and shapes.

    Raises MergeConfigError naming the first model and tensor that disagree with the reference source:
    the one whose tensor names and shapes most sources share (ties: the earlier one), so that the model
    at fault is named, not the first one listed.
    """
    first = _reference(sources) if same_layers else next(iter(sources.values()))
    for ref, other in sources.items():
        if other is first:
            continue
        where = f"model {ref}"
        if other.architecture != first.architecture:
            raise MergeConfigError(
                f"architecture {other.architecture} differs from {first.architecture} of {first.ref}", where)
        if other.vocab_size != first.vocab_size:
            raise MergeConfigError(
                f"vocab size {other.vocab_size} differs from {first.vocab_size} of {first.ref} "
                "(merging different vocabularies is not supported)", where)
        if not same_layers:
            continue
        if other.num_layers != first.num_layers:
            raise MergeConfigError(
                f"has {other.num_layers} layers, {first.ref} has {first.num_layers} (use slices to merge "
                "different depths)", where)
        _check_tensor_sets(first, other)


def _reference(sources: dict[str, ModelSource]) -> ModelSource:
    """The source whose (architecture, vocab, tensor names and shapes) most sources share."""
    def key(s: ModelSource):
        return (s.architecture, s.vocab_size, frozenset((n, m.shape) for n, m in _comparable(s).items()))

    keys = [key(s) for s in sources.values()]
    counts = {k: keys.count(k) for k in keys}
    best = max(counts.values())
    return next(s for s, k in zip(sources.values(), keys) if counts[k] == best)


def _check_tensor_sets(first: ModelSource, other: ModelSource) -> None:
    where = f"model {other.ref}"
    names_a, names_b = _comparable(first), _comparable(other)
    for name in sorted(names_a.keys() - names_b.keys()):
        raise MergeConfigError(f"tensor {name!r} is missing (present in {first.ref})", where)
    for name in sorted(names_b.keys() - names_a.keys()):
        raise MergeConfigError(f"has extra tensor {name!r} (absent in {first.ref})", where)
    for name in sorted((names_a.keys() & names_b.keys()) | (_tied_heads(first) & _tied_heads(other))):
        a, b = first.meta.get(name), other.meta.get(name)
        if a is not None and b is not None and a.shape != b.shape:
            raise MergeConfigError(f"tensor {name!r} has shape {list(b.shape)}, {first.ref} has {list(a.shape)}",
                                   where)


def _comparable(source: ModelSource) -> dict[str, TensorMeta]:
    """The tensors a merge reads, but heads that a tied checkpoint may leave out (the planner checks those)."""
    names = source.claimed if source.arch is not None else source.meta.keys()
    heads = _tied_heads(source)
    return {n: source.meta[n] for n in names if n not in heads}


def _tied_heads(source: ModelSource) -> set[str]:
    """Tensors that may be left out of a checkpoint and read from the embeddings instead (lm_head.weight, ...)."""
    if source.arch is None:
        return {"lm_head.weight"}
    return {w.name for w in source.arch.post_weights(source.config) if w.tied}
