"""Regression tests for issue 8, one per case, with real processes and real signals.

Each test failed on the code before issue 8 (7b2e6dd): it put two sessions on one machine,
recorded a lie, or hung. Cases 4 (PID namespaces, tests/test_hosts.py) and 9 (test identity,
tests/test_identity.py) are covered elsewhere.

The file deliberately imports only what the old code had too (``Run``, ``Status``, ``Store``), and gives
the options that issue 8 added (``--runs-grace``, ``--runs-lock-timeout``) through their
environment names where a test must reach the old behaviour rather than stop at an unknown
flag. Every wait on a process is bounded, so that old code fails instead of hanging.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from _sessions import sigint_at_default

from pytest_runs import Run, Status, Store

#: The documented exit statuses: machine busy or store locked, and a session that lost its machine.
EXIT_BUSY = 75
EXIT_MACHINE_LOST = 76
#: "It ended at all": far beyond what any of these sessions needs, far below a hang.
BOUND = 60.0

Spawn = Callable[..., "subprocess.Popen[str]"]

# A test that holds the machine until told to let go (or for HOLD_SECONDS), then a second test.
HOLD = """
import os, pathlib, time

SIGNALS = pathlib.Path(os.environ["SIGNALS"])
NAME = os.environ["SESSION_NAME"]

def test_hold():
    (SIGNALS / f"{NAME}.started").write_text(str(os.getpid()))
    deadline = time.monotonic() + float(os.environ.get("HOLD_SECONDS", "120"))
    while not (SIGNALS / f"{NAME}.release").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    (SIGNALS / f"{NAME}.held-to-the-end").write_text("")

def test_after():
    (SIGNALS / f"{NAME}.after").write_text("")
"""


@pytest.fixture
def spawn() -> Iterator[Spawn]:
    """Start processes in their own process group; whatever is left of them is killed at the end."""
    started: list[subprocess.Popen[str]] = []

    def start(argv: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        process = subprocess.Popen(
            argv,
            cwd=cwd,
            env={**os.environ, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
            preexec_fn=sigint_at_default,
        )
        started.append(process)
        return process

    yield start
    for process in started:
        kill_group(process)
        process.communicate()


def kill_group(process: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


def finish(process: subprocess.Popen[str], timeout: float = BOUND) -> tuple[str, str]:
    """Its output once it ends; fail (and kill it) if it is still running after ``timeout`` seconds."""
    try:
        return process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(process)
        out, err = process.communicate()
        pytest.fail(f"{process.args!r} still running after {timeout:g}s\n--- stdout\n{out[-3000:]}\n--- stderr\n{err}")


def wait_for(path: Path, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + BOUND
    while not path.exists():
        if process.poll() is not None:
            out, err = process.communicate()
            pytest.fail(f"ended ({process.returncode}) before {path.name} appeared\n{out}\n{err}")
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.02)


class Project:
    """A folder of tests, a store beside it, and the files the tests signal through."""

    def __init__(self, tmp_path: Path, spawn: Spawn, tests: str) -> None:
        self.path = tmp_path / "project"
        self.path.mkdir()
        (self.path / "test_it.py").write_text(tests)
        self.state_dir = tmp_path / "state"
        self.signals = tmp_path / "signals"
        self.signals.mkdir()
        self.spawn = spawn

    def env(self, name: str, extra: dict[str, str] | None = None) -> dict[str, str]:
        return {
            "PYTEST_RUNS_STATE_DIR": str(self.state_dir),
            "SIGNALS": str(self.signals),
            "SESSION_NAME": name,
            **(extra or {}),
        }

    def session(
        self, name: str, *args: str, env: dict[str, str] | None = None, prefix: tuple[str, ...] = ()
    ) -> subprocess.Popen[str]:
        # hypothesis's plugin imports all of hypothesis in every session's summary: seconds under load.
        quiet = ("-p", "no:cacheprovider", "-p", "no:hypothesispytest")
        argv = [*prefix, sys.executable, "-m", "pytest", *quiet, "--runs-machine=rig-1", *args]
        return self.spawn(argv, cwd=self.path, env=self.env(name, env))

    def cli(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        argv = [sys.executable, "-m", "pytest_runs", "--state-dir", str(self.state_dir), *args]
        return self.spawn(argv, cwd=self.path, env=self.env("cli", env))

    def signal_file(self, name: str) -> Path:
        return self.signals / name

    def let_go(self, name: str) -> None:
        self.signal_file(f"{name}.release").write_text("")

    def runs(self) -> list[Run]:
        return list(Store(self.state_dir).list())

    def only_run(self) -> Run:
        runs = self.runs()
        assert len(runs) == 1, runs
        return runs[0]


# -- case 1: a reader's lease decides for the owner -----------------------------------------


@pytest.mark.parametrize("reader", ["session", "reserve"])
def test_case1_a_readers_short_lease_never_reclaims_a_live_owner(tmp_path: Path, spawn: Spawn, reader: str) -> None:
    project = Project(tmp_path, spawn, HOLD)
    owner = project.session("a")  # the defaults: heartbeat 15 s, lease 300 s
    wait_for(project.signal_file("a.started"), owner)
    time.sleep(4)  # longer than the reader's lease, far shorter than the owner's
    if reader == "session":
        project.let_go("b")
        reader_process = project.session("b", "--runs-lease=2", "--runs-heartbeat=1")
    else:
        other = tmp_path / "other"
        other.mkdir()
        (other / "test_other.py").write_text("def test_x():\n    pass\n")
        reader_process = project.cli(
            "reserve", "--machine", "rig-1", "--test-dir", str(other), env={"PYTEST_RUNS_LEASE": "1"}
        )
    out, err = finish(reader_process)
    assert reader_process.returncode == EXIT_BUSY, (out, err)
    assert not project.signal_file("b.started").exists(), "the reader tested on the owner's machine"
    (run,) = project.runs()
    assert run.status is Status.RUNNING and run.owner_pid == owner.pid, "the live owner's run was reclaimed"
    project.let_go("a")
    out, err = finish(owner)
    assert owner.returncode == 0, (out, err)
    run = project.only_run()
    assert (run.status, run.exit_code) == (Status.COMPLETED, 0)


# -- case 2: tight but valid settings under load ---------------------------------------------

SPAN = """
import os, pathlib, time

