"""Time, memory and backbone passes of the whole default matrix, from a clean start.

Copies the project skeleton (no datasets, no results, an empty feature cache) into
a temporary folder, runs `nagl run` there, then runs it again with nothing changed.
Prints: wall time of the full run and of the no-op rerun, peak memory of the whole
process tree (sampled), the number of cells in the database, and how many backbone
passes each image got. Targets (issue: the matrix): full run <= 15 min on 2 cores,
rerun <= 30 s, peak memory <= 4 GB, one backbone pass per image.

    .venv/bin/python benchmarks/matrix.py [--config config/config.yaml] [--cores 2] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import duckdb
import psutil

from nagl import paths
from nagl.config import load_config

REPO = Path(__file__).resolve().parents[1]
SKELETON = ["Snakefile", "dvc.yaml", "dvc.lock", ".dvcignore", "workflow", "config"]


def make_copy(root: Path) -> None:
    for name in SKELETON:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, root / name)
        elif source.exists():
            shutil.copy2(source, root / name)
    (root / ".dvc").mkdir()
    shutil.copy2(REPO / ".dvc" / "config", root / ".dvc" / "config")
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)


def run_measured(command: list[str], cwd: Path, env: dict) -> tuple[float, int, int]:
    """Run ``command``; return (seconds, peak RSS of its whole process tree in bytes, exit code)."""
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        parent = psutil.Process(process.pid)
        while not stop.is_set():
            try:
                tree = [parent, *parent.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.25)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, stderr = process.communicate()
    stop.set()
    sampler.join()
    if process.returncode:
        sys.stderr.write(stderr.decode()[-4000:])
    return time.perf_counter() - start, peak, process.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="config/config.yaml")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep the temporary project")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="nagl-matrix-"))
    make_copy(root)
    env = {**os.environ, "NAGL_HOME": str(root), "NAGL_CACHE": str(root / ".cache" / "nagl")}
    command = [sys.executable, "-m", "nagl", "run", "--config", args.config, "--cores", str(args.cores)]

    full_seconds, peak, code = run_measured(command, root, env)
    if code:
        sys.exit(f"the full run failed (exit {code}); project kept at {root}")
    rerun_seconds, _, code = run_measured(command, root, env)

    config = load_config(root / args.config)
    with duckdb.connect(str(root / paths.database(config.results)), read_only=True) as con:
        cells = con.execute("SELECT count(*) FROM runs").fetchone()[0]
        images = con.execute("SELECT sum(n_images) FROM datasets").fetchone()[0]
    computed = sum(json.loads(p.read_text())["computed"]
                   for p in (root / paths.feature_stamp(config.results, config.backbone, "-")).parent.glob("*.json"))
    cached = sum(1 for _ in (root / ".cache" / "nagl" / "features").rglob("*.npy"))

    print(f"config:                     {args.config} ({args.cores} cores)")
    print(f"full matrix, clean start:   {full_seconds / 60:.1f} min ({full_seconds:.0f} s)")
    print(f"rerun, nothing changed:     {rerun_seconds:.1f} s (exit {code})")
    print(f"peak memory (process tree): {peak / 2**30:.2f} GiB")
    print(f"cells in the database:      {cells}")
    print(f"images in the datasets:     {images}")
    print(f"backbone passes:            {computed} ({computed / images:.2f} per image; "
          f"{cached} feature files in the cache)")
    if args.keep:
        print(f"project kept at {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
