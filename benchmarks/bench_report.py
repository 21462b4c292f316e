"""The HTML report in a real browser: how long 1,000 and 10,000 runs take to show.

    .venv/bin/python benchmarks/bench_report.py [--repeat 5]

Builds the report's figures for N runs over 20 machines and a week, writes the page, and
loads it in headless Chromium (Debian's ``chromium`` and ``chromedriver``) through
Selenium. "script" is what the page's own script measures, from parsing the data to the
last bar placed; "page" is from navigation start to the load event, as the browser times
it. Medians of ``--repeat`` loads.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service

from pytest_runs import Run, Status
from pytest_runs.report import figures, render_html

LOAD_TIME = "const t = performance.getEntriesByType('navigation')[0]; return t.loadEventEnd - t.startTime"


def lab(size: int, now: datetime) -> list[Run]:
    runs = []
    for index in range(size):
        start = now - timedelta(days=7) + timedelta(seconds=index * 7 * 86400 / size)
        status = Status.FAILED if index % 9 == 0 else Status.COMPLETED
        runs.append(
            Run(
                id=f"{start:%Y%m%d-%H%M%S-%f}-{index:06x}",
                machine=f"rig-{index % 20:02d}",
                test_dir_hash=f"{index % 40:064x}",
                status=status,
                exit_code=0 if status is Status.COMPLETED else 1,
                started_at=start,
                ended_at=start + timedelta(minutes=20),
                owner_host=f"ci-{index % 5}",
                summary={"text": "44 passed"},
                fence=index,
            )
        )
    runs.reverse()  # newest first, as the store gives them
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000])
    args = parser.parse_args()
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    now = datetime.now(UTC)
    print("| runs | page KiB | script ms (median) | page load ms (median) |")
    print("|---|---|---|---|")
    try:
        with tempfile.TemporaryDirectory() as folder:
            for size in args.sizes:
                page = Path(folder) / f"report-{size}.html"
                page.write_text(render_html(figures(lab(size, now), [], now=now, since=now - timedelta(days=8))))
                script, load = [], []
                for _ in range(args.repeat):
                    driver.get(page.as_uri())
                    script.append(float(driver.execute_script("return document.body.dataset.renderMs")))
                    load.append(float(driver.execute_script(LOAD_TIME)))
                kib = page.stat().st_size / 1024
                print(f"| {size:,} | {kib:.0f} | {statistics.median(script):.0f} | {statistics.median(load):.0f} |")
    finally:
        driver.quit()
    print(f"headless Chromium, {args.repeat} loads each; {now:%Y-%m-%d}")


if __name__ == "__main__":
    main()
