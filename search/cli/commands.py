"""The study subcommands (`search`, `validate`, `export`, `report`, `soup`, `methods`): arguments in, the search
package's functions called, results printed (rich on stderr, `--json` on stdout).

Owns no logic of its own beyond checking the command-line values and saying where outputs went.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from rich.table import Table

from merge_core.config import parse_config
from merge_core.methods import REGISTRY, describe_param
from merge_core.prepare import pick_device
from merge_core.writer import check_output_folder, merge_to_folder
from search import StudyError
from search.cli.output import console, print_json
from search.cli.progress import SearchProgress
from search.export import BEST_CONFIG, choose_trial, config_header, scores_card, trial_config_yaml, write_text
from search.loop import run_search
from search.objective import check_inputs
from search.report import write_report
from search.soup import checkpoint_label, comparison_rows, load_soup, run_soup, soup_config_dict, write_outputs
from search.space import SearchSpace
from search.store import (
    best_complete,
    check_creatable,
    holdout_results,
    local_file,
    opened_study,
    redact,
    sampler_options,
    state_counts,
    study_differs,
    trial_by_number,
)
from search.study import load_study, parse_duration


def _device(args, default: str) -> str:
    return args.device if args.device != "auto" else default


def _budget(args, study_cfg) -> tuple[int | None, float | None]:
    trials = args.trials if args.trials is not None else study_cfg.trials
    timeout = parse_duration(args.timeout, "--timeout") if args.timeout else study_cfg.timeout
    if trials is None and timeout is None:
        raise StudyError("no budget: give budget.trials / budget.timeout in the YAML or --trials / --timeout",
                         study_cfg.path.name)
    return trials, timeout


# ---- search ---------------------------------------------------------------------------------------------------
def search_command(args) -> int:
    """`mergesearch search STUDY.yaml [--trials N] [--timeout 8h] [--storage URL] [--workers N] [--json]`."""
    study_cfg = load_study(args.study, allow_pickle=args.allow_pickle)
    trials, timeout = _budget(args, study_cfg)
    if note := starved_sampler(study_cfg):
        console().print(note)
    status = run_search(study_cfg, trials=trials, timeout=timeout, storage_url=args.storage, workers=args.workers,
                        device=_device(args, study_cfg.device), new_study=args.new_study,
                        progress=SearchProgress(not args.no_progress, console()))
    with opened_study(study_cfg, args.storage) as study:
        summary = search_summary(study_cfg, study, args.storage)
    say = console()
    say.print(f"outputs in {study_cfg.output_dir}: " + ", ".join(
        Path(p).name + ("/" if Path(p).is_dir() else "") for p in summary["outputs"].values() if p))
    if status == 130:
        say.print(f"interrupted: run the same command to resume ({resume_command(args)})")
    if args.json:
        print_json({**summary, "interrupted": status == 130})
    return status


def starved_sampler(study_cfg) -> str | None:
    """A note when the sampler cannot learn from pruned trials, or None: CMA-ES tells its population completed
    trials, and pruned ones only at a partial objective (store.sampler_options), which Wilcoxon does not report."""
    if study_cfg.sampler.name == "cmaes" and study_cfg.pruner.name != "none" \
            and not sampler_options(study_cfg).get("consider_pruned_trials"):
        return ("note: CMA-ES learns here from completed trials only (a pruned trial is a sample lost to it); with "
                "a pruner, sampler tpe, or cmaes with pruner hyperband, reached the same held-out score in a third "
                "of the time or less on the demo (README, Performance)")
    return None


def resume_command(args) -> str:
    """The command line that resumes this search (the same one)."""
    parts = ["mergesearch", "search", str(args.study)]
    for flag in ("trials", "timeout", "storage", "workers", "device"):
        value = getattr(args, flag)
        if value is not None and not (flag == "workers" and value == 1) and not (flag == "device" and value == "auto"):
            parts += [f"--{flag}", str(value)]
    parts += ["--allow-pickle"] if args.allow_pickle else []
    return " ".join(parts)


def search_summary(study_cfg, study, storage_url: str | None) -> dict:
    """Where a study's outputs are and what it found (the `--json` summary of search)."""
    held = holdout_results(study)
    winner = study.user_attrs.get("holdout_winner")
    best = trial_by_number(study, winner) if winner is not None else best_complete(study)
    out = study_cfg.output_dir
    files = {"best_config": out / "best_config.yaml", "report": out / "report" / "report.html",
             "trials_csv": out / "trials.csv"}
    summary = {"study": study_cfg.name, "output_dir": str(out), "storage": redact(study_cfg.storage_url(storage_url)),
               "trials": state_counts(study),
               "outputs": {k: str(p) if p.exists() else None for k, p in files.items()}}
    if best is not None:
        summary["best"] = {"trial": best.number, "seed": best.user_attrs.get("seed"),
                           "search_score": best.user_attrs.get("score"),
                           "search_scores": best.user_attrs.get("scores", {}),
                           "holdout_score": held.get(best.number, {}).get("score"),
                           "holdout_scores": held.get(best.number, {}).get("scores")}
    final = study.user_attrs.get("final")
    if final:
        summary["comparison"] = {"aggregate": final["aggregate"], "references": final["references"],
                                 "items": final["items"], "gap": final.get("gap"),
                                 "rows": [{k: row[k] for k in ("label", "kind", "trial", "scores", "value", "mean",
                                                                 "normalized", "worst")} for row in final["rows"]]}
    return summary


