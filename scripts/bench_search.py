#!/usr/bin/env python
"""Benchmark of the search loop, printed as JSON.

1. Loop overhead: the wall time of a run's trials minus the merge and evaluation seconds they report,
   as a fraction of that wall time (ask/tell, storage writes, best-config export, pruner bookkeeping).
2. Sample efficiency: how many trials cmaes and tpe need to reach the best score that random search
   reaches with 4x as many trials (median over seeds).
3. `--fidelity PRUNER[:EVERY],...`: time to the same held-out score. A run without pruning and runs with each
   pruner (the same study, sampler, seed and trial budget); for each pruned run, the wall-clock time until its
   best trial so far (by search score) first scores, on the held-out items, within one standard error of the
   unpruned run's final best, as a fraction of the unpruned run's time; trials per hour of each run; the final
   held-out scores with their standard errors.

Usage: python scripts/bench_search.py [--study studies/demo.yaml] [--trials 25] [--seeds 3] [--out F.json]
       python scripts/bench_search.py --fidelity wilcoxon:16,hyperband:16 --trials 150 [--sampler cmaes]
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


def run(study_path: Path, sampler: str, seed: int, trials: int, pruner: str | None, folder: Path,
        every: int | None = None, keep: bool = False) -> dict:
    """One in-process run of `trials` trials (no seed trials); returns per-trial scores and the loop timing
    (with `keep`, also the study, its config and the runner, for held-out evaluations)."""
    import dataclasses

    import optuna

    from search.loop import Budget, ensure_references, known_items_of, open_study, run_worker
    from search.objective import TrialRunner
    from search.space import SearchSpace
    from search.study import PrunerConfig, SamplerConfig, load_study

    cfg = load_study(study_path)
    name = pruner or cfg.pruner.name
    options = cfg.pruner.options if name == cfg.pruner.name else {}
    cfg = dataclasses.replace(cfg, name=f"bench-{sampler}-{seed}-{name}", output_dir=folder / f"{sampler}-{seed}-{name}",
                              sampler=SamplerConfig(sampler, seed, dict(cfg.sampler.options) if sampler == cfg.sampler.name
                                                    else {}),
                              pruner=PrunerConfig(name, options, None if name == "none" else (every or 16)),
                              seed_trials=(), baselines=False)
    space = SearchSpace(cfg)
    study = open_study(cfg, space=space)
    runner = TrialRunner(cfg, space, device="cpu")
    runner.references = ensure_references(study, cfg, lambda: runner)
    runner.known_items = known_items_of(study, cfg)
    stamps: list[float] = []
    clock: dict[int, tuple[float, float]] = {}          # trial number -> (wall, process CPU) when it ended
    cpu0 = time.process_time()
    t_setup = time.perf_counter()

    def ended(_study, trial) -> None:
        stamps.append(time.time())
        clock[trial.number] = (time.time(), time.process_time() - cpu0)

    run_worker(cfg, None, Budget(trials, None), "cpu", threading.Event(), on_trial=ended, runner=runner, study=study)
    total = time.perf_counter() - t_setup
    done = study.get_trials(deepcopy=False)
    first_start = min(t.datetime_start.timestamp() for t in done if t.datetime_start)
    loop_wall = stamps[-1] - first_start
    work = sum(t.user_attrs.get("merge_s", 0) + t.user_attrs.get("eval_s", 0) for t in done)
    scores = [t.user_attrs.get("score") if t.state == optuna.trial.TrialState.COMPLETE else None for t in done]
    out = {"sampler": sampler, "seed": seed, "pruner": name, "every": cfg.pruner.every, "trials": len(done),
           "scores": scores, "loop_wall_s": loop_wall, "merge_eval_s": work, "setup_and_loop_s": total,
           "overhead_fraction": (loop_wall - work) / loop_wall if loop_wall > 0 else None,
           "merge_s_median": statistics.median(t.user_attrs.get("merge_s", 0) for t in done),
           "eval_s_median": statistics.median(t.user_attrs.get("eval_s", 0) for t in done),
           "pruned": sum(t.state == optuna.trial.TrialState.PRUNED for t in done),
           "trials_per_hour": 3600 * len(done) / loop_wall if loop_wall > 0 else None,
           "cpu_s": time.process_time() - cpu0}
    if keep:
        out.update(study=study, cfg=cfg, runner=runner, space=space, first_start=first_start, clock=clock)
    return out


def incumbents(run_: dict) -> list[tuple[float, float, object]]:
    """(wall seconds, process CPU seconds, trial) each time the best completed trial by search score changes,
    in completion order (times since the run started)."""
    import optuna

    study, clock = run_["study"], run_["clock"]
    done = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))]
    done.sort(key=lambda t: clock[t.number][0])
    out, best = [], None
    for t in done:
        if best is None or t.user_attrs["score"] > best.user_attrs["score"]:
            best = t
            out.append((clock[t.number][0] - run_["first_start"], clock[t.number][1], t))
    return out


def held_out(run_: dict, trial) -> tuple[float, float]:
    """(objective, standard error) of a trial on the held-out items; the SE from per-task standard errors
    propagated through the aggregate (as a weighted mean; for `worst`, the worst task's)."""
    import math

    runner, space, cfg = run_["runner"], run_["space"], run_["cfg"]
    result, _, _ = runner.evaluate(space.config(trial.params), "holdout")
    scores = {t.name: t.score for t in result.tasks}
    refs = runner.references
    scale = {t.name: (1.0 if cfg.aggregate == "mean" else 1.0 / refs[t.name]) for t in result.tasks}
    if cfg.aggregate == "worst":
        worst = min(result.tasks, key=lambda t: t.score * scale[t.name])
        se = worst.stderr * scale[worst.name]
    else:
        se = math.sqrt(sum((t.stderr * scale[t.name]) ** 2 for t in result.tasks)) / len(result.tasks)
    return runner.value(scores), se


def fidelity(args, folder: Path) -> dict:
    """Time to the unpruned run's held-out score, for each pruner in --fidelity."""
    base = run(args.study, args.sampler, args.seed, args.trials, "none", folder, keep=True)
    base_steps = incumbents(base)
    target, target_se = held_out(base, base_steps[-1][2])
    out = {"study": str(args.study), "sampler": args.sampler, "seed": args.seed, "trials": args.trials,
           "unpruned": {"wall_s": base["loop_wall_s"], "cpu_s": base["cpu_s"],
                        "trials_per_hour": base["trials_per_hour"], "final_holdout": target,
                        "final_holdout_se": target_se, "best_trial": base_steps[-1][2].number}, "pruned": []}
    for spec in args.fidelity.split(","):
        name, _, every = spec.partition(":")
        r = run(args.study, args.sampler, args.seed, args.trials, name, folder, every=int(every) if every else None,
                keep=True)
        reached, last = None, (None, None)
        for wall, cpu, trial in incumbents(r):
            value, se = held_out(r, trial)
            last = (value, se)
            if reached is None and value >= target - target_se:
                reached = (wall, cpu)
        fraction = reached[0] / base["loop_wall_s"] if reached else None
        out["pruned"].append({
            "pruner": name, "every": r["every"], "wall_s": r["loop_wall_s"], "cpu_s": r["cpu_s"],
            "pruned_trials": r["pruned"], "trials_per_hour": r["trials_per_hour"],
            "time_to_unpruned_holdout_s": reached[0] if reached else None,
            "fraction_of_unpruned_time": fraction,
            "cpu_time_to_unpruned_holdout_s": reached[1] if reached else None,
            "fraction_of_unpruned_cpu_time": reached[1] / base["cpu_s"] if reached else None,
            "target_met": fraction is not None and fraction <= 1 / 3,
            "final_holdout": last[0], "final_holdout_se": last[1],
            "final_within_one_se": last[0] is not None and last[0] >= target - target_se})
    return out


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
    parser.add_argument("--fidelity", default=None, metavar="PRUNER[:EVERY],...",
                        help="measure time to the unpruned held-out score for these pruners (e.g. wilcoxon:16)")
    parser.add_argument("--sampler", default="cmaes", help="the sampler of the --fidelity runs")
    parser.add_argument("--seed", type=int, default=0, help="the sampler seed of the --fidelity runs")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2,
                        help="torch threads of the runs (default: every core)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(max(1, args.threads))
    if args.fidelity:
        with tempfile.TemporaryDirectory(prefix="bench-search-") as tmp:
            result = fidelity(args, Path(tmp))
        return emit(result, args.out)
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
    emit(result, args.out)


def emit(result: dict, out: Path | None) -> None:
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if out:
        out.write_text(text)


if __name__ == "__main__":
    main()
