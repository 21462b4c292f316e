"""Liveness from held locks: the kernel decides for owners on this kernel, the owner's lease elsewhere."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from pytest_runs import Run, Status
from pytest_runs.liveness import DEFAULT_LEASE, LivenessLock, lock_path, probe, stale_reason
from pytest_runs.owner import boot_id

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
BOOT = boot_id()

HOLDER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from pytest_runs.liveness import LivenessLock
    lock = LivenessLock(Path(sys.argv[1]))
    lock.acquire()
    if sys.argv[2] == "fork-a-daemon":
        ready = Path(sys.argv[1], "child-ready")
        if os.fork() == 0:  # a long-lived child, as a test might leave behind
            ready.touch()  # past the fork handlers that close the child's copy of the lock
            time.sleep(120)
            os._exit(0)
        while not ready.exists():
            time.sleep(0.01)
    print(lock.token, flush=True)
    time.sleep(120)
    """
)


@pytest.fixture
def holders(tmp_path: Path) -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


def hold(state_dir: Path, holders: list[subprocess.Popen[str]], mode: str = "") -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(state_dir), mode or "-"], stdout=subprocess.PIPE, text=True
    )
    holders.append(process)
    assert process.stdout is not None
    token = process.stdout.readline().strip()
    assert len(token) == 32, "the holder did not start"
    return process, token


def owned(token: str, *, boot: str = BOOT, heartbeat: datetime | None = NOW, lease: float | None = None) -> Run:
    return Run(
        id="r",
        machine="rig-1",
        status=Status.RUNNING,
        owner_host="h",
        owner_boot_id=boot,
        owner_token=token,
        owner_lease=lease,
        heartbeat_at=heartbeat,
    )


def test_a_live_owner_is_alive_whatever_its_heartbeat(tmp_path: Path, holders: list[subprocess.Popen[str]]) -> None:
    _, token = hold(tmp_path, holders)
    assert probe(tmp_path, token)
    ancient = owned(token, heartbeat=NOW - timedelta(days=30), lease=1)
    assert stale_reason(ancient, NOW, BOOT, tmp_path) is None


def test_a_killed_owner_is_dead_at_once(tmp_path: Path, holders: list[subprocess.Popen[str]]) -> None:
    process, token = hold(tmp_path, holders)
    process.kill()
    process.wait()
    assert probe(tmp_path, token) is False
    assert stale_reason(owned(token), NOW, BOOT, tmp_path) == "its liveness lock is free: the owning process has ended"


def test_a_stopped_owner_keeps_its_lock(tmp_path: Path, holders: list[subprocess.Popen[str]]) -> None:
    process, token = hold(tmp_path, holders)
    process.send_signal(signal.SIGSTOP)
    try:
        assert probe(tmp_path, token)
        assert stale_reason(owned(token, heartbeat=NOW - timedelta(hours=1), lease=2), NOW, BOOT, tmp_path) is None
    finally:
        process.send_signal(signal.SIGCONT)


def test_a_daemon_forked_by_the_owner_does_not_keep_the_lock(
    tmp_path: Path, holders: list[subprocess.Popen[str]]
) -> None:
    process, token = hold(tmp_path, holders, "fork-a-daemon")
    process.kill()
    process.wait()
    # The forked child lives on (it sleeps 120 s), but a record lock is not inherited by fork.
    assert probe(tmp_path, token) is False


