"""The HTML of each report section.

Every string that comes from the database is passed through :func:`esc`
(``html.escape`` with quotes) before it is placed in the page; numbers are
formatted by :mod:`nagl.report.format`. Plots are empty ``<div class="plot">``
elements that the page script fills from the embedded figure JSON.
"""

from __future__ import annotations

import base64
import html
from collections import defaultdict
from typing import Any

from nagl.report.figures import method_label
from nagl.report.format import MISSING, fmt_number, fmt_params, fmt_seconds, fmt_stat, shot_label, sort_key
from nagl.report.queries import METRICS, ReportData, Row

GALLERY_ANOMALOUS = 3  # anomalous queries shown per target
GALLERY_NORMAL = 1  # normal queries shown per target

SECTIONS = (
    ("main", "Main table"),
    ("gains", "What abnormal references buy"),
    ("trust", "Trust checks"),
    ("heatmaps", "Source × target"),
    ("shots", "Shot curves"),
    ("breakdowns", "Breakdowns"),
    ("efficiency", "Efficiency"),
    ("gallery", "Gallery"),
    ("definitions", "Definitions and provenance"),
)


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _attrs(attrs: dict[str, Any]) -> str:
    return "".join(f' {name}="{esc(value)}"' for name, value in attrs.items())


def _td(content: str, sort: str | None = None, cls: str | None = None, **attrs: Any) -> str:
    """A cell; ``content`` is HTML already escaped by the caller."""
    if sort is not None:
        attrs["data-sort"] = sort
    if cls:
        attrs["class"] = cls
    return f"<td{_attrs({k.replace('_', '-'): v for k, v in attrs.items()})}>{content}</td>"


def _metric_slug(level: str, metric: str) -> str:
    return f"{level}-{metric}"


def _shot_value(k_normal: int, k_abnormal: int) -> str:
    return f"{k_normal}|{k_abnormal}"


def _counts(row: Row | None, parts: tuple[tuple[str, str], ...]) -> str:
    if row is None or row.get("mean") is None:
        return "no values"
    return " · ".join(f"{row[key]} {name}" for key, name in parts)


# ----------------------------------------------------------------- header --

def header(data: ReportData, db_label: str) -> str:
    nav = "".join(f'<a href="#{anchor}">{esc(title)}</a>' for anchor, title in SECTIONS)
    if data.n_runs == 0:
        summary = "<p>No evaluation runs yet.</p>"
    else:
        created = f" Runs created {esc(data.created[0])} to {esc(data.created[1])}." if data.created else ""
        summary = (
            f"<p>{data.n_runs} evaluation cells: {len(data.methods)} methods, {len(data.targets)} target "
            f"datasets, {data.n_categories} categories, {len(data.shots)} shot settings, "
            f"{len(data.seeds)} seeds ({', '.join(str(s) for s in data.seeds)}).{created} "
            f"Database: <code>{esc(db_label)}</code>.</p>")
    return (f"<header><h1>Generalist anomaly detection leaderboard</h1>{summary}"
            f"<nav>{nav}</nav></header>")


def no_results(db_label: str) -> str:
    return (
        '<section id="no-results"><h2>No results</h2>'
        f"<p>The database <code>{esc(db_label)}</code> holds no evaluation runs, so there is nothing "
        "to rank. Run the benchmark with <code>nagl run</code>, then build this report again with "
        "<code>nagl report</code>.</p></section>")


# --------------------------------------------------------------- heatmaps --

