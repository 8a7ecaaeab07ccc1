"""Ingest: the one writer of the results database.

It gathers one run's finished cells, models, datasets and provenance, checks
every row against ``schema.sql`` (a bad file is reported by name), and builds a
new database under a temporary name beside the target that is then renamed
over it: a reader sees the old database or the new one, never a half-ingested
or missing file. In the workflow the rule's output is a stamp file
(:func:`nagl.io.stamp_path`), so Snakemake never deletes the database before
the ingest job runs.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from nagl import paths
from nagl.config import run_datasets
from nagl.data.layout import read_manifest
from nagl.data.prepare import dataset_content_hash, dataset_path
from nagl.data.registry import load_registry
from nagl.errors import NaglError
from nagl.io import atomic_path, read_json
from nagl.provenance import git_commit, now_utc, package_versions
from nagl.results.aliases import resolve_alias
from nagl.results.schema import (
    ARROW_TYPES,
    CELL_FILES,
    GALLERY_COLUMNS,
    REFERENCE_CHECK_COLUMNS,
    SCORE_COLUMNS,
    cell_key_path,
    check_gallery,
    check_reference_checks,
    check_run,
    check_scores,
    check_split,
    create_schema,
    metric_rows,
    schema_columns,
    table_row,
)


def _read_json(path: Path) -> Any:
    try:
        return read_json(path)
    except FileNotFoundError:
        raise NaglError(f"{path} is missing but the cell has run.json; delete the cell folder and rerun it") from None
    except (OSError, ValueError) as error:
        raise NaglError(f"{path} is not valid JSON ({error}); delete the cell folder and rerun it") from error


def _read_parquet(path: Path) -> pa.Table:
    try:
        # ParquetFile without threads: several times faster than read_table on small files.
        with pq.ParquetFile(path) as handle:
            return handle.read(use_threads=False)
    except FileNotFoundError:
        raise NaglError(f"{path} is missing but the cell has run.json; delete the cell folder and rerun it") from None
    except (OSError, pa.ArrowException) as error:
        raise NaglError(f"{path} is not a readable parquet file ({error}); delete the cell folder and rerun it") from error


def _with_run_id(table: pa.Table, run_id: str) -> pa.Table:
    return table.append_column("run_id", pa.array([run_id] * table.num_rows, pa.string()))


def _split_rows(split_json: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Rows of ``reference_splits`` from a verified split.json: the references, in nesting order."""
    rows = []
    for role in ("normal", "abnormal"):
        for position, ref in enumerate(split_json[role]):
            rows.append(
                {
                    "split_hash": split_json["hash"],
                    "target": split_json["dataset"],
                    "category": split_json["category"],
                    "seed": split_json["seed"],
                    "role": role,
                    "position": position,
                    "image_path": ref["image_path"],
                    "image_sha256": ref["image_sha256"],
                    "mask_path": ref["mask_path"],
                }
            )
    return rows


