"""The overnight loop: create or resume a study, run trials under a budget in one or several workers,
keep best_config.yaml current, and finish with a held-out re-evaluation of the top trials.

Owns Optuna storage, samplers, pruners, the trial budget, signals and live progress; never merges
or scores by itself (TrialRunner does).
"""

from __future__ import annotations

import copy
import logging
import math
import multiprocessing as mp
import os
import signal
import socket
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.storages._heartbeat import BaseHeartbeat, is_heartbeat_enabled
from optuna.trial import TrialState

from merge_core.writer import pid_alive
from search import StudyError
from search.export import folder_lock, write_best_config
from search.space import SearchSpace
from search.study import StudyConfig, load_study

log = logging.getLogger(__name__)
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
# We run the heartbeat thread ourselves around ask/tell (see run_worker).
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
optuna.logging.set_verbosity(optuna.logging.WARNING)

# A worker's running trial refreshes its heartbeat every HEARTBEAT_S; without one for 3x that long it is
# stale (its worker died) and is retried. MERGESEARCH_HEARTBEAT (seconds) changes it, e.g. for tests.
HEARTBEAT_S = max(1, int(os.environ.get("MERGESEARCH_HEARTBEAT", "10")))
GRACE_S = 3 * HEARTBEAT_S
MAX_RETRY = 3
SPACE_ATTR = "mergesearch_space"
SEEDED_ATTR = "mergesearch_seeded"


# ---- storage and study -----------------------------------------------------------------------------
def make_storage(url: str):
    """An Optuna storage for `url`: RDB (sqlite/postgresql/mysql) with heartbeats, or a journal file."""
    try:
        if url.endswith((".log", ".journal")) and "://" not in url:
            from optuna.storages.journal import JournalFileBackend

            return optuna.storages.JournalStorage(JournalFileBackend(url))
        kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
        storage = optuna.storages.RDBStorage(
            url, engine_kwargs=kwargs, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
            heartbeat_stale_trial_callback=retry_trial)
        if url.startswith("sqlite"):
            _sqlite_wal(storage.engine)
        return storage
    except Exception as err:  # noqa: BLE001 - SQLAlchemy/driver errors come in many types
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise StudyError(f"cannot open storage: {first}", _redact(url)) from None


def _sqlite_wal(engine) -> None:
    """WAL journal + synchronous=NORMAL: ~4x cheaper commits (per-item pruner reports), readers never
    block the writer, and a killed process loses nothing committed (only a power cut could lose the
    last transactions, never corrupt the file)."""
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _pragmas(conn, _record):
        cursor = conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    engine.dispose()


def _redact(url: str) -> str:
    """A storage URL without its password."""
    if "://" in url and "@" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':')[0]}:***@{host}"
    return url


def _sampler(study: StudyConfig, space: SearchSpace):
    cfg = study.sampler
    opts = dict(cfg.options)
    if cfg.name == "cmaes":
        # Sakana-style start (x0 in the middle of every range, sigma0 = 1/6 of it) is Optuna's default: it runs
        # CMA-ES on ranges normalized to [0, 1], from mean 0.5 with sigma0 1/6 (passing x0/sigma0 is deprecated
        # since Optuna 4.9 and prints a warning on every start).
        return optuna.samplers.CmaEsSampler(seed=cfg.seed, **opts)
    if cfg.name == "tpe":
        opts.setdefault("multivariate", True)
        return optuna.samplers.TPESampler(seed=cfg.seed, **opts)
    if cfg.name == "gp":
        return optuna.samplers.GPSampler(seed=cfg.seed, **opts)
    if cfg.name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=cfg.seed, **opts)
    return optuna.samplers.RandomSampler(seed=cfg.seed)


def _pruner(study: StudyConfig):
    cfg = study.pruner
    opts = dict(cfg.options)
    if cfg.name == "wilcoxon":
        opts.setdefault("p_threshold", 0.1)
        return optuna.pruners.WilcoxonPruner(**opts)
    if cfg.name == "median":
        opts.setdefault("n_startup_trials", 5)
        return optuna.pruners.MedianPruner(**opts)
    if cfg.name == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(**opts)
    return optuna.pruners.NopPruner()


