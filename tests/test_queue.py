"""The line of waiting sessions and pools of machines, on both backends."""

from __future__ import annotations

import contextlib
import itertools
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from _sessions import HOLD, Session, make_project, start, wait_for, wait_stopped

from pytest_runs import PrepareOutcome, Run, Status, Store
from pytest_runs.backend import OwnerLock
from pytest_runs.owner import boot_id
from pytest_runs.queue import Waiter
from pytest_runs.store import StoreLocked, open_store

KINDS = ("files", "postgresql")


@pytest.fixture(params=KINDS)
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def url(store_kind: str, request: pytest.FixtureRequest) -> str | None:
    return str(request.getfixturevalue("pg_url")) if store_kind == "postgresql" else None


@pytest.fixture
def store(tmp_path: Path, url: str | None) -> Store:
    return open_store(tmp_path / "state", url)


@pytest.fixture
def locks(store: Store) -> Iterator[list[OwnerLock]]:
    held: list[OwnerLock] = []
    yield held
    for lock in held:
        lock.release()


def waiter(store: Store, locks: list[OwnerLock], name: str, *machines: str, priority: int = 0) -> Waiter:
    """A live waiting session: its own liveness lock, its own tests."""
    lock = store.liveness_lock()
    locks.append(lock)
    run = Run(test_dir=f"/{name}", test_dir_hash=f"h-{name}", owner_token=lock.token, owner_boot_id=boot_id(),
              owner_host=name, heartbeat_at=datetime.now(UTC))  # fmt: skip
    return Waiter(list(machines or ("rig-1",)), priority, datetime.now(UTC), run)


def look(store: Store, who: Waiter) -> tuple[PrepareOutcome, Run, int | None]:
    def mk() -> Run:
        return Run(owner_token=who.token, owner_boot_id=who.run.owner_boot_id, owner_host=who.run.owner_host)

    prepared = store.prepare(who.machines, who.run.test_dir_hash, mk, wait_as=who)
    return prepared.outcome, prepared.run, prepared.place


def serve(store: Store, who: Waiter) -> Run:
    """``who`` looks, finds the machine handed to it, claims and ends its run."""
    outcome, run, _ = look(store, who)
    assert outcome is PrepareOutcome.REUSE and run.owner_token == who.token, (outcome, run)
    store.start(run.id)
    return store.finish(run.id, Status.COMPLETED, exit_code=0)


def occupy(store: Store) -> Run:
    run, outcome = store.prepare_atomic("rig-1", "h-holder", Run)
    assert outcome is PrepareOutcome.CREATED
    return store.start(run.id)


# -- the store's rules ------------------------------------------------------------------


def test_waiters_are_served_in_order_of_arrival(store: Store, locks: list[OwnerLock]) -> None:
    holder = occupy(store)
    line = [waiter(store, locks, f"w{i}") for i in range(1, 5)]
    for place, who in enumerate(line, 1):
        assert look(store, who)[::2] == (PrepareOutcome.BUSY, place)
    assert [w.token for w in store.queue()] == [w.token for w in line]
    assert store.machines()[0].waiting == 4
    store.finish(holder.id, Status.COMPLETED)
    served = [serve(store, who).owner_host for who in line]
    assert served == ["w1", "w2", "w3", "w4"]
    assert store.queue() == []


def test_priority_goes_first_then_arrival(store: Store, locks: list[OwnerLock]) -> None:
    holder = occupy(store)
    early, late = waiter(store, locks, "early"), waiter(store, locks, "late")
    urgent = waiter(store, locks, "urgent", priority=5)
    for who in (early, late, urgent):
        look(store, who)
    assert [w.run.owner_host for w in store.queue()] == ["urgent", "early", "late"]
    assert look(store, early)[2] == 2, "second in line behind the urgent one"
    store.finish(holder.id, Status.COMPLETED)
    assert [serve(store, who).owner_host for who in (urgent, early, late)] == ["urgent", "early", "late"]


