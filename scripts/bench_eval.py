"""Benchmark: native scoring vs lm-eval 0.4 on the same items and the same live model, for multiple choice
(log-likelihoods) and generation (greedy, with stop strings), plain or through the model's chat template.

Prints JSON: items/s of each (median over interleaved repeats), the median of the per-repeat ratios, whether
every per-item answer is identical, and the work each side fed the model (forward calls, tokens, LM-head rows),
from which a compute-bound ratio follows that does not depend on the machine. For generation also `scoring_*`:
the native scorer as a search trial runs it (`score`: rows stop once they cannot match their target), with
`identical_scores` against full decoding. Asserts nothing.

    python scripts/bench_eval.py --model ~/.cache/mergesearch/smollm2/base            # both kinds, plain prompts
    python scripts/bench_eval.py --model ~/.cache/mergesearch/smollm2/base --chat     # through the chat template
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


def make_gen_rows(n: int, seed: int = 0) -> list[dict]:
    """`n` generate items of the SmolLM2 track (scripts/real_specialists.py), alternating its two skills:
    a sentence to a JSON object (long answers) and English to French noun phrases (short ones); stop at "\\n"."""
    from scripts.real_specialists import french_example, generated_item, json_example

    rng = random.Random(seed)
    rows = [generated_item(json_example if i % 2 == 0 else french_example, rng) for i in range(n)]
    return [{"id": f"g{i}", **row} for i, row in enumerate(rows)]


def write_task(rows: list[dict], folder: Path, task: str = "bench_mc", chat: bool = False) -> Path:
    """Write the JSONL and an lm-eval multiple-choice task YAML reading it: each choice appended to the query
    as-is (`target_delimiter: ''`). `chat`: the choices without their leading whitespace, which is what the
    native scorer scores under `chat_template: true` (lm-eval drops the target delimiter there)."""
    data = folder / f"{task}.jsonl"
    if chat:
        rows = [{**r, "chat_choices": [c.lstrip() for c in r["choices"]]} for r in rows]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (folder / f"{task}.yaml").write_text(
        f"task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: query\n"
        f"doc_to_choice: {'chat_choices' if chat else 'choices'}\n"
        "doc_to_target: gold\ntarget_delimiter: ''\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n",
        encoding="utf-8")
    return data


def write_gen_task(rows: list[dict], folder: Path, task: str = "bench_gen", max_new_tokens: int = 32) -> Path:
    """Write the JSONL and an lm-eval generate_until task YAML over it (greedy, `max_gen_toks`, the rows'
    stop strings: lm-eval takes one `until` list per task, so every row must have the same)."""
    stops = {tuple(r.get("stop", [])) for r in rows}
    if len(stops) != 1:
        raise ValueError("lm-eval takes one `until` per task: give every row the same `stop`")
    data = folder / f"{task}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (folder / f"{task}.yaml").write_text(
        f"task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: generate_until\ndoc_to_text: prompt\ndoc_to_target: target\n"
        f"generation_kwargs:\n  until: {json.dumps(list(stops.pop()))}\n  max_gen_toks: {max_new_tokens}\n"
        "  do_sample: false\nmetric_list:\n  - metric: exact_match\n", encoding="utf-8")
    return data


def tiny_model(folder: Path, hidden: int = 64, vocab_size: int | None = None) -> Path:
    """A tiny character-level Llama from scripts/tiny_models.py, briefly trained on the bench's own questions; with a
    larger `vocab_size` (a real-size LM head over the same characters) it is left untrained."""
    from tiny_models import VOCAB_SIZE, build_char_tokenizer, new_model, save_model, tiny_config, train_steps

    tok = build_char_tokenizer()
    model = new_model(tiny_config("llama", hidden=hidden, vocab_size=vocab_size or VOCAB_SIZE), seed=0)
    if not vocab_size or vocab_size == VOCAB_SIZE:
        texts = [r["query"] + r["choices"][r["gold"]] for r in make_mc_rows(256, seed=99)]
        train_steps(model, tok, texts, steps=30, lr=3e-3, max_len=128)
    return save_model(model, tok, folder / "tiny")


class Work:
    """What a scorer feeds the model: forward calls, input tokens (batch x length, padding included) and rows
    through the LM head, counted by a forward pre-hook."""

    def __init__(self, model):
        self.calls = self.tokens = self.head_rows = 0
        self._handle = model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            return
        batch, length = ids.shape
        keep = kwargs.get("logits_to_keep", 0)
        self.calls += 1
        self.tokens += batch * length
        self.head_rows += batch * (keep.numel() if hasattr(keep, "numel") else (keep or length))

    def reset(self) -> dict:
        out = {"forward_calls": self.calls, "tokens": self.tokens, "head_rows": self.head_rows}
        self.calls = self.tokens = self.head_rows = 0
        return out


def linear_macs(model) -> tuple[int, int]:
    """Multiply-adds per token of the model body (its linear layers) and of its LM head."""
    head = model.get_output_embeddings().weight.numel()
    embed = model.get_input_embeddings().weight.numel()
    total = sum(p.numel() for p in model.parameters())
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    return total - embed - (0 if tied else head), head


def compare(native, lm_eval, repeats: int, n: int, work: Work, macs: tuple[int, int], scoring=None) -> dict:
    """Time both `repeats` times, interleaved (the machine is shared and noisy): per-side medians, the median
    of the per-repeat ratios of wall and of process CPU time (with --threads 1 the CPU time barely sees other
    processes), the work of one run of each and the ratio of their linear-layer multiply-adds. `scoring`: a
    third native run timed alongside (generation as a search trial scores it, see GenerateScorer.score)."""
    native(), lm_eval()  # warm-up, and one counted run of each
    work.reset()
    native_out = native()
    native_work = work.reset()
    lm_eval_out = lm_eval()
    lm_eval_work = work.reset()
    sides = [("native", native), ("lm_eval", lm_eval)] + ([("scoring", scoring)] if scoring else [])
    scoring_out = scoring() if scoring else None
    times: dict[str, list[float]] = {name: [] for name, _ in sides}
    cpu: dict[str, list[float]] = {name: [] for name, _ in sides}
    for _ in range(repeats):
        for name, fn in sides:
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    work.reset()

    def lm_eval_over(side: str, clock: dict[str, list[float]]) -> list[float]:
        """Per repeat: lm-eval's seconds over `side`'s."""
        return [b / a for a, b in zip(clock[side], clock["lm_eval"], strict=True)]

    ratios, cpu_ratios = lm_eval_over("native", times), lm_eval_over("native", cpu)
    body, head = macs

    def cost(w: dict) -> float:
        return w["tokens"] * body + w["head_rows"] * head

    extra = {}
    if scoring:
        extra = {"scoring_items_per_s": round(n / statistics.median(times["scoring"]), 2),
                 "scoring_ratio": round(statistics.median(lm_eval_over("scoring", times)), 2),
                 "scoring_cpu_time_ratio": round(statistics.median(lm_eval_over("scoring", cpu)), 2)}
    return {
        "native_out": native_out, "lm_eval_out": lm_eval_out, "scoring_out": scoring_out,
        "report": {**extra,
            "native_items_per_s": round(n / statistics.median(times["native"]), 2),
            "lm_eval_items_per_s": round(n / statistics.median(times["lm_eval"]), 2),
            "ratio": round(statistics.median(ratios), 2),
            "ratios": [round(r, 2) for r in ratios],
            "cpu_time_ratio": round(statistics.median(cpu_ratios), 2),  # less hurt by other processes
            "cpu_time_ratios": [round(r, 2) for r in cpu_ratios],
            "native_work": native_work, "lm_eval_work": lm_eval_work,
            "compute_bound_ratio": round(cost(lm_eval_work) / cost(native_work), 2),
        },
    }


def bench_mc(args, model, tokenizer, work: Work, macs, folder: Path, chat: dict) -> dict:
    from lm_eval import evaluator
    from lm_eval.tasks import TaskManager

    from evaluators.native import MultipleChoiceScorer, chat_items
    from evaluators.tasks import TaskSpec, load_items

    rows = make_mc_rows(args.items, args.choices)
    data = write_task(rows, folder, chat=bool(chat))
    items = load_items(TaskSpec.from_dict({"kind": "multiple_choice", "path": str(data)}))
    if chat:
        items = chat_items(items, tokenizer, args.system, "bench_mc")
    scorer = MultipleChoiceScorer(items, tokenizer, batch_size=args.batch_size, autocast=args.autocast)
    task_dict = TaskManager(include_path=str(folder), include_defaults=False).load(["bench_mc"])
    which = list(range(len(items)))
    lm = args.lm

    def lm_eval() -> dict:
        with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):  # lm-eval's progress bars
            return evaluator.evaluate(lm=lm, task_dict=task_dict, bootstrap_iters=0, log_samples=True, **chat)

    run = compare(lambda: scorer.loglikelihoods(model, which), lm_eval, args.repeats, len(items), work, macs)
    native_lls, out = run["native_out"], run["lm_eval_out"]
    samples = sorted(out["samples"]["bench_mc"], key=lambda s: s["doc_id"])
    lm_eval_lls = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
    lengths = [[len(c) for c in item.choices] for item in items]

    def picks(lls: list[list[float]], norm: bool) -> list[int]:
        return [max(range(len(v)), key=lambda k: (v[k] / (n[k] if norm else 1.0), -k))
                for v, n in zip(lls, lengths, strict=True)]

    def accuracy(lls: list[list[float]], norm: bool) -> float:
        return statistics.fmean(p == row["gold"] for p, row in zip(picks(lls, norm), rows, strict=True))

    return {
        "kind": "multiple_choice", "items": len(items), "choices": args.choices, **run["report"],
        "native_acc": accuracy(native_lls, False), "lm_eval_acc": out["results"]["bench_mc"]["acc,none"],
        "native_acc_norm": accuracy(native_lls, True),
        "lm_eval_acc_norm": out["results"]["bench_mc"]["acc_norm,none"],
        "identical_choices": picks(native_lls, False) == picks(lm_eval_lls, False)
        and picks(native_lls, True) == picks(lm_eval_lls, True),
        "max_abs_loglik_diff": max(abs(a - b) for x, y in zip(native_lls, lm_eval_lls, strict=True)
                                   for a, b in zip(x, y, strict=True)),
    }


def bench_generate(args, model, tokenizer, work: Work, macs, folder: Path, chat: dict) -> dict:
    from lm_eval import evaluator
    from lm_eval.tasks import TaskManager

    from evaluators.native import GenerateScorer, chat_items
    from evaluators.tasks import TaskSpec, load_items

    rows = make_gen_rows(args.gen_items)
    data = write_gen_task(rows, folder, max_new_tokens=args.max_new_tokens)
    items = load_items(TaskSpec.from_dict({"kind": "generate", "path": str(data)}))
    if chat:
        items = chat_items(items, tokenizer, args.system, "bench_gen")
    scorer = GenerateScorer(items, tokenizer, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                            autocast=args.autocast)
    task_dict = TaskManager(include_path=str(folder), include_defaults=False).load(["bench_gen"])
    which = list(range(len(items)))
    lm = args.lm

    def lm_eval() -> dict:
        with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):
            return evaluator.evaluate(lm=lm, task_dict=task_dict, bootstrap_iters=0, log_samples=True, **chat)

    run = compare(lambda: scorer.generations(model, which), lm_eval, args.repeats, len(items), work, macs,
                  scoring=lambda: scorer.score(model, which))
    native_texts, out = run["native_out"], run["lm_eval_out"]
    samples = sorted(out["samples"]["bench_gen"], key=lambda s: s["doc_id"])
    lm_eval_texts = [s["filtered_resps"][0] for s in samples]
    differ = [i for i, (a, b) in enumerate(zip(native_texts, lm_eval_texts, strict=True)) if a != b]
    full_scores = [float(t.strip() == r["target"].strip()) for t, r in zip(native_texts, rows, strict=True)]
    return {
        "kind": "generate", "items": len(items), "max_new_tokens": args.max_new_tokens, **run["report"],
        # scoring stops rows that cannot match their target: its per-item scores must be those of full decoding
        "identical_scores": [s["exact_match"] for s in run["scoring_out"]] == full_scores,
        "native_exact_match": statistics.fmean(full_scores),
        "lm_eval_exact_match": out["results"]["bench_gen"]["exact_match,none"],
        "identical_outputs": not differ, "differing_items": differ[:10],
        "mean_output_chars": round(statistics.fmean(map(len, native_texts)), 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="HF model folder (default: build a tiny Llama)")
    p.add_argument("--hidden", type=int, default=64, help="hidden size of the built model")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="LM-head size of the built model (default: the 100 characters; e.g. 32000 for a real-size head)")
    p.add_argument("--kinds", default="multiple_choice,generate", help="comma-separated: multiple_choice, generate")
    p.add_argument("--items", type=int, default=200, help="multiple-choice items")
    p.add_argument("--choices", type=int, default=4)
    p.add_argument("--gen-items", type=int, default=96, help="generate items")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--chat", action="store_true",
                   help="prompts through the model's chat template (native chat_template: true; lm-eval "
                        "apply_chat_template)")
    p.add_argument("--system", default=None, help="with --chat: a system prompt (lm-eval's system_instruction)")
    p.add_argument("--batch-size", type=int, default=32, help="native: items per batch; lm-eval: requests")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each, interleaved (medians reported)")
    p.add_argument("--autocast", action="store_true", help="bf16 autocast on CUDA for both (default: off, exact)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = p.parse_args(argv)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if not set(kinds) <= {"multiple_choice", "generate"} or not kinds:
        p.error("--kinds takes multiple_choice and/or generate")
    if args.system and not args.chat:
        p.error("--system needs --chat")

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    work_dir = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    os.environ.setdefault("HF_HOME", str(work_dir / "hf"))

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evaluators.lm_eval_adapter import quiet_lm_eval

    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = Path(args.model).expanduser() if args.model else tiny_model(work_dir, args.hidden, args.vocab_size)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, args.dtype),
                                                 use_safetensors=True).to(args.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    quiet_lm_eval()
    from lm_eval.models.huggingface import HFLM

    args.lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size, device=args.device,
                   mixed_precision_dtype="bfloat16" if args.autocast else None)
    chat = {"apply_chat_template": True, "fewshot_as_multiturn": True,
            "system_instruction": args.system} if args.chat else {}
    work, macs = Work(model), linear_macs(model)
    report = {
        "model": str(model_dir) if args.model else f"tiny llama (scripts/tiny_models.py, hidden {args.hidden}, "
                                                   f"vocab {model.config.vocab_size})",
        "device": args.device, "dtype": args.dtype, "threads": torch.get_num_threads(),
        "batch_size": args.batch_size, "repeats": args.repeats, "chat_template": args.chat, "system": args.system,
        "macs_per_token": {"body": macs[0], "lm_head": macs[1]},
    }
    benches = {"multiple_choice": bench_mc, "generate": bench_generate}
    for kind in kinds:
        folder = work_dir / kind
        folder.mkdir()
        report[kind] = benches[kind](args, model, tokenizer, work, macs, folder, chat)
        print(f"{kind}: ratio {report[kind]['ratio']}", file=sys.stderr, flush=True)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
