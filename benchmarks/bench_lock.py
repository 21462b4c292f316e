"""Taking the store lock under contention: waited for in the kernel, or polled.

    .venv/bin/python benchmarks/bench_lock.py [--processes 4] [--rounds 100]

Each process takes the lock, holds it 1 ms (a store call's critical section), lets go,
``--rounds`` times. ``StoreLock`` blocks in ``flock`` (on a helper thread, bounded by its
timeout); the polled variant retries ``LOCK_NB`` every 50 ms, as a polling file lock
(filelock's default interval) does. Prints the wall time of the whole contest and the
median and worst wait of a single acquire.
"""

from __future__ import annotations

import argparse
import fcntl
import multiprocessing
import os
import statistics
import tempfile
import time
from pathlib import Path

from pytest_runs.storelock import StoreLock

HOLD = 0.001
POLL = 0.05


def kernel_waiter(path: str, rounds: int, waits: list[float]) -> None:
    lock = StoreLock(Path(path))
    for _ in range(rounds):
        started = time.perf_counter()
        lock.acquire(timeout=60)
        waits.append(time.perf_counter() - started)
        time.sleep(HOLD)
        lock.release()


def polling_waiter(path: str, rounds: int, waits: list[float]) -> None:
    for _ in range(rounds):
        started = time.perf_counter()
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                time.sleep(POLL)
        waits.append(time.perf_counter() - started)
        time.sleep(HOLD)
        os.close(fd)


def contest(name: str, processes: int, rounds: int) -> tuple[float, float, float]:
    waiter = kernel_waiter if name == "kernel" else polling_waiter
    with tempfile.TemporaryDirectory() as folder, multiprocessing.Manager() as manager:
        waits = manager.list()
        path = str(Path(folder) / "runs.lock")
        workers = [multiprocessing.Process(target=waiter, args=(path, rounds, waits)) for _ in range(processes)]
        started = time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        wall = time.perf_counter() - started
        return wall, statistics.median(waits) * 1000, max(waits) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=100)
    args = parser.parse_args()
    rows = {name: contest(name, args.processes, args.rounds) for name in ("kernel", "polled")}
    print(f"{'lock':<8}  {'wall s':>7}  {'median wait ms':>14}  {'worst wait ms':>13}")
    for name, (wall, median_wait, worst_wait) in rows.items():
        print(f"{name:<8}  {wall:>7.2f}  {median_wait:>14.2f}  {worst_wait:>13.1f}")
    kernel, polled = rows["kernel"], rows["polled"]
    print(
        f"{args.processes} processes x {args.rounds} rounds, 1 ms held; polled/kernel wall time "
        f"{polled[0] / kernel[0]:.1f}x, worst wait {polled[2] / kernel[2]:.1f}x"
    )


if __name__ == "__main__":
    main()
