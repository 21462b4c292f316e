"""What the store costs as history grows: the session cycle and the command line at 100 and 100,000 runs.

    .venv/bin/python benchmarks/bench_store.py [--repeat 200] [--sizes 100 100000]

For each size, a store is filled through the store's own code (``Store.create_many``, in
batches) with that many ended runs spread over 20 machines, with realistic records
(owner, summary, paths). Then, side by side:

- the session cycle: ``prepare_atomic``, claim (``start``), one heartbeat, ``finish`` —
  what a tracked session does to the store (medians of ``--repeat`` cycles, interleaved
  between the sizes so machine load hits them alike);
- the same cycle with the session's liveness lock taken and let go;
- ``pytest-runs list --limit 20`` and ``pytest-runs machines`` as whole new processes;
- ``get`` of an ended run (searches history), and ``list()`` of everything (decodes it all).

Prints the time each history took to build, a table, and each size's ratio to the smallest.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

from pytest_runs import Run, Status, Store
from pytest_runs.liveness import LivenessLock
from pytest_runs.owner import Owner

HERE = Owner.current()
MACHINES = 20


def history(size: int) -> Iterator[Run]:
    """``size`` ended runs over ``MACHINES`` machines, a minute apart, as sessions leave them."""
    start = datetime(2025, 1, 1, tzinfo=UTC)
    for index in range(size):
        begun = start + timedelta(minutes=index)
        yield Run(
            machine=f"rig-{index % MACHINES:02d}",
            test_dir="/builds/lab/firmware/tests",
            test_dir_hash=f"{index * 2654435761 % (1 << 256):064x}",
            status=Status.COMPLETED if index % 7 else Status.FAILED,
            exit_code=0 if index % 7 else 1,
            started_at=begun,
            ended_at=begun + timedelta(seconds=42),
            artifacts_path=f"/var/lib/pytest-runs/runs/{index}/artifacts",
            logs_path=f"/var/lib/pytest-runs/runs/{index}/log.jsonl",
            owner_host="ci-runner-03",
            owner_pid=1000 + index % 30000,
            owner_started=begun.isoformat(),
            heartbeat_at=begun + timedelta(seconds=30),
            owner_ci_url=f"https://gitlab.example.com/lab/firmware/-/jobs/{index}",
            summary={"text": "118 passed, 2 skipped", "counts": {"passed": 118, "skipped": 2}, "duration": 41.7},
        )


def fill(store: Store, size: int, batch: int = 10_000) -> float:
    """Create ``size`` ended runs through the store's own code; return the seconds it took."""
    started = time.perf_counter()
    runs = history(size)
    while chunk := list(itertools.islice(runs, batch)):
        store.create_many(chunk)
    return time.perf_counter() - started


def session_cycle(store: Store) -> None:
    run, _ = store.prepare_atomic("rig-bench", "h-bench", lambda: Run(**HERE.run_fields()))
    store.start(run.id, **HERE.run_fields())
    store.heartbeat(run.id, HERE)
    store.finish(run.id, Status.COMPLETED, exit_code=0, owner=HERE)


def session_cycle_with_liveness(store: Store) -> None:
    lock = LivenessLock(store.state_dir)
    lock.acquire()
    owner = dataclasses.replace(HERE, token=lock.token)
    run, _ = store.prepare_atomic("rig-bench", "h-live", lambda: Run(**owner.run_fields()))
    store.start(run.id, **owner.run_fields())
    store.heartbeat(run.id, owner)
    store.finish(run.id, Status.COMPLETED, exit_code=0, owner=owner)
    lock.release()


def command(state_dir: Path, *args: str) -> Callable[[], object]:
    argv = [sys.executable, "-m", "pytest_runs", "--state-dir", str(state_dir), *args]
    return lambda: subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)


def interleaved_medians(actions: list[Callable[[], object]], repeat: int) -> list[float]:
    """Median milliseconds of each action, run in turns so that load hits them alike."""
    samples: list[list[float]] = [[] for _ in actions]
    for action in actions:
        action()  # warm up
    for _ in range(repeat):
        for index, action in enumerate(actions):
            started = time.perf_counter()
            action()
            samples[index].append(time.perf_counter() - started)
    return [statistics.median(column) * 1000 for column in samples]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=200, help="cycles per size (default: 200)")
    parser.add_argument("--process-repeat", type=int, default=15, help="runs of each command (default: 15)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 100_000])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as folder:
        stores = []
        for size in args.sizes:
            store = Store(Path(folder) / f"state-{size}")
            seconds = fill(store, size)
            (store.state_dir / "owners").mkdir(mode=0o700, exist_ok=True)
            print(f"built a history of {size:,} runs through Store.create_many in {seconds:.1f} s")
            stores.append(store)
        cycle = interleaved_medians([lambda s=s: session_cycle(s) for s in stores], args.repeat)  # type: ignore[misc]
        live = interleaved_medians(
            [lambda s=s: session_cycle_with_liveness(s) for s in stores],  # type: ignore[misc]
            args.repeat,
        )
        listing = interleaved_medians(
            [command(s.state_dir, "list", "--limit", "20") for s in stores], args.process_repeat
        )
        machines = interleaved_medians([command(s.state_dir, "machines") for s in stores], args.process_repeat)
        probe = [s.recent(1, where=lambda r: r.machine == "rig-07")[0].id for s in stores]
        get = interleaved_medians(
            [lambda s=s, p=p: s.get(p) for s, p in zip(stores, probe, strict=True)],  # type: ignore[misc]
            20,
        )
        everything = interleaved_medians([s.list for s in stores], 3)
        kib = [max(p.stat().st_size for p in s.state_dir.glob("runs.state.*")) / 1024 for s in stores]
    rows = [
        ("state slot KiB (active runs, counters)", kib),
        ("session cycle ms (prepare, claim, heartbeat, finish)", cycle),
        ("  the same with the liveness lock ms", live),
        ("`pytest-runs list --limit 20` ms (process)", listing),
        ("`pytest-runs machines` ms (process, 20 machines)", machines),
        ("get(ended run) ms", get),
        ("list() of every run ms", everything),
    ]
    sizes = [f"{size:,} runs" for size in args.sizes]
    ratios = [f"x at {size:,}" for size in args.sizes[1:]]
    print("| figure | " + " | ".join(sizes + ratios) + " |")
    print("|---" * (1 + len(sizes) + len(ratios)) + "|")
    for name, values in rows:
        cells = [f"{value:.2f}" for value in values] + [f"{value / values[0]:.2f}" for value in values[1:]]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"medians: {args.repeat} cycles, {args.process_repeat} runs of each command; ratios against {sizes[0]}")


if __name__ == "__main__":
    main()