def timed(n):
    start = time.perf_counter()
    sum(range(n))
    return time.perf_counter() - start

def hold_the_gil(seconds):
    # One long call into C, as a numerical library makes: no other thread of this process
    # runs meanwhile, the heartbeat thread included.
    n = 200_000
    sum(range(int(n * seconds / min(timed(n) for _ in range(3)))))

def test_span():
    span = pathlib.Path(os.environ["SIGNALS"]) / f"{os.environ['SESSION_NAME']}.span"
    start = time.time()
    span.write_text(f"{start!r}")
    hold_the_gil(1.5)
    span.write_text(f"{start!r} {time.time()!r}")
"""


# Each test holds the GIL for 1.5 s (longer than the 1 s lease) while two CPU burners load the
# cores: the holder's heartbeat thread cannot beat meanwhile. Sleeping or pure-Python tests did not
# starve it enough here (worst heartbeat age seen 0.3 s with 8 sessions, 0.9 s with 24); the issue
# saw it with 30 sessions on 2 loaded cores. A heartbeat that is late must never cost a live owner
# its machine on this kernel.
SESSIONS = 4


def test_case2_tight_heartbeat_and_lease_under_cpu_load_never_overlap(tmp_path: Path, spawn: Spawn) -> None:
    project = Project(tmp_path, spawn, SPAN)
    burners = [spawn([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        sessions = [
            project.session(
                f"s{index}", "--runs-on-busy=wait", "--runs-wait-timeout=300", "--runs-heartbeat=0.1", "--runs-lease=1"
            )
            for index in range(SESSIONS)
        ]
        outputs = [finish(process, timeout=300) for process in sessions]
    finally:
        for burner in burners:
            kill_group(burner)
    for process, (out, err) in zip(sessions, outputs, strict=True):
        assert process.returncode == 0, (out, err)
    runs = project.runs()
    reclaimed = [(r.id, r.error_msg) for r in runs if r.error_code == "owner_lost"]
    assert not reclaimed, f"live runs reclaimed under load: {reclaimed}"
    assert len(runs) == SESSIONS and all(r.status is Status.COMPLETED for r in runs), runs
    spans = []
    for index in range(SESSIONS):
        start, end = map(float, project.signal_file(f"s{index}.span").read_text().split())
        spans.append((start, end, f"s{index}"))
    spans.sort()
    for (_, earlier_end, earlier), (later_start, _, later) in itertools.pairwise(spans):
        assert later_start >= earlier_end, f"{later} started {earlier_end - later_start:.3f}s before {earlier} ended"


# -- case 3: a paused session ------------------------------------------------------------------


def stop_outside_the_store_lock(pid: int, lock_path: Path) -> None:
    """SIGSTOP ``pid`` at a moment it does not hold the store's lock (or every reader would wait on it)."""
    deadline = time.monotonic() + BOUND
    while True:
        os.kill(pid, signal.SIGSTOP)
        with open(lock_path, "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                assert time.monotonic() < deadline, "the session never let go of the store lock"
                os.kill(pid, signal.SIGCONT)
                time.sleep(0.05)
                continue
            fcntl.flock(handle, fcntl.LOCK_UN)
            return


def test_case3_a_stopped_owner_keeps_its_machine_and_completes_after_sigcont(tmp_path: Path, spawn: Spawn) -> None:
    project = Project(tmp_path, spawn, HOLD)
    tight = ("--runs-lease=1", "--runs-heartbeat=0.5")  # the same settings for both sessions
    owner = project.session("a", *tight)
    wait_for(project.signal_file("a.started"), owner)
    stop_outside_the_store_lock(owner.pid, project.state_dir / "runs.lock")
    try:
        time.sleep(3)  # three leases without a heartbeat
        project.let_go("b")
        other = project.session("b", *tight)
        out, err = finish(other)
        assert other.returncode == EXIT_BUSY, (out, err)
        assert "machine rig-1 is busy" in out + err
        assert not project.signal_file("b.started").exists(), "a second session tested beside a paused owner"
        (run,) = project.runs()
        assert run.status is Status.RUNNING, "the paused owner's run was reclaimed"
    finally:
        os.kill(owner.pid, signal.SIGCONT)
    project.let_go("a")
    out, err = finish(owner)
    assert owner.returncode == 0, (out, err)
    run = project.only_run()
    assert (run.status, run.exit_code) == (Status.COMPLETED, 0)


# -- case 5: a session whose machine is released with the CLI -------------------------------


def test_case5_a_session_released_by_the_cli_stops_and_exits_76(tmp_path: Path, spawn: Spawn) -> None:
    project = Project(tmp_path, spawn, HOLD)
    session = project.session("a", "--runs-heartbeat=0.2", env={"HOLD_SECONDS": "30"})
    wait_for(project.signal_file("a.started"), session)
    (run,) = project.runs()
    release = project.cli("release", run.id, "--reason", "operator took the rig")
    out, err = finish(release)
    assert release.returncode == 0, (out, err)
    released = Store(project.state_dir).get(run.id)
    assert (released.status, released.error_msg) == (Status.INTERRUPTED, "released: operator took the rig")
    # The release file is never written: the session must stop by itself, mid-test.
    out, err = finish(session)
    assert session.returncode == EXIT_MACHINE_LOST, (out, err)
    assert "pytest-runs: ERROR: this session lost machine rig-1" in err
    assert "operator took the rig" in err
    assert "Traceback" not in err
    assert not project.signal_file("a.held-to-the-end").exists(), "the test holding the lost machine ran on"
    assert not project.signal_file("a.after").exists(), "a test started on a lost machine"
    assert project.runs() == [released], "the session overwrote the release"


# -- case 6: a frozen holder of runs.lock ------------------------------------------------------

LOCKED = {
    "session-fail-flag": ("session", ["--runs-on-busy=fail", "--runs-lock-timeout=1"], {}),
    "session-fail-env": ("session", ["--runs-on-busy=fail"], {"PYTEST_RUNS_LOCK_TIMEOUT": "1"}),
    "session-wait": ("session", ["--runs-on-busy=wait", "--runs-wait-timeout=2"], {}),
    "cli-flag": ("cli", ["--lock-timeout", "1", "list"], {}),
    "cli-env": ("cli", ["list"], {"PYTEST_RUNS_LOCK_TIMEOUT": "1"}),
}


@pytest.mark.parametrize("variant", list(LOCKED))
def test_case6_a_frozen_store_lock_holder_bounds_every_wait(tmp_path: Path, spawn: Spawn, variant: str) -> None:
    project = Project(tmp_path, spawn, "def test_a():\n    pass\n")
    Store(project.state_dir).create(Run(machine="rig-0", test_dir_hash="h"))  # a store in use, on another machine
    lock_path = project.state_dir / "runs.lock"
    holder = spawn(["flock", str(lock_path), "sh", "-c", "echo locked; exec sleep 300"])
    assert holder.stdout is not None
    assert holder.stdout.readline() == "locked\n"
    kind, args, env = LOCKED[variant]
    try:
        process = project.session("s", *args, env=env) if kind == "session" else project.cli(*args, env=env)
        out, err = finish(process)
    finally:
        kill_group(holder)
    assert "Traceback" not in err
    if kind == "session":
        assert process.returncode == EXIT_BUSY, (out, err)
        lines = [line for line in (out + err).splitlines() if str(lock_path) in line]
        assert lines, (out, err)
        if "fail" in variant:
            assert any(f"PID {holder.pid}" in line for line in lines), lines
    else:
        assert process.returncode == 1, (out, err)
        assert out == ""
        (line,) = err.splitlines()
        assert line.startswith(f"pytest-runs: store lock {lock_path} has been held by PID {holder.pid}"), line


# -- case 7: a deadline with SIGINT ignored and a test that swallows KeyboardInterrupt ---------

STUBBORN = """
import os, pathlib, subprocess, time, pytest

SIGNALS = pathlib.Path(os.environ["SIGNALS"])

@pytest.mark.parametrize("n", range(2))
def test_stubborn(n):
    child = subprocess.Popen(["sleep", "60"])
    (SIGNALS / f"{n}.pids").write_text(f"{os.getpid()} {child.pid}")
    end = time.monotonic() + 30
    while (left := end - time.monotonic()) > 0:
        try:
            time.sleep(left)
        except KeyboardInterrupt:
            (SIGNALS / f"{n}.swallowed").write_text("")
    (SIGNALS / f"{n}.finished").write_text("")
"""

SIGINT_IGNORED = ("sh", "-c", 'trap "" INT; exec "$@"', "sh")


def is_running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] != "Z"


