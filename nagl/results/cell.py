"""Writing one evaluation cell (docs/architecture.md, "Evaluation cells").

A cell folder holds ``metrics.json``, ``scores.parquet``, ``split.json``,
optionally ``gallery.parquet``, and ``run.json`` (the cell's ``runs`` row),
written last: a folder without ``run.json`` is unfinished.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from nagl.errors import NaglError
from nagl.io import atomic_path, atomic_write_json
from nagl.results.schema import (
    METRIC_NAMES,
    cell_key_path,
    check_gallery,
    check_reference_checks,
    check_run,
    check_scores,
    check_split,
    metric_rows,
    plain,
    table_row,
)


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
    reference_checks_df: pd.DataFrame | None = None,
) -> None:
    """Write one evaluation cell; every file atomically, ``run.json`` last.

    The inputs are checked as ``ingest`` will check them, so a bad cell fails here
    rather than at ingest time. An earlier ``run.json`` is removed first, so a
    rewrite that stops halfway leaves an unfinished cell, never a stale one.
    """
    folder = Path(cell_dir)
    run_file = folder / "run.json"
    run = table_row("runs", run_row, str(run_file))
    check_run(run, str(run_file))
    expected = cell_key_path(run)
    if folder.parts[-len(expected.parts):] != expected.parts:
        raise NaglError(f"{folder}: a cell with this key must be written to results/cells/{expected.as_posix()} (see cell_dir)")
    metric_values = metric_rows(run["run_id"], metrics, str(folder / "metrics.json"))
    scores = check_scores(pa.Table.from_pandas(scores_df, preserve_index=False), run, str(folder / "scores.parquet"))
    check_split(split_json, run, str(folder / "split.json"))
    gallery = None
    if gallery_df is not None:
        gallery = check_gallery(pa.Table.from_pandas(gallery_df, preserve_index=False), str(folder / "gallery.parquet"))
    checks = None
    if reference_checks_df is not None:
        checks = check_reference_checks(pa.Table.from_pandas(reference_checks_df, preserve_index=False), run,
                                        str(folder / "reference_checks.parquet"))

    folder.mkdir(parents=True, exist_ok=True)
    run_file.unlink(missing_ok=True)
    metrics_json = {level: {} for level in METRIC_NAMES}
    for row in metric_values:
        metrics_json[row["level"]][row["metric"]] = row["value"]
    atomic_write_json(folder / "metrics.json", metrics_json)
    _write_parquet(folder / "scores.parquet", scores)
    atomic_write_json(folder / "split.json", split_json)
    if gallery is not None:
        _write_parquet(folder / "gallery.parquet", gallery)
    else:
        (folder / "gallery.parquet").unlink(missing_ok=True)
    if checks is not None:
        _write_parquet(folder / "reference_checks.parquet", checks)
    else:
        (folder / "reference_checks.parquet").unlink(missing_ok=True)
    atomic_write_json(run_file, {name: plain(run_row[name]) for name in run})
