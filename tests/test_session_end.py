"""How a session's end is recorded when other plugins take part in it (issue 17, points 13 and 16).

- A SIGTERM that lands while another plugin's old-style hook wrapper is on the stack (hypothesis has
  two) is an interrupt, exit status 2, also under ``filterwarnings = error``.
- ``summary.duration`` is the duration pytest's final line shows, whatever other plugins do at the end.
- An interrupted run's summary says what was interrupted, and after which results.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _sessions import sigint_at_default

from pytest_runs import Run, Status, Store

#: Far beyond what any of these sessions needs, far below a hang.
BOUND = 60.0

TESTS = """
import os, pathlib, time

def test_fast():
    pass

def test_slow():
    if os.environ.get("SLEEP_IN") == "test":
        pathlib.Path(os.environ["STARTED_MARKER"]).write_text("started")
        time.sleep(60)

def test_after():
    pass
"""

# Old-style hook wrappers (``hookwrapper=True``), each with the place the signal lands in.
WRAPPERS = {
    # hypothesis's own: the report is made by the plugins inside it, and one of them is slow.
    "makereport-get-result": """
import os, pathlib, time
import pytest

@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()

@pytest.hookimpl(tryfirst=True)
def pytest_runtest_makereport(item, call):  # inside the wrapper, before pytest makes the report
    if call.when == "call" and item.name == "test_slow":
        pathlib.Path(os.environ["STARTED_MARKER"]).write_text("started")
        time.sleep(60)
""",
    # The wrapper's own work after its yield is slow.
    "makereport-teardown": """
import os, pathlib, time
import pytest

@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    yield
    if call.when == "call" and item.name == "test_slow":
        pathlib.Path(os.environ["STARTED_MARKER"]).write_text("started")
        time.sleep(60)
""",
    # Around the test itself, which is slow; the wrapper looks at the outcome.
    "call-get-result": """
import pytest

@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    outcome = yield
    outcome.get_result()
