"""The results schema and the checks every row goes through before it is written.

``schema.sql`` defines the tables and views; the column types read from it are
the rules that :mod:`nagl.results.cell` (writing one cell) and
:mod:`nagl.results.ingest` (building the database) check each row against, so a
bad file is reported by name rather than loaded.
"""

from __future__ import annotations

import datetime as _dt
import functools
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa

from nagl import paths
from nagl.config import TRAINING_FREE_SOURCE
from nagl.errors import NaglError
from nagl.metrics import IMAGE_METRICS, PIXEL_METRICS
from nagl.protocol import PROTOCOLS, REFERENCE_CHECK_VARIANTS, verify_split_json

SCHEMA_PATH = Path(__file__).with_name("schema.sql")
CELL_FILES = ("metrics.json", "scores.parquet", "split.json", "gallery.parquet", "reference_checks.parquet", "run.json")
METRIC_NAMES = {"image": IMAGE_METRICS, "pixel": PIXEL_METRICS}
SCORE_COLUMNS = {"image_path": pa.string(), "defect_type": pa.string(), "label": pa.int32(), "score": pa.float64()}
GALLERY_COLUMNS = {
    "image_path": pa.string(),
    "label": pa.int32(),
    "image_png": pa.binary(),
    "mask_png": pa.binary(),
    "map_png": pa.binary(),
}
REFERENCE_CHECK_COLUMNS = {"variant": pa.string(), "image_auroc": pa.float64(), "pixel_auroc": pa.float64()}
ARROW_TYPES = {
    "VARCHAR": pa.string(),
    "INTEGER": pa.int32(),
    "BIGINT": pa.int64(),
    "DOUBLE": pa.float64(),
    "BOOLEAN": pa.bool_(),
    "TIMESTAMP": pa.timestamp("us"),
    "BLOB": pa.binary(),
    "VARCHAR[]": pa.list_(pa.string()),
}


def create_schema(con: duckdb.DuckDBPyConnection) -> None:
    """Create every table and view of ``schema.sql`` in an empty database."""
    con.execute(SCHEMA_PATH.read_text(encoding="utf-8"))


@functools.lru_cache(maxsize=1)
def schema_columns() -> dict[str, list[tuple[str, str, bool]]]:
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


def plain(value: Any) -> Any:
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
    if data_type == "VARCHAR[]":
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise ValueError("a list of strings")
        return value
    if data_type == "TIMESTAMP":
        moment = _timestamp(value)
        if moment is None:
            raise ValueError("an ISO 8601 timestamp")
        return moment
    return value


def table_row(table: str, obj: Any, source: str, extra_ok: bool = True) -> dict[str, Any]:
    """Check one row against the table's columns; every column must be present (nullable ones may be null)."""
    if not isinstance(obj, Mapping):
        raise NaglError(f"{source}: expected a JSON object (a row of `{table}`), got {type(obj).__name__}")
    columns = schema_columns()[table]
    missing = [name for name, _, _ in columns if name not in obj]
    if missing:
        raise NaglError(f"{source}: missing {', '.join(missing)} (columns of `{table}`); rerun the step that wrote it")
    if not extra_ok:
        extra = sorted(set(obj) - {name for name, _, _ in columns})
        if extra:
            raise NaglError(f"{source}: unknown keys {', '.join(extra)} (not columns of `{table}`)")
    row = {}
    for name, data_type, nullable in columns:
        value = plain(obj[name])
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


def metric_rows(run_id: str, metrics: Any, source: str) -> list[dict[str, Any]]:
    """``{"image": {...}, "pixel": {...}}`` -> rows of ``metrics``; values are numbers in [0, 1] or null."""
    if not isinstance(metrics, Mapping) or set(metrics) != set(METRIC_NAMES):
        raise NaglError(f"{source}: expected an object with exactly the keys 'image' and 'pixel'")
    rows = []
    for level, names in METRIC_NAMES.items():
        values = metrics[level]
        if not isinstance(values, Mapping) or set(values) != set(names):
            raise NaglError(f"{source}: `{level}` must hold exactly {', '.join(names)}")
        for name in names:
            value = plain(values[name])
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


