"""The plugin, driven through real pytest sessions."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from _sessions import sigint_at_default
from terminal import run_on_a_terminal

from pytest_runs import PrepareOutcome, Run, Status, Store
from pytest_runs.hashing import hash_test_dir
from pytest_runs.model import parse_timestamp
from pytest_runs.plugin import EXIT_BUSY
from pytest_runs.store import open_store

PASSING = """
def test_one():
    pass

def test_two():
    pass
"""


#: Sessions run against each backend: the JSON files, and PostgreSQL (through PYTEST_RUNS_STORE).
KINDS = ("files", "postgresql")
file_only = pytest.mark.kinds("files")
# The database each test's state dir goes with, for the helpers below.
_DATABASE_OF: dict[Path, str] = {}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "store_kind" in metafunc.fixturenames:
        marker = metafunc.definition.get_closest_marker("kinds")
        metafunc.parametrize("store_kind", marker.args if marker else KINDS)


@pytest.fixture
def state_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, store_kind: str, request: pytest.FixtureRequest
) -> Iterator[Path]:
    path = tmp_path / "state"
    monkeypatch.setenv("PYTEST_RUNS_STATE_DIR", str(path))
    if store_kind == "postgresql":
        _DATABASE_OF[path] = request.getfixturevalue("pg_url")
        monkeypatch.setenv("PYTEST_RUNS_STORE", _DATABASE_OF[path])
    yield path
    _DATABASE_OF.pop(path, None)


def store_of(state_dir: Path) -> Store:
    return open_store(state_dir, _DATABASE_OF.get(state_dir))


def runs_in(state_dir: Path) -> list[Run]:
    if state_dir not in _DATABASE_OF and not (state_dir / "runs.json").exists():
        return []
    return store_of(state_dir).list()


def only_run(state_dir: Path) -> Run:
    runs = runs_in(state_dir)
    assert len(runs) == 1, runs
    return runs[0]


def occupy(state_dir: Path, machine: str = "rig-1", test_dir_hash: str = "f" * 64) -> Run:
    """Put a running run of other tests on the machine, as another session would."""
    store = store_of(state_dir)
    run, outcome = store.prepare_atomic(machine, test_dir_hash, lambda: Run(test_dir="/elsewhere"))
    assert outcome is PrepareOutcome.CREATED
    return store.start(run.id)


# pytester writes the inner session's output and temporary folders into its own folder.
PYTESTER_FILES = ["stdout", "stderr", "runpytest-*"]


def ignore_pytester_files(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nruns_hash_ignore =\n" + "".join(f"    {p}\n" for p in PYTESTER_FILES))


def the_hash(pytester: pytest.Pytester, state_dir: Path) -> str:
    return hash_test_dir(pytester.path, ignore=PYTESTER_FILES, exclude=[state_dir])


# -- off by default ---------------------------------------------------------------------


def test_without_a_machine_nothing_happens(pytester: pytest.Pytester, state_dir: Path) -> None:
    pytester.makepyfile(PASSING)
    result = pytester.runpytest()
    result.assert_outcomes(passed=2)
    assert result.ret == 0
    assert "pytest-runs" not in result.stdout.str()
    assert not state_dir.exists()


def test_options_in_help(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--help")
    result.stdout.fnmatch_lines(
        ["pytest-runs: track the session as a run on a target machine:", "*--runs-machine=NAME*"]
    )
    for flag in ["--runs-state-dir", "--runs-on-busy", "--runs-wait-timeout", "--runs-test-dir", "--runs-timeout"]:
        assert flag in result.stdout.str()
    assert "--runs-batch" in result.stdout.str() and "--runs-plan-entry" in result.stdout.str()


# -- a tracked session ------------------------------------------------------------------


def test_completed_run(pytester: pytest.Pytester, state_dir: Path) -> None:
    pytester.makepyfile(
        """
        def test_sees_its_run(runs_run, runs_artifacts_dir):
            assert runs_run.machine == "rig-1"
            assert runs_run.status.value == "running"
            (runs_artifacts_dir / "made-by-test.txt").write_text(runs_run.id)
        """
    )
    ignore_pytester_files(pytester)
    result = pytester.runpytest("--runs-machine=rig-1")
    assert result.ret == 0
    run = only_run(state_dir)
    assert run.status is Status.COMPLETED
    assert run.exit_code == 0
    assert (run.error_code, run.error_msg) == ("", "")
    assert run.started_at is not None and run.ended_at is not None and run.started_at <= run.ended_at
    assert run.test_dir == str(pytester.path)
    assert run.test_dir_hash == the_hash(pytester, state_dir)
    assert Path(run.artifacts_path, "made-by-test.txt").read_text() == run.id
    assert Path(run.artifacts_path).parent == state_dir / "runs" / run.id
    lines = result.stdout.lines
    summary = f"pytest-runs: run {run.id} on rig-1: completed (artifacts {run.artifacts_path}, log {run.logs_path})"
    assert lines[-1] == summary, "the run line is the last thing a person reads, after pytest's final line"
    assert run.summary is not None and run.summary["text"] == "1 passed" and run.summary["duration"] >= 0


def test_report_log(pytester: pytest.Pytester, state_dir: Path) -> None:
    pytester.makepyfile(
        """
        import pytest
        def test_ok(): pass
        def test_bad():
            print("said on stdout")
            assert 1 == 2, "boom"
        @pytest.mark.skip(reason="not today")
        def test_skipped(): pass
        """
    )
    result = pytester.runpytest("--runs-machine=rig-1", "--runs-batch=b7")
    assert result.ret == 1
    run = only_run(state_dir)
    lines = [json.loads(line) for line in Path(run.logs_path).read_text().splitlines()]
    assert all(parse_timestamp(line["ts"]) for line in lines), "every line has a UTC timestamp"
    start, *entries, finish = lines
    assert start["event"] == "session_start" and finish["event"] == "session_finish"
    assert (start["run_id"], start["machine"], start["fence"]) == (run.id, "rig-1", 1)
    assert start["pytest_version"] == pytest.__version__
    assert {"--runs-machine=rig-1", "--runs-batch=b7"} <= set(start["args"])
    assert (finish["status"], finish["exit_code"]) == ("failed", 1)
    assert finish["summary"]["text"] == "1 failed, 1 passed, 1 skipped" == run.error_msg
    assert run.summary is not None and run.summary["counts"] == {"failed": 1, "passed": 1, "skipped": 1}
    assert {e["event"] for e in entries} == {"report"}
    assert {e["nodeid"].split("::")[1] for e in entries} == {"test_ok", "test_bad", "test_skipped"}
    assert all(set(e) >= {"nodeid", "when", "outcome", "duration"} for e in entries)
    failed = [e for e in entries if e["outcome"] == "failed"]
    assert len(failed) == 1 and failed[0]["when"] == "call" and "boom" in failed[0]["longrepr"]
    assert ["Captured stdout call", "said on stdout\n"] in failed[0]["sections"]
    assert next(e for e in entries if e["outcome"] == "skipped")["longrepr"] == "Skipped: not today"


@pytest.mark.parametrize(
    ("source", "args", "exit_code", "error_code", "error_msg"),
    [
        ("def test_a(): assert 0\ndef test_b(): pass\ndef test_c(): pass", [], 1, "tests_failed", "1 failed, 2 passed"),
        ("x = 1", [], 5, "no_tests_collected", "no tests collected"),
        (PASSING, ["-k", "("], 4, "usage_error", "usage error"),
        ("import pytest\n@pytest.fixture\ndef f(): raise RuntimeError\ndef test_a(f): pass", [], 1, "tests_failed",
         "1 error"),
        ("raise ImportError('nope')", [], 2, "interrupted", "interrupted (KeyboardInterrupt)"),
    ],
    ids=["tests-failed", "no-tests", "usage-error", "setup-error", "collection-error"],
)  # fmt: skip
def test_exit_status_mapping(
    pytester: pytest.Pytester,
    state_dir: Path,
    source: str,
    args: list[str],
    exit_code: int,
    error_code: str,
    error_msg: str,
) -> None:
    pytester.makepyfile(test_mapping=source)
    result = pytester.runpytest("--runs-machine=rig-1", *args)
    assert result.ret == exit_code
    run = only_run(state_dir)
    expected_status = Status.INTERRUPTED if exit_code == 2 else Status.FAILED
    assert (run.status, run.exit_code, run.error_code) == (expected_status, exit_code, error_code)
    if error_code != "interrupted":
        assert run.error_msg == error_msg


def test_internal_error_ends_the_run_as_failed(pytester: pytest.Pytester, state_dir: Path) -> None:
    pytester.makeconftest("def pytest_collection_modifyitems(items): raise RuntimeError('plugin bug')")
    pytester.makepyfile(PASSING)
    result = pytester.runpytest("--runs-machine=rig-1")
    assert result.ret == 3
    run = only_run(state_dir)
    assert (run.status, run.error_code) == (Status.FAILED, "internal_error")


def test_a_later_plugin_failing_at_session_start_still_ends_the_run(pytester: pytest.Pytester, state_dir: Path) -> None:
    pytester.makeconftest("def pytest_sessionstart(session): raise RuntimeError('later plugin broke')")
    pytester.makepyfile(PASSING)
    result = pytester.runpytest("--runs-machine=rig-1")
    assert result.ret == 3
    run = only_run(state_dir)
    assert run.status is Status.FAILED
    assert run.error_code == "internal_error"
    assert run.ended_at is not None


def test_batch_and_plan_entry(pytester: pytest.Pytester, state_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makepyfile(PASSING)
    monkeypatch.setenv("PYTEST_RUNS_PLAN_ENTRY", "from-env")
    assert pytester.runpytest("--runs-machine=rig-1", "--runs-batch=b-42").ret == 0
    run = only_run(state_dir)
    assert (run.batch_id, run.plan_entry) == ("b-42", "from-env")
    assert run.to_dict()["batch_id"] == "b-42"


def test_terminal_runs_do_not_block_a_new_session(pytester: pytest.Pytester, state_dir: Path) -> None:
    pytester.makepyfile(PASSING)
    ignore_pytester_files(pytester)
    assert pytester.runpytest("--runs-machine=rig-1").ret == 0
    assert pytester.runpytest("--runs-machine=rig-1").ret == 0
    first, second = runs_in(state_dir)
    assert first.id != second.id and first.test_dir_hash == second.test_dir_hash


# -- where settings come from -----------------------------------------------------------


def test_ini_env_and_command_line_precedence(
    pytester: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ini_state, env_state, cli_state = tmp_path / "ini", tmp_path / "env", tmp_path / "cli"
    pytester.makeini(f"[pytest]\nruns_machine = from-ini\nruns_state_dir = {ini_state}\n")
    pytester.makepyfile(PASSING)
    assert pytester.runpytest().ret == 0
    assert only_run(ini_state).machine == "from-ini"

    monkeypatch.setenv("PYTEST_RUNS_MACHINE", "from-env")
    monkeypatch.setenv("PYTEST_RUNS_STATE_DIR", str(env_state))
    assert pytester.runpytest().ret == 0
    assert only_run(env_state).machine == "from-env"

    assert pytester.runpytest("--runs-machine=from-cli", f"--runs-state-dir={cli_state}").ret == 0
    assert only_run(cli_state).machine == "from-cli"
    assert len(runs_in(ini_state)) == len(runs_in(env_state)) == 1


def test_pyproject_ini_options_and_hash_ignore(pytester: pytest.Pytester, state_dir: Path) -> None:
    pytester.makepyprojecttoml(
        """
        [tool.pytest.ini_options]
        runs_machine = "board-7"
        runs_hash_ignore = ["*.log", "out", "stdout", "stderr", "runpytest-*"]
        """
    )
    pytester.makepyfile(PASSING)
    (pytester.path / "noise.log").write_text("changes every run")
    assert pytester.runpytest().ret == 0
    run = only_run(state_dir)
    assert run.machine == "board-7"
    assert run.test_dir_hash == hash_test_dir(pytester.path, ignore=["*.log", "out", *PYTESTER_FILES])
    assert run.test_dir_hash != the_hash(pytester, state_dir)


def test_default_state_dir_follows_xdg(
    pytester: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    pytester.makepyfile(PASSING)
    assert pytester.runpytest("--runs-machine=rig-1").ret == 0
    assert only_run(tmp_path / "xdg" / "pytest-runs").status is Status.COMPLETED


def test_test_dir_option(pytester: pytest.Pytester, state_dir: Path) -> None:
    pytester.makepyfile(PASSING)
    sub = pytester.mkdir("suite")
    (sub / "data.txt").write_text("x")
    assert pytester.runpytest("--runs-machine=rig-1", "--runs-test-dir=suite").ret == 0
    run = only_run(state_dir)
    assert run.test_dir == str(sub)
    assert run.test_dir_hash == hash_test_dir(sub)
    assert run.test_dir_hash != the_hash(pytester, state_dir)


# -- bad input --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--runs-machine=-bad"], "--runs-machine: invalid machine name '-bad'*"),
        (["--runs-machine=has space"], "--runs-machine: invalid machine name 'has space'*"),
        (["--runs-machine=" + "m" * 129], "--runs-machine: invalid machine name*"),
        (["--runs-machine=rig-1", "--runs-timeout=1e300"], "--runs-timeout must be at most * (ten years), not '1e300'"),
        (["--runs-machine=rig-1", "--runs-grace=0"], "--runs-grace must be a positive number*"),
        (["--runs-machine=rig-1", "--runs-lock-timeout=x"], "--runs-lock-timeout must be a number of seconds*"),
        (["--runs-machine=rig-1", "--runs-test-dir=missing"], "--runs-test-dir * is not a folder"),
        (
            ["--runs-machine=rig-1", "--runs-timeout=-5"],
            "--runs-timeout must be a positive number of seconds, not '-5'",
        ),
        (["--runs-machine=rig-1", "--runs-timeout=0"], "--runs-timeout must be a positive number*"),
        (["--runs-machine=rig-1", "--runs-wait-timeout=soon"], "--runs-wait-timeout must be a number of seconds*"),
        (["--runs-machine=rig-1", "--runs-timeout=nan"], "--runs-timeout must be a positive*"),
        (
            ["--runs-machine=rig-1", "--runs-on-busy=retry"],
            "--runs-on-busy must be one of fail, skip, wait, not 'retry'",
        ),
    ],
)
def test_bad_options_are_usage_errors(
    pytester: pytest.Pytester, state_dir: Path, args: list[str], message: str
) -> None:
    pytester.makepyfile(PASSING)
    result = pytester.runpytest(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: pytest-runs: {message}*"])
    assert "Traceback" not in result.stderr.str() + result.stdout.str()
    assert not state_dir.exists()


def test_bad_env_value_is_a_usage_error(
    pytester: pytest.Pytester, state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTEST_RUNS_ON_BUSY", "maybe")
    monkeypatch.setenv("PYTEST_RUNS_WAIT_TIMEOUT", "abc")
    pytester.makepyfile(PASSING)
    result = pytester.runpytest("--runs-machine=rig-1")
    assert result.ret == 4
    result.stderr.fnmatch_lines(["*: PYTEST_RUNS_ON_BUSY must be one of fail, skip, wait, not 'maybe'"])
    # The value in error is named by where it came from: the environment, not the option.
    result = pytester.runpytest("--runs-machine=rig-1", "--runs-on-busy=wait")
    assert result.ret == 4
    result.stderr.fnmatch_lines(["ERROR: pytest-runs: PYTEST_RUNS_WAIT_TIMEOUT must be a number of seconds, not 'abc'"])


def test_state_dir_that_cannot_be_created(pytester: pytest.Pytester, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    pytester.makepyfile(PASSING)
    result = pytester.runpytest("--runs-machine=rig-1", f"--runs-state-dir={blocker}/state")
    assert result.ret == 4
    result.stderr.fnmatch_lines([f"ERROR: pytest-runs: cannot create state dir {blocker}/state: *"])
    assert "Traceback" not in result.stderr.str()


@file_only
@pytest.mark.parametrize("content", [b"{truncated", b'{"format": "pytest-runs-state", "version": 3, "runs": []}'])
def test_corrupt_or_newer_state_file(pytester: pytest.Pytester, state_dir: Path, content: bytes) -> None:
    state_dir.mkdir()
    (state_dir / "runs.json").write_bytes(content)
    pytester.makepyfile(PASSING)
    result = pytester.runpytest("--runs-machine=rig-1")
    assert result.ret == 4
    result.stderr.fnmatch_lines([f"ERROR: pytest-runs: state file {state_dir}/runs.json *"])
    assert "Traceback" not in result.stderr.str()
    assert (state_dir / "runs.json").read_bytes() == content


# -- a busy machine ---------------------------------------------------------------------


def test_busy_fail(pytester: pytest.Pytester, state_dir: Path) -> None:
    holder = occupy(state_dir)
    pytester.makepyfile(PASSING)
    result = pytester.runpytest("--runs-machine=rig-1")
    assert result.ret == EXIT_BUSY
    busy = f"Exit: pytest-runs: machine rig-1 is busy with run {holder.id} (running, hash ffffffffffff, held for *s*)"
    result.stderr.fnmatch_lines([busy])
    assert "Traceback" not in result.stderr.str()
    said = [line for line in result.stdout.lines + result.stderr.lines if f"busy with run {holder.id}" in line]
    assert len(said) == 1, "the busy message is said once"
    assert runs_in(state_dir) == [holder]


def test_a_reservation_for_other_tests_is_busy(pytester: pytest.Pytester, state_dir: Path) -> None:
    store = store_of(state_dir)
    reservation, _ = store.prepare_atomic("rig-1", "e" * 64, lambda: Run(test_dir="/other"))
    pytester.makepyfile(PASSING)
    result = pytester.runpytest("--runs-machine=rig-1")
    assert result.ret == EXIT_BUSY
    result.stderr.fnmatch_lines([f"*busy with run {reservation.id} (pending, hash eeeeeeeeeeee, held for *"])
    assert runs_in(state_dir) == [reservation]


def test_same_tests_already_running_is_busy_too(pytester: pytest.Pytester, state_dir: Path) -> None:
    pytester.makepyfile(PASSING)
    ignore_pytester_files(pytester)
    holder = occupy(state_dir, test_dir_hash=the_hash(pytester, state_dir))
    result = pytester.runpytest("--runs-machine=rig-1")
    assert result.ret == EXIT_BUSY
    result.stderr.fnmatch_lines([f"*busy with run {holder.id} (running, *) (the same tests)"])


def test_busy_skip(pytester: pytest.Pytester, state_dir: Path) -> None:
    holder = occupy(state_dir)
    pytester.makepyfile(PASSING)
    result = pytester.runpytest("--runs-machine=rig-1", "--runs-on-busy=skip", "-rs")
    assert result.ret == 0
    result.assert_outcomes(skipped=2)
    result.stdout.fnmatch_lines([f"SKIPPED * pytest-runs: machine rig-1 is busy with run {holder.id} *"])
    assert runs_in(state_dir) == [holder]


def test_busy_wait_gives_up_as_fail(pytester: pytest.Pytester, state_dir: Path) -> None:
    holder = occupy(state_dir)
    pytester.makepyfile(PASSING)
    result = pytester.runpytest("--runs-machine=rig-1", "--runs-on-busy=wait", "--runs-wait-timeout=1")
    assert result.ret == EXIT_BUSY
    result.stdout.fnmatch_lines(
        [f"pytest-runs: machine rig-1 is busy with run {holder.id} *; waiting 0s of 1s, 1st in line"]
    )
    result.stderr.fnmatch_lines(["Exit: *busy with run*; gave up after waiting *s"])
    assert runs_in(state_dir) == [holder]


def test_busy_wait_shows_the_holder_in_place_on_a_terminal(pytester: pytest.Pytester, state_dir: Path) -> None:
    holder = occupy(state_dir)
    pytester.makepyfile(PASSING)
    argv = [sys.executable, "-m", "pytest", "--runs-machine=rig-1", "--runs-on-busy=wait", "--runs-wait-timeout=2"]
    code, output = run_on_a_terminal(argv, os.environ | {"TERM": "xterm", "COLUMNS": "200"}, cwd=pytester.path)
    assert code == EXIT_BUSY
    updates = [part for part in output.split("\r") if part.startswith("pytest-runs: waiting")]
    assert len(updates) >= 2, output
    assert "rig-1 running for " in updates[-1] and holder.id in updates[-1]


def test_busy_wait_proceeds_once_the_machine_is_free(pytester: pytest.Pytester, state_dir: Path) -> None:
    holder = occupy(state_dir)
    pytester.makepyfile(PASSING)

    def free_later() -> None:
        time.sleep(2)
        store_of(state_dir).finish(holder.id, Status.COMPLETED, exit_code=0)

    releaser = threading.Thread(target=free_later)
    releaser.start()
    result = pytester.runpytest("--runs-machine=rig-1", "--runs-on-busy=wait", "--runs-wait-timeout=120")
    releaser.join()
    assert result.ret == 0
    old, new = runs_in(state_dir)
    assert old.id == holder.id
    assert new.status is Status.COMPLETED
    assert new.started_at is not None and old.ended_at is not None and new.started_at >= old.ended_at


def test_reserve_then_claim(pytester: pytest.Pytester, state_dir: Path) -> None:
    pytester.makepyfile(PASSING)
    ignore_pytester_files(pytester)
    store = store_of(state_dir)
    reserved, outcome = store.prepare_atomic(
        "rig-1", the_hash(pytester, state_dir), lambda: Run(test_dir=str(pytester.path), batch_id="b1")
    )
    assert outcome is PrepareOutcome.CREATED
    result = pytester.runpytest("--runs-machine=rig-1")
    assert result.ret == 0
    run = only_run(state_dir)
    assert run.id == reserved.id
    assert (run.status, run.batch_id) == (Status.COMPLETED, "b1")
    assert run.logs_path and run.artifacts_path


# -- xdist ------------------------------------------------------------------------------


def test_xdist_one_run_owned_by_the_controller(pytester: pytest.Pytester, state_dir: Path) -> None:
    pytester.makepyfile(
        """
        import os
        import pytest

        @pytest.mark.parametrize("n", range(8))
        def test_in_worker(n, runs_run, runs_artifacts_dir):
            assert runs_run is not None and runs_run.machine == "rig-1"
            worker = os.environ["PYTEST_XDIST_WORKER"]
            (runs_artifacts_dir / f"{worker}-{n}").write_text(runs_run.id)
        """
    )
    result = pytester.runpytest("--runs-machine=rig-1", "-n", "2", "-p", "xdist")
    assert result.ret == 0
    run = only_run(state_dir)
    assert run.status is Status.COMPLETED
    written = list(Path(run.artifacts_path).iterdir())
    assert len(written) == 8
    assert {p.read_text() for p in written} == {run.id}
    assert {p.name.split("-")[0] for p in written} == {"gw0", "gw1"}
    entries = [json.loads(line) for line in Path(run.logs_path).read_text().splitlines()][1:-1]
    assert len([e for e in entries if e["when"] == "call"]) == 8
    assert {e["worker"] for e in entries} == {"gw0", "gw1"}


def test_fence_and_run_id_reach_the_tests_and_their_processes(pytester: pytest.Pytester, state_dir: Path) -> None:
    pytester.makepyfile(
        """
        import os, subprocess, sys
        import pytest

        @pytest.mark.parametrize("n", range(4))
        def test_sees_its_fence(n, runs_run, runs_artifacts_dir):
            code = "import os; print(os.environ['PYTEST_RUNS_FENCE'], os.environ['PYTEST_RUNS_RUN_ID'])"
            child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            assert child.stdout.split() == [str(runs_run.fence), runs_run.id]
            assert os.environ["PYTEST_RUNS_FENCE"] == str(runs_run.fence)
            (runs_artifacts_dir / f"seen-{n}").write_text(os.environ["PYTEST_RUNS_FENCE"])
        """
    )
    assert pytester.runpytest("--runs-machine=rig-1").ret == 0
    assert pytester.runpytest("--runs-machine=rig-1", "-n", "2", "-p", "xdist").ret == 0
    first, second = runs_in(state_dir)
    assert (first.fence, second.fence) == (1, 2)
    for run in (first, second):
        seen = {p.read_text() for p in Path(run.artifacts_path).iterdir()}
        assert seen == {str(run.fence)}
    assert "PYTEST_RUNS_FENCE" not in os.environ


def test_xdist_busy_skip_reaches_workers(pytester: pytest.Pytester, state_dir: Path) -> None:
    occupy(state_dir)
    pytester.makepyfile(PASSING)
    result = pytester.runpytest("--runs-machine=rig-1", "--runs-on-busy=skip", "-n", "2", "-p", "xdist")
    assert result.ret == 0
    result.assert_outcomes(skipped=2)


# -- stopping a session -----------------------------------------------------------------

SLOW = """
import os, pathlib, time

