"""The results database: writing evaluation cells, ingesting them into DuckDB, read-only queries.

A cell folder (docs/architecture.md, "Evaluation cells") holds ``metrics.json``,
``scores.parquet``, ``split.json``, optionally ``gallery.parquet``, and ``run.json``
(the cell's ``runs`` row), written last: a folder without ``run.json`` is unfinished.

``ingest`` never updates a database in place: it builds a new file under a
temporary name beside the target and renames it over it, so a reader sees either
the old database or the new one, never a half-ingested or broken file. Every row
is checked against the column types of ``schema.sql`` before anything is written,
and a bad file is reported by name.
"""

from __future__ import annotations

import datetime as _dt
import functools
import math
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from nagl.errors import NaglError
from nagl.io import atomic_path, atomic_write_json, read_json
from nagl.metrics import IMAGE_METRICS, PIXEL_METRICS
from nagl.protocol import verify_split_json

SCHEMA_PATH = Path(__file__).with_name("schema.sql")
CELL_FILES = ("metrics.json", "scores.parquet", "split.json", "gallery.parquet", "run.json")
METRIC_NAMES = {"image": IMAGE_METRICS, "pixel": PIXEL_METRICS}
SCORE_COLUMNS = {"image_path": pa.string(), "defect_type": pa.string(), "label": pa.int32(), "score": pa.float64()}
GALLERY_COLUMNS = {
    "image_path": pa.string(),
    "label": pa.int32(),
    "image_png": pa.binary(),
    "mask_png": pa.binary(),
    "map_png": pa.binary(),
}
_ARROW_TYPES = {
    "VARCHAR": pa.string(),
    "INTEGER": pa.int32(),
    "BIGINT": pa.int64(),
    "DOUBLE": pa.float64(),
    "BOOLEAN": pa.bool_(),
    "TIMESTAMP": pa.timestamp("us"),
    "BLOB": pa.binary(),
}


def create_schema(con: duckdb.DuckDBPyConnection) -> None:
    """Create every table and view of ``schema.sql`` in an empty database."""
    con.execute(SCHEMA_PATH.read_text(encoding="utf-8"))


@functools.lru_cache(maxsize=1)
def _schema_columns() -> dict[str, list[tuple[str, str, bool]]]:
    """(name, type, nullable) of every table column, read from schema.sql itself."""
    con = duckdb.connect()
    try:
        create_schema(con)
        rows = con.execute(
            "SELECT c.table_name, c.column_name, c.data_type, c.is_nullable = 'YES' "
            "FROM information_schema.columns c JOIN information_schema.tables t "
            "ON c.table_name = t.table_name AND c.table_schema = t.table_schema "
            "WHERE t.table_type = 'BASE TABLE' ORDER BY c.table_name, c.ordinal_position"
        ).fetchall()
    finally:
        con.close()
    tables: dict[str, list[tuple[str, str, bool]]] = {}
    for table, column, data_type, nullable in rows:
        tables.setdefault(table, []).append((column, data_type, bool(nullable)))
    return tables


def _plain(value: Any) -> Any:
    """numpy scalars to Python values, datetimes to ISO text: what JSON can hold."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (_dt.datetime, pd.Timestamp)):
        return value.isoformat()
    return value


def _timestamp(value: Any) -> _dt.datetime | None:
    """An ISO 8601 timestamp as naive UTC (the TIMESTAMP columns hold UTC)."""
    try:
        moment = _dt.datetime.fromisoformat(value) if isinstance(value, str) else value
    except ValueError:
        return None
    if not isinstance(moment, _dt.datetime):
        return None
    if moment.tzinfo is not None:
        moment = moment.astimezone(_dt.UTC).replace(tzinfo=None)
    return moment


def _check_value(value: Any, data_type: str) -> Any:
    """The value as stored, or raise ValueError naming the expected type."""
    if data_type in ("INTEGER", "BIGINT"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError("an integer")
        return value
    if data_type == "DOUBLE":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError("a finite number")
        return float(value)
    if data_type == "BOOLEAN":
        if not isinstance(value, bool):
            raise ValueError("true or false")
        return value
    if data_type == "VARCHAR":
        if not isinstance(value, str):
            raise ValueError("a string")
        return value
    if data_type == "TIMESTAMP":
        moment = _timestamp(value)
        if moment is None:
            raise ValueError("an ISO 8601 timestamp")
        return moment
    return value


def _table_row(table: str, obj: Any, source: str, extra_ok: bool = True) -> dict[str, Any]:
    """Check one row against the table's columns; every column must be present (nullable ones may be null)."""
    if not isinstance(obj, Mapping):
        raise NaglError(f"{source}: expected a JSON object (a row of `{table}`), got {type(obj).__name__}")
    columns = _schema_columns()[table]
    missing = [name for name, _, _ in columns if name not in obj]
    if missing:
        raise NaglError(f"{source}: missing {', '.join(missing)} (columns of `{table}`); rerun the step that wrote it")
    if not extra_ok:
        extra = sorted(set(obj) - {name for name, _, _ in columns})
        if extra:
            raise NaglError(f"{source}: unknown keys {', '.join(extra)} (not columns of `{table}`)")
    row = {}
    for name, data_type, nullable in columns:
        value = _plain(obj[name])
        if value is None:
            if not nullable:
                raise NaglError(f"{source}: `{name}` must not be null (column of `{table}`)")
            row[name] = None
            continue
        try:
            row[name] = _check_value(value, data_type)
        except ValueError as expected:
            raise NaglError(f"{source}: `{name}` must be {expected}, got {value!r}") from None
    return row


