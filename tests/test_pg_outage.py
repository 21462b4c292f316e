"""PostgreSQL outages: a server that restarts (or stops a while) under waiting and holding sessions.

On a server of this module's own, started in a temporary folder on a free port (restarting
the shared one would disturb every other test), shared by its tests, each on a schema of its
own, and stopped at the end.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from _sessions import Session, make_project, start, wait_for

from pytest_runs import Run, Status, Store
from pytest_runs.owner import Owner
from pytest_runs.store import open_store

BIN = Path("/usr/lib/postgresql/15/bin")


@dataclasses.dataclass
class Server:
    """A PostgreSQL server of the tests' own."""

    base_url: str
    pg_ctl: list[str]

    def _ctl(self, *args: str) -> None:
        subprocess.run([*self.pg_ctl, *args], check=True, capture_output=True, timeout=120)

    def restart(self) -> None:
        """``pg_ctl -m fast restart``: every session ended, the server back when this returns."""
        self._ctl("-m", "fast", "restart")

    def stop(self) -> None:
        self._ctl("-m", "fast", "stop")

    def start(self) -> None:
        self._ctl("start")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    if not (BIN / "initdb").exists():
        pytest.fail(f"the outage tests need PostgreSQL 15's server binaries in {BIN}")
    # Under /tmp itself: the server's user must reach it (pytest's own temporary folders are 0700).
    data = Path(tempfile.mkdtemp(prefix="pytest-runs-outage-"))
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if os.geteuid() == 0:
        shutil.chown(data, "postgres")
    subprocess.run([*as_postgres, str(BIN / "initdb"), "-D", str(data / "db"), "-A", "trust", "-U", "postgres"],
                   check=True, capture_output=True, timeout=120)  # fmt: skip
    port = free_port()
    options = f"-p {port} -k {data} -c listen_addresses=127.0.0.1"
    pg_ctl = [*as_postgres, str(BIN / "pg_ctl"), "-D", str(data / "db"), "-o", options, "-l", str(data / "log"), "-w"]
    found = Server(f"postgresql://postgres@127.0.0.1:{port}/postgres", pg_ctl)
    found.start()
    try:
        yield found
    finally:
        subprocess.run([*pg_ctl, "-m", "immediate", "stop"], capture_output=True, timeout=120)
        shutil.rmtree(data, ignore_errors=True)


@pytest.fixture
def url(server: Server) -> str:
    """A store on a schema of this test's own, on the module's server."""
    return f"{server.base_url}?schema=o_{secrets.token_hex(4)}"


def db_store(url: str, tmp_path: Path) -> Store:
    return open_store(tmp_path / "reader", url)


def wait_until_in_line(store: Store, waiter: Session) -> None:
    deadline = time.monotonic() + 60
    while not store.queue():
        assert time.monotonic() < deadline and waiter.process.poll() is None, waiter.output()
        time.sleep(0.05)


def by_start(runs: list[Run]) -> list[Run]:
    return sorted(runs, key=lambda run: run.id)


def test_a_waiter_rides_out_a_restart_and_gets_the_machine_when_the_holder_ends(
    server: Server, url: str, tmp_path: Path, sessions: list[Session]
) -> None:
    state = tmp_path / "state"
    holder = start("holder", make_project(tmp_path / "h"), state, f"--runs-store={url}")
    sessions.append(holder)
    wait_for(holder.started, holder)
    waiter = start("waiter", make_project(tmp_path / "w"), state, f"--runs-store={url}", "--runs-on-busy=wait",
                   "--runs-wait-timeout=120", released=True)  # fmt: skip
    sessions.append(waiter)
    store = db_store(url, tmp_path)
    wait_until_in_line(store, waiter)
    server.restart()
    # The waiter meets the restart (its connections are gone) and waits on, in line.
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        assert waiter.process.poll() is None, waiter.output()
        time.sleep(0.1)
    assert len(store.queue()) == 1, "it kept its place in line"
    holder.release.write_text("go")
    holder_code, holder_output = holder.finish()
    assert holder_code == 0, holder_output
    code, output = waiter.finish()
    assert code == 0, output
    first, second = by_start(store.list())
    assert (first.status, second.status) == (Status.COMPLETED, Status.COMPLETED), (first, second)
    assert first.ended_at is not None and second.started_at is not None and first.ended_at <= second.started_at


def test_a_waiter_waits_through_an_outage_until_its_wait_timeout_then_exits_69(
    server: Server, url: str, tmp_path: Path, sessions: list[Session]
) -> None:
    state = tmp_path / "state"
    holder = start("holder", make_project(tmp_path / "h"), state, f"--runs-store={url}")
    sessions.append(holder)
    wait_for(holder.started, holder)
    began = time.monotonic()
    waiter = start("waiter", make_project(tmp_path / "w"), state, f"--runs-store={url}", "--runs-on-busy=wait",
                   "--runs-wait-timeout=8", released=True)  # fmt: skip
    sessions.append(waiter)
    wait_until_in_line(db_store(url, tmp_path), waiter)
    server.stop()
    try:
        code, output = waiter.finish()
        waited = time.monotonic() - began
    finally:
        server.start()
    assert code == 69, output
    assert "no test ran" in output and "Traceback" not in output
    # It waited its whole wait (not exiting at the first closed connection), and not much longer.
    assert 8 <= waited < 8 + 30, waited
    holder.release.write_text("go")
    holder_code, holder_output = holder.finish()
    assert holder_code == 0, holder_output


