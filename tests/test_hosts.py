"""Hosts simulated on this machine, sharing one state dir.

Sessions run in their own PID namespaces (``unshare --pid --fork --mount-proc``, as
containers do), and some in their own UTS namespaces with host names of their own: a
live or stopped owner is never reclaimed, a killed one is, at once, because they share
this kernel and its locks. A host that cannot be observed (another boot ID, as over a
network file system) is judged by the owner's own lease only: never before it, always
after it, whatever lease the reader was given.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from _sessions import (
    Namespace,
    Session,
    make_project,
    namespaces_unavailable,
    start,
    stop_outside_the_store_lock,
    wait_for,
)

from pytest_runs import PrepareOutcome, Run, Status, Store
from pytest_runs.liveness import lock_path, stale_reason
from pytest_runs.options import EXIT_MACHINE_LOST
from pytest_runs.owner import boot_id

BUSY = 75
FREED_AT_ONCE = "its liveness lock is free: the owning process has ended"
FOREIGN_BOOT = "00000000-0000-4000-8000-0000000f0e19"  # the boot ID of a host this one cannot observe


@pytest.fixture
def namespaces() -> None:
    reason = namespaces_unavailable()
    if reason is not None:
        pytest.skip(reason)


# In a PID namespace only (same host name), and in PID and UTS namespaces with host names of their own.
HOSTS = [
    pytest.param(("", ""), id="pid-namespaces"),
    pytest.param(("host-a", "host-b"), id="pid-and-uts-namespaces"),
]


def only_run(store: Store) -> Run:
    (run,) = store.list()
    return run


def without_heartbeat(run: Run) -> Run:
    return dataclasses.replace(run, heartbeat_at=None)


@pytest.mark.usefixtures("namespaces")
@pytest.mark.parametrize("hosts", HOSTS)
def test_a_live_or_stopped_owner_in_another_namespace_keeps_its_machine(
    tmp_path: Path, sessions: list[Session], hosts: tuple[str, str]
) -> None:
    host_a, host_b = hosts
    state_dir = tmp_path / "state"
    project_a, project_b = make_project(tmp_path / "a"), make_project(tmp_path / "b")
    owner = start("a", project_a, state_dir, "--runs-lease=2", "--runs-heartbeat=1", namespace=Namespace(host_a))
    sessions.append(owner)
    wait_for(owner.started, owner)
    pid_in_namespace = int(owner.started.read_text())
    store = Store(state_dir)
    run = only_run(store)
    assert run.status is Status.RUNNING
    assert run.owner_host == (host_a or socket.gethostname())
    assert run.owner_boot_id == boot_id() and run.owner_lease == 2 and run.owner_token
    # The recorded PID means nothing here: the owner's namespace numbers its processes from 1.
    assert run.owner_pid == pid_in_namespace < 10
    assert pid_in_namespace not in (owner.pid, owner.namespace_init())

    for attempt in ("live", "stopped"):
        if attempt == "stopped":
            # The whole container frozen for twice the owner's lease: its heartbeat goes stale,
            # its liveness lock stays held.
            stop_outside_the_store_lock(owner, state_dir)
            time.sleep(4)
            heartbeat = store.get(run.id).heartbeat_at
            assert heartbeat is not None and datetime.now(UTC) - heartbeat > timedelta(seconds=2)
        try:
            reader = start(
                f"b-{attempt}", project_b, state_dir, "--runs-on-busy=fail", namespace=Namespace(host_b), released=True
            )
            sessions.append(reader)
            status, output = reader.finish()
        finally:
            owner.signal_group(signal.SIGCONT)
        assert status == BUSY, output
        assert "machine rig-1 is busy" in output and run.id in output, output
        after = store.get(run.id)
        assert after.status is Status.RUNNING, f"the {attempt} owner was reclaimed: {after}"
        assert without_heartbeat(after) == without_heartbeat(run)

    assert owner.process.poll() is None, "the owner must have survived its stop"
    owner.release.write_text("go")
    status, output = owner.finish()
    assert status == 0, output
    assert "lost machine" not in output
    ended = only_run(store)  # the readers never created a run
    assert (ended.id, ended.status, ended.exit_code) == (run.id, Status.COMPLETED, 0)


@pytest.mark.usefixtures("namespaces")
@pytest.mark.parametrize("hosts", HOSTS)
def test_a_killed_owner_in_another_namespace_frees_its_machine_at_once(
    tmp_path: Path, sessions: list[Session], hosts: tuple[str, str]
) -> None:
    host_a, host_b = hosts
    state_dir = tmp_path / "state"
    project_a, project_b = make_project(tmp_path / "a"), make_project(tmp_path / "b")
    # The default lease (300 s): only the kernel can free this machine in time.
    owner = start("a", project_a, state_dir, namespace=Namespace(host_a))
    sessions.append(owner)
    wait_for(owner.started, owner)
    pid_in_namespace = int(owner.started.read_text())
    owner.kill_namespace()

    follower = start("b", project_b, state_dir, "--runs-on-busy=fail", namespace=Namespace(host_b), released=True)
    sessions.append(follower)
    status, output = follower.finish()
    assert status == 0, output
    store = Store(state_dir)
    killed, new = store.list()
    assert (killed.status, killed.error_code) == (Status.INTERRUPTED, "owner_lost")
    assert f"host {host_a or socket.gethostname()} PID {pid_in_namespace}, " in killed.error_msg
    assert killed.error_msg.endswith(FREED_AT_ONCE), killed.error_msg
    assert new.status is Status.COMPLETED and new.owner_host == (host_b or socket.gethostname())
    assert new.fence is not None and killed.fence is not None and new.fence == killed.fence + 1
    assert not lock_path(state_dir, killed.owner_token).exists(), "the dead owner's lock file is cleaned up"


def foreign_owner(heartbeat_at: datetime, lease: float) -> dict[str, object]:
    """The owner fields of a session on a host that shares the store but not this kernel."""
    return {
        "owner_host": "elsewhere",
        "owner_boot_id": FOREIGN_BOOT,
        "owner_pid": os.getpid(),  # a live PID here, which must not matter either
        "owner_started": "1",
        "owner_token": secrets.token_hex(16),
        "owner_lease": lease,
        "heartbeat_at": heartbeat_at,
    }


def reserve(project: Path, state_dir: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest_runs", "--state-dir", str(state_dir), "reserve", "--machine", "rig-1",
         "--test-dir", str(project)],
        capture_output=True, text=True, timeout=60, env={**os.environ, **env},
    )  # fmt: skip


def test_an_owner_that_cannot_be_observed_keeps_its_machine_for_its_own_lease(
    tmp_path: Path, sessions: list[Session]
) -> None:
    state_dir = tmp_path / "state"
    project = make_project(tmp_path / "b")
    store = Store(state_dir)
    run = store.create(Run(machine="rig-1", test_dir_hash="tests-elsewhere"))
    run = store.start(run.id, **foreign_owner(datetime.now(UTC) - timedelta(seconds=20), lease=60))
    # Its lock file is visible here, and free: a reader must not take that for the owner's death,
    # since a lock held on another host cannot be seen from this one.
    lock = lock_path(state_dir, run.owner_token)
    lock.parent.mkdir(exist_ok=True)
    lock.touch()

    assert run.heartbeat_at is not None
    beat = run.heartbeat_at
    assert stale_reason(run, beat + timedelta(seconds=59.9), boot_id(), state_dir) is None
    assert stale_reason(run, beat + timedelta(seconds=60.1), boot_id(), state_dir) == (
        "no heartbeat for more than its lease of 60s"
    )

    # Readers with leases of their own far shorter than the 20 s since the owner's heartbeat.
    tight = ("--runs-on-busy=fail", "--runs-lease=1", "--runs-heartbeat=0.5")
    for name, args, env in (
        ("b-flags", tight, {}),
        ("b-env", ("--runs-on-busy=fail",), {"PYTEST_RUNS_LEASE": "1", "PYTEST_RUNS_HEARTBEAT": "0.5"}),
    ):
        reader = start(name, project, state_dir, *args, env=env, released=True)
        sessions.append(reader)
        status, output = reader.finish()
        assert status == BUSY, output
        assert "machine rig-1 is busy" in output and run.id in output, output
    reserved = reserve(project, state_dir, PYTEST_RUNS_LEASE="1")
    assert reserved.returncode == BUSY, (reserved.stdout, reserved.stderr)
    assert "machine rig-1 is busy" in reserved.stderr and run.id in reserved.stderr, reserved.stderr
    holder, outcome = Store(state_dir).prepare_atomic("rig-1", "h-reader", Run)
    assert (holder.id, outcome) == (run.id, PrepareOutcome.BUSY)
    assert store.list() == [run], "nothing changed the owner's run, nothing else was created"

    # Past the owner's own lease, the next reader reclaims it.
    run.heartbeat_at = datetime.now(UTC) - timedelta(seconds=61)
    store.update(run)
    follower = start("b-after-lease", project, state_dir, "--runs-on-busy=fail", released=True)
    sessions.append(follower)
    status, output = follower.finish()
    assert status == 0, output
    lost, new = store.list()
    assert (lost.id, lost.status, lost.error_code) == (run.id, Status.INTERRUPTED, "owner_lost")
    assert lost.error_msg.endswith("no heartbeat for more than its lease of 60s"), lost.error_msg
    assert new.status is Status.COMPLETED


@pytest.mark.usefixtures("namespaces")
def test_a_killed_owner_seen_from_a_host_that_cannot_observe_it_is_reclaimed_after_its_lease(
    tmp_path: Path, sessions: list[Session]
) -> None:
    state_dir = tmp_path / "state"
    lease = 3.0
    owner = start(
        "a", make_project(tmp_path / "a"), state_dir, f"--runs-lease={lease:g}", "--runs-heartbeat=0.5",
        namespace=Namespace("host-a"),
    )  # fmt: skip
    sessions.append(owner)
    wait_for(owner.started, owner)
    # A reader on another host: it shares the store but not this kernel, so it cannot ask the lock.
    elsewhere = Store(state_dir)
    elsewhere._files.boot_id = FOREIGN_BOOT

    def mk() -> Run:
        return Run(owner_host="host-z", owner_boot_id=FOREIGN_BOOT, heartbeat_at=datetime.now(UTC))

    # Alive and beating: never reclaimed, for longer than its lease.
    watched_until = time.monotonic() + lease + 1
    while time.monotonic() < watched_until:
        holder, outcome = elsewhere.prepare_atomic("rig-1", "h-elsewhere", mk)
        assert outcome is PrepareOutcome.BUSY, f"a live owner was reclaimed from another host: {holder}"
        time.sleep(0.25)

    owner.kill_namespace()
    run = elsewhere.get(holder.id)
    assert run.status is Status.RUNNING and run.heartbeat_at is not None and run.owner_host == "host-a"
    beat = run.heartbeat_at
    # This kernel sees the death at once; another host only once the owner's lease has passed.
    assert stale_reason(run, beat, boot_id(), state_dir) == FREED_AT_ONCE
    assert stale_reason(run, beat + timedelta(seconds=lease - 0.1), FOREIGN_BOOT, state_dir) is None
    assert stale_reason(run, beat + timedelta(seconds=lease + 0.1), FOREIGN_BOOT, state_dir) == (
        f"no heartbeat for more than its lease of {lease:g}s"
    )
    _, outcome = elsewhere.prepare_atomic("rig-1", "h-elsewhere", mk)
    if datetime.now(UTC) - beat < timedelta(seconds=lease):  # not checkable on a machine stalled for seconds
        assert outcome is PrepareOutcome.BUSY, "another host cannot know before the owner's lease has passed"

    while datetime.now(UTC) - beat <= timedelta(seconds=lease + 0.2):
        time.sleep(0.1)
    new, outcome = elsewhere.prepare_atomic("rig-1", "h-elsewhere", mk)
    assert outcome is PrepareOutcome.CREATED
    lost = elsewhere.get(run.id)
    assert (lost.status, lost.error_code) == (Status.INTERRUPTED, "owner_lost")
    assert lost.error_msg.endswith(f"no heartbeat for more than its lease of {lease:g}s"), lost.error_msg
    assert new.fence is not None and run.fence is not None and new.fence > run.fence


@pytest.mark.usefixtures("namespaces")
def test_a_stopped_owner_reclaimed_from_a_host_that_cannot_observe_it_fails_when_it_resumes(
    tmp_path: Path, sessions: list[Session]
) -> None:
    """Frozen past its lease, an owner on another host is reclaimed there; thawed, it must not report a success."""
    state_dir = tmp_path / "state"
    owner = start(
        "a", make_project(tmp_path / "a"), state_dir, "--runs-lease=3", "--runs-heartbeat=2",
        namespace=Namespace("host-a"),
    )  # fmt: skip
    sessions.append(owner)
    wait_for(owner.started, owner)
    elsewhere = Store(state_dir)
    elsewhere._files.boot_id = FOREIGN_BOOT
    stop_outside_the_store_lock(owner, state_dir)
    try:
        run = only_run(elsewhere)
        assert run.heartbeat_at is not None
        while datetime.now(UTC) - run.heartbeat_at <= timedelta(seconds=3.2):
            time.sleep(0.1)
        _, outcome = elsewhere.prepare_atomic("rig-1", "h-elsewhere", Run)
        assert outcome is PrepareOutcome.CREATED
        lost = elsewhere.get(run.id)
        assert (lost.status, lost.error_code) == (Status.INTERRUPTED, "owner_lost")
        owner.release.write_text("go")  # its test ends as soon as it runs again
    finally:
        owner.signal_group(signal.SIGCONT)
    status, output = owner.finish()
    assert status == EXIT_MACHINE_LOST, f"the owner whose run was reclaimed exited {status}:\n{output}"
    assert elsewhere.get(run.id) == lost, "the reclaimed record is left as it is"