def _metric_rows(run_id: str, metrics: Any, source: str) -> list[dict[str, Any]]:
    """``{"image": {...}, "pixel": {...}}`` -> rows of ``metrics``; values are numbers in [0, 1] or null."""
    if not isinstance(metrics, Mapping) or set(metrics) != set(METRIC_NAMES):
        raise NaglError(f"{source}: expected an object with exactly the keys 'image' and 'pixel'")
    rows = []
    for level, names in METRIC_NAMES.items():
        values = metrics[level]
        if not isinstance(values, Mapping) or set(values) != set(names):
            raise NaglError(f"{source}: `{level}` must hold exactly {', '.join(names)}")
        for name in names:
            value = _plain(values[name])
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0
            ):
                raise NaglError(f"{source}: {level} {name} must be a number in [0, 1] or null, got {value!r}")
            rows.append({"run_id": run_id, "level": level, "metric": name, "value": None if value is None else float(value)})
    return rows


def _typed_table(frame: pa.Table, columns: Mapping[str, pa.DataType], source: str) -> pa.Table:
    """The columns of a parquet table in a fixed order and type, or NaglError naming the file."""
    missing = [name for name in columns if name not in frame.column_names]
    if missing:
        raise NaglError(f"{source}: missing columns {', '.join(missing)}; rerun the evaluation that wrote it")
    try:
        return pa.table({name: frame.column(name).cast(kind) for name, kind in columns.items()})
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as error:
        raise NaglError(f"{source}: a column has the wrong type ({error}); rerun the evaluation") from error


def _check_scores(scores: pa.Table, run: Mapping[str, Any], source: str) -> pa.Table:
    scores = _typed_table(scores, SCORE_COLUMNS, source)
    for name in SCORE_COLUMNS:
        if scores.column(name).null_count:
            raise NaglError(f"{source}: `{name}` has null values")
    labels = scores.column("label").to_numpy()
    values = scores.column("score").to_numpy()
    if not np.isin(labels, (0, 1)).all():
        raise NaglError(f"{source}: labels must be 0 or 1")
    if not np.isfinite(values).all():
        raise NaglError(f"{source}: scores contain NaN or infinite values")
    if len(labels) != run["n_queries"] or int(labels.sum()) != run["n_anomalous_queries"]:
        raise NaglError(
            f"{source}: {len(labels)} scores ({int(labels.sum())} anomalous) but run.json records "
            f"{run['n_queries']} queries ({run['n_anomalous_queries']} anomalous); rerun the cell"
        )
    return scores


def _check_gallery(gallery: pa.Table, source: str) -> pa.Table:
    gallery = _typed_table(gallery, GALLERY_COLUMNS, source)
    for name in ("image_path", "label", "image_png", "map_png"):
        if gallery.column(name).null_count:
            raise NaglError(f"{source}: `{name}` has null values")
    return gallery


def _check_split(split_json: Any, run: Mapping[str, Any], source: str) -> None:
    """A valid split.json whose hash is the run's split_hash and whose (target, category, seed) is the run's."""
    split_hash = verify_split_json(split_json, source)
    if split_hash != run["split_hash"]:
        raise NaglError(f"{source}: split hash {split_hash[:16]}... differs from run.json's split_hash; rerun the cell")
    key = (split_json["dataset"], split_json["category"], split_json["seed"])
    if key != (run["target"], run["category"], run["seed"]):
        raise NaglError(
            f"{source}: the split is of {key[0]}/{key[1]} seed {key[2]}, but the cell is "
            f"{run['target']}/{run['category']} seed {run['seed']}; rerun the cell"
        )