@pytest.mark.parametrize("xdist", [False, True], ids=["plain", "xdist"])
def test_case7_the_deadline_holds_with_sigint_ignored_and_swallowed(tmp_path: Path, spawn: Spawn, xdist: bool) -> None:
    project = Project(tmp_path, spawn, STUBBORN)
    extra = ("-n", "2", "-p", "xdist") if xdist else ("-p", "no:xdist")
    # The issue used a 2 s deadline and a 12 s test; 5 s leaves xdist room to start its workers on a
    # loaded machine before the deadline, which must catch the tests while they run.
    session = project.session("s", "--runs-timeout=5", *extra, env={"PYTEST_RUNS_GRACE": "1"}, prefix=SIGINT_IGNORED)
    out, err = finish(session)
    assert session.returncode != 0, (out, err)
    assert not list(project.signals.glob("*.finished")), "a 30 s test ran to its end past a 5 s deadline"
    run = project.only_run()
    assert (run.status, run.error_code) == (Status.TIMEOUT, "timeout")
    if not xdist:
        assert project.signal_file("0.swallowed").exists(), "the deadline never interrupted the test"
    pids = [int(pid) for f in project.signals.glob("*.pids") for pid in f.read_text().split()]
    assert pids, f"no test started before the deadline: {(out, err)}"
    deadline = time.monotonic() + 10
    while (alive := [pid for pid in pids if is_running(pid)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive, f"processes of the session outlived it: {alive}"


# -- case 8: repeated interrupts are never a success -------------------------------------------


# ``timeout 60 pytest`` sends SIGTERM to pytest and then to its process group when it fires (or
# is itself terminated); those two arrive within microseconds and Python runs its handler once,
# so the second signal is sent here 50 ms later, while the first is being handled.
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["two-sigint", "two-sigterm"])
def test_case8_a_repeated_interrupt_is_recorded_interrupted_never_completed(
    tmp_path: Path, spawn: Spawn, signum: signal.Signals
) -> None:
    project = Project(tmp_path, spawn, HOLD)
    session = project.session("a")
    wait_for(project.signal_file("a.started"), session)
    os.kill(session.pid, signum)
    time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(session.pid, signum)
    out, err = finish(session)
    assert session.returncode != 0, (out, err)
    assert "Traceback" not in err, err
    run = project.only_run()
    assert (run.status, run.error_code) == (Status.INTERRUPTED, "interrupted"), (run, out, err)
    assert run.exit_code != 0
    assert not project.signal_file("a.after").exists(), "a test started after the interrupt"
