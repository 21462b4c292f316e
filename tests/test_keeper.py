"""The keeper process (issue 17, points 1, 2, 3, 7, 9 and 11): real sessions, real signals, both backends.

What keeps a session's machine lives in a process of its own, so that what the session's
tests do (fork from C, hold the GIL, close every descriptor, fork under ``-W error``)
cannot keep a dead session's machine, defeat its deadline, or change its results; and
its xdist workers never outlive it on the machine.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from _sessions import Session, make_project, start, wait_for

from pytest_runs import Run, Status, Store
from pytest_runs.store import open_store

BACKENDS = ["files", "postgresql"]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, ...]:
    """The sessions' extra arguments for each backend (the state dir comes from the environment)."""
    if request.param == "files":
        return ()
    url: str = request.getfixturevalue("pg_url")
    return (f"--runs-store={url}",)


def store_of(tmp_path: Path, args: tuple[str, ...]) -> Store:
    url = args[0].removeprefix("--runs-store=") if args else None
    return open_store(tmp_path / "state", url)


def the_run(store: Store) -> Run:
    (run,) = store.list()
    return run


def kill_when_gone(pid_file: Path) -> None:
    """SIGKILL the process whose PID ``pid_file`` names, if there is one."""
    if pid_file.exists():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] not in "ZX"


# -- point 1: xdist workers do not outlive a killed controller --------------------------

#: Each test stamps time.time() into a file of its worker every 20 ms for 8 s.
STAMPING = """
import os, pathlib, time

def _stamp(name):
    folder = pathlib.Path(os.environ["STAMPS"])
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    (folder / f"{worker}.pid").write_text(str(os.getpid()))
    end = time.monotonic() + 8
    with open(folder / f"{worker}-{name}.stamps", "a") as stamps:
        while time.monotonic() < end:
            stamps.write(f"{time.time()}\\n")
            stamps.flush()
            time.sleep(0.02)

def test_one():
    _stamp("one")

def test_two():
    _stamp("two")
"""

#: The next session's test: stamps when it starts, then holds the machine for a second.
FIRST_STAMP = """
import os, pathlib, time

def test_next():
    pathlib.Path(os.environ["NEXT_STAMP"]).write_text(str(time.time()))
    time.sleep(1)
"""


def test_xdist_workers_never_test_on_after_their_controller_is_killed(
    tmp_path: Path, sessions: list[Session], backend: tuple[str, ...]
) -> None:
    stamps = tmp_path / "stamps"
    stamps.mkdir()
    env = {"STAMPS": str(stamps), "NEXT_STAMP": str(tmp_path / "next.stamp")}
    state = tmp_path / "state"
    old = start("old", make_project(tmp_path / "old", STAMPING), state, "-n", "2", *backend, env=env)
    sessions.append(old)
    deadline = time.monotonic() + 120
    while len(list(stamps.glob("*.stamps"))) < 2:
        assert old.process.poll() is None and time.monotonic() < deadline, old.output()
        time.sleep(0.02)
    workers = [int(path.read_text()) for path in stamps.glob("gw*.pid")]
    time.sleep(0.5)
    os.kill(old.pid, signal.SIGKILL)  # the controller alone: its workers are not in the kill
    old.process.wait()
    new = start("new", make_project(tmp_path / "new", FIRST_STAMP), state, *backend, env=env)
    sessions.append(new)
    code, output = new.finish()
    assert code == 0, output
    next_started = float((tmp_path / "next.stamp").read_text())
    last_old = max(float(line) for path in stamps.glob("gw*.stamps") for line in path.read_text().split())
    assert last_old < next_started, f"an old worker tested on {last_old - next_started:.3f}s into the next session"
    assert not [pid for pid in workers if alive(pid)], "the old workers are gone"


# -- point 3: a child forked from C does not keep a dead session's machine -----------------

C_FORK = """
import ctypes, os, pathlib, time

def test_forks_from_c():
    libc = ctypes.CDLL(None)
    pid = libc.fork()  # Python's at-fork handlers do not run
    if pid == 0:
        time.sleep(60)  # a helper that outlives the session, keeping whatever it inherited
        os._exit(0)
    pathlib.Path(os.environ["HELPER_PID"]).write_text(str(pid))
    pathlib.Path(os.environ["STARTED_MARKER"]).write_text("")
    time.sleep(120)
"""


def test_a_helper_forked_from_c_does_not_keep_a_killed_sessions_machine(
    tmp_path: Path, sessions: list[Session], backend: tuple[str, ...]
) -> None:
    helper = tmp_path / "helper.pid"
    env = {"HELPER_PID": str(helper)}
    state = tmp_path / "state"
    try:
        owner = start("owner", make_project(tmp_path / "a", C_FORK), state, *backend, env=env)
        sessions.append(owner)
        wait_for(owner.started, owner)
        os.kill(owner.pid, signal.SIGKILL)  # the session alone: its helper lives on
        owner.process.wait()
        assert alive(int(helper.read_text()))
        follower = start("next", make_project(tmp_path / "b"), state, *backend, released=True)
        sessions.append(follower)
        code, output = follower.finish()
        assert code == 0, f"the dead session's helper kept the machine:\n{output}"
        old, new = sorted(store_of(tmp_path, backend).list(), key=lambda run: run.id)
        assert (old.error_code, new.status) == ("owner_lost", Status.COMPLETED)
    finally:
        kill_when_gone(helper)


