"""The HTML report: its figures, the command, and the page in a real browser (headless Chromium)."""

from __future__ import annotations

import html.parser
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from pytest_runs import Run, Status
from pytest_runs.queue import Waiter
from pytest_runs.report import figures, render_html

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
BROWSER = os.environ.get("RUNS_TEST_BROWSER", "")


def ended(
    machine: str, start_minutes_ago: float, minutes: float, status: Status = Status.COMPLETED, **fields: Any
) -> Run:
    start = NOW - timedelta(minutes=start_minutes_ago)
    return Run(machine=machine, test_dir_hash=fields.pop("test_dir_hash", "h-a"), status=status,
               exit_code=fields.pop("exit_code", 0 if status is Status.COMPLETED else 1),
               started_at=start, ended_at=start + timedelta(minutes=minutes), **fields)  # fmt: skip


def newest_first(runs: list[Run]) -> list[Run]:
    return sorted(runs, key=lambda run: run.started_at or NOW, reverse=True)


# -- the figures ------------------------------------------------------------------------


def test_utilisation_counts_overlaps_once_and_clips_to_the_window() -> None:
    runs = [
        ended("rig-1", 90, 60),  # starts before the one-hour window: 30 minutes inside
        ended("rig-1", 20, 10),
        ended("rig-1", 15, 10),  # overlaps the one before: 5 more minutes
        ended("rig-2", 200, 10),  # outside the window
    ]
    data = figures(newest_first(runs), [], now=NOW, since=NOW - timedelta(hours=1))
    by_machine = {m["machine"]: m for m in data["per_machine"]}
    assert by_machine["rig-1"]["utilisation"] == pytest.approx(45 / 60, abs=1e-3)
    assert by_machine["rig-1"]["runs"] == 3
    assert "rig-2" not in by_machine, "nothing of rig-2 in the window"
    assert by_machine["rig-1"]["median_duration"] == 600.0


def test_longest_wait_counts_recorded_waits_and_the_line_now() -> None:
    waited = ended("rig-1", 30, 5, waited_since=NOW - timedelta(minutes=42))
    line = [Waiter(["rig-1"], 0, NOW - timedelta(minutes=3), Run(owner_token="t" * 32, owner_host="ci-9"))]
    data = figures([waited], line, now=NOW, since=NOW - timedelta(hours=1))
    (rig,) = data["per_machine"]
    assert rig["longest_wait"] == 12 * 60.0
    assert rig["waiting_now"] == 1
    assert data["waiting"][0]["owner_host"] == "ci-9"


def test_a_rig_that_fails_what_passes_elsewhere_stands_out() -> None:
    runs = []
    for index in range(6):
        runs.append(ended("rig-1", 300 - index * 10, 5, test_dir_hash="h-radio"))
        runs.append(ended("rig-2", 295 - index * 10, 5, test_dir_hash="h-radio"))
        failed = Status.FAILED if index else Status.COMPLETED
        runs.append(ended("rig-3", 290 - index * 10, 5, failed, test_dir_hash="h-radio"))
    runs.append(ended("rig-3", 5, 1, Status.FAILED, test_dir_hash="h-alone"))  # ran nowhere else
    runs.append(ended("rig-1", 4, 1, Status.FAILED, exit_code=4, test_dir_hash="h-radio"))  # a usage error
    data = figures(newest_first(runs), [], now=NOW, since=NOW - timedelta(days=1))
    verdicts = {m["machine"]: m for m in data["rig_or_code"]["machines"]}
    assert verdicts["rig-3"]["stands_out"] and verdicts["rig-3"]["failure_rate"] == pytest.approx(5 / 6, abs=1e-3)
    assert not verdicts["rig-1"]["stands_out"] and verdicts["rig-1"]["runs"] == 6, "a usage error is not a verdict"
    assert verdicts["rig-1"]["failure_rate_elsewhere"] == pytest.approx(5 / 12, abs=1e-3)
    (row,) = data["rig_or_code"]["matrix"]
    assert row["test_dir_hash"] == "h-radio"
    assert row["by_machine"]["rig-3"] == {"pass": 1, "fail": 5}


# -- the command ------------------------------------------------------------------------


@pytest.fixture
def lab(tmp_path: Path) -> Path:
    """The README's example lab."""
    state = tmp_path / "state"
    subprocess.run([sys.executable, str(Path(__file__).parents[1] / "examples" / "lab_report.py"), str(state)],
                   check=True, timeout=120)  # fmt: skip
    return state


def run_command(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pytest_runs", *argv], capture_output=True, text=True, timeout=120)


def test_the_command_writes_one_self_contained_page_and_the_same_figures_as_json(lab: Path, tmp_path: Path) -> None:
    page = tmp_path / "lab.html"
    result = run_command("--state-dir", str(lab), "report", "--html", str(page), "--since", "2d")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"wrote {page} (")
    text = page.read_text()
    assert "<script src" not in text and "<link" not in text and "@import" not in text, "no network needed"
    data = json.loads(run_command("--state-dir", str(lab), "report", "--json", "--since", "2d").stdout)
    embedded = text.split('<script type="application/json" id="report-data">', 1)[1].split("</script>", 1)[0]
    assert [run["id"] for run in json.loads(embedded)["runs"]] == [run["id"] for run in data["runs"]]
    assert {m["machine"] for m in data["per_machine"]} == {"rig-1", "rig-2", "rig-3"}
    only = json.loads(run_command("--state-dir", str(lab), "report", "--json", "--machine", "rig-2").stdout)
    assert only["machines"] == ["rig-2"] and {run["machine"] for run in only["runs"]} == {"rig-2"}
    assert run_command("--state-dir", str(lab), "report").returncode == 2


