"""Run one workflow job and write its exact resource usage as JSON (used by benchmarks/matrix.py).

    python workflow/scripts/jobtime.py FOLDER COMMAND [ARG ...]

The usage comes from wait4(2) on the job's process: wall, user and system seconds,
peak resident memory, minor and major page faults of the job and every process it
waited for. The record is written under FOLDER (temporary name, then rename); the
exit status is the job's.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main() -> int:
    folder, command = sys.argv[1], sys.argv[2:]
    started = time.time()
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        try:
            os.execvp(command[0], command)
        finally:
            os._exit(127)
    _, status, usage = os.wait4(pid, 0)
    record = {"command": command, "started": started, "wall_s": time.perf_counter() - start,
              "user_s": usage.ru_utime, "system_s": usage.ru_stime, "max_rss_kib": usage.ru_maxrss,
              "minor_faults": usage.ru_minflt, "major_faults": usage.ru_majflt,
              "exit": os.waitstatus_to_exitcode(status)}
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{os.getpid()}-{pid}.json")
    with open(path + ".tmp", "w") as handle:
        json.dump(record, handle)
    os.replace(path + ".tmp", path)
    return record["exit"] if record["exit"] >= 0 else 128 - record["exit"]  # killed by a signal: 128 + its number


if __name__ == "__main__":
    sys.exit(main())
