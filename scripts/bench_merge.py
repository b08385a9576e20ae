"""Merge benchmark: `mergekit-yaml` vs `mergesearch merge` vs in-memory re-materialization vs a copy floor.

Builds (once, cached under /tmp) a random Llama family of about --params parameters: a base and fine-tune-like
copies (base + random deltas whose magnitude varies per tensor and per row, so magnitude trims matter), or builds
(once) fine-tunes of a real model as low-rank + small dense updates (--lowrank-from), or uses --models DIR (a folder
with base/ and ft*/ model folders). For each method (ties, dare_ties, slerp, linear, breadcrumbs, della: per-layer
gradient lists for the weights, densities and t) it measures, in ONE run on the same machine:

  mergekit_s      wall time of `mergekit-yaml CONFIG OUT --random-seed 0 --quiet` (subprocess: imports included,
                  which is what a user pays), median over --cli-repeats
  cli_s           wall time of `python -m search.cli merge CONFIG OUT --device D` (subprocess, same), median
  setup_s         MergeEngine(config, D) construction (reads the sources, builds the live model) and
  first_materialize_s  the first materialize (also computes the trial-independent caches: |delta| rank orders, angles)
  rematerialize_s median time of engine.materialize(config_i) over --repeats configs with different parameter
                  values (only the values differ from config_0; every call is a real trial)
  copy_floor_s    the physical floor on the same device: for every output tensor, `target.copy_(x)` for each of
                  the n tensors the engine keeps resident for it (delta methods: base + n-1 task vectors; others:
                  the n models), into the live model's parameter. It reads every resident input byte once and
                  writes the output n times; a merge must at least read the n inputs and write the output once.
                  Timed at the process's torch thread count and at 1 thread; the faster median counts.
  sum_floor_s     the arithmetic floor: torch.add(x0, x1, out=target), then target.add_(x_k) for k >= 2 (what
                  a plain weighted sum of the same inputs costs), reported for reference
  ratios          mergekit/cli, mergekit/rematerialize, rematerialize/copy_floor
  cpu             the same in CPU seconds (user + system, all threads): steadier than wall time on a shared box
  memory          engine resident input bytes, live model bytes, one source model's bytes, the engine worker's
                  peak RSS, and the peaks of its anonymous and file-backed memory (sampled) against the README's
                  formula (`resident_formula`)
  parity          max |mergekit - mergesearch CLI| over all tensors for the deterministic methods (for the
                  random dare_ties: the ratio of the merged task-vector norms, which should be ~1), and whether the
                  engine's live model after materialize(config_0) equals the CLI's output exactly

The in-memory part runs in a fresh worker process per method, so its peak RSS is its own. Prints one JSON
document to stdout (and writes it to --out). Timings on a shared machine are noisy: compare the ratios, which are
measured in the same run, and repeat.

  python scripts/bench_merge.py --lowrank-from ~/.cache/mergesearch/smollm2/base --fine-tunes 2   # SmolLM2 + 2 fine-tunes
  python scripts/bench_merge.py --params 1B --fine-tunes 2 --dtype bfloat16 --methods ties --memory-only --repeats 1
  python scripts/bench_merge.py                            # ~100M params, every method, CPU
  python scripts/bench_merge.py --params 30M --methods ties --repeats 5 --out /tmp/bench.json
  python scripts/bench_merge.py --models /data/family --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(tempfile.gettempdir()) / "mergesearch-bench"
METHODS = ("ties", "dare_ties", "slerp", "linear", "breadcrumbs", "della")
DETERMINISTIC = {"ties", "slerp", "linear", "breadcrumbs"}
# issue 18's bounds on re-materialization / copy floor (the rest: 3x)
REMATERIALIZE_BOUND = {"dare_ties": 6.0, "dare_linear": 6.0}

# The family's shape: hidden 768, MLP 2048, 12 heads (4 KV heads), vocab 8192; layers fill up --params.
HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, VOCAB = 768, 2048, 12, 4, 8192


# ---- the model family ----------------------------------------------------------------------------
def parse_count(text: str) -> int:
    """'100M' -> 100_000_000, '1.5B' -> 1_500_000_000, plain digits as they are."""
    text = text.strip().upper()
    scale = {"K": 10**3, "M": 10**6, "B": 10**9}
    return int(float(text[:-1]) * scale[text[-1]]) if text[-1] in scale else int(text)


def family_config(params: int):
    """A LlamaConfig of about `params` parameters (untied head; the layer count is what varies)."""
    from transformers import LlamaConfig

    head_dim = HIDDEN // HEADS
    per_layer = (HIDDEN * HIDDEN * 2 + 2 * HIDDEN * KV_HEADS * head_dim + 3 * HIDDEN * INTERMEDIATE + 2 * HIDDEN)
    layers = max(2, round((params - 2 * VOCAB * HIDDEN - HIDDEN) / per_layer))
    return LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                       num_hidden_layers=layers, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                       max_position_embeddings=2048, tie_word_embeddings=False, dtype="float32",
                       architectures=["LlamaForCausalLM"])


def build_family(root: Path, params: int, fine_tunes: int, seed: int = 0) -> Path:
    """base/ and ft1..ftN/ under root (reused when complete): random weights, fine-tunes = base + deltas.

    A fine-tune's delta for one tensor is randn * row_scale * tensor_scale, with lognormal row scales and a
    tensor scale log-uniform in [1e-4, 3e-3] (per model and tensor), so |delta| has a wide, heavy-tailed spread.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    from tiny_models import build_char_tokenizer

    if (root / "COMPLETE").is_file():
        return root
    shutil.rmtree(root, ignore_errors=True)
    config = family_config(params)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in LlamaForCausalLM(config).state_dict().items()}
    tok = build_char_tokenizer()
    gen = torch.Generator().manual_seed(seed)
    base = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            base[name] = 1 + 0.05 * torch.randn(shape, generator=gen)
        else:
            base[name] = torch.randn(shape, generator=gen).mul_(0.02)
    rng = random.Random(seed)

    def save(state, folder: Path):
        folder.mkdir(parents=True)
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(folder)
        tok.save_pretrained(folder)

    save(base, root / "base")
    for i in range(1, fine_tunes + 1):
        ft = {}
        for name, x in base.items():
            delta = torch.randn(x.shape, generator=gen)
            rows = x.shape[0] if x.dim() > 1 else 1
            delta.view(rows, -1).mul_(torch.randn(rows, 1, generator=gen).mul_(0.7).exp_())
            ft[name] = delta.mul_(10 ** rng.uniform(-4, -2.5)).add_(x)
        save(ft, root / f"ft{i}")
        del ft
    (root / "COMPLETE").write_text(json.dumps({"params": sum(_numel(s) for s in shapes.values()),
                                               "layers": config.num_hidden_layers}))
    return root