def open_study(study_cfg: StudyConfig, storage_url: str | None = None, create: bool = True,
               space: SearchSpace | None = None, new_study: bool = False) -> optuna.Study:
    """Create the study or load the existing one; refuse to resume with a different search space."""
    url = study_cfg.storage_url(storage_url)
    if url.startswith("sqlite:///"):
        _check_writable(Path(url.removeprefix("sqlite:///")).parent)
    storage = make_storage(url)
    exists = study_cfg.name in {s.study_name for s in _summaries(storage, url)}
    if not create and not exists:
        raise StudyError(f"no study named {study_cfg.name!r} in the storage (run `mergesearch search` first)",
                         _redact(url))
    if exists and new_study:
        optuna.delete_study(study_name=study_cfg.name, storage=storage)
        log.warning("deleted the existing study %r (--new-study)", study_cfg.name)
        exists = False
    kwargs = {}
    if space is not None:
        kwargs = {"sampler": _sampler(study_cfg, space), "pruner": _pruner(study_cfg)}
    directions = ["maximize"] * (len(study_cfg.evaluation.tasks) if study_cfg.multi_objective else 1)
    try:
        study = optuna.create_study(study_name=study_cfg.name, storage=storage, directions=directions,
                                    load_if_exists=True, **kwargs)
    except ValueError as err:
        raise StudyError(f"cannot resume study {study_cfg.name!r}: {err}", _redact(url)) from None
    if space is not None:
        stored = study.user_attrs.get(SPACE_ATTR)
        if stored is None:
            study.set_user_attr(SPACE_ATTR, space.signature())
        elif stored != space.signature():
            raise StudyError(f"study {study_cfg.name!r} exists with a different search space or merge "
                             "(pass --new-study to replace it, or change `name`)", study_cfg.path.name)
    return study


def _summaries(storage, url: str):
    try:
        return optuna.get_all_study_summaries(storage, include_best_trial=False)
    except Exception as err:  # noqa: BLE001
        raise StudyError(f"cannot read storage: {str(err).splitlines()[0]}", _redact(url)) from None


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise StudyError(f"output folder is not writable: {err.strerror}", str(folder)) from None


def holdout_results(study: optuna.Study) -> dict[int, dict]:
    """Held-out re-evaluations stored in the study: trial number -> {score, scores}."""
    return {int(k): v for k, v in (study.user_attrs.get("holdout") or {}).items()}


# ---- the budget --------------------------------------------------------------------------------------
def _is_stale_failure(t: optuna.trial.FrozenTrial) -> bool:
    """A FAILED trial whose worker died or was interrupted: retried, so it does not use the budget."""
    return t.state == TrialState.FAIL and "fail_reason" not in t.user_attrs


def counted_trials(study: optuna.Study) -> int:
    """Trials that used or use the budget: finished ones (but retried stale failures) and running ones."""
    return sum(1 for t in study.get_trials(deepcopy=False)
               if t.state != TrialState.WAITING and not _is_stale_failure(t))


def finished_trials(study: optuna.Study) -> int:
    return sum(1 for t in study.get_trials(deepcopy=False)
               if t.state in (TrialState.COMPLETE, TrialState.PRUNED) or (
                   t.state == TrialState.FAIL and "fail_reason" in t.user_attrs))


@dataclass
class Budget:
    trials: int | None
    deadline: float | None          # time.time() after which no trial starts

    def time_left(self) -> bool:
        return self.deadline is None or time.time() < self.deadline


def retry_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Queue a failed trial of a dead worker again (at most MAX_RETRY times), without the dead worker's
    stamp: until its new worker stamps it, a popped retry must look unstamped (see fail_dead_local_trials)."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    trial = copy.deepcopy(trial)
    trial.user_attrs = {k: v for k, v in trial.user_attrs.items() if k != "worker"}
    RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)(study, trial)


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
            from sqlalchemy import text

            self.conn = self.engine.connect()
            self.conn.execute(text(f"SELECT pg_advisory_lock({self.KEY})"))
        return self

    def __exit__(self, *exc):
        if self.conn is not None:
            from sqlalchemy import text

            self.conn.execute(text(f"SELECT pg_advisory_unlock({self.KEY})"))
            self.conn.close()
        return False


