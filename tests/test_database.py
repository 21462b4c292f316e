"""The PostgreSQL backend against the real server: sessions, hosts, killed and paused owners, races, a restart.

Each test gets a schema of its own (the ``pg_url`` fixture), dropped after it.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from _sessions import (
    Namespace,
    Session,
    make_project,
    namespaces_unavailable,
    start,
    wait_for,
    wait_stopped,
)

from pytest_runs import InvalidTransition, Run, Status, Store
from pytest_runs.pgbackend import mask, store_lock_key
from pytest_runs.store import open_store


def db_store(url: str, tmp_path: Path, **kwargs: object) -> Store:
    return open_store(tmp_path / "files", url, **kwargs)  # type: ignore[arg-type]


def only_run(store: Store) -> Run:
    (run,) = store.list()
    return run


def connection(url: str) -> psycopg.Connection[tuple[Any, ...]]:
    base = url.split("?")[0]
    return psycopg.connect(base, autocommit=True)


def liveness_backend(url: str, run: Run) -> int:
    """The server PID of the connection that holds ``run``'s liveness lock."""
    value = int(run.owner_token[:16], 16)
    with connection(url) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1 "
            "AND classid = %s AND objid = %s",
            (value >> 32, value & 0xFFFFFFFF),
        ).fetchall()
    (pid,) = (int(str(row[0])) for row in rows)
    return pid


def store_lock_taken(url: str) -> bool:
    with connection(url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 2 AND classid = %s "
            "AND objid = %s",
            store_lock_key(url.rpartition("schema=")[2]),
        ).fetchone()
    return bool(row and row[0])


def stop_outside_the_store_lock(session: Session, url: str) -> None:
    """SIGSTOP the session when it is not inside a write transaction (which would block every other one)."""
    for _ in range(500):
        session.signal_group(signal.SIGSTOP)
        wait_stopped(session.pid)
        if not store_lock_taken(url):
            return
        session.signal_group(signal.SIGCONT)
        time.sleep(0.01)
    raise AssertionError("the session never let go of the store lock")


# -- the library on the database --------------------------------------------------------


def test_the_database_refuses_a_second_active_run_even_past_the_rules(pg_url: str, tmp_path: Path) -> None:
    store = db_store(pg_url, tmp_path)
    first, _ = store.prepare_atomic("rig-1", "h", Run)
    schema = pg_url.rsplit("schema=", 1)[1]
    with connection(pg_url) as conn, pytest.raises(psycopg.errors.UniqueViolation):
        conn.execute(
            f"INSERT INTO {schema}.runs (id, machine, status, record) VALUES ('x', 'rig-1', 'running', '{{}}')"
        )
    with pytest.raises(InvalidTransition, match="already has an active run"):
        store.create(Run(machine="rig-1", test_dir_hash="h2"))
    assert store.active_by_machine("rig-1") == first