def build_lowrank_family(base: Path, root: Path, fine_tunes: int, seed: int = 0) -> Path:
    """base/ (a link to the real `base` folder, never modified) and ft1..ftN/ under root (reused when complete):
    fine-tunes as base + a low-rank update (rank 8-32, scaled to 1.5-3% of each tensor's RMS) + a dense part a
    fifth as large, which is what fine-tuning leaves behind (a low-rank dominant update plus small dense noise).
    1-D tensors (norms) get the dense part only."""
    import torch
    from safetensors.torch import load_file, save_file

    if (root / "COMPLETE").is_file():
        return root
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    (root / "base").symlink_to(Path(base).resolve(), target_is_directory=True)
    files = sorted(Path(base).glob("*.safetensors"))
    weights = {}
    for file in files:
        weights.update(load_file(str(file)))
    gen = torch.Generator().manual_seed(seed)
    shapes = [(16, 0.02), (32, 0.015), (8, 0.03), (24, 0.02)]
    for i in range(1, fine_tunes + 1):
        rank, scale = shapes[(i - 1) % len(shapes)]
        ft = {}
        for name, w in weights.items():
            if not w.is_floating_point():
                ft[name] = w
                continue
            rms = float(w.float().pow(2).mean().sqrt()) or 1.0
            if w.dim() == 2:
                d = torch.randn(w.shape[0], rank, generator=gen) @ torch.randn(rank, w.shape[1], generator=gen)
                d.mul_(scale * rms / float(d.pow(2).mean().sqrt()))
                d.add_(torch.randn(w.shape, generator=gen), alpha=0.2 * scale * rms)
            else:
                d = torch.randn(w.shape, generator=gen) * (scale * rms)
            ft[name] = (w.float() + d).to(w.dtype).contiguous()
        out = root / f"ft{i}"
        out.mkdir()
        save_file(ft, str(out / "model.safetensors"), metadata={"format": "pt"})
        for extra in Path(base).iterdir():
            if extra.is_file() and not extra.name.endswith(".safetensors") and extra.name != "model.safetensors.index.json":
                shutil.copyfile(extra, out / extra.name)
        del ft
    (root / "COMPLETE").write_text(json.dumps({"base": str(base), "fine_tunes": fine_tunes}))
    return root


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def family_members(root: Path) -> tuple[Path, list[Path]]:
    base = root / "base"
    fts = sorted(p for p in root.glob("ft*") if p.is_dir())
    if not (base / "config.json").is_file() or not fts:
        raise SystemExit(f"{root}: expected base/ and ft*/ model folders")
    return base, fts


