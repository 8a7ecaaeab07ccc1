"""HTML of the main table, "what abnormal references buy" and the trust checks.

Every string from the database goes through :func:`esc`; numbers through
:class:`~nagl.report.main_table.Stat`.
"""

from __future__ import annotations

import html
from typing import Any

from nagl.report.format import MISSING, shot_label, sort_key
from nagl.report.main_table import Column, GainRow, MainTable, Stat, TableRow
from nagl.report.sql import Row

IN_DOMAIN_MARK = "†"


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def group_title(group: str) -> str:
    return group[:1].upper() + group[1:]


def normal_refs(k_normal: int) -> str:
    return f"{k_normal} normal reference{'s' if k_normal != 1 else ''} per category"


def _stat_cell(stat: Stat, rank: int | None = None, marked: bool = False, signed: bool = False,
               column: str = "") -> str:
    classes = ["num"] + ([f"best{rank}"] if rank else [])
    text = esc(stat.text(signed=signed))
    if rank == 1:
        text = f"<strong>{text}</strong>"
    elif rank == 2:
        text = f"<u>{text}</u>"
    if marked:
        text += f'<sup class="mark" title="in-domain cell left out">{IN_DOMAIN_MARK}</sup>'
    return (f'<td class="{" ".join(classes)}" data-column="{esc(column)}" data-sort="{sort_key(stat.mean)}" '
            f'title="{esc(stat.counts())}">{text}</td>')


def _head(columns: list[Column], groups: list[tuple[str, list[Column]]], first: str) -> str:
    top = "".join(f'<th colspan="{len(cols)}" class="group-head">{esc(group_title(name))}</th>'
                  for name, cols in groups)
    names = "".join(f'<th title="{c.n_categories} categories">{esc(c.target)}'
                    f'<span class="n">{c.n_categories} cat.</span></th>' for _, cols in groups for c in cols)
    return (f'<thead><tr><th rowspan="2">{esc(first)}</th>{top}<th rowspan="2">Mean</th></tr>'
            f"<tr>{names}</tr></thead>")


def _row_html(row: TableRow, columns: list[Column]) -> str:
    cells = "".join(_stat_cell(row.cells.get(c.target, Stat(None)), row.best.get(c.target),
                               c.target in row.in_domain, column=c.target) for c in columns)
    members = "; ".join(f"{m}|{b}|{k}" for m, b, k in row.members)
    return (f'<tr class="method-row" data-members="{esc(members)}"><th scope="row" class="method">'
            f"{esc(row.label)}</th>{cells}{_stat_cell(row.mean, row.best.get(''), column='mean')}</tr>")


def main_table(table: MainTable | None) -> str:
    if table is None or not table.blocks:
        return '<section id="main"><h2>Main table</h2><p>No results.</p></section>'
    width = 2 + len(table.columns)
    bodies = []
    for block in table.blocks:
        seeds = sorted({row.mean.n_ref for row in block.rows if row.mean.mean is not None})
        trains = sorted({row.mean.n_train for row in block.rows if row.mean.n_train})
        spread = f"{'/'.join(map(str, seeds))} reference seeds" + (
            f", {'/'.join(map(str, trains))} training seeds" if trains else "")
        lines = [f'<tr class="block"><th colspan="{width}">{esc(normal_refs(block.k_normal))}'
                 f'<span class="n"> · {esc(spread)} per value</span></th></tr>']
        current = None
        for row in block.rows:
            if (row.training, row.references) != current:
                current = (row.training, row.references)
                lines.append(f'<tr class="group"><th colspan="{width}">{esc(row.training.capitalize())} · '
                             f"{esc(row.references)}</th></tr>")
            lines.append(_row_html(row, table.columns))
        bodies.append(f'<tbody data-k-normal="{block.k_normal}">{"".join(lines)}</tbody>')
    backbones = ", ".join(table.backbones)
    return (
        '<section id="main"><h2>Main table</h2>'
        f"<p>Cross-domain {esc(table.label)} per target dataset (backbone {esc(backbones)}): for each "
        "seed the category macro-average, averaged over the sources a method was not trained on; shown as "
        "mean ± standard deviation over the seeds (reference draws). "
        f"<sup>{IN_DOMAIN_MARK}</sup> marks a target the method was also trained on: that in-domain "
        "cell is left out of the cell and of every mean. The mean is over targets, per seed. "
        "<strong>Bold</strong>: best in the column within a block; <u>underlined</u>: second. Rows that are "
        "the same computation (identical metrics in every evaluation cell) are shown once, labelled with "
        "every name they stand for. Hover a cell for the seeds, categories and targets behind it. "
        f"Export: <code>nagl report --format latex</code> or <code>--format csv</code>.</p>"
        f'<div class="scroll"><table id="main-table" class="data main">'
        f"{_head(table.columns, table.groups, 'Method')}{''.join(bodies)}</table></div></section>")


# ---------------------------------------------------- abnormal references --

