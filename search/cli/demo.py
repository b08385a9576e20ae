"""`mergesearch demo`: the embedded default, end to end on a laptop with no downloads.

Builds (once, cached) tiny specialists, searches a merge recipe, re-evaluates on held-out items, exports
best_config.yaml and the merged model, writes the report, runs the greedy soup, and ends with one table
comparing every parent, the plain uniform merges and the recipe found. Owns only this orchestration.
"""

from __future__ import annotations

import importlib
import json
import sys
import time
from pathlib import Path

import optuna
import yaml

from merge_core.config import parse_config
from merge_core.writer import merge_to_folder
from search import StudyError
from search.cli.output import console as make_console
from search.cli.progress import SearchProgress
from search.export import atomic_write_text, choose_trial, scores_card
from search.loop import run_search
from search.report import results_markdown, summary_table
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
    console.print(f"[bold]1/4 demo models[/] in {models_dir} (built once, then cached)")
    manifest = demo_family().build_demo_family(models_dir, quick=args.quick)
    console.print(f"    {'cached' if manifest.get('cached') else 'built'}: base + {len(manifest['models']['specialists'])}"
                  f" specialists + {len(manifest['models']['soup'])} soup checkpoints, "
                  f"{manifest['parameters'] / 1e6:.1f}M parameters each")

    trials = args.trials if args.trials is not None else (8 if args.quick else None)
    study_path = prepare(STUDIES / "demo.yaml", out, models_dir, args.quick, trials)
    study = load_study(study_path)
    console.print(f"[bold]2/4 merge search[/]: {study_path} ({study.merge.merge_method}, "
                  f"{study.space.granularity}, sampler {study.sampler.name}, objective {study.aggregate}), then "
                  "the held-out comparison: parents, plain merges and the best found")
    status = run_search(study, trials=study.trials, timeout=study.timeout,
                        progress=SearchProgress(live=True, console=console, show_summary=False))
    if status != 0:
        return status

    optuna_study = optuna.load_study(study_name=study.name, storage=study.storage_url())
    console.print("[bold]3/4 the merged model[/]")
    trial, _, _, _ = choose_trial(optuna_study, None)
    best_cfg = parse_config(yaml.safe_load(trial.user_attrs["config"]), where="best", base_dir=study.base_dir)
    model_dir = merge_to_folder(best_cfg, out / "model", seed=study.seed, force=True,
                                card_extra=scores_card(trial, holdout_results(optuna_study).get(trial.number)))
    console.print(f"    {model_dir}")

    console.print("[bold]4/4 greedy soup[/] over the soup checkpoints")
    soup_path = prepare(STUDIES / "demo_soup.yaml", out / "soup", models_dir, args.quick, None)
    soup_cfg = load_soup(soup_path)
    soup = run_soup(soup_cfg, "greedy")
    write_outputs(soup_cfg, soup, "greedy")
    names = [p.name for p in soup_cfg.checkpoints]
    best_single = names[soup.best_single]

    console.print(summary_table(optuna_study, study))
    summary = ["# mergesearch demo", "", results_markdown(optuna_study, study)]
    soup_line = (f"greedy soup: {len(soup.chosen)} of {len(names)} checkpoints, held-out "
                 f"{soup.holdout.get('greedy soup', float('nan')):.3f} vs best single ({best_single}) "
                 f"{soup.holdout.get('best single', float('nan')):.3f} vs uniform soup "
                 f"{soup.holdout.get('uniform soup', float('nan')):.3f}")
    console.print(soup_line)
    summary += [soup_line, ""]
    atomic_write_text(out / "demo_summary.md", "\n".join(summary))
    atomic_write_text(out / "demo_summary.json", json.dumps({
        "comparison": optuna_study.user_attrs.get("final"), "family": manifest["content_hash"],
        "soup": {"chosen": [names[i] for i in soup.chosen], "of": len(names), "best_single": best_single,
                 "holdout": soup.holdout}, "seconds": round(time.perf_counter() - t0, 1)}, indent=2) + "\n")
    console.print(f"\noutputs in {out}: best_config.yaml, model/, report/report.html, trials.csv, soup/, "
                  f"demo_summary.md and .json  ({time.perf_counter() - t0:.0f}s)")
    console.print(f"next: mergesearch report {study_path}   |   mergekit-yaml {out / 'best_config.yaml'} OUT")
    return 0
