"""Plots and tables of a study: report/ (PNG plots + report.html) and trials.csv, re-runnable any time.

Owns every figure and table about a study; reads the storage only.
"""

from __future__ import annotations

import csv
import html
import io
import logging
import os
from pathlib import Path

import optuna
from optuna.trial import TrialState
from rich.console import Console
from rich.table import Table

from search.export import atomic_write_text
from search.store import best_complete, top_trials

log = logging.getLogger(__name__)


def _plt():
    import matplotlib          # ~0.4 s to import: only once a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> Path:
    """Write a figure atomically (a temporary file renamed into place: a kill never leaves half a PNG), close it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fig.tight_layout()
    try:
        fig.savefig(tmp, dpi=110, format=path.suffix.lstrip(".") or "png")
        os.replace(tmp, path)
    finally:
        _plt().close(fig)
        tmp.unlink(missing_ok=True)
    return path


def trials_rows(study) -> list[dict]:
    """One flat row per trial: number, state, scores, timings, seed label, failure reason, params."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        row = {"number": t.number, "state": t.state.name, "score": t.user_attrs.get("score"),
               "merge_s": t.user_attrs.get("merge_s"), "eval_s": t.user_attrs.get("eval_s"),
               "seed": t.user_attrs.get("seed", ""), "fail_reason": t.user_attrs.get("fail_reason", ""),
               "duration_s": t.duration.total_seconds() if t.duration else None}
        row.update({f"score.{k}": v for k, v in t.user_attrs.get("scores", {}).items()})
        row.update({f"param.{k}": v for k, v in t.params.items()})
        rows.append(row)
    return rows


def write_trials_csv(study, path: Path) -> Path:
    rows = trials_rows(study)
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())
    return path


def plot_history(study, path: Path) -> Path:
    plt = _plt()
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    xs = [t.number for t in complete]
    ys = [t.user_attrs.get("score", float("nan")) for t in complete]
    best, running = [], float("-inf")
    for y in ys:
        running = max(running, y)
        best.append(running)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.scatter(xs, ys, s=12, alpha=0.6, label="trial (search split)")
    ax.step(xs, best, where="post", color="C3", label="best so far")
    seeds = [t for t in complete if "seed" in t.user_attrs]
    for i, t in enumerate(seeds):          # seeds often score alike: stagger their labels
        ax.annotate(t.user_attrs["seed"], (t.number, t.user_attrs.get("score", 0)), fontsize=7,
                    xytext=(6, -10 + 9 * (i % 3)), textcoords="offset points")
    ax.set_xlabel("trial")
    ax.set_ylabel("score")
    ax.set_title("optimization history")
    ax.legend(loc="lower right")
    return save_figure(fig, path)


def plot_profile(space, genome: dict[str, float], path: Path, title: str) -> Path | None:
    """Per-layer values of the best recipe, one line per (parameter, model, filter group)."""
    plt = _plt()
    rows = space.profile(genome)
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, values in sorted(rows.items()):
        xs = list(range(len(values)))
        ax.plot(xs, values, marker="o", label=key)
    ax.set_xticks(range(max(len(v) for v in rows.values())))
    ax.set_xlabel("layer" if space.anchors == space.num_layers else "anchor")
    ax.set_ylabel("value")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, path)


def plot_importances(study, path: Path) -> Path | None:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 4 or len(study.directions) > 1:
        return None
    try:
        importances = optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError, ImportError) as err:
        log.info("no parameter importances: %s", err)
        return None
    top = list(importances.items())[:20][::-1]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.3 * len(top))))
    ax.barh([k for k, _ in top], [v for _, v in top])
    ax.set_xlabel("importance (fANOVA)")
    ax.set_title("parameter importances")
    return save_figure(fig, path)