# ---- configs -----------------------------------------------------------------------------------------
def method_config(method: str, base: Path, fts: list[Path], layers: int, rng: random.Random, dtype: str) -> dict:
    """A mergekit config for `method` whose parameters are per-layer gradient lists drawn from `rng`.

    ties / dare_ties: base + every fine-tune, each with a weight list (one value per layer) and a density list.
    slerp: base -> ft1 with t lists per filter (self_attn, mlp) and a fallback. linear: base + fine-tunes.
    """
    def grad(low, high, n):
        return [round(rng.uniform(low, high), 4) for _ in range(n)]

    if method in ("ties", "dare_ties", "breadcrumbs", "della"):
        extra = {"breadcrumbs": lambda: {"gamma": round(rng.uniform(0.005, 0.05), 4)},
                 "della": lambda: {"epsilon": round(rng.uniform(0.05, 0.15), 4)}}.get(method, dict)
        return {"merge_method": method, "base_model": str(base), "dtype": dtype,
                "parameters": {"normalize": True},
                "models": [{"model": str(ft), "parameters": {"weight": grad(0.2, 1.0, layers),
                                                             "density": grad(0.2 if method != "della" else 0.3,
                                                                             0.8, 4), **extra()}} for ft in fts]}
    if method == "slerp":
        return {"merge_method": "slerp", "base_model": str(base), "dtype": dtype,
                "models": [{"model": str(base)}, {"model": str(fts[0])}],
                "parameters": {"t": [{"filter": "self_attn", "value": grad(0, 1, 5)},
                                     {"filter": "mlp", "value": grad(0, 1, 5)},
                                     {"value": round(rng.uniform(0, 1), 4)}]}}
    if method == "linear":
        return {"merge_method": "linear", "dtype": dtype, "parameters": {"normalize": True},
                "models": [{"model": str(m), "parameters": {"weight": grad(0.1, 1.0, layers)}}
                           for m in [base, *fts]]}
    raise SystemExit(f"unknown method {method!r} (benchmarked: {', '.join(METHODS)})")


def write_yaml(config: dict, path: Path) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# ---- subprocess timings --------------------------------------------------------------------------
THREADS: int | None = None   # --threads: OMP/MKL threads of every process the benchmark starts