def test_text_that_looks_like_markup_stays_text() -> None:
    sneaky = ended("rig-1", 10, 1, error_msg="</script><script>alert(1)</script>", owner_host="<b>host</b>")
    page = render_html(figures([sneaky], [], now=NOW, since=NOW - timedelta(hours=1)))
    assert "</script><script>alert(1)" not in page
    assert page.count("</script>") == 2, "the page's own two scripts only"


# -- in a real browser ------------------------------------------------------------------


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None or shutil.which("chromedriver") is None:
        if BROWSER == "skip":
            pytest.skip("RUNS_TEST_BROWSER=skip")
        pytest.fail("the report's browser tests need Debian's chromium and chromium-driver (.ci/run installs them)")
    return found


def headless(*args: str) -> subprocess.CompletedProcess[str]:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1300,1000"]
    return subprocess.run([chromium(), *flags, *args], capture_output=True, text=True, timeout=120)


class _Dom(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def with_class(self, name: str) -> list[dict[str, str | None]]:
        return [attrs for _, attrs in self.elements if name in (attrs.get("class") or "").split()]


def test_the_page_in_a_browser_has_its_lanes_bars_and_status_in_words(lab: Path, tmp_path: Path) -> None:
    page = tmp_path / "lab.html"
    assert run_command("--state-dir", str(lab), "report", "--html", str(page), "--since", "2d").returncode == 0
    runs = json.loads(run_command("--state-dir", str(lab), "report", "--json", "--since", "2d").stdout)["runs"]
    result = headless("--dump-dom", page.as_uri())
    assert result.returncode == 0, result.stderr
    dom = _Dom()
    dom.feed(result.stdout)
    assert [lane["data-machine"] for lane in dom.with_class("lane")] == ["rig-1", "rig-2", "rig-3"]
    bars = dom.with_class("bar")
    assert len(bars) == len(runs)
    assert {bar["data-status"] for bar in bars} >= {"completed", "failed", "running"}
    words = " ".join(dom.text)
    assert "\u2717 failed" in words and "\u2713 completed" in words, "the status in words, not only in colour"
    assert "stands out: the rig?" in words
    body = next(attrs for tag, attrs in dom.elements if tag == "body")
    assert body.get("data-ready") == "1"


def test_a_click_on_a_run_shows_its_fields(lab: Path, tmp_path: Path) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    page = tmp_path / "lab.html"
    assert run_command("--state-dir", str(lab), "report", "--html", str(page), "--since", "2d").returncode == 0
    runs = json.loads(run_command("--state-dir", str(lab), "report", "--json", "--since", "2d").stdout)["runs"]
    options = webdriver.ChromeOptions()
    options.binary_location = chromium()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1300,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        driver.get(page.as_uri())
        failed = driver.find_elements(By.CSS_SELECTOR, ".bar[data-status=failed]")[0]
        failed.click()
        run = runs[int(failed.get_attribute("data-i") or -1)]
        fields = {
            dd.get_attribute("data-field"): dd.text for dd in driver.find_elements(By.CSS_SELECTOR, "#details dd")
        }
        assert fields["ID"] == run["id"]
        assert fields["hash"] == run["test_dir_hash"]
        assert fields["fence"] == ("-" if run["fence"] is None else str(run["fence"]))
        assert fields["owner host"] == run["owner_host"]
        assert fields["CI job"] == run["owner_ci_url"]
        assert fields["summary"] == run["summary"]
        assert "selected" in (failed.get_attribute("class") or "")
        # Zoom to the last hour: the bars of earlier runs are hidden.
        driver.find_element(By.CSS_SELECTOR, "button[data-span='3600']").click()
        shown = [b for b in driver.find_elements(By.CSS_SELECTOR, ".bar") if b.is_displayed()]
        assert 0 < len(shown) < len(runs)
    finally:
        driver.quit()


def png_pixels(path: Path) -> Iterator[bytes]:
    """The decompressed scanlines of a PNG file (the filter byte of each left on)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    position, idat = 8, b""
    width, channels = 0, 4
    while position < len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        kind = data[position + 4 : position + 8]
        body = data[position + 8 : position + 8 + length]
        if kind == b"IHDR":
            width = struct.unpack(">I", body[:4])[0]
            channels = {0: 1, 2: 3, 4: 2, 6: 4}[body[9]]  # 8-bit grey, RGB, grey+alpha, RGBA
        elif kind == b"IDAT":
            idat += body
        position += 12 + length
    raw = zlib.decompress(idat)
    stride = 1 + width * channels
    for row in range(0, len(raw) - stride + 1, stride):
        yield raw[row : row + stride]


def test_a_screenshot_of_the_page_is_not_blank(lab: Path, tmp_path: Path) -> None:
    page, shot = tmp_path / "lab.html", tmp_path / "lab.png"
    assert run_command("--state-dir", str(lab), "report", "--html", str(page), "--since", "2d").returncode == 0
    result = headless(f"--screenshot={shot}", page.as_uri())
    assert result.returncode == 0 and shot.exists(), result.stderr
    rows = list(png_pixels(shot))
    assert len(rows) >= 900
    distinct = {bytes(row[1:]) for row in rows}
    assert len(distinct) > 100, "rows differ: there is something drawn"
    assert len(set(b"".join(rows[100:400]))) > 40, "many byte values: colours, not a blank page"
