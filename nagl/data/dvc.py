"""The one place that runs DVC.

DVC records the identity (content hash) of every prepared dataset in ``dvc.lock``
and moves dataset folders to and from a remote. Each dataset is the output of the
stage ``prepare@<name>`` in ``dvc.yaml``. DVC must never run twice at once in a
repository, so every call here holds an exclusive file lock
(``.dvc/tmp/nagl-dvc.lock``); Snakemake rules that reach this module also hold the
resource ``dvc=1``.
"""

from __future__ import annotations

import contextlib
import fcntl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import yaml

from nagl.errors import NaglError
from nagl.settings import project_dir

STAGE = "prepare"


def stage_name(dataset: str) -> str:
    return f"{STAGE}@{dataset}"


def is_dvc_repo(repo: Path | None = None) -> bool:
    return ((repo or project_dir()) / ".dvc").is_dir()


@contextlib.contextmanager
def dvc_lock(repo: Path | None = None) -> Iterator[None]:
    """Hold the project-wide DVC lock (blocks until free)."""
    lock_dir = (repo or project_dir()) / ".dvc" / "tmp"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / "nagl-dvc.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def run_dvc(*args: str, repo: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``dvc ARGS`` in the repository under the lock; raise NaglError on failure."""
    repo = repo or project_dir()
    if not is_dvc_repo(repo):
        raise NaglError(f"{repo} is not a DVC repository (no .dvc/ folder); run nagl from the "
                        f"project folder, or `dvc init` there first")
    with dvc_lock(repo):
        done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo,
                              capture_output=True, text=True)
    if check and done.returncode != 0:
        output = (done.stderr or done.stdout).strip()
        raise NaglError(f"`dvc {' '.join(args)}` failed in {repo}:\n{output}")
    return done


def commit(dataset: str, repo: Path | None = None) -> str:
    """Record ``datasets/<dataset>`` in dvc.lock and the DVC cache; return its content hash."""
    run_dvc("commit", "--force", stage_name(dataset), repo=repo)
    digest = content_hash(dataset, repo=repo)
    if digest is None:
        raise NaglError(f"dvc commit of {stage_name(dataset)} left no hash in dvc.lock; "
                        f"check that dvc.yaml declares the stage '{STAGE}' over config/datasets.yaml")
    return digest


def content_hash(dataset: str, repo: Path | None = None) -> str | None:
    """The DVC content hash of ``datasets/<dataset>`` recorded in dvc.lock, or None."""
    lock = (repo or project_dir()) / "dvc.lock"
    if not lock.is_file():
        return None
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    for out in stages.get(stage_name(dataset), {}).get("outs", []):
        if out.get("path") == f"datasets/{dataset}":
            return out.get("md5")
    return None


def push(datasets: list[str], repo: Path | None = None, remote: str | None = None) -> None:
    """Upload the datasets' recorded versions to the remote (default: the project's)."""
    extra = ["--remote", remote] if remote else []
    run_dvc("push", *extra, *[stage_name(name) for name in datasets], repo=repo)


def pull(datasets: list[str], repo: Path | None = None, remote: str | None = None,
         check: bool = True) -> bool:
    """Restore the datasets' recorded versions from the cache or the remote.

    With ``check=False`` a failure (nothing recorded, not on the remote) returns
    False instead of raising, so the caller can build the dataset instead.
    """
    extra = ["--remote", remote] if remote else []
    done = run_dvc("pull", *extra, *[stage_name(name) for name in datasets], repo=repo, check=check)
    return done.returncode == 0