def test_a_dead_waiter_leaves_the_line_and_blocks_nobody(store: Store, locks: list[OwnerLock]) -> None:
    holder = occupy(store)
    first, dead, last = (waiter(store, locks, name) for name in ("first", "dead", "last"))
    for who in (first, dead, last):
        look(store, who)
    locks[1].drop()  # its process died: its liveness lock is gone
    assert [w.run.owner_host for w in store.queue()] == ["first", "last"]
    store.finish(holder.id, Status.COMPLETED)
    assert serve(store, first).owner_host == "first"
    assert serve(store, last).owner_host == "last"


def test_a_machine_handed_to_a_waiter_that_died_goes_to_the_next(store: Store, locks: list[OwnerLock]) -> None:
    holder = occupy(store)
    first, second = waiter(store, locks, "first"), waiter(store, locks, "second")
    look(store, first)
    look(store, second)
    store.finish(holder.id, Status.COMPLETED)  # handed to first, who dies before claiming it
    locks[0].drop()
    assert serve(store, second).owner_host == "second"
    handed = [r for r in store.list() if r.owner_host == "first"]
    assert [(r.status, r.error_code) for r in handed] == [(Status.INTERRUPTED, "owner_lost")]


def test_a_waiter_that_gives_up_leaves_at_once(store: Store, locks: list[OwnerLock]) -> None:
    holder = occupy(store)
    first, second = waiter(store, locks, "first"), waiter(store, locks, "second")
    look(store, first)
    look(store, second)
    store.leave_queue(first.token)
    assert [w.token for w in store.queue()] == [second.token]
    store.finish(holder.id, Status.COMPLETED)
    assert serve(store, second).owner_host == "second"
    # Handed a machine just as it gave up: the machine goes on to the next.
    third = waiter(store, locks, "third")
    fourth = waiter(store, locks, "fourth")
    blocker = occupy(store)
    look(store, third)
    look(store, fourth)
    store.finish(blocker.id, Status.COMPLETED)
    store.leave_queue(third.token)
    assert serve(store, fourth).owner_host == "fourth"


def test_an_arrival_never_jumps_the_line(store: Store, locks: list[OwnerLock]) -> None:
    holder = occupy(store)
    first = waiter(store, locks, "first")
    look(store, first)
    store.finish(holder.id, Status.COMPLETED)
    run, outcome = store.prepare_atomic("rig-1", "h-newcomer", Run)
    assert outcome is PrepareOutcome.BUSY and run.owner_token == first.token, "the free machine was handed on"


def test_a_pool_waiter_takes_whichever_frees_first(store: Store, locks: list[OwnerLock]) -> None:
    on_a, _ = store.prepare_atomic("rig-a", "h-a", Run)
    on_b, _ = store.prepare_atomic("rig-b", "h-b", Run)
    pooled = waiter(store, locks, "pooled", "rig-a", "rig-b")
    single = waiter(store, locks, "single", "rig-b")
    assert look(store, pooled)[::2] == (PrepareOutcome.BUSY, 1)
    assert look(store, single)[::2] == (PrepareOutcome.BUSY, 2)
    assert {m.machine: m.waiting for m in store.machines()} == {"rig-a": 1, "rig-b": 2}
    store.finish(on_b.id, Status.COMPLETED)
    outcome, handed, _ = look(store, pooled)
    assert (outcome, handed.machine) == (PrepareOutcome.REUSE, "rig-b"), "rig-b went to the pool waiter first"
    store.start(handed.id)
    assert look(store, single)[::2] == (PrepareOutcome.BUSY, 1)
    store.finish(on_a.id, Status.COMPLETED)
    assert store.active_by_machine("rig-a") is None, "nobody left in line wants rig-a"
    store.finish(handed.id, Status.COMPLETED)
    assert serve(store, single).machine == "rig-b"


@pytest.fixture
def impatient(tmp_path: Path, url: str | None, store: Store) -> Store:
    """The same store, by rules that give a waiter half a second to claim a machine handed to it."""
    return open_store(tmp_path / "state", url, claim_deadline=0.5)


def passed_on(store: Store, who: Waiter, seconds: float = 0.7) -> tuple[PrepareOutcome, Run, int | None]:
    """``who`` looks once the claim deadline of the machine handed to someone else has passed."""
    time.sleep(seconds)
    return look(store, who)