def cell_dir(results_dir: Path, run: Mapping[str, Any]) -> Path:
    """``results/cells/<method>/<backbone>/<source>/<target>/<category>/n<kn>a<ka>s<seed>``."""
    return (
        Path(results_dir) / "cells" / run["method"] / run["backbone"] / run["source"] / run["target"]
        / run["category"] / f"n{run['k_normal']}a{run['k_abnormal']}s{run['seed']}"
    )


def _cell_key_path(run: Mapping[str, Any]) -> Path:
    return cell_dir(Path("."), run).relative_to("cells")


def _check_run(run: dict[str, Any], source: str) -> None:
    if run["in_domain"] != (run["source"] == run["target"]):
        raise NaglError(f"{source}: in_domain must be true exactly when source == target")


def _write_parquet(path: Path, table: pa.Table) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def write_cell(
    cell_dir: str | os.PathLike,
    run_row: Mapping[str, Any],
    metrics: Mapping[str, Any],
    scores_df: pd.DataFrame,
    split_json: Mapping[str, Any],
    gallery_df: pd.DataFrame | None = None,
) -> None:
    """Write one evaluation cell; every file atomically, ``run.json`` last.

    The inputs are checked as ``ingest`` will check them, so a bad cell fails here
    rather than at ingest time. An earlier ``run.json`` is removed first, so a
    rewrite that stops halfway leaves an unfinished cell, never a stale one.
    """
    folder = Path(cell_dir)
    run_file = folder / "run.json"
    run = _table_row("runs", run_row, str(run_file))
    _check_run(run, str(run_file))
    expected = _cell_key_path(run)
    if folder.parts[-len(expected.parts):] != expected.parts:
        raise NaglError(f"{folder}: a cell with this key must be written to results/cells/{expected.as_posix()} (see cell_dir)")
    metric_rows = _metric_rows(run["run_id"], metrics, str(folder / "metrics.json"))
    scores = _check_scores(pa.Table.from_pandas(scores_df, preserve_index=False), run, str(folder / "scores.parquet"))
    _check_split(split_json, run, str(folder / "split.json"))
    gallery = None
    if gallery_df is not None:
        gallery = _check_gallery(pa.Table.from_pandas(gallery_df, preserve_index=False), str(folder / "gallery.parquet"))

    folder.mkdir(parents=True, exist_ok=True)
    run_file.unlink(missing_ok=True)
    metrics_json = {level: {} for level in METRIC_NAMES}
    for row in metric_rows:
        metrics_json[row["level"]][row["metric"]] = row["value"]
    atomic_write_json(folder / "metrics.json", metrics_json)
    _write_parquet(folder / "scores.parquet", scores)
    atomic_write_json(folder / "split.json", split_json)
    if gallery is not None:
        _write_parquet(folder / "gallery.parquet", gallery)
    else:
        (folder / "gallery.parquet").unlink(missing_ok=True)
    atomic_write_json(run_file, {name: _plain(run_row[name]) for name in run})


# -------------------------------------------------------------------- ingest --


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
        self.splits: dict[str, list[dict[str, Any]]] = {}
        self.run_files: dict[str, Path] = {}
        self.unfinished = 0

    def add_cell(self, folder: Path, cells_root: Path) -> None:
        run_file = folder / "run.json"
        run = _table_row("runs", _read_json(run_file), str(run_file))
        _check_run(run, str(run_file))
        try:
            relative = folder.resolve().relative_to(cells_root.resolve())
        except ValueError:
            relative = None
        expected = _cell_key_path(run)
        if relative != expected:
            raise NaglError(
                f"{run_file}: the cell's key belongs in cells/{expected.as_posix()}, not in "
                f"{folder}; the folder was moved or copied: delete it and rerun the evaluation"
            )
        run_id = run["run_id"]
        if run_id in self.run_files:
            raise NaglError(f"{run_file} and {self.run_files[run_id]} have the same run_id {run_id}; delete one of them")
        self.run_files[run_id] = run_file

        self.metrics += _metric_rows(run_id, _read_json(folder / "metrics.json"), str(folder / "metrics.json"))
        scores = _check_scores(_read_parquet(folder / "scores.parquet"), run, str(folder / "scores.parquet"))
        self.scores.append(_with_run_id(scores, run_id))
        self._add_split(folder / "split.json", run)
        gallery_file = folder / "gallery.parquet"
        if gallery_file.is_file():
            self.gallery.append(_with_run_id(_check_gallery(_read_parquet(gallery_file), str(gallery_file)), run_id))
        self.runs.append(run)

    def _add_split(self, path: Path, run: Mapping[str, Any]) -> None:
        obj = _read_json(path)
        _check_split(obj, run, str(path))
        if obj["hash"] not in self.splits:  # many cells share one split
            self.splits[obj["hash"]] = _split_rows(obj)


