"""The Optuna side of a study: storage URLs and files, samplers, pruners, opening a study, and the trial queries
that the loop, export, report and progress share.

Owns every direct use of Optuna's storage; never merges, scores or writes run-folder files.
"""

from __future__ import annotations

import copy
import inspect
import math
import os
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState
from sqlalchemy import event
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from search import StudyError

warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
# The loop runs the heartbeat thread itself around ask/tell (see loop.run_worker).
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
# Optuna's own warnings (e.g. CMA-ES falling back to independent sampling for a seed trial) are for -v only.
optuna.logging.set_verbosity(optuna.logging.ERROR if os.environ.get("MERGESEARCH_QUIET") else optuna.logging.WARNING)

# A worker's running trial refreshes its heartbeat every HEARTBEAT_S; without one for 3x that long it is
# stale (its worker died) and is retried. MERGESEARCH_HEARTBEAT (seconds) changes it, e.g. for tests.
HEARTBEAT_S = max(1, int(os.environ.get("MERGESEARCH_HEARTBEAT", "10")))
GRACE_S = 3 * HEARTBEAT_S
MAX_RETRY = 3
SPACE_ATTR = "mergesearch_space"

SAMPLERS = {"tpe": optuna.samplers.TPESampler, "cmaes": optuna.samplers.CmaEsSampler,
            "gp": optuna.samplers.GPSampler, "nsga2": optuna.samplers.NSGAIISampler,
            "random": optuna.samplers.RandomSampler}
class WilcoxonPruner(optuna.pruners.BasePruner):
    """Stop a trial once its per-chunk values show, by a one-sided Wilcoxon signed-rank test (zero differences
    split, normal approximation) at p < p_threshold, that it is worse than the best trial; never with fewer than
    max(2, n_startup_steps) values in the test, nor while its mean there is not below the mark.

    Chunk k of task t reports at step k * tasks + t (the same items in every trial). For a mean over tasks
    (objectives `mean`, `normalized`) the trial's values are paired step by step with the best trial's. For
    `worst` (the smallest task score over its reference) a trial is worse once one task is below the best trial's
    value: each task's values so far are tested against that value, at p_threshold / tasks (Bonferroni).
    Pairing with the best trial there would test the mean, and prune a balanced candidate against an incumbent
    that is strong on two tasks and weak on the third.

    optuna's WilcoxonPruner runs the paired test through scipy's "auto" method, which becomes a permutation test
    when differences tie or are zero: always, for per-chunk accuracies. That cost 0.3-0.6 s a report, 87% of the
    time of a pruned demo search (profiled: 417 of 481 s over 80 trials); the approximation costs ~0.2 ms.
    """

    def __init__(self, p_threshold: float = 0.1, n_startup_steps: int = 2, *, tasks: int = 1, worst: bool = False):
        if not 0.0 <= p_threshold <= 1.0:
            raise ValueError(f"p_threshold must be between 0 and 1, got {p_threshold}")
        if n_startup_steps < 0:
            raise ValueError(f"n_startup_steps must be >= 0, got {n_startup_steps}")
        self.p_threshold, self.n_startup_steps = p_threshold, n_startup_steps
        self.tasks, self.worst = max(1, tasks), worst

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        mine = trial.intermediate_values
        if not mine or study.direction != optuna.study.StudyDirection.MAXIMIZE:
            return False
        try:
            best = study.best_trial
        except ValueError:          # no completed trial yet
            return False
        if self.worst:
            return self._a_task_below(mine, best.value)
        steps = sorted(set(mine) & set(best.intermediate_values))
        ours = np.array([mine[s] for s in steps])
        theirs = np.array([best.intermediate_values[s] for s in steps])
        return self._worse(ours - theirs, self.p_threshold)

    def _a_task_below(self, mine: dict[int, float], mark: float) -> bool:
        by_task: dict[int, list[float]] = {}
        for step, value in mine.items():
            by_task.setdefault(step % self.tasks, []).append(value)
        return any(self._worse(np.array(values) - mark, self.p_threshold / self.tasks)
                   for values in by_task.values())

    def _worse(self, differences: np.ndarray, threshold: float) -> bool:
        if len(differences) < max(2, self.n_startup_steps) or not np.isfinite(differences).all():
            return False
        if differences.mean() >= 0:
            return False
        return wilcoxon_p(differences) < threshold