def test_a_machine_its_waiter_does_not_claim_goes_to_the_next_and_the_stalled_one_keeps_its_place(
    impatient: Store, locks: list[OwnerLock]
) -> None:
    store = impatient
    holder = occupy(store)
    stalled, second, third = (waiter(store, locks, name) for name in ("stalled", "second", "third"))
    for who in (stalled, second, third):
        look(store, who)
    store.finish(holder.id, Status.COMPLETED)  # handed to stalled, which is alive but does not claim it
    outcome, busy, place = look(store, second)
    handed = store.active_by_machine("rig-1")
    assert handed is not None and handed.owner_token == stalled.token
    assert (outcome, busy.id, place) == (PrepareOutcome.BUSY, handed.id, 1)
    assert look(store, second)[2] == 1, "the stalled one, handed a machine, is ahead of nobody"
    (state,) = store.machines()
    assert state.unclaimed_for is not None and state.waiting == 2
    assert [(e.waiter.token, e.place, e.handed and e.handed.id) for e in store.line()] == [
        (stalled.token, None, handed.id), (second.token, 1, None), (third.token, 2, None)]  # fmt: skip
    # Past the deadline: the machine goes on to the next waiter, who claims it.
    outcome, run, _ = passed_on(store, second)
    assert (outcome, run.owner_token, run.status) == (PrepareOutcome.REUSE, second.token, Status.PENDING)
    taken_back = store.get(handed.id)
    assert (taken_back.status, taken_back.error_code) == (Status.INTERRUPTED, "unclaimed")
    assert "did not claim it within 0.5s" in taken_back.error_msg
    line = store.line()
    assert [entry.waiter.token for entry in line] == [stalled.token, second.token, third.token]
    assert line[0].place == 1 and line[0].waiter.passed_over is not None, "it keeps its place"
    store.start(run.id)
    assert [w.token for w in store.queue()] == [stalled.token, third.token], "a claim leaves the line"
    assert look(store, third)[2] == 2, "behind the stalled one"
    # It runs again and looks: first in line, as it was.
    assert look(store, stalled)[::2] == (PrepareOutcome.BUSY, 1)
    store.finish(run.id, Status.COMPLETED)
    assert [serve(store, who).owner_host for who in (stalled, third)] == ["stalled", "third"]


def test_a_waiter_passed_over_is_passed_by_until_it_looks_again(impatient: Store, locks: list[OwnerLock]) -> None:
    store = impatient
    holder = occupy(store)
    stalled, second, third = (waiter(store, locks, name) for name in ("stalled", "second", "third"))
    for who in (stalled, second, third):
        look(store, who)
    store.finish(holder.id, Status.COMPLETED)
    assert passed_on(store, second)[0] is PrepareOutcome.REUSE
    # Still stalled: when the machine frees again it goes to the third, not back to the stalled one.
    assert serve(store, second).owner_host == "second"
    assert serve(store, third).owner_host == "third"
    assert [w.token for w in store.queue()] == [stalled.token]
    assert store.active_by_machine("rig-1") is None, "nobody else waits: the machine stays free"
    assert serve(store, stalled).owner_host == "stalled", "once it looks, the free machine is its own"
    assert [r.error_code for r in store.list() if r.owner_host == "stalled"] == ["unclaimed", ""]


def test_a_waiter_stays_in_line_until_it_claims_the_machine_handed_to_it(store: Store, locks: list[OwnerLock]) -> None:
    holder = occupy(store)
    first, second = waiter(store, locks, "first"), waiter(store, locks, "second")
    look(store, first)
    look(store, second)
    store.finish(holder.id, Status.COMPLETED)
    # Handed the machine, and even after its look finds it: in line (so that a stall there passes it on).
    assert [w.token for w in store.queue()] == [first.token, second.token]
    outcome, handed, _ = look(store, first)
    assert outcome is PrepareOutcome.REUSE and [w.token for w in store.queue()] == [first.token, second.token]
    assert store.machines()[0].waiting == 1, "only the second still waits"
    store.start(handed.id)
    assert [w.token for w in store.queue()] == [second.token], "its claim takes it out of the line"


