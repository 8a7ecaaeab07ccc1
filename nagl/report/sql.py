"""Small SQL helpers shared by the report's readers (the report reads the database only through SQL)."""

from __future__ import annotations

import math
from typing import Any

import duckdb

Row = dict[str, Any]


def rows_of(con: duckdb.DuckDBPyConnection, sql: str, params: list | None = None) -> list[Row]:
    """The result as dicts; NaN/inf become None: shown as missing, never as numbers."""
    cursor = con.execute(sql, params or [])
    names = [column[0] for column in cursor.description]
    return [{name: _clean(value) for name, value in zip(names, row, strict=True)} for row in cursor.fetchall()]


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def table_names(con: duckdb.DuckDBPyConnection) -> set[str]:
    return {name for (name,) in con.execute(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main'").fetchall()}


def column_names(con: duckdb.DuckDBPyConnection, table: str) -> set[str]:
    return {name for (name,) in con.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_schema = 'main' AND table_name = ?",
        [table]).fetchall()}


def clean_protocol(con: duckdb.DuckDBPyConnection, alias: str = "r") -> str:
    """A WHERE-clause part keeping clean-protocol runs, once ``runs.protocol`` exists (else empty)."""
    return f"AND {alias}.protocol = 'clean'" if "protocol" in column_names(con, "runs") else ""
