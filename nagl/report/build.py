"""Build the self-contained HTML leaderboard from the results database.

``build_report(db_path, out_path)`` reads ``results/benchmark.duckdb`` (read-only)
and writes one HTML file that opens from disk with no network: plotly.js is
inlined once, figures are embedded as JSON, images as data URIs. Apart from the
"Report generated" line, two builds from the same database are byte-identical.
"""

from __future__ import annotations

import datetime as dt
import json
from importlib import resources
from pathlib import Path
from typing import Any

import duckdb

from nagl.errors import NaglError
from nagl.io import atomic_write_text
from nagl.paths import database
from nagl.report import export, figures, sections, tables
from nagl.report.queries import ReportData, load, open_database
from nagl.settings import project_dir, results_dir

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def default_db_path() -> Path:
    return database(results_dir())


FORMATS = {"html": "leaderboard.html", "latex": "main-table.tex", "csv": "main-table.csv"}


def default_out_path(fmt: str = "html") -> Path:
    return project_dir() / "reports" / FORMATS[fmt]


def json_for_script(obj: Any) -> str:
    """JSON that is safe inside a ``<script>`` element.

    ``<``, ``>`` and ``&`` only occur inside JSON strings, where their ``\\u``
    escapes mean the same; so no ``</script>`` or ``<!--`` can end the element
    early. U+2028/2029 are escaped for old JavaScript parsers.
    """
    text = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    for char, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                          ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(char, escaped)
    return text


def _asset(name: str) -> str:
    return resources.files("nagl.report").joinpath(name).read_text(encoding="utf-8")


def _plotly_js() -> str:
    from plotly.offline import get_plotlyjs

    code = get_plotlyjs()
    if "</script" in code.lower():
        raise NaglError("the installed plotly's JavaScript contains '</script' and cannot be inlined; "
                        "reinstall plotly (pip install --force-reinstall plotly).")
    return code


def _check_gallery(data: ReportData, db_path: Path) -> None:
    for row in data.gallery:
        for column in ("image_png", "mask_png", "map_png"):
            blob = row[column]
            if blob is not None and not bytes(blob).startswith(_PNG_MAGIC):
                raise NaglError(
                    f"{db_path}: the gallery {column} of run {row['run_id']} ({row['image_path']}) is not a PNG; "
                    f"the database is damaged or was written by another tool: rebuild it with `nagl run`.")


def render(data: ReportData, db_label: str, generated: str) -> str:
    """The whole page as a string (one block per line; the timestamp has its own line)."""
    css = _asset("report.css")
    head = ('<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            "<title>Generalist anomaly detection leaderboard</title>\n"
            f"<style>\n{css}</style>\n</head>\n<body>")
    parts = [head, sections.header(data, db_label)]
    if data.n_runs == 0:
        parts += [sections.no_results(db_label), sections.definitions(data), sections.footer(generated),
                  "</body>\n</html>\n"]
        return "\n".join(parts)
    shot_figures = figures.shot_curve_figures(data)
    payload = {
        "plots": {**shot_figures, "plot-speed": figures.speed_accuracy_figure(data)},
        "heatmaps": figures.heatmap_figures(data),
    }
    parts += [
        tables.main_table(data.main),
        tables.gains(data.main, data.gains),
        tables.trust(data.reference_checks, data.inflation),
        sections.heatmaps(data),
        sections.shot_curves(list(shot_figures)),
        sections.breakdowns(data),
        sections.efficiency(data),
        sections.gallery(data),
        sections.definitions(data),
        sections.footer(generated),
        f'<script id="plotly-js">\n{_plotly_js()}\n</script>',
        f'<script id="report-data" type="application/json">{json_for_script(payload)}</script>',
        f'<script id="report-js">\n{_asset("report.js")}</script>',
        "</body>\n</html>\n",
    ]
    return "\n".join(parts)


def _load(db: Path) -> ReportData:
    con = open_database(db)
    try:
        return load(con)
    except duckdb.Error as error:
        raise NaglError(f"{db} does not match the results schema ({error}); rebuild it with `nagl run`.") from error
    finally:
        con.close()


def _out_path(out_path: str | Path | None, fmt: str) -> Path:
    out = Path(out_path) if out_path is not None else default_out_path(fmt)
    if out.is_dir():
        raise NaglError(f"--out {out} is a directory; give the path of the file to write, "
                        f"e.g. {out / FORMATS[fmt]}.")
    return out


def build_report(db_path: str | Path | None = None, out_path: str | Path | None = None,
                 generated: dt.datetime | None = None) -> Path:
    """Write the HTML leaderboard for ``db_path`` to ``out_path`` atomically; return ``out_path``.

    Defaults: ``results/benchmark.duckdb`` and ``reports/leaderboard.html`` under the
    project directory. ``generated`` is the timestamp printed in the footer (now, UTC).
    """
    db = Path(db_path) if db_path is not None else default_db_path()
    out = _out_path(out_path, "html")
    data = _load(db)
    _check_gallery(data, db)
    stamp = (generated or dt.datetime.now(dt.UTC)).replace(microsecond=0).isoformat()
    atomic_write_text(out, render(data, str(db), stamp))
    return out


def export_main_table(fmt: str, db_path: str | Path | None = None, out_path: str | Path | None = None) -> Path:
    """Write the main table as ``fmt`` ('latex' or 'csv') atomically; return the path written.

    Defaults: ``results/benchmark.duckdb`` and ``reports/main-table.tex`` / ``.csv``.
    """
    if fmt not in ("latex", "csv"):
        raise NaglError(f"--format {fmt!r} is not a table format; use one of: {', '.join(FORMATS)}.")
    db = Path(db_path) if db_path is not None else default_db_path()
    out = _out_path(out_path, fmt)
    data = _load(db)
    if data.main is None or not data.main.blocks:
        raise NaglError(f"{db} holds no evaluation runs, so there is no main table to export; run `nagl run` first.")
    atomic_write_text(out, export.to_latex(data.main) if fmt == "latex" else export.to_csv(data.main))
    return out
