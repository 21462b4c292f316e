"""Hand-over: how soon a waiting session gets the machine once its holder ends, and what waiting costs.

    .venv/bin/python benchmarks/bench_queue.py [--trials 9] [--kills 5] [--url postgresql://127.0.0.1:5432/test]

For the JSON files and for PostgreSQL (a schema of its own, dropped at the end): a holder
(this process) takes the machine; a waiter (another process) stands in line, as a session
with ``--runs-on-busy=wait`` does (``Store.prepare`` with ``wait_as``, then
``wait_for_change`` for up to a second, again and again). Once the waiter is in line the
holder ends its run and lets go of its liveness lock; the hand-over latency is the time
from the holder's ``finish`` returning to the waiter's ``prepare`` returning the machine.
The hand-over after a kill: the holder is another process (its own process group) that
is SIGKILLed while the waiter waits, so it writes nothing to the store; the latency is
the time from the ``kill`` to the waiter's ``prepare`` returning the machine.
The waiter's CPU is measured over 5 s of waiting for a holder that does not end, from its
first look (its connections already open).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import psycopg

from pytest_runs import PrepareOutcome, Run, Status
from pytest_runs.owner import Owner
from pytest_runs.store import open_store

WAITER = """
import dataclasses, resource, sys, time
from datetime import UTC, datetime
from pytest_runs import PrepareOutcome, Run
from pytest_runs.owner import Owner
from pytest_runs.queue import Waiter
from pytest_runs.store import open_store

store = open_store(sys.argv[1], sys.argv[2] or None)
patience = float(sys.argv[3])
lock = store.liveness_lock()
owner = dataclasses.replace(Owner.current(), token=lock.token)
template = Run(test_dir="/waiter", test_dir_hash="h-waiter", heartbeat_at=datetime.now(UTC), **owner.run_fields())
me = Waiter(["rig-q"], 0, datetime.now(UTC), template)
prepared = store.prepare(["rig-q"], "h-waiter", lambda: dataclasses.replace(template), wait_as=me)
started = time.monotonic()
cpu = resource.getrusage(resource.RUSAGE_SELF)  # from its first look: its connections are open
changed, look_by = False, time.monotonic() + 10
while True:
    if changed or time.monotonic() >= look_by:  # as a waiting session looks: on a change, or every 10 s
        prepared = store.prepare(["rig-q"], "h-waiter", lambda: dataclasses.replace(template), wait_as=me)
        look_by = time.monotonic() + 10
    if prepared.outcome is not PrepareOutcome.BUSY:
        print("got", repr(time.time()), flush=True)
        store.start(prepared.run.id)
        break
    if time.monotonic() - started > patience:
        used = resource.getrusage(resource.RUSAGE_SELF)
        print("cpu", (used.ru_utime - cpu.ru_utime) + (used.ru_stime - cpu.ru_stime), flush=True)
        store.leave_queue(lock.token)
        break
    changed = store.wait_for_change(prepared.run, 1.0)
lock.release()
"""


HOLDER = """
import dataclasses, sys, time
from pytest_runs import PrepareOutcome, Run
from pytest_runs.owner import Owner
from pytest_runs.store import open_store