def wilcoxon_p(differences: np.ndarray) -> float:
    """One-sided p-value that the differences lean negative: the Wilcoxon signed-rank statistic with zero
    differences splitting their ranks, ties ranked by their mean, against its normal approximation (with the tie
    correction of the variance), as scipy.stats.wilcoxon(d, alternative="less", zero_method="zsplit",
    method="asymptotic")."""
    n = len(differences)
    magnitudes = np.abs(differences)
    order = np.argsort(magnitudes, kind="stable")
    sorted_mags = magnitudes[order]
    ranks = np.empty(n)
    start = 0
    ties = 0.0
    for end in range(1, n + 1):             # runs of equal magnitude share their mean rank
        if end == n or sorted_mags[end] != sorted_mags[start]:
            ranks[order[start:end]] = (start + end + 1) / 2
            t = end - start
            ties += t ** 3 - t
            start = end
    positive = ranks[differences > 0].sum() + ranks[differences == 0].sum() / 2
    mean = n * (n + 1) / 4
    variance = n * (n + 1) * (2 * n + 1) / 24 - ties / 48
    if variance <= 0:
        return 1.0
    z = (positive - mean) / math.sqrt(variance)
    return 0.5 * math.erfc(-z / math.sqrt(2))


PRUNERS = {"wilcoxon": WilcoxonPruner, "median": optuna.pruners.MedianPruner,
           "halving": optuna.pruners.SuccessiveHalvingPruner, "hyperband": optuna.pruners.HyperbandPruner,
           "none": optuna.pruners.NopPruner}
SAMPLER_DEFAULTS = {"tpe": {"multivariate": True}}
PRUNER_DEFAULTS = {"wilcoxon": {"p_threshold": 0.1}, "median": {"n_startup_trials": 5}}


# ---- samplers and pruners ---------------------------------------------------------------------------
def _build(kind: str, classes: dict, defaults: dict, name: str, options: dict, where: str, **fixed):
    """An Optuna sampler/pruner from a YAML block: unknown options and bad values are a StudyError naming them."""
    cls = classes[name]
    params = {p: param for p, param in inspect.signature(cls).parameters.items() if p not in fixed}
    for key, value in options.items():
        if key not in params:
            raise StudyError(f"the {name} {kind} has no option {key!r} (it takes: {', '.join(params) or 'none'})",
                             f"{where}.{key}")
        if str(params[key].annotation).startswith("bool") and not isinstance(value, bool) \
                and not (value is None and "None" in str(params[key].annotation)):
            raise StudyError(f"must be true or false, got {value!r}", f"{where}.{key}")   # "false" is truthy
    try:
        return cls(**fixed, **{**defaults.get(name, {}), **options})
    except (TypeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise StudyError(f"bad options for the {name} {kind}: {first}", where) from None


def make_sampler(name: str, seed: int, options: dict, where: str = "sampler") -> optuna.samplers.BaseSampler:
    """CMA-ES starts as Optuna does (mean mid-range, sigma0 1/6 of the normalized range: the Sakana setting);
    TPE is multivariate unless told otherwise."""
    return _build("sampler", SAMPLERS, SAMPLER_DEFAULTS, name, options, where, seed=seed)


PARTIAL_SCORE_PRUNERS = ("median", "halving", "hyperband")   # they report the objective over the items so far


def sampler_options(study_cfg) -> dict:
    """The sampler's options as the study runs it: CMA-ES under a pruner that reports the objective over the items
    scored so far counts a pruned trial at its last such value (`consider_pruned_trials`), unless the study says
    otherwise; else a pruned trial would be a sample lost to it (demo, Hyperband: the unpruned run's held-out score
    at 0.33 of its time with, never without). Wilcoxon reports per-chunk values, not the objective."""
    options = dict(study_cfg.sampler.options)
    if study_cfg.sampler.name == "cmaes" and study_cfg.pruner.name in PARTIAL_SCORE_PRUNERS:
        options.setdefault("consider_pruned_trials", True)
    return options


def make_pruner(name: str, options: dict, where: str = "pruner", *, tasks: int = 1, worst: bool = False
                ) -> optuna.pruners.BasePruner:
    """A pruner from the YAML block; Wilcoxon also learns the number of tasks and whether the objective is
    `worst` (see WilcoxonPruner)."""
    fixed = {"tasks": tasks, "worst": worst} if name == "wilcoxon" else {}
    return _build("pruner", PRUNERS, PRUNER_DEFAULTS, name, options, where, **fixed)


# ---- storage -----------------------------------------------------------------------------------------------
def redact(url: str) -> str:
    """A storage URL without its password."""
    if "://" in url and "@" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':')[0]}:***@{host}"
    return url


