"""The HTML leaderboard: content, numbers, missing values, escaping, determinism, CLI."""

from __future__ import annotations

import base64
import datetime as dt
import json
import math
import re
from html import escape
from html.parser import HTMLParser
from pathlib import Path

import duckdb
import pytest
from report_fixtures import (
    DEFECTS,
    METHODS,
    NO_MASK_TARGET,
    ODD_TARGET,
    SCHEMA,
    TARGETS,
    build_results_db,
    dataset_hash,
)
from typer.testing import CliRunner

from nagl.errors import NaglError
from nagl.report import build_report
from nagl.report.build import json_for_script

WHEN = dt.datetime(2025, 7, 1, 9, 30, tzinfo=dt.UTC)
HEADLINE = (("image", "auroc"), ("pixel", "auroc"), ("pixel", "aupro"))


# ------------------------------------------------------------------ helpers --

class _Tables(HTMLParser):
    """Collect the rows of every table with an id: attrs, and per cell its attrs, text, spans."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tables: dict[str, list[dict]] = {}
        self._table: str | None = None
        self._row: dict | None = None
        self._cell: dict | None = None
        self._span: str | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table" and "id" in attrs:
            self._table = attrs["id"]
            self.tables[self._table] = []
        elif self._table and tag == "tr":
            self._row = {"attrs": attrs, "cells": []}
        elif self._row is not None and tag in ("td", "th"):
            self._cell = {"tag": tag, "attrs": attrs, "text": "", "spans": {}}
        elif self._cell is not None and tag == "span":
            self._span = attrs.get("class")
            self._cell["spans"][self._span] = ""

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = None
        elif tag == "tr" and self._row is not None:
            self.tables[self._table].append(self._row)
            self._row = None
        elif tag in ("td", "th") and self._cell is not None:
            self._row["cells"].append(self._cell)
            self._cell = None
        elif tag == "span":
            self._span = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell["text"] += data
            if self._span:
                self._cell["spans"][self._span] += data


def tables(page: str) -> dict[str, list[dict]]:
    parser = _Tables()
    parser.feed(page)
    return parser.tables


def body_rows(rows: list[dict]) -> list[dict]:
    """Rows with data cells (not the heading row, not the shot-setting group rows)."""
    return [row for row in rows if any(cell["tag"] == "td" for cell in row["cells"])]


def without_plotly(page: str) -> str:
    start = page.index('<script id="plotly-js">')
    end = page.index("</script>", start) + len("</script>")
    return page[:start] + page[end:]


def payload(page: str) -> dict:
    match = re.search(r'<script id="report-data" type="application/json">(.*?)</script>', page, re.S)
    return json.loads(match.group(1))


def expected_leaderboard(db: Path) -> dict[tuple, tuple[float | None, float | None, int, int, int]]:
    """The headline numbers computed here, from the raw tables, without the schema's views.

    Per seed: category mean per (source, target), mean over the cross-domain
    sources of each target, mean over targets. Then mean and sample std over seeds.
    """
    with duckdb.connect(str(db), read_only=True) as con:
        rows = con.execute("""
            SELECT r.method, r.k_normal, r.k_abnormal, r.seed, r.source, r.target, r.category,
                   r.in_domain, m.level, m.metric, m.value
            FROM runs r JOIN metrics m USING (run_id)""").fetchall()
    cells: dict[tuple, list[float]] = {}
    for method, kn, ka, seed, source, target, _category, in_domain, level, metric, value in rows:
        if in_domain or value is None or (level, metric) not in HEADLINE:
            continue
        cells.setdefault((method, kn, ka, level, metric, seed, target, source), []).append(value)

    def mean(values):
        return sum(values) / len(values)

    per_source = {key: mean(values) for key, values in cells.items()}
    per_target: dict[tuple, list[float]] = {}
    for (*head, target, _source), value in per_source.items():
        per_target.setdefault((*head, target), []).append(value)
    per_seed: dict[tuple, list[float]] = {}
    for (*head, _target), values in per_target.items():
        per_seed.setdefault(tuple(head), []).append(mean(values))
    by_setting: dict[tuple, list[tuple[float, int]]] = {}
    for (*head, _seed), values in per_seed.items():
        by_setting.setdefault(tuple(head), []).append((mean(values), len(values)))
    result = {}
    for key, values in by_setting.items():
        seeds = [v for v, _ in values]
        mu = mean(seeds)
        std = math.sqrt(sum((v - mu) ** 2 for v in seeds) / (len(seeds) - 1)) if len(seeds) > 1 else None
        result[key] = (mu, std, len(seeds), max(n for _, n in values))
    return result


# ----------------------------------------------------------------- fixtures --

@pytest.fixture(scope="module")
def db(tmp_path_factory) -> Path:
    return build_results_db(tmp_path_factory.mktemp("report-db") / "benchmark.duckdb")


@pytest.fixture(scope="module")
def page(db, tmp_path_factory) -> str:
    out = build_report(db, tmp_path_factory.mktemp("report") / "leaderboard.html", generated=WHEN)
    return out.read_text(encoding="utf-8")


# -------------------------------------------------------------------- tests --

def test_all_sections_and_plots_exist_and_plotly_is_inlined_once(page):
    for section in ("main", "gains", "trust", "heatmaps", "shots", "breakdowns", "efficiency", "gallery",
                    "definitions"):
        assert f'<section id="{section}">' in page
    assert page.index('<section id="main">') < page.index('<section id="heatmaps">')  # the main table first
    plot_ids = re.findall(r'<div id="([^"]+)" class="plot">', page)
    assert plot_ids == ["plot-heatmap", "plot-shots-image-auroc", "plot-shots-pixel-auroc",
                        "plot-shots-pixel-aupro", "plot-speed"]
    figures = payload(page)
    assert set(figures["plots"]) == set(plot_ids) - {"plot-heatmap"}
    assert len(figures["heatmaps"]) == 3 * 6 * 7  # methods x shot settings x metrics
    from plotly.offline import get_plotlyjs
    assert page.count(get_plotlyjs()[:400]) == 1
    rest = without_plotly(page)
    assert "<script src" not in rest and "<link" not in rest
    assert not re.search(r"(src|href)=\"https?:|@import|url\(", rest)
    found = tables(page)
    for table_id in ("main-table", "gains-table", "table-per-target", "table-per-category", "table-efficiency",
                     "table-software", "table-datasets", "table-provenance"):
        assert body_rows(found[table_id]), table_id


def main_rows(page: str) -> list[dict]:
    return [r for r in body_rows(tables(page)["main-table"]) if "method-row" in r["attrs"].get("class", "")]


def test_main_table_merges_identical_computations_and_groups_columns_by_domain(page):
    rows = main_rows(page)
    labels = [r["cells"][0]["text"] for r in rows]
    # Per k_normal: knn-normal (its 1-abnormal run, knn-naive and nagl without abnormal references are the
    # same numbers in every cell), knn-naive + 1 abnormal, nagl + 1 abnormal. Decided from the metrics.
    assert labels == ["knn-normal (also with 1 abnormal; = knn-naive, 0 abnormal; = nagl, 0 abnormal)",
                      "knn-naive + 1 abnormal", "nagl + 1 abnormal"] * 3
    groups = [r["cells"][0]["text"] for r in tables(page)["main-table"] if "group" == r["attrs"].get("class")]
    assert groups == ["Training-free · normal only", "Training-free · normal + abnormal",
                      "Trained · normal + abnormal"] * 3
    head = tables(page)["main-table"][:2]
    assert [c["text"] for c in head[0]["cells"]] == ["Method", "Industrial", "Medical", "Mean"]
    assert [c["attrs"]["colspan"] for c in head[0]["cells"][1:3]] == ["2", "1"]
    assert [c["text"] for c in head[1]["cells"]] == [f"{ODD_TARGET}3 cat.", "emb-fabric2 cat.", "emb-xray2 cat."]


def test_main_table_numbers_equal_a_direct_computation(db, page):
    expected = expected_leaderboard(db)
    rows = main_rows(page)
    for row, k_normal in zip(rows, (1, 1, 1, 2, 2, 2, 4, 4, 4), strict=True):
        method, _backbone, k_abnormal = row["attrs"]["data-members"].split("; ")[0].split("|")
        mu, std, n_seeds, n_targets = expected[(method, k_normal, int(k_abnormal), "image", "auroc")]
        mean_cell = row["cells"][-1]
        assert float(mean_cell["attrs"]["data-sort"]) == pytest.approx(mu, abs=1e-9)
        assert mean_cell["text"] == f"{mu:.3f} ± {std:.3f}"
        assert mean_cell["attrs"]["title"] == f"{n_seeds} reference seeds, 7 categories, {n_targets} targets"
    # A merged row's numbers are those of every name it stands for.
    for method in ("knn-naive", "nagl"):
        assert expected[(method, 4, 0, "image", "auroc")] == pytest.approx(expected[("knn-normal", 4, 0, "image", "auroc")])


def test_main_table_bold_is_the_column_best_and_in_domain_cells_are_marked_and_left_out(db, page):
    rows = main_rows(page)
    for block in (rows[0:3], rows[3:6], rows[6:9]):
        for column in range(1, 5):
            values = [float(r["cells"][column]["attrs"]["data-sort"]) for r in block]
            classes = [r["cells"][column]["attrs"]["class"] for r in block]
            assert classes[values.index(max(values))] == "num best1"
            assert classes[values.index(sorted(values)[-2])] == "num best2"
            assert sum("best" in c for c in classes) == 2
    nagl = rows[-1]
    assert all(c["text"].endswith("†") for c in nagl["cells"][1:4]) and not nagl["cells"][4]["text"].endswith("†")
    assert not any("†" in c["text"] for r in rows if not r["cells"][0]["text"].startswith("nagl") for c in r["cells"])
    with duckdb.connect(str(db), read_only=True) as con:
        with_in_domain = con.execute("""
            SELECT AVG(value) FROM (
                SELECT seed, AVG(value) AS value FROM (
                    SELECT seed, target, AVG(value) AS value FROM target_means
                    WHERE method = 'nagl' AND k_normal = 4 AND k_abnormal = 1
                      AND level = 'image' AND metric = 'auroc'
                    GROUP BY seed, target) GROUP BY seed)""").fetchone()[0]
    assert abs(float(nagl["cells"][4]["attrs"]["data-sort"]) - with_in_domain) > 0.005


def test_abnormal_reference_gains_are_paired_differences_over_seeds(db, page):
    rows = body_rows(tables(page)["gains-table"])
    assert [r["cells"][0]["text"] for r in rows] == [f"{m}: 1 − 0 abnormal" for m in
                                                     ("knn-naive", "knn-normal", "nagl")] * 3
    with duckdb.connect(str(db), read_only=True) as con:
        per_seed = dict(con.execute("""
            SELECT seed, AVG(CASE WHEN k_abnormal = 1 THEN value END) - AVG(CASE WHEN k_abnormal = 0 THEN value END)
            FROM target_means WHERE method = 'nagl' AND k_normal = 2 AND NOT in_domain AND target = 'emb-fabric'
              AND level = 'image' AND metric = 'auroc' GROUP BY seed""").fetchall())
    nagl = rows[5]
    fabric = nagl["cells"][2]
    values = list(per_seed.values())
    mu = sum(values) / 3
    sd = math.sqrt(sum((v - mu) ** 2 for v in values) / 2)
    assert float(fabric["attrs"]["data-sort"]) == pytest.approx(mu, abs=1e-9)
    assert fabric["text"] == f"{mu:+.3f} ± {sd:.3f}" and mu > 0.03
    knn_normal = rows[4]
    assert all(c["text"] == "+0.000 ± 0.000" for c in knn_normal["cells"][1:])  # it ignores the reference


def test_trust_sections_say_not_computed_until_their_data_exists(db, page, tmp_path):
    trust = page.split('<section id="trust">')[1].split("</section>")[0]
    assert trust.count("Not computed") == 2
    assert "the <code>reference_checks</code> table is empty" in trust and "no cell was run under both" in trust

    copy = build_results_db(tmp_path / "trust.duckdb")
    with duckdb.connect(str(copy)) as con:
        con.execute("""INSERT INTO reference_checks
            SELECT r.run_id, 'other-category-anomaly', m.value - 0.1, NULL FROM runs r JOIN metrics m USING (run_id)
            WHERE r.method = 'nagl' AND NOT r.in_domain AND m.level = 'image' AND m.metric = 'auroc'""")
    html = build_report(copy, tmp_path / "trust.html", generated=WHEN).read_text(encoding="utf-8")
    checks = body_rows(tables(html)["table-reference-checks"])
    assert len(checks) == 1
    assert [c["text"] for c in checks[0]["cells"]][:3] == ["nagl", "effnet-lite0", "other-category-anomaly"]
    assert checks[0]["cells"][5]["text"] == "-0.100" and checks[0]["cells"][-1]["text"] == str(2 * 7 * 6 * 3)
    inflation = html.split('<h3 id="protocol-inflation">')[1].split("</h3>")[1]
    assert inflation.startswith('<p class="not-computed">Not computed: no cell was run under both')
    assert main_rows(html) == main_rows(page)  # clean runs only: the same main table


def test_latex_export_has_the_table_shape_and_escapes_names(db, tmp_path):
    from nagl.cli.main import _app

    out = tmp_path / "table.tex"
    result = CliRunner().invoke(_app, ["report", "--db", str(db), "--out", str(out), "--format", "latex"])
    assert result.exit_code == 0, result.output
    tex = out.read_text(encoding="utf-8")
    assert "\\begin{tabular}{lcccc}" in tex and "\\toprule" in tex and "\\bottomrule" in tex
    rows = [line for line in tex.splitlines() if line.endswith("\\\\") and "$" in line]
    assert len(rows) == 3 * 3  # 3 blocks x 3 distinct computations
    assert all(line.count(" & ") == 4 for line in rows)  # method + 3 targets + mean
    assert "emb-\\textless{}b\\textgreater{}\\&\"metal" in tex and "<b>" not in tex
    assert "\\multicolumn{2}{c}{Industrial} & \\multicolumn{1}{c}{Medical}" in tex
    assert sum(line.count("\\mathbf{") for line in rows) == 3 * 4  # one best per column per block
    csv_out = tmp_path / "table.csv"
    assert CliRunner().invoke(_app, ["report", "--db", str(db), "--out", str(csv_out), "-f", "csv"]).exit_code == 0
    import csv
    lines = list(csv.reader(csv_out.open(encoding="utf-8")))
    assert len(lines) == 1 + 9 and lines[0][4] == f"{ODD_TARGET} mean" and len(lines[0]) == 4 + 2 * 4 + 4
    bad = CliRunner().invoke(_app, ["report", "--db", str(db), "--format", "pdf"])
    assert bad.exit_code != 0 and "--format 'pdf' is not known" in str(bad.exception)


def test_domain_groups_and_spread_with_training_seeds():
    from nagl.report.main_table import domain_group, summarize

    assert [domain_group(d) for d in ("objects", "industrial-texture", "industrial", "medical-microscopy",
                                      "medical", "semantic", "aerial")] == [
        "industrial", "industrial", "industrial", "medical", "medical", "semantic", "aerial"]
    reference_only = summarize({(None, 0): 0.8, (None, 1): 0.9, (None, 2): None})
    assert (reference_only.mean, reference_only.n_ref, reference_only.sd_train) == (pytest.approx(0.85), 2, None)
    assert reference_only.sd_ref == pytest.approx(math.sqrt(0.005))
    both = summarize({(0, 0): 0.8, (0, 1): 0.9, (1, 0): 0.6, (1, 1): 0.6})
    assert both.mean == pytest.approx(0.725) and both.n_train == 2 and both.n_ref == 2
    assert both.sd_train == pytest.approx(math.sqrt(2) * 0.125)  # sd of the training seeds' means 0.85, 0.6
    assert both.sd_ref == pytest.approx(math.sqrt(0.005) / 2)  # mean of the per-training-seed sds
    assert both.text() == f"0.725 ± {math.sqrt(0.005) / 2:.3f} (train ± {math.sqrt(2) * 0.125:.3f})"


def test_missing_values_are_shown_as_missing_never_zero(db, page, tmp_path):
    per_target = body_rows(tables(page)["table-per-target"])
    no_mask = [r for r in per_target if r["attrs"]["data-target"] == NO_MASK_TARGET]
    assert len(no_mask) == len(METHODS) * 6
    for row in no_mask:
        pixel = [c for c in row["cells"] if c["attrs"].get("data-metric", "").startswith("pixel-")]
        assert len(pixel) == 4 and all(c["text"] == "—" and c["attrs"]["data-sort"] == "" for c in pixel)
        image = [c for c in row["cells"] if c["attrs"].get("data-metric", "").startswith("image-")]
        assert all(re.fullmatch(r"0\.\d{3} ± 0\.\d{3}", c["text"]) for c in image)
    heatmaps = payload(page)["heatmaps"]
    column = list(sorted(TARGETS)).index(NO_MASK_TARGET)
    pixel_auroc = heatmaps["2|0|3"]["data"][0]  # nagl, 1N + 0A, pixel AUROC
    assert all(row[column] is None for row in pixel_auroc["z"])
    assert all(row[column].split("<br>")[0] == "—" for row in pixel_auroc["text"])
    # ... and the report says why, naming exactly the targets without masks.
    note = re.search(r'<p class="note" id="image-level-note">(.*?)</p>', page).group(1)
    assert escape(NO_MASK_TARGET) in note and "image-level labels only" in note
    assert not any(escape(t) in note for t in TARGETS if t != NO_MASK_TARGET)

    # A method with no pixel values at all: its breakdown cells say so instead of 0.
    copy = build_results_db(tmp_path / "nulls.duckdb")
    with duckdb.connect(str(copy)) as con:
        con.execute("UPDATE metrics SET value = NULL WHERE level = 'pixel' AND run_id IN "
                    "(SELECT run_id FROM runs WHERE method = 'knn-naive')")
    html = build_report(copy, tmp_path / "nulls.html", generated=WHEN).read_text(encoding="utf-8")
    breakdown = [r for r in body_rows(tables(html)["table-per-target"])
                 if r["attrs"]["data-method-key"].startswith("knn-naive|")]
    assert len(breakdown) == len(TARGETS) * 6
    assert all(c["text"] == "—" for r in breakdown for c in r["cells"]
               if c["attrs"].get("data-metric", "").startswith("pixel-"))
    assert all(v is None for row in payload(html)["heatmaps"]["0|5|6"]["data"][0]["z"] for v in row)


def test_every_string_from_data_is_escaped(page):
    rest = without_plotly(page)
    assert "<b>" not in rest and "</b>" not in rest
    assert "<script>alert" not in rest
    assert rest.count("</script>") == 2  # the data and the page script; plotly's was cut above
    assert 'emb-&lt;b&gt;&amp;&quot;metal' in rest  # dataset name in tables
    assert 'weave&lt;b&gt;&amp;&quot;' in rest  # category name
    assert "crack&lt;b&gt;&amp;&quot;" in rest  # defect type, in the gallery captions
    assert "&lt;/script&gt;&lt;script&gt;alert(1)&lt;/script&gt;" in rest  # config text
    data_block = rest.split('<script id="report-data" type="application/json">')[1].split("</script>")[0]
    assert "<" not in data_block and ">" not in data_block and "&" not in data_block
    labels = payload(page)["heatmaps"]["0|0|0"]["data"][0]["x"]
    assert "emb-&lt;b&gt;&amp;&#34;metal" in labels  # entity-escaped for plotly's label renderer


def test_json_for_script_cannot_close_the_script_element():
    value = {"name": '</script><script>alert("x")</script>', "note": "<!-- & \u2028"}
    text = json_for_script(value)
    assert "</" not in text and "<!--" not in text and "\u2028" not in text
    assert json.loads(text) == value


def test_gallery_embeds_queries_masks_and_cross_domain_maps(db, page):
    images = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)" alt="([^"]*)">', page)
    queries = len(TARGETS) * (len(DEFECTS) + 1)
    masks = (len(TARGETS) - 1) * (len(DEFECTS) + 1)
    assert len(images) == queries + masks + queries * len(METHODS)
    assert all(base64.b64decode(data).startswith(b"\x89PNG") for data, _ in images)
    gallery = page.split('<section id="gallery">')[1].split("</section>")[0]
    assert gallery.count("<span class=\"missing\">image-level labels only</span>") == len(DEFECTS) + 1
    captions = re.findall(r"<figcaption>(trained on [^<]*)</figcaption>", gallery)
    assert len(captions) == queries and not any("in-domain" in c for c in captions)
    assert all(c.endswith("4N + 1A, seed 0") for c in captions)
    with duckdb.connect(str(db), read_only=True) as con:
        blob = con.execute("SELECT g.map_png FROM gallery g JOIN runs r USING (run_id) WHERE r.method = "
                           "'knn-normal' AND r.target = 'emb-fabric' AND r.k_normal = 4 AND r.k_abnormal = 1 "
                           "AND g.image_path = 'knit/test/stain/000.png'").fetchone()[0]
    assert base64.b64encode(blob).decode() in page


def test_heatmap_cells_and_in_domain_marks(db, page):
    heatmaps = payload(page)["heatmaps"]
    figure = heatmaps["2|5|0"]  # nagl, 4N + 1A, image AUROC
    trace = figure["data"][0]
    targets = sorted(TARGETS)
    with duckdb.connect(str(db), read_only=True) as con:
        means = dict(((s, t), m) for s, t, m in con.execute(
            "SELECT source, target, mean FROM pair_summary WHERE method = 'nagl' AND k_normal = 4 "
            "AND k_abnormal = 1 AND level = 'image' AND metric = 'auroc'").fetchall())
    for i, source in enumerate(targets):
        for j, target in enumerate(targets):
            assert trace["z"][i][j] == pytest.approx(means[(source, target)], abs=1e-6)
            assert ("in-domain" in trace["text"][i][j]) == (i == j)
    shapes = figure["layout"]["shapes"]
    assert [(s["x0"], s["y0"]) for s in shapes] == [(-0.5, -0.5), (0.5, 0.5), (1.5, 1.5)]
    assert heatmaps["0|0|0"]["data"][0]["y"] == ["-"] and not heatmaps["0|0|0"]["layout"]["shapes"]


def test_efficiency_and_provenance(page):
    found = tables(page)
    efficiency = {r["cells"][0]["text"]: [c["text"] for c in r["cells"]] for r in body_rows(found["table-efficiency"])}
    assert efficiency["nagl"][2:6] == ["4.61 M", "1.23 M", "5.8 min", "3"]
    assert efficiency["knn-normal"][2:6] == ["3.37 M", "0", "—", "0"]
    provenance = {r["cells"][0]["text"]: r["cells"][1]["text"] for r in found["table-provenance"]}
    assert provenance["git_commit"].startswith("c677bde") and provenance["versions.torch"] == "2.14.1"
    assert provenance["ingested_at"] == "2025-06-01T12:30:00+00:00"
    datasets = {r["cells"][0]["text"]: [c["text"] for c in r["cells"]] for r in body_rows(found["table-datasets"])}
    assert set(datasets) == set(TARGETS) and datasets[NO_MASK_TARGET][-1] == "no"
    assert datasets[ODD_TARGET][2] == dataset_hash(ODD_TARGET)
    for term in ("Image AUROC", "Image AP", "Image F1-max", "Pixel AUROC", "AUPRO@0.3"):
        assert f"<dt>{term}</dt>" in page
    assert f"Report generated {WHEN.isoformat()}." in page


def test_report_is_deterministic_apart_from_its_timestamp(db, page, tmp_path):
    later = build_report(db, tmp_path / "again.html", generated=WHEN + dt.timedelta(days=3))
    first, second = page.splitlines(), later.read_text(encoding="utf-8").splitlines()
    differing = [a for a, b in zip(first, second, strict=False) if a != b]
    assert len(first) == len(second) and len(differing) == 1 and 'id="generated-at"' in differing[0]


def test_missing_broken_and_foreign_databases_raise_naglerror(tmp_path):
    with pytest.raises(NaglError, match=r"does not exist: run `nagl run` first") as info:
        build_report(tmp_path / "nope.duckdb", tmp_path / "out.html")
    assert "nope.duckdb" in str(info.value)
    garbage = tmp_path / "garbage.duckdb"
    garbage.write_bytes(b"this is not a database" * 100)
    with pytest.raises(NaglError, match="garbage.duckdb"):
        build_report(garbage, tmp_path / "out.html")
    foreign = tmp_path / "foreign.duckdb"
    with duckdb.connect(str(foreign)) as con:
        con.execute("CREATE TABLE runs (x INTEGER)")
    with pytest.raises(NaglError, match=r"not a nagl results database: it lacks metrics"):
        build_report(foreign, tmp_path / "out.html")
    assert not (tmp_path / "out.html").exists()


def test_damaged_gallery_png_raises_naglerror(tmp_path):
    db = build_results_db(tmp_path / "damaged.duckdb")
    with duckdb.connect(str(db)) as con:
        con.execute("UPDATE gallery SET map_png = 'not a png'::BLOB "
                    "WHERE image_path = 'knit/test/stain/000.png'")
    with pytest.raises(NaglError, match=r"damaged\.duckdb: the gallery map_png of run \w+"):
        build_report(db, tmp_path / "out.html")


def test_empty_database_gives_a_report_that_says_so(tmp_path):
    db = tmp_path / "empty.duckdb"
    with duckdb.connect(str(db)) as con:
        con.execute(SCHEMA.read_text(encoding="utf-8"))
    html = build_report(db, tmp_path / "empty.html", generated=WHEN).read_text(encoding="utf-8")
    assert '<section id="no-results">' in html and "holds no evaluation runs" in html
    assert "nagl run" in html and "plotly-js" not in html and "main-table" not in html


def test_cli_report_command(db, tmp_path):
    from nagl.cli.main import _app

    out = tmp_path / "cli" / "leaderboard.html"
    result = CliRunner().invoke(_app, ["report", "--db", str(db), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output
    assert '<table id="main-table"' in out.read_text(encoding="utf-8")
    missing = CliRunner().invoke(_app, ["report", "--db", str(tmp_path / "none.duckdb"), "--out", str(out)])
    assert missing.exit_code != 0 and isinstance(missing.exception, NaglError)
    assert "run `nagl run` first" in str(missing.exception)


def test_default_paths_follow_the_project_directory(db, tmp_path, monkeypatch):
    monkeypatch.setenv("NAGL_HOME", str(tmp_path))
    monkeypatch.delenv("NAGL_RESULTS", raising=False)
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "benchmark.duckdb").write_bytes(db.read_bytes())
    out = build_report()
    assert out == tmp_path / "reports" / "leaderboard.html" and out.is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == ["leaderboard.html"]  # no temp file left