def check_scores(scores: pa.Table, run: Mapping[str, Any], source: str) -> pa.Table:
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


def check_gallery(gallery: pa.Table, source: str) -> pa.Table:
    gallery = _typed_table(gallery, GALLERY_COLUMNS, source)
    for name in ("image_path", "label", "image_png", "map_png"):
        if gallery.column(name).null_count:
            raise NaglError(f"{source}: `{name}` has null values")
    return gallery


def check_reference_checks(checks: pa.Table, run: Mapping[str, Any], source: str) -> pa.Table:
    """Rows of a cell's ``reference_checks.parquet``: known variants, once each, AUROCs in [0, 1]."""
    checks = _typed_table(checks, REFERENCE_CHECK_COLUMNS, source)
    variants = checks.column("variant").to_pylist()
    if run["protocol"] != "clean" or run["k_abnormal"] == 0:
        if variants:
            raise NaglError(f"{source}: reference checks belong to clean cells with k_abnormal > 0; rerun the cell")
    unknown = sorted({str(v) for v in variants} - set(REFERENCE_CHECK_VARIANTS))
    if unknown or len(set(variants)) != len(variants):
        raise NaglError(f"{source}: variants must be distinct names from {list(REFERENCE_CHECK_VARIANTS)}, "
                        f"got {variants}; rerun the cell")
    for name, nullable in (("image_auroc", False), ("pixel_auroc", True)):
        values = checks.column(name).to_pylist()
        if any((v is None and not nullable) or (v is not None and not 0.0 <= v <= 1.0) for v in values):
            raise NaglError(f"{source}: `{name}` must be a number in [0, 1]{' or null' if nullable else ''}; rerun the cell")
    return checks


def check_split(split_json: Any, run: Mapping[str, Any], source: str) -> None:
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
    """The folder of the cell that ``run`` (a row of ``runs``) describes (see :func:`nagl.paths.cell_dir`)."""
    return paths.cell_dir(results_dir, run["method"], run["backbone"], run["source"], run["target"],
                          run["category"], run["k_normal"], run["k_abnormal"], run["seed"], run["train_seed"],
                          run["protocol"])


def cell_key_path(run: Mapping[str, Any]) -> Path:
    return cell_dir(Path("."), run).relative_to("cells")


def check_run(run: dict[str, Any], source: str) -> None:
    """``protocol`` is known; ``source_datasets`` is NULL exactly for the training-free source, names
    the source itself when it has one dataset, and ``in_domain`` is true exactly when the target is
    one of them; ``train_seed`` is NULL exactly for the training-free source."""
    if run["protocol"] not in PROTOCOLS:
        raise NaglError(f"{source}: protocol must be one of {', '.join(PROTOCOLS)}, got {run['protocol']!r}")
    datasets = run["source_datasets"]
    if (datasets is None) != (run["source"] == TRAINING_FREE_SOURCE) or (datasets is not None and not datasets):
        raise NaglError(f"{source}: source_datasets must be null exactly for the training-free source '-' "
                        f"and a non-empty list otherwise")
    if datasets is not None and len(datasets) == 1 and datasets != [run["source"]]:
        raise NaglError(f"{source}: a source of one dataset must be that dataset; source_datasets is {datasets} "
                        f"but source is {run['source']!r}")
    if run["in_domain"] != (run["target"] in (datasets or [])):
        raise NaglError(f"{source}: in_domain must be true exactly when the target is one of source_datasets")
    if (run["train_seed"] is None) != (run["source"] == TRAINING_FREE_SOURCE):
        raise NaglError(f"{source}: train_seed must be null exactly for a training-free method (source '-')")
