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
        None, "--out", help="File to write.",
        show_default="reports/leaderboard.html, main-table.tex or main-table.csv", dir_okay=False),
    fmt: str = typer.Option(
        "html", "--format", "-f",
        help="html: the whole report; latex (booktabs) or csv: the main table, to paste into a paper."),
) -> None:
    """Build the self-contained HTML leaderboard, or export its main table as LaTeX or CSV."""
    from nagl.errors import NaglError
    from nagl.report.build import FORMATS, build_report, export_main_table

    if fmt not in FORMATS:
        raise NaglError(f"--format {fmt!r} is not known; use one of: {', '.join(FORMATS)}.")
    path = build_report(db, out) if fmt == "html" else export_main_table(fmt, db, out)
    typer.echo(f"wrote {path}")
