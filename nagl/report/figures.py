"""Plotly figures as plain dicts (``{"data": [...], "layout": {...}}``).

They are drawn in the browser by the inlined plotly.js. Plain dicts keep the
file small (no template copied into every figure) and fully deterministic.
Every string that comes from the database goes through :func:`plot_text`:
plotly renders a small HTML subset in labels, so names are entity-escaped and
show literally (plotly decodes ``&lt;`` and friends when it draws).
"""

from __future__ import annotations

import html
import math
from typing import Any

from nagl.report.format import fmt_stat, shot_label
from nagl.report.queries import HEADLINE_METRICS, METRICS, ReportData, Row

Figure = dict[str, Any]

FONT = "system-ui, -apple-system, 'Segoe UI', Roboto, 'Helvetica Neue', Arial, sans-serif"
METHOD_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
ABNORMAL_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd")
_BAND_ALPHA = 0.18


def plot_text(value: Any) -> str:
    """A data string made safe and literal for plotly's HTML-like label rendering.

    plotly decodes ``&lt;``, ``&gt;``, ``&amp;`` and numeric entities (not ``&quot;``)
    when it draws, so ``<b>`` in a name shows as the three characters, not as bold.
    """
    return html.escape(str(value), quote=False).replace('"', "&#34;").replace("'", "&#39;")


def method_label(method: str, backbone: str) -> str:
    return f"{method} ({backbone})"


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), 6)


def _rgba(hex_color: str, alpha: float) -> str:
    red, green, blue = (int(hex_color[i:i + 2], 16) for i in (1, 3, 5))
    return f"rgba({red},{green},{blue},{alpha})"


def _layout(**overrides: Any) -> dict[str, Any]:
    layout: dict[str, Any] = {
        "font": {"family": FONT, "size": 12, "color": "#222"},
        "paper_bgcolor": "#ffffff",
        "plot_bgcolor": "#ffffff",
        "margin": {"l": 70, "r": 30, "t": 50, "b": 60},
        "hoverlabel": {"font": {"family": FONT}},
    }
    layout.update(overrides)
    return layout


def _message_figure(title: str, message: str) -> Figure:
    return {"data": [], "layout": _layout(
        title={"text": title}, height=220,
        xaxis={"visible": False}, yaxis={"visible": False},
        annotations=[{"text": message, "showarrow": False, "xref": "paper", "yref": "paper",
                      "x": 0.5, "y": 0.5, "font": {"size": 14, "color": "#666"}}])}


# ----------------------------------------------------------------- heatmaps --

def heatmap_ranges(data: ReportData) -> dict[tuple[str, str], tuple[float, float]]:
    """One colour range per metric over all methods and shot settings, so colours compare."""
    ranges: dict[tuple[str, str], tuple[float, float]] = {}
    for row in data.pairs:
        if row["mean"] is None:
            continue
        key = (row["level"], row["metric"])
        low, high = ranges.get(key, (row["mean"], row["mean"]))
        ranges[key] = (min(low, row["mean"]), max(high, row["mean"]))
    # Widened outwards to 3 decimals, so no cell falls outside the scale.
    return {key: (math.floor(low * 1000) / 1000, max(math.ceil(high * 1000), math.floor(low * 1000) + 1) / 1000)
            for key, (low, high) in ranges.items()}


