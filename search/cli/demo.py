"""`mergesearch demo`: the embedded default, end to end on a laptop with no downloads.

Builds (once, cached) tiny specialists, searches a merge recipe, re-evaluates on held-out items, exports
best_config.yaml and the merged model, writes the report, runs the greedy soup, and ends with one table
comparing every parent, the plain uniform merges and the recipe found. Owns only this orchestration.
"""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path

import optuna
import yaml
from optuna.trial import TrialState
from rich.table import Table

from evaluators.suite import Suite
from merge_core.config import parse_config
from merge_core.engine import MergeEngine
from merge_core.writer import merge_to_folder
from search import StudyError
from search.cli.output import console as make_console
from search.cli.progress import SearchProgress
from search.export import atomic_write_text, choose_trial, scores_card
from search.loop import run_search
from search.soup import load_soup, run_soup, write_outputs
from search.store import holdout_results
from search.study import load_study

REPO = Path(__file__).resolve().parents[2]
STUDIES = REPO / "studies"
SCRIPTS = REPO / "scripts"


def demo_family():
    """scripts/demo_family.py, the demo's model builder (training code stays out of the installed package)."""
    if not (SCRIPTS / "demo_family.py").is_file():
        raise StudyError("the demo's model builder is missing (run the demo from a clone of the repository)",
                         str(SCRIPTS / "demo_family.py"))
    if str(SCRIPTS) not in sys.path:
        sys.path.insert(0, str(SCRIPTS))
    return importlib.import_module("demo_family")


def _retarget(node, old: str, new: str):
    """Every string in a YAML tree with `old` replaced by `new` (model and data paths of the quick build)."""
    if isinstance(node, dict):
        return {k: _retarget(v, old, new) for k, v in node.items()}
    if isinstance(node, list):
        return [_retarget(v, old, new) for v in node]
    return node.replace(old, new) if isinstance(node, str) else node


def _absolute(node, base: Path, keys=("model", "base_model", "path", "holdout_path")):
    """Relative paths under `keys` (and checkpoint globs) made absolute against `base`."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k in keys and isinstance(v, str) and not Path(v).is_absolute():
                out[k] = str((base / v).resolve())
            elif k == "checkpoints" and isinstance(v, list):
                out[k] = [str((base / p).resolve()) if not Path(p).is_absolute() else p for p in v]
            else:
                out[k] = _absolute(v, base, keys)
        return out
    if isinstance(node, list):
        return [_absolute(v, base, keys) for v in node]
    return node


def prepare(template: Path, out_dir: Path, models_dir: Path, quick: bool, trials: int | None) -> Path:
    """Write the run's copy of a demo YAML into out_dir (absolute paths, the run's output folder)."""
    data = yaml.safe_load(template.read_text())
    if quick:
        data = _retarget(data, "models/demo/", f"{models_dir.relative_to(REPO).as_posix()}/")
    data = _absolute(data, template.parent)
    data["output_dir"] = str(out_dir.resolve())
    if trials is not None and "budget" in data:
        data["budget"] = {**data["budget"], "trials": trials}
    path = out_dir / template.name
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# written by `mergesearch demo` from {template.relative_to(REPO)}\n"
                    + yaml.safe_dump(data, sort_keys=False))
    return path


def baseline_configs(study) -> dict[str, dict]:
    """The plain merges a user would try first, over the study's models (mergekit configs as dicts)."""
    merge = study.merge_raw
    models = [m["model"] if isinstance(m, dict) else m for m in merge["models"]]
    base = merge.get("base_model")
    common = {"dtype": merge.get("dtype", "float32")}
    out = {"linear average": {"merge_method": "linear", **common,
                              "models": [{"model": m, "parameters": {"weight": 1.0}} for m in models]}}
    if base:
        out["task arithmetic (w=1)"] = {"merge_method": "task_arithmetic", "base_model": base, **common,
                                        "models": [{"model": m, "parameters": {"weight": 1.0}} for m in models]}
        for density in (1.0, 0.5):
            label = "ties (mergekit defaults)" if density == 1.0 else "ties (density 0.5)"
            out[label] = {"merge_method": "ties", "base_model": base, **common,
                          "models": [{"model": m, "parameters": {"weight": 1.0, "density": density}}
                                     for m in models]}
    return out


def score_configs(study, configs: dict[str, dict], device: str | None) -> dict[str, dict]:
    """Held-out and search scores of arbitrary merge configs (each gets its own small engine)."""
    out: dict[str, dict] = {}
    suite = None
    for label, raw in configs.items():
        cfg = parse_config(raw, where=label, base_dir=study.base_dir)
        engine = MergeEngine(cfg, device=device or "auto", seed=study.seed)
        suite = suite or Suite.from_config(study.evaluation, engine.tokenizer, device=engine.device)
        model = engine.materialize(cfg)
        out[label] = {split: suite.evaluate(model, split) for split in ("search", "holdout")}
    return out