store = open_store(sys.argv[1], sys.argv[2] or None)
lock = store.liveness_lock()
owner = dataclasses.replace(Owner.current(), token=lock.token)
run, outcome = store.prepare_atomic("rig-q", "h-holder", lambda: Run(**owner.run_fields()))
assert outcome is PrepareOutcome.CREATED, outcome
store.start(run.id, **owner.run_fields())
print("held", flush=True)
time.sleep(600)
"""


def killed_trial(state: Path, url: str | None) -> float:
    """The hand-over latency after the holder, another process, is SIGKILLed while the waiter waits."""
    store = open_store(state, url)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(state), url or ""], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    assert holder.stdout is not None
    waiter: subprocess.Popen[str] | None = None
    try:
        assert holder.stdout.readline().strip() == "held", "the holder never took the machine"
        waiter = subprocess.Popen(
            [sys.executable, "-c", WAITER, str(state), url or "", "1e9"], stdout=subprocess.PIPE, text=True
        )
        assert waiter.stdout is not None
        deadline = time.monotonic() + 60
        while not store.queue("rig-q"):
            assert time.monotonic() < deadline and waiter.poll() is None, "the waiter never stood in line"
            time.sleep(0.01)
        time.sleep(0.5)  # the waiter is blocked in wait_for_change by now
        os.killpg(holder.pid, signal.SIGKILL)
        killed = time.time()
        holder.wait(timeout=60)
        kind, value = waiter.stdout.readline().split()
        assert kind == "got", kind
        waiter.wait(timeout=60)
        latest = store.recent(1)[0]
        store.finish(latest.id, Status.COMPLETED, exit_code=0)
        return float(value) - killed
    finally:
        for process in (holder, waiter):
            if process is not None:
                process.kill()
                process.wait()
        store.stop_waiting()


def trial(state: Path, url: str | None, patience: float) -> tuple[float | None, float | None]:
    """(hand-over latency, waiter CPU): one of them, by ``patience``."""
    store = open_store(state, url)
    lock = store.liveness_lock()
    owner = dataclasses.replace(Owner.current(), token=lock.token)
    run, outcome = store.prepare_atomic("rig-q", "h-holder", lambda: Run(**owner.run_fields()))
    assert outcome is PrepareOutcome.CREATED, outcome
    store.start(run.id, **owner.run_fields())
    waiter = subprocess.Popen(
        [sys.executable, "-c", WAITER, str(state), url or "", str(patience)], stdout=subprocess.PIPE, text=True
    )
    assert waiter.stdout is not None
    try:
        deadline = time.monotonic() + 60
        while not store.queue("rig-q"):
            assert time.monotonic() < deadline and waiter.poll() is None, "the waiter never stood in line"
            time.sleep(0.01)
        if patience > 1000:
            time.sleep(0.5)  # the waiter is blocked in wait_for_change by now
            store.finish(run.id, Status.COMPLETED, exit_code=0, owner=owner)
            ended = time.time()
            lock.release()
            kind, value = waiter.stdout.readline().split()
            assert kind == "got", kind
            waiter.wait(timeout=60)
            latest = store.recent(1)[0]
            store.finish(latest.id, Status.COMPLETED, exit_code=0)
            return float(value) - ended, None
        kind, value = waiter.stdout.readline().split()
        assert kind == "cpu", kind
        waiter.wait(timeout=60)
        store.finish(run.id, Status.COMPLETED, exit_code=0, owner=owner)
        lock.release()
        return None, float(value)
    finally:
        waiter.kill()
        waiter.wait()
        store.stop_waiting()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=os.environ.get("RUNS_TEST_DATABASE", "postgresql://127.0.0.1:5432/test"))
    parser.add_argument("--trials", type=int, default=9)
    parser.add_argument("--kills", type=int, default=5, help="hand-overs after a SIGKILLed holder")
    args = parser.parse_args()
    schema = f"bench_queue_{secrets.token_hex(4)}"
    try:
        with tempfile.TemporaryDirectory() as folder:
            print(
                "| store | hand-over median ms | worst ms | after a kill -9, median ms | worst ms "
                "| waiter CPU while waiting 5 s |"
            )
            print("|---|---|---|---|---|---|")
            for label, url in (("JSON files", None), ("PostgreSQL", f"{args.url}?schema={schema}")):
                state = Path(folder) / label.replace(" ", "-")
                latencies = [trial(state, url, 1e9)[0] or 0.0 for _ in range(args.trials)]
                killed = [killed_trial(state, url) for _ in range(args.kills)]
                cpu = trial(state, url, 5.0)[1] or 0.0
                median = statistics.median(latencies) * 1000
                worst = max(latencies) * 1000
                print(
                    f"| {label} | {median:.1f} | {worst:.1f} | {statistics.median(killed) * 1000:.1f} "
                    f"| {max(killed) * 1000:.1f} | {cpu * 1000:.1f} ms ({cpu / 5 * 100:.2f}% of a core) |"
                )
            print(f"{args.trials} hand-overs and {args.kills} kills each; {datetime.now(UTC):%Y-%m-%d}")
    finally:
        with psycopg.connect(args.url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


if __name__ == "__main__":
    main()
