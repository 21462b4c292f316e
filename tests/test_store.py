"""The store's methods, outcomes and refusals, one process at a time."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from _sessions import store_lock_is_free

from pytest_runs import (
    InvalidTransition,
    PrepareOutcome,
    Run,
    RunEnded,
    RunNotFound,
    StateError,
    Status,
    Store,
    StoreLocked,
)
from pytest_runs.filebackend import FileBackend, FileTransaction
from pytest_runs.owner import Owner
from pytest_runs.store import FORMAT_VERSION, open_store

#: Every kind of store the contract tests run against: the JSON files, new and upgraded from
#: format 1 (as pytest-runs 0.1 wrote it), and the PostgreSQL backend.
KINDS = ("format-3", "upgraded-from-format-1", "postgresql")
#: Tests of the JSON files themselves (their bytes, modes, flushes, locks) run on those only.
file_only = pytest.mark.kinds("format-3", "upgraded-from-format-1")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "store_kind" in metafunc.fixturenames:
        marker = metafunc.definition.get_closest_marker("kinds")
        metafunc.parametrize("store_kind", marker.args if marker else KINDS)


@pytest.fixture
def make_store(store_kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> Callable[[], Store]:
    """Makes ``Store`` objects on one store of ``store_kind``."""
    state = tmp_path / "state"
    url = request.getfixturevalue("pg_url") if store_kind == "postgresql" else None
    if store_kind == "upgraded-from-format-1":
        state.mkdir(mode=0o700)
        (state / "runs.json").write_text('{"format": "pytest-runs-state", "version": 1, "runs": []}\n')
    return lambda: open_store(state, url)


@pytest.fixture
def store(make_store: Callable[[], Store]) -> Store:
    return make_store()


def pending(machine: str = "rig-1", test_dir_hash: str = "h1") -> Run:
    return Run(machine=machine, test_dir="/tests", test_dir_hash=test_dir_hash)


# -- create, get, list, update --------------------------------------------------------


@file_only
def test_create_assigns_a_fresh_id_and_persists(store: Store) -> None:
    run = Run(id="chosen-by-caller", machine="rig-1", test_dir_hash="h")
    returned = store.create(run)
    assert returned is run
    assert run.id != "chosen-by-caller"
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,64}", run.id)
    assert store.get(run.id) == run
    assert json.loads(store.state_path.read_text())["version"] == FORMAT_VERSION
    on_disk = FileBackend(store.state_dir, lock_timeout=1).committed_document()
    assert [r["id"] for r in on_disk["runs"]] == [run.id]


def test_ids_are_unique_and_sort_in_creation_order(store: Store) -> None:
    ids = [store.create(pending(machine=f"m{i}")).id for i in range(50)]
    assert len(set(ids)) == 50
    assert sorted(ids) == ids


@file_only
def test_ids_keep_order_when_the_clock_steps_back(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    first = store.create(pending()).id
    monkeypatch.setattr(FileTransaction, "now", lambda self: datetime(2000, 1, 1, tzinfo=UTC))
    second = store.create(pending(machine="rig-2")).id
    assert second > first


def test_get_unknown_id(store: Store) -> None:
    with pytest.raises(RunNotFound, match="no run with ID 'nope'"):
        store.get("nope")
    assert issubclass(RunNotFound, LookupError)


def test_list_is_in_insertion_order(store: Store) -> None:
    assert store.list() == []
    created = [store.create(pending(machine=m)) for m in ("c", "a", "b")]
    assert [r.machine for r in store.list()] == ["c", "a", "b"]
    assert store.list() == created


def test_update_overwrites_the_record(store: Store) -> None:
    run = store.create(pending())
    run.status = Status.RUNNING
    run.started_at = datetime(2026, 1, 1, tzinfo=UTC)
    run.logs_path = "/logs/x"
    store.update(run)
    assert store.get(run.id) == run


def test_update_unknown_id(store: Store) -> None:
    store.create(pending())
    with pytest.raises(RunNotFound):
        store.update(Run(id="missing", machine="rig-1"))


def test_terminal_runs_never_transition(store: Store) -> None:
    run = store.create(pending())
    run.status = Status.COMPLETED
    store.update(run)
    run.error_msg = "annotated later"
    store.update(run)  # same status: allowed
    run.status = Status.RUNNING
    with pytest.raises(InvalidTransition, match="cannot become running"):
        store.update(run)
    assert store.get(run.id).status is Status.COMPLETED


@pytest.mark.parametrize("field", ["machine", "test_dir_hash"])
def test_machine_and_hash_are_fixed(store: Store, field: str) -> None:
    run = store.create(pending())
    setattr(run, field, "other")
    with pytest.raises(InvalidTransition, match=field):
        store.update(run)


def test_returned_runs_are_copies(store: Store) -> None:
    run = store.create(pending())
    fetched = store.get(run.id)
    fetched.status = Status.FAILED
    run.error_msg = "changed after create"
    assert store.get(run.id).status is Status.PENDING
    assert store.get(run.id).error_msg == ""
    store.list()[0].machine = "elsewhere"
    assert store.get(run.id).machine == "rig-1"


def test_two_store_objects_see_each_other(make_store: Callable[[], Store]) -> None:
    first, second = make_store(), make_store()
    run = first.create(pending())
    assert second.get(run.id) == run
    run.status = Status.RUNNING
    second.update(run)
    assert first.get(run.id).status is Status.RUNNING


# -- queries ----------------------------------------------------------------------------


def test_active_by_machine(store: Store) -> None:
    assert store.active_by_machine("rig-1") is None
    done = store.create(Run(machine="rig-1", test_dir_hash="h0", status=Status.COMPLETED))
    assert store.active_by_machine("rig-1") is None
    first = store.create(pending(test_dir_hash="h1"))
    with pytest.raises(InvalidTransition, match="machine rig-1 already has an active run"):
        store.create(pending(test_dir_hash="h2"))
    store.create(pending(machine="rig-2"))
    assert store.active_by_machine("rig-1") == first
    first.status = Status.RUNNING
    store.update(first)
    assert store.active_by_machine("rig-1") == first
    assert done.id != first.id


def test_find_by_test_dir_hash_and_machine(store: Store) -> None:
    a = store.create(Run(machine="rig-1", test_dir_hash="h", status=Status.FAILED))
    store.create(pending(machine="rig-2", test_dir_hash="h"))
    store.create(Run(machine="rig-1", test_dir_hash="other", status=Status.COMPLETED))
    b = store.create(pending(machine="rig-1", test_dir_hash="h"))
    assert store.find_by_test_dir_hash_and_machine("h", "rig-1") == [a, b]
    assert store.find_by_test_dir_hash_and_machine("nope", "rig-1") == []


# -- prepare_atomic ---------------------------------------------------------------------


def test_prepare_creates_on_an_idle_machine(store: Store) -> None:
    calls: list[int] = []

    def mk() -> Run:
        calls.append(1)
        return Run(test_dir="/tests")

    run, outcome = store.prepare_atomic("rig-1", "h1", mk)
    assert outcome is PrepareOutcome.CREATED
    assert calls == [1]
    assert (run.machine, run.test_dir_hash, run.status) == ("rig-1", "h1", Status.PENDING)
    assert store.list() == [run]


def test_prepare_reuses_the_same_hash_without_calling_mk(store: Store) -> None:
    first, _ = store.prepare_atomic("rig-1", "h1", pending)

    def mk() -> Run:
        raise AssertionError("mk must only be called on the create path")

    again, outcome = store.prepare_atomic("rig-1", "h1", mk)
    assert outcome is PrepareOutcome.REUSE
    assert again == first
    assert len(store.list()) == 1


def test_prepare_reports_busy_with_the_occupying_run(store: Store) -> None:
    holder, _ = store.prepare_atomic("rig-1", "h1", pending)
    holder.status = Status.RUNNING
    store.update(holder)
    run, outcome = store.prepare_atomic("rig-1", "h2", lambda: pending(test_dir_hash="h2"))
    assert outcome is PrepareOutcome.BUSY
    assert run == holder
    _, outcome = store.prepare_atomic("rig-2", "h2", lambda: pending("rig-2", "h2"))
    assert outcome is PrepareOutcome.CREATED


@pytest.mark.parametrize("status", [s for s in Status if s.is_terminal])
def test_terminal_runs_never_block(store: Store, status: Status) -> None:
    old, _ = store.prepare_atomic("rig-1", "h1", pending)
    store.finish(old.id, status)
    fresh, outcome = store.prepare_atomic("rig-1", "h1", pending)
    assert outcome is PrepareOutcome.CREATED
    assert fresh.id != old.id


@pytest.mark.parametrize(("machine", "test_dir_hash"), [("", "h"), ("rig-1", "")])
def test_prepare_refuses_empty_names(store: Store, machine: str, test_dir_hash: str) -> None:
    before = store.state_path.read_bytes() if store.state_path.exists() else None
    with pytest.raises(ValueError, match="must be a non-empty string"):
        store.prepare_atomic(machine, test_dir_hash, pending)
    assert (store.state_path.read_bytes() if store.state_path.exists() else None) == before, "nothing written"


def test_prepare_refuses_a_mk_for_another_machine(store: Store) -> None:
    with pytest.raises(ValueError, match="machine='rig-2'"):
        store.prepare_atomic("rig-1", "h1", lambda: pending(machine="rig-2"))
    assert store.list() == []


def test_mk_failing_creates_nothing(store: Store) -> None:
    def mk() -> Run:
        raise OSError("cannot build")

    with pytest.raises(OSError, match="cannot build"):
        store.prepare_atomic("rig-1", "h1", mk)
    assert store.list() == []
    assert store.prepare_atomic("rig-1", "h1", pending)[1] is PrepareOutcome.CREATED


def test_mk_calling_the_store_raises_instead_of_deadlocking(store: Store) -> None:
    with pytest.raises(RuntimeError, match="called again from inside"):
        store.prepare_atomic("rig-1", "h1", lambda: store.list()[0])


@file_only
def test_second_store_in_the_same_thread_raises_instead_of_deadlocking(make_store: Callable[[], Store]) -> None:
    first, second = make_store(), make_store()
    second.lock_timeout = 0.5
    first.create(pending(machine="rig-9"))
    finished = threading.Event()
    errors: list[BaseException] = []

    def nested() -> None:
        try:
            first.prepare_atomic("rig-1", "h", lambda: second.list()[0])
        except BaseException as error:
            errors.append(error)
        finished.set()

    threading.Thread(target=nested, daemon=True).start()
    assert finished.wait(30), "a second lock instance in the same thread deadlocked"
    assert isinstance(errors[0], StoreLocked)
    assert f"held by this process (PID {os.getpid()})" in str(errors[0])


# -- lifecycle rules --------------------------------------------------------------------


def test_start_claims_a_pending_run_once(store: Store) -> None:
    run = store.create(pending())
    started = store.start(run.id, logs_path="/l")
    assert started.status is Status.RUNNING and started.started_at is not None and started.logs_path == "/l"
    with pytest.raises(InvalidTransition, match="already running"):
        store.start(run.id)


def test_finish_and_refusal_to_overwrite(store: Store) -> None:
    run = store.create(pending())
    ended = store.finish(run.id, Status.FAILED, exit_code=1, error_code="tests_failed", error_msg="1 failed")
    assert (ended.status, ended.exit_code, ended.error_code) == (Status.FAILED, 1, "tests_failed")
    assert ended.ended_at is not None
    with pytest.raises(RunEnded) as caught:
        store.finish(run.id, Status.COMPLETED, exit_code=0)
    assert caught.value.run == ended
    assert store.get(run.id) == ended
    with pytest.raises(ValueError, match="terminal status"):
        store.finish(store.create(pending()).id, Status.RUNNING)


def test_release(store: Store) -> None:
    run = store.create(pending())
    released = store.release(run.id, "rig rebooted")
    assert (released.status, released.error_code) == (Status.INTERRUPTED, "released")
    assert "rig rebooted" in released.error_msg
    with pytest.raises(RunEnded, match="already ended as interrupted"):
        store.release(run.id, "again")
    with pytest.raises(RunNotFound):
        store.release("missing", "x")


def test_run_dir_refuses_unsafe_ids(store: Store) -> None:
    assert store.run_dir("20260101-000000-000000-abcdef") == store.state_dir / "runs" / "20260101-000000-000000-abcdef"
    for bad in ["../escape", "a/b", "", ".", "x" * 65, "/abs"]:
        with pytest.raises(StateError, match="not a safe path component"):
            store.run_dir(bad)


# -- the state on disk ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "complaint"),
    [
        (b"{not json", "is not valid JSON"),
        (b"", "is empty"),
        (b"\xff\xfe", "is not valid JSON"),
        (b"[]", "not a pytest-runs state file"),
        (b'{"runs": []}', "not a pytest-runs state file"),
        (b'{"format": "pytest-runs-state", "version": 99, "runs": []}', "format version 99, newer"),
        (b'{"format": "pytest-runs-state", "version": "1", "runs": []}', "invalid format version"),
        (b'{"format": "pytest-runs-state", "version": 1}', 'no "runs" list'),
        (b'{"format": "pytest-runs-state", "version": 1, "runs": [{"status": "zombie"}]}', "run #0: unknown status"),
        (b'{"format": "pytest-runs-state", "version": 1, "runs": [7]}', "run #0: a run must be a JSON object"),
    ],
)
def test_unusable_state_is_refused_and_left_untouched(tmp_path: Path, content: bytes, complaint: str) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    state_file = state_dir / "runs.json"
    state_file.write_bytes(content)
    before = os.stat(state_file)
    store = Store(state_dir)
    operations: list[Callable[[], object]] = [
        lambda: store.list(),
        lambda: store.create(pending()),
        lambda: store.prepare_atomic("rig-1", "h", pending),
        lambda: store.get("x"),
    ]
    for operation in operations:
        with pytest.raises(StateError) as caught:
            operation()
        assert str(state_file) in str(caught.value)
        assert complaint in str(caught.value)
        assert "\n" not in str(caught.value)
    assert state_file.read_bytes() == content
    assert os.stat(state_file).st_mtime_ns == before.st_mtime_ns
    assert sorted(p.name for p in state_dir.iterdir()) == ["runs.json", "runs.lock"]


def test_state_dir_that_is_a_file(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StateError, match=f"cannot create state dir {blocker}/state"):
        Store(blocker / "state")
    with pytest.raises(StateError, match="exists and is not a directory"):
        Store(blocker)


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077])
def test_permissions_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        store = Store(tmp_path / "deep" / "state")
        store.create(pending())
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(store.state_dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(store.state_path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(store.lock_path).st_mode) == 0o600


@file_only
def test_lock_file_is_never_replaced(store: Store) -> None:
    store.create(pending())
    inode = os.stat(store.lock_path).st_ino
    for index in range(5):
        store.create(pending(machine=f"rig-{index + 2}"))
    assert os.stat(store.lock_path).st_ino == inode


@file_only
def test_writes_are_flushed_before_they_return(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    real_fsync, real_fdatasync = os.fsync, os.fdatasync

    def spy(real: Callable[[int], None]) -> Callable[[int], None]:
        def flush(fd: int) -> None:
            synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else os.readlink(f"/proc/self/fd/{fd}"))
            real(fd)

        return flush

    monkeypatch.setattr(os, "fsync", spy(real_fsync))
    monkeypatch.setattr(os, "fdatasync", spy(real_fdatasync))
    store.create(pending())
    if store.state_dir.joinpath("runs.json.v1.bak").exists():
        assert synced[0] == str(store.state_dir / "runs.state.0"), "an upgrade: the slot, then runs.json"
        assert synced[-2].startswith(str(store.state_dir / ".runs.json.")) and synced[-1] == "dir"
    else:
        assert synced[0].startswith(str(store.state_dir / ".runs.json.")), "a new store: runs.json, then the slot"
        assert synced[-2:] == [str(store.state_dir / "runs.state.0"), "dir"]
    store.create(pending(machine="rig-2"))
    synced.clear()
    run = store.create(pending(machine="rig-3"))
    assert synced == [str(store.state_dir / "runs.state.0")], "a commit is one flush of the older slot"
    store.finish(run.id, Status.COMPLETED)
    again = store.create(pending(machine="rig-3"))
    synced.clear()
    store.finish(again.id, Status.COMPLETED)
    assert len(synced) == 2 and "/history/" in synced[0] and synced[1].endswith("runs.state.1"), (
        "a finish: the history line, then the state"
    )
    synced.clear()
    store.list()
    assert synced == [], "a read must not write"


@file_only
def test_heartbeats_skip_the_flush_and_a_power_cut_can_lose_only_them(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    owner = Owner.current()
    run, _ = store.prepare_atomic("rig-1", "h1", lambda: Run(**owner.run_fields()))
    store.create(pending(machine="rig-2"))  # both slots exist: no new file, no folder flush
    claimed = store.start(run.id, **owner.run_fields())
    slots = sorted(store.state_dir.glob("runs.state.*"))
    after_claim = {slot: slot.read_bytes() for slot in slots}
    flushes: list[str] = []
    real_fsync, real_fdatasync = os.fsync, os.fdatasync

    def counting(name: str, real: Callable[[int], None]) -> Callable[[int], None]:
        def flush(fd: int) -> None:
            flushes.append(f"{name} {os.readlink(f'/proc/self/fd/{fd}')}")
            real(fd)

        return flush

    monkeypatch.setattr(os, "fsync", counting("fsync", real_fsync))
    monkeypatch.setattr(os, "fdatasync", counting("fdatasync", real_fdatasync))
    beats = [store.heartbeat(run.id, owner) for _ in range(5)]
    assert flushes == [], "a heartbeat's commit is not flushed"
    assert store.get(run.id) == beats[-1], "yet every reader sees it at once"
    written = [slot for slot in slots if slot.read_bytes() != after_claim[slot]]
    assert len(written) == 1, "every heartbeat went into one slot: the other keeps the claim, flushed"
    # A power cut that loses the unflushed slot loses the heartbeats, and only them.
    kept = written[0].read_bytes()
    written[0].write_bytes(kept[: len(kept) // 2])
    assert store.get(run.id) == claimed
    written[0].write_bytes(kept)
    store.finish(run.id, Status.COMPLETED, owner=owner)
    assert flushes[-1] == f"fdatasync {written[0]}", "a finish still flushes: the state, over the unflushed slot"
    assert flushes[:-1] and all("/history" in flush for flush in flushes[:-1]), "after its history line"
    flushes.clear()
    store.create(pending(machine="rig-3"))
    assert len(flushes) == 1 and not flushes[0].endswith(written[0].name), "after a flushed commit: the other slot"


@file_only
@pytest.mark.parametrize("failing", ["pwrite", "ftruncate", "fdatasync"])
def test_a_failed_write_keeps_the_previous_state(store: Store, monkeypatch: pytest.MonkeyPatch, failing: str) -> None:
    kept = [store.create(pending(machine=f"rig-{i}")) for i in range(3)]
    names = sorted(p.name for p in store.state_dir.iterdir())

    def broken(*args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, failing, broken)
    expected = r"cannot write state file .*No space left on device.*previous state is intact"
    with pytest.raises(StateError, match=expected):
        store.create(pending(machine="rig-9"))
    monkeypatch.undo()
    assert store.list() == kept
    assert sorted(p.name for p in store.state_dir.iterdir()) == names
    assert store.create(pending(machine="rig-9")).machine == "rig-9"


@file_only
def test_a_torn_slot_is_a_write_that_never_happened(store: Store) -> None:
    kept = [store.create(pending(machine=f"rig-{i}")) for i in range(3)]
    newest = max(store.state_dir.glob("runs.state.*"), key=lambda p: p.stat().st_mtime_ns)
    content = newest.read_bytes()
    newest.write_bytes(content[: len(content) // 2])
    assert store.list() == kept[:2], "the other slot holds the state committed before"
    for slot in store.state_dir.glob("runs.state.*"):
        slot.write_bytes(slot.read_bytes()[:-3])
    with pytest.raises(StateError, match="none holds a complete state"):
        store.list()


def test_symlinked_state_file_is_refused(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    target = tmp_path / "elsewhere.json"
    target.write_text("precious")
    (state_dir / "runs.json").symlink_to(target)
    store = Store(state_dir)
    with pytest.raises(StateError, match="is a symbolic link"):
        store.list()
    with pytest.raises(StateError, match="is a symbolic link"):
        store.create(pending())
    assert target.read_text() == "precious"


def test_symlinked_lock_file_is_refused(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    target = tmp_path / "victim"
    target.write_text("precious")
    (state_dir / "runs.lock").symlink_to(target)
    with pytest.raises(StateError, match=r"lock file .* is a symbolic link"):
        Store(state_dir).create(pending())
    assert target.read_text() == "precious"


# -- fences -----------------------------------------------------------------------------


def test_each_run_that_becomes_active_gets_the_machines_next_fence(store: Store) -> None:
    first, _ = store.prepare_atomic("rig-1", "h1", Run)
    other, _ = store.prepare_atomic("rig-2", "h1", Run)
    store.finish(first.id, Status.COMPLETED, exit_code=0)
    second, _ = store.prepare_atomic("rig-1", "h2", Run)
    assert (first.fence, other.fence, second.fence) == (1, 1, 2)
    assert store.get(second.id).to_dict()["fence"] == 2
    imported = store.create(Run(machine="rig-1", test_dir_hash="h9", status=Status.COMPLETED))
    assert imported.fence is None, "a run that never becomes active takes no fence"


def test_fences_are_never_reused_not_even_after_prune(store: Store) -> None:
    for n in range(3):
        run, _ = store.prepare_atomic("rig-1", f"h{n}", Run)
        store.finish(run.id, Status.COMPLETED, exit_code=0)
    assert store.prune(keep=0)
    assert store.list() == []
    run, _ = store.prepare_atomic("rig-1", "h", Run)
    assert run.fence == 4


def test_a_fence_given_by_the_caller_is_replaced(store: Store) -> None:
    run = store.create(Run(machine="rig-1", test_dir_hash="h", fence=999))
    assert run.fence == 1


# -- format versions --------------------------------------------------------------------


def test_a_format_1_store_is_upgraded_on_first_use_with_a_backup(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    old = Run(id="20260101-000000-000000-abcdef", machine="rig-1", test_dir_hash="h", fence=None)
    v1 = json.dumps({"format": "pytest-runs-state", "version": 1, "runs": [old.to_dict()]}).encode()
    (state / "runs.json").write_bytes(v1)
    store = Store(state)
    with caplog.at_level("WARNING", logger="pytest_runs"):
        assert store.list() == [old], "the upgrade keeps every run as it was"
    assert (state / "runs.json.v1.bak").read_bytes() == v1
    assert json.loads((state / "runs.json").read_bytes())["version"] == FORMAT_VERSION == 3
    assert [r.getMessage() for r in caplog.records] == [
        f"pytest-runs: upgraded state file {state / 'runs.json'} from format 1 to 3; "
        f"the old file is kept as {state / 'runs.json.v1.bak'}"
    ]
    store.finish(old.id, Status.COMPLETED, exit_code=0)
    assert store.prepare_atomic("rig-1", "h2", Run)[0].fence == 1
    assert len(caplog.records) == 1, "upgraded once"


@pytest.mark.parametrize("fences", ["[1]", '{"rig-1": "2"}', '{"rig-1": true}'])
def test_a_bad_fence_map_is_refused(tmp_path: Path, fences: str) -> None:
    state = tmp_path / "state"
    state.mkdir()
    raw = f'{{"format": "pytest-runs-state", "version": 2, "fences": {fences}, "runs": []}}'.encode()
    (state / "runs.json").write_bytes(raw)
    with pytest.raises(StateError, match='bad "fences" map'):
        Store(state).prepare_atomic("rig-1", "h", Run)
    assert (state / "runs.json").read_bytes() == raw


# -- a frozen holder of the store lock --------------------------------------------------


def test_a_frozen_lock_holder_makes_every_call_give_up_naming_it(tmp_path: Path) -> None:
    store = Store(tmp_path / "state", lock_timeout=0.5)
    store.create(pending())
    # flock(1) hands its locked descriptor to sleep: exec keeps the lock in that other process too.
    holder = subprocess.Popen(["flock", str(store.lock_path), "sleep", "60"], start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while holder.pid not in _flock_holders(store):
            assert time.monotonic() < deadline, "flock never took the lock"
            time.sleep(0.02)
        for call in (store.list, lambda: store.prepare_atomic("rig-1", "h", Run), store.machines):
            started = time.monotonic()
            with pytest.raises(StoreLocked) as raised:
                call()
            assert time.monotonic() - started < 20, "bounded by the lock timeout, not forever"
            assert str(store.lock_path) in str(raised.value)
            assert f"PID {holder.pid}" in str(raised.value)
            assert holder.pid in raised.value.holders
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()
    assert len(store.list()) == 1, "usable again once the holder is gone"


def _flock_holders(store: Store) -> list[int]:
    from pytest_runs.store import lock_holders

    return lock_holders(store.lock_path)


# -- a fork inside a transaction ----------------------------------------------------------

# Forks a child that lives on (sleeps) from inside a store transaction (the ``mk`` of a
# prepare runs inside it); with "kill", the process then dies there, never letting go.
_FORK_INSIDE_A_TRANSACTION = """
import ctypes, multiprocessing, os, signal, sys, time
from pytest_runs import Run, Store

