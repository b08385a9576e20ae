"""`mergesearch merge CONFIG OUT_DIR`: any mergekit YAML to a model folder, with a progress bar on a terminal.

Only wires the command line to merge_core.writer.merge_to_folder.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from merge_core.config import load_config
from merge_core.writer import merge_to_folder, parse_size
from search.cli.output import console


def merge_command(args) -> int:
    """`mergesearch merge CONFIG OUT_DIR`."""
    config = load_config(args.config)
    say = console()
    t0 = time.perf_counter()
    with Progress(TextColumn("merging"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=say, transient=True, disable=not say.is_terminal) as bar:
        task_id = bar.add_task("merge", total=None)
        out = merge_to_folder(
            config, Path(args.out_dir), device=args.device, max_shard_bytes=parse_size(args.out_shard_size),
            copy_tokenizer=args.copy_tokenizer, lazy=args.lazy, allow_pickle=args.allow_pickle,
            seed=args.random_seed, force=args.force,
            progress=lambda done, total: bar.update(task_id, completed=done, total=total))
    say.print(f"merged {config.merge_method} -> {out} in {time.perf_counter() - t0:.1f}s")
    return 0