def test_probing_in_the_owners_own_process_keeps_the_lock(tmp_path: Path, holders: list[subprocess.Popen[str]]) -> None:
    lock = LivenessLock(tmp_path)
    lock.acquire()
    try:
        for _ in range(3):
            assert probe(tmp_path, lock.token)
        # Another process still sees it held: the probes above did not drop the POSIX lock.
        seen = subprocess.run(
            [sys.executable, "-c", "import sys; from pathlib import Path; from pytest_runs.liveness import probe; "
             "print(probe(Path(sys.argv[1]), sys.argv[2]))", str(tmp_path), lock.token],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        assert seen.stdout.strip() == "True"
    finally:
        lock.release()
    assert probe(tmp_path, lock.token) is None
    assert not lock_path(tmp_path, lock.token).exists(), "released: the file is gone"


def test_a_deleted_lock_file_falls_back_to_the_owners_lease(
    tmp_path: Path, holders: list[subprocess.Popen[str]]
) -> None:
    # Someone removes a live owner's lock file: it cannot be asked, so it is not taken for dead.
    _, token = hold(tmp_path, holders)
    lock_path(tmp_path, token).unlink()
    assert probe(tmp_path, token) is None
    run = owned(token, heartbeat=NOW, lease=60)
    assert stale_reason(run, NOW + timedelta(seconds=59), BOOT, tmp_path) is None
    expired = stale_reason(run, NOW + timedelta(seconds=61), BOOT, tmp_path)
    assert expired == "no heartbeat for more than its lease of 60s"


def test_tokens_that_are_not_ours_build_no_paths(tmp_path: Path) -> None:
    for token in ("../../etc/passwd", "", "A" * 32, "0" * 31):
        with pytest.raises(ValueError, match="32 lowercase hex"):
            lock_path(tmp_path, token)
        assert probe(tmp_path, token) is False


def test_a_symlinked_lock_file_is_not_followed(tmp_path: Path, holders: list[subprocess.Popen[str]]) -> None:
    (tmp_path / "elsewhere").mkdir()
    _, token = hold(tmp_path / "elsewhere", holders)
    (tmp_path / "owners").mkdir(mode=0o700)
    lock_path(tmp_path, token).symlink_to(lock_path(tmp_path / "elsewhere", token))
    assert probe(tmp_path, token) is None, "a planted symlink is never followed"


def test_lock_file_mode_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        lock = LivenessLock(tmp_path)
        lock.acquire()
    finally:
        os.umask(old)
    try:
        assert (lock.path.stat().st_mode & 0o777, lock.path.parent.stat().st_mode & 0o777) == (0o600, 0o700)
    finally:
        lock.release()


def test_an_owner_on_another_kernel_is_judged_by_its_own_lease(tmp_path: Path) -> None:
    # Its lock file cannot be observed from here (it is not even there): its lease decides.
    run = owned("1" * 32, boot="another-boot", lease=60)
    assert stale_reason(run, NOW + timedelta(seconds=59), BOOT, tmp_path) is None
    expired = stale_reason(run, NOW + timedelta(seconds=61), BOOT, tmp_path)
    assert expired == "no heartbeat for more than its lease of 60s"


def test_without_a_recorded_lease_the_default_applies(tmp_path: Path) -> None:
    run = owned("1" * 32, boot="another-boot", lease=None)
    assert stale_reason(run, NOW + timedelta(seconds=DEFAULT_LEASE - 1), BOOT, tmp_path) is None
    assert stale_reason(run, NOW + timedelta(seconds=DEFAULT_LEASE + 1), BOOT, tmp_path) is not None


def test_a_reservation_without_a_lock_expires_after_its_lease(tmp_path: Path) -> None:
    reservation = Run(id="r", machine="rig-1", owner_host="h", owner_lease=30, heartbeat_at=NOW)
    assert stale_reason(reservation, NOW + timedelta(seconds=29), BOOT, tmp_path) is None
    assert stale_reason(reservation, NOW + timedelta(seconds=31), BOOT, tmp_path) is not None


def test_no_owner_no_heartbeat_is_never_stale(tmp_path: Path) -> None:
    assert stale_reason(Run(id="r", status=Status.RUNNING), NOW + timedelta(days=365), BOOT, tmp_path) is None


def test_terminal_runs_are_never_stale(tmp_path: Path) -> None:
    run = owned("1" * 32, boot="x", heartbeat=NOW - timedelta(days=9))
    run.status = Status.COMPLETED
    assert stale_reason(run, NOW, BOOT, tmp_path) is None


def test_prune_removes_the_lock_files_of_killed_waiters_only(
    tmp_path: Path, holders: list[subprocess.Popen[str]]
) -> None:
    from pytest_runs import Store

    store = Store(tmp_path / "state")
    store.create(Run(machine="rig-1", test_dir_hash="h"))
    killed, dead_token = hold(store.state_dir, holders)
    killed.kill()
    killed.wait()
    _, live_token = hold(store.state_dir, holders)
    active = store.create(Run(machine="rig-2", test_dir_hash="h", owner_token="2" * 32))
    lock_path(store.state_dir, "2" * 32).write_text("")  # named by an active run: kept whatever its state
    long_ago = NOW.timestamp() - 3600
    for token in (dead_token, live_token, "2" * 32):
        os.utime(lock_path(store.state_dir, token), (long_ago, long_ago))
    store.prune(keep=0)
    assert not lock_path(store.state_dir, dead_token).exists()
    assert lock_path(store.state_dir, live_token).exists()
    assert lock_path(store.state_dir, "2" * 32).exists() and store.get(active.id).owner_token == "2" * 32


SEEN_FROM_ELSEWHERE = (
    "import sys; from pathlib import Path; from pytest_runs.liveness import probe; "
    "print(probe(Path(sys.argv[1]), sys.argv[2]))"
)


def seen_from_another_process(state_dir: Path, token: str) -> str:
    return subprocess.run(
        [sys.executable, "-c", SEEN_FROM_ELSEWHERE, str(state_dir), token], capture_output=True, text=True, check=True
    ).stdout.strip()


def test_code_in_the_owners_process_that_reads_the_lock_file_does_not_drop_the_lock(tmp_path: Path) -> None:
    # A test that copies the store opens and closes the lock file: a POSIX lock would be gone.
    lock = LivenessLock(tmp_path)
    lock.acquire()
    try:
        lock.path.read_bytes()
        shutil.copytree(tmp_path, tmp_path.parent / f"{tmp_path.name}-copy")
        assert seen_from_another_process(tmp_path, lock.token) == "True"
    finally:
        lock.release()


def test_a_lock_whose_descriptor_was_closed_is_taken_again(tmp_path: Path) -> None:
    lock = LivenessLock(tmp_path)
    lock.acquire()
    try:
        assert lock.still_held()
        os.close(lock._fd)  # type: ignore[arg-type]  # as os.closerange in a test would
        assert seen_from_another_process(tmp_path, lock.token) == "False"
        assert lock.still_held(), "the heartbeat takes it again"
        assert seen_from_another_process(tmp_path, lock.token) == "True"
    finally:
        lock.release()


def test_a_forked_child_neither_keeps_nor_gives_away_the_lock(tmp_path: Path) -> None:
    lock = LivenessLock(tmp_path)
    lock.acquire()
    try:
        read, write = os.pipe()
        child = os.fork()
        if child == 0:  # pragma: no cover - the child reports through the pipe
            # A child that runs on into pytest's shutdown: releasing from here does nothing.
            lock.release()
            os.write(write, b"held" if lock.held else b"forgotten")
            os._exit(0)
        os.close(write)
        assert os.read(read, 100) == b"forgotten"
        os.waitpid(child, 0)
        assert lock.path.exists() and seen_from_another_process(tmp_path, lock.token) == "True"
    finally:
        lock.release()
