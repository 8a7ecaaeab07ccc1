"""Time, memory and backbone passes of the whole default matrix, from a clean start.

Copies the project skeleton (no datasets, no results, an empty feature cache) into
a temporary folder, runs `nagl run` there, then runs it again with nothing changed.
Prints: wall time of the full run and of the no-op rerun, peak memory of the whole
process tree (sampled), the number of cells in the database, and how many backbone
passes each image got. Targets (issue: the matrix): full run <= 15 min on 2 cores,
rerun <= 30 s, peak memory <= 4 GB, one backbone pass per image.

Then the clean run stage by stage (prepare, features, train, evaluate, ingest,
report): jobs, wall seconds (summed over jobs), CPU seconds, peak RSS of one job,
minor page faults, each exact from wait4(2) (every job runs under
workflow/scripts/jobtime.py), and the ratio of a stage to its floor:

- features: backbone passes / the backbone's measured batch throughput (random
  preprocessed batches of 16, the rule's 2 torch threads);
- train: the optimiser steps alone (forward loss, backward, step: every
  ``loss.backward()`` to its ``optimiser.step()``, plus the loss), timed in-process on a
  rerun of each training with the same config;
- evaluate: the cells' pure scoring time (method forward on cached features and
  image scores: ``n_queries / images_per_second`` of every computed row of ``runs``;
  an alias cell is not scored, docs/architecture.md), plus the method forwards of the
  reference-use checks (``check_score_seconds`` of the job files).

Per-job start-up: a fresh interpreter importing the CLI and nagl.evaluate (the
imports an evaluation job pays before its work), best of 3, times the jobs.

    .venv/bin/python benchmarks/matrix.py [--config config/config.yaml] [--registry FILE] [--cores 2] [--keep] [--no-train-floor]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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


STAGES = {"prepare": ["datasets", "prepare"], "features": ["step", "features"], "train": ["step", "train"],
          "evaluate": ["step", "evaluate"], "ingest": ["step", "ingest"], "report": ["step", "report"]}


def stage_of(command: list[str]) -> str:
    """The workflow stage of a job, from its ``python -m nagl ...`` command line."""
    words = command[command.index("nagl") + 1:] if "nagl" in command else command
    for stage, prefix in STAGES.items():
        if words[:len(prefix)] == prefix:
            return stage
    return "other"


def job_records(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]


def startup_seconds(env: dict) -> tuple[float, float]:
    """(wall, CPU) seconds of a fresh interpreter importing what an evaluation job imports; best of 3."""
    best = (float("inf"), float("inf"))
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import nagl.cli.main, nagl.evaluate"], env=env, check=True)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        best = min(best, (wall, cpu))
    return best


def backbone_images_per_second(config: dict, threads: int = 2, batch: int = 16) -> float:
    """Forward throughput of the run's backbone on preprocessed random batches (after a warm-up)."""
    import numpy as np
    import torch

    from nagl.models.backbones import create_backbone

    torch.set_num_threads(threads)
    backbone = create_backbone(config.backbone, config.image_size)
    rng = np.random.default_rng(0)
    size = backbone.image_size
    images = torch.stack([backbone.preprocess(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
                          for _ in range(batch)])
    with torch.no_grad():
        backbone(images)
        start = time.perf_counter()
        for _ in range(3):
            backbone(images)
    return 3 * batch / (time.perf_counter() - start)


def training_step_seconds(config, scratch: Path) -> float:
    """Seconds inside the optimiser steps of every training of the run, retrained in-process.

    A step is the episode batch and its loss (``method.loss``), ``loss.backward()`` and
    ``optimiser.step()``; episode drawing, validation and checkpointing are left out.
    """
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    import nagl.training.loop as loop

    total = 0.0
    started: list[float] = []
    batch_type = loop.EpisodeBatch

    def timed_batch(*args, **kwargs):
        if torch.is_grad_enabled():  # validation builds its batches without gradients
            started.append(time.perf_counter())
        return batch_type(*args, **kwargs)

    def step_done(optimizer, args, kwargs) -> None:
        nonlocal total
        total += time.perf_counter() - started.pop()

    loop.EpisodeBatch = timed_batch
    hook = register_optimizer_step_post_hook(step_done)
    try:
        torch.set_num_threads(2)  # the train rule's threads
        for method in config.trainable_methods:
            for source in config.training_sources():
                for train_seed in config.training.seeds:
                    loop.train_from_config(config, method, source, train_seed,
                                           scratch / method / source / str(train_seed))
    finally:
        hook.remove()
        loop.EpisodeBatch = batch_type
    return total


def print_breakdown(records: list[dict], floors: dict[str, float], startup: tuple[float, float]) -> None:
    stages = {}
    for record in records:
        stages.setdefault(stage_of(record["command"]), []).append(record)
    print(f"per-job start-up (interpreter + CLI + nagl.evaluate imports): {startup[0]:.2f} s wall, "
          f"{startup[1]:.2f} s CPU; the start-up column is jobs x that CPU")
    print(f"{'stage':<9} {'jobs':>4} {'wall s':>8} {'CPU s':>8} {'user':>8} {'system':>7} {'peak RSS':>9} "
          f"{'minor faults':>13} {'start-up':>9} {'floor s':>8} {'x floor':>8}")
    totals = [0, 0.0, 0.0, 0.0, 0.0, 0, 0]
    for stage in [*STAGES, "other"]:
        jobs = stages.get(stage, [])
        if not jobs:
            continue
        seconds = sum(r["wall_s"] for r in jobs)
        user, system = sum(r["user_s"] for r in jobs), sum(r["system_s"] for r in jobs)
        faults = sum(r["minor_faults"] for r in jobs)
        peak = max(r["max_rss_kib"] for r in jobs) / 2**20
        floor = floors.get(stage)
        ratio = f"{seconds / floor:8.1f}" if floor else f"{'-':>8}"
        floor_text = f"{floor:8.1f}" if floor else f"{'-':>8}"
        print(f"{stage:<9} {len(jobs):>4} {seconds:8.1f} {user + system:8.1f} {user:8.1f} {system:7.1f} "
              f"{peak:7.2f} G {faults:13,d} {len(jobs) * startup[1]:8.1f}s {floor_text} {ratio}")
        for i, value in enumerate((len(jobs), seconds, user + system, user, system, faults)):
            totals[i] += value
    print(f"{'all jobs':<9} {totals[0]:>4} {totals[1]:8.1f} {totals[2]:8.1f} {totals[3]:8.1f} {totals[4]:7.1f} "
          f"{'':>9} {totals[5]:13,d} {totals[0] * startup[1]:8.1f}s")
    print("(wall s sums the jobs; peak RSS is the largest single job; x floor = the stage's wall s / its floor)")


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
    parser.add_argument("--registry", help="a dataset registry to use instead of config/datasets.yaml")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep the temporary project")
    parser.add_argument("--no-train-floor", action="store_true",
                        help="skip the training floor (it retrains every checkpoint in-process: hours for "
                             "config/full.yaml)")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="nagl-matrix-"))
    make_copy(root)
    if args.registry:
        shutil.copy2(args.registry, root / "config" / "datasets.yaml")
    env = {**os.environ, "NAGL_HOME": str(root), "NAGL_CACHE": str(root / ".cache" / "nagl")}
    command = [sys.executable, "-m", "nagl", "run", "--config", str(Path(args.config).resolve()),
               "--cores", str(args.cores)]
    jobs_folder = root / "job-times"

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    full_seconds, peak, code = run_measured(command, root, {**env, "NAGL_JOB_TIMES": str(jobs_folder)})
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    run_usage = {"user": after.ru_utime - before.ru_utime, "system": after.ru_stime - before.ru_stime,
                 "faults": after.ru_minflt - before.ru_minflt}
    run_usage["cpu"] = run_usage["user"] + run_usage["system"]
    if code:
        sys.exit(f"the full run failed (exit {code}); project kept at {root}")
    rerun_seconds, _, code = run_measured(command, root, env)

    config = load_config(root / args.config)
    with duckdb.connect(str(root / paths.database(config.results)), read_only=True) as con:
        cells, aliased = con.execute("SELECT count(*), count(alias_of) FROM runs").fetchone()
        images = con.execute("SELECT sum(n_images) FROM datasets").fetchone()[0]
        # An alias was not scored (it carries its canonical cell's timings): computed cells only.
        score_seconds = con.execute(
            "SELECT sum(n_queries / images_per_second) FROM runs WHERE alias_of IS NULL").fetchone()[0]
    # The reference-use checks score each abnormal-reference cell again with swapped references:
    # method forwards on cached features too, recorded per job (not in any cell's time).
    check_seconds = sum(json.loads(p.read_text()).get("check_score_seconds", 0.0)
                        for p in (root / config.results / "jobs").rglob("*.json"))
    computed = json.loads((root / paths.features_job(config.results, config.backbone)).read_text())["computed"]
    cached = sum(1 for _ in (root / ".cache" / "nagl" / "features").rglob("*.npy"))

    os.environ.update(env)  # the in-process measurements read this project's datasets and cache
    throughput = backbone_images_per_second(config)
    floors = {"features": computed / throughput, "evaluate": score_seconds + check_seconds}
    if not args.no_train_floor:
        floors["train"] = training_step_seconds(config, root / "floor-models")
    startup = startup_seconds(env)

    print(f"config:                     {args.config} ({args.cores} cores)")
    print(f"full matrix, clean start:   {full_seconds / 60:.1f} min ({full_seconds:.0f} s)")
    print(f"rerun, nothing changed:     {rerun_seconds:.1f} s (exit {code})")
    print(f"peak memory (process tree): {peak / 2**30:.2f} GiB")
    print(f"cells in the database:      {cells} ({cells - aliased} computed, {aliased} aliases of them)")
    print(f"images in the datasets:     {images}")
    print(f"backbone passes:            {computed} ({computed / images:.2f} per image; "
          f"{cached} feature files in the cache)")
    print(f"backbone throughput:        {throughput:.1f} images/s (batch 16, 2 threads, as the features rule)")
    print(f"evaluation floor:           {score_seconds:.1f} s scoring the computed cells + {check_seconds:.1f} s "
          "scoring their reference-use checks")
    print()
    print(f"whole clean run, exact:     {run_usage['cpu']:.0f} CPU s ({run_usage['user']:.0f} user, "
          f"{run_usage['system']:.0f} system), {run_usage['faults']:,d} minor page faults "
          "(nagl run, Snakemake and every job)")
    print()
    print_breakdown(job_records(jobs_folder), floors, startup)
    if args.keep:
        print(f"project kept at {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
