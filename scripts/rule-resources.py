"""Per-rule wall time and peak memory of a run, and the SLURM resources they suggest.

Every rule writes a Snakemake benchmark file to <results>/benchmarks/ (wall
seconds `s`, peak resident memory `max_rss` in MB). This prints, per rule, the
largest figures over its jobs and the values for workflow/profiles/slurm/config.yaml:
memory = 1.5 x the peak, rounded up to 500 MB; runtime = 3 x the longest job,
rounded up to 5 minutes (queues and slower nodes), at least 5.

    python scripts/rule-resources.py results/benchmarks
"""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path


def rule_of(path: Path, root: Path) -> str:
    """benchmarks/<rule>/<wildcards>.tsv, or benchmarks/<rule>.tsv for single-job rules."""
    parts = path.relative_to(root).parts
    return parts[0] if len(parts) > 1 else path.stem


def measure(root: Path) -> dict[str, dict[str, float]]:
    figures: dict[str, dict[str, float]] = {}
    for path in sorted(root.rglob("*.tsv")):
        with path.open() as handle:
            for row in csv.DictReader(handle, delimiter="\t"):
                rule = figures.setdefault(rule_of(path, root), {"jobs": 0, "seconds": 0.0, "max_rss_mb": 0.0})
                rule["jobs"] += 1
                rule["seconds"] = max(rule["seconds"], float(row["s"]))
                if row["max_rss"] not in ("", "NA"):
                    rule["max_rss_mb"] = max(rule["max_rss_mb"], float(row["max_rss"]))
    return figures


def suggest(seconds: float, max_rss_mb: float) -> tuple[int, int]:
    mem_mb = max(500, math.ceil(1.5 * max_rss_mb / 500) * 500)
    runtime = max(5, math.ceil(3 * seconds / 60 / 5) * 5)
    return mem_mb, runtime


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not Path(argv[0]).is_dir():
        print(__doc__, file=sys.stderr)
        return 2
    figures = measure(Path(argv[0]))
    if not figures:
        print(f"no benchmark files under {argv[0]}; run the workflow first", file=sys.stderr)
        return 1
    print(f"{'rule':<18}{'jobs':>5}{'max wall s':>12}{'peak MB':>10}{'mem_mb':>9}{'runtime':>9}")
    for rule, row in sorted(figures.items()):
        mem_mb, runtime = suggest(row["seconds"], row["max_rss_mb"])
        print(f"{rule:<18}{row['jobs']:>5}{row['seconds']:>12.1f}{row['max_rss_mb']:>10.0f}{mem_mb:>9}{runtime:>9}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