# -- point 2: a terminated liveness connection is noticed at once ------------------------


def holders_backends(url: str, pids: list[int]) -> list[int]:
    """The server PIDs of the connections that processes ``pids`` have open (by their TCP ports)."""
    import psycopg

    inodes: set[str] = set()
    for pid in pids:
        folder = Path(f"/proc/{pid}/fd")
        for entry in folder.iterdir() if folder.exists() else []:
            try:
                target = os.readlink(entry)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[9] in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    with psycopg.connect(url.split("?")[0], autocommit=True) as conn:
        rows = conn.execute("SELECT pid, client_port FROM pg_stat_activity WHERE client_port IS NOT NULL").fetchall()
    return [int(pid) for pid, port in rows if port in ports]


def test_a_holder_whose_connections_are_terminated_stops_well_before_its_next_heartbeat(
    pg_url: str, tmp_path: Path, sessions: list[Session]
) -> None:
    import psycopg

    from pytest_runs.stopper import descendants

    state = tmp_path / "state"
    args = (f"--runs-store={pg_url}", "--runs-heartbeat=30", "--runs-lease=120")
    owner = start("owner", make_project(tmp_path / "a"), state, *args)
    sessions.append(owner)
    wait_for(owner.started, owner)
    backends = holders_backends(pg_url, [owner.pid, *descendants(owner.pid)])
    assert len(backends) >= 2, "the liveness connection and the store's"
    terminated_at = time.monotonic()
    with psycopg.connect(pg_url.split("?")[0], autocommit=True) as conn:
        for pid in backends:
            conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
    code, output = owner.finish(timeout=120)
    took = time.monotonic() - terminated_at
    assert code == 76, output
    assert took < 15, f"the holder tested on for {took:.1f}s, as if until its next heartbeat (30 s)"
    assert "liveness connection to the database was closed" in output
    assert "Traceback" not in output


# -- point 7: a deadline that a C call holding the GIL cannot ignore -----------------------

GIL = """
def test_holds_the_gil():
    sum(range(10**11))  # one C call, hours long, that never lets go of the GIL
"""


def test_a_test_stuck_in_c_with_the_gil_is_ended_at_its_deadline_plus_grace(
    tmp_path: Path, sessions: list[Session], backend: tuple[str, ...]
) -> None:
    state = tmp_path / "state"
    session = start(
        "gil", make_project(tmp_path / "a", GIL), state, "--runs-timeout=2", "--runs-grace=1", *backend, released=True
    )
    sessions.append(session)
    try:
        session.process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the session outlived --runs-timeout=2 --runs-grace=1 by a minute:\n{session.output()}")
    run = the_run(store_of(tmp_path, backend))
    assert session.process.returncode == -signal.SIGKILL, session.output()
    assert (run.status, run.error_code, run.exit_code) == (Status.TIMEOUT, "timeout", 128 + signal.SIGKILL)
    assert "--runs-timeout=2s" in run.error_msg and "killed (SIGKILL)" in run.error_msg
    assert run.ended_at is not None and run.started_at is not None
    # Deadline 2 s, grace 1 s, half a second to end itself: a few seconds whatever the load.
    assert (run.ended_at - run.started_at).total_seconds() < 30
    assert "the session did not stop within 1s (session passed its deadline" in session.output()
    assert "killing it (SIGKILL)" in session.output()


GIL_STARTED = """
import os, pathlib

def test_holds_the_gil():
    pathlib.Path(os.environ["STARTED_MARKER"]).write_text("")
    sum(range(10**11))  # one C call, hours long, that never lets go of the GIL
"""


def test_a_sigterm_to_a_session_stuck_in_c_with_the_gil_ends_it_after_the_grace(
    tmp_path: Path, sessions: list[Session], backend: tuple[str, ...]
) -> None:
    session = start("gil", make_project(tmp_path / "a", GIL_STARTED), tmp_path / "state", "--runs-grace=1", *backend)
    sessions.append(session)
    wait_for(session.started, session)
    session.signal_group(signal.SIGTERM)  # as `timeout` does: the keeper gets it too
    try:
        session.process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the session outlived its SIGTERM and --runs-grace=1 by a minute:\n{session.output()}")
    run = the_run(store_of(tmp_path, backend))
    assert session.process.returncode == -signal.SIGKILL, session.output()
    assert (run.status, run.error_code, run.exit_code) == (Status.INTERRUPTED, "interrupted", 128 + signal.SIGKILL)
    assert "interrupted by SIGTERM" in run.error_msg, run.error_msg


