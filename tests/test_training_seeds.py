"""Training seeds as a dimension of the matrix, and source-only checkpoint selection.

On real (small) embedded datasets with real effnet-lite0 features: a training seed
changes the checkpoint and the same seed reproduces it; the seed sets the validation
split, the initial weights and the episode order; selection by held-out source
AUROC never opens a file of a target dataset; ``runs.train_seed`` is NULL exactly
for training-free cells; the workflow plans one model per training seed.
"""

from __future__ import annotations

import builtins
import json
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from nagl import paths
from nagl.config import validate_config, write_effective_config
from nagl.data.layout import read_manifest
from nagl.errors import NaglError
from nagl.methods import create_method
from nagl.report.main_table import load_main_table
from nagl.training import loop
from nagl.training.episodes import split_source

REGISTRY = """
datasets:
  seed-source:
    kind: embedded
    domain: industrial-texture
    preset: textures
    categories: [brick, gravel]
    counts: {train_good: 8, test_good: 4, test_anomalous: 12}
  seed-target:
    kind: embedded
    domain: medical-microscopy
    preset: medical
    categories: [microscopy]
    counts: {train_good: 6, test_good: 3, test_anomalous: 4}
"""

CONFIG = {
    "backbone": "effnet-lite0", "image_size": 64, "eval_resolution": 32,
    "methods": ["nagl", "knn-normal"], "sources": ["seed-source"], "targets": ["seed-target"],
    "shots": {"k_normal": [1, 2], "k_abnormal": [0, 1]}, "seeds": [0, 1],
    "training": {"profile": "smoke", "seeds": [0, 1]},
}

# A short schedule that selects by held-out source AUROC (the embedded profile's rule).
SELECT_AUROC = {"select": "auroc", "epochs": 2, "episodes": 4, "batch": 2, "val_fraction": 0.25, "val_episodes": 4,
                "val_references": 3, "milestones": []}


@pytest.fixture
def prepared(project):
    """The project with both datasets prepared and their features in the cache."""
    from nagl.cli.run import step_features
    from nagl.data.prepare import prepare_dataset

    root = project(REGISTRY)
    config = validate_config(CONFIG)
    run_config = write_effective_config(config)
    for name in ("seed-source", "seed-target"):
        prepare_dataset(name, version=False)
    step_features(["seed-source", "seed-target"], config=run_config,
                  out=paths.features_job(config.results, config.backbone), threads=1)
    return root, config


def _train(seed: int, out: Path | None = None, **overrides):
    return loop.train_source("nagl", "seed-source", image_size=64, profile="embedded", seed=seed,
                             overrides={**SELECT_AUROC, **overrides}, out_dir=out, progress=False)


def test_the_training_seed_sets_the_checkpoint_split_weights_and_episodes(prepared, tmp_path, monkeypatch):
    root, _ = prepared
    first = _train(0, tmp_path / "a")
    again = _train(0, tmp_path / "b")
    _train(1, tmp_path / "c")
    weights = {name: (tmp_path / name / "weights.safetensors").read_bytes() for name in "abc"}
    assert weights["a"] == weights["b"]
    assert weights["a"] != weights["c"]
    info = json.loads((tmp_path / "c" / "model.json").read_text())
    assert info["train_seed"] == 1 and info["training"]["select"] == "auroc"
    assert first.metadata["training"]["n_selection_episodes"] > 0
    scores = [row["select_auroc"] for row in first.history[1:]]
    assert len(scores) == 2 and all(0.0 <= s <= 1.0 for s in scores)
    assert first.selected_epoch == 1 + int(np.argmax(scores))  # the epoch with the highest held-out AUROC
    assert again.history == first.history

    # The three random parts of training, each on its own.
    manifest = read_manifest(root / "datasets" / "seed-source")
    spec = first.method.batch_spec((1, 2), (1,))
    _, held_0, _ = split_source(manifest, spec, 0.25, 0, "seed-source")
    _, held_1, _ = split_source(manifest, spec, 0.25, 1, "seed-source")
    assert held_0.normals != held_1.normals  # the validation split
    initial_0 = create_method("nagl", 8, seed=0).state_dict()
    initial_1 = create_method("nagl", 8, seed=1).state_dict()
    assert any(not torch.equal(initial_0[k], initial_1[k]) for k in initial_0)  # the initial weights

    drawn: dict[int, list] = {}
    real_draw, real_split = loop.draw_batch, loop.split_source

    def record(*args, **kwargs):
        episodes = real_draw(*args, **kwargs)
        drawn[current].extend(episodes)
        return episodes

    monkeypatch.setattr(loop, "draw_batch", record)
    # The same split for every seed, so that only the episode generator can tell the seeds apart.
    monkeypatch.setattr(loop, "split_source", lambda m, s, f, seed, d: real_split(m, s, f, 0, d))
    for current in (0, 1):
        drawn[current] = []
        _train(current, select="last", val_fraction=0.0, val_references=0, val_episodes=0)
    assert len(drawn[0]) == len(drawn[1]) == 8
    assert drawn[0] != drawn[1]  # the episode order


