"""Crash and resume: a search SIGKILLed again and again (during materialize, evaluation, the best_config.yaml
write, ask/tell, seeding, start-up, at random) and resumed with the same command each time loses nothing.
The fast tests below pin the narrow windows the campaign found one by one.

The search runs through tests/killprobe.py, which is `python -m search.cli` plus a one-byte record of the
phase it is in (shared mmap): the killer waits for a phase, sends SIGKILL, and once the process is dead
reads where it died. After every kill and at the end the storage and best_config.yaml are checked.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import REPO
from killprobe import NAMES, PHASES, open_phase_file
from optuna.trial import TrialState
from sqlalchemy.exc import OperationalError
from studyfiles import write_study

from search import StudyError, loop, store
from search.loop import MAX_RETRY, open_study, run_search
from search.space import SearchSpace
from search.study import load_study

PROBE = Path(__file__).with_name("killprobe.py")
BUDGET = 40
# What each kill waits for. Phase kills that miss their phase (it ended before the signal landed) are
# retried, so the phases the issue names (materialize, evaluation, best_config write) are really hit.
PLAN = ["materialize", "materialize", "evaluate", "evaluate", "best_write", "best_write", "ask", "tell",
        "enqueue", "random", "random", "startup"]
REQUIRED = {"materialize", "evaluate", "best_write"}
MAX_TRIES = {"best_write": 12, "ask": 6, "tell": 6, "materialize": 6, "enqueue": 1}


@dataclass
class Campaign:
    path: Path
    phase_file: Path
    logs: Path
    seen: dict[int, tuple] = field(default_factory=dict)      # complete trial number -> (value, params, config)
    landed: list[str] = field(default_factory=list)
    killed_running: set[int] = field(default_factory=set)    # trials RUNNING when their worker was killed
    foreign: set[int] = field(default_factory=set)           # of those, marked as another machine's

    def launch(self, life: int) -> subprocess.Popen:
        env = {**os.environ, "PYTHONPATH": str(REPO), "MERGESEARCH_HEARTBEAT": "1",
               "MERGESEARCH_PHASE_FILE": str(self.phase_file)}
        self.phase_file.write_bytes(bytes([PHASES["startup"]]) + b"\0" * 4095)
        with open(self.logs / f"life{life}.err", "w") as err:
            return subprocess.Popen([sys.executable, str(PROBE), "search", str(self.path), "--no-progress"],
                                    env=env, cwd=self.path.parent, stdout=subprocess.DEVNULL, stderr=err)

    def study(self) -> optuna.Study:
        cfg = load_study(self.path)
        return optuna.load_study(study_name=cfg.name, storage=cfg.storage_url())


def wait_and_kill(proc: subprocess.Popen, shared, target: str, rng: random.Random) -> str | None:
    """SIGKILL `proc` in phase `target` (after skipping 0-2 occurrences) or, for 'random', after a random
    delay; returns the phase it died in (None if it finished first)."""
    deadline = time.time() + 90
    if target in ("random", "startup"):
        if target == "random":      # some time into the trials (start-up takes seconds and is "startup")
            while time.time() < deadline and proc.poll() is None and shared[0] == PHASES["startup"]:
                time.sleep(0.005)
        delay = rng.uniform(0.0, 1.5) if target == "random" else rng.uniform(0.3, 3.0)
        time.sleep(delay)
    else:
        # Phases that recur in every trial are hit at a random occurrence; seeding happens once per study,
        # so an 'enqueue' kill that missed it strikes as soon as the first trial is asked for.
        code, inside = PHASES[target], False
        skip = rng.randint(0, 2) if target in ("materialize", "evaluate", "tell") else 0
        spin = target in ("best_write", "ask", "tell", "enqueue")     # windows of about a millisecond
        while time.time() < deadline and proc.poll() is None:
            phase = shared[0]
            if phase == code and not inside:
                if skip == 0:
                    break
                skip -= 1
            if target == "enqueue" and phase in (PHASES["ask"], PHASES["other"]):
                break
            inside = phase == code
            time.sleep(0 if spin else 0.0005)
    if proc.poll() is not None:
        return None
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    return NAMES[shared[0]]


def best_config(campaign: Campaign) -> tuple[int, dict] | None:
    """(trial number in the header, parsed config) of best_config.yaml, or None when there is none."""
    path = campaign.path.parent / "run" / "best_config.yaml"
    if not path.exists():
        return None
    text = path.read_text()
    body = yaml.safe_load(text)                     # always a complete YAML document
    header = text.splitlines()[0]
    assert header.startswith("# mergesearch study") and isinstance(body, dict), text
    return int(header.split("trial ")[1].split(",")[0]), body


def best_complete(study: optuna.Study):
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    return max(complete, key=lambda t: (t.user_attrs["score"], -t.number)) if complete else None


def check_after_kill(c: Campaign, died_in: str) -> None:
    study = c.study()
    trials = {t.number: t for t in study.get_trials()}
    # Nothing completed before is lost or changed.
    for number, record in c.seen.items():
        t = trials.get(number)
        assert t is not None and t.state == TrialState.COMPLETE, f"completed trial {number} lost"
        assert (t.value, t.params, t.user_attrs["config"]) == record, f"completed trial {number} changed"
    for t in trials.values():
        if t.state == TrialState.COMPLETE:
            c.seen[t.number] = (t.value, t.params, t.user_attrs["config"])
    # best_config.yaml parses and is the config of a completed trial; between trials it is the best one.
    written = best_config(c)
    if written is not None:
        number, body = written
        assert trials[number].state == TrialState.COMPLETE
        assert body == yaml.safe_load(trials[number].user_attrs["config"])
        if died_in in ("materialize", "evaluate"):
            assert number == best_complete(study).number, "best_config.yaml is not the best trial"
    for t in trials.values():
        if t.state == TrialState.RUNNING:
            c.killed_running.add(t.number)


@pytest.mark.slow
def test_sigkill_campaign_loses_nothing(zoo, tmp_path):
    rng = random.Random(8)
    path = write_study(tmp_path / "study", zoo, trials=BUDGET, sampler="random", holdout=0.0, n_items=16,
                       granularity="global")
    c = Campaign(path, tmp_path / "phase", tmp_path)
    shared = open_phase_file(c.phase_file)
    plan = [p for p in PLAN if p != "enqueue"]
    rng.shuffle(plan)
    plan.insert(0, "enqueue")         # seed trials are queued once, at the first start
    tries = {p: 0 for p in PLAN}
    life = 0
    while plan:
        target = plan.pop(0)
        tries[target] += 1
        proc = c.launch(life)
        died_in = wait_and_kill(proc, shared, target, rng)
        assert died_in is not None, f"the search finished before kill {life} ({target}); raise BUDGET"
        c.landed.append(died_in)
        life += 1
        check_after_kill(c, died_in)
        if target not in ("random", "startup") and died_in != target and tries[target] < MAX_TRIES.get(target, 3):
            plan.insert(rng.randint(0, len(plan)), target)       # missed its window: try again later
        # Every other kill: a trial left RUNNING by a worker that stamped it is made to look like another
        # machine's, so only its heartbeat (not the local dead-pid check) can fail it. (Unstamped ones died
        # inside ask() and are failed at once.)
        if life % 2 == 0:
            study = c.study()
            for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                if "worker" in t.user_attrs:
                    study._storage.set_trial_user_attr(t._trial_id, "worker", "another-machine:1")
                    c.foreign.add(t.number)

    proc = c.launch(life)
    try:
        rc = proc.wait(timeout=240)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the final resume did not finish (a trial left RUNNING for ever?)")
    err = (tmp_path / f"life{life}.err").read_text()
    assert rc == 0, err
    assert "Traceback" not in err

    counts = {p: c.landed.count(p) for p in set(c.landed)}
    print(f"\n{len(c.landed)} kills landed in: {counts}")
    assert len(c.landed) >= 10
    assert REQUIRED <= set(c.landed), counts

    check_after_kill(c, "end")
    study = c.study()
    trials = study.get_trials()
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    counted = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
               or (t.state == TrialState.FAIL and "fail_reason" in t.user_attrs)]
    assert len(counted) == BUDGET
    assert all(t.state == TrialState.COMPLETE for t in counted)
    # Each trial killed while running was failed (without a reason: not the candidate's fault) and retried,
    # unless its line was already killed MAX_RETRY times (a candidate that keeps killing its worker).
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    for number in c.killed_running:
        t = next(t for t in trials if t.number == number)
        assert t.state == TrialState.FAIL and "fail_reason" not in t.user_attrs, number
        assert number in retried or len(t.system_attrs.get("retry_history", [])) >= MAX_RETRY, number
    # best_config.yaml is the best completed trial's config; every seed trial was run.
    number, body = best_config(c)
    best = best_complete(study)
    assert number == best.number and body == yaml.safe_load(best.user_attrs["config"])
    labels = {t.user_attrs.get("seed") for t in trials if t.state == TrialState.COMPLETE}
    assert {"parent ft_add", "parent ft_reverse", "uniform", "defaults"} <= labels
    leftovers = [p.name for p in (path.parent / "run").iterdir() if p.name.endswith(".tmp")]
    assert not leftovers


# ---- the narrow windows, one at a time (fast) --------------------------------------------------------------
def small_study(zoo, tmp_path, **extra):
    path = write_study(tmp_path, zoo, trials=3, sampler="random", holdout=0.0, n_items=8, granularity="global",
                       extra=extra)
    cfg = load_study(path)
    space = SearchSpace(cfg)
    return cfg, space, open_study(cfg, space=space)


def test_trial_of_a_worker_killed_inside_ask_is_failed_and_retried(zoo, tmp_path):
    """Optuna creates the trial RUNNING before sampling; a worker killed there leaves a trial with neither a
    worker stamp nor a heartbeat, which no stale check fails: the budget used to wait for it for ever."""
    cfg, _, study = small_study(zoo, tmp_path, seed_trials=[])
    orphan = study.ask()
    assert run_search(cfg, trials=3, timeout=60) == 0
    trials = study.get_trials()
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    dead = next(t for t in trials if t.number == orphan.number)
    assert dead.state == TrialState.FAIL and "fail_reason" not in dead.user_attrs
    assert any(t.system_attrs.get("failed_trial") == orphan.number for t in trials)
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 3


def test_a_failure_whose_retry_was_never_queued_is_retried_at_the_next_start(zoo, tmp_path):
    """Failing a dead worker's trial and queueing its retry are two writes: a process killed between them
    (seen once in the SIGKILL campaign) left the trial failed for good. The next start queues the retry."""
    cfg, _, study = small_study(zoo, tmp_path, seed_trials=[])
    orphan = study.ask({"weight.m0": optuna.distributions.FloatDistribution(0.0, 1.0)})
    study._storage.set_trial_state_values(orphan._trial_id, state=TrialState.FAIL)     # killed right here
    assert run_search(cfg, trials=3, timeout=60) == 0
    trials = study.get_trials()
    retries = [t for t in trials if orphan.number in t.system_attrs.get("retry_history", [])]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
    assert retries[0].params["weight.m0"] == orphan.params["weight.m0"]
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 3


def test_trial_of_a_dead_worker_on_another_machine_is_failed_by_its_heartbeat(zoo, tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "HEARTBEAT_S", 1)
    monkeypatch.setattr(store, "HEARTBEAT_S", 1)
    monkeypatch.setattr(store, "GRACE_S", 2)
    cfg, _, study = small_study(zoo, tmp_path, seed_trials=[])
    study = optuna.load_study(study_name=cfg.name, storage=store.make_storage(cfg.storage_url()))
    other = loop.ask_within_budget(study, loop.Budget(None, None), cfg.output_dir)
    study._storage.set_trial_user_attr(other._trial_id, "worker", "another-machine:4242")
    assert run_search(cfg, trials=3, timeout=60) == 0
    trials = study.get_trials()
    dead = next(t for t in trials if t.number == other.number)
    assert dead.state == TrialState.FAIL and "fail_reason" not in dead.user_attrs
    assert not [t for t in trials if t.state == TrialState.RUNNING]


def test_resume_after_a_kill_while_seeding_queues_the_missing_seeds(zoo, tmp_path):
    cfg, space, study = small_study(zoo, tmp_path)
    seeds = space.seed_genomes()
    for label, genome in seeds[:2]:              # ... and then the process was killed
        study.enqueue_trial(genome, user_attrs={"seed": label})
    stale = cfg.output_dir / ".best_config.yaml.k1ll3d.tmp"   # a best_config.yaml write killed half-way
    stale.write_text("merge_method: ti")
    assert run_search(cfg, trials=len(seeds), timeout=None) == 0
    labels = [t.user_attrs.get("seed") for t in study.get_trials()]
    assert sorted(labels) == sorted(label for label, _ in seeds)
    assert not stale.exists()


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["1", "2"])
def test_storage_failing_mid_run_is_one_line_and_the_same_command_resumes(zoo, tmp_path, workers):
    """The disk fills up under study.db mid-search (RLIMIT_FSIZE; the CLI ignores SIGXFSZ): one line, exit 2,
    the trials stored so far are kept, and the same command finishes the study once there is room."""
    import resource

    path = write_study(tmp_path, zoo, trials=40, sampler="random", holdout=0.0, n_items=8, granularity="global")
    args = [sys.executable, "-m", "search.cli", "search", str(path), "--no-progress", "--workers", workers]
    env = {**os.environ, "PYTHONPATH": str(REPO), "MERGESEARCH_HEARTBEAT": "1"}
    limit = 300 * 1024
    full = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert full.returncode == 2, full.stderr
    errors = [line for line in full.stderr.strip().splitlines() if line.startswith("mergesearch search: error: ")]
    assert errors and full.stderr.strip().splitlines()[-1] == errors[-1], full.stderr   # ends on the error
    assert any("sqlite:///" in line and "the storage failed" in line for line in errors), full.stderr
    assert "Traceback" not in full.stderr
    cfg = load_study(path)
    study = optuna.load_study(study_name=cfg.name, storage=cfg.storage_url())
    kept = {t.number: t.params for t in study.get_trials(states=(TrialState.COMPLETE,))}
    assert len(kept) < 40
    # one worker always completes some trials first; two fill the WAL faster (concurrent writers hold off its
    # checkpoints), sometimes before the first trial completes
    assert kept or workers != "1"
    resumed = subprocess.run(args + ["--trials", str(len(kept) + 3)], env=env, cwd=tmp_path, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    study = optuna.load_study(study_name=cfg.name, storage=cfg.storage_url())
    trials = study.get_trials()
    assert {t.number: t.params for t in trials if t.number in kept} == kept
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    assert sum(t.state == TrialState.COMPLETE for t in trials) == len(kept) + 3


def _running(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


def _trials_so_far(cfg) -> list:
    """The study's trials while a search is starting: none before it has created the study (the search may be
    creating its tables as we look: seen in CI)."""
    if not (cfg.output_dir / "study.db").exists():
        return []
    try:
        storage = store.make_storage(cfg.storage_url())
    except StudyError:
        return []
    try:
        return optuna.load_study(study_name=cfg.name, storage=storage).get_trials()
    except (KeyError, OperationalError):
        return []
    finally:
        store.close_storage(storage)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="workers follow their parent via prctl (Linux)")
def test_sigkilled_search_leaves_no_workers_and_the_same_command_resumes(zoo, tmp_path):
    """With --workers 2 the search spawns worker processes; SIGKILL of the search used to leave them running
    (a resumed search then ran beside them, doubling memory on a GPU). They now stop with it."""
    path = write_study(tmp_path, zoo, trials=400, sampler="random", holdout=0.0, n_items=16,
                       granularity="global")      # orphaned workers would run for many minutes
    args = [sys.executable, "-m", "search.cli", "search", str(path), "--workers", "2", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "MERGESEARCH_HEARTBEAT": "1"}
    search = subprocess.Popen(args, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cfg = load_study(path)
    workers: set[int] = set()
    deadline = time.time() + 120
    while time.time() < deadline and search.poll() is None:
        trials = _trials_so_far(cfg)
        workers = {int(t.user_attrs["worker"].rsplit(":", 1)[1]) for t in trials if "worker" in t.user_attrs}
        if len(workers) == 2 and sum(t.state == TrialState.COMPLETE for t in trials) >= 2:
            break
        time.sleep(0.2)
    assert search.poll() is None and len(workers) == 2, "the workers did not start trials in time"
    os.kill(search.pid, signal.SIGKILL)
    search.wait()
    deadline = time.time() + 20
    while time.time() < deadline and any(_running(pid) for pid in workers):
        time.sleep(0.2)
    orphans = [pid for pid in workers if _running(pid)]
    for pid in orphans:
        os.kill(pid, signal.SIGKILL)
    assert not orphans, "workers outlived the killed search"

    study = optuna.load_study(study_name=cfg.name, storage=cfg.storage_url())
    budget = sum(t.state == TrialState.COMPLETE for t in study.get_trials()) + 4
    resumed = subprocess.run(args[:-3] + ["--trials", str(budget), "--no-progress"], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=300)      # one worker: quicker
    assert resumed.returncode == 0, resumed.stderr
    trials = study.get_trials()
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    assert sum(t.state == TrialState.COMPLETE for t in trials) == budget