def test_a_newer_schema_is_refused_in_one_line(pg_url: str, tmp_path: Path) -> None:
    store = db_store(pg_url, tmp_path)
    store.create(Run(machine="rig-1", status=Status.COMPLETED))
    schema = pg_url.rsplit("schema=", 1)[1]
    with connection(pg_url) as conn:
        conn.execute(f"UPDATE {schema}.meta SET value = '99' WHERE key = 'schema_version'")
    result = subprocess.run(
        [sys.executable, "-m", "pytest_runs", "--store", pg_url, "list"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    assert result.stderr.strip().endswith("has version 99, newer than this pytest-runs uses (1); upgrade pytest-runs")
    assert len(result.stderr.strip().splitlines()) == 1


def test_reading_a_store_that_does_not_exist_creates_nothing(pg_url: str, tmp_path: Path) -> None:
    store = db_store(pg_url, tmp_path)
    assert store.list() == [] and store.machines() == [] and store.recent(5) == []
    schema = pg_url.rsplit("schema=", 1)[1]
    with connection(pg_url) as conn:
        row = conn.execute("SELECT count(*) FROM pg_namespace WHERE nspname = %s", (schema,)).fetchone()
    assert row == (0,)


def test_the_password_is_never_shown(tmp_path: Path) -> None:
    url = "postgresql://ci:s3cr3t-pw@127.0.0.1:1/test?schema=x"
    assert mask(url) == "postgresql://ci:***@127.0.0.1:1/test?schema=x"
    result = subprocess.run(
        [sys.executable, "-m", "pytest_runs", "--store", url, "list"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 69
    assert "s3cr3t" not in result.stderr + result.stdout
    assert result.stderr.startswith("pytest-runs: cannot reach the store postgresql://ci:***@127.0.0.1:1/test")


# -- sessions ---------------------------------------------------------------------------


def test_an_unreachable_database_fails_the_session_with_69_and_runs_no_test(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_one(): pass")
    result = pytester.runpytest_subprocess(
        "--runs-machine=rig-1", "--runs-store=postgresql://ci:pw@127.0.0.1:1/test", "-p", "no:cacheprovider"
    )
    assert result.ret == 69
    assert "cannot reach the store postgresql://ci:***@127.0.0.1:1/test" in result.stdout.str() + result.stderr.str()
    assert "pw@" not in result.stdout.str() + result.stderr.str()
    assert "passed" not in result.stdout.str()


def test_a_session_on_the_database_records_its_run(pg_url: str, tmp_path: Path, sessions: list[Session]) -> None:
    project = make_project(tmp_path / "p")
    session = start("one", project, tmp_path / "state", f"--runs-store={pg_url}", released=True)
    sessions.append(session)
    code, output = session.finish()
    assert code == 0, output
    run = only_run(db_store(pg_url, tmp_path))
    assert (run.status, run.exit_code, run.fence) == (Status.COMPLETED, 0, 1)
    assert run.summary is not None and run.summary["counts"] == {"passed": 1}
    assert Path(run.logs_path).is_file(), "logs and artifacts stay in the local state dir"


def test_a_killed_owner_frees_the_machine_at_once_and_a_paused_one_keeps_it(
    pg_url: str, tmp_path: Path, sessions: list[Session]
) -> None:
    state = tmp_path / "state"
    owner = start("owner", make_project(tmp_path / "a"), state, f"--runs-store={pg_url}", "--runs-heartbeat=0.2")
    sessions.append(owner)
    wait_for(owner.started, owner)
    stop_outside_the_store_lock(owner, pg_url)
    try:
        busy = start("busy", make_project(tmp_path / "b"), state, f"--runs-store={pg_url}", released=True)
        sessions.append(busy)
        code, output = busy.finish()
        assert code == 75, output
        assert "is busy with" in output
    finally:
        owner.signal_group(signal.SIGCONT)
    owner.signal_group(signal.SIGKILL)
    owner.process.wait(timeout=30)
    follower = start("next", make_project(tmp_path / "c"), state, f"--runs-store={pg_url}", released=True)
    sessions.append(follower)
    code, output = follower.finish()
    assert code == 0, f"the next session runs at once, without a lease to wait out:\n{output}"
    runs = {run.test_dir_hash: run for run in db_store(pg_url, tmp_path).list()}
    assert sorted(run.error_code for run in runs.values()) == ["", "owner_lost"]


def test_a_terminated_connection_frees_the_machine_and_its_session_fails_76(
    pg_url: str, tmp_path: Path, sessions: list[Session]
) -> None:
    state = tmp_path / "state"
    owner = start("owner", make_project(tmp_path / "a"), state, f"--runs-store={pg_url}", "--runs-heartbeat=0.5")
    sessions.append(owner)
    wait_for(owner.started, owner)
    liveness = liveness_backend(pg_url, only_run(db_store(pg_url, tmp_path)))
    # Paused, so that its next heartbeat cannot take the lock back before the next session looks.
    stop_outside_the_store_lock(owner, pg_url)
    try:
        with connection(pg_url) as conn:
            conn.execute("SELECT pg_terminate_backend(%s)", (liveness,))
        follower = start("next", make_project(tmp_path / "b"), state, f"--runs-store={pg_url}", released=True)
        sessions.append(follower)
        code, output = follower.finish()
        assert code == 0, f"the machine is free once the owner's connection is gone:\n{output}"
    finally:
        owner.signal_group(signal.SIGCONT)
    owner.release.write_text("go")
    code, output = owner.finish()
    assert code == 76, output
    assert "lost machine rig-1" in output


def test_sessions_in_other_pid_and_uts_namespaces_share_one_database(
    pg_url: str, tmp_path: Path, sessions: list[Session]
) -> None:
    if reason := namespaces_unavailable():
        pytest.fail(f"CI runs as root with unshare: {reason}")
    state_a, state_b = tmp_path / "host-a", tmp_path / "host-b"
    owner = start("a", make_project(tmp_path / "a"), state_a, f"--runs-store={pg_url}", namespace=Namespace("host-a"))
    sessions.append(owner)
    wait_for(owner.started, owner)
    reader = start(
        "b",
        make_project(tmp_path / "b"),
        state_b,
        f"--runs-store={pg_url}",
        namespace=Namespace("host-b"),
        released=True,
    )
    sessions.append(reader)
    code, output = reader.finish()
    assert code == 75, output
    assert "host-a" in output, "the holder is named by its host"
    owner.kill_namespace()
    again = start(
        "b2",
        make_project(tmp_path / "b2"),
        state_b,
        f"--runs-store={pg_url}",
        namespace=Namespace("host-b"),
        released=True,
    )
    sessions.append(again)
    code, output = again.finish()
    assert code == 0, output
    hosts = sorted(run.owner_host for run in db_store(pg_url, tmp_path).list())
    assert hosts == ["host-a", "host-b"]


RECORD = """
import json, os, time

def test_record():
    started = time.time()
    time.sleep(0.1)
    with open(os.environ["SPANS"], "a") as spans:
        spans.write(json.dumps([os.environ["NAME"], started, time.time()]) + "\\n")
"""


def test_16_sessions_racing_for_one_machine_never_overlap(pg_url: str, tmp_path: Path, sessions: list[Session]) -> None:
    spans = tmp_path / "spans.jsonl"
    for index in range(16):
        project = make_project(tmp_path / f"p{index}", RECORD)
        session = start(
            f"s{index}",
            project,
            tmp_path / "state",
            f"--runs-store={pg_url}",
            "--runs-on-busy=wait",
            "--runs-wait-timeout=240",
            env={"SPANS": str(spans), "NAME": f"s{index}"},
            released=True,
        )
        sessions.append(session)
    for session in sessions:
        code, output = session.finish(timeout=280)
        assert code == 0, output
    intervals = sorted((start_, end) for _, start_, end in map(json.loads, spans.read_text().splitlines()))
    assert len(intervals) == 16
    assert all(earlier[1] <= later[0] for earlier, later in itertools.pairwise(intervals))
    runs = db_store(pg_url, tmp_path).list()
    assert len(runs) == 16 and all(run.status is Status.COMPLETED for run in runs)
    assert sorted(run.fence or 0 for run in runs) == list(range(1, 17))


# -- a server restart, on a server of the test's own -------------------------------------


@pytest.fixture
def private_server() -> Iterator[tuple[str, list[str]]]:
    """A PostgreSQL 15 server of this test's own (so that restarting it disturbs no other test)."""
    bin_dir = Path("/usr/lib/postgresql/15/bin")
    if not (bin_dir / "initdb").exists():
        pytest.fail("the restart test needs PostgreSQL 15's server binaries in /usr/lib/postgresql/15/bin")
    # Under /tmp itself: the server's user must reach it (pytest's own temporary folders are 0700).
    data = Path(tempfile.mkdtemp(prefix="pytest-runs-pgdata-"))
    port = 20000 + os.getpid() % 20000
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if os.geteuid() == 0:
        shutil.chown(data, "postgres")
    subprocess.run([*as_postgres, str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"],
                   check=True, capture_output=True, timeout=120)  # fmt: skip
    options = f"-p {port} -k {data} -c listen_addresses=127.0.0.1"
    pg_ctl = [*as_postgres, str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(data / "log"), "-w"]
    subprocess.run([*pg_ctl, "start"], check=True, capture_output=True, timeout=120)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres", pg_ctl
    finally:
        subprocess.run([*pg_ctl, "-m", "immediate", "stop"], capture_output=True, timeout=120)
        shutil.rmtree(data, ignore_errors=True)


def test_a_server_restart_mid_session(
    private_server: tuple[str, list[str]], tmp_path: Path, sessions: list[Session]
) -> None:
    url, pg_ctl = private_server
    state = tmp_path / "state"
    owner = start("owner", make_project(tmp_path / "a"), state, f"--runs-store={url}", "--runs-heartbeat=0.2")
    sessions.append(owner)
    wait_for(owner.started, owner)
    subprocess.run([*pg_ctl, "-m", "fast", "restart"], check=True, capture_output=True, timeout=120)
    follower = start("next", make_project(tmp_path / "b"), state, f"--runs-store={url}", released=True)
    sessions.append(follower)
    follower_code, follower_output = follower.finish()
    owner.release.write_text("go")
    owner_code, owner_output = owner.finish()
    runs = db_store(url, tmp_path).list()
    assert all(run.status.is_terminal for run in runs), runs
    # Whether or not the owner had taken its lock back when the follower looked, its run is not
    # reclaimed for a lock that went with the restart: the follower is busy, the owner completes.
    assert (owner_code, follower_code) == (0, 75), (owner_output, follower_output)
    assert [run.status for run in runs] == [Status.COMPLETED]


def test_the_password_never_reaches_the_run_log(pg_url: str, tmp_path: Path, sessions: list[Session]) -> None:
    with_password = pg_url.replace("postgresql://", "postgresql://root:s3cr3t-pw@")
    session = start("one", make_project(tmp_path / "p"), tmp_path / "state", f"--runs-store={with_password}",
                    released=True)  # fmt: skip
    sessions.append(session)
    code, output = session.finish()
    assert code == 0, output
    logs = list((tmp_path / "state" / "runs").glob("*/log.jsonl"))
    assert logs and all("s3cr3t" not in log.read_text() for log in logs)
    assert "root:***@" in logs[0].read_text()
    assert "s3cr3t" not in output


def test_a_malformed_store_url_is_one_line(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_one(): pass")
    result = pytester.runpytest_subprocess("--runs-machine=rig-1", "--runs-store=postgresql://root:pw@[::1:5432/test")
    assert result.ret == 4
    result.stderr.fnmatch_lines(["*store postgresql://root:***@[[]::1:5432/test is not a valid URL: Invalid IPv6 URL*"])
    assert "Traceback" not in result.stderr.str() + result.stdout.str()
    command = subprocess.run([sys.executable, "-m", "pytest_runs", "--store", "postgresql://u:pw@[::1/x", "list"],
                             capture_output=True, text=True, timeout=60)  # fmt: skip
    assert command.returncode == 2 and "pw" not in command.stderr and len(command.stderr.splitlines()) == 1


def test_odd_values_on_the_database(pg_url: str, tmp_path: Path) -> None:
    store = db_store(pg_url, tmp_path)
    long_name = "m" * 10_000
    run = store.create(Run(machine=long_name, status=Status.COMPLETED))
    assert store.get(run.id).machine == long_name, "NOTIFY's payload limit does not apply"
    with pytest.raises(ValueError, match="cannot hold this value"):
        store.create(Run(machine="rig-\udcff", status=Status.COMPLETED))


def test_a_writer_on_one_schema_does_not_delay_a_session_on_another(
    pg_url: str, tmp_path: Path, sessions: list[Session]
) -> None:
    other = f"{pg_url}_b"  # another schema of the same database
    try:
        writer = db_store(pg_url, tmp_path / "a")
        writer.create(Run(machine="rig-1", status=Status.COMPLETED))  # the schema exists
        with writer.backend.transaction(write=True):  # a slow writer on schema a, holding its store lock
            session = start("on-b", make_project(tmp_path / "p"), tmp_path / "state", f"--runs-store={other}",
                            "--runs-lock-timeout=2", released=True)  # fmt: skip
            sessions.append(session)
            code, output = session.finish()
        assert code == 0, output
        assert only_run(db_store(other, tmp_path / "b")).status is Status.COMPLETED
    finally:
        with connection(pg_url) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {other.rpartition('schema=')[2]} CASCADE")


LOCK_HELD = """
import os, pathlib, psycopg
from pytest_runs.store import open_store

def test_my_liveness_lock_is_held():
    url = os.environ["STORE_URL"]
    reader = open_store(pathlib.Path(os.environ["RELEASE_FILE"]).parent / "reader", url)
    run = reader.get(os.environ["PYTEST_RUNS_RUN_ID"])
    value = int(run.owner_token[:16], 16)
    with psycopg.connect(url.split("?")[0]) as conn:
        (held,) = conn.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1 "
            "AND classid = %s AND objid = %s", (value >> 32, value & 0xFFFFFFFF)).fetchone()
    pathlib.Path(os.environ["VERDICT"]).write_text("held" if held else "free")
"""


def test_a_waiter_whose_liveness_connection_died_takes_its_lock_back_before_it_starts(
    pg_url: str, tmp_path: Path, sessions: list[Session]
) -> None:
    state = tmp_path / "state"
    holder = start("holder", make_project(tmp_path / "h"), state, f"--runs-store={pg_url}")
    sessions.append(holder)
    wait_for(holder.started, holder)
    waiter = start("waiter", make_project(tmp_path / "w", LOCK_HELD), state, f"--runs-store={pg_url}",
                   "--runs-on-busy=wait", "--runs-wait-timeout=120", released=True,
                   env={"STORE_URL": pg_url, "VERDICT": str(tmp_path / "verdict")})  # fmt: skip
    sessions.append(waiter)
    store = db_store(pg_url, tmp_path)
    deadline = time.monotonic() + 60
    while not store.queue():
        assert time.monotonic() < deadline and waiter.process.poll() is None, waiter.output()
        time.sleep(0.05)
    (in_line,) = store.queue()
    with connection(pg_url) as conn:
        conn.execute("SELECT pg_terminate_backend(%s)", (liveness_backend(pg_url, in_line.as_owner()),))
    holder.release.write_text("go")
    assert holder.finish()[0] == 0
    code, output = waiter.finish()
    assert code == 0, output
    assert (tmp_path / "verdict").read_text() == "held", "its tests ran while it held its liveness lock"
