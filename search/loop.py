"""The overnight loop: run (or resume) a study under a trial/time budget in one or several workers, keep
best_config.yaml current, and finish with a held-out re-evaluation of the top trials.

Owns the budget, workers, signals and finalizing; the storage and trial queries live in store, one trial
in objective. Never merges or scores by itself.
"""

from __future__ import annotations

import ctypes
import logging
import math
import multiprocessing as mp
import os
import signal
import socket
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch
# Private: heartbeats around ask/tell (Study.optimize runs them, ask/tell has no public hook); optuna is
# pinned below 5.1 in pyproject.toml for this.
from optuna.storages._heartbeat import BaseHeartbeat, get_heartbeat_thread, is_heartbeat_enabled
from optuna.trial import TrialState
from sqlalchemy import text

from evaluators import EvalError
from merge_core.errors import MergeConfigError
from merge_core.writer import pid_alive
from search import StudyError
from search.export import folder_lock, write_best_config
from evaluators.tasks import in_report_half
from merge_core.config import parse_config
from merge_core.engine import MergeEngine
from search.compare import Candidate, check_references, plain_merges, results_table
from search.objective import Interrupted, TrialRunner, check_inputs, fault_reason
from search.report import publish_holdout, write_report
from search.space import SearchSpace
from search.store import (HEARTBEAT_S, MAX_RETRY, best_complete, check_creatable, close_storage, counted_trials,
                          create_folder, holdout_results, make_storage, open_study, redact, retry_trial,
                          storage_failures, study_differs, top_trials, trial_by_number)
from search.study import StudyConfig, load_study

log = logging.getLogger(__name__)

SEEDED_ATTR = "mergesearch_seeded"
REFERENCES_ATTR = "references"     # {"measured": {task: best parent's search score}}
PLAIN_ATTR = "plain_merges"        # "label#i" -> {label, config, score, scores, items} on the held-out items
FINAL_ATTR = "final"               # the results table (search.compare.results_table)


class NoProgress:
    """What run_search reports to when nobody watches (tests, scripts); the CLI passes a live display."""

    @contextmanager
    def running(self, study, study_cfg, trials, timeout):
        yield self

    def trial_done(self, study, trial) -> None: ...

    def poll(self, study) -> None: ...

    def note(self, text: str) -> None:
        log.info(text)

    def summary(self, study, study_cfg) -> None: ...
__all__ = ["MAX_RETRY", "Budget", "finalize", "open_study", "run_search", "run_worker"]


# ---- the budget --------------------------------------------------------------------------------------

@dataclass
class Budget:
    trials: int | None
    deadline: float | None          # time.time() after which no trial starts

    def time_left(self) -> bool:
        return self.deadline is None or time.time() < self.deadline

def fail_dead_local_trials(study: optuna.Study) -> None:
    """RUNNING trials whose worker is gone fail now and are retried, instead of waiting for a heartbeat.

    Gone: a process on this machine that no longer exists (killed, crashed), or no worker stamp at all.
    Workers ask for a trial and stamp it under the budget locks that the caller holds, so an unstamped
    RUNNING trial belongs to a worker that died inside ask(); it has no heartbeat either, so Optuna's
    stale-trial check would never fail it and the budget would wait for it for ever.
    """
    host = socket.gethostname()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker")
        if worker is not None:
            name, _, pid = worker.rpartition(":")
            if name != host or not pid.isdigit() or pid_alive(int(pid)):
                continue
        try:
            if study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                retry_trial(study, study._storage.get_trial(t._trial_id))
                log.warning("trial %d: its worker %s is gone; retrying it", t.number,
                            worker or "(died while asking for it)")
        except optuna.exceptions.UpdateFinishedTrialError:
            pass


def ask_within_budget(study: optuna.Study, budget: Budget, lock_dir: Path) -> optuna.Trial | str:
    """Fail dead and stale trials, then take a trial (a waiting one first) if the budget allows.

    Returns the trial, or why not: "time" (deadline passed), "budget" (spent), or "wait" (spent, but
    trials of other workers still run and may come back for a retry if their worker died).
    The check and the ask run under a lock shared by the workers on this machine, so the total
    never exceeds the budget. (Workers on several machines rely on PostgreSQL advisory locks.)
    """
    with folder_lock(lock_dir, ".budget.lock"), _advisory_lock(study):
        fail_dead_local_trials(study)
        optuna.storages.fail_stale_trials(study)
        if not budget.time_left():
            return "time"
        if budget.trials is not None and counted_trials(study) >= budget.trials:
            running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            return "wait" if running else "budget"
        trial = study.ask()
        # Still inside the locks: first heartbeat, then the worker stamp. Whenever this process dies, its
        # trial is unstamped (failed by the next fail_dead_local_trials) or stamped with a heartbeat
        # (failed by the dead-pid check or, from another machine, once the heartbeat is stale).
        if isinstance(study._storage, BaseHeartbeat) and is_heartbeat_enabled(study._storage):
            study._storage.record_heartbeat(trial._trial_id)
        trial.set_user_attr("worker", worker_id())
        return trial


