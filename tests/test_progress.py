"""`nagl run` progress: the event handler on its own, and a miniature run without a terminal."""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from rich.console import Console
from test_workflow import MINI_CONFIG, MINI_REGISTRY

from nagl.cli.progress import WorkflowProgress


def _record(event: str, **fields) -> logging.LogRecord:
    record = logging.LogRecord("snakemake", logging.INFO, __file__, 0, None, None, None)
    record.event = event
    record.__dict__.update(fields)
    return record


def _plain_console() -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, force_terminal=False, width=300), buffer


def test_progress_lines_count_jobs_per_rule_and_name_a_failed_jobs_log(tmp_path):
    console, out = _plain_console()
    progress = WorkflowProgress(console, interval=0)
    progress.emit(_record("run_info", stats={"features": 2, "evaluate": 3, "total": 5}))
    for jobid, rule, wildcards in ((1, "features", {"dataset": "a"}), (2, "features", {"dataset": "b"}),
                                   (3, "evaluate", {"target": "a"})):
        progress.emit(_record("job_info", jobid=jobid, rule_name=rule, wildcards=wildcards,
                              log=[f"logs/{rule}-{jobid}.log"]))
    progress.emit(_record("job_finished", job_id=1))
    progress.emit(_record("job_finished", job_id=2))
    assert [name for name, _ in progress.counts.running.values()] == ["evaluate"]

    log = tmp_path / "evaluate.log"
    log.write_text("".join(f"line {i}\n" for i in range(40)) + "ValueError: no queries left\n")
    progress.emit(_record("job_error", jobid=3, rule_name="evaluate", log=[str(log)]))

    lines = out.getvalue().splitlines()
    assert lines[0] == "5 jobs to run: features 2, evaluate 3"
    assert re.fullmatch(r"\[progress\] 1/5 jobs done \(features 1/2, evaluate 0/3\); elapsed 0:00:\d\d, "
                        r"about \d:\d\d:\d\d left", lines[1])
    assert lines[2].startswith("[progress] 2/5 jobs done (features 2/2, evaluate 0/3)")
    failure = lines[lines.index("[failed] evaluate (a)"):]
    assert failure[1] == f"  log: {log}; its last lines:"
    assert failure[-1] == "    ValueError: no queries left" and failure[2] == "    line 26"
    assert len(failure) == 2 + 15
    assert "left" not in progress.summary()  # no estimate once a job failed


def test_progress_is_not_printed_more_often_than_the_interval():
    console, out = _plain_console()
    progress = WorkflowProgress(console, interval=3600)
    progress.emit(_record("run_info", stats={"evaluate": 3, "total": 3}))
    for jobid in (1, 2, 3):
        progress.emit(_record("job_info", jobid=jobid, rule_name="evaluate", wildcards={}, log=[]))
        progress.emit(_record("job_finished", job_id=jobid))
    assert out.getvalue().splitlines() == ["3 jobs to run: evaluate 3"]  # nothing more within the hour
    assert progress.summary().startswith("[progress] 3/3 jobs done (evaluate 3/3)")


@pytest.mark.slow
def test_nagl_run_without_a_terminal_prints_progress_lines_and_names_the_failed_jobs_log(project, tmp_path):
    root = project(MINI_REGISTRY)
    config = root / "config" / "mini.yaml"
    config.write_text(yaml.safe_dump({**MINI_CONFIG, "methods": ["knn-normal"], "seeds": [0],
                                      "shots": {"k_normal": [1], "k_abnormal": [0]}}))
    command = [sys.executable, "-m", "nagl", "run", "--config", str(config), "--cores", "2", "--progress-every", "0"]
    env = {**os.environ, "NAGL_HOME": str(root)}

    # A feature cache that cannot be written: the feature jobs fail.
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the cache folder should be")
    failed = subprocess.run(command, cwd=root, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                            env={**env, "NAGL_CACHE": str(blocked)})
    assert failed.returncode != 0
    output = failed.stdout + failed.stderr
    failure = re.search(r"^\[failed\] extract_features\n  log: (\S+); its last lines:$", output, re.M)
    assert failure, output[-3000:]
    log = failure.group(1)
    assert (root / log).is_file() and "NotADirectoryError" in (root / log).read_text()
    assert "NotADirectoryError" in output  # the log's last lines are shown
    assert f"failed: extract_features; log: {log}" in output  # in the final error
    assert "Snakemake's log of this run:" in output

    done = subprocess.run(command, cwd=root, capture_output=True, text=True, stdin=subprocess.DEVNULL, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("[progress]")]
    first = next(line for line in done.stderr.splitlines() if " jobs to run: " in line)
    total = int(re.match(r"(\d+) jobs to run: ", first).group(1))
    # one evaluation job over both targets, one features job over both datasets
    assert "evaluate 1" in first and "extract_features 1" in first
    counts = [int(re.match(r"\[progress\] (\d+)/(\d+) jobs done", line).group(1)) for line in lines]
    assert counts == sorted(counts) and counts[-1] == total and len(lines) >= total - 1
    assert "evaluate 1/1" in lines[-1] and "left" not in lines[-1]
    assert "Select jobs to execute" not in done.stderr  # Snakemake's raw log is not shown ...
    logs = sorted((root / "results" / "logs").glob("snakemake-*.log"))
    assert logs and any("Select jobs to execute" in p.read_text() for p in logs)  # ... but kept
    assert Path(root / "results" / "benchmark.duckdb").is_file()
