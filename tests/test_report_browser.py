"""The report in a real headless Chromium: it runs, draws every plot, works offline.

Chromium is Debian's (``/usr/bin/chromium``, or ``$NAGL_CHROMIUM``), driven by
playwright with ``executable_path`` (no browser download). It writes one screenshot
per section to pytest's temporary folder; set ``NAGL_REPORT_SCREENSHOT=1`` to also
write them to ``reports/screenshots/``. (The README's screenshots of the real
default run come from ``scripts/report_screenshots.py``.)
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = Path(os.environ.get("NAGL_CHROMIUM", "/usr/bin/chromium"))
if not CHROMIUM.is_file():
    pytest.skip(f"no Chromium executable at {CHROMIUM} (apt-get install chromium, or set NAGL_CHROMIUM)",
                allow_module_level=True)

from playwright.sync_api import sync_playwright  # noqa: E402
from report_fixtures import METHODS, ODD_TARGET, build_results_db  # noqa: E402

from nagl.report import build_report  # noqa: E402

pytestmark = pytest.mark.browser

# playwright adds --headless itself; the rest are the flags Chromium needs as root in a container.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ALL_PLOTS_DRAWN = ("Array.from(document.querySelectorAll('div.plot'))"
                   ".every(d => d.querySelector('svg.main-svg'))")


@pytest.fixture(scope="module")
def browser_page(tmp_path_factory):
    folder = tmp_path_factory.mktemp("browser")
    db = build_results_db(folder / "benchmark.duckdb")
    report = build_report(db, folder / "leaderboard.html",
                          generated=dt.datetime(2025, 7, 1, tzinfo=dt.UTC))
    events: dict[str, list[str]] = {"errors": [], "requests": [], "dialogs": []}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(20_000)
        page.on("console", lambda m: m.type in ("error", "warning") and events["errors"].append(f"{m.type}: {m.text}"))
        page.on("pageerror", lambda error: events["errors"].append(f"pageerror: {error}"))
        page.on("request", lambda r: r.url.startswith(("file:", "data:")) or events["requests"].append(r.url))
        page.on("dialog", lambda d: (events["dialogs"].append(d.message), d.dismiss()))
        page.goto(report.as_uri())
        page.wait_for_function(ALL_PLOTS_DRAWN)
        yield page, events
        browser.close()


SECTION_IDS = ("main", "gains", "trust", "heatmaps", "shots", "breakdowns", "efficiency", "gallery", "definitions")


def test_one_screenshot_per_section(browser_page, tmp_path):
    """First, so it shows the report as opened (the later tests click and filter)."""
    page, events = browser_page
    folder = tmp_path / "screenshots"
    folder.mkdir()
    for section in SECTION_IDS:
        locator = page.locator(f"section#{section}")
        assert locator.is_visible() and locator.bounding_box()["height"] > 40, section
        locator.screenshot(path=str(folder / f"{section}.png"))
        assert (folder / f"{section}.png").read_bytes().startswith(b"\x89PNG")
    assert events["errors"] == []
    if os.environ.get("NAGL_REPORT_SCREENSHOT"):
        target = Path(__file__).resolve().parents[1] / "reports" / "screenshots"
        target.mkdir(parents=True, exist_ok=True)
        for shot in folder.iterdir():
            shutil.copyfile(shot, target / shot.name)


def test_main_table_bold_is_the_column_maximum_and_no_method_row_repeats(browser_page):
    page, _ = browser_page
    blocks = page.evaluate("""Array.from(document.querySelectorAll('#main-table tbody')).map(body =>
        Array.from(body.querySelectorAll('tr.method-row')).map(row => ({
            label: row.querySelector('th').textContent,
            values: Array.from(row.querySelectorAll('td')).map(td => parseFloat(td.dataset.sort)),
            bold: Array.from(row.querySelectorAll('td')).map(td => td.querySelector('strong') !== null
                && getComputedStyle(td.querySelector('strong')).fontWeight >= 700),
            underlined: Array.from(row.querySelectorAll('td')).map(td => td.querySelector('u') !== null)})))""")
    assert len(blocks) == 3
    for rows in blocks:
        labels = [row["label"] for row in rows]
        methods = [label.split(" (")[0] for label in labels]
        assert len(set(methods)) == len(methods) == 3  # each computation once: no duplicated rows
        assert len({tuple(row["values"]) for row in rows}) == len(rows)
        for column in range(len(rows[0]["values"])):
            values = [row["values"][column] for row in rows]
            bold = [row["values"][column] for row in rows if row["bold"][column]]
            assert bold == [max(values)]
            assert [row["values"][column] for row in rows if row["underlined"][column]] == [sorted(values)[-2]]


def test_no_console_errors_no_network_no_dialogs(browser_page):
    page, events = browser_page
    assert events["errors"] == []
    assert events["requests"] == []
    assert events["dialogs"] == []  # the config's "<script>alert(1)</script>" stayed text
    assert page.evaluate("typeof Plotly") == "object"


def test_every_plot_has_a_drawn_svg(browser_page):
    page, _ = browser_page
    plots = page.evaluate("""Array.from(document.querySelectorAll('div.plot')).map(d => ({
        id: d.id, traces: (d.data || []).length, svgChildren: d.querySelector('svg.main-svg').childElementCount,
        drawn: d.querySelectorAll('g.trace, g.hm').length}))""")
    assert [p["id"] for p in plots] == ["plot-heatmap", "plot-shots-image-auroc", "plot-shots-pixel-auroc",
                                        "plot-shots-pixel-aupro", "plot-speed"]
    for plot in plots:
        assert plot["traces"] > 0 and plot["svgChildren"] > 0 and plot["drawn"] > 0, plot


def test_tables_are_present_and_sort_with_missing_last(browser_page):
    page, _ = browser_page
    assert not page.locator("#table-per-target").is_visible()  # breakdowns are folded until opened
    page.locator("#details-table-per-target > summary").click()
    assert page.locator("#table-per-target").is_visible()
    assert page.locator("#table-per-category tbody tr").count() > 0
    header = page.locator("#table-per-target thead th", has_text="Pixel AUROC")
    header.locator("button").click()
    assert header.get_attribute("aria-sort") == "descending"
    keys = page.evaluate("""Array.from(document.querySelectorAll('#table-per-target tbody tr')).map(
        r => r.querySelector('td[data-metric="pixel-auroc"]').getAttribute('data-sort'))""")
    present = [float(k) for k in keys if k]
    assert present == sorted(present, reverse=True) and present
    assert keys[len(present):] == [""] * (len(keys) - len(present))  # the no-mask target, last
    page.select_option('select.row-filter[data-table="table-per-target"][data-attr="shot"]', "4|1")
    visible = page.locator("#table-per-target tbody tr:visible")
    assert visible.count() == len(METHODS) * 3
    assert all(s == "4|1" for s in visible.evaluate_all("rs => rs.map(r => r.dataset.shot)"))
    page.fill('input.text-filter[data-table="table-per-target"]', "XRAY")
    assert page.locator("#table-per-target tbody tr:visible").count() == len(METHODS)


def test_heatmap_switches_and_shows_names_literally(browser_page):
    page, _ = browser_page
    page.select_option('select[data-heatmap="method"]', str(sorted(METHODS).index("nagl")))
    page.select_option('select[data-heatmap="metric"]', "3")
    page.wait_for_function("document.querySelector('#plot-heatmap .gtitle').textContent.includes('Pixel AUROC')")
    ticks = page.locator("#plot-heatmap .xtick text").all_text_contents()
    assert ODD_TARGET in ticks  # '<b>&"' drawn as characters, not as markup
    assert page.locator("#plot-heatmap .shapelayer path").count() == 3  # the in-domain outlines
    page.select_option('select[data-heatmap="method"]', str(sorted(METHODS).index("knn-normal")))
    page.wait_for_function("document.querySelector('#plot-heatmap .gtitle').textContent.startsWith('knn-normal')")
    assert page.locator("#plot-heatmap .shapelayer path").count() == 0
    assert page.locator("#plot-heatmap .ytick text").all_text_contents() == ["-"]