def plot_pareto(study, task_names: list[str], path: Path) -> Path | None:
    if not len(study.directions) > 1 or len(task_names) < 2:
        return None
    plt = _plt()
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    front = {t.number for t in study.best_trials}
    fig, ax = plt.subplots(figsize=(6, 5))
    ax.scatter([t.values[0] for t in complete], [t.values[1] for t in complete], s=12, alpha=0.4, label="trials")
    pts = sorted((t.values[0], t.values[1]) for t in complete if t.number in front)
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color="C3", label="Pareto front")
    ax.set_xlabel(task_names[0])
    ax.set_ylabel(task_names[1])
    ax.set_title("Pareto front")
    ax.legend()
    return save_figure(fig, path)


def write_report(study_cfg, study, space) -> Path:
    """Write output_dir/trials.csv and output_dir/report/{*.png, report.html}; returns report.html."""
    out = study_cfg.output_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    write_trials_csv(study, study_cfg.output_dir / "trials.csv")
    images = [plot_history(study, out / "history.png")]
    winner = study.user_attrs.get("holdout_winner")
    best = next((t for t in study.get_trials(deepcopy=False) if t.number == winner), None) or best_complete(study)
    if best is not None:
        images.append(plot_profile(space, best.params, out / "profile.png",
                                   f"recipe of trial {best.number} (per layer)"))
    images.append(plot_importances(study, out / "importances.png"))
    images.append(plot_pareto(study, [t.name for t in study_cfg.evaluation.tasks], out / "pareto.png"))
    console = Console(record=True, width=140, file=io.StringIO())
    console.print(summary_table(study, study_cfg))
    summary = console.export_text()
    states = {s.name: sum(1 for t in study.get_trials(deepcopy=False) if t.state == s) for s in TrialState}
    parts = [f"<h1>mergesearch study {html.escape(study_cfg.name)}</h1>",
             f"<p>method {html.escape(study_cfg.merge.merge_method)}, sampler {study_cfg.sampler.name}, "
             f"pruner {study_cfg.pruner.name}; trials: "
             + ", ".join(f"{k.lower()} {v}" for k, v in states.items() if v) + "</p>",
             f"<pre>{html.escape(summary)}</pre>"]
    if best is not None:
        parts.append(f"<h2>Best recipe (trial {best.number})</h2><pre>"
                     f"{html.escape(best.user_attrs.get('config', ''))}</pre>")
    for img in images:
        if img is not None:
            parts.append(f'<h2>{img.stem}</h2><img src="{img.name}" alt="{img.stem}">')
    parts.append('<p>All trials: <a href="../trials.csv">trials.csv</a></p>')
    page = out / "report.html"
    atomic_write_text(page, "<!doctype html><meta charset='utf-8'><title>mergesearch report</title>"
                      "<body style='font-family:sans-serif;max-width:900px;margin:auto'>" + "\n".join(parts))
    return page


def summary_table(study, study_cfg) -> Table:
    """The results table: after a held-out comparison (search.compare), every parent, plain merge and the best
    found on the report half of the held-out items; before one, the seed trials and the best on the search items."""
    final = study.user_attrs.get("final")
    tasks = [t.name for t in study_cfg.evaluation.tasks]
    if not final or not final.get("rows"):
        return _search_table(study, study_cfg, tasks)
    report = final["items"]["report"]
    table = Table(title=f"study {study_cfg.name}: held-out scores ({', '.join(f'{report[t]} {t}' for t in tasks)} "
                        f"items, report half{' = select half: too few items' if final.get('halves_shared') else ''})")
    for column in ("candidate", "trial", *tasks, "mean", "normalized", "worst", "search"):
        table.add_column(column, justify="left" if column == "candidate" else "right")
    value_column = {"mean": "mean", "normalized": "normalized", "worst": "worst"}[final["aggregate"]]
    for row in final["rows"]:
        cells = [f"{row['scores'].get(t, float('nan')):.3f}" for t in tasks]
        stats = {k: f"{row[k]:.3f}" for k in ("mean", "normalized", "worst")}
        stats[value_column] = f"[bold]{stats[value_column]}[/]"
        search = row.get("search_score")
        table.add_row(row["label"], "" if row.get("trial") is None or row["kind"] == "plain" else str(row["trial"]),
                      *cells, stats["mean"], stats["normalized"], stats["worst"],
                      f"{search:.3f}" if search is not None else "-",
                      style="bold green" if row["kind"] == "found" else None)
    table.caption = final_caption(final)
    return table