def heatmaps(data: ReportData) -> str:
    def select(name: str, label: str, options: list[str], chosen: int = 0) -> str:
        items = "".join(f'<option value="{i}"{" selected" if i == chosen else ""}>{esc(text)}</option>'
                        for i, text in enumerate(options))
        return f'<label>{esc(label)} <select data-heatmap="{name}">{items}</select></label>'

    # Open on the method with the most sources (the trained one), whose grid says the most.
    n_sources = [len({r["source"] for r in data.pairs if (r["method"], r["backbone"]) == key})
                 for key in data.methods]
    first = n_sources.index(max(n_sources))
    controls = (select("method", "Method", [method_label(m, b) for m, b in data.methods], first)
                + select("shot", "Shot setting", [shot_label(*s) for s in data.shots])
                + select("metric", "Metric", [label for *_, label in METRICS]))
    return (
        '<section id="heatmaps"><h2>Source × target</h2>'
        "<p>Each cell: the metric on a target dataset (column) for a model trained on a source dataset "
        "(row), macro-averaged over the target's categories, mean over seeds (hover for ± std and "
        "counts). Training-free methods have the single source <code>-</code>. Cells outlined with a "
        "dotted border and labelled <em>in-domain</em> were trained on the target (source = target, "
        "or a union source that contains it): they are shown but left out of every cross-domain mean. "
        "A union source (e.g. <code>all-but-&lt;target&gt;</code>: every other source dataset) is "
        "evaluated only on the targets it leaves out. Grey cells have no value (e.g. pixel metrics of a target "
        "without masks). One colour scale per metric across methods and shot settings.</p>"
        f'<div class="controls">{controls}</div>'
        '<div id="plot-heatmap" class="plot"></div></section>')


# ------------------------------------------------------------ shot curves --

def shot_curves(figure_ids: list[str]) -> str:
    plots = "".join(f'<div id="{esc(div_id)}" class="plot"></div>' for div_id in figure_ids)
    return (
        '<section id="shots"><h2>Shot curves</h2>'
        "<p>Cross-domain mean against the number of normal references, one line per number of "
        "abnormal references; the band is ± one standard deviation over seeds. The gap between the "
        "lines is what abnormal references buy each method.</p>"
        f"{plots}</section>")


# ------------------------------------------------------------- breakdowns --

def _filters(table_id: str, data: ReportData) -> str:
    methods = "".join(f'<option value="{esc(m)}|{esc(b)}">{esc(method_label(m, b))}</option>'
                      for m, b in data.methods)
    shots = "".join(f'<option value="{_shot_value(*s)}">{esc(shot_label(*s))}</option>' for s in data.shots)
    return (f'<div class="controls">'
            f'<label>Search <input type="search" class="text-filter" data-table="{table_id}" '
            f'placeholder="target or category"></label>'
            f'<label>Method <select class="row-filter" data-table="{table_id}" data-attr="method-key">'
            f'<option value="">all</option>{methods}</select></label>'
            f'<label>Shot setting <select class="row-filter" data-table="{table_id}" data-attr="shot">'
            f'<option value="">all</option>{shots}</select></label></div>')


def _breakdown_table(table_id: str, title: str, data: ReportData, rows: list[Row], keys: tuple[str, ...],
                     key_heads: tuple[str, ...], count_cols: tuple[tuple[str, str], ...]) -> str:
    grouped: dict[tuple, dict[tuple[str, str], Row]] = defaultdict(dict)
    for row in rows:
        group = (row["method"], row["backbone"], row["k_normal"], row["k_abnormal"]) + tuple(row[k] for k in keys)
        grouped[group][(row["level"], row["metric"])] = row
    heads = "".join(f'<th scope="col">{esc(h)}</th>'
                    for h in ("Method", "Shots", *key_heads, *(label for *_, label in METRICS),
                              *(title for _, title in count_cols)))
    lines = []
    for group in sorted(grouped):
        method, backbone, k_normal, k_abnormal, *names = group
        cells = grouped[group]
        reference = cells.get(("image", "auroc")) or next(iter(cells.values()))
        out = [_td(esc(method_label(method, backbone))),
               _td(esc(shot_label(k_normal, k_abnormal)), sort=sort_key(k_normal * 1000 + k_abnormal))]
        out += [_td(esc(name)) for name in names]
        for level, metric, _ in METRICS:
            row = cells.get((level, metric))
            mean, std = (row["mean"], row["std"]) if row else (None, None)
            out.append(_td(esc(fmt_stat(mean, std)), sort=sort_key(mean), cls="num",
                           data_metric=_metric_slug(level, metric)))
        out += [_td(str(reference[col]), sort=sort_key(reference[col]), cls="num") for col, _ in count_cols]
        attrs = _attrs({"data-method-key": f"{method}|{backbone}", "data-shot": _shot_value(k_normal, k_abnormal),
                        **{f"data-{k}": v for k, v in zip(keys, names, strict=False)},
                        "data-text": " ".join(names).lower()})
        lines.append(f"<tr{attrs}>{''.join(out)}</tr>")
    return (f'<details id="details-{table_id}"><summary>{esc(title)} ({len(lines)} rows)</summary>'
            f'{_filters(table_id, data)}<div class="scroll tall"><table id="{table_id}" class="data sortable">'
            f"<thead><tr>{heads}</tr></thead><tbody>{''.join(lines)}</tbody></table></div></details>")


