"""`nagl` commands: results (`nagl query`)."""

from __future__ import annotations

import base64
import datetime as _dt
import decimal
import enum
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import typer
from rich.console import Console
from rich.table import Table


class OutputFormat(enum.StrEnum):
    table = "table"
    csv = "csv"
    json = "json"


def _value(value: Any) -> Any:
    """A result cell as a plain JSON value: NULL/NaN -> None, BLOBs -> base64 text."""
    import pandas as pd

    if value is None or value is pd.NaT or value is pd.NA:
        return None
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return None if math.isnan(value) else (value if math.isfinite(value) else str(value))
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, (_dt.datetime, _dt.date)):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return float(value)
    return value


def _cell_text(value: Any) -> str:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{len(bytes(value))} bytes>"
    plain = _value(value)
    if plain is None:
        return "NULL"
    if isinstance(plain, float):
        return f"{plain:.6g}"
    return str(plain)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `nagl` app."""

    @app.command("query")
    def query_command(
        sql: str = typer.Argument(..., help="one read-only SQL statement, e.g. \"SELECT * FROM leaderboard\""),
        db: Path | None = typer.Option(None, "--db", help="results database [default: results/benchmark.duckdb]"),
        output: OutputFormat = typer.Option(OutputFormat.table, "--format", "-f", help="table, csv or json"),
    ) -> None:
        """Run a read-only SQL query on the results database (tables, and views such as leaderboard)."""
        from nagl.paths import database
        from nagl.results.query import query
        from nagl.settings import results_dir

        frame = query(db if db is not None else database(results_dir()), sql)
        if output is OutputFormat.csv:
            text = frame.map(lambda v: _value(v)).to_csv(index=False)
            typer.echo(text, nl=False)
        elif output is OutputFormat.json:
            records = [{str(k): _value(v) for k, v in row.items()} for row in frame.to_dict(orient="records")]
            typer.echo(json.dumps(records, indent=2, ensure_ascii=False))
        else:
            table = Table(show_lines=False, header_style="bold")
            for name in frame.columns:
                table.add_column(str(name), overflow="fold")
            rows = [[_cell_text(v) for v in row] for row in frame.itertuples(index=False, name=None)]
            for row in rows:
                table.add_row(*row)
            widths = [max([len(str(name))] + [len(row[i]) for row in rows]) for i, name in enumerate(frame.columns)]
            console = Console()
            if not console.is_terminal:  # piped or captured: no terminal width to fit, print rows unwrapped
                console = Console(width=max(80, sum(w + 3 for w in widths) + 1))
            console.print(table)
            console.print(f"{len(frame)} row{'s' if len(frame) != 1 else ''}", style="dim")
