"""Writing merged models: streaming sharded safetensors, config, tokenizer and model card, atomically.

Owns every write of a model folder and the `mergesearch merge` command. A crash never leaves a
half-written model: everything goes to a temporary sibling folder that is renamed at the end.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import struct
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from merge_core.config import MergeConfig, dump_config
from merge_core.errors import MergeConfigError
from merge_core.methods import TensorInputs, get_method
from merge_core.plan import TensorTask, all_finite, merge_one, one_thread_per_op
from merge_core.prepare import prepare

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")
ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL"}


def parse_size(text: str | int) -> int:
    """'5B' -> 5e9 bytes, '500M' -> 5e8, '64K' -> 64e3, plain digits are bytes."""
    if isinstance(text, int):
        return text
    value = str(text).strip().upper()
    scale = {"K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}
    try:
        if value and value[-1] in scale:
            size = int(float(value[:-1]) * scale[value[-1]])
        else:
            size = int(value)
    except ValueError:
        raise MergeConfigError(f"bad size {text!r} (e.g. 500M, 5B)", "--out-shard-size") from None
    if size <= 0:
        raise MergeConfigError(f"size must be positive, got {text!r}", "--out-shard-size")
    return size


# ---- streaming safetensors -------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = torch.empty((), dtype=self.dtype).element_size()
        for s in self.shape:
            n *= s
        return n


def plan_shards(specs: list[TensorSpec], max_bytes: int) -> list[list[TensorSpec]]:
    """Split tensors, in order, into shards of at most max_bytes (a bigger tensor gets a shard of its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


class SafetensorsStream:
    """A safetensors file written tensor by tensor: the header is known up front from the specs."""

    def __init__(self, path: Path, specs: list[TensorSpec]):
        self.path = path
        self.specs = {s.name: s for s in specs}
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for s in specs:
            header[s.name] = {"dtype": ST_DTYPES[s.dtype], "shape": list(s.shape),
                              "data_offsets": [offset, offset + s.nbytes]}
            offset += s.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._order = [s.name for s in specs]
        self._next = 0
        self._file = open(path, "wb")
        self._file.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected = self._order[self._next]
        spec = self.specs[name]
        if name != expected or tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise RuntimeError(f"writer got {name} {tuple(tensor.shape)} {tensor.dtype}, expected {expected}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        self._file.write(memoryview(data))
        self._next += 1

    def close(self) -> None:
        self._file.close()
        if self._next != len(self._order):
            raise RuntimeError(f"{self.path.name}: {len(self._order) - self._next} tensors never written")


def write_safetensors_shards(folder: Path, specs: list[TensorSpec], tensors: Iterable[tuple[str, torch.Tensor]],
                             max_shard_bytes: int) -> list[Path]:
    """Stream `tensors` (in spec order) into model.safetensors or model-0000i-of-0000n shards + index."""
    shards = plan_shards(specs, max_shard_bytes)
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    shard_of = {s.name: i for i, shard in enumerate(shards) for s in shard}
    streams: list[SafetensorsStream | None] = [None] * n
    it = iter(tensors)
    for i, shard in enumerate(shards):
        streams[i] = SafetensorsStream(folder / names[i], shard)
        for _ in shard:
            name, tensor = next(it)
            if shard_of.get(name) != i:
                raise RuntimeError(f"tensor {name} out of order")
            streams[i].write(name, tensor)
        streams[i].close()
    if n > 1:
        index = {"metadata": {"total_size": sum(s.nbytes for s in specs)},
                 "weight_map": {s.name: names[shard_of[s.name]] for s in specs}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return [folder / name for name in names]


# ---- model folders ------------------------------------------------------------------------------
def model_card(config_yaml: str, title: str = "Merged model", extra: str = "") -> str:
    """README.md for a merged model: what it is, the merge YAML, and optional extra sections (scores)."""
    return (f"---\ntags:\n- merge\n- mergesearch\n---\n# {title}\n\n"
            "This model was merged with mergesearch, whose merges equal "
            "[mergekit](https://github.com/arcee-ai/mergekit)'s for the same YAML; the configuration below "
            "runs unchanged in `mergekit-yaml`.\n\n"
            f"{extra.strip()}\n\n## Merge configuration\n\n```yaml\n{config_yaml.strip()}\n```\n")


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs on this machine (someone else's counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_siblings(target: Path) -> None:
    """Delete `.NAME.partial-PID` / `.NAME.old-PID` folders left by killed writers (their PID is gone): a killed
    7B export leaves gigabytes behind otherwise. Folders of live processes are left alone."""
    for path in target.parent.glob(f".{target.name}.*-*"):
        kind, _, pid = path.name[len(target.name) + 2:].rpartition("-")
        if kind in ("partial", "old") and pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


class AtomicFolder:
    """A temporary sibling folder that replaces `target` on success and disappears on failure."""

    def __init__(self, target: Path, force: bool = False):
        self.target = Path(os.path.abspath(target))
        if self.target.exists() and not force:
            raise MergeConfigError("output folder already exists (pass --force to replace it)", str(target))
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = self.target.parent / f".{self.target.name}.partial-{os.getpid()}"
            _remove_stale_siblings(self.target)
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp.mkdir()
        except OSError as err:
            blocker = next((p for p in self.target.parents if p.exists() and not p.is_dir()), None)
            why = f"{blocker} is a file, not a folder" if blocker is not None else err.strerror
            raise MergeConfigError(f"cannot create the output folder: {why}", str(target)) from None

    def __enter__(self) -> Path:
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            if isinstance(exc, OSError):
                raise MergeConfigError(f"writing failed: {exc.strerror or exc}", str(self.target)) from None
            return False
        old = None
        if self.target.exists():
            old = self.target.parent / f".{self.target.name}.old-{os.getpid()}"
            os.replace(self.target, old)
        os.replace(self.tmp, self.target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return False


def check_output_folder(target: Path, inputs: Iterable[Path], force: bool = False) -> None:
    """Refuse, before any work, an output folder that exists (unless `force`) or that is, or holds, one of the
    `inputs` (never, even with `force`: replacing it would destroy what the merge reads)."""
    target = Path(os.path.abspath(target))
    real = target.resolve()
    for source in inputs:
        source_real = Path(source).resolve()
        if source_real == real or real in source_real.parents:
            what = "is" if source_real == real else "holds"
            raise MergeConfigError(f"the output folder {what} one of this merge's inputs ({source}); "
                                   "write the model to another folder", str(target))
    if target.exists() and not force:
        raise MergeConfigError("output folder already exists (pass --force to replace it)", str(target))
    blocker = next((p for p in target.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise MergeConfigError(f"cannot create the output folder: {blocker} is a file, not a folder", str(target))


def write_model_folder(out_dir: Path, specs: list[TensorSpec], tensors: Iterable[tuple[str, torch.Tensor]], *,
                       model_config: dict, config_yaml: str, source_folder: Path, tokenizer_folder: Path | None,
                       max_shard_bytes: int = 5 * 10**9, card_extra: str = "", force: bool = False) -> Path:
    """Write a complete HF model folder atomically: shards (+index), config.json, generation config,
    tokenizer files, README.md card and mergekit_config.yml."""
    with AtomicFolder(out_dir, force=force) as tmp:
        write_safetensors_shards(tmp, specs, tensors, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(model_config, indent=2, sort_keys=True) + "\n")
        generation = source_folder / "generation_config.json"
        if generation.is_file():
            shutil.copyfile(generation, tmp / "generation_config.json")
        if tokenizer_folder is not None:
            copied = [f for f in TOKENIZER_FILES if (tokenizer_folder / f).is_file()]
            for name in copied:
                shutil.copyfile(tokenizer_folder / name, tmp / name)
            if not copied:
                log.warning("no tokenizer files found in %s", tokenizer_folder)
        (tmp / "mergekit_config.yml").write_text(config_yaml)
        (tmp / "README.md").write_text(model_card(config_yaml, extra=card_extra))
    return Path(out_dir)


# ---- the streaming merge -------------------------------------------------------------------------
def streamed_tensors(plan: list[TensorTask], read: Callable[[str, str], torch.Tensor], config: MergeConfig,
                     out_dtype: torch.dtype, seed: int, prefetch: bool = True, out_numel: int | None = None
                     ) -> Iterator[tuple[str, torch.Tensor]]:
    """Merge tensor by tensor and yield the results in plan order: read one tensor's sources, merge, yield, forget.

    With `prefetch`, the following tensors are read and merged on worker threads (as many at once as torch has
    threads, at least 2; each merge's operations single-threaded, see `one_thread_per_op`) while the caller
    writes this one; without, one tensor at a time: peak memory is one tensor per source plus the output.
    `out_numel` (at least the largest output's numel): merges write into a few reused buffers of that size
    instead of fresh tensors, so a yielded tensor is only valid until the next one is requested.
    """
    method = get_method(config.merge_method)

    @torch.no_grad()
    def merge(task: TensorTask, buffer: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        inputs = TensorInputs(task.out_name, [ref for ref, _ in task.sources],
                              [read(ref, name) for ref, name in task.sources], task.base_index)
        if out_numel is not None:
            like = inputs.tensors[0]
            if buffer is None:
                buffer = torch.empty(out_numel, dtype=like.dtype, device=like.device)
            inputs.out = buffer[:like.numel()].view(like.shape)
        return merge_one(task, inputs, config, method, seed).to(out_dtype), buffer

    with one_thread_per_op() as threads:
        workers = max(2, threads) if prefetch else 1
        free: list[torch.Tensor] = []          # output buffers whose tensor has been consumed
        pending: deque = deque()
        tasks = iter(plan)

        def submit() -> None:
            task = next(tasks, None)
            if task is not None:
                pending.append((task, pool.submit(merge, task, free.pop() if free else None)))

        with ThreadPoolExecutor(max_workers=workers) as pool:
            for _ in range(workers):
                submit()
            while pending:
                task, future = pending.popleft()
                merged, buffer = future.result()
                yield task.out_name, merged
                del merged
                if buffer is not None:
                    free.append(buffer)
                submit()


def merge_to_folder(config: MergeConfig, out_dir: Path, *, device: str = "auto", max_shard_bytes: int = 5 * 10**9,
                    copy_tokenizer: bool = True, lazy: bool = False, allow_pickle: bool = False, seed: int = 0,
                    force: bool = False, card_extra: str = "",
                    progress: Callable[[int, int], None] | None = None) -> Path:
    """Merge `config` from disk to `out_dir`, streaming (the `mergesearch merge` path)."""
    prepared = prepare(config, device, allow_pickle)
    tokenizer_folder = prepared.tokenizer_folder() if copy_tokenizer else None
    check_output_folder(out_dir, prepared.input_folders(), force)
    sources, plan, compute, out_dtype = prepared.sources, prepared.plan, prepared.compute_dtype, prepared.out_dtype
    specs = [TensorSpec(t.out_name, sources[t.sources[0][0]].meta[t.sources[0][1]].shape, out_dtype) for t in plan]

    def read(ref: str, name: str) -> torch.Tensor:
        return sources[ref].read(name, compute, prepared.device)

    largest = max((math.prod(spec.shape) for spec in specs), default=0)
    tensors = streamed_tensors(plan, read, config, out_dtype, seed, prefetch=not lazy, out_numel=largest)
    tensors = _finite_only(tensors, out_dtype)
    if progress is not None:
        tensors = _counting(tensors, len(plan), progress)
    return write_model_folder(
        out_dir, specs, tensors, model_config=prepared.model_config(),
        config_yaml=dump_config(config, absolute_paths=True), source_folder=prepared.lead.path,
        tokenizer_folder=tokenizer_folder, max_shard_bytes=max_shard_bytes, card_extra=card_extra, force=force)


def _finite_only(tensors: Iterator[tuple[str, torch.Tensor]], out_dtype: torch.dtype
                 ) -> Iterator[tuple[str, torch.Tensor]]:
    """Pass tensors through; a NaN/inf in one stops the merge (the atomic writer then leaves nothing behind)."""
    for name, tensor in tensors:
        if not all_finite(tensor):
            raise MergeConfigError(
                f"the merged tensor has NaN/inf values (NaN/inf in a source, or values beyond the range of "
                f"{str(out_dtype).removeprefix('torch.')}: try dtype/out_dtype float32); nothing was written",
                f"tensor {name}")
        yield name, tensor


def _counting(items: Iterator, total: int, progress: Callable[[int, int], None]) -> Iterator:
    for i, item in enumerate(items, 1):
        yield item
        progress(i, total)
