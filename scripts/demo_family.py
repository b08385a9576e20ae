"""The embedded demo's model family: a tiny char-level Llama base, specialists whose merge is hard, soup checkpoints, JSONL tasks.

Owns data generation, training, saving and the manifest cache; must not import merge_core, evaluators or Optuna
(`mergesearch demo` measures the family with those: the parents, the plain merges, the search and the soup).
Lives in scripts/, not in the installed package: training code is not part of the search.

Design (measured; `mergesearch demo` prints the table that shows it)
-----------------------------------------------------------------------------------------------------------
One prompt format for every task: ``"<cue> <word> ="`` followed by ``" <answer>"``, where <word> is 5 letters
from ``abcdefgh`` and <cue> is one capital letter naming the operation.

- base: a 4-layer Llama (hidden 128, ~0.6M parameters, the char tokenizer of scripts/tiny_models.py) pretrained on *other*
  operations in that format (C copy, U upper-case, D double each letter) plus random lower-case text: it knows the
  format and that the cue picks the operation, not the skills. Its answer to an unknown cue is roughly the copy.
- three specialists, one new operation each, conflicting on the same inputs: ``R`` reverse (``R abcde = edcba``),
  ``S`` shift each letter to the next (``S abcde = bcdef``), ``O`` sort (``O cabde = abcde``). Full fine-tunes
  with 30% replay of the base's data (so each keeps the base operations), deliberately unequal as real fine-tunes
  are: ``spec_shift`` trains twice as long at twice the learning rate, its task vector is about twice as large.
- multiple-choice items (4 answers of equal length) offer the gold answer, the two other specialists' answers and
  the copy: a model that applies the wrong operation scores 0 on the item, not chance. Search and held-out items
  are disjoint, and no evaluation word is ever shown in training (for any operation).

Why the plain merges fail and a searched recipe does not (measured on held-out items): a specialist is ~1.0 on its
skill and <= 0.4 on the others; with three task vectors the linear average leaves each at a third of its strength
(below what a skill needs: the skills fall back to the base's copy), task arithmetic 1+1+1 lets the large shift
vector override reversal and sorting, TIES with default density keeps the shift vector's lower-layer update that
wrecks the other two. Recipes with per-model, per-layer weights (shift low in the lower layers, the others kept
strong) and trimmed densities recover most of all three skills; the search has to find that shape, nothing in the
build hands it over.

The soup: one fine-tune of the base on the sort skill at a flat learning rate too high to settle (6e-3, a
checkpoint every 40 steps: ``soup/checkpoint-<step>``), plus a short run far too hot (2e-2:
``soup/checkpoint-hot-<step>``). Its own items (``data/soup_*.jsonl``, 6 choices) offer the copy and near misses
(one slip from the gold), so a noisy checkpoint loses points: the hot checkpoints drag the uniform soup far down,
the flat-rate ones are noisy and the greedy soup of them beats the best single checkpoint.

Build: seeded and deterministic on one machine (bytes and `content_hash` repeat; one torch thread by default, so
the core count does not matter); built into a temporary sibling folder and renamed into place, so an interrupted
build never looks complete; cached by `manifest.json` (a rebuild only when the build plan or format version changes
or a file is missing or altered).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

FORMAT_VERSION = 2        # 2: built with pinned CPU kernels (pinned_kernels())


def pinned_kernels() -> dict[str, str]:
    """The CPU kernels the build trains with, the same on every x86-64 CPU with AVX2 (Intel since 2013, AMD since
    2015): ATen's AVX2 kernels, MKL's conditional numerical reproducibility on its AVX2 branch, oneDNN at AVX2,
    one thread. Without pinning, the bytes (and the demo's numbers) depend on the CPU: builds on one machine with
    ATEN_CPU_CAPABILITY=default, avx2 and avx512 gave three different families. A CPU without AVX2 builds with
    the baseline kernels (and MKL's compatible branch): a family of its own, the same on every such CPU."""
    avx2 = _cpu_flags() >= {"avx2", "fma"}
    return {"ATEN_CPU_CAPABILITY": "avx2" if avx2 else "default", "MKL_CBWR": "AVX2" if avx2 else "COMPATIBLE",
            "ONEDNN_MAX_CPU_ISA": "AVX2" if avx2 else "SSE41", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()
MANIFEST = "manifest.json"
KIND = "mergesearch-demo-family"

LETTERS = "abcdefgh"
WORD_LEN = 5

# operation name -> (cue, function on a word); every task and the base corpus use "<cue> <word> = <answer>".
_OPS: dict[str, tuple[str, Callable[[str], str]]] = {
    "copy": ("C", lambda w: w),
    "upper": ("U", lambda w: w.upper()),
    "dup": ("D", lambda w: "".join(c + c for c in w)),
    "rev": ("R", lambda w: w[::-1]),
    "shift": ("S", lambda w: "".join(LETTERS[(LETTERS.index(c) + 1) % len(LETTERS)] for c in w)),
    "sort": ("O", lambda w: "".join(sorted(w))),
}
BASE_OPS = ("copy", "upper", "dup")      # what the base knows (plus free "words" text)
SPECIALIST_SKILLS = ("rev", "shift", "sort")   # one specialist each; the merge search combines them
SOUP_SKILL = "sort"                            # the soup run fine-tunes this one (its own items: data/soup_*.jsonl)
SOUP_TASK = "soup"


def answer(op: str, word: str) -> str:
    """The answer of operation `op` for `word` (no leading space)."""
    return _OPS[op][1](word)


def prompt(op: str, word: str) -> str:
    """The query of operation `op` for `word`, e.g. ``"R abcde ="``; the answer follows after one space."""
    return f"{_OPS[op][0]} {word} ="


def example(op: str, word: str) -> str:
    """One training line: query, space, answer, newline."""
    return f"{prompt(op, word)} {answer(op, word)}\n"


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(WORD_LEN))


def _free_text(rng: random.Random) -> str:
    """Random lower-case 'words' (generic text for the base, not in the task format)."""
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 6)))
             for _ in range(rng.randint(2, 5))]
    return " ".join(words) + "\n"


