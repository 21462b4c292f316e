"""How the store's cost grows with the number of runs kept.

    .venv/bin/python benchmarks/bench_store.py [--repeat 30]

Every call reads (and a write also fsyncs and renames) the whole state file, so the
cost grows with the runs kept. Prints medians, and each size's ratio to the smallest.
Before a machine's active runs are judged, each one's liveness lock is probed (one
open and one lockf per active run, not per run kept).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from pytest_runs import Run, Status, Store
from pytest_runs.liveness import LivenessLock
from pytest_runs.owner import Owner
from pytest_runs.store import FORMAT_NAME, FORMAT_VERSION

HERE = Owner.current()


def median_ms(action: Callable[[], object], repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        action()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1000


def fill(store: Store, size: int) -> None:
    """Write ``size`` ended runs in one go (creating them one by one would cost O(size**2))."""
    ended = datetime(2026, 1, 1, tzinfo=UTC)
    runs = [
        Run(
            id=f"20260101-000000-{index:06d}-bench0",
            machine=f"rig-{index % 8}",
            test_dir="/src/tests",
            test_dir_hash=f"{index:064x}",
            status=Status.COMPLETED,
            exit_code=0,
            started_at=ended,
            ended_at=ended,
            artifacts_path=f"/state/runs/{index}/artifacts",
            logs_path=f"/state/runs/{index}/log.jsonl",
        ).to_dict()
        for index in range(size)
    ]
    document = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "runs": runs}
    store.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # a store makes its dir on first write
    store.state_path.write_text(json.dumps(document, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000, 5000])
    args = parser.parse_args()
    rows = []
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as folder:
            store = Store(Path(folder) / "state")
            fill(store, size)
            get_id = store.list()[size // 2].id
            list_ms = median_ms(store.list, args.repeat)
            get_ms = median_ms(lambda store=store, run_id=get_id: store.get(run_id), args.repeat)  # type: ignore[misc]

            def prepare_cycle(store: Store = store) -> None:
                run, _ = store.prepare_atomic("rig-bench", "hb", Run)
                store.finish(run.id, Status.COMPLETED, exit_code=0)

            cycle_ms = median_ms(prepare_cycle, args.repeat)

            def session_cycle(store: Store = store) -> None:
                # What a tracked session does to the store: liveness lock, prepare, claim, beat, finish.
                lock = LivenessLock(store.state_dir)
                lock.acquire()
                owner = dataclasses.replace(HERE, token=lock.token)
                run, _ = store.prepare_atomic("rig-bench", "hs", lambda: Run(**owner.run_fields()))
                store.start(run.id, **owner.run_fields())
                store.heartbeat(run.id, owner)
                store.finish(run.id, Status.COMPLETED, exit_code=0, owner=owner)
                lock.release()

            session_ms = median_ms(session_cycle, args.repeat)
            nbytes = (Path(folder) / "state" / "runs.json").stat().st_size
            rows.append((size, list_ms, get_ms, cycle_ms, session_ms, nbytes))
    base = rows[0]
    headers = ("runs kept", "state KiB", "list ms", "get ms", "prepare+finish ms", "session cycle ms", "x smallest")
    print("  ".join(f"{h:>{w}}" for h, w in zip(headers, (9, 9, 8, 8, 17, 16, 10), strict=True)))
    for size, list_ms, get_ms, cycle_ms, session_ms, nbytes in rows:
        print(
            f"{size:>9}  {nbytes / 1024:>9.0f}  {list_ms:>8.2f}  {get_ms:>8.2f}  {cycle_ms:>17.2f}  "
            f"{session_ms:>16.2f}  {session_ms / base[4]:>10.1f}"
        )
    print(
        f"medians of {args.repeat} calls each; the last column compares the session cycle "
        f"(liveness lock, prepare, claim, heartbeat, finish) to {base[0]} runs kept"
    )


if __name__ == "__main__":
    main()
