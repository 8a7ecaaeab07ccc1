"""Datasets versioned with DVC: prepare records the hash; push, delete, pull restores it bit-identically."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from nagl.data import dvc
from nagl.data.prepare import prepare_dataset
from nagl.errors import NaglError
from nagl.io import sha256_file

REPO = Path(__file__).resolve().parents[1]

SMALL_REGISTRY = """
datasets:
  small-texture:
    kind: embedded
    domain: industrial-texture
    preset: textures
    categories: [gravel]
    counts: {train_good: 4, test_good: 2, test_anomalous: 3}
"""


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


def test_prepare_versions_and_push_delete_pull_restores_bit_identically(project, tmp_path):
    root = project(SMALL_REGISTRY)
    result = prepare_dataset("small-texture")
    assert result.action == "built"
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    recorded = lock["stages"]["prepare@small-texture"]["outs"][0]
    assert recorded["path"] == "datasets/small-texture" and recorded["md5"] == result.content_hash
    assert result.content_hash.endswith(".dir")

    before = _tree(root / "datasets" / "small-texture")
    assert "manifest.parquet" in before
    dvc.push(["small-texture"])
    assert any((root / ".dvc-storage").rglob("*")), "nothing reached the remote"

    shutil.rmtree(root / "datasets" / "small-texture")
    shutil.rmtree(root / ".dvc" / "cache")  # force the remote, not the local cache
    dvc.pull(["small-texture"])
    assert _tree(root / "datasets" / "small-texture") == before

    # Prepared again from scratch, the restore path is taken (no rebuild) and the hash holds.
    shutil.rmtree(root / "datasets" / "small-texture")
    again = prepare_dataset("small-texture")
    assert again.action == "restored" and again.content_hash == result.content_hash


def test_rebuild_gives_the_same_dvc_hash(project):
    project(SMALL_REGISTRY)
    first = prepare_dataset("small-texture").content_hash
    second = prepare_dataset("small-texture", force=True)
    assert second.action == "built" and second.content_hash == first


def test_embedded_benchmark_regenerates_to_the_committed_hashes(project):
    """The full embedded datasets rebuild to exactly the hashes committed in dvc.lock."""
    committed = yaml.safe_load((REPO / "dvc.lock").read_text())["stages"]
    root = project()
    for name in ("embedded-textures", "embedded-medical", "embedded-objects"):
        expected = committed[f"prepare@{name}"]["outs"][0]["md5"]
        assert prepare_dataset(name).content_hash == expected, f"{name} no longer regenerates identically"
        shutil.rmtree(root / "datasets" / name)  # keep the disk small


def test_dvc_outside_a_dvc_repository_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("NAGL_HOME", str(tmp_path))
    with pytest.raises(NaglError, match="not a DVC repository"):
        dvc.push(["anything"])


def test_dvc_lock_serialises_callers(tmp_path):
    """Two holders of the DVC lock never overlap."""
    import multiprocessing as mp

    (tmp_path / ".dvc").mkdir()
    log = tmp_path / "log"
    ctx = mp.get_context("fork")
    workers = [ctx.Process(target=_hold_lock, args=(tmp_path, log, i)) for i in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(30)
    events = log.read_text().split()
    assert len(events) == 6
    for start, end in zip(events[::2], events[1::2], strict=False):
        assert start.startswith("start") and end.startswith("end") and start[5:] == end[3:]


def _hold_lock(repo: Path, log: Path, index: int) -> None:
    import time

    with dvc.dvc_lock(repo):
        with open(log, "a") as handle:
            handle.write(f"start{index}\n")
            handle.flush()
            time.sleep(0.2)
            handle.write(f"end{index}\n")
