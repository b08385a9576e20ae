"""What the command line prints: one rich console on stderr (no wrapping when piped) and JSON on stdout.

Owns formatting only; every command decides what to say.
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any

from rich.console import Console

PIPED_WIDTH = 1000   # piped output is for files and scripts: lines are never wrapped or cut


def console(stdout: bool = False) -> Console:
    """The console for human-readable lines and tables: stderr (or stdout for a command's main table),
    soft-wrapped, as wide as needed when piped."""
    stream = sys.stdout if stdout else sys.stderr
    return Console(stderr=not stdout, soft_wrap=True, highlight=False,
                   width=None if stream.isatty() else PIPED_WIDTH)


def _plain(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "__fspath__"):
        return str(value)
    return value


def print_json(summary: dict[str, Any]) -> None:
    """The machine-readable summary of a command: one JSON object on one line of stdout."""
    print(json.dumps(_plain(summary), sort_keys=False), flush=True)
