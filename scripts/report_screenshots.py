"""Screenshots of the report of a results database, for the README.

    python scripts/report_screenshots.py --db results/benchmark.duckdb --out-dir docs

builds the HTML report of the database next to the screenshots (``leaderboard.html``,
not versioned) and writes ``leaderboard.png`` (the page from its top) and
``main-table.png`` (the main table). Needs Debian's Chromium (``/usr/bin/chromium``
or ``$NAGL_CHROMIUM``) and playwright (the ``dev`` extra).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from playwright.sync_api import sync_playwright

from nagl.report import build_report

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", type=Path, required=True, help="results database (read only)")
    parser.add_argument("--out-dir", type=Path, default=Path("docs"), help="folder for the PNG files")
    args = parser.parse_args()
    chromium = Path(os.environ.get("NAGL_CHROMIUM", "/usr/bin/chromium"))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        report = build_report(args.db, Path(folder) / "leaderboard.html")
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(chromium), headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 1400}, device_scale_factor=1)
            page.goto(report.as_uri())
            page.wait_for_function("Array.from(document.querySelectorAll('div.plot'))"
                                   ".every(d => d.querySelector('svg.main-svg'))")
            page.screenshot(path=str(args.out_dir / "leaderboard.png"))
            page.locator("section#main").screenshot(path=str(args.out_dir / "main-table.png"))
            browser.close()
    print(f"wrote {args.out_dir / 'leaderboard.png'} and {args.out_dir / 'main-table.png'}")


if __name__ == "__main__":
    main()
