"""The PostgreSQL backend: the session cycle, and how fast a waiter starts once the machine is free.

    .venv/bin/python benchmarks/bench_database.py [--url postgresql://127.0.0.1:5432/test] [--repeat 100]

Works in a schema of its own, dropped at the end. Prints:

- the session cycle (``prepare_atomic``, claim, one heartbeat, ``finish``) against the
  database, beside the same cycle on the JSON files, with 100 and with ``--history`` ended
  runs kept (medians, interleaved);
- waiter wake-up latency: a holder process ends its run and lets go of its liveness lock,
  or is killed with SIGKILL, or its run is released by another process; the waiter is
  blocked in ``Store.wait_for_change`` and the time from the holder's act to the waiter's
  return is measured (medians of ``--wakeups`` trials each);
- the waiter's CPU time while it waits 5 s for a holder that does not let go.
"""

from __future__ import annotations

import argparse
import os
import resource
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

from pytest_runs import Status, Store
from pytest_runs.store import open_store

sys.path.insert(0, str(Path(__file__).parent))
from bench_store import history, interleaved_medians, session_cycle

HOLDER = """
import dataclasses, sys, time
from pytest_runs import Run, Status
from pytest_runs.owner import Owner
from pytest_runs.store import open_store
store = open_store(sys.argv[1], sys.argv[2])
lock = store.liveness_lock()
owner = dataclasses.replace(Owner.current(), token=lock.token)
run, _ = store.prepare_atomic("rig-wake", "h-holder", lambda: Run(**owner.run_fields()))
store.start(run.id, **owner.run_fields())
print(run.id, flush=True)
how = sys.stdin.readline().strip()
if how == "finish":
    store.finish(run.id, Status.COMPLETED, exit_code=0, owner=owner)
    lock.release()
    print(repr(time.time()), flush=True)
time.sleep(600)
"""


def end_holder(holder: subprocess.Popen[str], state: Path, url: str) -> None:
    """Kill the holder process and end whatever run it left active."""
    holder.kill()
    holder.wait()
    cleanup = open_store(state, url)
    for active in cleanup.recent(5, where=lambda r: not r.status.is_terminal):
        cleanup.finish(active.id, Status.INTERRUPTED)


def wake_latency(state: Path, url: str, how: str) -> float:
    """Seconds from the holder's act to the waiter's return."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(state), url], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdin is not None and holder.stdout is not None
    try:
        run_id = holder.stdout.readline().strip()
        store = open_store(state, url)
        run = store.get(run_id)
        acted: list[float] = []

        def act() -> None:
            time.sleep(0.3)  # the waiter is blocked by now
            if how == "finish":
                holder.stdin.write("finish\n")  # type: ignore[union-attr]
                holder.stdin.flush()  # type: ignore[union-attr]
                acted.append(float(holder.stdout.readline()))  # type: ignore[union-attr]
            elif how == "kill":
                acted.append(time.time())
                os.kill(holder.pid, signal.SIGKILL)
            else:
                releaser = open_store(state, url)
                releaser.get(run_id)  # connected: the time below is the release's own
                acted.append(time.time())
                releaser.release(run_id, "benchmark")

        import threading

        actor = threading.Thread(target=act)
        actor.start()
        store.wait_for_change(run, 20)
        woke = time.time()
        actor.join()
        return woke - acted[0]
    finally:
        end_holder(holder, state, url)


def waiter_cpu(state: Path, url: str) -> float:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(state), url], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert holder.stdout is not None
    try:
        run = open_store(state, url).get(holder.stdout.readline().strip())
        before = resource.getrusage(resource.RUSAGE_SELF)
        open_store(state, url).wait_for_change(run, 5)
        after = resource.getrusage(resource.RUSAGE_SELF)
        return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    finally:
        end_holder(holder, state, url)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=os.environ.get("RUNS_TEST_DATABASE", "postgresql://127.0.0.1:5432/test"))
    parser.add_argument("--repeat", type=int, default=100)
    parser.add_argument("--history", type=int, default=10_000)
    parser.add_argument("--wakeups", type=int, default=7)
    args = parser.parse_args()
    schemas = [f"bench_{secrets.token_hex(4)}" for _ in range(3)]
    try:
        with tempfile.TemporaryDirectory() as folder:
            root = Path(folder)
            stores: list[Store] = []
            labels = []
            for size, schema in zip((100, args.history), schemas, strict=False):
                started = time.perf_counter()
                database = open_store(root / f"db-{size}", f"{args.url}?schema={schema}")
                database.create_many(history(size))
                files = Store(root / f"files-{size}")
                files.create_many(history(size))
                print(f"built {size:,} ended runs in each store in {time.perf_counter() - started:.1f} s")
                stores += [database, files]
                labels += [f"database, {size:,} runs", f"JSON files, {size:,} runs"]
            cycles = interleaved_medians(
                [lambda s=s: session_cycle(s) for s in stores],  # type: ignore[misc]
                args.repeat,
            )
            print("| store | session cycle ms (median) |")
            print("|---|---|")
            for label, value in zip(labels, cycles, strict=True):
                print(f"| {label} | {value:.2f} |")
            url = f"{args.url}?schema={schemas[2]}"
            state = root / "wake"
            print("\n| the holder | waiter wake-up ms (median) | worst ms |")
            print("|---|---|---|")
            for how, label in (("finish", "finishes and lets go"), ("kill", "is killed (SIGKILL)"),
                               ("release", "is released by `pytest-runs release`")):  # fmt: skip
                samples = [wake_latency(state, url, how) * 1000 for _ in range(args.wakeups)]
                print(f"| {label} | {statistics.median(samples):.1f} | {max(samples):.1f} |")
            cpu = waiter_cpu(state, url)
            print(f"\nwaiter CPU while waiting 5 s: {cpu * 1000:.1f} ms ({cpu / 5 * 100:.2f}% of a core)")
            print(f"medians of {args.repeat} cycles, {args.wakeups} wake-ups each; {datetime.now(UTC):%Y-%m-%d}")
    finally:
        with psycopg.connect(args.url, autocommit=True) as conn:
            for schema in schemas:
                conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


if __name__ == "__main__":
    main()