def heatmap_figure(rows: list[Row], targets: list[str], title: str,
                   zrange: tuple[float, float] | None) -> Figure:
    """Source x target grid of mean +- std over seeds; in-domain cells are outlined."""
    if not rows:
        return _message_figure(title, "no evaluation cells for this method and shot setting")
    sources = sorted({row["source"] for row in rows})
    cells = {(row["source"], row["target"]): row for row in rows}
    z, text, hover, shapes = [], [], [], []
    for y, source in enumerate(sources):
        z_row, text_row, hover_row = [], [], []
        for x, target in enumerate(targets):
            row = cells.get((source, target))
            mean = row["mean"] if row else None
            z_row.append(_round(mean))
            cell = "—" if mean is None else f"{mean:.3f}"
            details = "no cell" if row is None else (
                f"{fmt_stat(mean, row['std'])}<br>{row['n_seeds']} seeds, {row['n_categories']} categories")
            if row and row["in_domain"]:
                cell += "<br>in-domain"
                details += "<br>in-domain: not in cross-domain means"
                shapes.append({"type": "rect", "xref": "x", "yref": "y",
                               "x0": x - 0.5, "x1": x + 0.5, "y0": y - 0.5, "y1": y + 0.5,
                               "line": {"color": "#000000", "width": 3, "dash": "dot"}})
            text_row.append(cell)
            hover_row.append(details)
        z.append(z_row)
        text.append(text_row)
        hover.append(hover_row)
    trace: dict[str, Any] = {
        "type": "heatmap", "z": z, "text": text, "customdata": hover,
        "x": [plot_text(t) for t in targets], "y": [plot_text(s) for s in sources],
        "texttemplate": "%{text}",
        "hovertemplate": "source %{y}<br>target %{x}<br>%{customdata}<extra></extra>",
        "colorscale": "Viridis", "hoverongaps": False, "xgap": 2, "ygap": 2,
        "colorbar": {"thickness": 14},
    }
    if zrange is not None:
        trace["zmin"], trace["zmax"] = zrange
    return {"data": [trace], "layout": _layout(
        title={"text": title}, height=160 + 70 * len(sources), shapes=shapes,
        plot_bgcolor="#e4e4e4",
        xaxis={"title": {"text": "target dataset"}, "type": "category", "showgrid": False, "automargin": True},
        yaxis={"title": {"text": "source dataset"}, "type": "category", "showgrid": False,
               "autorange": "reversed", "automargin": True},
        margin={"l": 130, "r": 30, "t": 50, "b": 70})}


def heatmap_figures(data: ReportData) -> dict[str, Figure]:
    """Every (method, shot setting, metric) heatmap, keyed ``"<method>|<shot>|<metric>"`` by index."""
    ranges = heatmap_ranges(data)
    grouped: dict[tuple, list[Row]] = {}
    for row in data.pairs:
        key = (row["method"], row["backbone"], row["k_normal"], row["k_abnormal"], row["level"], row["metric"])
        grouped.setdefault(key, []).append(row)
    figures: dict[str, Figure] = {}
    for m_index, (method, backbone) in enumerate(data.methods):
        for s_index, (k_normal, k_abnormal) in enumerate(data.shots):
            for x_index, (level, metric, label) in enumerate(METRICS):
                rows = grouped.get((method, backbone, k_normal, k_abnormal, level, metric), [])
                title = f"{plot_text(method_label(method, backbone))} · {shot_label(k_normal, k_abnormal)} · {label}"
                figures[f"{m_index}|{s_index}|{x_index}"] = heatmap_figure(
                    rows, data.targets, title, ranges.get((level, metric)))
    return figures


# -------------------------------------------------------------- shot curves --