def _env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if THREADS:
        env.update(OMP_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS))
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed_run(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the child: user + system, all threads) of a command that must succeed."""
    t0, c0 = time.perf_counter(), _children_cpu()
    done = subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True)
    seconds, cpu = time.perf_counter() - t0, _children_cpu() - c0
    if done.returncode != 0:
        raise SystemExit(f"command failed ({done.returncode}): {' '.join(cmd)}\n{done.stderr[-3000:]}")
    return seconds, cpu


def mergekit_cmd(config: Path, out: Path, device: str) -> list[str]:
    exe = Path(sys.executable).with_name("mergekit-yaml")
    cmd = [str(exe) if exe.exists() else "mergekit-yaml", str(config), str(out), "--random-seed", "0", "--quiet"]
    return cmd + (["--cuda"] if device.startswith("cuda") else [])


def cli_cmd(config: Path, out: Path, device: str) -> list[str]:
    return [sys.executable, "-m", "search.cli", "merge", str(config), str(out), "--device", device,
            "--random-seed", "0"]


def read_folder(folder: Path) -> dict:
    """Every tensor of a safetensors model folder (sharded or not)."""
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def parity(method: str, ours: Path, theirs: Path, base: Path, config: Path) -> dict:
    """Deterministic methods: max |ours - mergekit| (ties: and whether every differing element is one where a
    density boundary cuts a run of equal |delta|, which mergekit's unstable argsort resolves arbitrarily);
    random ones: ||ours - base|| / ||mergekit - base|| (same distribution: ~1)."""
    a, b = read_folder(ours), read_folder(theirs)
    if set(a) != set(b):
        return {"ok": False, "error": f"tensor names differ: {sorted(set(a) ^ set(b))[:3]}"}
    if method in DETERMINISTIC:
        worst, where, differing, unexplained = 0.0, "", 0, 0
        for name in b:
            diff = (a[name].double() - b[name].double()).abs()
            top = float(diff.max())
            if not top <= worst:
                worst, where = top, name
            if top > 1e-5:
                positions = (diff > 1e-5).reshape(-1).nonzero().squeeze(1)
                differing += positions.numel()
                if method in ("ties", "breadcrumbs"):
                    unexplained += _not_boundary_ties(config, name, positions)
                else:
                    unexplained += positions.numel()
        return {"check": "max |mergesearch CLI - mergekit| over all tensors (float32)", "max_abs_diff": worst,
                "worst_tensor": where, "elements_over_1e-5": differing,
                "of_which_not_at_a_tie": unexplained,
                "ok": worst <= 1e-5 or unexplained == 0}
    ref = read_folder(base)
    num = sum(float((a[k].double() - ref[k].double()).square().sum()) for k in ref if k in a)
    den = sum(float((b[k].double() - ref[k].double()).square().sum()) for k in ref if k in b)
    ratio = (num / den) ** 0.5 if den else float("nan")
    return {"check": "random method: ||ours - base|| / ||mergekit - base|| (same distribution: ~1)",
            "norm_ratio": ratio, "ok": abs(ratio - 1) < 0.02}


def _not_boundary_ties(config_path: Path, name: str, positions) -> int:
    """How many of `positions` (flat, in tensor `name`) are explained by neither of the two ties that mergekit and
    we may resolve differently: (1) an element whose |delta_j| equals model j's top-k boundary value while that
    value occurs more than once (a tie the trim must cut; mergekit's argsort is unstable), (2) a sign election
    whose weighted sum of kept deltas is zero up to float32 rounding (1e-6 of its terms: the summation order
    decides the sign)."""
    import numpy as np

    from merge_core.config import load_config
    from merge_core.prepare import prepare
    from merge_core.methods import get_method
    from merge_core.plan import resolve_tensor_params

    config = load_config(config_path)
    prepared = prepare(config, "cpu")
    sources = prepared.sources
    task = next(t for t in prepared.plan if t.out_name == name)
    _, model_params = resolve_tensor_params(config, get_method(config.merge_method), task)
    base_ref, base_name = task.sources[task.base_index]
    base = sources[base_ref].read(base_name, config_dtype(config)).reshape(-1)
    at = positions.numpy()
    explained = np.zeros(at.size, dtype=bool)
    signed_sum = np.zeros(at.size)
    magnitude_sum = np.zeros(at.size)
    for i, (ref, tensor) in enumerate(task.sources):
        if i == task.base_index:
            continue
        delta = (sources[ref].read(tensor, config_dtype(config)).reshape(-1) - base).numpy()
        mag = np.abs(delta)
        kept = np.ones(at.size, dtype=bool)
        density, n = model_params[i].get("density", 1.0), mag.size
        if density < 1:
            if config.merge_method.startswith("breadcrumbs"):    # ranks [start, stop) kept (see outlier_mask)
                target, top = int(density * n), int(model_params[i].get("gamma", 0.01) * n)
                stop = n - max(0, n - target - top)
                ranks = [r for r in (stop - target, stop - 1) if 0 <= r < n]
            else:                                               # the top k
                ranks = [max(1, int(density * n)) - 1]
            for r in ranks:
                boundary = np.partition(mag, n - 1 - r)[n - 1 - r]
                if np.count_nonzero(mag == boundary) > 1:
                    explained |= mag[at] == boundary
            low = np.partition(mag, n - 1 - ranks[-1])[n - 1 - ranks[-1]]
            kept = mag[at] > low
        term = kept * float(model_params[i].get("weight", 1.0)) * delta[at].astype(np.float64)
        signed_sum += term
        magnitude_sum += np.abs(term)
    if config.merge_method in ("ties", "breadcrumbs_ties", "dare_ties", "della"):   # sign election
        explained |= np.abs(signed_sum) <= 1e-6 * magnitude_sum
    return int((~explained).sum())


def config_dtype(config):
    from merge_core.sources import torch_dtype

    return torch_dtype(config.dtype)


# ---- the in-memory part (a worker process per method) -----------------------------------------------
class MemorySampler:
    """The process's resident memory, sampled every 20 ms from /proc/self/status on a thread: the peaks of anonymous
    memory (what the process allocated) and of file-backed memory (mapped model files: reclaimable page cache that
    still counts in RSS)."""

    def __init__(self):
        import threading

        self.peak = {"anon": 0, "file": 0, "rss": 0}
        self.baseline = self.now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def now() -> dict:
        fields = {"RssAnon:": "anon", "RssFile:": "file", "VmRSS:": "rss"}
        out = {}
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                key = line.split(maxsplit=1)[0] if line else ""
                if key in fields:
                    out[fields[key]] = int(line.split()[1]) * 1024
        except OSError:
            pass
        return out

    def _run(self):
        while not self._stop.wait(0.02):
            for k, v in self.now().items():
                self.peak[k] = max(self.peak[k], v)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return {"baseline_bytes": self.baseline, "peak_bytes": self.peak, "at_end_bytes": self.now()}


def resident_formula(method: str, params: int, n_models: int, compute_bytes: int, out_bytes: int) -> dict:
    """Resident bytes the README predicts for an engine: live model + the method's resident inputs.

    delta methods: base + n task vectors (compute dtype) + for ties / breadcrumbs* n rank orders (int32), for
    della* n row ranks (16-bit positions); other methods: every model's tensor (compute dtype). `n_models` counts the base.
    """
    from merge_core.methods import get_method

    n = n_models - 1
    delta = get_method(method).delta_based
    inputs = params * compute_bytes * (1 + n if delta else n_models)
    if method.startswith(("ties", "breadcrumbs")):
        inputs += params * 4 * n
    if method.startswith("della"):
        inputs += params * 2 * n
    return {"live_model_bytes": params * out_bytes, "inputs_bytes": inputs, "total_bytes": params * out_bytes + inputs}


def engine_worker(args) -> dict:
    """MergeEngine set-up, re-materialization over several configs, the copy floors, memory; as a dict."""
    import torch

    from merge_core.config import load_config
    from merge_core.engine import MergeEngine

    configs = [load_config(p) for p in args.configs]
    sampler = MemorySampler()
    t0 = time.perf_counter()
    engine = MergeEngine(configs[0], device=args.device, seed=0)
    setup = time.perf_counter() - t0
    sync = (lambda: torch.cuda.synchronize()) if engine.device.type == "cuda" else (lambda: None)

    t0, c0 = time.perf_counter(), time.process_time()
    engine.materialize(configs[0])
    first, first_cpu = time.perf_counter() - t0, time.process_time() - c0
    same = None
    if args.compare:
        expected = read_folder(Path(args.compare))
        live = engine.model.state_dict()
        same = all(torch.equal(live[k].cpu(), v) for k, v in expected.items())
        del expected, live

    times, cpus = [], []
    for r in range(args.repeats):
        config = configs[1 + r % (len(configs) - 1)] if len(configs) > 1 else configs[0]
        t0, c0 = time.perf_counter(), time.process_time()
        engine.materialize(config)
        times.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)

    pairs = list(zip(engine._inputs, engine._targets))
    resident = [(inp.base, *inp.deltas) if engine.method.delta_based else tuple(inp.tensors) for inp, _ in pairs]

    @torch.no_grad()
    def copy_floor():
        for srcs, (_, target) in zip(resident, pairs):
            for x in srcs:
                target.copy_(x)
        sync()

    @torch.no_grad()
    def sum_floor():
        for srcs, (_, target) in zip(resident, pairs):
            if len(srcs) == 1:
                target.copy_(srcs[0])
                continue
            torch.add(srcs[0], srcs[1], out=target)
            for x in srcs[2:]:
                target.add_(x)
        sync()

    floors, floor_cpus = {}, {}   # each floor at the process's thread count and at 1 thread: the faster counts
    threads = torch.get_num_threads()
    for name, fn in (("copy", copy_floor), ("sum", sum_floor)):
        best = None
        for n in sorted({threads, 1}):
            torch.set_num_threads(n)
            fn()   # warm
            samples, cpu = [], []
            for _ in range(max(3, args.repeats)):
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                samples.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
            floors[f"{name}@{n}"] = samples
            if best is None or statistics.median(samples) < statistics.median(floors[best]):
                best = f"{name}@{n}"
                floors[name], floor_cpus[name] = samples, cpu
        torch.set_num_threads(threads)
    touched = sum(x.numel() * x.element_size() for srcs in resident for x in srcs)
    model_bytes = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    source_bytes = next(iter(engine.sources.values())).nbytes()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    sampled = sampler.stop()
    params = sum(p.numel() for p in engine.model.parameters())
    formula = resident_formula(configs[0].merge_method, params, len(engine.sources),
                               torch.empty((), dtype=engine.compute_dtype).element_size(),
                               torch.empty((), dtype=engine.out_dtype).element_size())
    anon = sampled["peak_bytes"]["anon"] - sampled["baseline_bytes"].get("anon", 0)
    return {
        "setup_s": setup, "first_materialize_s": first, "first_materialize_cpu_s": first_cpu,
        "rematerialize_s": statistics.median(times), "rematerialize_samples_s": times,
        "copy_floor_s": statistics.median(floors["copy"]), "sum_floor_s": statistics.median(floors["sum"]),
        "copy_floor_samples_s": floors["copy"],
        "floor_by_threads_s": {k: statistics.median(v) for k, v in floors.items() if "@" in k},
        "cpu": {"rematerialize_s": statistics.median(cpus), "copy_floor_s": statistics.median(floor_cpus["copy"]),
                "sum_floor_s": statistics.median(floor_cpus["sum"]),
                "rematerialize_over_copy_floor": statistics.median(cpus) / statistics.median(floor_cpus["copy"])},
        "floor_input_bytes": touched, "tensors": len(pairs),
        "engine_equals_cli_output": same,
        "memory": {"resident_input_bytes": engine.resident_bytes(), "live_model_bytes": model_bytes,
                   "one_source_model_bytes": source_bytes,
                   "resident_inputs_per_model": engine.resident_bytes() / source_bytes,
                   "worker_peak_rss_bytes": peak,
                   "params": params, "formula": formula,
                   "sampled": sampled,
                   "peak_anon_over_baseline_bytes": anon,
                   "peak_anon_over_formula": anon / formula["total_bytes"],
                   "held_over_formula": (engine.resident_bytes() + model_bytes) / formula["total_bytes"]},
        "torch_threads": torch.get_num_threads(),
    }


def run_engine_worker(configs: list[Path], device: str, repeats: int, compare: Path | None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_engine-worker", "--device", device,
           "--repeats", str(repeats), "--_configs", *map(str, configs)]
    if compare is not None:
        cmd += ["--_compare", str(compare)]
    done = subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"engine worker failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


# ---- main -----------------------------------------------------------------------------------------
def median(xs):
    return statistics.median(xs) if xs else None


def bench_method(method: str, base: Path, fts: list[Path], layers: int, work: Path, args) -> dict:
    rng = random.Random(f"{method}-{args.seed}")
    configs = [write_yaml(method_config(method, base, fts, layers, rng, args.dtype), work / f"{method}-{i}.yaml")
               for i in range(1 + max(1, args.configs))]
    mk_out, cli_out = work / f"{method}-mergekit", work / f"{method}-cli"
    mk_times, cli_times, mk_cpu, cli_cpu = [], [], [], []
    if args.memory_only:
        mem = run_engine_worker(configs, args.device, args.repeats, None)
        return {"memory": mem["memory"], "setup_s": mem["setup_s"], "first_materialize_s": mem["first_materialize_s"],
                "rematerialize_s": mem["rematerialize_s"], "copy_floor_s": mem["copy_floor_s"],
                "ratios": {"rematerialize_over_copy_floor": mem["rematerialize_s"] / mem["copy_floor_s"]}}
    for r in range(args.cli_repeats):
        for out in (mk_out, cli_out):
            shutil.rmtree(out, ignore_errors=True)
        if not args.skip_mergekit:
            wall, cpu = timed_run(mergekit_cmd(configs[0], mk_out, args.device))
            mk_times.append(wall)
            mk_cpu.append(cpu)
        wall, cpu = timed_run(cli_cmd(configs[0], cli_out, args.device))
        cli_times.append(wall)
        cli_cpu.append(cpu)
    check = parity(method, cli_out, mk_out, base, configs[0]) if not args.skip_mergekit else None
    shutil.rmtree(mk_out, ignore_errors=True)
    mem = run_engine_worker(configs, args.device, args.repeats, cli_out)
    shutil.rmtree(cli_out, ignore_errors=True)
    mk, cli = median(mk_times), median(cli_times)
    rem = mem["rematerialize_s"]
    mem["cpu"].update(mergekit_s=median(mk_cpu), cli_s=median(cli_cpu))
    if mk_cpu:
        mem["cpu"].update(mergekit_over_cli=median(mk_cpu) / median(cli_cpu),
                          mergekit_over_rematerialize=median(mk_cpu) / mem["cpu"]["rematerialize_s"])
    return {
        "mergekit_s": mk, "cli_s": cli, **{k: v for k, v in mem.items() if k != "torch_threads"},
        "mergekit_samples_s": mk_times, "cli_samples_s": cli_times,
        "ratios": {"mergekit_over_cli": mk / cli if mk else None,
                   "mergekit_over_rematerialize": mk / rem if mk else None,
                   "rematerialize_over_copy_floor": rem / mem["copy_floor_s"],
                   "rematerialize_over_sum_floor": rem / mem["sum_floor_s"]},
        "targets": {"cli_3x_faster": (mk / cli >= 3) if mk else None,
                    "cli_10x_faster": (mk / cli >= 10) if mk else None,
                    "rematerialize_bound_over_copy_floor": REMATERIALIZE_BOUND.get(method, 3.0),
                    "rematerialize_within_bound": rem / mem["copy_floor_s"] <= REMATERIALIZE_BOUND.get(method, 3.0)},
        "parity": check,
        "models": 1 + len(fts) if method != "slerp" else 2,
    }


def startup_times(device: str) -> dict:
    """What either CLI pays before merging anything: `--help` of each (imports, argument parsing)."""
    mk = Path(sys.executable).with_name("mergekit-yaml")
    return {"mergekit_yaml_help_s": timed_run([str(mk) if mk.exists() else "mergekit-yaml", "--help"])[0],
            "mergesearch_merge_help_s": timed_run([sys.executable, "-m", "search.cli", "merge", "--help"])[0]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--params", default="100M", help="size of the random family (default 100M)")
    p.add_argument("--fine-tunes", type=int, default=3, help="fine-tunes in the random family (default 3)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma list (default: ties,dare_ties,slerp,linear)")
    p.add_argument("--repeats", type=int, default=5, help="timed re-materializations per method (median)")
    p.add_argument("--configs", type=int, default=4, help="distinct parameter configs cycled by the repeats")
    p.add_argument("--cli-repeats", type=int, default=1, help="runs of each CLI per method (median)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    p.add_argument("--dtype", default="float32", help="merge dtype written into the configs")
    p.add_argument("--models", default=None, help="a family folder with base/ and ft*/ (default: build one)")
    p.add_argument("--lowrank-from", default=None,
                   help="a real model folder: build (once, under /tmp) a family of it and --fine-tunes fine-tunes "
                        "made of low-rank + small dense updates, and benchmark on it")
    p.add_argument("--memory-only", action="store_true",
                   help="only the engine worker (set-up, trials, floors, memory): no mergekit, no CLI")
    p.add_argument("--skip-mergekit", action="store_true", help="only mergesearch (for profiling runs)")
    p.add_argument("--threads", type=int, default=None,
                   help="OMP/MKL threads for every process started (default: the libraries' own choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("--_engine-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_configs", nargs="+", help=argparse.SUPPRESS)
    p.add_argument("--_compare", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    sys.path.insert(0, str(REPO))
    global THREADS
    THREADS = args.threads

    if args._engine_worker:
        args.configs, args.compare = args._configs, args._compare
        print(json.dumps(engine_worker(args)))
        return 0

    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    if args.models:
        root = Path(args.models).resolve()
    elif args.lowrank_from:
        source = Path(args.lowrank_from).expanduser().resolve()
        root = build_lowrank_family(source, CACHE / f"lowrank-{source.name}-ft{args.fine_tunes}-s{args.seed}",
                                    args.fine_tunes, args.seed)
    else:
        root = CACHE / f"llama-{args.params}-ft{args.fine_tunes}-s{args.seed}"
        build_family(root, parse_count(args.params), args.fine_tunes, args.seed)
    built = time.perf_counter() - t0
    base, fts = family_members(root)
    base_cfg = json.loads((base / "config.json").read_text())
    layers = base_cfg["num_hidden_layers"]
    from merge_core.sources import ModelSource

    source = ModelSource(base)
    work = Path(tempfile.mkdtemp(prefix="bench-", dir=CACHE if CACHE.is_dir() else None))
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    try:
        import torch

        report = {
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "device": args.device,
                        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                        "threads_of_started_processes": THREADS or "library default",
                        "load_avg_at_start": os.getloadavg()},
            "family": {"folder": str(root), "layers": layers, "hidden": base_cfg["hidden_size"],
                       "params": sum(_numel(m.shape) for m in source.meta.values()),
                       "model_bytes": source.nbytes(), "fine_tunes": len(fts), "build_or_reuse_s": built},
            "startup": startup_times(args.device) if not args.memory_only else None,
            "methods": {},
            "definitions": {
                "mergekit_s / cli_s": "wall time of the subprocess, imports included (median)",
                "rematerialize_s": "median engine.materialize(config_i), i over distinct parameter configs",
                "copy_floor_s": "per output tensor, target.copy_(x) for each of the n resident inputs "
                                "(reads every input byte once, writes the output n times); timed at the "
                                "process's torch thread count and at 1 thread, the faster median counts",
                "sum_floor_s": "per output tensor, torch.add(x0, x1, out=target) then target.add_(x_k)",
            },
        }
        for method in methods:
            report["methods"][method] = bench_method(method, base, fts, layers, work, args)
            print(f"{method}: done", file=sys.stderr)
        report["machine"]["load_avg_at_end"] = os.getloadavg()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
