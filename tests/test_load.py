"""Load with chaos: 24 real sessions on 3 machines, tight heartbeats, holders killed and frozen at random.

Every test of every session appends ``start`` and ``end`` lines (wall time, run ID, fence,
PID) to a file of its session. Whatever the chaos did and however the scheduler ordered
things, what is asserted holds in every execution: no two sessions ever test on one
machine at once, fences grow in the order sessions got their machine, every exit status
is one the documentation gives for the session's busy policy, and once one more session
has prepared each machine every run in the store has ended. Nothing about timing is
asserted.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import signal
import threading
import time
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

from _sessions import Session, make_project, start

from pytest_runs import Run, Status, Store

MACHINES = ("rig-0", "rig-1", "rig-2")
POLICIES = ("fail", "wait", "skip")
SESSIONS = 24
EXIT_BUSY = 75
KILLED = -signal.SIGKILL
MAX_KILLS = 5
MAX_STOPS = 10
# Each session's tests: three of 0.15 s, each recorded by its start and its end.
TESTS = """
import os, time

import pytest


def event(kind):
    line = "%s %.6f %s %s %d\\n" % (
        kind, time.time(), os.environ["PYTEST_RUNS_RUN_ID"], os.environ["PYTEST_RUNS_FENCE"], os.getpid()
    )
    fd = os.open(os.environ["EVENTS_FILE"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line.encode())  # one write of one line: never torn
    finally:
        os.close(fd)


@pytest.mark.parametrize("n", range(3))
def test_on_the_machine(n):
    event("start")
    time.sleep(0.15)
    event("end")
"""


@dataclasses.dataclass
class Planned:
    """One session of the load: where it runs, how it waits, and what happened to it."""

    index: int
    machine: str
    policy: str
    wait_timeout: float
    events: Path
    session: Session | None = None
    killed_at: float | None = None  # wall time just after its SIGKILL was sent
    stops: int = 0
    exited_at: float | None = None  # wall time when its end was seen (never earlier than the end)

    @property
    def name(self) -> str:
        return f"s{self.index:02d}-{self.machine}-{self.policy}"

    @property
    def args(self) -> list[str]:
        args = [f"--runs-on-busy={self.policy}", "--runs-heartbeat=0.1", "--runs-lease=1"]
        if self.policy == "wait":
            args.append(f"--runs-wait-timeout={self.wait_timeout:g}")
        return args


@dataclasses.dataclass(frozen=True)
class Interval:
    """One test of one session on the machine, from its start to its end (or its death)."""

    session: str
    machine: str
    start: float
    end: float
    run_id: str
    fence: int


def plan(tmp_path: Path) -> list[Planned]:
    planned = []
    for index in range(SESSIONS):
        policy = POLICIES[(index // len(MACHINES)) % len(POLICIES)]
        # Half the waiters give up soon (exit 75 once their wait timeout has passed), half wait long.
        wait_timeout = 2.0 if (index // 9) % 2 else 40.0
        planned.append(
            Planned(index, MACHINES[index % len(MACHINES)], policy, wait_timeout, tmp_path / "events" / f"s{index}")
        )
    return planned


class Chaos(threading.Thread):
    """Picks sessions that hold their machine (they have started a test and live) and kills or freezes them."""

    def __init__(self, planned: list[Planned], seed: int) -> None:
        super().__init__(name="chaos", daemon=True)
        self.planned = planned
        self.rng = random.Random(seed)
        self.done = threading.Event()
        self.guard = threading.Lock()
        self.stopped: set[int] = set()
        self.kills = 0
        self.stops = 0
        self.timers: list[threading.Timer] = []

    def holders(self) -> list[Planned]:
        return [
            p
            for p in self.planned
            if p.session is not None and p.killed_at is None and p.events.exists() and p.session.process.poll() is None
        ]

    def contended(self, holder: Planned) -> bool:
        """Whether another live session wants the holder's machine (it has not started a test yet)."""
        return any(
            p.machine == holder.machine
            and p.session is not None
            and p.killed_at is None
            and not p.events.exists()
            and p.session.process.poll() is None
            for p in self.planned
        )

    def run(self) -> None:
        while not self.done.wait(self.rng.uniform(0.4, 1.0)):
            holders = self.holders()
            if not holders:
                continue
            # The first action freezes a holder, the second kills one, then chance decides.
            kill = self.stops > 0 and (self.kills == 0 or self.rng.random() < 0.35) and self.kills < MAX_KILLS
            if kill:
                victim = self.rng.choice(holders)
                assert victim.session is not None
                victim.session.process.send_signal(signal.SIGKILL)
                victim.killed_at = time.time()
                self.kills += 1
                continue
            with self.guard:
                candidates = [h for h in holders if h.index not in self.stopped]
            # Freeze, preferably, a holder whose machine others are waiting for: they are the ones tempted.
            candidates = [h for h in candidates if self.contended(h)] or candidates
            if not candidates or self.stops >= MAX_STOPS:
                continue
            victim = self.rng.choice(candidates)
            assert victim.session is not None
            with self.guard:
                self.stopped.add(victim.index)
            victim.session.process.send_signal(signal.SIGSTOP)
            victim.stops += 1
            self.stops += 1
            # Longer than the sessions' lease of 1 s: a frozen holder keeps its machine anyway.
            timer = threading.Timer(self.rng.uniform(1.5, 3.0), self.resume, (victim,))
            timer.daemon = True
            self.timers.append(timer)
            timer.start()

    def resume(self, victim: Planned) -> None:
        with self.guard:
            self.stopped.discard(victim.index)
        assert victim.session is not None
        victim.session.process.send_signal(signal.SIGCONT)

    def finish(self) -> None:
        self.done.set()
        self.join()
        for timer in self.timers:
            timer.cancel()
        for victim in self.planned:
            if victim.index in self.stopped:
                self.resume(victim)


def read_intervals(planned: Planned) -> list[Interval]:
    """The tests the session ran on its machine; a test left open by a kill lasts until the kill."""
    if not planned.events.exists():
        return []
    assert planned.session is not None
    # Empty if it was killed between creating the file and writing its first line.
    lines = [line.split() for line in planned.events.read_text().splitlines()]
    if not lines:
        return []
    assert all(len(words) == 5 for words in lines), (planned.name, lines)
    assert {(w[2], w[3], w[4]) for w in lines} == {(lines[0][2], lines[0][3], str(planned.session.pid))}, (
        f"{planned.name}: one run, one fence, one process: {lines}"
    )
    kinds = [w[0] for w in lines]
    assert kinds[: len(kinds) // 2 * 2] == ["start", "end"] * (len(kinds) // 2), (planned.name, kinds)
    run_id, fence = lines[0][2], int(lines[0][3])
    intervals = []
    for pair in itertools.zip_longest(lines[::2], lines[1::2]):
        begin, end = pair
        assert begin is not None
        if end is not None:
            stop = float(end[1])
        else:
            # Still testing when it ended: killed (then until the kill), else until its end was seen.
            ended = planned.killed_at if planned.killed_at is not None else planned.exited_at
            assert ended is not None
            stop = max(ended, float(begin[1]))
        intervals.append(Interval(planned.name, planned.machine, float(begin[1]), stop, run_id, fence))
    return intervals


def allowed(planned: Planned, status: int, output: str) -> bool:
    """Whether ``status`` is one the documentation gives for this session's policy."""
    if status == 0:
        return True  # tests passed on the machine, or (skip) every test skipped on a busy machine
    if planned.killed_at is not None and status == KILLED:
        return True
    if status != EXIT_BUSY:
        return False
    store_locked = "store lock" in output
    if planned.policy == "fail":
        return store_locked or f"machine {planned.machine} is busy" in output
    if planned.policy == "wait":
        return store_locked or "gave up after waiting" in output
    return store_locked  # skip never fails on a busy machine, only on a store locked too long


def overlaps_and_fences(intervals: list[Interval]) -> list[str]:
    """Tests of different sessions on one machine at once, and fences out of the order sessions got it."""
    problems: list[str] = []
    for machine in MACHINES:
        mine = sorted((i for i in intervals if i.machine == machine), key=lambda i: i.start)
        problems.extend(
            f"{machine}: {a.session} [{a.start:.3f}, {a.end:.3f}] overlaps {b.session} [{b.start:.3f}, {b.end:.3f}]"
            for a, b in itertools.combinations(mine, 2)
            if a.session != b.session and b.start < a.end
        )
        first_by_session: dict[str, Interval] = {}
        for interval in mine:
            first_by_session.setdefault(interval.session, interval)
        fences = [i.fence for i in first_by_session.values()]
        if fences != sorted(set(fences)):
            problems.append(f"{machine}: fences {fences} of {list(first_by_session)}, in the order they started")
    return problems


def store_agrees(planned: list[Planned], runs: dict[str, Run]) -> list[str]:
    """Every run ended, each session's run as the session saw it, and no two runs on one machine at once."""
    problems = [
        f"run {r.id} on {r.machine} is still {r.status.value}" for r in runs.values() if not r.status.is_terminal
    ]
    for p in planned:
        assert p.session is not None
        seen = read_intervals(p)
        if not seen:
            continue
        run = runs[seen[0].run_id]
        if (run.machine, run.fence) != (p.machine, seen[0].fence):
            problems.append(f"{p.name} saw run {run.id} fence {seen[0].fence}; the store says {run}")
        if p.session.process.returncode == KILLED:
            # Killed while it held the machine (its run reclaimed), or after its end was recorded.
            ok = (run.status, run.error_code) in ((Status.INTERRUPTED, "owner_lost"), (Status.COMPLETED, ""))
        else:
            ok = (run.status, run.exit_code) == (Status.COMPLETED, 0)
        if not ok:
            problems.append(f"{p.name} exited {p.session.process.returncode}, its run is {run}")
    by_machine: dict[str, list[Run]] = defaultdict(list)
    for run in runs.values():
        if run.started_at is not None:
            by_machine[run.machine].append(run)
    for machine_runs in by_machine.values():
        machine_runs.sort(key=lambda r: r.started_at or datetime.min.replace(tzinfo=UTC))
        for earlier, later in itertools.pairwise(machine_runs):
            assert later.started_at is not None
            if earlier.ended_at is None or later.started_at < earlier.ended_at:
                problems.append(f"runs {earlier.id} and {later.id} overlap: {earlier} {later}")
            if (later.fence or 0) <= (earlier.fence or 0):
                problems.append(
                    f"run {later.id} started after {earlier.id} with fence {later.fence} <= {earlier.fence}"
                )
    return problems


def test_24_sessions_3_machines_with_kills_and_freezes(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    (tmp_path / "events").mkdir()
    planned = plan(tmp_path)
    seed = random.randrange(1 << 32)
    chaos = Chaos(planned, seed)
    deadline = time.monotonic() + 120
    try:
        chaos.start()
        for p in planned:
            project = make_project(tmp_path / "tests" / p.name, TESTS)
            p.session = start(
                p.name, project, state_dir, *p.args, env={"EVENTS_FILE": str(p.events)}, machine=p.machine
            )
            time.sleep(0.2)  # staggered, so that fail and skip sessions find their machine free now and then
        while any(p.exited_at is None for p in planned) and time.monotonic() < deadline:
            for p in planned:
                if p.exited_at is None and p.session is not None and p.session.process.poll() is not None:
                    p.exited_at = time.time()
            time.sleep(0.05)
    finally:
        chaos.finish()
        hung = [p.name for p in planned if p.exited_at is None]
        for p in planned:
            if p.session is not None:
                p.session.kill_group()
    context = f"chaos seed {seed}, {chaos.kills} kills, {chaos.stops} freezes"
    print(context)
    assert not hung, f"sessions still running after 120 s: {hung} ({context})"

    problems: list[str] = []
    for p in planned:
        assert p.session is not None
        status, output = p.session.finish()
        print(f"{p.name}: exit {status}, frozen {p.stops}x, {len(read_intervals(p))} tests on the machine")
        if not allowed(p, status, output):
            problems.append(f"{p.name} (killed: {p.killed_at is not None}) exited {status}:\n{output}")
    problems.extend(overlaps_and_fences([interval for p in planned for interval in read_intervals(p)]))

    # One more session per machine reclaims the runs of killed sessions; then every run must have ended.
    finals: list[Session] = []
    try:
        for machine in MACHINES:
            project = make_project(tmp_path / "tests" / f"final-{machine}", TESTS)
            events = {"EVENTS_FILE": str(tmp_path / "events" / f"final-{machine}")}
            finals.append(
                start(f"final-{machine}", project, state_dir, "--runs-on-busy=fail", env=events, machine=machine)
            )
        for final in finals:
            status, output = final.finish()
            if status != 0:
                problems.append(f"{final.name}, after all the others, exited {status}:\n{output}")
    finally:
        for final in finals:
            final.kill_group()
    problems.extend(store_agrees(planned, {run.id: run for run in Store(state_dir).list()}))
    assert not problems, "\n".join([context, *problems])
    assert chaos.kills >= 1 and chaos.stops >= 1, f"the chaos never struck ({context})"
