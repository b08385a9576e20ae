"""Benchmark: native multiple-choice scoring vs lm-eval 0.4 on the same items and the same live model.

Prints JSON (items/s of each, their ratio, accuracies, whether every per-item choice is identical); asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

NAMES = ["Tom", "Ana", "Lee", "Sam", "Mia", "Raj", "Eva", "Kim"]
THINGS = ["apples", "books", "coins", "stamps", "shells", "cards", "marbles", "pencils"]


def make_mc_rows(n: int, n_choices: int = 4, seed: int = 0) -> list[dict]:
    """`n` arithmetic word problems in the task JSONL schema (ARC-like: a question, short answers)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        who, what = rng.choice(NAMES), rng.choice(THINGS)
        answer = a + b
        wrong: set[int] = set()
        while len(wrong) < n_choices - 1:
            candidate = answer + rng.choice([-11, -10, -2, -1, 1, 2, 9, 10, 100])
            if candidate != answer and candidate >= 0:
                wrong.add(candidate)
        choices = [f" {answer}", *(f" {w}" for w in sorted(wrong))]
        rng.shuffle(choices)
        rows.append({"id": f"q{i}", "query": f"Question: {who} has {a} {what} and gets {b} more. "
                                             f"How many {what} does {who} have now?\nAnswer:",
                     "choices": choices, "gold": choices.index(f" {answer}")})
    return rows


def write_task(rows: list[dict], folder: Path, task: str = "bench_mc") -> Path:
    """Write the JSONL and an lm-eval task YAML reading it (each choice appended to the query as-is)."""
    data = folder / f"{task}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (folder / f"{task}.yaml").write_text(
        f"task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: query\ndoc_to_choice: choices\n"
        "doc_to_target: gold\ntarget_delimiter: ''\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n",
        encoding="utf-8")
    return data


def tiny_model(folder: Path, hidden: int = 64, vocab_size: int | None = None) -> Path:
    """A tiny character-level Llama from search.toy, briefly trained on the bench's own questions; with a
    larger `vocab_size` (a real-size LM head over the same characters) it is left untrained."""
    from search.toy import VOCAB_SIZE, build_char_tokenizer, new_model, save_model, tiny_config, train_steps

    tok = build_char_tokenizer()
    model = new_model(tiny_config("llama", hidden=hidden, vocab_size=vocab_size or VOCAB_SIZE), seed=0)
    if not vocab_size or vocab_size == VOCAB_SIZE:
        texts = [r["query"] + r["choices"][r["gold"]] for r in make_mc_rows(256, seed=99)]
        train_steps(model, tok, texts, steps=30, lr=3e-3, max_len=128)
    return save_model(model, tok, folder / "tiny")


def _timed(fn, sink: list[float]):
    start = time.perf_counter()
    result = fn()
    sink.append(time.perf_counter() - start)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="HF model folder (default: build a tiny Llama)")
    p.add_argument("--hidden", type=int, default=64, help="hidden size of the built model")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="LM-head size of the built model (default: the 100 characters; e.g. 32000 for a real-size head)")
    p.add_argument("--items", type=int, default=200)
    p.add_argument("--choices", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32, help="native: items per batch; lm-eval: requests")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each (interleaved); the best is kept")
    p.add_argument("--autocast", action="store_true", help="bf16 autocast on CUDA for both (default: off, exact)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = p.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    work = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    os.environ.setdefault("HF_HOME", str(work / "hf"))

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evaluators.lm_eval_adapter import quiet_lm_eval
    from evaluators.native import MultipleChoiceScorer
    from evaluators.tasks import TaskSpec, load_items

    if args.threads:
        torch.set_num_threads(args.threads)
    rows = make_mc_rows(args.items, args.choices)
    data = write_task(rows, work)
    model_dir = Path(args.model) if args.model else tiny_model(work, args.hidden, args.vocab_size)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, args.dtype),
                                                 use_safetensors=True).to(args.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    items = load_items(TaskSpec.from_dict({"kind": "multiple_choice", "path": str(data)}))

    start = time.perf_counter()
    scorer = MultipleChoiceScorer(items, tokenizer, batch_size=args.batch_size, autocast=args.autocast)
    native_setup = time.perf_counter() - start
    which = list(range(len(items)))

    quiet_lm_eval()
    from lm_eval import evaluator
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size, device=args.device,
              mixed_precision_dtype="bfloat16" if args.autocast else None)
    task_dict = TaskManager(include_path=str(work), include_defaults=False).load(["bench_mc"])

    def native() -> list[list[float]]:
        return scorer.loglikelihoods(model, which)

    def lm_eval() -> dict:
        with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):  # lm-eval's progress bars
            return evaluator.evaluate(lm=lm, task_dict=task_dict, bootstrap_iters=0, log_samples=True)

    native(), lm_eval()  # warm-up
    times: dict[str, list[float]] = {"native": [], "lm_eval": []}
    for _ in range(args.repeats):  # interleaved, best of each: the machine is shared and noisy
        native_lls = _timed(native, times["native"])
        out = _timed(lm_eval, times["lm_eval"])
    native_s, lm_eval_s = min(times["native"]), min(times["lm_eval"])
    samples = sorted(out["samples"]["bench_mc"], key=lambda s: s["doc_id"])
    lm_eval_lls = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]

    def picks(lls: list[list[float]], norm: bool) -> list[int]:
        return [max(range(len(v)), key=lambda k: (v[k] / (len(row["choices"][k]) if norm else 1.0), -k))
                for v, row in zip(lls, rows, strict=True)]

    def accuracy(lls: list[list[float]], norm: bool) -> float:
        return statistics.fmean(p == row["gold"] for p, row in zip(picks(lls, norm), rows, strict=True))

    n = len(items)
    report = {
        "model": str(model_dir) if args.model else f"tiny llama (search.toy, hidden {args.hidden}, "
                                                   f"vocab {model.config.vocab_size})",
        "device": args.device, "dtype": args.dtype, "threads": torch.get_num_threads(),
        "items": n, "choices": args.choices, "batch_size": args.batch_size, "repeats": args.repeats,
        "native_items_per_s": round(n / native_s, 1),
        "lm_eval_items_per_s": round(n / lm_eval_s, 1),
        "ratio": round(lm_eval_s / native_s, 2),
        "native_setup_s": round(native_setup, 4),
        "native_acc": accuracy(native_lls, False), "lm_eval_acc": out["results"]["bench_mc"]["acc,none"],
        "native_acc_norm": accuracy(native_lls, True),
        "lm_eval_acc_norm": out["results"]["bench_mc"]["acc_norm,none"],
        "identical_choices": picks(native_lls, False) == picks(lm_eval_lls, False)
        and picks(native_lls, True) == picks(lm_eval_lls, True),
        "max_abs_loglik_diff": max(abs(a - b) for x, y in zip(native_lls, lm_eval_lls, strict=True)
                                   for a, b in zip(x, y, strict=True)),
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
