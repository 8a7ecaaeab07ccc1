"""What is stored with every number: versions, git commit, time."""

from __future__ import annotations

import datetime as _dt
import functools
import platform
import subprocess
from importlib import metadata

from nagl import __version__
from nagl.settings import project_dir

PACKAGES = ("torch", "torchvision", "timm", "open_clip_torch", "numpy", "scikit-learn",
            "duckdb", "snakemake", "dvc")


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The project's commit, with ``-dirty`` if tracked files changed; None outside git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project_dir(), capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=project_dir(), capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("-dirty" if dirty else "")


@functools.lru_cache(maxsize=1)
def package_versions() -> dict[str, str]:
    versions = {"nagl": __version__, "python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def now_utc() -> str:
    return _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat()
