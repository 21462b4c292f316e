"""What a heartbeat costs on the JSON files, with its commit flushed and without.

    .venv/bin/python benchmarks/bench_heartbeat.py [--rounds 30] [--beats 20] [--dir DIR]

A store in a fresh folder under ``--dir`` (default: the system's temporary folder; use a
folder on the disk the stores live on, since a flush on tmpfs costs nothing) holds a running
run on each of 20 machines, so that the state is the size a busy lab's is. Then, in
``--rounds`` alternating rounds of ``--beats`` heartbeats each, ``Store.heartbeat`` as it
is (its commit skips the flush) and the same heartbeat with its commit flushed
(``fdatasync`` of the slot, as every heartbeat did before). Prints the medians and the 90th
percentiles in ms, and the flushes each variant made.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pytest_runs import Run, Store
from pytest_runs.filebackend import FileBackend
from pytest_runs.owner import Owner

MACHINES = 20


@contextlib.contextmanager
def flushed_commits(backend: FileBackend) -> Iterator[None]:
    """Every transaction of ``backend`` durable, as a heartbeat's was before it honoured ``durable=False``."""
    original = backend.transaction

    def transaction(*, write: bool, durable: bool = True) -> contextlib.AbstractContextManager[Any]:
        return original(write=write, durable=True)

    setattr(backend, "transaction", transaction)  # noqa: B010 (an instance attribute over the method)
    try:
        yield
    finally:
        del backend.transaction


@contextlib.contextmanager
def counting_flushes(counts: dict[str, int], key: str) -> Iterator[None]:
    real_fsync, real_fdatasync = os.fsync, os.fdatasync

    def counted(real: Callable[[Any], None]) -> Callable[[Any], None]:
        def flush(fd: Any) -> None:
            counts[key] = counts.get(key, 0) + 1
            real(fd)

        return flush

    setattr(os, "fsync", counted(real_fsync))  # noqa: B010
    setattr(os, "fdatasync", counted(real_fdatasync))  # noqa: B010
    try:
        yield
    finally:
        os.fsync, os.fdatasync = real_fsync, real_fdatasync


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--beats", type=int, default=20)
    parser.add_argument("--dir", type=Path, default=None, help="where to make the store (a real disk)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        store = Store(Path(folder) / "state")
        owner = Owner.current()
        runs = []
        for index in range(MACHINES):
            run, _ = store.prepare_atomic(f"rig-{index:02d}", "h", lambda: Run(**owner.run_fields()))
            runs.append(store.start(run.id, **owner.run_fields()))
        backend = store.backend
        assert isinstance(backend, FileBackend)
        times: dict[str, list[float]] = {"unflushed (now)": [], "flushed (before)": []}
        flushes: dict[str, int] = {}
        for round_ in range(args.rounds):
            for variant in times if round_ % 2 == 0 else reversed(times):
                durable = flushed_commits(backend) if variant.startswith("flushed") else contextlib.nullcontext()
                with durable, counting_flushes(flushes, variant):
                    for beat in range(args.beats):
                        run = runs[beat % MACHINES]
                        started = time.perf_counter()
                        store.heartbeat(run.id, owner)
                        times[variant].append(time.perf_counter() - started)
    beats = args.rounds * args.beats
    print(f"{beats} heartbeats of each variant, {MACHINES} running runs in the state, store under {folder}")
    print("| heartbeat | median ms | p90 ms | flushes per beat |")
    print("|---|---|---|---|")
    for variant, samples in times.items():
        p90 = statistics.quantiles(samples, n=10)[-1]
        per_beat = flushes.get(variant, 0) / len(samples)
        print(f"| {variant} | {statistics.median(samples) * 1000:.3f} | {p90 * 1000:.3f} | {per_beat:g} |")
    ratio = statistics.median(times["flushed (before)"]) / statistics.median(times["unflushed (now)"])
    print(f"flushed / unflushed median: {ratio:.1f}x")


if __name__ == "__main__":
    main()