def worker_id() -> str:
    """host:pid of this process, stored on its running trials."""
    return f"{socket.gethostname()}:{os.getpid()}"


class _advisory_lock:
    """pg_advisory_lock around the budget check when the storage is PostgreSQL; a no-op otherwise."""

    KEY = 0x6D657267  # 'merg'

    def __init__(self, study: optuna.Study):
        storage = study._storage
        storage = getattr(storage, "_backend", storage)
        self.engine = getattr(storage, "engine", None)
        if self.engine is not None and self.engine.dialect.name != "postgresql":
            self.engine = None
        self.conn = None

    def __enter__(self):
        if self.engine is not None:
            self.conn = self.engine.connect()
            self.conn.execute(text(f"SELECT pg_advisory_lock({self.KEY})"))
        return self

    def __exit__(self, *exc):
        if self.conn is not None:
            self.conn.execute(text(f"SELECT pg_advisory_unlock({self.KEY})"))
            self.conn.close()
        return False


# ---- one worker ----------------------------------------------------------------------------------------
def run_worker(study_cfg: StudyConfig, storage_url: str | None, budget: Budget, device: str | None,
               stop: threading.Event, on_trial=None, runner=None, study: optuna.Study | None = None) -> None:
    """Ask/run/tell trials until the budget, the deadline or a stop request; updates best_config.yaml.
    `runner`: a TrialRunner built with `stop`, `study`: the opened study (default: build / open them here)."""
    space = SearchSpace(study_cfg)
    study = study or open_study(study_cfg, storage_url, space=space)
    runner = runner or TrialRunner(study_cfg, space, device=device, stop=stop,
                                   references=references_of(study, study_cfg))
    while not stop.is_set():
        trial = ask_within_budget(study, budget, study_cfg.output_dir)
        if trial == "wait":
            stop.wait(min(HEARTBEAT_S, 2.0))
            continue
        if isinstance(trial, str):
            break
        state, value, reason = TrialState.COMPLETE, None, None
        with get_heartbeat_thread(trial._trial_id, study._storage):
            try:
                value = runner(trial)
            except optuna.TrialPruned:
                state = TrialState.PRUNED
            except Interrupted:
                study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number}, skip_if_exists=False)
                state = TrialState.FAIL
            except Exception as err:  # noqa: BLE001 - a faulty candidate must not stop the night
                reason = fault_reason(err)
                if reason is None:
                    raise
                trial.set_user_attr("fail_reason", reason)
                state = TrialState.FAIL
                log.warning("trial %d failed: %s", trial.number, reason)
        if state == TrialState.COMPLETE and not _finite(value):
            trial.set_user_attr("fail_reason", "non-finite objective value")
            state, value = TrialState.FAIL, None
        frozen = study.tell(trial, value if state == TrialState.COMPLETE else None, state=state)
        if state == TrialState.COMPLETE:
            maybe_write_best(study, study_cfg, frozen)
        if on_trial is not None:
            on_trial(study, frozen)


def _finite(value) -> bool:
    values = value if isinstance(value, (list, tuple)) else [value]
    return all(v is not None and math.isfinite(v) for v in values)


def maybe_write_best(study: optuna.Study, study_cfg: StudyConfig, trial=None) -> None:
    """Rewrite best_config.yaml if `trial` (or, without one, whatever is best) is the best so far."""
    with folder_lock(study_cfg.output_dir, ".best.lock"):
        best = best_complete(study)
        if best is None or (trial is not None and best.number != trial.number):
            return
        write_best_config(study_cfg.output_dir, best, "search", study_cfg.name, study_cfg.base_dir)