def test_slow():
    pathlib.Path(os.environ["STARTED_MARKER"]).write_text("started")
    time.sleep(120)
"""


def start_slow_session(pytester: pytest.Pytester, tmp_path: Path, *args: str) -> tuple[subprocess.Popen[str], Path]:
    pytester.makepyfile(SLOW)
    marker = tmp_path / "started"
    process = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--runs-machine=rig-1", *args],
        cwd=pytester.path,
        env={**os.environ, "STARTED_MARKER": str(marker)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=sigint_at_default,
    )
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the session never started its test"
        time.sleep(0.05)
    return process, marker


@pytest.mark.parametrize(("signum", "reason"), [(signal.SIGINT, "SIGINT"), (signal.SIGTERM, "SIGTERM")])
def test_signal_mid_session_ends_the_run_interrupted(
    pytester: pytest.Pytester, state_dir: Path, tmp_path: Path, signum: int, reason: str
) -> None:
    process, _ = start_slow_session(pytester, tmp_path)
    process.send_signal(signum)
    out, err = process.communicate(timeout=60)
    assert process.returncode == pytest.ExitCode.INTERRUPTED, (out, err)
    run = only_run(state_dir)
    assert (run.status, run.exit_code, run.error_code) == (Status.INTERRUPTED, 2, "interrupted")
    assert reason in run.error_msg
    assert f"pytest-runs: run {run.id} on rig-1: interrupted" in out
    assert "Traceback" not in err


def test_session_deadline(pytester: pytest.Pytester, state_dir: Path) -> None:
    pytester.makepyfile("import time\ndef test_slow():\n    time.sleep(120)\n")
    result = pytester.runpytest_subprocess("--runs-machine=rig-1", "--runs-timeout=1.5")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    run = only_run(state_dir)
    assert (run.status, run.error_code) == (Status.TIMEOUT, "timeout")
    assert "--runs-timeout=1.5s" in run.error_msg
    assert run.ended_at is not None and run.started_at is not None
    assert (run.ended_at - run.started_at).total_seconds() < 60


def test_pytest_timeout_session_timeout(pytester: pytest.Pytester, state_dir: Path) -> None:
    pytester.makepyfile(
        "import time, pytest\n@pytest.mark.parametrize('n', range(20))\ndef test_t(n): time.sleep(0.3)\n"
    )
    result = pytester.runpytest("--runs-machine=rig-1", "--session-timeout=1")
    assert result.ret != 0
    run = only_run(state_dir)
    assert (run.status, run.error_code) == (Status.TIMEOUT, "session_timeout")
    assert run.error_msg.startswith("session-timeout:")