def test_a_live_waiter_claims_its_machine_however_late_it_looks(impatient: Store, locks: list[OwnerLock]) -> None:
    store = impatient
    holder = occupy(store)
    late, other = waiter(store, locks, "late"), waiter(store, locks, "other")
    look(store, late)
    look(store, other)
    store.finish(holder.id, Status.COMPLETED)
    time.sleep(0.7)  # past the deadline, but nobody else looked: the machine is still its own
    assert serve(store, late).owner_host == "late"
    assert serve(store, other).owner_host == "other"


def test_a_reservation_on_any_pool_member_is_claimed_first(store: Store) -> None:
    store.prepare_atomic("rig-b", "h-mine", Run)  # reserved for these tests
    prepared = store.prepare(["rig-a", "rig-b"], "h-mine", Run)
    assert (prepared.outcome, prepared.run.machine) == (PrepareOutcome.REUSE, "rig-b")
    prepared = store.prepare(["rig-a", "rig-b"], "h-other", Run)
    assert (prepared.outcome, prepared.run.machine) == (PrepareOutcome.CREATED, "rig-a")


# -- sessions ---------------------------------------------------------------------------


RECORD = """
import json, os, time

def test_record():
    started = time.time()
    time.sleep(0.2)
    with open(os.environ["SPANS"], "a") as spans:
        spans.write(json.dumps([os.environ["NAME"], os.environ["PYTEST_RUNS_MACHINE"], started, time.time()]) + "\\n")
"""


def in_line(store: Store, count: int, session: Session) -> None:
    deadline = time.monotonic() + 60
    while len(store.queue()) < count:
        assert session.process.poll() is None, session.output()
        assert time.monotonic() < deadline, f"never {count} in line: {store.queue()}"
        time.sleep(0.05)


def spans_of(path: Path) -> list[tuple[str, str, float, float]]:
    return sorted(
        (tuple(json.loads(line)) for line in path.read_text().splitlines()),
        key=lambda span: span[2],
    )


def waiting_session(
    name: str, tmp_path: Path, url: str | None, spans: Path, *args: str, machine: str = "rig-1"
) -> Session:
    project = make_project(tmp_path / name, RECORD)
    store_args = [f"--runs-store={url}"] if url else []
    return start(name, project, tmp_path / "state", *store_args, "--runs-on-busy=wait", "--runs-wait-timeout=120",
                 *args, env={"SPANS": str(spans), "NAME": name}, machine=machine, released=True)  # fmt: skip


def holding_session(tmp_path: Path, url: str | None, started: list[Session]) -> Session:
    """A session that holds rig-1 until its release file appears."""
    store_args = [f"--runs-store={url}"] if url else []
    holder = start("holder", make_project(tmp_path / "holder", HOLD), tmp_path / "state", *store_args)
    started.append(holder)
    wait_for(holder.started, holder)
    return holder


@pytest.mark.parametrize("trial", range(3))
def test_sessions_are_served_in_the_order_they_came(
    tmp_path: Path, url: str | None, store: Store, sessions: list[Session], trial: int
) -> None:
    holder = holding_session(tmp_path, url, sessions)
    spans = tmp_path / "spans.jsonl"
    names = ["w1", "w2", "w3", "w4"]
    for count, name in enumerate(names, 1):
        sessions.append(waiting_session(name, tmp_path, url, spans))
        in_line(store, count, sessions[-1])
    holder.release.write_text("go")
    for session in sessions:
        code, output = session.finish()
        assert code == 0, output
    assert [span[0] for span in spans_of(spans)] == names