def _worker_main(study_path: str, storage_url: str | None, budget: Budget, device: str | None,
                 index: int, parent: int | None = None, allow_pickle: bool = False) -> None:
    """Entry point of a spawned worker process."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    _stop_with_parent(parent)
    if device and device.startswith("cuda") and ":" not in device:
        if torch.cuda.device_count() > 1:
            device = f"cuda:{index % torch.cuda.device_count()}"
    try:
        study_cfg = load_study(study_path, allow_pickle=allow_pickle)
        with storage_failures(storage_url or study_cfg.storage_url()):
            run_worker(study_cfg, storage_url, budget, device, stop)
    except (StudyError, MergeConfigError, EvalError) as err:     # one line, as the CLI prints it
        message = " ".join(str(err).split())
        print(f"mergesearch search: error: worker {index}: {message}", file=sys.stderr, flush=True)
        sys.exit(2)


def _stop_with_parent(parent: int | None) -> None:
    """Linux: have the kernel send this worker SIGTERM when the search that spawned it dies, even by SIGKILL,
    so a killed search leaves no workers running (a resumed one would otherwise run beside them). The
    worker then stops like on Ctrl-C: its running trial is queued again."""
    if parent is None or not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:      # the search died before the request was in place
        os.kill(os.getpid(), signal.SIGTERM)


# ---- the command ------------------------------------------------------------------------------------------
def run_search(study_cfg: StudyConfig, *, trials: int | None, timeout: float | None, storage_url: str | None = None,
               workers: int = 1, device: str | None = None, new_study: bool = False, progress=None) -> int:
    """Run (or resume) the study to its budget, then finalize; returns the exit status (0, or 130 when
    interrupted: what was done is written and the same command resumes)."""
    progress = progress or NoProgress()
    space = SearchSpace(study_cfg)
    # Every user error (a model, a task file, the device, a changed space, the output folder) is raised before
    # anything is created: checks first, then the resident runner (it loads every input), then the storage.
    check_creatable(study_cfg.output_dir)
    check_inputs(study_cfg, space, device=device, tokenize=workers > 1)
    if not new_study and study_differs(study_cfg, space, storage_url):
        raise StudyError(f"study {study_cfg.name!r} exists with a different search space or merge "
                         "(pass --new-study to replace it, or change `name`)", study_cfg.path.name)
    stop = threading.Event()
    runner = TrialRunner(study_cfg, space, device=device, stop=stop) if workers == 1 else None
    create_folder(study_cfg.output_dir)
    storage = make_storage(study_cfg.storage_url(storage_url))
    previous = {sig: signal.signal(sig, _stop_handler(stop)) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        study = open_study(study_cfg, storage_url, space=space, new_study=new_study, storage=storage)
        if new_study:
            log.warning("replaced the existing study %r (--new-study)", study_cfg.name)
        budget = Budget(trials, time.time() + timeout if timeout else None)
        with storage_failures(study_cfg.storage_url(storage_url)):
            references = ensure_references(study, study_cfg, lambda: runner or TrialRunner(study_cfg, space,
                                                                                            device=device))
            if runner is not None:
                runner.references = references
            seed_study(study, space)
            maybe_write_best(study, study_cfg)   # a kill between tell and write leaves it stale: mend it now
            _run_and_finalize(study_cfg, study, space, storage_url, budget, device, workers, stop, progress,
                              runner, trials, timeout)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        close_storage(storage)
    return 130 if stop.is_set() else 0


def _stop_handler(stop: threading.Event):
    """First signal: finish cleanly (the running trial is queued again, outputs are written). A second one
    while outputs are being written skips what is left of the held-out re-evaluation."""
    def handle(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    return handle


def _run_and_finalize(study_cfg, study, space, storage_url, budget, device, workers, stop, progress, runner,
                      trials, timeout) -> None:
    with progress.running(study, study_cfg, trials, timeout):
        if workers == 1:
            run_worker(study_cfg, storage_url, budget, device, stop,
                       on_trial=lambda s, t: progress.trial_done(s, t), runner=runner, study=study)
        else:
            _run_processes(study_cfg, storage_url, budget, device, workers, stop, progress, study)
    if stop.is_set():
        progress.note("stopping: interrupted, writing outputs (Ctrl-C again to skip the held-out re-evaluation)")
    finalize(study_cfg, study, space, device, progress, runner=runner)


def seed_study(study: optuna.Study, space: SearchSpace) -> None:
    """Queue the seed trials (parents, uniform, defaults) once per study. A start killed while queueing
    them queues the missing ones when resumed."""
    if study.user_attrs.get(SEEDED_ATTR):
        return
    present = {t.user_attrs.get("seed") for t in study.get_trials(deepcopy=False)}
    for label, genome in space.seed_genomes():
        if label not in present:
            study.enqueue_trial(genome, user_attrs={"seed": label})
    study.set_user_attr(SEEDED_ATTR, True)


def _run_processes(study_cfg, storage_url, budget, device, workers, stop, progress, study) -> None:
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker_main, args=(str(study_cfg.path), storage_url, budget, device, i,
                                                    os.getpid(), study_cfg.allow_pickle), daemon=False)
             for i in range(workers)]
    for p in procs:
        p.start()
    try:
        while any(p.is_alive() for p in procs):
            if stop.is_set():
                for p in procs:
                    if p.is_alive():
                        os.kill(p.pid, signal.SIGTERM)
            progress.poll(study)
            for p in procs:
                p.join(timeout=1.0 / len(procs))
    finally:
        for p in procs:
            p.join()
    failed = [p.exitcode for p in procs if p.exitcode not in (0, None)]
    if failed and not stop.is_set():
        if len(failed) == len(procs):      # nothing ran the budget out: no outputs to write from a broken run
            raise StudyError(f"all {len(procs)} workers stopped on an error (above); the trials stored so far "
                             "are kept: fix it and run the same command to resume",
                             redact(study_cfg.storage_url(storage_url)))
        log.warning("%d worker(s) exited with an error (codes %s)", len(failed), failed)


# ---- the end of a run --------------------------------------------------------------------------------------
def finalize(study_cfg: StudyConfig, study: optuna.Study, space: SearchSpace, device: str | None, progress,
             runner=None) -> None:
    """The held-out comparison (the top-k trials, the seed trials and the plain merges, see search.compare), the
    winner exported as best_config.yaml, trials.csv and the report.
    `runner`: the search's TrialRunner, reused for the re-evaluations (default: build one)."""
    top = top_trials(study, study_cfg.top_k)
    if top and study_cfg.evaluation.has_holdout:
        seeds = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                 if "seed" in t.user_attrs and t.number not in {x.number for x in top}]
        try:
            runner = runner or TrialRunner(study_cfg, space, device=device,
                                           references=references_of(study, study_cfg))
            reevaluate_holdout(study_cfg, study, space, top + seeds, progress, runner)
            if study_cfg.baselines:
                score_plain_merges(study_cfg, study, progress, runner)
            compare(study_cfg, study, top)
        except KeyboardInterrupt:
            progress.note("held-out comparison cut short (interrupted again); exporting what was scored")
    final = study.user_attrs.get(FINAL_ATTR)
    if final and final.get("winner") is not None:
        trial = trial_by_number(study, final["winner"])
        found = next(row for row in final["rows"] if row["kind"] == "found")
        study.set_user_attr("holdout_winner", trial.number)
        publish_holdout(study, study_cfg, trial, found)
        extra = {"search score": trial.user_attrs.get("score"), "picked": "best of the top trials on the select half "
                 "of the held-out items; the scores above are on the other half (the report half)"}
        if final.get("gap"):
            gap = final["gap"]
            extra["margin"] = (f"{gap['value']:+.4f} over {gap['vs']} (95% interval {gap['low']:+.4f} .. "
                               f"{gap['high']:+.4f})")
        with folder_lock(study_cfg.output_dir, ".best.lock"):
            write_best_config(study_cfg.output_dir, trial, "held-out, report half", study_cfg.name,
                              study_cfg.base_dir, found["value"], found["scores"], extra=extra)
    elif top:
        maybe_write_best(study, study_cfg)
    write_report(study_cfg, study, space)
    progress.summary(study, study_cfg)


