"""Shared fixtures: offline environment, the tiny model zoo (built once per session), a CLI runner."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# Nothing in the tests may download anything; lm-eval/datasets caches go to a temp dir.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="mergesearch-hf-"))

import pytest  # noqa: E402
import yaml  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))      # tiny_models, demo_family: test and demo builders, not the package


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> dict[str, Path]:
    """The tiny model family (see scripts/tiny_models.build_test_family): name -> HF model folder."""
    from tiny_models import build_test_family

    return build_test_family(tmp_path_factory.mktemp("zoo"))


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600, env: dict | None = None
            ) -> subprocess.CompletedProcess:
    """Run `mergesearch ARGS` in a subprocess, as a user would; returns the completed process."""
    full_env = {**os.environ, "MERGESEARCH_HEARTBEAT": "1", **(env or {})}
    full_env["PYTHONPATH"] = str(REPO) + os.pathsep + full_env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "search.cli", *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def run_here(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`mergesearch ARGS` in this process (no interpreter start-up: ~3 s less a call), as run_cli returns it.

    For commands whose effects stay in-process (no workers, no signals, no resource limits): stdout and stderr
    are captured, the working directory is `cwd` for the call, and the exit status is main()'s."""
    import contextlib
    import io

    from search.cli import main

    out, err = io.StringIO(), io.StringIO()
    previous = os.getcwd()
    os.chdir(cwd or previous)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                status = main([str(a) for a in args])
            except SystemExit as exit_:          # argparse: --help, bad arguments
                status = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        os.chdir(previous)
    return subprocess.CompletedProcess(["mergesearch", *map(str, args)], status, out.getvalue(), err.getvalue())


@pytest.fixture
def cli():
    """The run_cli helper as a fixture."""
    return run_cli


def _pg_bin() -> Path | None:
    import glob
    import shutil

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@pytest.fixture(scope="session")
def postgres_url():
    """A throwaway PostgreSQL server on loopback for this test session (skips if none is installed)."""
    import pwd
    import socket
    import shutil

    bin_dir = _pg_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed (.ci/run installs it)")
    root = Path(tempfile.mkdtemp(prefix="mergesearch-pg-"))   # outside pytest's 0700 tmp tree
    data = root / "data"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run_as: list[str] = []
    if os.geteuid() == 0:       # initdb refuses to run as root
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("no postgres system user to run the server")
        shutil.chown(data.parent, "postgres")
        run_as = ["runuser", "-u", "postgres", "--"]
    subprocess.run(run_as + [str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E",
                             "UTF8"], check=True, capture_output=True)
    subprocess.run(run_as + [str(bin_dir / "pg_ctl"), "-D", str(data), "-o",
                             f"-p {port} -k {data} -c listen_addresses=127.0.0.1", "-l", str(data / "log"),
                             "-w", "start"], check=True, capture_output=True)
    try:
        subprocess.run(run_as + [str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
                                 "mergesearch"], check=True, capture_output=True)
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/mergesearch"
    finally:
        subprocess.run(run_as + [str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"],
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


# ---- a finished run (study, export, merge) that input and output tests copy and break --------------------
MODELS = ("base", "ft_add", "ft_reverse")


def study_dict() -> dict:
    return {
        "name": "night", "output_dir": "run",
        "merge": {"merge_method": "ties", "base_model": "models/base", "dtype": "float32",
                  "models": [{"model": "models/ft_add"}, {"model": "models/ft_reverse"}]},
        "space": {"granularity": "global", "params": {"weight": [0.0, 1.0], "density": [0.2, 1.0]}},
        "evaluation": {"tasks": [{"name": "add", "kind": "multiple_choice", "path": "data/add.jsonl"},
                                 {"name": "rev", "kind": "multiple_choice", "path": "data/rev.jsonl"}],
                       "holdout": 0.5, "seed": 0},
        "sampler": {"name": "random", "seed": 0},
        "budget": {"trials": 2},
    }


MERGE_YAML = {"merge_method": "linear", "dtype": "float32",
              "models": [{"model": "models/ft_add", "parameters": {"weight": 0.5}},
                         {"model": "models/ft_reverse", "parameters": {"weight": 0.5}}]}


@pytest.fixture(scope="session")
def finished_run(zoo, tmp_path_factory) -> Path:
    """A folder with models/, data/, study.yaml (relative paths), merge.yaml, and run/ after a search, an export
    with a model and a merge: copy it before changing anything."""
    from studyfiles import addition_items, reverse_items, write_jsonl

    root = tmp_path_factory.mktemp("finished")
    for name in MODELS:
        shutil.copytree(zoo[name], root / "models" / name)
    write_jsonl(root / "data" / "add.jsonl", addition_items(16))
    write_jsonl(root / "data" / "rev.jsonl", reverse_items(16))
    (root / "study.yaml").write_text(yaml.safe_dump(study_dict(), sort_keys=False))
    (root / "merge.yaml").write_text(yaml.safe_dump(MERGE_YAML, sort_keys=False))
    for args in (["search", "study.yaml", "--no-progress"],
                 ["export", "study.yaml", "--write-model", "run/model", "--device", "cpu"],
                 ["merge", "merge.yaml", "merged", "--device", "cpu"]):
        proc = run_cli(*args, cwd=root)
        assert proc.returncode == 0, proc.stderr
    assert {"study.db", "best_config.yaml", "trials.csv", "report", "model"} <= {p.name for p in (root / "run").iterdir()}
    return root


def snapshot(root: Path) -> dict[str, str]:
    """Every file under root (lock files aside: opening them is how writers wait) -> sha256 of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.name.endswith(".lock")}