# -- point 9: a test that closes every descriptor ------------------------------------------

CLOSES_EVERYTHING = """
import atexit, os, pathlib, sys

KEPT = []

@atexit.register
def _still_open():  # after pytest, and pytest-runs' teardown, are done
    for handle in KEPT:
        try:
            os.fstat(handle.fileno())
        except OSError as error:
            sys.stderr.write(f"a file of the test was closed under it: {error}\\n")

def test_closes_every_descriptor():
    os.closerange(3, 4096)
    # New files get the numbers pytest-runs had, open to the end: its teardown must leave them alone.
    KEPT.extend(open(os.devnull) for _ in range(20))
    pathlib.Path(os.environ["STARTED_MARKER"]).write_text("")
    if os.environ.get("RELEASE_IT"):
        from pytest_runs.store import open_store
        store = open_store(os.environ["PYTEST_RUNS_STATE_DIR"], os.environ.get("TEST_STORE_URL"))
        store.release(os.environ["PYTEST_RUNS_RUN_ID"], "taken while the test ran")
"""


@pytest.mark.parametrize("released", [False, True], ids=["passes", "loses-its-machine"])
def test_a_test_that_closes_every_descriptor_keeps_the_exit_status(
    tmp_path: Path, sessions: list[Session], released: bool, backend: tuple[str, ...]
) -> None:
    env = {"RELEASE_IT": "1"} if released else {}
    if backend:
        env["TEST_STORE_URL"] = backend[0].removeprefix("--runs-store=")
    session = start(
        "s", make_project(tmp_path / "a", CLOSES_EVERYTHING), tmp_path / "state", "--runs-heartbeat=600",
        "--runs-lease=900",
        # pytest's own fd capture, faulthandler and log file would fail untracked too once their
        # descriptors are closed: without them, an untracked session passes.
        "--capture=sys", "-p", "no:faulthandler", "-p", "no:logging", *backend, env=env,
    )  # fmt: skip
    sessions.append(session)
    code, output = session.finish()
    assert code == (76 if released else 0), output
    assert "Bad file descriptor" not in output and "Traceback" not in output
    assert "closed under it" not in output
    run = the_run(store_of(tmp_path, backend))
    assert run.status is (Status.INTERRUPTED if released else Status.COMPLETED), output
    assert run.error_code == ("released" if released else ""), "the end was recorded, or the release kept"


# -- point 11: a tracked session runs no thread that a forking test could see ---------------

FORKS = """
import os, pathlib, threading

def test_forks():
    status = pathlib.Path("/proc/self/status").read_text().splitlines()
    assert [line for line in status if line.startswith("Threads:")] == ["Threads:\t1"], threading.enumerate()
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0
"""


def test_a_test_that_forks_sees_no_thread_and_no_warning_under_w_error(
    tmp_path: Path, sessions: list[Session], backend: tuple[str, ...]
) -> None:
    session = start(
        "s", make_project(tmp_path / "a", FORKS), tmp_path / "state", "-W", "error::DeprecationWarning", *backend,
        # pytest-rerunfailures runs a thread of its own in every session wherever xdist is installed.
        "-p", "no:rerunfailures",
    )  # fmt: skip
    sessions.append(session)
    code, output = session.finish()
    assert code == 0, output
    assert "1 passed in" in output and "warning" not in output, output
    assert the_run(store_of(tmp_path, backend)).status is Status.COMPLETED


# -- the keeper's own death -----------------------------------------------------------------


def test_a_session_whose_keeper_is_killed_stops_as_a_lost_machine(
    tmp_path: Path, sessions: list[Session], backend: tuple[str, ...]
) -> None:
    from pytest_runs.stopper import children

    session = start("s", make_project(tmp_path / "a"), tmp_path / "state", "--runs-heartbeat=600", "--runs-lease=900",
                    *backend)  # fmt: skip
    sessions.append(session)
    wait_for(session.started, session)
    (keeper,) = (
        pid for pid in children(session.pid) if b"pytest_runs.keeper" in Path(f"/proc/{pid}/cmdline").read_bytes()
    )
    os.kill(keeper, signal.SIGKILL)
    code, output = session.finish(timeout=60)
    assert code == 76, output
    assert "its keeper process ended" in output
    assert not session.release.exists(), "the held test was interrupted: it never saw its release file"


def test_the_keeper_starts_cheaply(tmp_path: Path) -> None:
    """The keeper imports what it needs only: far less than pytest's start (a generous bound)."""
    script = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        started = time.perf_counter()
        from pytest_runs.keeper_client import KeeperClient
        keeper = KeeperClient.start(state_dir=Path({str(tmp_path)!r}), store_url=None, lock_timeout=10, keep=None,
                                    grace=1)
        assert keeper.still_held()
        keeper.release()
        keeper.done()
        print(time.perf_counter() - started)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert float(done.stdout) < 10
    assert not list((tmp_path / "owners").iterdir()), "released: the lock file is gone"