def reevaluate_holdout(study_cfg: StudyConfig, study: optuna.Study, space: SearchSpace, trials: list, progress,
                       runner: TrialRunner) -> None:
    """Score the given trials on the held-out split (skipping ones already done); store every item's score."""
    done = holdout_results(study)
    todo = [t for t in trials if t.number not in done]
    if not todo:
        return
    progress.note(f"held-out re-evaluation of {len(todo)} trials ({describe(todo)})")
    for trial in todo:
        result, _, _ = runner.evaluate(space.config(trial.params), "holdout")
        done[trial.number] = held_out(runner, result)
        study.set_user_attr("holdout", {str(k): v for k, v in done.items()})


def held_out(runner: TrialRunner, result) -> dict:
    """What is stored of a held-out evaluation: the objective, per-task scores and every item's score."""
    scores = {t.name: t.score for t in result.tasks}
    return {"score": runner.value(scores), "scores": scores, "stderr": {t.name: t.stderr for t in result.tasks},
            "items": {t.name: t.per_item for t in result.tasks}}


def score_plain_merges(study_cfg: StudyConfig, study: optuna.Study, progress, runner: TrialRunner) -> None:
    """The plain merges a user would write by hand (search.compare.plain_merges), each scored on the held-out
    items, stored in the study (once: a resumed finalize skips the ones done). Configs of one structure share
    one engine; each engine is freed before the next is built."""
    done = study.user_attrs.get(PLAIN_ATTR) or {}
    todo = [(label, i, raw) for label, raws in plain_merges(study_cfg.merge_raw).items()
            for i, raw in enumerate(raws) if f"{label}#{i}" not in done]
    if not todo:
        return
    progress.note(f"scoring {len(todo)} plain merges on the held-out items (linear, task arithmetic, ties, dare_ties)")
    engine = None
    for label, i, raw in todo:
        config = parse_config(raw, where=label, base_dir=study_cfg.base_dir)
        if engine is None or engine.config.structure != config.structure:
            engine = None
            engine = MergeEngine(config, device=runner.engine.device, seed=study_cfg.seed,
                                 allow_pickle=study_cfg.allow_pickle)
        result = runner.suite.evaluate(engine.materialize(config, check_finite=True), "holdout")
        done[f"{label}#{i}"] = {"label": label, "config": raw, **held_out(runner, result)}
        study.set_user_attr(PLAIN_ATTR, done)


