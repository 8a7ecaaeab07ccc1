"""Gathering one run's results into the database: cells, models, datasets, provenance."""

from __future__ import annotations

from pathlib import Path

import yaml

from nagl.config import run_datasets
from nagl.data.layout import read_manifest
from nagl.data.prepare import dataset_content_hash, dataset_path
from nagl.data.registry import load_registry
from nagl.io import read_json
from nagl.provenance import git_commit, now_utc, package_versions
from nagl.results.db import ingest


def dataset_rows(names: list[str]) -> list[dict]:
    """Rows of the ``datasets`` table for the run's datasets."""
    registry = load_registry()
    rows = []
    for name in sorted(names):
        manifest = read_manifest(dataset_path(name))
        rows.append({
            "name": name, "domain": registry[name].domain, "content_hash": dataset_content_hash(name),
            "n_categories": int(manifest["category"].nunique()), "n_images": len(manifest),
            "n_anomalous": int(manifest["label"].sum()),
            "has_masks": bool(manifest["mask_path"].notna().any()),
            "anomaly": registry[name].anomaly, "licence": registry[name].licence,
        })
    return rows


def provenance(config: dict) -> dict[str, str]:
    values = {f"version.{name}": version for name, version in package_versions().items()}
    values.update({"git_commit": git_commit() or "not a git checkout", "ingested_at": now_utc(),
                   "config": yaml.safe_dump(config, sort_keys=True)})
    return values


def ingest_run(config: dict, job_files: list[Path], db_path: Path) -> dict:
    """Rebuild ``db_path`` from the cells that the given evaluation jobs list."""
    cells = [Path(cell) for job in sorted(job_files) for cell in read_json(job)["cells"]]
    return ingest(Path(config["results"]), Path(db_path), dataset_rows(run_datasets(config)),
                  provenance(config), cell_dirs=cells)