def test_a_holder_whose_tests_span_a_restart_records_its_end(
    server: Server, url: str, tmp_path: Path, sessions: list[Session]
) -> None:
    holder = start("holder", make_project(tmp_path / "h"), tmp_path / "state", f"--runs-store={url}")
    sessions.append(holder)
    wait_for(holder.started, holder)
    server.restart()
    holder.release.write_text("go")
    code, output = holder.finish()
    assert code == 0, output
    (run,) = db_store(url, tmp_path).list()
    assert (run.status, run.exit_code, run.error_code) == (Status.COMPLETED, 0, ""), run


def test_a_holder_with_a_short_heartbeat_rides_out_an_outage_shorter_than_its_lease(
    server: Server, url: str, tmp_path: Path, sessions: list[Session]
) -> None:
    state = tmp_path / "state"
    holder = start("holder", make_project(tmp_path / "h"), state, f"--runs-store={url}", "--runs-heartbeat=0.2",
                   "--runs-lease=60")  # fmt: skip
    sessions.append(holder)
    wait_for(holder.started, holder)
    server.stop()
    time.sleep(2)  # an outage that many heartbeats meet
    server.start()
    # Right after the restart its lock may still be free: it is not reclaimed for that.
    follower = start("follower", make_project(tmp_path / "f"), state, f"--runs-store={url}", released=True)
    sessions.append(follower)
    follower_code, follower_output = follower.finish()
    assert follower_code == 75, follower_output
    holder.release.write_text("go")
    code, output = holder.finish()
    assert code == 0, output
    (run,) = db_store(url, tmp_path).list()
    assert (run.status, run.exit_code) == (Status.COMPLETED, 0), run


def test_a_holder_killed_during_an_outage_loses_its_machine_after_its_lease(
    server: Server, url: str, tmp_path: Path, sessions: list[Session]
) -> None:
    state = tmp_path / "state"
    lease = 30
    holder = start("holder", make_project(tmp_path / "h"), state, f"--runs-store={url}", "--runs-heartbeat=1",
                   f"--runs-lease={lease}")  # fmt: skip
    sessions.append(holder)
    wait_for(holder.started, holder)
    server.stop()
    holder.signal_group(signal.SIGKILL)
    holder.process.wait(timeout=30)
    server.start()
    # Its lock is free, as after any restart: that alone does not reclaim its run.
    early = start("early", make_project(tmp_path / "e"), state, f"--runs-store={url}", released=True)
    sessions.append(early)
    early_code, early_output = early.finish()
    assert early_code == 75, early_output
    # After its lease it is: a waiter gets the machine.
    waiter = start("waiter", make_project(tmp_path / "w"), state, f"--runs-store={url}", "--runs-on-busy=wait",
                   "--runs-wait-timeout=180", released=True)  # fmt: skip
    sessions.append(waiter)
    code, output = waiter.finish(timeout=240)
    assert code == 0, output
    old, new = by_start(db_store(url, tmp_path).list())
    assert (old.status, old.error_code) == (Status.INTERRUPTED, "owner_lost"), old
    assert "lease" in old.error_msg, old
    assert old.ended_at is not None and old.heartbeat_at is not None
    assert old.ended_at - old.heartbeat_at > timedelta(seconds=lease)
    assert new.status is Status.COMPLETED, new


class CommitAnswerLost:
    """A TCP proxy to the server that, once armed, passes on the next ``COMMIT``, waits for the
    server's answer (so the transaction did commit), and then cuts the connection instead of
    passing the answer on: the client cannot tell whether its transaction applied."""

    COMMIT = b"Q\x00\x00\x00\x0bCOMMIT\x00"  # a simple-protocol Query message
    READY = b"Z\x00\x00\x00\x05"  # ReadyForQuery: the server is done with it

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.armed = threading.Event()
        self.cuts = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        try:
            while True:
                readable, _, _ = select.select([client, upstream], [], [])
                if client in readable:
                    data = client.recv(65536)
                    if not data:
                        return
                    upstream.sendall(data)
                    if self.COMMIT in data and self.armed.is_set():
                        self.armed.clear()
                        answer = b""
                        while self.READY not in answer:
                            chunk = upstream.recv(65536)
                            assert chunk, "the server closed the connection before it answered the COMMIT"
                            answer += chunk
                        self.cuts += 1
                        return  # the answer is dropped with the connection
                if upstream in readable:
                    data = upstream.recv(65536)
                    if not data:
                        return
                    client.sendall(data)
        finally:
            client.close()
            upstream.close()

    def close(self) -> None:
        self.listener.close()


@pytest.mark.parametrize("step", ["claim", "finish"])
def test_a_change_whose_commit_answer_was_lost_is_retried_and_recognised(
    server: Server, url: str, tmp_path: Path, step: str
) -> None:
    parts = urllib.parse.urlsplit(url)
    proxy = CommitAnswerLost(parts.port or 5432)
    try:
        through = parts._replace(netloc=f"postgres@127.0.0.1:{proxy.port}").geturl()
        store = open_store(tmp_path / "state", through)
        lock = store.liveness_lock()
        owner = dataclasses.replace(Owner.current(), token=lock.token)
        run, _ = store.prepare_atomic("rig-1", "h", lambda: Run(**owner.run_fields()))
        if step == "finish":
            store.start(run.id, **owner.run_fields())
        proxy.armed.set()
        if step == "claim":
            done = store.start(run.id, **owner.run_fields())
            assert done.status is Status.RUNNING
        else:
            done = store.finish(run.id, Status.COMPLETED, exit_code=0, owner=owner)
            assert (done.status, done.exit_code) == (Status.COMPLETED, 0)
        assert proxy.cuts == 1, "the answer to its COMMIT was lost"
        (stored,) = db_store(url, tmp_path).list()
        assert stored.status is done.status and stored.fence == 1
        lock.release()
    finally:
        proxy.close()
