"""The `mergesearch` command line: argument parsing, dispatch, and turning user errors into one line + exit 2.

Each subcommand's work lives in its own module; this file only parses and dispatches.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import signal
import sys
import warnings

from search import __version__

USER_ERROR = 2
THIRD_PARTY_LOGGERS = ("optuna", "transformers", "lm-eval", "lm_eval", "datasets", "huggingface_hub", "torch",
                       "accelerate", "urllib3", "filelock", "matplotlib")


class _Parser(argparse.ArgumentParser):
    """argparse with errors on one line (`mergesearch CMD: error: ...`, exit 2) instead of usage + error."""

    def error(self, message: str):
        self.exit(USER_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    # Global flags, accepted before or after the subcommand (the subcommand's copy does not reset them).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="log diagnostics and third-party warnings (and tracebacks on errors)")
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print one JSON summary on stdout at the end")

    p = _Parser(prog="mergesearch", parents=[common],
                description="Tune model-merge recipes: in-memory mergekit-compatible merges, Optuna search, "
                            "model soups.")
    p.add_argument("--version", action="version", version=f"mergesearch {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def command(name: str, help: str, description: str, json: bool = False) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=description,
                              parents=[common, as_json] if json else [common])

    m = command("merge", "merge any mergekit YAML into a model folder",
                "Merge a mergekit-compatible YAML config into OUT_DIR (same tensors as mergekit).")
    m.add_argument("config", help="mergekit YAML config")
    m.add_argument("out_dir", help="output model folder (written atomically)")
    m.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:i (default: auto)")
    m.add_argument("--copy-tokenizer", action=argparse.BooleanOptionalAction, default=True,
                   help="copy the tokenizer of tokenizer_source / the base (or first) model (default: yes)")
    m.add_argument("--out-shard-size", default="5B", help="max shard size, e.g. 500M, 5B (default 5B)")
    m.add_argument("--lazy", action="store_true", help="stream tensor by tensor (peak memory ~ one tensor per source)")
    _allow_pickle(m)
    m.add_argument("--random-seed", type=int, default=0, help="seed for random methods (dare_*, della*, ...)")
    m.add_argument("--force", action="store_true",
                   help="replace OUT_DIR if it exists (never when it is one of the config's inputs)")

    s = command("search", "run (or resume) an Optuna search over merge recipes",
                "Run or resume the study described by STUDY.yaml.", json=True)
    s.add_argument("study", help="study YAML")
    s.add_argument("--trials", type=positive_int, default=None, help="total trial budget (overrides budget.trials)")
    s.add_argument("--timeout", default=None, help="wall-clock budget, e.g. 30m, 8h (overrides budget.timeout)")
    s.add_argument("--storage", default=None, help="Optuna storage URL (default: sqlite in output_dir)")
    s.add_argument("--workers", type=positive_int, default=1, help="worker processes sharing the storage")
    s.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:i")
    s.add_argument("--new-study", action="store_true", help="start a fresh study even if one exists with this name")
    s.add_argument("--no-progress", action="store_true", help="plain log lines instead of a live display")
    _allow_pickle(s)

    va = command("validate", "check a study without running it",
                 "Check STUDY.yaml as `search` would (models, tasks, space, sampler, storage) and print the genes, "
                 "models, tasks with item counts, and the storage and outputs it would use. Creates nothing.",
                 json=True)
    va.add_argument("study", help="study YAML")
    va.add_argument("--storage", default=None, help="Optuna storage URL (default: sqlite in output_dir)")
    va.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:i")
    _allow_pickle(va)

    so = command("soup", "greedy or uniform model soup over checkpoints",
                 "Build a greedy or uniform soup over the checkpoints in SOUP.yaml.", json=True)
    so.add_argument("soup", help="soup YAML")
    so.add_argument("--mode", choices=["greedy", "uniform"], default=None, help="override the YAML's mode")
    so.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:i")
    so.add_argument("--write-model", default=None, metavar="DIR", help="also write the soup model to DIR")
    so.add_argument("--force", action="store_true", help="replace the --write-model folder if it exists")
    _allow_pickle(so)

    e = command("eval", "evaluate a model folder or a merge config",
                "Score a model folder, or the merge described by a config, on tasks.", json=True)
    e.add_argument("target", help="MODEL_DIR or merge CONFIG.yaml")
    g = e.add_mutually_exclusive_group(required=True)
    g.add_argument("--tasks", nargs="+", metavar="TASK",
                   help="task specs: KIND:PATH[:LIMIT] for local JSONL, or lm_eval:NAME[:LIMIT]")
    g.add_argument("--suite", metavar="STUDY.yaml", help="use the evaluation block of a study YAML")
    e.add_argument("--split", choices=["search", "holdout", "all"], default="all", help="which items to score")
    e.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:i")
    e.add_argument("--batch-size", type=positive_int, default=32)
    e.add_argument("--out", default=None, help="write results JSON to this file (replaced if it exists)")
    _allow_pickle(e)

    x = command("export", "export a trial's config (and optionally its model)",
                "Rebuild the best (or a given) trial's config from the study storage.", json=True)
    x.add_argument("study", help="study YAML")
    x.add_argument("--trial", type=int, default=None, help="trial number (default: the held-out winner, else best)")
    x.add_argument("--out", default=None, help="config path (default: output_dir/best_config.yaml)")
    x.add_argument("--write-model", default=None, metavar="DIR", help="also write the merged model to DIR")
    x.add_argument("--force", action="store_true", help="replace the --write-model folder if it exists")
    x.add_argument("--storage", default=None, help="Optuna storage URL (default: sqlite in output_dir)")
    x.add_argument("--device", default="auto")
    _allow_pickle(x)

    r = command("report", "plots and tables for a study (re-runnable)",
                "Write output_dir/report/: plots, report.html and trials.csv.")
    r.add_argument("study", help="study YAML")
    r.add_argument("--storage", default=None, help="Optuna storage URL (default: sqlite in output_dir)")

    command("methods", "list the merge methods and their parameters",
            "The merge methods (mergekit 0.1.5 names), their parameters, defaults and ranges.", json=True)

    d = command("demo", "the embedded demo, end to end",
                "Build tiny specialists (cached), search a merge, export, report, soup.")
    d.add_argument("--out", default="runs/demo", help="run folder (default runs/demo)")
    d.add_argument("--trials", type=positive_int, default=None, help="override the demo's trial budget")
    d.add_argument("--quick", action="store_true", help="a tiny budget (for CI)")
    return p


def _allow_pickle(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--allow-pickle", action="store_true",
                        help="allow loading .bin pickle weights (only plain tensors are ever unpickled)")


def _user_errors() -> tuple[type[BaseException], ...]:
    # Imported when a command runs, not at start-up: `mergesearch --help` stays instant (no torch, no optuna).
    from evaluators import EvalError
    from merge_core import MergeConfigError
    from search import StudyError

    return (MergeConfigError, EvalError, StudyError)


def _dispatch(args: argparse.Namespace) -> int:
    # Each command imports only its own module (torch, transformers, optuna load when a command needs them).
    if args.command == "merge":
        from search.cli.merge import merge_command
        return merge_command(args)
    if args.command == "search":
        from search.cli.commands import search_command
        return search_command(args)
    if args.command == "validate":
        from search.cli.commands import validate_command
        return validate_command(args)
    if args.command == "soup":
        from search.cli.commands import soup_command
        return soup_command(args)
    if args.command == "eval":
        from search.cli.evaluate import eval_command
        return eval_command(args)
    if args.command == "export":
        from search.cli.commands import export_command
        return export_command(args)
    if args.command == "report":
        from search.cli.commands import report_command
        return report_command(args)
    if args.command == "methods":
        from search.cli.commands import methods_command
        return methods_command(args)
    if args.command == "demo":
        from search.cli.demo import demo_command
        return demo_command(args)
    raise AssertionError(args.command)


def one_line(message: str) -> str:
    """A message on one line: wrapped library messages (YAML, JSON, safetensors) have line breaks."""
    return " ".join(part.strip() for part in message.splitlines() if part.strip())


def _quiet_third_parties() -> None:
    """Without -v, stderr carries mergesearch's own lines only: no Python warnings or library log noise."""
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ["PYTHONWARNINGS"] = "ignore"          # spawned workers inherit these two
    os.environ["MERGESEARCH_QUIET"] = "1"
    for name in THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    args.verbose = getattr(args, "verbose", False)
    if args.command is None:
        parser.print_help()
        return USER_ERROR
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        _quiet_third_parties()
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


def console_main() -> None:
    """The console script: `main`, then leave without tearing the interpreter down.

    Finalizing torch's modules and freeing a merge's buffers took ~0.3 s of a 2.5 s `merge` of a 135M
    model. Exit handlers still run first (log files, temporary folders, multiprocessing), and output is
    flushed; every command has finished its work (files closed, workers joined) when `main` returns.
    """
    code = main()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    console_main()