def breakdowns(data: ReportData) -> str:
    per_target = _breakdown_table("table-per-target", "Per target dataset", data, data.per_target, ("target",), ("Target",),
                                  (("n_sources", "Sources"), ("n_categories", "Categories"),
                                   ("n_seeds", "Seeds")))
    per_category = _breakdown_table("table-per-category", "Per category", data, data.per_category, ("target", "category"),
                                    ("Target", "Category"), (("n_sources", "Sources"), ("n_seeds", "Seeds")))
    return (
        '<section id="breakdowns"><h2>Breakdowns</h2>'
        "<p>Cross-domain values (in-domain cells excluded) per target dataset and per category: mean over "
        "the cross-domain sources per seed, then mean ± std over seeds, every method and shot setting as "
        "run (no rows merged). Open a table to see it; filter by text, method or shot setting; click a "
        f"column heading to sort; {MISSING} (not defined) always sorts last.</p>"
        f"{_image_level_note(data)}{per_target}{per_category}</section>")


def _image_level_note(data: ReportData) -> str:
    """Why pixel metrics are missing for some targets: they have image-level labels only."""
    names = [r["name"] for r in data.datasets if not r["has_masks"] and r["name"] in data.targets]
    if not names:
        return ""
    return (f'<p class="note" id="image-level-note">Pixel metrics are not defined ({MISSING}, stored as NULL, '
            f"never 0) for {', '.join(esc(n) for n in names)}: these datasets have image-level labels only, "
            "no pixel masks.</p>")


# ------------------------------------------------------------- efficiency --

def efficiency(data: ReportData) -> str:
    lines = []
    for row in data.efficiency:
        low, high = row["params_total_min"], row["params_total_max"]
        total = fmt_params(high) if low == high else f"{fmt_params(low)} – {fmt_params(high)}"
        lines.append("<tr>" + "".join([
            _td(esc(row["method"])), _td(esc(row["backbone"])),
            _td(esc(total), sort=sort_key(high), cls="num"),
            _td(esc(fmt_params(row["params_trainable"])), sort=sort_key(row["params_trainable"]), cls="num"),
            _td(esc(fmt_seconds(row["train_seconds"])), sort=sort_key(row["train_seconds"]), cls="num"),
            _td(str(row["n_trained"]), sort=sort_key(row["n_trained"]), cls="num"),
            _td(esc(fmt_number(row["images_per_second"])), sort=sort_key(row["images_per_second"]), cls="num"),
            _td(esc(fmt_seconds(row["eval_seconds"])), sort=sort_key(row["eval_seconds"]), cls="num"),
            _td(str(row["n_runs"]), sort=sort_key(row["n_runs"]), cls="num"),
        ]) + "</tr>")
    heads = "".join(f"<th>{h}</th>" for h in (
        "Method", "Backbone", "Params (total)", "Params (trainable)", "Train time / checkpoint",
        "Checkpoints", "Images/s", "Eval time (sum)", "Cells"))
    return (
        '<section id="efficiency"><h2>Efficiency</h2>'
        "<p>Parameters count the backbone plus the method's head; trainable parameters are those the "
        "method learns on a source (0 for training-free methods). Training time is per checkpoint "
        "(one per source), averaged; images/s is queries scored per second by the head on cached "
        f"features, averaged over all cells. {MISSING}: not applicable.</p>"
        f'<div class="scroll"><table id="table-efficiency" class="data sortable"><thead><tr>{heads}</tr>'
        f"</thead><tbody>{''.join(lines)}</tbody></table></div>"
        '<div id="plot-speed" class="plot"></div></section>')


