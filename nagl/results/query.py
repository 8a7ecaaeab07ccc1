"""Read-only queries on the results database (`nagl query`).

Two fences, so that a query can neither change the database nor reach the rest
of the machine:

- the statement filter: exactly one SELECT (WITH/FROM/SHOW/DESCRIBE/SUMMARIZE),
  EXPLAIN of one, or a PRAGMA from :data:`READ_PRAGMAS`;
- the connection: read-only, external access off (no file-reading table
  functions such as ``read_csv``/``read_text``/``glob``, no COPY, ATTACH or
  extensions) and the configuration locked, so no statement can turn that back on.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd

from nagl.errors import NaglError

# PRAGMAs that only describe the database; any other (e.g. ones that change
# settings or import SQL files) is refused before it reaches DuckDB.
READ_PRAGMAS = frozenset({
    "table_info", "show", "show_tables", "show_tables_expanded", "database_size", "storage_info",
    "version", "platform",
})

# The connection of every query: read-only, sealed off from files and extensions.
CONFINED = {
    "enable_external_access": False,
    "autoinstall_known_extensions": False,
    "autoload_known_extensions": False,
    "threads": 1,  # fixed summation order: the same floats on every call
    "lock_configuration": True,  # set last: no SET or PRAGMA can undo the above
}

_PRAGMA_NAME = re.compile(r"\s*PRAGMA\s+([A-Za-z_][A-Za-z0-9_]*)", re.IGNORECASE)


def _is_read(statement: Any) -> bool:
    kind = statement.type.name
    if kind == "SELECT":
        return True
    if kind == "PRAGMA":
        match = _PRAGMA_NAME.match(statement.query)
        return bool(match) and match.group(1).lower() in READ_PRAGMAS
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
    """Refuse anything but one read statement (SELECT/WITH/FROM/SHOW/DESCRIBE/SUMMARIZE/EXPLAIN, read PRAGMAs)."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as error:
        raise NaglError(f"cannot parse the query: {error}") from error
    for statement in statements:
        if not _is_read(statement):
            raise NaglError(
                f"nagl query is read-only; a {statement.type.name} statement is refused. "
                f"Use SELECT, WITH, SHOW, DESCRIBE, SUMMARIZE, EXPLAIN or one of the PRAGMAs "
                f"{', '.join(sorted(READ_PRAGMAS))}; the database is rebuilt only by the ingest step of `nagl run`"
            )
    if len(statements) != 1:
        raise NaglError(f"nagl query runs exactly one statement; got {len(statements)}")


def connect_confined(db_path: str | os.PathLike) -> duckdb.DuckDBPyConnection:
    """A read-only connection that cannot read other files, load extensions or change its settings."""
    try:
        return duckdb.connect(str(db_path), read_only=True, config=dict(CONFINED))
    except duckdb.Error as error:
        raise NaglError(f"cannot open {db_path} as a DuckDB database ({error}); rebuild it with `nagl run`") from error


def query(db_path: str | os.PathLike, sql: str) -> pd.DataFrame:
    """Run one read-only statement on the results database and return its result."""
    db_path = Path(db_path)
    if not db_path.is_file():
        raise NaglError(f"no results database at {db_path}: run `nagl run` first, or pass --db with the right file")
    check_read_only(sql)
    con = connect_confined(db_path)
    try:
        return con.execute(sql).df()
    except duckdb.PermissionException as error:
        raise NaglError(f"the query was refused: {error}. `nagl query` reads only the results database; "
                        f"open other files with duckdb itself") from error
    except duckdb.Error as error:
        raise NaglError(f"the query failed: {error}") from error
    finally:
        con.close()