def _cell_folders(results_dir: Path, cell_dirs: Iterable[str | os.PathLike] | None) -> list[Path]:
    if cell_dirs is not None:
        return sorted({Path(folder) for folder in cell_dirs})
    folders = []
    for folder, _, files in os.walk(results_dir / "cells"):
        if any(name in files for name in CELL_FILES):
            folders.append(Path(folder))
    return sorted(folders)


def _model_rows(results_dir: Path) -> list[dict[str, Any]]:
    rows, seen = [], {}
    models_root = results_dir / "models"
    files = sorted(models_root.rglob("model.json")) if models_root.is_dir() else []
    for path in files:
        row = _table_row("models", _read_json(path), str(path))
        key = (row["method"], row["backbone"], row["source"])
        if key in seen:
            raise NaglError(f"{path} and {seen[key]} describe the same model {key}; delete one of them")
        seen[key] = path
        rows.append(row)
    return rows


def _dataset_rows(datasets: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    rows, names = [], set()
    for index, obj in enumerate(datasets):
        row = _table_row("datasets", obj, f"datasets row {index}", extra_ok=False)
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
    columns = _schema_columns()[table]
    unmapped = [f"{name} {data_type}" for name, data_type, _ in columns if data_type not in _ARROW_TYPES]
    if unmapped:
        raise NaglError(f"schema.sql: {table} has columns of types db.py does not load ({', '.join(unmapped)}); "
                        "add the type to _ARROW_TYPES in nagl/results/db.py")
    schema = pa.schema([(name, _ARROW_TYPES[data_type]) for name, data_type, _ in columns])
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
    cells_root = results_dir / "cells"
    for folder in _cell_folders(results_dir, cell_dirs):
        if (folder / "run.json").is_file():
            collected.add_cell(folder, cells_root)
        else:
            collected.unfinished += 1
    tables = {
        "runs": _arrow_rows("runs", collected.runs),
        "metrics": _arrow_rows("metrics", collected.metrics),
        "scores": _concat(collected.scores, SCORE_COLUMNS),
        "reference_splits": _arrow_rows("reference_splits", [r for rows in collected.splits.values() for r in rows]),
        "models": _arrow_rows("models", _model_rows(results_dir)),
        "datasets": _arrow_rows("datasets", _dataset_rows(datasets)),
        "gallery": _concat(collected.gallery, GALLERY_COLUMNS),
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
    return summary


# --------------------------------------------------------------------- query --


def _is_read(statement: Any) -> bool:
    kind = statement.type.name
    if kind in ("SELECT", "PRAGMA"):
        return True
    if kind == "EXPLAIN":
        # EXPLAIN ANALYZE runs its statement: the statement explained must be a read too.
        match = re.match(r"\s*EXPLAIN\s+(?:ANALY[SZ]E\s+)?(.*)", statement.query, re.IGNORECASE | re.DOTALL)
        if not match:
            return False
        try:
            inner = duckdb.extract_statements(match.group(1))
        except duckdb.Error:
            return False
        return len(inner) == 1 and inner[0].type.name == "SELECT"
    return False


def check_read_only(sql: str) -> None:
    """Refuse anything but one read statement (SELECT/WITH/FROM/SHOW/DESCRIBE/SUMMARIZE/EXPLAIN/PRAGMA)."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as error:
        raise NaglError(f"cannot parse the query: {error}") from error
    for statement in statements:
        if not _is_read(statement):
            raise NaglError(
                f"nagl query is read-only; a {statement.type.name} statement is refused. "
                "Use SELECT, WITH, SHOW, DESCRIBE, SUMMARIZE, EXPLAIN or PRAGMA table_info; "
                "the database is rebuilt only by the ingest step of `nagl run`"
            )
    if len(statements) != 1:
        raise NaglError(f"nagl query runs exactly one statement; got {len(statements)}")


def query(db_path: str | os.PathLike, sql: str) -> pd.DataFrame:
    """Run one read-only statement on the results database and return its result."""
    db_path = Path(db_path)
    if not db_path.is_file():
        raise NaglError(f"no results database at {db_path}: run `nagl run` first, or pass --db with the right file")
    check_read_only(sql)
    try:
        con = duckdb.connect(str(db_path), read_only=True)
    except duckdb.Error as error:
        raise NaglError(f"cannot open {db_path} as a DuckDB database ({error}); rebuild it with `nagl run`") from error
    try:
        con.execute("SET threads TO 1")  # fixed summation order: the same floats on every call
        return con.execute(sql).df()
    except duckdb.Error as error:
        raise NaglError(f"the query failed: {error}") from error
    finally:
        con.close()
