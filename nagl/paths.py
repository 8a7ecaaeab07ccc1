"""Where a run's files are: the one place that spells out result paths.

Both the Python steps and the workflow (``workflow/rules/common.smk``) build paths
with these functions; the rules pass Snakemake wildcards (``"{method}"``) as the
arguments. ``results`` is the run's results folder (the config's ``results``).
``<train seed>`` is the training seed of a trained method's checkpoint, and ``-``
for a training-free method (as its source is ``-``).

    <results>/features/<backbone>/<dataset>.json            feature stamp
    <results>/features/<backbone>.json                      the features job's summary
    <results>/models/<method>/<backbone>/<source>/<train seed>/     model folder (model.json)
    <results>/jobs/<method>/<backbone>/<source>/<train seed>/<target>.json  job file
    <results>/cells/<method>/<backbone>/<source>/<train seed>/<target>/<category>/n<k>a<k>s<seed>/
                                        (``...s<seed>-reference-code/``: the reference-code protocol)
    <results>/benchmark.duckdb                              database
    <results>/run-config.json                               the validated run config
    <results>/logs/<step>/<name>.log
    <results>/benchmarks/<rule>/<name>.tsv                  a job's benchmark record
"""

from __future__ import annotations

from pathlib import Path

DATABASE_FILE = "benchmark.duckdb"
MODEL_FILE = "model.json"  # written last into a model folder: marks a complete checkpoint
DEFAULT_REPORT = "reports/leaderboard.html"


def dataset_manifest(dataset: str, datasets: str | Path = "datasets") -> Path:
    """A prepared dataset's manifest (its presence marks a prepared dataset)."""
    return Path(datasets) / dataset / "manifest.parquet"


def feature_stamp(results: str | Path, backbone: str, dataset: str) -> Path:
    """Written when every image of ``dataset`` has features of ``backbone`` in the cache."""
    return Path(results) / "features" / backbone / f"{dataset}.json"


def features_job(results: str | Path, backbone: str) -> Path:
    """What the one features job of a run computed (images, backbone passes, seconds); read by no rule."""
    return Path(results) / "features" / f"{backbone}.json"


NO_TRAIN_SEED = "-"  # the train-seed folder of a training-free method


def train_seed_part(train_seed: int | str | None) -> str:
    """The folder name of a training seed: the number, or ``-`` (``None``: training-free)."""
    return NO_TRAIN_SEED if train_seed is None else str(train_seed)


def model_dir(results: str | Path, method: str, backbone: str, source: str, train_seed: int | str) -> Path:
    return Path(results) / "models" / method / backbone / source / train_seed_part(train_seed)


def model_file(results: str | Path, method: str, backbone: str, source: str, train_seed: int | str) -> Path:
    return model_dir(results, method, backbone, source, train_seed) / MODEL_FILE


def job_file(results: str | Path, method: str, backbone: str, source: str, train_seed: int | str | None) -> Path:
    """The summary of one (method, source, train seed) evaluation job, over all its targets: the cells it wrote."""
    return Path(results) / "jobs" / method / backbone / source / f"{train_seed_part(train_seed)}.json"


def cells_dir(results: str | Path) -> Path:
    """The root below which every evaluation cell has its folder."""
    return Path(results) / "cells"


def cell_dir(results: str | Path, method: str, backbone: str, source: str, target: str, category: str,
             k_normal: int, k_abnormal: int, seed: int, train_seed: int | None, protocol: str = "clean") -> Path:
    """A cell's folder; a cell of another protocol than ``clean`` gets the protocol as a suffix."""
    leaf = f"n{k_normal}a{k_abnormal}s{seed}" + ("" if protocol == "clean" else f"-{protocol}")
    return cells_dir(results) / method / backbone / source / train_seed_part(train_seed) / target / category / leaf


def database(results: str | Path) -> Path:
    return Path(results) / DATABASE_FILE


def run_config(results: str | Path) -> Path:
    return Path(results) / "run-config.json"


def logs_dir(results: str | Path) -> Path:
    return Path(results) / "logs"


def log_file(results: str | Path, step: str, name: str) -> Path:
    return logs_dir(results) / step / f"{name}.log"


def benchmark_file(results: str | Path, rule: str, name: str) -> Path:
    """A job's Snakemake ``benchmark:`` record (wall time, peak memory): read by scripts/rule-resources.py."""
    return Path(results) / "benchmarks" / rule / f"{name}.tsv"