def local_file(url: str) -> Path | None:
    """The file behind a SQLite URL or a journal path (None for a database server)."""
    if url.startswith("sqlite:///"):
        return Path(url.removeprefix("sqlite:///"))
    if url.endswith((".log", ".journal")) and "://" not in url:
        return Path(url)
    return None


def make_storage(url: str):
    """An Optuna storage for `url`: RDB (sqlite/postgresql/mysql) with heartbeats, or a journal file."""
    try:
        if url.endswith((".log", ".journal")) and "://" not in url:
            return optuna.storages.JournalStorage(JournalFileBackend(url))
        storage = _rdb_storage(url)
        if url.startswith("sqlite"):
            _sqlite_wal(storage.engine)
        return storage
    except Exception as err:  # noqa: BLE001 - SQLAlchemy/driver errors come in many types
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise StudyError(f"cannot open storage: {first}", redact(url)) from None


CREATE_ATTEMPTS = 6


def _rdb_storage(url: str, attempts: int = CREATE_ATTEMPTS):
    """Open (creating its tables if missing) an RDB storage. Processes that open a fresh database at the same
    moment (workers on several machines, a dashboard, the search) race to create its tables and version row;
    the losers see "already exists" or a unique-constraint error, and simply open it again: by then it exists."""
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    for attempt in range(attempts):
        try:
            return optuna.storages.RDBStorage(
                url, engine_kwargs=kwargs, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                heartbeat_stale_trial_callback=retry_trial)
        except DBAPIError as err:
            if attempt + 1 == attempts or not _lost_creation_race(err):
                raise
            time.sleep(0.1 * (attempt + 1))
    raise AssertionError("unreachable")


def _lost_creation_race(err: DBAPIError) -> bool:
    """Whether `err` is another process having created the same table or version row first."""
    text = str(err.orig).lower()
    return "already exists" in text or "unique" in text or "duplicate" in text


def _sqlite_wal(engine) -> None:
    """WAL journal + synchronous=NORMAL: ~4x cheaper commits (per-item pruner reports), readers never
    block the writer, and a killed process loses nothing committed (only a power cut could lose the
    last transactions, never corrupt the file)."""
    @event.listens_for(engine, "connect")
    def _pragmas(conn, _record):
        cursor = conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    engine.dispose()


def close_storage(storage) -> None:
    """Close a storage's pooled connections (an RDB storage; a journal file has none)."""
    engine = getattr(storage, "engine", None)
    if engine is not None:
        engine.dispose()