# ---- one worker ----------------------------------------------------------------------------------------
def run_worker(study_cfg: StudyConfig, storage_url: str | None, budget: Budget, device: str | None,
               stop: threading.Event, on_trial=None, runner=None) -> None:
    """Ask/run/tell trials until the budget, the deadline or a stop request; updates best_config.yaml.
    `runner`: a TrialRunner built with `stop` (default: build one here)."""
    from optuna.storages._heartbeat import get_heartbeat_thread

    from search.objective import Interrupted, TrialRunner, fault_reason

    space = SearchSpace(study_cfg)
    study = open_study(study_cfg, storage_url, space=space)
    runner = runner or TrialRunner(study_cfg, space, device=device, stop=stop)
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


def best_complete(study: optuna.Study):
    """The completed trial with the best search score (mean of objectives when multi-objective)."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return None
    return max(complete, key=lambda t: (t.user_attrs.get("score", float("-inf")), -t.number))


def maybe_write_best(study: optuna.Study, study_cfg: StudyConfig, trial=None) -> None:
    """Rewrite best_config.yaml if `trial` (or, without one, whatever is best) is the best so far."""
    with folder_lock(study_cfg.output_dir, ".best.lock"):
        best = best_complete(study)
        if best is None or (trial is not None and best.number != trial.number):
            return
        write_best_config(study_cfg.output_dir, best, "search", study_cfg.name)


def _worker_main(study_path: str, storage_url: str | None, budget: Budget, device: str | None,
                 index: int, parent: int | None = None) -> None:
    """Entry point of a spawned worker process."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    _stop_with_parent(parent)
    if device and device.startswith("cuda") and ":" not in device:
        import torch

        if torch.cuda.device_count() > 1:
            device = f"cuda:{index % torch.cuda.device_count()}"
    from evaluators import EvalError
    from merge_core.errors import MergeConfigError

    try:
        study_cfg = load_study(study_path)
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
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:      # the search died before the request was in place
        os.kill(os.getpid(), signal.SIGTERM)


# ---- the command ------------------------------------------------------------------------------------------
def search_command(args) -> int:
    """`mergesearch search STUDY.yaml [--trials N] [--timeout 8h] [--storage URL] [--workers N]`."""
    from search.progress import SearchProgress
    from search.study import parse_duration

    study_cfg = load_study(args.study)
    trials = args.trials if args.trials is not None else study_cfg.trials
    timeout = parse_duration(args.timeout, "--timeout") if args.timeout else study_cfg.timeout
    if trials is None and timeout is None:
        raise StudyError("no budget: give budget.trials / budget.timeout in the YAML or --trials / --timeout",
                         study_cfg.path.name)
    if args.workers < 1:
        raise StudyError("must be at least 1", "--workers")
    device = args.device if args.device != "auto" else study_cfg.device
    return run_search(study_cfg, trials=trials, timeout=timeout, storage_url=args.storage, workers=args.workers,
                      device=device, new_study=args.new_study, progress=SearchProgress(not args.no_progress))


def run_search(study_cfg: StudyConfig, *, trials: int | None, timeout: float | None, storage_url: str | None = None,
               workers: int = 1, device: str | None = None, new_study: bool = False, progress=None) -> int:
    """Run (or resume) the study to its budget, then finalize; returns the exit status."""
    from search.objective import TrialRunner, check_inputs
    from search.progress import SearchProgress

    progress = progress or SearchProgress(False)
    _check_writable(study_cfg.output_dir)
    space = SearchSpace(study_cfg)
    # Every user error (a model, a task file, the storage, a changed space) is raised before anything in
    # the storage or output_dir changes: cheap input checks, the storage, then the resident runner.
    check_inputs(study_cfg, space)
    study = open_study(study_cfg, storage_url, space=space, new_study=new_study)
    stop = threading.Event()
    runner = TrialRunner(study_cfg, space, device=device, stop=stop) if workers == 1 else None
    budget = Budget(trials, time.time() + timeout if timeout else None)
    previous = {sig: signal.signal(sig, _stop_handler(stop)) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with storage_failures(study_cfg.storage_url(storage_url)):
            seed_study(study, space)
            maybe_write_best(study, study_cfg)   # a kill between tell and write leaves it stale: mend it now
            _run_and_finalize(study_cfg, study, space, storage_url, budget, device, workers, stop, progress,
                              runner, trials, timeout)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
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
                       on_trial=lambda s, t: progress.trial_done(s, t), runner=runner)
        else:
            _run_processes(study_cfg, storage_url, budget, device, workers, stop, progress, study)
    if stop.is_set():
        progress.note("stopping: interrupted, writing outputs (Ctrl-C again to skip the held-out re-evaluation)")
    finalize(study_cfg, study, space, device, progress, runner=runner)