# ---------------------------------------------------------------- gallery --

def _img(png: bytes, alt: str) -> str:
    return f'<img src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}" alt="{esc(alt)}">'


def _gallery_queries(rows: list[Row]) -> list[tuple[str, list[Row]]]:
    """The queries shown for one target: the first anomalous and normal ones by path."""
    by_query: dict[str, list[Row]] = defaultdict(list)
    for row in rows:
        by_query[row["image_path"]].append(row)
    anomalous = sorted(path for path, rs in by_query.items() if rs[0]["label"] == 1)
    normal = sorted(path for path, rs in by_query.items() if rs[0]["label"] == 0)
    chosen = anomalous[:GALLERY_ANOMALOUS] + normal[:GALLERY_NORMAL]
    return [(path, by_query[path]) for path in chosen]


def gallery(data: ReportData) -> str:
    by_target: dict[str, list[Row]] = defaultdict(list)
    for row in data.gallery:
        by_target[row["target"]].append(row)
    heads = "".join(f"<th>{esc(method_label(m, b))}</th>" for m, b in data.methods)
    blocks = []
    for target in sorted(by_target):
        lines = []
        for path, rows in _gallery_queries(by_target[target]):
            first = rows[0]
            kind = "anomalous" if first["label"] == 1 else "normal"
            mask = (_img(first["mask_png"], f"ground-truth mask of {path}") if first["mask_png"] is not None
                    else '<span class="missing">image-level labels only</span>')
            cells = [f'<td><figure>{_img(first["image_png"], path)}<figcaption>{esc(path)}<br>'
                     f"{kind}</figcaption></figure></td>", f"<td>{mask}</td>"]
            maps = {(r["method"], r["backbone"]): r for r in rows}
            for key in data.methods:
                run = maps.get(key)
                if run is None:
                    cells.append(f'<td><span class="missing">{MISSING}</span></td>')
                    continue
                origin = "training-free" if run["source"] == "-" else f"trained on {run['source']}"
                if run["in_domain"]:
                    origin += " (in-domain)"
                caption = f"{origin}, {shot_label(run['k_normal'], run['k_abnormal'])}, seed {run['seed']}"
                cells.append(f"<td><figure>{_img(run['map_png'], f'anomaly map of {path} by {key[0]}')}"
                             f"<figcaption>{esc(caption)}</figcaption></figure></td>")
            lines.append(f"<tr>{''.join(cells)}</tr>")
        blocks.append(f"<h3>Target: {esc(target)}</h3><div class=\"scroll\"><table class=\"gallery\">"
                      f"<thead><tr><th>Query</th><th>Ground truth</th>{heads}</tr></thead>"
                      f"<tbody>{''.join(lines)}</tbody></table></div>")
    body = "".join(blocks) if blocks else "<p>The database holds no gallery images.</p>"
    return (
        '<section id="gallery"><h2>Gallery</h2>'
        "<p>For each target dataset the same queries for every method, side by side: the query, its "
        "ground-truth mask (\u201cimage-level labels only\u201d for datasets without masks) and each method's "
        "anomaly map (brighter = more anomalous). Each map comes from one run, preferring a cross-domain "
        "source, the largest shot setting and the lowest seed; its caption names the run.</p>"
        f"{body}</section>")


# ------------------------------------------------ definitions, provenance --

