"""`nagl run` (the whole matrix through Snakemake) and `nagl step ...` (what its rules run)."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import typer
from rich.console import Console

from nagl.errors import NaglError

console = Console(stderr=True)

step_app = typer.Typer(help="Single workflow steps, as Snakemake's rules run them.", no_args_is_help=True)


def _threads(threads: int) -> None:
    """Set up a compute step's process: torch threads, and an allocator that keeps freed memory."""
    import torch

    torch.set_num_threads(max(1, threads))
    _retain_freed_memory()


def _retain_freed_memory() -> None:
    """Let glibc keep freed memory for the next allocation instead of returning it to the system.

    A step allocates and frees the same large blocks over and over (score blocks, pixel
    maps, the metrics' sort keys). By default glibc unmaps or trims them, and every
    4 KiB touched again is a page fault: most of an evaluation job's system time. The
    peak resident memory is unchanged (freed blocks are reused, not added). Elsewhere
    (not glibc) this does nothing.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):
        return
    if mallopt is not None:
        mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: trim the heap only above 1 GiB of free top
        mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: blocks up to 32 MiB (glibc's maximum) come from the heap


def _train_seed(text: str) -> int | None:
    """``--train-seed``: a whole number, or ``-`` (no checkpoint: a training-free method)."""
    if text == "-":
        return None
    if not text.isdigit():
        raise NaglError(f"--train-seed {text!r}: give a training seed (a whole number >= 0) or '-'")
    return int(text)


@step_app.command("features")
def step_features(
    datasets: list[str] = typer.Argument(..., help="dataset names"),
    config: Path = typer.Option(..., help="run config (JSON, written by the workflow)"),
    out: Path = typer.Option(..., help="the job's summary JSON (what was computed, how fast), written last"),
    threads: int = typer.Option(1, help="torch threads"),
) -> None:
    """Compute the patch features of every image of DATASETS into the feature cache: the default
    grid, and the union of the levels the config's methods read; then write each dataset's stamp.

    One process for every dataset, so the interpreter, torch and the backbone's weights are loaded
    once. A stamp holds what the features depend on (backbone, levels, the images' hashes), the
    same bytes for the same inputs; timings go to OUT.
    """
    from nagl.config import read_effective_config
    from nagl.data.layout import read_manifest
    from nagl.data.prepare import dataset_path
    from nagl.evaluate import feature_cache
    from nagl.io import atomic_write_json, stable_hash
    from nagl.methods import feature_levels
    from nagl.models.backbones import create_backbone, describe_backbone
    from nagl.paths import feature_stamp

    _threads(threads)
    settings = read_effective_config(config)
    backbone = create_backbone(settings.backbone, settings.image_size)
    levels = feature_levels(settings.methods, backbone)
    manifests = {name: read_manifest(dataset_path(name)) for name in datasets}
    listed = {name: [(str(path), str(sha)) for path, sha in
                     zip(manifest["image_path"], manifest["image_sha256"], strict=True)]
              for name, manifest in manifests.items()}
    images = [(dataset_path(name) / path, sha) for name, pairs in listed.items() for path, sha in pairs]
    start = time.perf_counter()
    computed = feature_cache(backbone).ensure([path for path, _ in images], [sha for _, sha in images],
                                              levels=levels)
    seconds = time.perf_counter() - start
    for name, pairs in listed.items():
        atomic_write_json(feature_stamp(settings.results, settings.backbone, name), {
            "dataset": name, "backbone_identity": backbone.identity, "backbone": describe_backbone(backbone),
            "levels": list(levels), "images": len(pairs), "images_hash": stable_hash(sorted(pairs))})
    atomic_write_json(out, {"datasets": {name: len(pairs) for name, pairs in listed.items()},
                            "backbone_identity": backbone.identity, "levels": list(levels),
                            "images": len(images), "computed": computed, "seconds": seconds,
                            "images_per_second": computed / seconds if computed else None})


@step_app.command("train")
def step_train(
    method: str = typer.Option(...),
    source: str = typer.Option(...),
    train_seed: int = typer.Option(..., help="training seed: validation split, initial weights, episode order"),
    config: Path = typer.Option(..., help="run config (JSON, written by the workflow)"),
    out: Path = typer.Option(..., help="model.json of the checkpoint folder"),
    threads: int = typer.Option(1, help="torch threads"),
) -> None:
    """Train METHOD on SOURCE with the config's training profile and TRAIN_SEED (source data only)."""
    from nagl.config import read_effective_config
    from nagl.training.loop import train_from_config

    _threads(threads)
    train_from_config(read_effective_config(config), method, source, train_seed, Path(out).parent)


@step_app.command("evaluate")
def step_evaluate(
    targets: list[str] = typer.Argument(..., help="target datasets, evaluated in turn"),
    method: str = typer.Option(...),
    source: str = typer.Option(..., help="source dataset, or '-' for training-free methods"),
    train_seed: str = typer.Option("-", help="training seed of the checkpoint, or '-' for training-free methods"),
    config: Path = typer.Option(..., help="run config (JSON, written by the workflow)"),
    out: Path = typer.Option(..., help="job summary JSON to write when done"),
    threads: int = typer.Option(1, help="torch threads"),
) -> None:
    """Evaluate every cell of (METHOD, SOURCE, TRAIN_SEED) on each of TARGETS; finished cells are skipped."""
    from nagl.config import read_effective_config
    from nagl.evaluate import Evaluator
    from nagl.io import atomic_write_json

    _threads(threads)
    start = time.perf_counter()
    settings = read_effective_config(config)
    seed = _train_seed(train_seed)
    cells, computed, aliases, per_target, check_seconds = [], [], [], {}, 0.0
    for target in targets:
        begin = time.perf_counter()
        evaluator = Evaluator(settings, method, source, target, Path(settings.results), seed)
        target_cells = evaluator.run()
        cells += target_cells
        computed += evaluator.computed
        aliases += evaluator.aliased
        check_seconds += evaluator.check_seconds
        per_target[target] = {"cells": len(target_cells), "computed": len(evaluator.computed),
                              "seconds": time.perf_counter() - begin}
    # `cells` (every cell of the job) is what ingest reads; `aliases` were recorded, not computed.
    atomic_write_json(out, {"method": method, "source": source, "train_seed": seed, "targets": list(targets),
                            "cells": cells, "computed": computed, "aliases": aliases, "per_target": per_target,
                            "check_score_seconds": check_seconds, "seconds": time.perf_counter() - start})


@step_app.command("ingest")
def step_ingest(
    jobs: list[Path] = typer.Argument(..., help="job summary JSON files of the evaluate rule"),
    config: Path = typer.Option(..., help="run config (JSON, written by the workflow)"),
    out: Path = typer.Option(..., help="the DuckDB file to (re)build"),
    stamp: Path | None = typer.Option(None, help="file to write once OUT is in place (the rule's output)"),
) -> None:
    """Load the cells listed by JOBS into a new database, atomically replacing OUT."""
    from nagl.config import read_effective_config
    from nagl.io import atomic_write_json
    from nagl.results.ingest import ingest_run

    summary = ingest_run(read_effective_config(config).as_dict(), jobs, out)
    if stamp is not None:
        atomic_write_json(stamp, summary)
    console.print(summary)


@step_app.command("report")
def step_report(
    db: Path = typer.Option(..., help="the results database"),
    out: Path = typer.Option(..., help="the HTML file to (re)build"),
    stamp: Path | None = typer.Option(None, help="file to write once OUT is in place (the rule's output)"),
) -> None:
    """Build the report, atomically replacing OUT (the database is only read)."""
    from nagl.io import atomic_write_json
    from nagl.report import build_report

    path = build_report(db, out)
    if stamp is not None:
        atomic_write_json(stamp, {"report": str(path), "db": str(db)})


@contextlib.contextmanager
def _exclusive_run(workdir: Path) -> Iterator[None]:
    """One `nagl run` per project at a time; lets us clear a stale Snakemake lock safely."""
    from nagl.cleanup import try_run_lock

    with try_run_lock(workdir) as alone:
        if not alone:
            raise NaglError(f"another `nagl run` (or `nagl datasets prepare`) is running in {workdir}; "
                            f"wait for it to finish")
        yield


def run_workflow(config_file: Path | None, cores: int, dry_run: bool, targets: list[str] | None = None,
                 workdir: Path | None = None, verbose: bool = False, progress_every: float = 10.0) -> dict:
    """Run (or dry-run) the Snakemake workflow through its Python API.

    Shows a progress display (see :mod:`nagl.cli.progress`) unless ``verbose``,
    which prints Snakemake's own log instead; that log is kept in ``<results>/logs/``.
    """
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import (
        ConfigSettings,
        DAGSettings,
        ExecutionSettings,
        OutputSettings,
        ResourceSettings,
    )
    from snakemake_interface_common.exceptions import WorkflowError

    from nagl.cleanup import clean_before_run
    from nagl.cli.progress import failure_hint, follow
    from nagl.config import load_config
    from nagl.paths import database, logs_dir
    from nagl.settings import project_dir

    workdir = (workdir or project_dir()).resolve()
    config_path = (config_file or workdir / "config" / "config.yaml").resolve()
    config = load_config(config_path)  # clear errors before Snakemake starts
    snakefile = workdir / "Snakefile"
    if not snakefile.is_file():
        raise NaglError(f"{snakefile} not found; run nagl from the project folder or set NAGL_HOME")
    with (_exclusive_run(workdir), SnakemakeApi(OutputSettings(printshellcmds=False, dryrun=dry_run)) as api,
          follow(None if dry_run else workdir / logs_dir(config.results), verbose or dry_run,
                 progress_every) as progress):
        if not dry_run:
            clean_before_run(config, workdir)  # temporaries of interrupted runs; ours are not made yet
        workflow = api.workflow(
            resource_settings=ResourceSettings(cores=cores, resources={"dvc": 1}),
            config_settings=ConfigSettings(configfiles=[config_path], replace_workflow_config=True),
            snakefile=snakefile, workdir=workdir)
        # force_incomplete: jobs of a killed run are redone (their finished cells are kept).
        dag = workflow.dag(DAGSettings(targets=frozenset(targets or ()), force_incomplete=True))
        if not dry_run:
            dag.unlock()  # a lock left by a killed run; no other run holds it (see _exclusive_run)
        try:
            dag.execute_workflow(executor="dryrun" if dry_run else "local",
                                 execution_settings=ExecutionSettings(keep_going=False))
        except WorkflowError as error:
            raise NaglError(f"the workflow stopped: {error}\n{failure_hint(progress)}Fix the cause and run "
                            f"`nagl run` again: finished work is kept.") from None
    return {"database": workdir / database(config.results), "report": workdir / config.report}


def register(app: typer.Typer) -> None:
    """Add `run` and the `step` group to the `nagl` app."""
    app.add_typer(step_app, name="step")

    @app.command("run")
    def run(
        config: Path | None = typer.Option(None, "--config", "-c",
                                              help="run config (default: config/config.yaml)"),
        cores: int = typer.Option(os.cpu_count() or 1, "--cores", "-j", help="CPU cores to use"),
        dry_run: bool = typer.Option(False, "--dry-run", "-n", help="only show what would run"),
        verbose: bool = typer.Option(False, "--verbose", "-v",
                                     help="show Snakemake's own log instead of the progress display"),
        progress_every: float = typer.Option(
            10.0, "--progress-every", min=0,
            help="seconds between progress lines when not on a terminal (CI, pipes)"),
    ) -> None:
        """Regenerate the whole matrix: datasets, features, training, evaluation, database, report."""
        paths = run_workflow(config, cores, dry_run, verbose=verbose, progress_every=progress_every)
        if dry_run:
            console.print("[bold]dry run:[/] nothing was executed")
        else:
            console.print(f"[bold green]done.[/] database: {paths['database']}\n      report:   {paths['report']}")
