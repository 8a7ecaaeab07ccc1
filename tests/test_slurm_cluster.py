"""The miniature matrix on a real one-node SLURM cluster (scripts/slurm-local.sh), through the SLURM profile.

Needs root and apt-get (the cluster is installed and started by the script, and
stopped afterwards); skipped with the reason elsewhere. Checks that every rule
runs as a SLURM job, that a job cancelled with scancel is reported with its rule
and log, that the rerun resumes without recomputing finished cells, that the
datasets reach the "node" only through the DVC remote, and that the database
equals the one of a local run of the same config.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest
import yaml
from conftest import REPO, make_project
from test_workflow import MINI_CONFIG, MINI_REGISTRY

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

SCRIPT = REPO / "scripts" / "slurm-local.sh"
JOBCOMP_LOG = Path("/var/log/slurm/jobcomp.log")
# The miniature config, smaller: one dataset, one seed, two shot settings. 7 jobs, 4 cells.
CONFIG = {**MINI_CONFIG, "sources": ["mini-texture"], "targets": ["mini-texture"], "seeds": [0],
          "shots": {"k_normal": [1], "k_abnormal": [0, 1]}}
DATASETS = ["mini-texture"]
RULES = {"prepare_dataset", "extract_features", "train", "evaluate", "ingest", "report"}
SUBMITTED = re.compile(r"has been submitted with SLURM jobid (\d+) \(log: (\S+/rule_(\w+)/\S+\.log)\)")


@pytest.fixture(scope="module")
def slurm_cluster():
    """A running one-node cluster; started (and installed) here when it was not up, then stopped."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("the local SLURM cluster needs root and apt-get (Debian); see docs/cluster.md")
    was_up = subprocess.run(["bash", str(SCRIPT), "status"], capture_output=True).returncode == 0
    started = subprocess.run(["bash", str(SCRIPT), "start"], capture_output=True, text=True, timeout=900)
    if started.returncode == 3:
        pytest.skip(f"SLURM could not be installed: {started.stderr.strip()[-500:]}")
    assert started.returncode == 0, started.stdout + started.stderr
    yield
    if not was_up:
        subprocess.run(["bash", str(SCRIPT), "stop"], check=True, timeout=120)


def _write_config(root: Path) -> Path:
    path = root / "config" / "mini.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    return path


def _snakemake_slurm(root: Path) -> list[str]:
    # The command of docs/cluster.md; the first status check after 1 s instead of 40 s keeps the test short.
    return [sys.executable, "-m", "snakemake", "--workflow-profile", "workflow/profiles/slurm",
            "--configfile", "config/mini.yaml", "--slurm-init-seconds-before-status-checks", "1"]


def _running_evaluate_job(root: Path) -> str | None:
    """The id of a running SLURM job of the evaluate rule started from ROOT, if any."""
    listing = subprocess.run(["squeue", "-h", "-t", "RUNNING", "-o", "%i|%k|%Z"], capture_output=True, text=True).stdout
    for line in listing.splitlines():
        job_id, comment, workdir = line.split("|")
        if comment.startswith("rule_evaluate_") and Path(workdir).resolve() == root.resolve():
            return job_id
    return None


def _job_states(job_ids: set[str]) -> dict[str, str]:
    """JobState of each job in SLURM's job completion log (written by slurmctld when a job ends)."""
    states = {}
    for line in JOBCOMP_LOG.read_text().splitlines():
        fields = dict(item.split("=", 1) for item in line.split() if "=" in item)
        if fields.get("JobId") in job_ids:
            states[fields["JobId"]] = fields["JobState"]
    return states


def _cells(db: Path) -> tuple[list, list, list]:
    """What a run computed, without times, versions and the git commit: runs, metrics, scores, datasets."""
    with duckdb.connect(str(db), read_only=True) as con:
        runs = con.execute("SELECT run_id, method, backbone_identity, source, target, category, k_normal, k_abnormal, "
                           "seed, n_queries, checkpoint_hash, source_dataset_hash, target_dataset_hash, split_hash "
                           "FROM runs ORDER BY run_id").fetchall()
        metrics = con.execute("SELECT run_id, level, metric, value FROM metrics ORDER BY ALL").fetchall()
        scores = con.execute("SELECT run_id, image_path, label, score FROM scores ORDER BY ALL").fetchall()
        datasets = con.execute("SELECT * FROM datasets ORDER BY name").fetchall()
    return runs, metrics + scores, datasets