# ---- validate -------------------------------------------------------------------------------------------------
def validate_command(args) -> int:
    """`mergesearch validate STUDY.yaml`: every check `search` makes before it starts, and what it would use.
    Creates nothing (no output folder, no storage)."""

    study_cfg = load_study(args.study, allow_pickle=args.allow_pickle)
    space = SearchSpace(study_cfg)
    check_creatable(study_cfg.output_dir)
    device = _device(args, study_cfg.device)
    suite = check_inputs(study_cfg, space, device=device, tokenize=True)
    url = study_cfg.storage_url(args.storage)
    file = local_file(url)
    resumes = file is None or file.is_file()
    if resumes and study_differs(study_cfg, space, args.storage):
        raise StudyError(f"study {study_cfg.name!r} exists with a different search space or merge "
                         "(pass --new-study to `search` to replace it, or change `name`)", study_cfg.path.name)
    counts = suite.counts()
    say = console()
    say.print(f"[bold]study {study_cfg.name}[/]: {study_cfg.path} is valid")
    say.print(f"merge: {study_cfg.merge.merge_method}, base {space.base_ref or '-'}; models: "
              + ", ".join(space.model_refs))
    say.print(f"space: {len(space.genes)} genes ({study_cfg.space.granularity}"
              + (f", {space.anchors} anchors" if space.anchors > 1 else "") + f", {space.num_layers} layers); "
              + ", ".join(f"{g.name} [{g.low:g}, {g.high:g}]" for g in space.genes[:6])
              + (f", ... ({len(space.genes) - 6} more)" if len(space.genes) > 6 else ""))
    table = Table(title="tasks (items per split)")
    for column in ("task", "kind", "search", "held-out", "weight"):
        table.add_column(column, justify="left" if column in ("task", "kind") else "right")
    for spec in study_cfg.evaluation.tasks:
        table.add_row(spec.name, spec.kind, str(counts[spec.name]["search"]), str(counts[spec.name]["holdout"]),
                      f"{spec.weight:g}")
    say.print(table)
    if note := starved_sampler(study_cfg):
        say.print(note)
    if study_cfg.evaluation.skip_uninformative:
        say.print("search items every parent and the base score alike: found before the first trial, then "
                  "counted without scoring (evaluation.skip_uninformative)")
    say.print(f"sampler {study_cfg.sampler.name}, pruner {study_cfg.pruner.name}, budget "
              f"{study_cfg.trials or '-'} trials / {study_cfg.timeout or '-'} s; device {device}")
    say.print(f"storage {redact(url)} ({'resumes the study' if resumes else 'would be created'}); "
              f"outputs in {study_cfg.output_dir}")
    if args.json:
        print_json({"study": study_cfg.name, "path": str(study_cfg.path), "valid": True,
                    "merge_method": study_cfg.merge.merge_method, "base_model": space.base_ref,
                    "models": space.model_refs, "genes": [{"name": g.name, "low": g.low, "high": g.high}
                                                          for g in space.genes],
                    "tasks": {spec.name: {"kind": spec.kind, **counts[spec.name], "weight": spec.weight}
                              for spec in study_cfg.evaluation.tasks},
                    "skip_uninformative": study_cfg.evaluation.skip_uninformative,
                    "sampler": study_cfg.sampler.name, "pruner": study_cfg.pruner.name,
                    "budget": {"trials": study_cfg.trials, "timeout_s": study_cfg.timeout}, "device": device,
                    "storage": redact(url), "storage_exists": resumes, "output_dir": str(study_cfg.output_dir)})
    return 0


# ---- export and report ----------------------------------------------------------------------------------------
def export_command(args) -> int:
    """`mergesearch export STUDY.yaml [--trial N] [--out best.yaml] [--write-model DIR [--force]] [--json]`.

    Everything is checked (the study exists, the trial, the config file target, the model folder) before
    anything is written; the model first, so that if it fails (disk full) neither output has changed."""
    say = console()
    study_cfg = load_study(args.study, allow_pickle=args.allow_pickle)
    with opened_study(study_cfg, args.storage) as study:
        return _export(args, study_cfg, study, say)