@contextmanager
def storage_failures(url: str):
    """A storage that fails mid-run (disk full, database server gone) is one StudyError line, not a
    traceback: what it had stored is kept, and the same command resumes once it works again. The same failure
    in a trial's heartbeat thread is left to the main thread, which meets it at its next write and says it
    in that one line (the thread's default hook printed a traceback first)."""
    default_hook = threading.excepthook

    def thread_hook(args) -> None:
        if not issubclass(args.exc_type, (optuna.exceptions.StorageInternalError, SQLAlchemyError)):
            default_hook(args)

    threading.excepthook = thread_hook
    try:
        yield
    except (optuna.exceptions.StorageInternalError, SQLAlchemyError) as err:
        cause: BaseException = err
        while cause.__cause__ is not None or cause.__context__ is not None:
            cause = cause.__cause__ or cause.__context__
        text = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise StudyError(f"the storage failed: {text} (trials stored so far are kept; fix it and run the "
                         "same command to resume)", redact(url)) from None
    finally:
        threading.excepthook = default_hook


def check_creatable(folder: Path) -> None:
    """Raise a StudyError if `folder` could not be created (or written, when it exists); creates nothing."""
    folder = Path(folder)
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is None:
        return
    if not existing.is_dir():
        why = "Not a directory" if existing != folder else "it is a file"
        raise StudyError(f"output folder is not writable: {why} ({existing} is a file, not a folder)", str(folder))
    if not os.access(existing, os.W_OK | os.X_OK):
        raise StudyError("output folder is not writable: Permission denied", str(folder))


def create_folder(folder: Path) -> None:
    """mkdir -p `folder` and prove it is writable, as a StudyError naming it if not."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise StudyError(f"output folder is not writable: {err.strerror}", str(folder)) from None


# ---- studies -----------------------------------------------------------------------------------------------
def open_study(study_cfg, storage_url: str | None = None, create: bool = True, space=None,
               new_study: bool = False, storage=None) -> optuna.Study:
    """Create the study or load the existing one; refuse to resume with a different search space.

    With create=False nothing is created: a missing storage file or study is a StudyError."""
    url = study_cfg.storage_url(storage_url)
    file = local_file(url)
    if file is not None:
        if not create and not file.is_file():
            raise StudyError(f"no study yet: {file} does not exist (run `mergesearch search "
                             f"{study_cfg.path}` first)", str(file))
        create_folder(file.parent)
    storage = storage or make_storage(url)
    exists = study_cfg.name in {s.study_name for s in _summaries(storage, url)}
    if not create and not exists:
        raise StudyError(f"no study named {study_cfg.name!r} in the storage (run `mergesearch search "
                         f"{study_cfg.path}` first)", redact(url))
    if exists and new_study:
        optuna.delete_study(study_name=study_cfg.name, storage=storage)
        exists = False
    kwargs = {}
    if space is not None:
        sampler, pruner = study_cfg.sampler, study_cfg.pruner
        kwargs = {"sampler": make_sampler(sampler.name, sampler.seed, sampler_options(study_cfg)),
                  "pruner": make_pruner(pruner.name, pruner.options, tasks=len(study_cfg.evaluation.tasks),
                                        worst=study_cfg.aggregate == "worst")}
    directions = ["maximize"] * (len(study_cfg.evaluation.tasks) if study_cfg.multi_objective else 1)
    try:
        study = optuna.create_study(study_name=study_cfg.name, storage=storage, directions=directions,
                                    load_if_exists=True, **kwargs)
    except ValueError as err:
        raise StudyError(f"cannot resume study {study_cfg.name!r}: {err}", redact(url)) from None
    if space is not None:
        stored = study.user_attrs.get(SPACE_ATTR)
        if stored is None:
            study.set_user_attr(SPACE_ATTR, space.signature())
        elif stored != space.signature():
            raise StudyError(f"study {study_cfg.name!r} exists with a different search space or merge "
                             "(pass --new-study to replace it, or change `name`)", study_cfg.path.name)
    return study


@contextmanager
def opened_study(study_cfg, storage_url: str | None = None):
    """An existing study, read for a command (export, report), its storage closed afterwards."""
    url = study_cfg.storage_url(storage_url)
    file = local_file(url)
    if file is not None and not file.is_file():
        open_study(study_cfg, storage_url, create=False)      # raises: no study yet
    storage = make_storage(url)
    try:
        yield open_study(study_cfg, storage_url, create=False, storage=storage)
    finally:
        close_storage(storage)


def study_differs(study_cfg, space, storage_url: str | None = None) -> bool:
    """Whether the storage holds this study with another search space (checked without writing anything)."""
    url = study_cfg.storage_url(storage_url)
    file = local_file(url)
    if file is not None and not file.is_file():
        return False
    storage = make_storage(url)
    try:
        summaries = {s.study_name: s for s in _summaries(storage, url)}
    finally:
        close_storage(storage)       # SQLite: its -wal/-shm files go with the last connection
    summary = summaries.get(study_cfg.name)
    if summary is None:
        return False
    stored = summary.user_attrs.get(SPACE_ATTR)
    return stored is not None and stored != space.signature()


def _summaries(storage, url: str):
    try:
        return optuna.get_all_study_summaries(storage, include_best_trial=False)
    except Exception as err:  # noqa: BLE001
        raise StudyError(f"cannot read storage: {str(err).splitlines()[0]}", redact(url)) from None


# ---- trial queries -----------------------------------------------------------------------------------------
def holdout_results(study: optuna.Study) -> dict[int, dict]:
    """Held-out re-evaluations stored in the study: trial number -> {score, scores, ...}."""
    return {int(k): v for k, v in (study.user_attrs.get("holdout") or {}).items()}


def best_complete(study: optuna.Study):
    """The completed trial with the best search score (mean of objectives when multi-objective)."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return None
    return max(complete, key=lambda t: (t.user_attrs.get("score", float("-inf")), -t.number))