def test_a_killed_holders_machine_goes_to_its_waiter_well_before_the_next_look(
    tmp_path: Path, url: str | None, store: Store, sessions: list[Session]
) -> None:
    """A holder SIGKILLed writes nothing to the store: its waiter learns it from the holder's lock, not 10 s later."""
    holder = holding_session(tmp_path, url, sessions)
    spans = tmp_path / "spans.jsonl"
    waiter = waiting_session("w", tmp_path, url, spans)
    sessions.append(waiter)
    in_line(store, 1, waiter)
    time.sleep(1.0)  # the waiter has looked and waits for a change (its next look is 10 s after the first)
    holder.signal_group(signal.SIGKILL)
    killed = time.time()
    holder.process.wait(timeout=30)
    code, output = waiter.finish()
    assert code == 0, output
    ((name, _, started, _),) = spans_of(spans)
    assert name == "w"
    assert started - killed < 4.0, f"the waiter started {started - killed:.1f}s after its holder was killed"


def test_priority_jumps_the_line_and_a_killed_waiter_blocks_nobody(
    tmp_path: Path, url: str | None, store: Store, sessions: list[Session]
) -> None:
    holder = holding_session(tmp_path, url, sessions)
    spans = tmp_path / "spans.jsonl"
    plan: list[tuple[str, tuple[str, ...]]] = [("a", ()), ("doomed", ()), ("b", ()), ("urgent", ("--runs-priority=5",))]
    for count, (name, args) in enumerate(plan, 1):
        sessions.append(waiting_session(name, tmp_path, url, spans, *args))
        in_line(store, count, sessions[-1])
    doomed = sessions[2]
    doomed.signal_group(signal.SIGKILL)
    doomed.process.wait(timeout=30)
    holder.release.write_text("go")
    for session in sessions:
        if session is not doomed:
            code, output = session.finish()
            assert code == 0, output
    assert [span[0] for span in spans_of(spans)] == ["urgent", "a", "b"]


def test_a_pool_of_three_rigs_serves_nine_sessions(
    tmp_path: Path, url: str | None, store: Store, sessions: list[Session]
) -> None:
    spans = tmp_path / "spans.jsonl"
    for index in range(9):
        sessions.append(waiting_session(f"s{index}", tmp_path, url, spans, machine="rig-1,rig-2,rig-3"))
    for session in sessions:
        code, output = session.finish(timeout=240)
        assert code == 0, output
    by_rig: dict[str, list[tuple[float, float]]] = {}
    for _, rig, begun, ended in spans_of(spans):
        by_rig.setdefault(rig, []).append((begun, ended))
    assert sorted(by_rig) == ["rig-1", "rig-2", "rig-3"], "each rig used"
    assert sum(len(spans) for spans in by_rig.values()) == 9
    for rig, intervals in by_rig.items():
        ordered = sorted(intervals)
        assert all(a[1] <= b[0] for a, b in itertools.pairwise(ordered)), f"two sessions on {rig}"
    assert {run.machine for run in store.list()} == {"rig-1", "rig-2", "rig-3"}


def stop_outside_the_store_lock(session: Session, state_dir: Path, url: str | None) -> None:
    """SIGSTOP the session's process group at a moment when it is outside the store's lock, on either backend."""
    quick = open_store(state_dir, url, lock_timeout=0.2)
    for _ in range(200):
        session.signal_group(signal.SIGSTOP)
        wait_stopped(session.pid)
        try:
            with quick.backend.transaction(write=True):
                return  # an empty transaction: it takes the store's lock and writes nothing
        except StoreLocked:
            session.signal_group(signal.SIGCONT)
            time.sleep(0.01)
    raise AssertionError(f"session {session.name} never let go of the store's lock")


def command(tmp_path: Path, url: str | None, capsys: pytest.CaptureFixture[str], *args: str) -> str:
    from pytest_runs.cli import main

    assert main(["--state-dir", str(tmp_path / "state"), *(["--store", url] if url else []), *args]) == 0
    return capsys.readouterr().out


