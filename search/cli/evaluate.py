"""`mergesearch eval`: score a model folder (or the merge a config describes) on tasks; a table and a JSON file.

Only wires the CLI to evaluators.Suite; never trusts remote code and never loads pickle checkpoints.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from rich.table import Table
from transformers import CONFIG_MAPPING, AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from evaluators import EvalError
from evaluators.suite import Suite
from evaluators.tasks import EvaluationConfig, check_unique_names, parse_evaluation_block, parse_task_arg
from merge_core.config import load_config, read_yaml_mapping
from merge_core.engine import MergeEngine
from search.cli.output import console, print_json
from search.export import atomic_write_text

log = logging.getLogger(__name__)

MERGE_CONFIG_SUFFIXES = (".yaml", ".yml")


def eval_command(args: argparse.Namespace) -> int:
    """Handler of `mergesearch eval`; user errors raise EvalError (the CLI prints one line, exit 2).
    The --out file is checked before the model is loaded and written atomically at the end."""
    config = _evaluation_config(args)
    device = resolve_device(args.device)
    out = Path(os.path.abspath(args.out)) if args.out else None
    if out is not None:
        if out.is_dir():
            raise EvalError("is a folder; give a file name for the results (e.g. results.json)", "--out")
        blocker = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            raise EvalError(f"cannot write {out}: {blocker} is a file, not a folder", "--out")
    model, tokenizer = load_target(Path(args.target), device, allow_pickle=args.allow_pickle)

    started = time.perf_counter()
    suite = Suite.from_config(config, tokenizer, batch_size=args.batch_size)
    setup_s = time.perf_counter() - started
    result = suite.evaluate(model, split=args.split)
    total_s = time.perf_counter() - started
    log.info("evaluated %s on %d items in %.2fs (setup %.2fs)", args.target, suite.size(args.split), total_s, setup_s)
    _print_table(result, title=f"{args.target} ({args.split} split, {device})", stdout=not args.json)
    report = {"target": str(args.target), "device": device, "split": args.split, "setup_seconds": round(setup_s, 3),
              "seconds": round(total_s, 3), **result.to_dict()}
    if out is not None:
        atomic_write_text(out, json.dumps(report, indent=2) + "\n")
        console().print(f"results -> {out}")
    if args.json:
        print_json({k: v for k, v in report.items() if k != "tasks"}
                   | {"tasks": {t["name"]: {k: v for k, v in t.items() if k not in ("name", "per_item")}
                                for t in report["tasks"]}, "out": str(out) if out else None})
    return 0


def _evaluation_config(args: argparse.Namespace) -> EvaluationConfig:
    if args.suite:
        return read_evaluation_block(Path(args.suite))
    specs = [parse_task_arg(text, Path.cwd()) for text in args.tasks]
    check_unique_names(specs, "--tasks")
    return EvaluationConfig(tasks=specs)


def read_evaluation_block(path: Path) -> EvaluationConfig:
    """The `evaluation:` block of a study (or soup) YAML, its relative paths resolved against the YAML's folder."""
    data = read_yaml_mapping(path, "study", EvalError)
    if "evaluation" not in data:
        raise EvalError("has no `evaluation:` block", str(path))
    return parse_evaluation_block(data["evaluation"], base_dir=path.resolve().parent, where=f"{path}: evaluation")


def resolve_device(device: str) -> str:
    """auto -> cuda when available, else cpu; an explicit cuda device must exist."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EvalError(f"device {device!r} requested but CUDA is not available", "--device")
    if device != "cpu" and not device.startswith("cuda"):
        raise EvalError(f"unknown device {device!r} (auto | cpu | cuda | cuda:i)", "--device")
    return device


def load_target(target: Path, device: str, allow_pickle: bool = False) -> tuple[Any, Any]:
    """(model, tokenizer) for a model folder, or for the merge a mergekit YAML describes (materialized in memory)."""
    if target.suffix.lower() in MERGE_CONFIG_SUFFIXES:
        return _materialize_merge(target, device, allow_pickle)
    return load_model_dir(target, device)


def load_model_dir(folder: Path, device: str) -> tuple[Any, Any]:
    """A Hugging Face causal LM folder with safetensors weights: float32 on CPU, its own dtype on CUDA.
    Never trust_remote_code; pickle-only checkpoints are refused."""
    if not folder.is_dir():
        raise EvalError("model folder not found", str(folder))
    if not (folder / "config.json").is_file():
        raise EvalError("not a Hugging Face model folder (no config.json)", str(folder))
    if not any(folder.glob("*.safetensors")):
        raise EvalError("no .safetensors weights (pickle .bin checkpoints are refused)", str(folder))
    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as err:
        raise EvalError(f"unreadable config.json: {err}", str(folder)) from None
    if model_type not in CONFIG_MAPPING:   # only the folder's own code could load it: never run
        raise EvalError(f"unsupported model_type {model_type!r} (loading it would run code from the model "
                        "folder, which mergesearch never does)", str(folder))
    hf_logging.disable_progress_bar()
    dtype = torch.float32 if device == "cpu" else "auto"
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=False,
                                                     use_safetensors=True)
    except (OSError, ValueError, KeyError) as err:
        raise EvalError(f"cannot load the model: {err}", str(folder)) from None
    return model.to(device).eval(), tokenizer


def _materialize_merge(config_path: Path, device: str, allow_pickle: bool) -> tuple[Any, Any]:
    cfg = load_config(config_path)
    engine = MergeEngine(cfg, device=device, allow_pickle=allow_pickle)
    return engine.materialize(cfg).eval(), engine.tokenizer


def _print_table(result, title: str, stdout: bool) -> None:
    table = Table(title=title)
    for column, justify in (("task", "left"), ("kind", "left"), ("metric", "left"), ("score", "right"),
                            ("n", "right"), ("seconds", "right")):
        table.add_column(column, justify=justify)
    for task in result.tasks:
        stderr = "" if task.stderr != task.stderr else f" ± {task.stderr:.4f}"  # NaN for n < 2
        table.add_row(task.name, task.kind, task.metric, f"{task.score:.4f}{stderr}", str(task.n),
                      f"{task.seconds:.2f}")
    table.caption = f"weighted score {result.score:.4f}"
    console(stdout=stdout).print(table)


__all__ = ["eval_command", "load_model_dir", "load_target", "read_evaluation_block", "resolve_device"]