def final_caption(final: dict) -> str:
    """One line on the winner's margin and how sure it is."""
    parts = [f"objective: {final['aggregate']} (references: "
             + ", ".join(f"{t} {v:.3f}" for t, v in final["references"].items()) + ")"]
    gap = final.get("gap")
    if gap:
        verdict = "beats" if gap["beats"] else "does not clearly beat"
        parts.append(f"best found {verdict} {gap['vs']}: {gap['value']:+.3f}, 95% paired bootstrap interval "
                     f"[{gap['low']:+.3f}, {gap['high']:+.3f}] ({gap['resamples']} resamples of the report items)")
    return "; ".join(parts)


def _search_table(study, study_cfg, tasks: list[str]) -> Table:
    rows = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if "seed" in t.user_attrs]
    best = top_trials(study, 1)
    table = Table(title=f"study {study_cfg.name}: search scores (no held-out comparison)")
    for column in ("candidate", "trial", *tasks, "objective"):
        table.add_column(column, justify="left" if column == "candidate" else "right")
    for t in rows + [b for b in best if b.number not in {r.number for r in rows}]:
        label = t.user_attrs.get("seed", "best found")
        scores = t.user_attrs.get("scores", {})
        table.add_row(label, str(t.number), *[f"{scores.get(n, float('nan')):.3f}" for n in tasks],
                      f"{t.user_attrs.get('score', float('nan')):.3f}")
    return table


def results_markdown(study, study_cfg) -> str:
    """The results table as Markdown (README-ready): one row per candidate, held-out report half."""
    final = study.user_attrs.get("final")
    tasks = [t.name for t in study_cfg.evaluation.tasks]
    if not final or not final.get("rows"):
        return ""
    lines = ["| candidate | " + " | ".join(tasks) + " | mean | normalized | worst | search |",
             "|---|" + "---|" * (len(tasks) + 4)]
    for row in final["rows"]:
        stats = {k: f"{row[k]:.3f}" for k in ("mean", "normalized", "worst")}
        stats[final["aggregate"]] = f"**{stats[final['aggregate']]}**"
        search = row.get("search_score")
        lines.append(f"| {row['label']} | " + " | ".join(f"{row['scores'].get(t, float('nan')):.3f}" for t in tasks)
                     + f" | {stats['mean']} | {stats['normalized']} | {stats['worst']} | "
                     + (f"{search:.3f}" if search is not None else "-") + " |")
    return "\n".join(lines) + "\n\n" + final_caption(final) + "\n"


def publish_holdout(study, study_cfg, trial, found: dict) -> None:
    """Make the held-out winner visible to Optuna tools: study user attributes (optuna-dashboard's "Study User
    Attributes" panel, `optuna studies`) and, when optuna-dashboard is installed, the study's note."""
    line = (f"trial {trial.number}: held-out {found['value']:.4f} (report half; search "
            f"{trial.user_attrs.get('score', float('nan')):.4f}); "
            + ", ".join(f"{k} {v:.3f}" for k, v in found["scores"].items()))
    study.set_user_attr("holdout_winner_summary", line)
    try:
        from optuna_dashboard import save_note   # an optional extra
    except ImportError:
        return
    save_note(study, f"## Held-out winner: trial {trial.number}\n\n{line}\n\n" + results_markdown(study, study_cfg)
              + "\nExported as best_config.yaml (`mergesearch export` rebuilds it from this storage).\n")
