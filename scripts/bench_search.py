#!/usr/bin/env python
"""Benchmark of the search loop, printed as JSON.

1. Loop overhead: the wall time of a run's trials minus the merge and evaluation seconds they report,
   as a fraction of that wall time (ask/tell, storage writes, best-config export, pruner bookkeeping).
2. Sample efficiency: how many trials cmaes and tpe need to reach the best score that random search
   reaches with 4x as many trials (median over seeds).

Usage: python scripts/bench_search.py [--study studies/demo.yaml] [--trials 25] [--seeds 3] [--out F.json]
Runs in a temporary folder; the study's own output folder is never touched.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def run(study_path: Path, sampler: str, seed: int, trials: int, pruner: str | None, folder: Path) -> dict:
    """One in-process run of `trials` trials; returns per-trial scores and the loop timing."""
    import dataclasses

    import optuna

    from search.loop import Budget, open_study, run_worker
    from search.space import SearchSpace
    from search.study import PrunerConfig, SamplerConfig, load_study

    cfg = load_study(study_path)
    cfg = dataclasses.replace(cfg, name=f"bench-{sampler}-{seed}", output_dir=folder / f"{sampler}-{seed}",
                              sampler=SamplerConfig(sampler, seed, {}),
                              pruner=PrunerConfig(pruner or cfg.pruner.name, cfg.pruner.options),
                              seed_trials=())
    space = SearchSpace(cfg)
    study = open_study(cfg, space=space)
    stamps: list[float] = []
    t_setup = time.perf_counter()
    run_worker(cfg, None, Budget(trials, None), "cpu", threading.Event(),
               on_trial=lambda s, t: stamps.append(time.time()))
    total = time.perf_counter() - t_setup
    done = study.get_trials(deepcopy=False)
    first_start = min(t.datetime_start.timestamp() for t in done if t.datetime_start)
    loop_wall = stamps[-1] - first_start
    work = sum(t.user_attrs.get("merge_s", 0) + t.user_attrs.get("eval_s", 0) for t in done)
    scores = [t.user_attrs.get("score") if t.state == optuna.trial.TrialState.COMPLETE else None for t in done]
    return {"sampler": sampler, "seed": seed, "trials": len(done), "scores": scores,
            "loop_wall_s": loop_wall, "merge_eval_s": work, "setup_and_loop_s": total,
            "overhead_fraction": (loop_wall - work) / loop_wall if loop_wall > 0 else None,
            "merge_s_median": statistics.median(t.user_attrs.get("merge_s", 0) for t in done),
            "eval_s_median": statistics.median(t.user_attrs.get("eval_s", 0) for t in done)}


def trials_to_reach(scores: list[float | None], target: float) -> int | None:
    best = float("-inf")
    for i, s in enumerate(scores, 1):
        if s is not None:
            best = max(best, s)
        if best >= target:
            return i
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", type=Path, default=REPO / "studies" / "demo.yaml")
    parser.add_argument("--trials", type=int, default=25, help="budget N of the model-based samplers")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--samplers", default="cmaes,tpe")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 2)))
    result: dict = {"study": str(args.study), "trials": args.trials, "random_trials": 4 * args.trials,
                    "seeds": args.seeds, "runs": []}
    with tempfile.TemporaryDirectory(prefix="bench-search-") as tmp:
        folder = Path(tmp)
        overhead = run(args.study, "random", 1000, min(args.trials, 20), "none", folder)
        result["overhead"] = {k: overhead[k] for k in ("trials", "loop_wall_s", "merge_eval_s",
                                                      "overhead_fraction", "merge_s_median", "eval_s_median")}
        with_pruner = run(args.study, "random", 1001, min(args.trials, 20), "wilcoxon", folder)
        result["overhead_wilcoxon"] = {k: with_pruner[k] for k in ("trials", "loop_wall_s", "merge_eval_s",
                                                                  "overhead_fraction")}
        efficiency: dict[str, list] = {s: [] for s in args.samplers.split(",")}
        for seed in range(args.seeds):
            rnd = run(args.study, "random", seed, 4 * args.trials, "none", folder)
            target = max(s for s in rnd["scores"] if s is not None)
            result["runs"].append({"sampler": "random", "seed": seed, "best": target})
            for sampler in efficiency:
                r = run(args.study, sampler, seed, 4 * args.trials, "none", folder)
                needed = trials_to_reach(r["scores"], target)
                best_at_n = max((s for s in r["scores"][:args.trials] if s is not None), default=None)
                efficiency[sampler].append(needed)
                result["runs"].append({"sampler": sampler, "seed": seed, "trials_to_random_best": needed,
                                       "best_within_N": best_at_n, "random_best_with_4N": target})
        result["sample_efficiency"] = {}
        for sampler, needed in efficiency.items():
            median = statistics.median([x if x is not None else float("inf") for x in needed])
            result["sample_efficiency"][sampler] = {
                "trials_to_reach_random_4N_best": needed,   # None: not reached within 4N trials
                "median": median if median != float("inf") else None,
                "target_met": median <= args.trials}
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