# ----------------------------------------------------------------------------------------------------- the plan

@dataclass(frozen=True)
class TrainSpec:
    """One training run: steps, peak learning rate, seed, replay fraction of the base data."""

    steps: int
    lr: float
    seed: int
    replay: float = 0.0
    schedule: str = "cosine"          # cosine (warm-up, decay to 10%) | constant (warm-up, then flat)
    save_every: int = 0               # soup runs: a checkpoint every this many steps (0: only the end)


@dataclass(frozen=True)
class DemoPlan:
    """Everything that determines the build's bytes (its hash is the cache key)."""

    quick: bool = False
    layers: int = 4
    hidden: int = 128
    intermediate: int = 256
    heads: int = 4
    kv_heads: int = 2
    batch: int = 32
    init_seed: int = 0
    data_seed: int = 1234
    base: TrainSpec = TrainSpec(steps=1500, lr=2e-3, seed=1)
    specialists: tuple[tuple[str, TrainSpec], ...] = (
        ("rev", TrainSpec(steps=300, lr=1e-3, seed=2, replay=0.3)),
        ("shift", TrainSpec(steps=600, lr=2e-3, seed=3, replay=0.3)),
        ("sort", TrainSpec(steps=300, lr=1e-3, seed=4, replay=0.3)),
    )
    soup: TrainSpec = TrainSpec(steps=320, lr=6e-3, seed=11, replay=0.3, schedule="constant", save_every=40)
    soup_hot: TrainSpec = TrainSpec(steps=80, lr=2e-2, seed=12, replay=0.3, schedule="constant", save_every=40)
    n_search: int = 128
    n_holdout: int = 128
    n_generate: int = 32
    soup_choices: int = 6

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def plan_hash(self) -> str:
        text = json.dumps({"format_version": FORMAT_VERSION, "plan": self.to_dict()}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


FULL_PLAN = DemoPlan()
QUICK_PLAN = DemoPlan(
    quick=True, layers=2, hidden=32, intermediate=64, heads=2, kv_heads=1, batch=16,
    base=TrainSpec(steps=30, lr=3e-3, seed=1),
    specialists=(("rev", TrainSpec(steps=10, lr=2e-3, seed=2, replay=0.3)),
                 ("shift", TrainSpec(steps=10, lr=3e-3, seed=3, replay=0.3)),
                 ("sort", TrainSpec(steps=10, lr=2e-3, seed=4, replay=0.3))),
    soup=TrainSpec(steps=9, lr=6e-3, seed=11, replay=0.3, schedule="constant", save_every=3),
    soup_hot=TrainSpec(steps=2, lr=2e-2, seed=12, replay=0.3, schedule="constant", save_every=2),
    n_search=16, n_holdout=16, n_generate=4,
)


def plan_for(quick: bool) -> DemoPlan:
    return QUICK_PLAN if quick else FULL_PLAN


# ----------------------------------------------------------------------------------------------------- the tasks

def _near_misses(gold: str, rng: random.Random) -> list[str]:
    """Answers one slip away from gold: two neighbouring letters swapped, or one letter moved to its neighbour."""
    out = []
    for _ in range(50):
        g = list(gold)
        i = rng.randrange(len(g))
        if rng.random() < 0.5 and i + 1 < len(g) and g[i] != g[i + 1]:
            g[i], g[i + 1] = g[i + 1], g[i]
        else:
            k = LETTERS.index(g[i]) + rng.choice((-1, 1))
            g[i] = LETTERS[k % len(LETTERS)]
        cand = "".join(g)
        if cand != gold and cand not in out:
            out.append(cand)
    return out


def _distractors(op: str, word: str, gold: str, rng: random.Random, near_miss: bool = False, n: int = 3
                 ) -> list[str]:
    """`n` wrong answers of the gold's length. Specialist skills: the other skills' answers and the copy first
    (a model applying the wrong operation scores 0 on the item, not chance), then fillers. The soup's items: the copy
    and near misses (so that a half-trained or noisy checkpoint loses points and averaging can show)."""
    wrong: list[str] = []
    if near_miss:
        candidates = [answer("copy", word), *_near_misses(gold, rng)]
    else:
        candidates = [answer(o, word) for o in (*SPECIALIST_SKILLS, "copy") if o != op]
    for cand in candidates:
        if cand != gold and cand not in wrong and len(wrong) < n:
            wrong.append(cand)
    while len(wrong) < n:
        letters = list(gold)
        rng.shuffle(letters)
        cand = "".join(letters) if rng.random() < 0.5 else _word(rng)
        if cand != gold and cand not in wrong:
            wrong.append(cand)
    return wrong


def _distinct_answers(op: str, word: str, near_miss: bool = False) -> bool:
    """An item is unambiguous when the wrong operations (the other specialists', the copy) all answer differently."""
    ops = (op, "copy") if near_miss else (*SPECIALIST_SKILLS, "copy")
    return len({answer(o, word) for o in ops}) == len(ops)


def _tasks() -> dict[str, tuple[str, bool]]:
    """Task name -> (operation, near-miss distractors): one task per specialist skill, and the soup's."""
    return {**{skill: (skill, False) for skill in SPECIALIST_SKILLS}, SOUP_TASK: (SOUP_SKILL, True)}


def _eval_words(plan: DemoPlan) -> dict[str, dict[str, list[str]]]:
    """task -> split -> distinct words, seeded; no word is in two splits or two tasks."""
    out: dict[str, dict[str, list[str]]] = {}
    seen: set[str] = set()
    for i, (task, (op, near_miss)) in enumerate(_tasks().items()):
        rng = random.Random(plan.data_seed * 1000 + i)
        need = {"search": plan.n_search, "holdout": plan.n_holdout}
        if not near_miss:
            need.update(gen_search=plan.n_generate, gen_holdout=plan.n_generate)
        out[task] = {}
        for split, n in need.items():
            words: list[str] = []
            while len(words) < n:
                w = _word(rng)
                if w not in seen and _distinct_answers(op, w, near_miss):
                    seen.add(w)
                    words.append(w)
            out[task][split] = words
    return out


def task_rows(plan: DemoPlan) -> dict[str, list[dict[str, Any]]]:
    """File stem -> JSONL rows: for every specialist skill ``<skill>_search`` / ``<skill>_holdout``
    (multiple_choice) and ``<skill>_gen_search`` / ``<skill>_gen_holdout`` (generate); for the soup
    ``soup_search`` / ``soup_holdout`` (multiple_choice on the soup skill, near-miss distractors)."""
    rows: dict[str, list[dict[str, Any]]] = {}
    tasks = _tasks()
    for task, splits in _eval_words(plan).items():
        op, near_miss = tasks[task]
        rng = random.Random(f"{plan.data_seed}-{task}-choices")
        for split in ("search", "holdout"):
            items = []
            for j, w in enumerate(splits[split]):
                gold = answer(op, w)
                choices = [gold, *_distractors(op, w, gold, rng, near_miss, plan.soup_choices - 1 if near_miss else 3)]
                rng.shuffle(choices)
                items.append({"id": f"{task}-{split}-{j:04d}", "query": prompt(op, w),
                              "choices": [" " + c for c in choices], "gold": choices.index(gold)})
            rows[f"{task}_{split}"] = items
        for split in ("search", "holdout"):
            if f"gen_{split}" in splits:
                rows[f"{task}_gen_{split}"] = [
                    {"id": f"{task}-gen-{split}-{j:04d}", "prompt": prompt(op, w), "target": " " + answer(op, w),
                     "stop": ["\n"]}
                    for j, w in enumerate(splits[f"gen_{split}"])]
    return rows


def _reserved_words(plan: DemoPlan) -> set[str]:
    """Every word used by an evaluation item: training never shows them (for any operation)."""
    return {w for splits in _eval_words(plan).values() for ws in splits.values() for w in ws}


class _Sampler:
    """Training lines: `ops` with weights, plus base replay; never a reserved word."""

    def __init__(self, ops: Sequence[str], reserved: set[str], replay: float = 0.0, free_text: float = 0.0):
        self.ops, self.reserved, self.replay, self.free_text = tuple(ops), reserved, replay, free_text

    def word(self, rng: random.Random) -> str:
        while True:
            w = _word(rng)
            if w not in self.reserved:
                return w

    def __call__(self, rng: random.Random) -> str:
        if self.replay and rng.random() < self.replay:
            return _base_line(rng, self)
        if self.free_text and rng.random() < self.free_text:
            return _free_text(rng)
        return example(rng.choice(self.ops), self.word(rng))


def _base_line(rng: random.Random, sampler: _Sampler) -> str:
    if rng.random() < 0.25:
        return _free_text(rng)
    return example(rng.choice(BASE_OPS), sampler.word(rng))


# ----------------------------------------------------------------------------------------------------- training

def _layer_of(name: str) -> int | None:
    m = re.search(r"\blayers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def train(model, tokenizer, sampler: Callable[[random.Random], str], spec: TrainSpec, batch: int,
          on_checkpoint: Callable[[int, float], None] | None = None) -> float:
    """AdamW with linear warm-up and cosine decay to 10% (or a flat lr), gradient clip 1.0, next-token loss on
    right-padded lines (no BOS, as the evaluators encode). Deterministic in spec.seed. Calls
    on_checkpoint(step, recent loss) every spec.save_every steps. Returns the mean loss of the last 20 steps."""
    import torch

    rng = random.Random(spec.seed)
    torch.manual_seed(spec.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec.lr, betas=(0.9, 0.98), weight_decay=0.0)
    warm = max(1, spec.steps // 10)

    def factor(i: int) -> float:
        if spec.schedule == "constant":
            return min(1.0, (i + 1) / warm)
        return min(1.0, (i + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(i, spec.steps) / spec.steps)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    pad = tokenizer.pad_token_id
    model.train()
    losses: list[float] = []
    for step in range(1, spec.steps + 1):
        ids = [tokenizer.encode(sampler(rng), add_special_tokens=False) for _ in range(batch)]
        width = max(map(len, ids))
        x = torch.full((batch, width), pad, dtype=torch.long)
        for r, row in enumerate(ids):
            x[r, : len(row)] = torch.tensor(row)
        mask = (x != pad).long()
        out = model(input_ids=x, attention_mask=mask, labels=x.masked_fill(mask == 0, -100))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(out.loss.item())
        if on_checkpoint and spec.save_every and step % spec.save_every == 0:
            model.eval()
            on_checkpoint(step, sum(losses[-20:]) / len(losses[-20:]))
            model.train()
    model.eval()
    tail = losses[-20:]
    return sum(tail) / len(tail)


# ----------------------------------------------------------------------------------------------------- the build

def _config(plan: DemoPlan):
    from tiny_models import tiny_config

    return tiny_config("llama", layers=plan.layers, hidden=plan.hidden, heads=plan.heads, kv_heads=plan.kv_heads,
                       intermediate=plan.intermediate, max_positions=64)


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        for row in rows:
            fh.write(json.dumps(row, sort_keys=True) + "\n")


def content_hash(root: Path) -> str:
    """sha256 over every file under `root` but the manifest (relative path and bytes, in sorted order)."""
    h = hashlib.sha256()
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file() and p.name != MANIFEST):
        h.update(path.relative_to(root).as_posix().encode() + b"\0")
        h.update(path.read_bytes())
        h.update(b"\0")
    return h.hexdigest()


def _versions() -> dict[str, str]:
    import platform

    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}


def read_manifest(out_dir: Path) -> dict[str, Any] | None:
    """The manifest of a complete build in out_dir, or None."""
    path = Path(out_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("kind") == KIND else None


def is_complete(out_dir: Path, quick: bool = False, verify_hash: bool = True) -> bool:
    """True when out_dir holds a finished build of the current plan (files present, hash matching if asked)."""
    manifest = read_manifest(out_dir)
    plan = plan_for(quick)
    if not manifest or manifest.get("plan_hash") != plan.plan_hash() or manifest.get("format_version") != FORMAT_VERSION:
        return False
    if manifest.get("kernels") != pinned_kernels():          # built for another kind of CPU
        return False
    if not all((Path(out_dir) / f).is_file() for f in manifest.get("files", [])):
        return False
    return not verify_hash or content_hash(out_dir) == manifest.get("content_hash")


def _clean_stale(out_dir: Path) -> None:
    """Remove temporary folders left by interrupted builds of out_dir (their process is gone)."""
    for tmp in out_dir.parent.glob(f".{out_dir.name}.*.tmp"):
        m = re.match(rf"\.{re.escape(out_dir.name)}\.(\d+)\.[0-9a-f]+\.tmp$", tmp.name)
        pid = int(m.group(1)) if m else None
        if pid is not None and pid != os.getpid():
            try:
                os.kill(pid, 0)
                continue           # still running: someone else's build
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
        shutil.rmtree(tmp, ignore_errors=True)


def build_demo_family(out_dir: Path, quick: bool = False, force: bool = False, threads: int | None = 1
                      ) -> dict[str, Any]:
    """Build (or reuse) the demo family under out_dir; returns the manifest (plus ``"cached": bool``).

    Layout: ``base/``, ``spec_rev/``, ``spec_shift/``, ``spec_sort/``, ``soup/checkpoint-<step>/`` (HF folders:
    safetensors + the char tokenizer of scripts/tiny_models.py); ``data/<skill>_{search,holdout}.jsonl`` (multiple_choice) and
    ``data/<skill>_gen_{search,holdout}.jsonl`` (generate) for skills rev, shift, sort; ``data/soup_{search,
    holdout}.jsonl`` (the soup's multiple_choice items); ``manifest.json`` (plan, seeds, versions, losses, hash).
    A finished build of the same plan is reused (unless `force`). out_dir is replaced only when it is absent, empty
    or an earlier demo build; anything else is refused with ValueError.

    `threads`: torch CPU threads while training (restored afterwards; None leaves torch's setting). One thread by
    default: the bytes then do not depend on the machine's core count, and a shared machine is not oversubscribed
    (two OpenMP threads on two busy cores run several times slower than one).
    """
    out_dir = Path(out_dir).resolve()
    plan = plan_for(quick)
    if not force and is_complete(out_dir, quick):
        manifest = read_manifest(out_dir)
        assert manifest is not None
        log.info("demo family: cache hit in %s (plan %s)", out_dir, manifest["plan_hash"])
        return {**manifest, "cached": True}
    if not kernels_pinned():
        return _build_pinned(out_dir, quick, force)
    if out_dir.exists() and not (out_dir.is_dir() and (not any(out_dir.iterdir()) or read_manifest(out_dir))):
        raise ValueError(f"{out_dir}: exists and is not a demo build; refusing to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(out_dir)
    tmp = out_dir.parent / f".{out_dir.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir()
    import torch

    saved_threads = torch.get_num_threads()
    try:
        if threads:
            torch.set_num_threads(threads)
        manifest = _build_into(tmp, plan)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.old.tmp"
            os.rename(out_dir, old)
            os.rename(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        torch.set_num_threads(saved_threads)
    return {**manifest, "cached": False}


def kernels_pinned() -> bool:
    """Whether this process runs with pinned_kernels() (they take effect only if set before torch starts)."""
    return all(os.environ.get(key) == value for key, value in pinned_kernels().items())


def _build_pinned(out_dir: Path, quick: bool, force: bool) -> dict[str, Any]:
    """Run the build in a fresh process with pinned_kernels() (scripts/build_demo_models.py); its log goes to our
    stderr. Returns the manifest; a refusal (not a demo build) is a ValueError, as in-process."""
    import subprocess
    import sys

    script = Path(__file__).with_name("build_demo_models.py")
    args = [sys.executable, str(script), "--out", str(out_dir)] + ["--quick"] * quick + ["--force"] * force
    proc = subprocess.run(args, env={**os.environ, **pinned_kernels()}, stdout=subprocess.PIPE, stderr=None,
                          text=True)
    if proc.returncode == 2:
        raise ValueError(f"{out_dir}: exists and is not a demo build; refusing to replace it")
    if proc.returncode != 0:
        raise RuntimeError(f"building the demo family failed (exit {proc.returncode}); see the lines above")
    manifest = read_manifest(out_dir)
    if manifest is None:
        raise RuntimeError(f"{out_dir}: the build finished without a manifest")
    return {**manifest, "cached": False}


def _build_into(root: Path, plan: DemoPlan) -> dict[str, Any]:
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return _build_steps(root, plan)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _build_steps(root: Path, plan: DemoPlan) -> dict[str, Any]:
    import torch

    from tiny_models import build_char_tokenizer, new_model, save_model

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    losses: dict[str, float] = {}
    tok = build_char_tokenizer()
    reserved = _reserved_words(plan)

    rows = task_rows(plan)
    for stem, items in rows.items():
        _write_jsonl(root / "data" / f"{stem}.jsonl", items)

    t = time.perf_counter()
    model = new_model(_config(plan), seed=plan.init_seed)
    losses["base"] = train(model, tok, _Sampler(BASE_OPS, reserved, free_text=0.25), plan.base, plan.batch)
    save_model(model, tok, root / "base")
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    timings["base"] = time.perf_counter() - t

    def finetune(name: str, skill: str, spec: TrainSpec, folder: Path) -> None:
        t0 = time.perf_counter()
        with torch.no_grad():
            model.load_state_dict(base_state)
        losses[name] = train(model, tok, _Sampler([skill], reserved, replay=spec.replay), spec, plan.batch)
        save_model(model, tok, folder)
        timings[name] = time.perf_counter() - t0

    for skill, spec in plan.specialists:
        finetune(f"spec_{skill}", skill, spec, root / f"spec_{skill}")

    # the soup: one run with a flat learning rate too high to settle (checkpoint-<step>), and a short run at a far
    # too high one (checkpoint-hot-<step>), a checkpoint every save_every steps
    t = time.perf_counter()
    soup_dirs: list[str] = []
    for prefix, spec in (("checkpoint", plan.soup), ("checkpoint-hot", plan.soup_hot)):
        with torch.no_grad():
            model.load_state_dict(base_state)

        def save_checkpoint(step: int, loss: float, prefix: str = prefix) -> None:
            name = f"soup/{prefix}-{step}"
            save_model(model, tok, root / name)
            losses[name] = loss
            soup_dirs.append(name)

        train(model, tok, _Sampler([SOUP_SKILL], reserved, replay=spec.replay), spec, plan.batch,
              on_checkpoint=save_checkpoint)
    timings["soup"] = time.perf_counter() - t

    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    n_params = sum(p.numel() for p in model.parameters())
    return {
        "kind": KIND,
        "format_version": FORMAT_VERSION,
        "plan_hash": plan.plan_hash(),
        "plan": plan.to_dict(),
        "quick": plan.quick,
        "models": {
            "base": "base",
            "specialists": {skill: f"spec_{skill}" for skill, _ in plan.specialists},
            "soup": soup_dirs,
        },
        "tasks": {
            task: {"operation": op, "cue": _OPS[op][0], "example": example(op, "cabde").rstrip("\n"),
                   "kind": "multiple_choice", "role": "soup" if near_miss else "specialist",
                   "choices": plan.soup_choices if near_miss else 4,
                   "distractors": "copy + near misses" if near_miss else "other specialists' answers + copy",
                   "search": f"data/{task}_search.jsonl", "holdout": f"data/{task}_holdout.jsonl",
                   **({} if near_miss else {"gen_search": f"data/{task}_gen_search.jsonl",
                                            "gen_holdout": f"data/{task}_gen_holdout.jsonl"})}
            for task, (op, near_miss) in _tasks().items()},
        "parameters": n_params,
        "final_train_loss": {k: round(v, 6) for k, v in losses.items()},
        "seconds": {k: round(v, 2) for k, v in {**timings, "total": time.perf_counter() - t_start}.items()},
        "torch_threads": torch.get_num_threads(),
        "kernels": {key: os.environ.get(key) for key in pinned_kernels()},
        "versions": _versions(),
        "files": files,
        "content_hash": content_hash(root),
    }


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
