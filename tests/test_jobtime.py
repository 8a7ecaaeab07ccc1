"""workflow/scripts/jobtime.py: the job's exit status passes through and its usage is recorded."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "workflow" / "scripts" / "jobtime.py"


def test_jobtime_records_usage_and_keeps_the_exit_status(tmp_path):
    folder = tmp_path / "times"
    job = "import sys; data = bytearray(64 * 2**20); sys.exit(3)"  # touches 64 MiB, then fails
    done = subprocess.run([sys.executable, str(SCRIPT), str(folder), sys.executable, "-c", job])
    assert done.returncode == 3
    (record_file,) = folder.glob("*.json")
    record = json.loads(record_file.read_text())
    assert record["command"] == [sys.executable, "-c", job]
    assert record["exit"] == 3
    assert record["max_rss_kib"] >= 64 * 1024
    assert record["minor_faults"] >= 64 * 2**20 // 4096 // 2  # zeroed pages are faulted in
    assert record["wall_s"] > 0 and record["user_s"] + record["system_s"] > 0
    assert not list(folder.glob("*.tmp"))


def test_jobtime_reports_a_missing_command(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), str(tmp_path / "no-such-program")],
                          capture_output=True)
    assert done.returncode == 127
    assert json.loads(next(tmp_path.glob("*.json")).read_text())["exit"] == 127