""",
}


def start(folder: Path, state: Path, marker: Path, *, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:randomly", "--runs-machine=rig-1"],
        cwd=folder,
        env={**os.environ, "PYTEST_RUNS_STATE_DIR": str(state), "STARTED_MARKER": str(marker), **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=sigint_at_default,
    )


def wait_for(marker: Path, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + BOUND
    while not marker.exists():
        if process.poll() is not None:
            pytest.fail(f"the session ended before it got there: {process.communicate()}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("the session never got there")
        time.sleep(0.05)


def only_run(state: Path) -> Run:
    (run,) = Store(state).list()
    return run


@pytest.mark.parametrize("where", sorted(WRAPPERS))
def test_a_sigterm_inside_an_old_style_hook_wrapper_is_an_interrupt_under_filterwarnings_error(
    tmp_path: Path, where: str
) -> None:
    folder = tmp_path / "tests"
    folder.mkdir()
    (folder / "pytest.ini").write_text("[pytest]\nfilterwarnings =\n    error\n")
    (folder / "conftest.py").write_text(WRAPPERS[where])
    (folder / "test_x.py").write_text(TESTS)
    state, marker = tmp_path / "state", tmp_path / "started"
    process = start(folder, state, marker, env={"SLEEP_IN": "test" if where.startswith("call") else "hook"})
    wait_for(marker, process)
    time.sleep(0.2)  # well inside the sleep
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=BOUND)
    assert process.returncode == pytest.ExitCode.INTERRUPTED, (out, err)
    assert "INTERNALERROR" not in out + err
    assert "PluggyTeardownRaisedWarning" not in out + err
    assert "KeyboardInterrupt: interrupted by SIGTERM" in out
    run = only_run(state)
    assert (run.status, run.exit_code, run.error_code) == (Status.INTERRUPTED, 2, "interrupted")
    assert run.error_msg == "interrupted by SIGTERM"
    assert run.summary is not None
    assert run.summary["text"] == "interrupted during test_x.py::test_slow after 1 passed"


def test_an_interrupted_summary_says_what_was_running(tmp_path: Path) -> None:
    folder = tmp_path / "tests"
    folder.mkdir()
    (folder / "pytest.ini").write_text("[pytest]\n")
    (folder / "test_x.py").write_text(TESTS)
    state, marker = tmp_path / "state", tmp_path / "started"
    process = start(folder, state, marker, env={"SLEEP_IN": "test"})
    wait_for(marker, process)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=BOUND)
    assert process.returncode == pytest.ExitCode.INTERRUPTED, (out, err)
    run = only_run(state)
    assert run.status is Status.INTERRUPTED
    assert run.summary is not None
    assert run.summary["text"] == "interrupted during test_x.py::test_slow after 1 passed"
    assert run.summary["counts"] == {"passed": 1}


def test_an_interrupted_summary_before_any_test_finished(tmp_path: Path) -> None:
    folder = tmp_path / "tests"
    folder.mkdir()
    (folder / "pytest.ini").write_text("[pytest]\n")
    (folder / "test_x.py").write_text(TESTS.replace("def test_fast():\n    pass\n", ""))
    state, marker = tmp_path / "state", tmp_path / "started"
    process = start(folder, state, marker, env={"SLEEP_IN": "test"})
    wait_for(marker, process)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=BOUND)
    assert process.returncode == pytest.ExitCode.INTERRUPTED, (out, err)
    run = only_run(state)
    assert run.summary is not None
    assert run.summary["text"] == "interrupted during test_x.py::test_slow before any test had finished"
    assert run.summary["counts"] == {}


# Each sleeps 1.5 s at the end of the session, at another place around pytest-runs' own end.
SESSION_END = {
    "sessionfinish-tryfirst": "@pytest.hookimpl(tryfirst=True)\ndef pytest_sessionfinish(session):\n    SLEEP()\n",
    "sessionfinish-trylast": "@pytest.hookimpl(trylast=True)\ndef pytest_sessionfinish(session):\n    SLEEP()\n",
    "sessionfinish-hookwrapper": (
        "@pytest.hookimpl(hookwrapper=True)\ndef pytest_sessionfinish(session):\n    yield\n    SLEEP()\n"
    ),
    "sessionfinish-wrapper": (
        "@pytest.hookimpl(wrapper=True)\ndef pytest_sessionfinish(session):\n"
        "    try:\n        return (yield)\n    finally:\n        SLEEP()\n"
    ),
    # Outside pytest's final line: neither pytest nor the record counts it.
    "sessionfinish-outer-wrapper": (
        "@pytest.hookimpl(wrapper=True, tryfirst=True)\ndef pytest_sessionfinish(session):\n"
        "    try:\n        return (yield)\n    finally:\n        SLEEP()\n"
    ),
    "terminal-summary": "def pytest_terminal_summary(terminalreporter):\n    SLEEP()\n",
}
SLEEPS = 1.5


@pytest.mark.parametrize("where", sorted(SESSION_END))
def test_the_recorded_duration_is_the_one_pytest_shows(pytester: pytest.Pytester, tmp_path: Path, where: str) -> None:
    pytester.makeconftest(f"import time, pytest\n\ndef SLEEP():\n    time.sleep({SLEEPS})\n\n{SESSION_END[where]}")
    pytester.makepyfile("def test_a():\n    pass\n")
    state = tmp_path / "state"
    result = pytester.runpytest_subprocess("--runs-machine=rig-1", f"--runs-state-dir={state}")
    assert result.ret == 0
    shown = float(re.findall(r" in (\d+\.\d+)s", result.stdout.str())[-1])
    run = only_run(state)
    assert run.summary is not None
    recorded = run.summary["duration"]
    # Read from the same clock moments after pytest read it (rounded to 10 ms): a sleep's worth apart
    # only if one of them counted work the other did not.
    assert shown - 0.01 <= recorded < shown + SLEEPS / 3, (recorded, shown)
    if where != "sessionfinish-outer-wrapper":
        assert recorded >= SLEEPS


# -- the signal tests under a runner that ignores SIGINT ---------------------------------------

#: The tests that interrupt a child session with SIGINT, one per way the tests start one.
SIGINT_TESTS = (
    "tests/test_session_end.py::test_an_interrupted_summary_says_what_was_running",
    "tests/test_plugin.py::test_signal_mid_session_ends_the_run_interrupted[files-2-SIGINT]",
    "tests/test_regressions.py::test_case8_a_repeated_interrupt_is_recorded_interrupted_never_completed[two-sigint]",
)


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def test_the_sigint_tests_pass_when_the_runner_ignores_sigint(tmp_path: Path) -> None:
    """``pytest -n 2 &`` in a script starts the runner with SIGINT ignored: its child sessions must not inherit that."""
    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_XDIST_", "PYTEST_CURRENT_TEST"))}
    runner = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:xdist", "-x", "-q",
         f"--basetemp={tmp_path / 'runner'}", *SIGINT_TESTS],
        cwd=root, env=env, preexec_fn=_ignore_sigint, capture_output=True, text=True, timeout=4 * BOUND,
    )  # fmt: skip
    assert runner.returncode == 0, runner.stdout + runner.stderr
    assert f"{len(SIGINT_TESTS)} passed" in runner.stdout, runner.stdout
