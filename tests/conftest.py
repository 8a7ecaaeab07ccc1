"""Shared fixtures: an isolated project folder, offline mode, a single torch thread."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROJECT_FILES = ["Snakefile", "dvc.yaml", ".dvcignore", "workflow", "config"]


@pytest.fixture(autouse=True, scope="session")
def _offline_and_single_threaded():
    """No test may reach the network; keep torch to one thread on the 2-core machines."""
    os.environ["NAGL_OFFLINE"] = "1"
    import torch

    torch.set_num_threads(1)
    yield


def make_project(root: Path, registry: str | None = None) -> Path:
    """A throw-away copy of the project skeleton (git + DVC) with its own remote.

    ``registry`` replaces config/datasets.yaml. Paths of the copy are isolated
    through NAGL_HOME / NAGL_CACHE, set by the caller (see the ``project`` fixture).
    """
    root.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, root / name)
        else:
            shutil.copy2(source, root / name)
    if registry is not None:
        (root / "config" / "datasets.yaml").write_text(registry)
    (root / ".dvc").mkdir()
    config = (REPO / ".dvc" / "config").read_text()
    (root / ".dvc" / "config").write_text(config)
    (root / ".dvc" / ".gitignore").write_text("/config.local\n/tmp\n/cache\n")
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "add", "-A"], cwd=root, check=True)
    subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init"],
                   cwd=root, check=True)
    return root


@pytest.fixture
def project(tmp_path, monkeypatch):
    """Factory: ``project(registry_yaml=None) -> Path`` of an isolated project folder."""

    def build(registry: str | None = None) -> Path:
        root = make_project(tmp_path / "project", registry)
        monkeypatch.setenv("NAGL_HOME", str(root))
        monkeypatch.setenv("NAGL_CACHE", str(tmp_path / "cache"))
        monkeypatch.chdir(root)
        return root

    return build


@pytest.fixture
def downloads(tmp_path, monkeypatch):
    """An empty downloads folder (NAGL_DOWNLOADS), offline: archives are placed by hand."""
    folder = tmp_path / "downloads"
    folder.mkdir()
    monkeypatch.setenv("NAGL_DOWNLOADS", str(folder))
    monkeypatch.setenv("NAGL_OFFLINE", "1")
    return folder