def test_a_stopped_waiter_handed_the_machine_is_passed_over_and_keeps_its_place(
    tmp_path: Path, url: str | None, store: Store, sessions: list[Session], capsys: pytest.CaptureFixture[str]
) -> None:
    holder = holding_session(tmp_path, url, sessions)
    spans = tmp_path / "spans.jsonl"
    stalled = waiting_session("stalled", tmp_path, url, spans)
    sessions.append(stalled)
    in_line(store, 1, stalled)
    # The next one holds the machine once it gets it, until the test lets it go.
    store_args = [f"--runs-store={url}"] if url else []
    second = start("second", make_project(tmp_path / "second", HOLD), tmp_path / "state", *store_args,
                   "--runs-on-busy=wait", "--runs-wait-timeout=120")  # fmt: skip
    sessions.append(second)
    in_line(store, 2, second)
    stop_outside_the_store_lock(stalled, tmp_path / "state", url)
    holder.release.write_text("go")
    assert holder.finish()[0] == 0
    # Handed to the stopped waiter, which does not claim it: both views say so.
    deadline = time.monotonic() + 30
    while "handed to a waiter that has not claimed it for" not in (shown := command(tmp_path, url, capsys, "machines")):
        assert time.monotonic() < deadline, shown
        time.sleep(0.1)
    assert "busy (unclaimed)" in shown, shown
    queue = command(tmp_path, url, capsys, "queue").splitlines()
    assert "STATE" in queue[0] and "handed to a waiter that has not claimed it" in queue[1], queue
    assert queue[1].split()[0] == "-" and "waiting" in queue[2] and queue[2].split()[0] == "1", queue
    # After the claim deadline the machine passes to the second waiter, which runs on it.
    wait_for(second.started, second, timeout=60)
    assert not spans.exists(), "the stopped waiter ran nothing"
    taken_back = [run for run in store.list() if run.test_dir == str(tmp_path / "stalled")]
    assert [(run.status, run.error_code) for run in taken_back] == [(Status.INTERRUPTED, "unclaimed")]
    queue = command(tmp_path, url, capsys, "queue").splitlines()
    assert len(queue) == 2 and queue[1].split()[0] == "1" and "passed over" in queue[1], queue
    # A third arrives behind it; the stopped one, continued, is served first.
    third = waiting_session("third", tmp_path, url, spans)
    sessions.append(third)
    in_line(store, 2, third)
    stalled.signal_group(signal.SIGCONT)
    deadline = time.monotonic() + 30
    while (line := store.line())[0].waiter.passed_over is not None:  # it looks again: waiting, first in line
        assert time.monotonic() < deadline, line
        time.sleep(0.05)
    assert [entry.place for entry in line] == [1, 2]
    second.release.write_text("go")
    for session in (second, stalled, third):
        code, output = session.finish()
        assert code == 0, output
    assert [span[0] for span in spans_of(spans)] == ["stalled", "third"]


