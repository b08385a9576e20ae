"""Run `mergesearch ARGS` exactly as `python -m search.cli ARGS` does, recording which phase it is in.

Test helper for the SIGKILL campaign (test_reliability_kill.py): the current phase is one byte at offset 0
of the file named by MERGESEARCH_PHASE_FILE, written through a shared mmap, so a killer polling the same
file knows what the process is doing and, once the process is dead, where it died. Only timing is
observed: every wrapped function is called unchanged.

    python tests/killprobe.py search STUDY.yaml --no-progress
"""

from __future__ import annotations

import functools
import mmap
import os
import sys
from pathlib import Path

# One byte per phase; 0 = none of the phases below (bookkeeping between them).
PHASES = {"other": 0, "startup": 1, "enqueue": 2, "ask": 3, "materialize": 4, "evaluate": 5, "tell": 6,
          "best_write": 7, "finalize": 8}
NAMES = {code: name for name, code in PHASES.items()}


def open_phase_file(path: Path | str) -> mmap.mmap:
    """The shared one-page map of a phase file (created if missing)."""
    path = Path(path)
    if not path.exists():
        path.write_bytes(b"\0" * mmap.PAGESIZE)
    fd = os.open(path, os.O_RDWR)
    try:
        return mmap.mmap(fd, mmap.PAGESIZE)
    finally:
        os.close(fd)


def _wrap(owner, attr: str, phase: str, mark, when=None, after: str | None = None) -> None:
    """Mark `phase` while owner.attr runs; afterwards restore the previous phase (or mark `after`)."""
    original = getattr(owner, attr)
    code = PHASES[phase]

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        if when is not None and not when(*args, **kwargs):
            return original(*args, **kwargs)
        previous = mark(code)
        try:
            return original(*args, **kwargs)
        finally:
            mark(previous if after is None else PHASES[after])

    setattr(owner, attr, wrapper)


def install(path: Path | str) -> None:
    shared = open_phase_file(path)

    def mark(code: int) -> int:
        previous = shared[0]
        shared[0] = code
        return previous

    mark(PHASES["startup"])
    import optuna

    import evaluators.suite
    import merge_core.engine
    import search.export
    import search.loop

    _wrap(optuna.study.Study, "enqueue_trial", "enqueue", mark)
    _wrap(optuna.study.Study, "ask", "ask", mark)
    _wrap(optuna.study.Study, "tell", "tell", mark)
    _wrap(merge_core.engine.MergeEngine, "materialize", "materialize", mark)
    _wrap(evaluators.suite.Suite, "evaluate", "evaluate", mark)
    _wrap(search.export, "atomic_write_text", "best_write", mark,
          when=lambda path, *a, **k: Path(path).name == search.export.BEST_CONFIG)
    _wrap(search.loop, "finalize", "finalize", mark)
    # Startup ends when the first trial is asked for.
    _wrap(search.loop, "ask_within_budget", "other", mark, after="other")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    install(os.environ["MERGESEARCH_PHASE_FILE"])
    from search.cli import main

    sys.exit(main(sys.argv[1:]))