class _Collected:
    """Rows of every table, gathered from the files before the database is built."""

    def __init__(self) -> None:
        self.runs: list[dict[str, Any]] = []
        self.metrics: list[dict[str, Any]] = []
        self.scores: list[pa.Table] = []
        self.gallery: list[pa.Table] = []
        self.reference_checks: list[pa.Table] = []
        self.splits: dict[str, list[dict[str, Any]]] = {}
        self.run_files: dict[str, Path] = {}
        self.aliases: list[tuple[Path, dict[str, Any]]] = []
        self.gallery_of: dict[str, pa.Table] = {}
        self.unfinished = 0

    def add_cell(self, folder: Path, cells_root: Path) -> None:
        run_file = folder / "run.json"
        obj = _read_json(run_file)
        if isinstance(obj, dict) and obj.get("alias_of"):
            # Resolved once every computed cell is read (nagl.results.aliases).
            self.aliases.append((folder, obj))
            return
        run = table_row("runs", obj, str(run_file))
        check_run(run, str(run_file))
        self._check_place(folder, cells_root, run, run_file)
        self.add_computed(folder, run)

    def _check_place(self, folder: Path, cells_root: Path, run: Mapping[str, Any], run_file: Path) -> None:
        try:
            relative = folder.resolve().relative_to(cells_root.resolve())
        except ValueError:
            relative = None
        expected = cell_key_path(run)
        if relative != expected:
            raise NaglError(
                f"{run_file}: the cell's key belongs in cells/{expected.as_posix()}, not in "
                f"{folder}; the folder was moved or copied: delete it and rerun the evaluation"
            )
        run_id = run["run_id"]
        if run_id in self.run_files:
            raise NaglError(f"{run_file} and {self.run_files[run_id]} have the same run_id {run_id}; delete one of them")
        self.run_files[run_id] = run_file

    def add_computed(self, folder: Path, run: dict[str, Any]) -> None:
        run_id = run["run_id"]
        self.metrics += metric_rows(run_id, _read_json(folder / "metrics.json"), str(folder / "metrics.json"))
        scores = check_scores(_read_parquet(folder / "scores.parquet"), run, str(folder / "scores.parquet"))
        self.scores.append(_with_run_id(scores, run_id))
        self._add_split(folder / "split.json", run)
        gallery_file = folder / "gallery.parquet"
        if gallery_file.is_file():
            gallery = check_gallery(_read_parquet(gallery_file), str(gallery_file))
            self.gallery_of[run_id] = gallery
            self.gallery.append(_with_run_id(gallery, run_id))
        checks_file = folder / "reference_checks.parquet"
        if checks_file.is_file():
            checks = check_reference_checks(_read_parquet(checks_file), run, str(checks_file))
            self.reference_checks.append(_with_run_id(checks, run_id))
        self.runs.append(run)

    def resolve_aliases(self, cells_root: Path) -> None:
        """Rows of the alias cells: their own key, the canonical cell's metrics and timings (and gallery)."""
        computed = {run["run_id"]: run for run in self.runs}
        metrics_of: dict[str, list[dict[str, Any]]] = {}
        for row in self.metrics:
            metrics_of.setdefault(row["run_id"], []).append(row)
        for folder, obj in self.aliases:
            run_file = folder / "run.json"
            canonical = computed.get(obj["alias_of"])
            if canonical is None:
                raise NaglError(f"{run_file}: its canonical cell {obj['alias_of']} is not among the run's finished "
                                f"cells; rerun the evaluation job that computes it (see docs/architecture.md)")
            run = table_row("runs", resolve_alias(obj, canonical, str(run_file)), str(run_file))
            check_run(run, str(run_file))
            self._check_place(folder, cells_root, run, run_file)
            self.metrics += [{**row, "run_id": run["run_id"]} for row in metrics_of[canonical["run_id"]]]
            if obj.get("gallery") and canonical["run_id"] in self.gallery_of:
                self.gallery.append(_with_run_id(self.gallery_of[canonical["run_id"]], run["run_id"]))
            self.runs.append(run)

    def _add_split(self, path: Path, run: Mapping[str, Any]) -> None:
        obj = _read_json(path)
        check_split(obj, run, str(path))
        if obj["hash"] not in self.splits:  # many cells share one split
            self.splits[obj["hash"]] = _split_rows(obj)


def _cell_folders(results_dir: Path, cell_dirs: Iterable[str | os.PathLike] | None) -> list[Path]:
    if cell_dirs is not None:
        return sorted({Path(folder) for folder in cell_dirs})
    folders = []
    for folder, _, files in os.walk(paths.cells_dir(results_dir)):
        if any(name in files for name in CELL_FILES):
            folders.append(Path(folder))
    return sorted(folders)


def _model_rows(results_dir: Path) -> list[dict[str, Any]]:
    rows, seen = [], {}
    models_root = results_dir / "models"
    files = sorted(models_root.rglob("model.json")) if models_root.is_dir() else []
    for path in files:
        row = table_row("models", _read_json(path), str(path))
        key = (row["method"], row["backbone"], row["source"], row["train_seed"])
        if key in seen:
            raise NaglError(f"{path} and {seen[key]} describe the same model {key}; delete one of them")
        seen[key] = path
        rows.append(row)
    return rows