def final_table(study, optuna_study, baselines: dict[str, dict]):
    """Rows: each parent, the plain merges, the best found; columns: held-out per task, combined, gap."""

    held = holdout_results(optuna_study)
    tasks = [t.name for t in study.evaluation.tasks]
    table = Table(title="held-out scores (items never shown to the search)")
    table.add_column("candidate")
    for name in tasks:
        table.add_column(name, justify="right")
    table.add_column("combined", justify="right", style="bold")
    table.add_column("search", justify="right", style="dim")
    rows: list[tuple[str, dict, float, float]] = []
    complete = {t.number: t for t in optuna_study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}
    for t in complete.values():
        label = t.user_attrs.get("seed", "")
        if label.startswith("parent") and t.number in held:
            rows.append((label, held[t.number]["scores"], held[t.number]["score"], t.user_attrs["score"]))
    for label, res in baselines.items():
        h = res["holdout"]
        rows.append((label, {t.name: t.score for t in h.tasks}, h.score, res["search"].score))
    winner = optuna_study.user_attrs.get("holdout_winner")
    if winner in held:
        t = complete[winner]
        rows.append((f"best found (trial {winner})", held[winner]["scores"], held[winner]["score"],
                     t.user_attrs["score"]))
    for label, scores, combined, search in rows:
        table.add_row(label, *[f"{scores.get(n, float('nan')):.3f}" for n in tasks], f"{combined:.3f}",
                      f"{search:.3f}", style="bold green" if label.startswith("best") else None)
    return table, rows


def markdown(rows, tasks: list[str]) -> str:
    lines = ["| candidate | " + " | ".join(tasks) + " | combined (held-out) | search |",
             "|---|" + "---|" * (len(tasks) + 2)]
    for label, scores, combined, search in rows:
        lines.append(f"| {label} | " + " | ".join(f"{scores.get(n, float('nan')):.3f}" for n in tasks)
                     + f" | **{combined:.3f}** | {search:.3f} |")
    return "\n".join(lines) + "\n"


def demo_command(args) -> int:
    """Build the demo family if missing, search, export, report, soup, and print the comparison."""
    console = make_console()
    for name in ("demo.yaml", "demo_soup.yaml"):
        if not (STUDIES / name).is_file():
            raise StudyError("the demo's study files are missing (run the demo from a clone of the repository)",
                             str(STUDIES / name))
    out = Path(args.out).resolve()
    models_dir = REPO / "models" / ("demo-quick" if args.quick else "demo")
    t0 = time.perf_counter()
    console.print(f"[bold]1/5 demo models[/] in {models_dir} (built once, then cached)")
    manifest = demo_family().build_demo_family(models_dir, quick=args.quick)
    console.print(f"    {'cached' if manifest.get('cached') else 'built'}: base + {len(manifest['models']['specialists'])}"
                  f" specialists + {len(manifest['models']['soup'])} soup checkpoints, "
                  f"{manifest['parameters'] / 1e6:.1f}M parameters each")

    trials = args.trials if args.trials is not None else (8 if args.quick else None)
    study_path = prepare(STUDIES / "demo.yaml", out, models_dir, args.quick, trials)
    study = load_study(study_path)
    console.print(f"[bold]2/5 merge search[/]: {study_path} ({study.merge.merge_method}, "
                  f"{study.space.granularity}, sampler {study.sampler.name})")
    status = run_search(study, trials=study.trials, timeout=study.timeout,
                        progress=SearchProgress(live=True, console=console))
    if status != 0:
        return status

    optuna_study = optuna.load_study(study_name=study.name, storage=study.storage_url())
    console.print("[bold]3/5 plain merges for comparison[/] (linear average, task arithmetic, ties)")
    baselines = score_configs(study, baseline_configs(study), None)
    table, rows = final_table(study, optuna_study, baselines)

    console.print("[bold]4/5 the merged model[/]")
    trial, _, _, _ = choose_trial(optuna_study, None)
    best_cfg = parse_config(yaml.safe_load(trial.user_attrs["config"]), where="best", base_dir=study.base_dir)
    model_dir = merge_to_folder(best_cfg, out / "model", seed=study.seed, force=True,
                                card_extra=scores_card(trial, holdout_results(optuna_study).get(trial.number)))
    console.print(f"    {model_dir}")

    console.print("[bold]5/5 greedy soup[/] over the soup checkpoints")
    soup_path = prepare(STUDIES / "demo_soup.yaml", out / "soup", models_dir, args.quick, None)
    soup_cfg = load_soup(soup_path)
    soup = run_soup(soup_cfg, "greedy")
    write_outputs(soup_cfg, soup, "greedy")
    names = [p.name for p in soup_cfg.checkpoints]
    best_single = names[soup.best_single]

    console.print(table)
    tasks = [t.name for t in study.evaluation.tasks]
    best = rows[-1] if rows and rows[-1][0].startswith("best") else None
    others = [r for r in rows if r is not best]
    summary = ["# mergesearch demo", "", markdown(rows, tasks)]
    if best is not None and others:
        runner_up = max(others, key=lambda r: r[2])
        margin = best[2] - runner_up[2]
        gap = best[3] - best[2]
        line = (f"best found beats the best other candidate ({runner_up[0]}) by {margin:+.3f} held-out; "
                f"search-vs-held-out gap of the best: {gap:+.3f}")
        console.print(line)
        summary += [line, ""]
    soup_line = (f"greedy soup: {len(soup.chosen)} of {len(names)} checkpoints, held-out "
                 f"{soup.holdout.get('greedy soup', float('nan')):.3f} vs best single ({best_single}) "
                 f"{soup.holdout.get('best single', float('nan')):.3f} vs uniform soup "
                 f"{soup.holdout.get('uniform soup', float('nan')):.3f}")
    console.print(soup_line)
    summary += [soup_line, ""]
    atomic_write_text(out / "demo_summary.md", "\n".join(summary))
    console.print(f"\noutputs in {out}: best_config.yaml, model/, report/report.html, trials.csv, soup/, "
                  f"demo_summary.md  ({time.perf_counter() - t0:.0f}s)")
    console.print(f"next: mergesearch report {study_path}   |   mergekit-yaml {out / 'best_config.yaml'} OUT")
    return 0
