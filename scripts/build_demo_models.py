#!/usr/bin/env python
"""Build (or reuse) the demo model family: base, specialists, soup checkpoints and JSONL tasks.

Thin CLI over demo_family.build_demo_family; prints the manifest summary as JSON. `mergesearch demo` measures
the family (parents, plain merges, the search, the soup) with the product itself.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("models/demo"), help="output folder (default models/demo)")
    parser.add_argument("--quick", action="store_true", help="the seconds-long test build (tiny, untrained-ish)")
    parser.add_argument("--force", action="store_true", help="rebuild even when a matching build exists")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from demo_family import build_demo_family      # builds in a process with pinned CPU kernels (one thread)

    try:
        manifest = build_demo_family(args.out, quick=args.quick, force=args.force)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = {k: manifest[k] for k in ("cached", "plan_hash", "content_hash", "parameters", "final_train_loss",
                                         "seconds", "models")}
    summary["out"] = str(Path(args.out).resolve())
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
