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
from search.export import folder_lock, maybe_write_best
from search.final import finalize
from search.objective import (Interrupted, TrialRunner, check_inputs, ensure_references, fault_reason, known_items_of,
                              references_of)
from search.space import SearchSpace
from search.store import (
    HEARTBEAT_S,
    MAX_RETRY,
    check_creatable,
    close_storage,
    counted_trials,
    create_folder,
    make_storage,
    open_study,
    redact,
    retry_orphaned_failures,
    retry_trial,
    storage_failures,
    study_differs,
)
from search.study import StudyConfig, load_study

log = logging.getLogger(__name__)

SEEDED_ATTR = "mergesearch_seeded"


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
__all__ = ["MAX_RETRY", "Budget", "ensure_references", "finalize", "known_items_of", "open_study", "references_of",
           "run_search", "run_worker"]


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
        retry_orphaned_failures(study)
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
                                   references=references_of(study, study_cfg),
                                   known_items=known_items_of(study, study_cfg))
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
                runner.references, runner.known_items = references, known_items_of(study, study_cfg)
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
