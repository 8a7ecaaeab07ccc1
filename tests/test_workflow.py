"""The workflow end to end on a miniature config: dry run, real run, rerun, interrupt and resume."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest
import yaml
from concurrent_reader import Reader

from nagl import paths
from nagl.config import load_config
from nagl.data.layout import read_manifest
from nagl.errors import NaglError
from nagl.results.query import query

pytestmark = pytest.mark.slow

MINI_REGISTRY = """
datasets:
  mini-texture:
    kind: embedded
    domain: industrial-texture
    preset: textures
    categories: [brick]
    counts: {train_good: 6, test_good: 3, test_anomalous: 4}
  mini-medical:
    kind: embedded
    domain: medical-microscopy
    preset: medical
    categories: [microscopy]
    counts: {train_good: 6, test_good: 3, test_anomalous: 4}
"""

MINI_CONFIG = {
    "backbone": "effnet-lite0",
    "image_size": 64,
    "eval_resolution": 32,
    "methods": ["nagl", "knn-normal"],
    "sources": ["mini-texture", "mini-medical"],
    "targets": ["mini-texture", "mini-medical"],
    "shots": {"k_normal": [1, 2], "k_abnormal": [0, 1]},
    "seeds": [0, 1],
    "training": {"profile": "smoke", "seeds": [0]},
    "results": "results",
    "report": "reports/leaderboard.html",
}
# nagl: 2 sources x 2 targets x 1 category x 4 shot settings x 2 seeds; knn-normal (it ignores abnormal
# references: the 2 settings with k_abnormal = 0 only): 2 targets x 2 x 2.
EXPECTED_CELLS = 2 * 2 * 4 * 2 + 2 * 2 * 2


def _write_config(root: Path, **changes) -> Path:
    path = root / "config" / "mini.yaml"
    path.write_text(yaml.safe_dump({**MINI_CONFIG, **changes}))
    return path


def _nagl(root: Path, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nagl", *args], cwd=root, capture_output=True, text=True,
                          env={**os.environ, "NAGL_HOME": str(root)}, **kwargs)


def _run_ids(db: Path) -> dict[str, str]:
    with duckdb.connect(str(db), read_only=True) as con:
        return dict(con.execute("SELECT run_id, CAST(created_at AS VARCHAR) FROM runs").fetchall())


def test_bad_configs_are_rejected_with_the_setting_named(project):
    root = project(MINI_REGISTRY)
    cases = {
        "seeds": ("seeds", "a few"),
        "methods": ("methods", ["nagl", "patchcore"]),
        "image_size": ("image_size", 8),
        "targets": ("targets", ["mvtec-missing"]),
    }
    for expected, (key, value) in cases.items():
        path = _write_config(root, **{key: value})
        with pytest.raises(NaglError, match=expected):
            load_config(path)
    path = _write_config(root, shots={"k_normal": [0, 1], "k_abnormal": [0, 1]})
    with pytest.raises(NaglError, match="k_normal and k_abnormal both contain 0"):
        load_config(path)
    path = _write_config(root, extra_setting=1)
    with pytest.raises(NaglError, match="extra_setting"):
        load_config(path)
    done = _nagl(root, "run", "--config", str(_write_config(root, seeds=[-1])), "--dry-run")
    assert done.returncode == 2 and "seeds" in done.stderr


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.mark.timeout(1800)  # six runs of the workflow; the shared CI machines can be slow
def test_miniature_matrix_end_to_end_and_resume(project, umask_022):
    root = project(MINI_REGISTRY)
    config = _write_config(root)

    dry = _nagl(root, "run", "--config", str(config), "--cores", "2", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "evaluate" in dry.stdout + dry.stderr and not (root / "results" / "benchmark.duckdb").exists()

    # Start the real run, kill it (SIGKILL, whole process group) once some cells are finished.
    process = subprocess.Popen([sys.executable, "-m", "nagl", "run", "--config", str(config), "--cores", "2"],
                               cwd=root, env={**os.environ, "NAGL_HOME": str(root)},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    cells_root = root / "results" / "cells"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if len(list(cells_root.glob("**/run.json"))) >= 4:
            break
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    finished = {p: p.read_text() for p in cells_root.glob("**/run.json")}
    assert finished, "the run was killed before any cell finished; nothing to resume"

    # Temporaries an interrupted run may leave: the next run removes them (and only them).
    planted = [root / "datasets" / ".mini-texture.k2j4h5g6.staging" / "brick" / "x.png",
               next(iter(finished)).parent / ".metrics.json.q1w2e3r4.tmp"]
    for path in planted:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")

    resumed = _nagl(root, "run", "--config", str(config), "--cores", "2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for path, text in finished.items():
        assert path.read_text() == text, f"{path} was recomputed after the resume"
    assert not [path for path in planted if path.exists()]
    assert not (root / "datasets" / ".mini-texture.k2j4h5g6.staging").exists()

    db = root / "results" / "benchmark.duckdb"
    ids = _run_ids(db)
    assert len(ids) == EXPECTED_CELLS
    with duckdb.connect(str(db), read_only=True) as con:
        in_domain = con.execute("SELECT COUNT(*) FROM runs WHERE in_domain").fetchone()[0]
        assert in_domain == 2 * 4 * 2  # nagl trained and tested on the same dataset
        assert con.execute("SELECT COUNT(*) FROM runs WHERE source = '-'").fetchone()[0] == 2 * 2 * 2
        metrics = con.execute("SELECT COUNT(*) FROM metrics").fetchone()[0]
        assert metrics == EXPECTED_CELLS * 7
        board = con.execute("SELECT method, k_normal, k_abnormal, mean, n_seeds FROM leaderboard "
                            "WHERE level = 'image' AND metric = 'auroc' ORDER BY ALL").fetchall()
        assert len(board) == 4 + 2 and all(row[4] == 2 for row in board)  # nagl 4 settings, knn-normal 2
    assert (root / "reports" / "leaderboard.html").stat().st_size > 100_000
    # Ordinary permissions under umask 022, like any file the user makes.
    outputs = [root / "reports" / "leaderboard.html", db, root / "results" / "run-config.json",
               *sorted((root / "results" / "models").glob("**/*.safetensors")),
               *sorted((root / "results" / "models").glob("**/model.json"))]
    assert len(outputs) > 4
    assert {str(p): oct(p.stat().st_mode & 0o777) for p in outputs} == {str(p): "0o644" for p in outputs}

    # Nothing changed: nothing runs, the database is untouched.
    mtime = db.stat().st_mtime_ns
    again = _nagl(root, "run", "--config", str(config), "--cores", "2")
    assert again.returncode == 0, again.stderr[-3000:]
    assert db.stat().st_mtime_ns == mtime
    assert "Nothing to be done" in again.stdout + again.stderr

    # One more seed: only the new cells are computed, the old ones are kept. A reader of the
    # database and the report during the run (which re-ingests) always finds a valid file.
    report = root / "reports" / "leaderboard.html"
    reader = Reader(pause=0.05, read=lambda: (query(db, "SELECT count(*) AS n FROM runs")["n"][0], report.stat().st_size))
    grown = _nagl(root, "run", "--config", str(_write_config(root, seeds=[0, 1, 2])), "--cores", "2")
    reader.finish()
    assert grown.returncode == 0, grown.stderr[-3000:]
    assert reader.failures == [] and {n for n, _ in reader.values} <= {EXPECTED_CELLS, EXPECTED_CELLS * 3 // 2}
    new_ids = _run_ids(db)
    assert len(new_ids) == EXPECTED_CELLS * 3 // 2
    assert all(new_ids[run_id] == created for run_id, created in ids.items())

    # kill -9 while the ingest job runs: the database is the previous one, readable, and the
    # next run finishes the job.
    job = next((root / "results" / "jobs").glob("**/*.json"))
    os.utime(job)  # newer than the database's stamp: ingest and report run again
    ingest_log = root / paths.log_file("results", "ingest", "ingest")
    logged = ingest_log.stat().st_mtime_ns
    process = subprocess.Popen([sys.executable, "-m", "nagl", "run", "--config", str(_write_config(root, seeds=[0, 1, 2])),
                                "--cores", "2"], cwd=root, env={**os.environ, "NAGL_HOME": str(root)},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    reader = Reader(pause=0.05, read=lambda: query(db, "SELECT count(*) AS n FROM runs")["n"][0])
    while process.poll() is None and (not ingest_log.exists() or ingest_log.stat().st_mtime_ns == logged):
        time.sleep(0.05)  # the ingest job has started once its log is rewritten
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    reader.finish()
    assert reader.failures == [] and set(reader.values) == {EXPECTED_CELLS * 3 // 2}
    assert report.is_file()
    finished_run = _nagl(root, "run", "--config", str(_write_config(root, seeds=[0, 1, 2])), "--cores", "2")
    assert finished_run.returncode == 0, finished_run.stderr[-3000:]
    assert len(_run_ids(db)) == EXPECTED_CELLS * 3 // 2
    assert not list((root / "results").glob(".benchmark.duckdb.*.tmp*"))


def test_a_new_dataset_extracts_only_its_features_and_reruns_nothing_of_the_others(project):
    """One features job covers every dataset; adding a target reruns it, but the images already
    cached are not computed again, and the existing datasets' stamps are rewritten unchanged, so
    Snakemake (checksums of small inputs) reruns nothing downstream of them: no retraining."""
    root = project(MINI_REGISTRY)
    base = {"methods": ["nagl"], "sources": ["mini-texture"], "seeds": [0],
            "shots": {"k_normal": [1], "k_abnormal": [1]}}
    first = _nagl(root, "run", "--config", str(_write_config(root, **base, targets=["mini-texture"])), "--cores", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    stamp = root / paths.feature_stamp("results", "effnet-lite0", "mini-texture")
    model = root / paths.model_file("results", "nagl", "effnet-lite0", "mini-texture", 0)
    summary = root / paths.features_job("results", "effnet-lite0")
    stamp_text, model_mtime = stamp.read_text(), model.stat().st_mtime_ns
    assert json.loads(summary.read_text())["computed"] == len(read_manifest(root / "datasets" / "mini-texture"))

    grown = _nagl(root, "run", "--config",
                  str(_write_config(root, **base, targets=["mini-texture", "mini-medical"])), "--cores", "2")
    assert grown.returncode == 0, grown.stderr[-3000:]
    done = json.loads(summary.read_text())
    images = {name: len(read_manifest(root / "datasets" / name)) for name in ("mini-texture", "mini-medical")}
    assert done["datasets"] == images
    assert done["computed"] == images["mini-medical"]  # only the new dataset's images went through the backbone
    assert stamp.read_text() == stamp_text and stamp.stat().st_mtime_ns > model_mtime  # rewritten, same bytes
    assert model.stat().st_mtime_ns == model_mtime  # the checkpoint was not retrained
    with duckdb.connect(str(root / "results" / "benchmark.duckdb"), read_only=True) as con:
        assert con.execute("SELECT DISTINCT target FROM runs ORDER BY 1").fetchall() == [("mini-medical",),
                                                                                         ("mini-texture",)]
