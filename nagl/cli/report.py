"""`nagl` commands: report."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `nagl` app."""
    app.command("report")(report)


def report(
    db: Path | None = typer.Option(
        None, "--db", help="Results database.", show_default="results/benchmark.duckdb", dir_okay=False),
    out: Path | None = typer.Option(
        None, "--out", help="HTML file to write.", show_default="reports/leaderboard.html", dir_okay=False),
) -> None:
    """Build the self-contained HTML leaderboard from the results database."""
    from nagl.report import build_report

    path = build_report(db, out)
    typer.echo(f"wrote {path}")
