"""The record says what pytest said; sessions that use no machine take none."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pytest_runs import Run, Status, Store


def final_line(result: pytest.RunResult) -> str:
    """pytest's own final line, without its timing: ``1 failed, 3 passed, 2 rerun``."""
    line = next(line for line in reversed(result.outlines) if re.search(r" in \d+\.\d+s", line))
    return re.sub(r"^=+ | in \d+\.\d+s.*$", "", line)


@pytest.mark.parametrize(
    ("source", "args"),
    [
        (
            "import itertools\ncount = itertools.count()\n"
            "def test_flaky(): assert next(count) >= 2\n"
            "def test_bad(): assert False\n"
            "def test_a(): pass\ndef test_b(): pass\n",
            ["-p", "rerunfailures", "--reruns", "2"],
        ),
        (
            "import unittest\nclass T(unittest.TestCase):\n"
            "    def test_sub(self):\n"
            "        for i in range(5):\n"
            "            with self.subTest(i=i):\n"
            "                self.assertLess(i, 4)\n"
            "def test_p(): pass\ndef test_q(): pass\n",
            [],
        ),
        ("import pytest\n@pytest.mark.xfail\ndef test_x(): assert 0\ndef test_w():\n    import warnings\n"
         "    warnings.warn('careful')\n", []),
    ],
    ids=["reruns", "subtests", "xfail-and-warnings"],
)  # fmt: skip
def test_the_summary_is_pytests_own_final_line(
    pytester: pytest.Pytester, tmp_path: Path, source: str, args: list[str]
) -> None:
    pytester.makepyfile(test_counted=source)
    state = tmp_path / "state"
    result = pytester.runpytest_subprocess("--runs-machine=rig-1", f"--runs-state-dir={state}", *args)
    (run,) = Store(state).list()
    assert run.summary is not None
    assert run.summary["text"] == final_line(result)
    if run.status is Status.FAILED:
        assert run.error_msg == final_line(result)
    else:
        assert run.error_msg == ""
    assert isinstance(run.summary["duration"], float) and run.summary["duration"] >= 0
    for word, number in run.summary["counts"].items():
        assert f"{number} {word}" in final_line(result)


def test_a_killed_xdist_worker_is_counted_as_pytest_counts_it(pytester: pytest.Pytester, tmp_path: Path) -> None:
    pytester.makepyfile(
        test_kill="""
        import os, pytest
        @pytest.mark.parametrize("n", range(8))
        def test_n(n):
            if n == 3:
                os._exit(1)
        """
    )
    state = tmp_path / "state"
    result = pytester.runpytest_subprocess(
        "--runs-machine=rig-1", f"--runs-state-dir={state}", "-n", "2", "-p", "xdist"
    )
    (run,) = Store(state).list()
    assert run.summary is not None and run.summary["text"] == final_line(result) == run.error_msg


@pytest.mark.parametrize(
    "option", ["--collect-only", "--fixtures", "--fixtures-per-test", "--markers", "--setup-plan", "--version"]
)
def test_sessions_that_run_nothing_take_no_machine(pytester: pytest.Pytester, tmp_path: Path, option: str) -> None:
    state = tmp_path / "state"
    holder, _ = Store(state).prepare_atomic("rig-1", "f" * 64, Run)
    pytester.makepyfile("import pytest\n@pytest.fixture\ndef rig(): return 1\ndef test_a(rig): pass\n")
    result = pytester.runpytest_subprocess("--runs-machine=rig-1", f"--runs-state-dir={state}", option)
    assert result.ret == 0, "a busy machine does not matter to a session that uses none"
    assert "busy" not in result.stdout.str() + result.stderr.str()
    if option == "--fixtures":
        result.stdout.fnmatch_lines(["*rig*"])
    assert Store(state).list() == [holder], "nothing recorded"


def test_junitxml_links_back_to_the_run(pytester: pytest.Pytester, tmp_path: Path) -> None:
    state = tmp_path / "state"
    pytester.makepyfile("def test_a(): pass\n")
    report = tmp_path / "junit.xml"
    result = pytester.runpytest_subprocess(
        "--runs-machine=rig-1", f"--runs-state-dir={state}", f"--junitxml={report}", "--runs-batch=nightly-7"
    )
    assert result.ret == 0
    (run,) = Store(state).list()
    xml = report.read_text()
    for name, value in (
        ("pytest_runs_run_id", run.id),
        ("pytest_runs_machine", "rig-1"),
        ("pytest_runs_fence", "1"),
        ("pytest_runs_batch", "nightly-7"),
    ):
        assert f'<property name="{name}" value="{value}" />' in xml


def test_without_a_terminal_plugin_the_session_is_tracked_as_usual(pytester: pytest.Pytester, tmp_path: Path) -> None:
    pytester.makepyfile("def test_a(): pass\ndef test_b(): assert 0\n")
    state = tmp_path / "state"
    result = pytester.runpytest_subprocess("--runs-machine=rig-1", f"--runs-state-dir={state}", "-p", "no:terminal")
    assert result.ret == 1, result.stderr.str()
    (run,) = Store(state).list()
    assert (run.status, run.error_msg) == (Status.FAILED, "1 failed, 1 passed")


def test_a_pytest_exit_reason_is_recorded(pytester: pytest.Pytester, tmp_path: Path) -> None:
    pytester.makepyfile("import pytest\ndef test_a(): pass\ndef test_b(): pytest.exit('the rig caught fire')\n")
    state = tmp_path / "state"
    result = pytester.runpytest_subprocess("--runs-machine=rig-1", f"--runs-state-dir={state}")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    (run,) = Store(state).list()
    assert (run.status, run.error_msg) == (Status.INTERRUPTED, "Exit: the rig caught fire")
    assert result.outlines[-1].startswith(f"pytest-runs: run {run.id} on rig-1: interrupted"), "the last line"


def test_a_pytest_run_by_a_test_is_part_of_the_outer_run(
    pytester: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tracking turned on by the environment reaches a pytest that a test runs: it must not wait on its parent."""
    state = tmp_path / "state"
    pytester.makepyfile(
        test_outer="""
        import os, subprocess, sys

        def test_runs_pytest(tmp_path):
            (tmp_path / "test_inner.py").write_text("def test_inner(): pass\\n")
            inner = subprocess.run(
                [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", str(tmp_path)],
                cwd=tmp_path, capture_output=True, text=True,
            )
            assert inner.returncode == 0, inner.stdout + inner.stderr
        """
    )
    monkeypatch.setenv("PYTEST_RUNS_MACHINE", "rig-1")
    monkeypatch.setenv("PYTEST_RUNS_STATE_DIR", str(state))
    monkeypatch.setenv("PYTEST_RUNS_ON_BUSY", "wait")
    monkeypatch.setenv("PYTEST_RUNS_WAIT_TIMEOUT", "30")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    assert result.ret == 0, result.stdout.str() + result.stderr.str()
    (run,) = Store(state).list()
    assert run.status is Status.COMPLETED, "one run: the outer session's"
