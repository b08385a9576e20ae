"""The task-arithmetic family's elementwise work as one compiled loop on CPU (fused.c), where a C compiler exists;
also linear's and SLERP's weighted sums and SLERP's dot products (one pass each instead of one per operation).

Done with torch operations, a TIES merge is ~6 passes over each task vector plus ~6 over the output (trim, sign
election, weighted sums, divisor), each a separate kernel call reading and writing memory: 5-10x the cost of
copying the inputs. fused.c does the same arithmetic element by element in registers, in one pass over the inputs,
which is about the cost of that copy. It is compiled once per machine with the system's C compiler (`cc`, or $CC)
into ~/.cache/mergesearch/fused/ (a few tenths of a second) and loaded with ctypes; without a compiler, with
MERGESEARCH_FUSED=0, on a GPU or for other dtypes than float32 and bfloat16, the torch operations in
task_arithmetic.py, linear.py and slerp.py run instead. Both give mergekit's values up to rounding (in bfloat16 the fused loop computes in
float32 and rounds once, where torch rounds after every operation); on one machine every merge path (the engine's
trials, the written model) takes the same one, so they agree bit for bit.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("fused.c")
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-shared", "-fPIC"]


class Term(ctypes.Structure):
    """One task vector's part of a segment (the `Term` of fused.c)."""

    _fields_ = [("delta", ctypes.c_void_p), ("rank", ctypes.c_void_p), ("key", ctypes.c_uint64),
                ("low", ctypes.c_float), ("high", ctypes.c_float), ("coeff", ctypes.c_float),
                ("weight", ctypes.c_float), ("span", ctypes.c_float), ("prob_a", ctypes.c_float),
                ("prob_b", ctypes.c_float),
                ("random", ctypes.c_int32), ("bf16", ctypes.c_int32), ("threshold", ctypes.c_uint32),
                ("pad", ctypes.c_int32)]


_lock = threading.Lock()
_loaded: list = []          # [library or None] once tried


def library():
    """The compiled fused.c (ctypes), or None where it cannot be had; built and loaded once per process."""
    if _loaded:
        return _loaded[0]
    with _lock:
        if not _loaded:
            _loaded.append(_load())
    return _loaded[0]


def _load():
    if os.environ.get("MERGESEARCH_FUSED", "1") == "0" or sys.byteorder != "little":   # fused.c reads u16 quarters
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        log.info("no C compiler: task-arithmetic merges run as torch operations")
        return None
    try:
        source = SOURCE.read_bytes()
        key = hashlib.sha256(b"\0".join([source, compiler.encode(), " ".join(FLAGS).encode(),
                                         _cpu_signature().encode()])).hexdigest()[:16]
        root = Path(os.environ.get("MERGESEARCH_CACHE") or Path.home() / ".cache" / "mergesearch") / "fused"
        path = root / f"fused-{key}.so"
        if not path.is_file():
            root.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=root) as tmp:
                built = Path(tmp) / path.name
                for flags in (FLAGS, [f for f in FLAGS if f != "-march=native"]):   # some compilers refuse it
                    done = subprocess.run([compiler, *flags, "-o", str(built), str(SOURCE), "-lm"],
                                          capture_output=True, timeout=120)
                    if done.returncode == 0:
                        break
                else:
                    raise OSError(f"{compiler} failed: {done.stderr.decode(errors='replace')[-300:]}")
                os.replace(built, path)          # atomic: another process may be building it too
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as err:
        log.info("fused kernel unavailable (%s): task-arithmetic merges run as torch operations", err)
        return None
    lib.combine.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32,
                            ctypes.POINTER(Term), ctypes.c_int32, ctypes.c_int32, ctypes.c_float, ctypes.c_int64]
    lib.combine.restype = None
    lib.kept_abs_sum.argtypes = [ctypes.c_int64, ctypes.POINTER(Term), ctypes.c_int64]
    lib.kept_abs_sum.restype = ctypes.c_double
    lib.weighted_sum.argtypes = [ctypes.c_int64, ctypes.c_int32, ctypes.POINTER(ctypes.c_void_p),
                                 ctypes.POINTER(ctypes.c_float), ctypes.c_float, ctypes.c_int32, ctypes.c_int32,
                                 ctypes.c_void_p]
    lib.weighted_sum.restype = None
    lib.dots.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32,
                         ctypes.POINTER(ctypes.c_double)]
    lib.dots.restype = None
    return lib


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU's model and flags (a cache shared by machines must not mix them)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "|".join(sorted({line for line in lines if line.startswith(("flags", "model name"))}))
    except OSError:
        return platform.machine() + platform.processor()


