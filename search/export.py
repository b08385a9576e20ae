"""Exports from a study: best_config.yaml (atomic, with a score header), merged models with a card, `export`.

Owns everything written about a chosen trial; rebuilds it from the storage alone (trial user attrs).
"""

from __future__ import annotations

import datetime as dt
import fcntl
import os
import tempfile
from contextlib import contextmanager, nullcontext
from pathlib import Path

import optuna
import yaml
from optuna.trial import TrialState

from merge_core.config import dump_config, parse_config
from search import StudyError
from search.store import best_complete, holdout_results

BEST_CONFIG = "best_config.yaml"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` so readers see the old or the new file, never a partial one.

    A failed write (disk full, file too large, not a folder, read-only) leaves the old file as it was and
    raises StudyError naming `path`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise StudyError(f"cannot write: {err.strerror or err}", str(path)) from None
    try:
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())     # mkstemp makes 0600; an export is a normal file
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise StudyError(f"cannot write: {err.strerror or err}", str(path)) from None
        raise


def remove_temp_files(path: Path) -> None:
    """Delete what atomic writes of `path` killed half-way left behind. Call it only while holding the lock
    that every writer of `path` holds (another writer's temp file would vanish under it)."""
    path = Path(path)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)


@contextmanager
def folder_lock(folder: Path, name: str = ".lock"):
    """An exclusive inter-process lock on a file in `folder` (workers on one machine)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = open(folder / name, "a+")
    except OSError as err:
        raise StudyError(f"output folder is not writable: {err.strerror or err}", str(folder)) from None
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def config_header(trial_number: int, score: float | None, scores: dict[str, float], split: str,
                  study_name: str, extra: dict[str, object] | None = None) -> str:
    """The comment block on top of an exported config: scores, trial, date."""
    when = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    lines = [f"# mergesearch study {study_name!r}: trial {trial_number}, exported {when}",
             f"# score ({split}): {score:.6g}" if score is not None else f"# score ({split}): n/a"]
    lines += [f"#   {task}: {value:.6g}" for task, value in scores.items()]
    lines += [f"# {key}: {value}" for key, value in (extra or {}).items()]
    lines.append("# Runs unchanged in mergekit: mergekit-yaml THIS_FILE OUT_DIR")
    return "\n".join(lines) + "\n"


def trial_config_yaml(trial, base_dir: Path) -> str:
    """The trial's merge config as YAML that runs from any folder: its model paths made absolute (configs
    stored with paths relative to the study YAML's folder `base_dir` are rebased). StudyError if it has none."""
    text = trial.user_attrs.get("config")
    if not text:
        raise StudyError(f"trial {trial.number} stores no merge config", "--trial")
    config = parse_config(yaml.safe_load(text), where=f"trial {trial.number}", base_dir=base_dir)
    return dump_config(config, absolute_paths=True)


def write_best_config(output_dir: Path, trial, split: str, study_name: str, base_dir: Path,
                      score: float | None = None, scores: dict[str, float] | None = None,
                      extra: dict | None = None) -> Path:
    """Rewrite output_dir/best_config.yaml atomically for `trial` (hold the folder's .best.lock)."""
    if score is None:
        score = trial.user_attrs.get("score", trial.values[0] if trial.values else None)
    scores = scores if scores is not None else trial.user_attrs.get("scores", {})
    text = config_header(trial.number, score, scores, split, study_name, extra) + trial_config_yaml(trial, base_dir)
    path = Path(output_dir) / BEST_CONFIG
    remove_temp_files(path)
    atomic_write_text(path, text)
    return path


def scores_card(trial, holdout: dict | None) -> str:
    """Markdown section with the trial's scores (search split and, when known, held-out)."""
    rows = ["## Scores (mergesearch)", "", "| task | search | held-out |", "|---|---|---|"]
    search_scores = trial.user_attrs.get("scores", {})
    held = (holdout or {}).get("scores", {})
    for task in sorted(set(search_scores) | set(held)):
        s = search_scores.get(task)
        h = held.get(task)
        rows.append(f"| {task} | {s:.4f} | {h:.4f} |" if s is not None and h is not None
                    else f"| {task} | {s if s is not None else '-'} | {h if h is not None else '-'} |")
    return "\n".join(rows)


def write_text(path: Path, text: str, locked: bool = False) -> None:
    """Write an exported file atomically; `locked`: under the folder's .best.lock (best_config.yaml, which the
    search also rewrites)."""
    with folder_lock(path.parent, ".best.lock") if locked else nullcontext():
        atomic_write_text(path, text)


def choose_trial(study, number: int | None):
    """(trial, split, score, per-task scores): the given trial, else the held-out winner, else the best."""
    held = holdout_results(study)
    if number is not None:
        matches = [t for t in study.get_trials(deepcopy=False) if t.number == number]
        if not matches:
            raise StudyError(f"no trial {number} in study {study.study_name!r}", "--trial")
        trial = matches[0]
        if trial.state != TrialState.COMPLETE:
            raise StudyError(f"trial {number} is {trial.state.name}, not COMPLETE", "--trial")
    else:
        winner = study.user_attrs.get("holdout_winner")
        complete = {t.number: t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}
        if not complete:
            raise StudyError(f"study {study.study_name!r} has no completed trial yet", "study")
        if winner is not None and winner in complete:
            trial = complete[winner]
        else:
            trial = max(complete.values(), key=lambda t: t.user_attrs.get("score", float("-inf")))
    final = study.user_attrs.get("final") or {}
    if final.get("winner") == trial.number:
        found = next(row for row in final["rows"] if row["kind"] == "found")
        return trial, "held-out, report half", found["value"], found["scores"]
    if trial.number in held:
        return trial, "held-out", held[trial.number]["score"], held[trial.number]["scores"]
    return trial, "search", trial.user_attrs.get("score"), trial.user_attrs.get("scores", {})


def maybe_write_best(study: optuna.Study, study_cfg, trial=None) -> None:
    """Rewrite best_config.yaml if `trial` (or, without one, whatever is best) is the best so far."""
    with folder_lock(study_cfg.output_dir, ".best.lock"):
        best = best_complete(study)
        if best is None or (trial is not None and best.number != trial.number):
            return
        write_best_config(study_cfg.output_dir, best, "search", study_cfg.name, study_cfg.base_dir)