how, state, kill = sys.argv[1], sys.argv[2], sys.argv[3] == "kill"


def live_on():
    os.write(1, b"living\\n")  # by now, whatever Python runs in a forked child has run
    time.sleep(120)
    os._exit(0)


def mk():
    if how == "multiprocessing":
        child = multiprocessing.get_context("fork").Process(target=live_on)
        child.start()
        pid = child.pid
    else:
        # C code calling fork() (an extension, an embedded tool) runs no at-fork handler.
        pid = ctypes.CDLL(None).fork() if how == "c-fork" else os.fork()
        if pid == 0:
            live_on()
    os.write(1, f"child {pid}\\n".encode())  # one write: the child writes to the same pipe
    if kill:
        os.kill(os.getpid(), signal.SIGKILL)
    return Run(machine="rig-1", test_dir="/tests", test_dir_hash="h1")


Store(state).prepare_atomic("rig-1", "h1", mk)
os.write(1, b"done\\n")
sys.stdin.read()
"""


def _fork_inside_a_transaction(state: Path, how: str, kill: bool) -> tuple[subprocess.Popen[str], int]:
    Store(state).create(pending(machine="rig-0"))  # a store to read: reading none takes no lock
    helper = subprocess.Popen(
        [sys.executable, "-c", _FORK_INSIDE_A_TRANSACTION, how, str(state), "kill" if kill else "finish"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,  # the helper and its child in a group of their own, killed at the end
    )
    assert helper.stdout is not None
    said = {helper.stdout.readline().strip() for _ in range(2 if kill else 3)}
    (child,) = (int(line.split()[1]) for line in said if line.startswith("child "))
    assert "living" in said
    if kill:
        assert helper.wait(timeout=60) == -signal.SIGKILL
    else:
        assert "done" in said, "the transaction with the fork in it committed"
    os.kill(child, 0)  # the child lives on
    return helper, child


@pytest.mark.parametrize("how", ["c-fork", "os.fork", "multiprocessing"])
def test_a_child_forked_inside_a_transaction_does_not_keep_the_store_lock(tmp_path: Path, how: str) -> None:
    state = tmp_path / "state"
    helper, child = _fork_inside_a_transaction(state, how, kill=False)
    try:
        # Free the moment the transaction ended, although the child holds a copy of its descriptor.
        assert store_lock_is_free(state), f"the child (PID {child}) kept the store lock"
        store = Store(state, lock_timeout=30)
        run = store.active_by_machine("rig-1")
        assert run is not None
        store.finish(run.id, Status.COMPLETED)
        os.kill(child, 0)
    finally:
        os.killpg(helper.pid, signal.SIGKILL)
        helper.wait()


@pytest.mark.parametrize("how", ["os.fork", "multiprocessing"])
def test_a_child_forked_by_os_fork_lets_go_at_once_even_if_the_parent_dies_holding_the_lock(
    tmp_path: Path, how: str
) -> None:
    state = tmp_path / "state"
    helper, child = _fork_inside_a_transaction(state, how, kill=True)
    try:
        assert store_lock_is_free(state), f"the child (PID {child}) kept its copy of the lock"
        assert len(Store(state, lock_timeout=30).list()) == 1, "the killed transaction changed nothing"
    finally:
        os.killpg(helper.pid, signal.SIGKILL)


def test_a_lock_kept_by_a_c_forked_child_of_a_dead_holder_names_the_child(tmp_path: Path) -> None:
    state = tmp_path / "state"
    helper, child = _fork_inside_a_transaction(state, "c-fork", kill=True)
    try:
        # No code ran in the child and its parent died holding the lock: the child keeps it.
        with pytest.raises(StoreLocked) as raised:
            Store(state, lock_timeout=0.3).list()
        message = str(raised.value)
        assert f"held by PID {child} (taken by PID {helper.pid}, which is gone; inherited through a fork)" in message
        assert raised.value.holders == [child]
        assert "\n" not in message
    finally:
        os.killpg(helper.pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while not store_lock_is_free(state):
        assert time.monotonic() < deadline, "the lock outlived the child that kept it"
        time.sleep(0.05)
    assert len(Store(state).list()) == 1


def test_a_holder_named_by_the_kernel_that_is_gone_is_said_to_be_gone(tmp_path: Path) -> None:
    from pytest_runs.storelock import describe_holders

    gone = subprocess.Popen(["true"])
    gone.wait()
    lock = tmp_path / "runs.lock"
    lock.touch()
    # No descriptor of this user's processes holds it: whoever does is out of sight.
    holders, who, advice = describe_holders(lock, [gone.pid])
    assert holders == [gone.pid]
    assert who == f" by PID {gone.pid}, which is gone: a process it forked still holds the lock"
    assert "fuser" in advice
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        holders, who, _ = describe_holders(lock, [gone.pid])
        assert holders == [os.getpid()]
        assert who == f" by PID {os.getpid()} (taken by PID {gone.pid}, which is gone; inherited through a fork)"
        assert describe_holders(lock, [os.getpid()])[1] == f" by PID {os.getpid()}"
    finally:
        os.close(fd)
