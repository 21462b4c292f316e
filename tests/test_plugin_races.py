"""Several real pytest processes racing for one machine."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _sessions import sigint_at_default

from pytest_runs import Status, Store
from pytest_runs.plugin import EXIT_BUSY

HOLD_UNTIL_RELEASED = """
import os, pathlib, time

def test_hold_the_machine():
    release = pathlib.Path(os.environ["RELEASE_FILE"])
    deadline = time.monotonic() + 300
    while not release.exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)
"""


def launch(
    pytester: pytest.Pytester, state_dir: Path, count: int, *args: str, **env: str
) -> list[subprocess.Popen[str]]:
    return [
        subprocess.Popen(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--runs-machine=rig-1", *args],
            cwd=pytester.path,
            env={**os.environ, "PYTEST_RUNS_STATE_DIR": str(state_dir), **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=sigint_at_default,
        )
        for _ in range(count)
    ]


def test_with_fail_exactly_one_session_runs(pytester: pytest.Pytester, tmp_path: Path) -> None:
    pytester.makepyfile(HOLD_UNTIL_RELEASED)
    state_dir, release = tmp_path / "state", tmp_path / "release"
    sessions = launch(pytester, state_dir, 4, RELEASE_FILE=str(release))
    # Hold the winner's test until every loser has given up, so that they truly overlap.
    deadline = time.monotonic() + 240
    while sum(s.poll() is not None for s in sessions) < len(sessions) - 1:
        assert time.monotonic() < deadline, "the losing sessions did not give up"
        time.sleep(0.05)
    release.write_text("go")
    outputs = [s.communicate(timeout=240) for s in sessions]
    codes = sorted(s.returncode for s in sessions)
    assert codes == [0, EXIT_BUSY, EXIT_BUSY, EXIT_BUSY], outputs
    (run,) = Store(state_dir).list()
    assert run.status is Status.COMPLETED
    losers = [err for s, (_, err) in zip(sessions, outputs, strict=True) if s.returncode == EXIT_BUSY]
    assert all(f"busy with run {run.id}" in err for err in losers)


def test_with_wait_sessions_run_one_after_another(pytester: pytest.Pytester, tmp_path: Path) -> None:
    pytester.makepyfile("import time\ndef test_a():\n    time.sleep(0.3)\n")
    state_dir = tmp_path / "state"
    sessions = launch(pytester, state_dir, 4, "--runs-on-busy=wait", "--runs-wait-timeout=240")
    outputs = [s.communicate(timeout=300) for s in sessions]
    assert [s.returncode for s in sessions] == [0, 0, 0, 0], outputs
    runs = sorted(Store(state_dir).list(), key=lambda r: r.started_at or 0)
    assert len(runs) == 4
    assert all(r.status is Status.COMPLETED for r in runs)
    for earlier, later in itertools.pairwise(runs):
        assert earlier.ended_at is not None and later.started_at is not None
        assert later.started_at >= earlier.ended_at, "two sessions held the machine at once"