@pytest.mark.timeout(2400)
def test_miniature_matrix_on_slurm_equals_local_run(slurm_cluster, tmp_path):
    # 1. The local run (the reference); its datasets are pushed to its DVC remote.
    local = make_project(tmp_path / "local", MINI_REGISTRY)
    local_env = {**os.environ, "NAGL_HOME": str(local), "NAGL_CACHE": str(tmp_path / "cache-local"), "NAGL_OFFLINE": "1"}
    _write_config(local)
    done = subprocess.run([sys.executable, "-m", "nagl", "run", "--config", "config/mini.yaml", "--cores", "2"],
                          cwd=local, env=local_env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    pushed = subprocess.run([sys.executable, "-m", "nagl", "datasets", "push", *DATASETS],
                            cwd=local, env=local_env, capture_output=True, text=True)
    assert pushed.returncode == 0, pushed.stderr[-3000:]

    # 2. The cluster's copy of the project: the recorded dataset versions (dvc.lock, as from git) and the
    # shared DVC remote, no datasets, an empty DVC cache and feature cache.
    node = make_project(tmp_path / "cluster", MINI_REGISTRY)
    shutil.copy2(local / "dvc.lock", node / "dvc.lock")
    (node / ".dvc" / "config.local").write_text(f"['remote \"local\"']\n    url = {local / '.dvc-storage'}\n")
    _write_config(node)
    env = {**os.environ, "NAGL_HOME": str(node), "NAGL_CACHE": str(tmp_path / "cache-cluster"), "NAGL_OFFLINE": "1"}

    # 3. The SLURM run; once cells are finished, a running evaluate job is cancelled with scancel.
    # (The node has one GPU, so the evaluate jobs run one after the other.)
    first = subprocess.Popen(_snakemake_slurm(node), cwd=node, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    cells = node / "results" / "cells"
    cancelled = None
    deadline = time.monotonic() + 900
    while cancelled is None and first.poll() is None and time.monotonic() < deadline:
        if any(cells.glob("**/run.json")):
            cancelled = _running_evaluate_job(node)
        if cancelled is None:
            time.sleep(0.5)
    assert cancelled is not None, "no evaluate job was seen running after the first finished cells"
    subprocess.run(["scancel", cancelled], check=True)
    output, _ = first.communicate(timeout=900)
    (tmp_path / "first-run.log").write_text(output)
    assert first.returncode != 0, output[-3000:]
    cancelled_log = next(Path(log) for job, log, _ in SUBMITTED.findall(output) if job == cancelled)
    assert cancelled_log.is_file() and cancelled_log.parent.parent.name == "rule_evaluate"
    error = output[output.index("Error in rule evaluate"):]  # the report of the failed job
    assert f"SLURM-job '{cancelled}' failed, SLURM status is: 'CANCELLED'" in error, error[:3000]
    assert str(cancelled_log) in error, error[:3000]
    finished = {path: path.read_text() for path in cells.glob("**/run.json")}
    assert finished, "no cell was finished before the cancelled job"
    for dataset in DATASETS:  # the "node" got the datasets from the DVC remote, not by building them
        log = (node / "results" / "logs" / "prepare" / f"{dataset}.log").read_text()
        assert f"{dataset}: restored" in log, log

    # 4. The rerun resumes: only the missing evaluate jobs, ingest and report run; finished cells are kept.
    second = subprocess.run(_snakemake_slurm(node), cwd=node, env=env, capture_output=True, text=True, timeout=900)
    rerun_output = second.stdout + second.stderr
    (tmp_path / "second-run.log").write_text(rerun_output)
    assert second.returncode == 0, rerun_output[-3000:]
    rerun_rules = [rule for _, _, rule in SUBMITTED.findall(rerun_output)]
    assert set(rerun_rules) <= {"evaluate", "ingest", "report"} and "evaluate" in rerun_rules, rerun_rules
    for path, text in finished.items():
        assert path.read_text() == text, f"{path} was recomputed after the resume"

    # 5. Every rule ran as a SLURM job, and SLURM recorded each job's end.
    submitted = SUBMITTED.findall(output) + SUBMITTED.findall(rerun_output)
    assert {rule for _, _, rule in submitted} == RULES
    job_ids = {job for job, _, _ in submitted}
    states = _job_states(job_ids)
    assert states == {job: "CANCELLED" if job == cancelled else "COMPLETED" for job in job_ids}

    # 6. Same cells, same numbers as the local run; the report is written.
    assert _cells(node / "results" / "benchmark.duckdb") == _cells(local / "results" / "benchmark.duckdb")
    assert (node / "reports" / "leaderboard.html").stat().st_size > 100_000