def _dataset_rows(datasets: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    rows, names = [], set()
    for index, obj in enumerate(datasets):
        row = table_row("datasets", obj, f"datasets row {index}", extra_ok=False)
        if row["name"] in names:
            raise NaglError(f"datasets row {index}: dataset {row['name']!r} is listed twice")
        names.add(row["name"])
        rows.append(row)
    return rows


def _provenance_rows(provenance: Mapping[str, str]) -> list[dict[str, str]]:
    for key, value in provenance.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise NaglError(f"provenance {key!r}: keys and values must be strings, got {value!r}")
    return [{"key": key, "value": provenance[key]} for key in sorted(provenance)]


def _arrow_rows(table: str, rows: list[dict[str, Any]]) -> pa.Table:
    columns = schema_columns()[table]
    unmapped = [f"{name} {data_type}" for name, data_type, _ in columns if data_type not in ARROW_TYPES]
    if unmapped:
        raise NaglError(f"schema.sql: {table} has columns of types ingest does not load ({', '.join(unmapped)}); "
                        "add the type to ARROW_TYPES in nagl/results/schema.py")
    schema = pa.schema([(name, ARROW_TYPES[data_type]) for name, data_type, _ in columns])
    return pa.Table.from_pylist(rows, schema=schema)


def _insert(con: duckdb.DuckDBPyConnection, table: str, data: pa.Table) -> None:
    if data.num_rows == 0:
        return
    con.register("batch", data)
    try:
        con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM batch")
    finally:
        con.unregister("batch")


def _concat(tables: list[pa.Table], columns: Mapping[str, pa.DataType]) -> pa.Table:
    if not tables:
        return pa.table({name: pa.array([], kind) for name, kind in {**columns, "run_id": pa.string()}.items()})
    return pa.concat_tables(tables)


def ingest(
    results_dir: str | os.PathLike,
    db_path: str | os.PathLike,
    datasets: list[dict],
    provenance: dict[str, str],
    cell_dirs: Iterable[str | os.PathLike] | None = None,
) -> dict[str, Any]:
    """Build the results database from the finished cells, models, datasets and provenance.

    Cells are the folders under ``results_dir/cells`` (or exactly ``cell_dirs``);
    one without ``run.json`` is unfinished and skipped. Models are
    ``results_dir/models/**/model.json``. The new database replaces ``db_path``
    atomically. Returns the number of rows of each table (for ``reference_splits``:
    the number of distinct splits) and of unfinished cells skipped.
    """
    results_dir = Path(results_dir)
    db_path = Path(db_path)
    collected = _Collected()
    cells_root = paths.cells_dir(results_dir)
    for folder in _cell_folders(results_dir, cell_dirs):
        if (folder / "run.json").is_file():
            collected.add_cell(folder, cells_root)
        else:
            collected.unfinished += 1
    collected.resolve_aliases(cells_root)
    tables = {
        "runs": _arrow_rows("runs", collected.runs),
        "metrics": _arrow_rows("metrics", collected.metrics),
        "scores": _concat(collected.scores, SCORE_COLUMNS),
        "reference_splits": _arrow_rows("reference_splits", [r for rows in collected.splits.values() for r in rows]),
        "models": _arrow_rows("models", _model_rows(results_dir)),
        "datasets": _arrow_rows("datasets", _dataset_rows(datasets)),
        "gallery": _concat(collected.gallery, GALLERY_COLUMNS),
        "reference_checks": _concat(collected.reference_checks, REFERENCE_CHECK_COLUMNS),
        "provenance": _arrow_rows("provenance", _provenance_rows(provenance)),
    }

    with atomic_path(db_path) as tmp:
        tmp.unlink()  # DuckDB creates the file itself; it refuses an empty one
        wal = tmp.with_name(tmp.name + ".wal")
        try:
            con = duckdb.connect(str(tmp))
            try:
                create_schema(con)
                for table, data in tables.items():
                    _insert(con, table, data)
            except duckdb.Error as error:
                raise NaglError(f"building the results database {db_path} failed: {error}") from error
            finally:
                con.close()
        finally:
            wal.unlink(missing_ok=True)

    summary: dict[str, Any] = {"db": str(db_path)}
    summary.update({table: data.num_rows for table, data in tables.items()})
    summary["reference_splits"] = len(collected.splits)
    summary["unfinished"] = collected.unfinished
    summary["aliases"] = len(collected.aliases)
    return summary


# ------------------------------------------------------- one run of the workflow --


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


def run_provenance(config: dict) -> dict[str, str]:
    """Key/value rows of the ``provenance`` table: versions, git commit, ingest time, the config."""
    values = {f"version.{name}": version for name, version in package_versions().items()}
    values.update({"git_commit": git_commit() or "not a git checkout", "ingested_at": now_utc(),
                   "config": yaml.safe_dump(config, sort_keys=True)})
    return values


def ingest_run(config: dict, job_files: list[Path], db_path: Path) -> dict:
    """Rebuild ``db_path`` from the cells that the given evaluation jobs list."""
    cells = [Path(cell) for job in sorted(job_files) for cell in read_json(job)["cells"]]
    return ingest(Path(config["results"]), Path(db_path), dataset_rows(run_datasets(config)),
                  run_provenance(config), cell_dirs=cells)