def top_trials(study: optuna.Study, k: int) -> list:
    """The k completed trials with the best search scores, best first."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return sorted(complete, key=lambda t: (-t.user_attrs.get("score", float("-inf")), t.number))[:k]


def trial_by_number(study: optuna.Study, number: int):
    """The trial numbered `number`, or None."""
    return next((t for t in study.get_trials(deepcopy=False) if t.number == number), None)


def is_stale_failure(t: optuna.trial.FrozenTrial) -> bool:
    """A FAILED trial whose worker died or was interrupted: retried, so it does not use the budget."""
    return t.state == TrialState.FAIL and "fail_reason" not in t.user_attrs


def counted_trials(study: optuna.Study) -> int:
    """Trials that used or use the budget: finished ones (but retried stale failures) and running ones."""
    return sum(1 for t in study.get_trials(deepcopy=False)
               if t.state != TrialState.WAITING and not is_stale_failure(t))


def finished_trials(study: optuna.Study) -> int:
    return sum(1 for t in study.get_trials(deepcopy=False)
               if t.state in (TrialState.COMPLETE, TrialState.PRUNED) or (
                   t.state == TrialState.FAIL and "fail_reason" in t.user_attrs))


def state_counts(study: optuna.Study) -> dict[str, int]:
    """Trials per state name (lower case), states with none left out."""
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name.lower()] = counts.get(t.state.name.lower(), 0) + 1
    return counts


def retry_orphaned_failures(study: optuna.Study) -> None:
    """Queue the retry of every stale failure that has none. Failing a dead worker's trial and queueing its
    retry are two storage writes; a process killed between them (the next start's sweep, a heartbeat check)
    left the trial failed and never retried. A trial's retries list it in their `retry_history` (a dead
    worker's) or name it in `retry_of` (an interrupted one's, queued before it failed)."""
    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    retried |= {t.user_attrs["retry_of"] for t in trials if "retry_of" in t.user_attrs}
    for t in trials:
        if is_stale_failure(t) and t.number not in retried:
            retry_trial(study, t)             # gives up by itself past MAX_RETRY


def retry_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Queue a failed trial of a dead worker again (at most MAX_RETRY times), without the dead worker's
    stamp: until its new worker stamps it, a popped retry must look unstamped (see loop.fail_dead_local_trials)."""
    trial = copy.deepcopy(trial)
    trial.user_attrs = {k: v for k, v in trial.user_attrs.items() if k != "worker"}
    RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)(study, trial)
