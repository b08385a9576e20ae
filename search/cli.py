"""The `mergesearch` command line: argument parsing and turning user errors into one line + exit 2.

Each subcommand's work lives in its own module; this file only parses and dispatches.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from search import __version__

USER_ERROR = 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mergesearch",
        description="Tune model-merge recipes: in-memory mergekit-compatible merges, Optuna search, model soups.",
    )
    p.add_argument("--version", action="version", version=f"mergesearch {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log diagnostics (and tracebacks on errors)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    m = sub.add_parser("merge", help="merge any mergekit YAML into a model folder",
                       description="Merge a mergekit-compatible YAML config into OUT_DIR (same tensors as mergekit).")
    m.add_argument("config", help="mergekit YAML config")
    m.add_argument("out_dir", help="output model folder (written atomically)")
    m.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:i (default: auto)")
    m.add_argument("--copy-tokenizer", action=argparse.BooleanOptionalAction, default=True,
                   help="copy the tokenizer of tokenizer_source / the base (or first) model (default: yes)")
    m.add_argument("--out-shard-size", default="5B", help="max shard size, e.g. 500M, 5B (default 5B)")
    m.add_argument("--lazy", action="store_true", help="stream tensor by tensor (peak memory ~ one tensor per source)")
    m.add_argument("--allow-pickle", action="store_true", help="allow loading .bin pickle weights (unsafe)")
    m.add_argument("--random-seed", type=int, default=0, help="seed for random methods (dare_*, della*, ...)")
    m.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")

    s = sub.add_parser("search", help="run (or resume) an Optuna search over merge recipes",
                       description="Run or resume the study described by STUDY.yaml.")
    s.add_argument("study", help="study YAML")
    s.add_argument("--trials", type=int, default=None, help="total trial budget (overrides budget.trials)")
    s.add_argument("--timeout", default=None, help="wall-clock budget, e.g. 30m, 8h (overrides budget.timeout)")
    s.add_argument("--storage", default=None, help="Optuna storage URL (default: sqlite in output_dir)")
    s.add_argument("--workers", type=int, default=1, help="worker processes sharing the storage")
    s.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:i")
    s.add_argument("--new-study", action="store_true", help="start a fresh study even if one exists with this name")
    s.add_argument("--no-progress", action="store_true", help="plain log lines instead of a live display")

    so = sub.add_parser("soup", help="greedy or uniform model soup over checkpoints",
                        description="Build a greedy or uniform soup over the checkpoints in SOUP.yaml.")
    so.add_argument("soup", help="soup YAML")
    so.add_argument("--mode", choices=["greedy", "uniform"], default=None, help="override the YAML's mode")
    so.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:i")
    so.add_argument("--write-model", default=None, metavar="DIR", help="also write the soup model to DIR")

    e = sub.add_parser("eval", help="evaluate a model folder or a merge config",
                       description="Score a model folder, or the merge described by a config, on tasks.")
    e.add_argument("target", help="MODEL_DIR or merge CONFIG.yaml")
    g = e.add_mutually_exclusive_group(required=True)
    g.add_argument("--tasks", nargs="+", metavar="TASK",
                   help="task specs: KIND:PATH[:LIMIT] for local JSONL, or lm_eval:NAME[:LIMIT]")
    g.add_argument("--suite", metavar="STUDY.yaml", help="use the evaluation block of a study YAML")
    e.add_argument("--split", choices=["search", "holdout", "all"], default="all", help="which items to score")
    e.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:i")
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--out", default=None, help="write results JSON here")

    x = sub.add_parser("export", help="export a trial's config (and optionally its model)",
                       description="Rebuild the best (or a given) trial's config from the study storage.")
    x.add_argument("study", help="study YAML")
    x.add_argument("--trial", type=int, default=None, help="trial number (default: the held-out winner, else best)")
    x.add_argument("--out", default=None, help="config path (default: output_dir/best_config.yaml)")
    x.add_argument("--write-model", default=None, metavar="DIR", help="also write the merged model to DIR")
    x.add_argument("--storage", default=None, help="Optuna storage URL (default: sqlite in output_dir)")
    x.add_argument("--device", default="auto")

    r = sub.add_parser("report", help="plots and tables for a study (re-runnable)",
                       description="Write output_dir/report/: plots, report.html and trials.csv.")
    r.add_argument("study", help="study YAML")
    r.add_argument("--storage", default=None, help="Optuna storage URL (default: sqlite in output_dir)")

    d = sub.add_parser("demo", help="the embedded demo, end to end",
                       description="Build tiny specialists (cached), search a merge, export, report, soup.")
    d.add_argument("--out", default="runs/demo", help="run folder (default runs/demo)")
    d.add_argument("--trials", type=int, default=None, help="override the demo's trial budget")
    d.add_argument("--quick", action="store_true", help="a tiny budget (for CI)")
    return p


def _user_errors() -> tuple[type[BaseException], ...]:
    from evaluators import EvalError
    from merge_core import MergeConfigError
    from search import StudyError

    return (MergeConfigError, EvalError, StudyError)


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "merge":
        from merge_core.writer import merge_command
        return merge_command(args)
    if args.command == "search":
        from search.loop import search_command
        return search_command(args)
    if args.command == "soup":
        from search.soup import soup_command
        return soup_command(args)
    if args.command == "eval":
        from search.evaluate import eval_command
        return eval_command(args)
    if args.command == "export":
        from search.export import export_command
        return export_command(args)
    if args.command == "report":
        from search.report import report_command
        return report_command(args)
    if args.command == "demo":
        from search.demo import demo_command
        return demo_command(args)
    raise AssertionError(args.command)


def one_line(message: str) -> str:
    """A message on one line: wrapped library messages (YAML, JSON, safetensors) have line breaks."""
    return " ".join(part.strip() for part in message.splitlines() if part.strip())


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return USER_ERROR
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if hasattr(signal, "SIGXFSZ"):
        # Over a file-size limit (ulimit -f) a write then fails with EFBIG, reported like a full disk,
        # instead of the signal killing the process mid-write without a word.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        return _dispatch(args) or 0
    except _user_errors() as err:
        if args.verbose:
            raise
        print(f"mergesearch {args.command}: error: {one_line(str(err))}", file=sys.stderr)
        return USER_ERROR
    except KeyboardInterrupt:
        print(f"mergesearch {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