_DEFINITIONS = (
    ("Image AUROC", "Area under the ROC curve of the image scores (one score per query, the mean of its "
     "top 1 % patch scores) against the image labels: the probability that a random anomalous query "
     "scores above a random normal one. 0.5 is chance, 1 is perfect."),
    ("Image AP", "Average precision of the image scores: the area under the precision-recall curve, "
     "which weighs the ranking of the anomalous queries more than AUROC does."),
    ("Image F1-max", "The best F1 score (harmonic mean of precision and recall) over all thresholds on "
     "the image scores."),
    ("Pixel AUROC", "AUROC over all pixels of all queries at the evaluation resolution, with the "
     "anomaly map as score and the ground-truth mask as label. Only where the dataset has masks."),
    ("Pixel AP / F1-max", "Average precision and best F1 over pixels, as for images. Pixel metrics are "
     "stored as NULL (shown as —) for datasets without masks, never as 0."),
    ("AUPRO@0.3", "Per-region overlap: for each connected ground-truth region, the fraction of it "
     "flagged at a threshold, averaged over regions; integrated over the false-positive rate on normal "
     "pixels from 0 to 0.3 and divided by 0.3, so it lies in [0, 1] (the MVTec AD definition)."),
)


def _key_value_table(table_id: str, rows: list[tuple[str, str]]) -> str:
    lines = []
    for key, value in rows:
        text = str(value)
        shown = f"<pre>{esc(text)}</pre>" if "\n" in text or len(text) > 120 else f"<code>{esc(text)}</code>"
        lines.append(f"<tr><th scope=\"row\">{esc(key)}</th><td>{shown}</td></tr>")
    return f'<table id="{table_id}" class="data keyvalue"><tbody>{"".join(lines)}</tbody></table>'


def definitions(data: ReportData) -> str:
    terms = "".join(f"<dt>{esc(term)}</dt><dd>{esc(text)}</dd>" for term, text in _DEFINITIONS)
    if data.provenance:
        provenance = _key_value_table("table-provenance", [(r["key"], r["value"]) for r in data.provenance])
    else:
        provenance = "<p>The database holds no provenance entries.</p>"
    software_rows = "".join(
        "<tr>" + "".join(_td(esc(r[k] or MISSING)) for k in ("nagl_version", "torch_version", "python_version",
                                                            "git_commit", "backbone_identity"))
        + _td(str(r["n_runs"]), cls="num") + "</tr>" for r in data.software)
    software = (
        '<table id="table-software" class="data"><thead><tr><th>nagl</th><th>torch</th><th>Python</th>'
        "<th>Git commit</th><th>Backbone identity</th><th>Cells</th></tr></thead>"
        f"<tbody>{software_rows}</tbody></table>") if data.software else ""
    dataset_rows = "".join(
        "<tr>" + "".join([_td(esc(r["name"])), _td(esc(r["domain"])), _td(f"<code>{esc(r['content_hash'])}</code>"),
                          _td(str(r["n_categories"]), cls="num"), _td(str(r["n_images"]), cls="num"),
                          _td(str(r["n_anomalous"]), cls="num"), _td("yes" if r["has_masks"] else "no")])
        + "</tr>" for r in data.datasets)
    datasets = (
        '<table id="table-datasets" class="data"><thead><tr><th>Dataset</th><th>Domain</th>'
        "<th>Content hash (DVC)</th><th>Categories</th><th>Images</th><th>Anomalous</th><th>Masks</th>"
        f"</tr></thead><tbody>{dataset_rows}</tbody></table>") if data.datasets else (
        "<p>The database lists no datasets.</p>")
    return (
        '<section id="definitions"><h2>Definitions and provenance</h2>'
        "<h3>Protocol</h3><p>Each method is trained on one source dataset only (training-free methods on "
        "none) and tested on every target category with k normal and k abnormal reference images drawn "
        "once per (category, seed) by a seeded generator, nested across shot settings and removed from "
        "the queries, so all methods are scored on identical queries. Metrics are macro-averaged over a "
        "target's categories, cross-domain means leave out source = target cells, and every aggregate is "
        "reported as mean ± standard deviation over seeds.</p>"
        f"<h3>Metrics</h3><dl>{terms}</dl>"
        f"<h3>Software</h3>{software}"
        f"<h3>Datasets</h3>{datasets}"
        f"<h3>Run provenance</h3>{provenance}</section>")


def footer(generated: str) -> str:
    """The only line that changes between two builds from the same database."""
    return f'<footer><p id="generated-at">Report generated {esc(generated)}.</p></footer>'