def shot_curve_figure(data: ReportData, level: str, metric: str, label: str) -> Figure:
    """Metric against k_normal, one panel per method, one line per k_abnormal, +-1 seed std band."""
    k_normals = sorted({k for k, _ in data.shots})
    k_abnormals = sorted({k for _, k in data.shots})
    n = len(data.methods)
    gap = 0.05
    width = (1 - gap * (n - 1)) / n
    traces: list[dict[str, Any]] = []
    layout = _layout(title={"text": f"{label}: cross-domain mean ± 1 std over seeds"}, height=380,
                     legend={"title": {"text": "abnormal refs"}, "orientation": "h", "y": -0.22},
                     margin={"l": 70, "r": 30, "t": 80, "b": 90})
    annotations = []
    for i, (method, backbone) in enumerate(data.methods):
        suffix = "" if i == 0 else str(i + 1)
        x0 = i * (width + gap)
        layout[f"xaxis{suffix}"] = {"domain": [x0, x0 + width], "type": "log", "tickvals": k_normals,
                                    "ticktext": [str(k) for k in k_normals], "anchor": f"y{suffix}",
                                    "title": {"text": "k_normal"}, "gridcolor": "#e6e6e6"}
        layout[f"yaxis{suffix}"] = {"anchor": f"x{suffix}", "gridcolor": "#e6e6e6", "zeroline": False}
        if i:
            layout[f"yaxis{suffix}"]["matches"] = "y"
        else:
            layout["yaxis"]["title"] = {"text": label}
        annotations.append({"text": plot_text(method_label(method, backbone)), "showarrow": False,
                            "xref": "paper", "yref": "paper", "x": x0 + width / 2, "y": 1.0,
                            "yanchor": "bottom", "font": {"size": 13}})
        for j, k_abnormal in enumerate(k_abnormals):
            color = ABNORMAL_COLORS[j % len(ABNORMAL_COLORS)]
            points = []
            for k_normal in k_normals:
                row = data.leaderboard.get((method, backbone, k_normal, k_abnormal, level, metric))
                if row is not None and row["mean"] is not None:
                    points.append((k_normal, row["mean"], row["std"], row["n_seeds"]))
            if not points:
                continue
            banded = [p for p in points if p[2] is not None]
            if banded:
                upper = [_round(mean + std) for _, mean, std, _ in banded]
                lower = [_round(mean - std) for _, mean, std, _ in banded]
                xs = [k for k, *_ in banded]
                traces.append({"type": "scatter", "mode": "lines", "x": xs + xs[::-1], "y": upper + lower[::-1],
                               "fill": "toself", "fillcolor": _rgba(color, _BAND_ALPHA), "line": {"width": 0},
                               "hoverinfo": "skip", "showlegend": False, "legendgroup": f"a{k_abnormal}",
                               "xaxis": f"x{suffix}", "yaxis": f"y{suffix}"})
            traces.append({
                "type": "scatter", "mode": "lines+markers", "name": f"k_abnormal = {k_abnormal}",
                "legendgroup": f"a{k_abnormal}", "showlegend": i == 0,
                "x": [p[0] for p in points], "y": [_round(p[1]) for p in points],
                "customdata": [[fmt_stat(mean, std), seeds] for _, mean, std, seeds in points],
                "hovertemplate": (f"{plot_text(method)}<br>k_normal %{{x}}, k_abnormal {k_abnormal}"
                                  "<br>%{customdata[0]} (%{customdata[1]} seeds)<extra></extra>"),
                "line": {"color": color, "width": 2}, "marker": {"size": 7},
                "xaxis": f"x{suffix}", "yaxis": f"y{suffix}"})
    layout["annotations"] = annotations
    if not traces:
        return _message_figure(label, "no cross-domain values for this metric")
    return {"data": traces, "layout": layout}


def shot_curve_figures(data: ReportData) -> dict[str, Figure]:
    return {f"plot-shots-{level}-{metric}": shot_curve_figure(data, level, metric, label)
            for level, metric, label in HEADLINE_METRICS}


# --------------------------------------------------------------- efficiency --

def speed_accuracy_figure(data: ReportData) -> Figure:
    """Cross-domain image AUROC against images/s, one point per (method, shot setting)."""
    traces = []
    for i, (method, backbone) in enumerate(data.methods):
        points = []
        for k_normal, k_abnormal in data.shots:
            row = data.leaderboard.get((method, backbone, k_normal, k_abnormal, "image", "auroc"))
            speed = data.speed.get((method, backbone, k_normal, k_abnormal))
            if row is None or row["mean"] is None or speed is None:
                continue
            points.append((speed, row["mean"], row["std"], shot_label(k_normal, k_abnormal)))
        if not points:
            continue
        traces.append({
            "type": "scatter", "mode": "markers", "name": plot_text(method_label(method, backbone)),
            "x": [_round(p[0]) for p in points], "y": [_round(p[1]) for p in points],
            "error_y": {"type": "data", "array": [_round(p[2] or 0.0) for p in points], "thickness": 1},
            "text": [p[3] for p in points],
            "hovertemplate": (f"{plot_text(method)}<br>%{{text}}<br>%{{x:.1f}} images/s"
                              "<br>image AUROC %{y:.3f}<extra></extra>"),
            "marker": {"size": 10, "color": METHOD_COLORS[i % len(METHOD_COLORS)],
                       "line": {"width": 1, "color": "#ffffff"}},
        })
    if not traces:
        return _message_figure("Accuracy versus speed", "no cross-domain image AUROC to plot")
    return {"data": traces, "layout": _layout(
        title={"text": "Accuracy versus speed (one point per shot setting)"}, height=420,
        xaxis={"title": {"text": "images / s (log scale)"}, "type": "log", "gridcolor": "#e6e6e6"},
        yaxis={"title": {"text": "cross-domain image AUROC"}, "gridcolor": "#e6e6e6"},
        legend={"orientation": "h", "y": -0.2})}