def test_the_command_shows_the_line(
    tmp_path: Path, url: str | None, store: Store, locks: list[OwnerLock], capsys: pytest.CaptureFixture[str]
) -> None:
    from pytest_runs.cli import main

    occupy(store)
    for name in ("first", "second"):
        look(store, waiter(store, locks, name))
    argv = ["--state-dir", str(tmp_path / "state"), *(["--store", url] if url else [])]
    assert main([*argv, "queue", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [(entry["place"], entry["run"]["owner_host"]) for entry in data] == [(1, "first"), (2, "second")]
    assert main([*argv, "queue"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["#", "MACHINES", "PRIORITY"] and "first" in lines[1] and "second" in lines[2]
    assert main([*argv, "machines"]) == 0
    assert " 2 " in capsys.readouterr().out


def test_a_machine_handed_to_a_waiter_is_not_taken_by_others_with_the_same_tests(
    store: Store, locks: list[OwnerLock]
) -> None:
    holder = occupy(store)
    first, second = waiter(store, locks, "first"), waiter(store, locks, "second")
    second.run.test_dir_hash = first.run.test_dir_hash  # the same tests, dispatched twice
    look(store, first)
    look(store, second)
    store.finish(holder.id, Status.COMPLETED)
    outcome, run, place = look(store, second)
    assert (outcome, place) == (PrepareOutcome.BUSY, 1), "the machine was handed to first"
    assert run.owner_token == first.token
    run, outcome = store.prepare_atomic("rig-1", first.run.test_dir_hash, Run)
    assert outcome is PrepareOutcome.BUSY, "nor by a session that does not wait"
    assert serve(store, first).owner_host == "first"
    assert serve(store, second).owner_host == "second"


def test_waiters_for_the_same_tests_keep_their_places(store: Store, locks: list[OwnerLock]) -> None:
    run, _ = store.prepare_atomic("rig-1", "h-same", Run)
    holder = store.start(run.id)
    line = [waiter(store, locks, f"w{i}") for i in range(1, 4)]
    for place, who in enumerate(line, 1):
        who.run.test_dir_hash = "h-same"  # one test folder, dispatched again and again
        outcome, running, at = look(store, who)
        assert (outcome, running.id, at) == (PrepareOutcome.REUSE, holder.id, place), "the same tests, in line"
    assert [w.run.owner_host for w in store.queue()] == ["w1", "w2", "w3"]
    store.finish(holder.id, Status.COMPLETED)
    for later in reversed(line[1:]):
        assert look(store, later)[0] is PrepareOutcome.BUSY, "the machine went to the first in line"
    assert [serve(store, who).owner_host for who in line] == ["w1", "w2", "w3"]


# -- a wait behind a frozen holder of the store's lock ----------------------------------

FREEZE = """
import sys, time
from pytest_runs.store import StoreLocked, open_store

store = open_store(sys.argv[1], sys.argv[2] or None)
with store.backend.transaction(write=True):
    print("locked", flush=True)
    time.sleep(120)
"""


@contextlib.contextmanager
def frozen_store_lock(tmp_path: Path, url: str | None) -> Iterator[None]:
    """A process that holds the store's lock (inside a write transaction) and never lets go, on either backend."""
    holder = subprocess.Popen([sys.executable, "-c", FREEZE, str(tmp_path / "state"), url or ""],
                              stdout=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        yield
    finally:
        holder.kill()
        holder.wait(timeout=30)


def late_session(tmp_path: Path, url: str | None, spans: Path, wait: int) -> Session:
    project = make_project(tmp_path / "late", RECORD)
    store_args = [f"--runs-store={url}"] if url else []
    return start("late", project, tmp_path / "state", *store_args, "--runs-on-busy=wait", f"--runs-wait-timeout={wait}",
                 env={"SPANS": str(spans), "NAME": "late"}, released=True)  # fmt: skip


def test_a_wait_behind_a_frozen_store_lock_ends_within_its_timeout(
    tmp_path: Path, url: str | None, store: Store, sessions: list[Session]
) -> None:
    occupy(store)
    spans = tmp_path / "spans.jsonl"
    with frozen_store_lock(tmp_path, url):
        begun = time.monotonic()
        sessions.append(late := late_session(tmp_path, url, spans, wait=4))
        code, output = late.finish(timeout=60)
        took = time.monotonic() - begun
    assert code == 75, output
    assert "Traceback" not in output, output
    assert "pytest-runs: store" in output and "has been" in output, "says that the store is locked"
    # The wait's own bound (4 s) plus a few seconds for pytest's start and end on a busy machine;
    # leaving a line it never stood in used to wait a whole lock timeout (10 s) more.
    assert took < 9, f"a 4 s wait took {took:.1f}s:\n{output}"
    assert not spans.exists(), "no test ran"
    assert store.queue() == []


def test_a_waiter_in_line_when_the_store_lock_freezes_ends_within_its_timeout(
    tmp_path: Path, url: str | None, store: Store, sessions: list[Session]
) -> None:
    occupy(store)
    spans = tmp_path / "spans.jsonl"
    begun = time.monotonic()
    sessions.append(late := late_session(tmp_path, url, spans, wait=8))
    in_line(store, 1, late)
    with frozen_store_lock(tmp_path, url):
        code, output = late.finish(timeout=60)
        took = time.monotonic() - begun
    assert code == 75, output
    assert "Traceback" not in output
    # Its own bound (8 s) plus a few seconds; it could not leave the line (the store is locked),
    # so leaving is cut short and its liveness lock tells everyone it is gone.
    assert took < 13, f"an 8 s wait took {took:.1f}s:\n{output}"
    assert not spans.exists(), "no test ran"
    assert store.queue() == [], "found gone at once, though it could not take itself out of the line"