def _export(args, study_cfg, study, say) -> int:
    trial, split, score, scores = choose_trial(study, args.trial)
    out = Path(os.path.abspath(args.out)) if args.out else study_cfg.output_dir / BEST_CONFIG
    if out.is_dir():
        raise StudyError("is a folder; give a file name for the config (e.g. best.yaml)", str(out))
    text = config_header(trial.number, score, scores, split, study_cfg.name) + trial_config_yaml(
        trial, study_cfg.base_dir)
    config = parse_config(yaml.safe_load(text), where=f"trial {trial.number}")
    model = Path(os.path.abspath(args.write_model)) if args.write_model else None
    if model is not None:
        check_output_folder(model, [config.resolve_model(ref) for ref in config.referenced_models()], args.force)
        merge_to_folder(config, model, device=args.device, seed=study_cfg.seed, allow_pickle=args.allow_pickle,
                        card_extra=scores_card(trial, holdout_results(study).get(trial.number)), force=args.force)
        say.print(f"merged model -> {model}")
    write_text(out, text, locked=out.name == BEST_CONFIG)
    say.print(f"trial {trial.number} ({split} score {score:.4f}) -> {out}")
    if args.json:
        print_json({"study": study_cfg.name, "trial": trial.number, "split": split, "score": score,
                    "scores": scores, "search_score": trial.user_attrs.get("score"), "config": str(out),
                    "model": str(model) if model else None})
    return 0


def report_command(args) -> int:
    """`mergesearch report STUDY.yaml`: redraw report/ and trials.csv from the storage."""
    study_cfg = load_study(args.study)
    with opened_study(study_cfg, args.storage) as study:
        page = write_report(study_cfg, study, SearchSpace(study_cfg))
    console().print(f"report -> {page}; trials -> {study_cfg.output_dir / 'trials.csv'}")
    return 0


# ---- soup ----------------------------------------------------------------------------------------------------
def soup_command(args) -> int:
    """`mergesearch soup SOUP.yaml [--mode greedy|uniform] [--write-model DIR [--force]] [--json]`."""

    say = console()
    cfg = load_soup(args.soup, allow_pickle=args.allow_pickle)
    if args.device != "auto":
        cfg.device = args.device
    mode = args.mode or cfg.mode
    target = Path(os.path.abspath(args.write_model)) if args.write_model else cfg.write_model
    # Checked before the (long) soup runs: nothing is written until every output can be.
    pick_device(cfg.device)
    check_creatable(cfg.output_dir)
    if target is not None:
        check_output_folder(target, cfg.checkpoints, args.force)
    say.print(f"[bold]soup {cfg.name}[/]: {mode} over {len(cfg.checkpoints)} checkpoints")
    result = run_soup(cfg, mode, say)
    paths = write_outputs(cfg, result, mode)
    names = [checkpoint_label(p) for p in cfg.checkpoints]
    table = Table(title=f"{mode} soup steps (selection items)")
    for col in ("step", "candidate", "individual", "soup score", "kept"):
        table.add_column(col)
    for s in result.steps:
        table.add_row(str(s.step), s.candidate, f"{s.individual:.4f}", f"{s.score:.4f}", "yes" if s.kept else "no")
    say.print(table)
    summary = Table(title="soups compared")
    summary.add_column("soup")
    summary.add_column("selection score", justify="right")
    summary.add_column("report score", justify="right")
    for row_label, value in comparison_rows(result, names):
        rep = result.holdout.get(row_label.split(" (")[0])
        summary.add_row(row_label, f"{value:.4f}", f"{rep:.4f}" if rep is not None else "-")
    say.print(summary)
    say.print(f"chosen: {', '.join(names[i] for i in result.chosen)}")
    if target is not None:
        config = parse_config(soup_config_dict(cfg.checkpoints, result.chosen, cfg.dtype), where="soup")
        merge_to_folder(config, target, device=cfg.device, force=args.force, allow_pickle=cfg.allow_pickle)
        say.print(f"soup model -> {target}")
    say.print(f"outputs in {cfg.output_dir}: " + ", ".join(p.name for p in paths.values()))
    if args.json:
        print_json({"soup": cfg.name, "mode": mode, "chosen": [names[i] for i in result.chosen],
                    "selection": {row_label: value for row_label, value in comparison_rows(result, names)},
                    "holdout": result.holdout, "outputs": {k: str(p) for k, p in paths.items()},
                    "model": str(target) if target else None})
    return 0


# ---- methods --------------------------------------------------------------------------------------------------
def methods_command(args) -> int:
    """`mergesearch methods`: every merge method with its parameters (method-level and per model)."""

    rows = []
    for name in sorted(REGISTRY):
        method = REGISTRY[name]
        rows.append({"method": name, "base_model": "required" if method.requires_base else
                     "optional" if method.optional_base else "no",
                     "parameters": {p: describe_param(spec) for p, spec in method.params.items()},
                     "per_model": {p: describe_param(spec) for p, spec in method.model_params.items()},
                     "reference": getattr(method, "reference", None)})
    if args.json:
        print_json({"methods": rows})
        return 0
    table = Table(title="merge methods (mergekit 0.1.5 names)")
    for column in ("method", "base model", "parameters", "per model"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["method"], row["base_model"],
                      ", ".join(f"{k} {v}" for k, v in row["parameters"].items()) or "-",
                      ", ".join(f"{k} {v}" for k, v in row["per_model"].items()) or "-")
    console().print(table)
    return 0