def gains(table: MainTable | None, rows: list[GainRow]) -> str:
    if table is None or not rows:
        body = ("<p>Not computed: the runs hold no method with both 0 and more abnormal references "
                "at the same number of normal references.</p>")
    else:
        width = 2 + len(table.columns)
        bodies = []
        for k_normal in sorted({r.k_normal for r in rows}):
            lines = [f'<tr class="block"><th colspan="{width}">{esc(normal_refs(k_normal))}</th></tr>']
            for row in (r for r in rows if r.k_normal == k_normal):
                name = row.method if len(table.backbones) == 1 else f"{row.method} ({row.backbone})"
                cells = "".join(_stat_cell(row.cells.get(c.target, Stat(None)), signed=True, column=c.target)
                                for c in table.columns)
                lines.append(f'<tr class="method-row" data-method="{esc(row.method)}">'
                             f'<th scope="row" class="method">{esc(name)}: {row.k_abnormal} − 0 abnormal</th>'
                             f"{cells}{_stat_cell(row.mean, signed=True, column='mean')}</tr>")
            bodies.append(f"<tbody>{''.join(lines)}</tbody>")
        body = (f"<p>Per method and target: {esc(table.label)} with k abnormal references minus with none, "
                "paired by seed (same normal references and queries draw), then mean ± standard deviation "
                "over seeds. A difference of 0 means the method does not use its abnormal references.</p>"
                f'<div class="scroll"><table id="gains-table" class="data main">'
                f"{_head(table.columns, table.groups, 'Method')}{''.join(bodies)}</table></div>")
    return f'<section id="gains"><h2>What abnormal references buy</h2>{body}</section>'


def reference_checks(rows: list[Row] | None) -> str:
    title = '<h3 id="reference-checks">Reference-use check: does the method use its abnormal reference?</h3>'
    if rows is None:
        return title + ('<p class="not-computed">Not computed: the database has no <code>reference_checks</code> '
                        "table.</p>")
    if not rows:
        return title + '<p class="not-computed">Not computed: the <code>reference_checks</code> table is empty.</p>'
    lines = "".join(
        "<tr>" + f'<th scope="row">{esc(r["method"])}</th><td>{esc(r["backbone"])}</td><td>{esc(r["variant"])}</td>'
        + "".join(f'<td class="num" data-sort="{sort_key(r[k])}">{esc(_fixed(r[k], signed=k.endswith("change")))}</td>'
                  for k in ("own_image_auroc", "check_image_auroc", "image_change",
                            "own_pixel_auroc", "check_pixel_auroc", "pixel_change"))
        + f'<td class="num">{r["n_cells"]}</td></tr>' for r in rows)
    return (title + "<p>Each cross-domain clean cell with abnormal references, of a method that takes them, "
            "re-scored with its abnormal references swapped (same normal references and queries), beside the "
            "cell's own AUROC. <code>other-category-anomaly</code>: anomalies of another category of the same "
            "target, with their masks (no row for a target with one category); <code>normal-pseudo-mask</code>: "
            "normal training images of the category that are not its references, each with a centre-square "
            "pseudo-mask of half the image side. A method that uses its abnormal reference loses accuracy when "
            "it is swapped; a change near 0 means it does not.</p>"
            '<div class="scroll"><table id="table-reference-checks" class="data"><thead><tr><th>Method</th>'
            "<th>Backbone</th><th>Variant</th><th>Image AUROC</th><th>… with variant</th><th>Change</th>"
            "<th>Pixel AUROC</th><th>… with variant</th><th>Change</th><th>Cells</th></tr></thead>"
            f"<tbody>{lines}</tbody></table></div>")


def inflation(rows: list[Row] | None) -> str:
    title = '<h3 id="protocol-inflation">Protocol inflation</h3>'
    if rows is None:
        return title + ('<p class="not-computed">Not computed: the runs have no <code>protocol</code> column '
                        "(clean vs reference-code).</p>")
    if not rows:
        return title + ('<p class="not-computed">Not computed: no cell was run under both the clean and the '
                        "reference-code protocol.</p>")
    lines = "".join(
        f'<tr><th scope="row">{esc(r["method"])}</th><td>{esc(r["backbone"])}</td>'
        f'<td>{esc(shot_label(r["k_normal"], r["k_abnormal"]))}</td>'
        + "".join(f'<td class="num" data-sort="{sort_key(r[k])}">{esc(_fixed(r[k], signed=k == "inflation"))}</td>'
                  for k in ("clean", "reference_code", "inflation", "inflation_sd"))
        + f'<td class="num">{r["n_cells"]}</td></tr>' for r in rows)
    return (title + "<p>Image AUROC of the same cross-domain cells under the reference implementation's "
            "protocol minus under the clean protocol: how much the reference code's protocol inflates "
            "the numbers. The main table uses clean runs only.</p>"
            '<div class="scroll"><table id="table-inflation" class="data"><thead><tr><th>Method</th>'
            "<th>Backbone</th><th>Shots</th><th>Clean</th><th>Reference code</th><th>Inflation</th>"
            f"<th>sd over cells</th><th>Cells</th></tr></thead><tbody>{lines}</tbody></table></div>")


def _fixed(value: float | None, signed: bool = False) -> str:
    if value is None:
        return MISSING
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def trust(checks: list[Row] | None, protocol: list[Row] | None) -> str:
    return (f'<section id="trust"><h2>Can the numbers be trusted?</h2>{reference_checks(checks)}'
            f"{inflation(protocol)}</section>")