def test_selection_never_opens_a_file_of_the_target(prepared, monkeypatch):
    root, _ = prepared
    target_dir = (root / "datasets" / "seed-target").resolve()
    target_shas = set(read_manifest(target_dir)["image_sha256"])
    source_shas = set(read_manifest(root / "datasets" / "seed-source")["image_sha256"])
    assert target_shas and not target_shas & source_shas

    opened: list[str] = []
    requested: set[str] = set()

    def recording(real):
        def wrapper(file, *args, **kwargs):
            if isinstance(file, (str, bytes, os.PathLike)):
                opened.append(str(Path(os.fsdecode(file)).resolve()))
            return real(file, *args, **kwargs)
        return wrapper

    def recording_method(real):
        def wrapper(self, *args, **kwargs):
            opened.append(str(Path(self).resolve()))
            return real(self, *args, **kwargs)
        return wrapper

    from PIL import Image

    from nagl.models.cache import FeatureCache

    real_load = FeatureCache.load

    def load(self, sha256s):
        requested.update(sha256s)
        return real_load(self, sha256s)

    monkeypatch.setattr(builtins, "open", recording(builtins.open))
    monkeypatch.setattr(Path, "open", recording_method(Path.open))
    monkeypatch.setattr(np, "load", recording(np.load))
    monkeypatch.setattr(pd, "read_parquet", recording(pd.read_parquet))
    monkeypatch.setattr(Image, "open", recording(Image.open))
    monkeypatch.setattr(FeatureCache, "load", load)
    result = _train(2)

    assert result.schedule.select == "auroc" and result.metadata["training"]["n_selection_episodes"] > 0
    assert any("seed-source" in path for path in opened) and requested  # the recording works
    assert not [p for p in opened if Path(p).is_relative_to(target_dir)]
    assert not requested & target_shas
    assert requested <= source_shas


def test_train_seed_column_and_one_model_per_training_seed(prepared):
    from nagl.evaluate import evaluate_job
    from nagl.io import atomic_write_json
    from nagl.results.ingest import ingest_run

    root, config = prepared
    jobs = []
    for train_seed in config.training.seeds:
        loop.train_from_config(config, "nagl", "seed-source", train_seed,
                               paths.model_dir(config.results, "nagl", config.backbone, "seed-source", train_seed))
    for method, source, train_seed in (("nagl", "seed-source", 0), ("nagl", "seed-source", 1),
                                       ("knn-normal", "-", None)):
        cells = evaluate_job(config, method, source, "seed-target", train_seed)
        job = paths.job_file(config.results, method, config.backbone, source, train_seed)
        atomic_write_json(job, {"cells": cells})
        jobs.append(job)
    with pytest.raises(NaglError, match="training seed"):
        evaluate_job(config, "nagl", "seed-source", "seed-target")
    ingest_run(config.as_dict(), jobs, paths.database(config.results))

    with duckdb.connect(str(root / paths.database(config.results)), read_only=True) as con:
        rows = con.execute("SELECT method, train_seed, COUNT(*), COUNT(DISTINCT checkpoint_hash) FROM runs "
                           "GROUP BY ALL ORDER BY ALL").fetchall()
        models = con.execute("SELECT method, source, train_seed FROM models ORDER BY ALL").fetchall()
        table = load_main_table(con)
    n_cells = len(config.shots.settings()) * len(config.seeds)  # one category
    n_normal_only = len([s for s in config.shots.settings() if s[1] == 0]) * len(config.seeds)  # knn-normal
    assert rows == [("knn-normal", None, n_normal_only, 0), ("nagl", 0, n_cells, 1), ("nagl", 1, n_cells, 1)]
    assert models == [("nagl", "seed-source", 0), ("nagl", "seed-source", 1)]

    # The main table keeps the spreads over training seeds and over reference seeds apart,
    # and shows nagl without abnormal references (weights unused) as knn-normal.
    for block in table.blocks:
        rows = {member: row for row in block.rows for member in row.members}
        trained = rows[("nagl", "effnet-lite0", 1)].cells["seed-target"]
        assert (trained.n_train, trained.n_ref) == (2, 2)
        assert trained.sd_train is not None and trained.sd_ref is not None
        free = rows[("knn-normal", "effnet-lite0", 0)]
        assert ("nagl", "effnet-lite0", 0) in free.members
        assert (free.cells["seed-target"].n_train, free.cells["seed-target"].sd_train) == (0, None)


def test_the_workflow_plans_one_model_per_training_seed(project):
    root = project(REGISTRY)
    config = root / "config" / "seeds.yaml"
    config.write_text(yaml.safe_dump({**CONFIG, "training": {"profile": "smoke", "seeds": [0, 1, 2]}}))
    done = subprocess.run([sys.executable, "-m", "snakemake", "--configfile", str(config), "--dry-run",
                           "--cores", "1", "--quiet", "rules"], cwd=root, capture_output=True, text=True,
                          env={**os.environ, "NAGL_HOME": str(root)})
    assert done.returncode == 0, done.stderr[-3000:]
    counts = dict(line.split()[:2] for line in done.stdout.splitlines()
                  if len(line.split()) == 2 and line.split()[1].isdigit())
    assert counts["train"] == "3"  # nagl x one source x three training seeds
    assert counts["evaluate"] == str(3 + 1)  # nagl per training seed, knn-normal once

    old = root / "config" / "old.yaml"
    old.write_text(yaml.safe_dump({**CONFIG, "training": {"profile": "smoke", "seed": 0}}))
    refused = subprocess.run([sys.executable, "-m", "snakemake", "--configfile", str(old), "--dry-run",
                              "--cores", "1"], cwd=root, capture_output=True, text=True,
                             env={**os.environ, "NAGL_HOME": str(root)})
    assert refused.returncode != 0 and "training.seeds" in refused.stdout + refused.stderr
