"""The SLURM profile: a dry run plans the paper matrix with GPUs on the heavy rules."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_slurm_profile_dry_run_plans_gpu_jobs(project):
    root = project()
    done = subprocess.run([sys.executable, "-m", "snakemake", "--workflow-profile", "workflow/profiles/slurm",
                           "--configfile", "config/paper.yaml", "--dry-run"],
                          cwd=root, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", output, flags=re.M))
    # paper.yaml: 5 datasets (one features job for all), nagl trained on 2 sources x 3 training seeds; nagl 2x3x5 + 2 training-free x 5
    # evaluations, in one job per (method, source, training seed): 2x3 + 2.
    assert counts["prepare_dataset"] == "5" and counts["extract_features"] == "1"
    assert counts["train"] == "6" and counts["evaluate"] == "8" and counts["ingest"] == "1"
    blocks = output.split("\nrule ")
    for rule in ("train", "evaluate", "extract_features"):
        block = next(b for b in blocks if b.startswith(rule + ":"))
        assert "gpu=1" in block and "slurm_partition=gpu" in block, block
    prepare = next(b for b in blocks if b.startswith("prepare_dataset:"))
    assert "gpu=1" not in prepare and "slurm_partition=cpu" in prepare
    assert not (root / "results" / "paper" / "benchmark.duckdb").exists()