def compare(study_cfg: StudyConfig, study: optuna.Study, top: list) -> None:
    """Pick the winner among the top trials on the select half of the held-out items, score every row on the
    report half, and the winner's margin with its bootstrap interval: the study's `final` attribute."""
    held = holdout_results(study)
    references = references_of(study, study_cfg)
    weights = {spec.name: spec.weight for spec in study_cfg.evaluation.tasks}
    candidates = [Candidate(t.user_attrs["seed"], "parent", held[t.number]["items"], t.number, t.user_attrs.get("score"))
                  for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                  if str(t.user_attrs.get("seed", "")).startswith("parent") and t.number in held]
    candidates += [Candidate(entry["label"], "plain", entry["items"], config=entry["config"])
                   for entry in (study.user_attrs.get(PLAIN_ATTR) or {}).values()]
    best = [Candidate("best found", "found", held[t.number]["items"], t.number, t.user_attrs.get("score"))
            for t in top if t.number in held]
    if not best:
        return
    items = best[0].items
    report_ids = {i for task in items.values() for i in task if in_report_half(i, study_cfg.evaluation.seed)}
    study.set_user_attr(FINAL_ATTR, results_table(candidates, best, study_cfg.aggregate, weights, references,
                                                  report_ids))


# ---- references --------------------------------------------------------------------------------------------
def ensure_references(study: optuna.Study, study_cfg: StudyConfig, make_runner) -> dict[str, float]:
    """The objective's per-task references, measured once per study on the search items (the best parent's score
    per task) and stored with it, so that a resumed search and every worker use the same ones."""
    if REFERENCES_ATTR not in study.user_attrs:
        runner = make_runner()
        study.set_user_attr(REFERENCES_ATTR, {"measured": runner.measure_references()})
    return references_of(study, study_cfg)


def references_of(study: optuna.Study, study_cfg: StudyConfig) -> dict[str, float]:
    """The references in use: a task's own `reference:` where given, else the measured one."""
    measured = (study.user_attrs.get(REFERENCES_ATTR) or {}).get("measured", {})
    used = {spec.name: spec.reference if spec.reference is not None else measured.get(spec.name, math.nan)
            for spec in study_cfg.evaluation.tasks}
    return check_references(used, study_cfg.path.name) if study_cfg.aggregate != "mean" else used


def describe(trials: list) -> str:
    """'the best 5 by search score + 3 seed trials' for a list of trials."""
    seeds = sum(1 for t in trials if "seed" in t.user_attrs)
    best = len(trials) - seeds
    parts = ([f"the best {best} by search score"] if best else []) + ([f"{seeds} seed trials"] if seeds else [])
    return " + ".join(parts)