DTYPES = (torch.float32, torch.bfloat16)


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the fused loop can take these tensors (contiguous float32 or bfloat16 on CPU, all of one dtype) and
    is available."""
    return (all(t.device.type == "cpu" and t.dtype == tensors[0].dtype and t.is_contiguous() for t in tensors)
            and tensors[0].dtype in DTYPES and library() is not None)


def term(delta: torch.Tensor, lo: int, keep, coeff: float = 1.0, weight: float = 1.0) -> Term:
    """The Term of task vector `delta` (flat) for the segment starting at `lo`, trimmed by `keep` (None: all)."""
    t = Term(delta=delta.data_ptr() + delta.element_size() * lo, low=-1.0, high=math.inf, coeff=coeff,
             weight=weight, bf16=int(delta.dtype == torch.bfloat16))
    if keep is not None:
        keep.fill_term(t, lo)
    return t


def segments(n: int, cuts) -> list[tuple[int, int]]:
    """[lo, hi) covering range(n), split only where a trim's rule changes."""
    bounds = sorted({0, n, *(c for c in cuts if 0 < c < n)})
    return list(zip(bounds, bounds[1:]))


def combine(out: torch.Tensor, base: torch.Tensor, deltas: list[torch.Tensor], keeps: list, coeffs: list[float],
            weights: list[float], consensus: bool, normalize: bool, lam: float) -> None:
    """out = base + the mix of the kept task vectors (see fused.c), written in place; the caller checked `usable`."""
    lib = library()
    flat_out, flat_base = out.view(-1), base.reshape(-1)
    flat_deltas = [d.reshape(-1) for d in deltas]
    cuts = [c for keep in keeps if keep is not None for c in keep.cuts]
    size, bf16 = base.element_size(), int(base.dtype == torch.bfloat16)
    for lo, hi in segments(flat_base.numel(), cuts):
        terms = (Term * len(deltas))(*(term(d, lo, k, c, w) for d, k, c, w in zip(flat_deltas, keeps, coeffs, weights)))
        lib.combine(hi - lo, flat_base.data_ptr() + size * lo, flat_out.data_ptr() + size * lo, bf16, len(deltas),
                    terms, int(consensus), int(normalize), lam, lo)


def kept_abs_sum(delta: torch.Tensor, keep) -> float:
    """sum |kept| of a task vector (flat float32 on CPU) trimmed by `keep`."""
    lib = library()
    flat = delta.reshape(-1)
    return sum(lib.kept_abs_sum(hi - lo, ctypes.byref(term(flat, lo, keep)), lo)
               for lo, hi in segments(flat.numel(), keep.cuts))


def weighted_sum(out: torch.Tensor, tensors: list[torch.Tensor], weights: list[float], divisor: float = 1.0) -> None:
    """out = sum_j weights[j] * tensors[j] / divisor in one pass (fused.c), written in place; the caller checked
    `usable` on out and every tensor. Multiply-adds are fused where torch's own kernels fuse them (SIMD), so the
    values are those of torch's addcmul_ on this machine (mergekit's linear merge) bit for bit."""
    n = len(tensors)
    pointers = (ctypes.c_void_p * n)(*(t.data_ptr() for t in tensors))
    fma = int(torch.backends.cpu.get_cpu_capability() != "DEFAULT")
    library().weighted_sum(out.numel(), n, pointers, (ctypes.c_float * n)(*weights), divisor,
                           int(out.dtype == torch.bfloat16), fma, out.data_ptr())


def dots(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float, float]:
    """(x.x, y.y, x.y) of two tensors of one shape in float64, one pass (fused.c); the caller checked `usable`."""
    result = (ctypes.c_double * 3)()
    library().dots(x.numel(), x.data_ptr(), y.data_ptr(), int(x.dtype == torch.bfloat16), result)
    return result[0], result[1], result[2]