@contextmanager
def storage_failures(url: str):
    """A storage that fails mid-run (disk full, database server gone) is one StudyError line, not a
    traceback: what it had stored is kept, and the same command resumes once it works again."""
    from sqlalchemy.exc import SQLAlchemyError

    try:
        yield
    except (optuna.exceptions.StorageInternalError, SQLAlchemyError) as err:
        cause: BaseException = err
        while cause.__cause__ is not None or cause.__context__ is not None:
            cause = cause.__cause__ or cause.__context__
        text = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise StudyError(f"the storage failed: {text} (trials stored so far are kept; fix it and run the "
                         "same command to resume)", _redact(url)) from None


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
                                                    os.getpid()), daemon=False) for i in range(workers)]
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
                             "are kept: fix it and run the same command to resume", _redact(storage_url or
                                                                                           study_cfg.storage_url()))
        log.warning("%d worker(s) exited with an error (codes %s)", len(failed), failed)


# ---- the end of a run --------------------------------------------------------------------------------------
def finalize(study_cfg: StudyConfig, study: optuna.Study, space: SearchSpace, device: str | None, progress,
             runner=None) -> None:
    """Held-out re-evaluation of the top-k trials, export of the held-out winner, trials.csv and report.
    `runner`: the search's TrialRunner, reused for the re-evaluation (default: build one)."""
    from search.report import write_report

    top = top_trials(study, study_cfg.top_k)
    if top and study_cfg.evaluation.has_holdout:
        seeds = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                 if "seed" in t.user_attrs and t.number not in {x.number for x in top}]
        try:
            reevaluate_holdout(study_cfg, study, space, top + seeds, device, progress, runner=runner)
        except KeyboardInterrupt:
            progress.note("held-out re-evaluation cut short (interrupted again); exporting what was scored")
    held = holdout_results(study)
    if held:
        winner = max(held, key=lambda n: (held[n]["score"], -n))
        study.set_user_attr("holdout_winner", winner)
        trial = next(t for t in study.get_trials(deepcopy=False) if t.number == winner)
        with folder_lock(study_cfg.output_dir, ".best.lock"):
            write_best_config(study_cfg.output_dir, trial, "held-out", study_cfg.name, held[winner]["score"],
                              held[winner]["scores"], extra={"search score": trial.user_attrs.get("score")})
    elif top:
        maybe_write_best(study, study_cfg)
    write_report(study_cfg, study, space)
    progress.summary(study, study_cfg)


def top_trials(study: optuna.Study, k: int) -> list:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return sorted(complete, key=lambda t: (-t.user_attrs.get("score", float("-inf")), t.number))[:k]


def reevaluate_holdout(study_cfg: StudyConfig, study: optuna.Study, space: SearchSpace, trials: list,
                       device: str | None, progress, runner=None) -> None:
    """Score the given trials on the held-out split (skipping ones already done); store in the study."""
    import yaml

    from merge_core.config import parse_config
    from search.objective import TrialRunner

    done = holdout_results(study)
    todo = [t for t in trials if t.number not in done]
    if not todo:
        return
    progress.note(f"held-out re-evaluation of the top {len(trials)} trials")
    runner = runner or TrialRunner(study_cfg, space, device=device)
    for trial in todo:
        config = parse_config(yaml.safe_load(trial.user_attrs["config"]), where=f"trial {trial.number}",
                              base_dir=study_cfg.base_dir)
        result, _, _ = runner.evaluate(config, "holdout")
        done[trial.number] = {"score": result.score, "scores": {t.name: t.score for t in result.tasks},
                              "stderr": {t.name: t.stderr for t in result.tasks}}
        study.set_user_attr("holdout", {str(k): v for k, v in done.items()})
