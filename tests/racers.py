"""Work for child processes in the race tests (a module, so that spawned children can import it)."""

from __future__ import annotations

import multiprocessing.synchronize
import os
import sys

from pytest_runs import Run, Status, Store


def prepare_once(
    state_dir: str, machine: str, test_dir_hash: str, start: multiprocessing.synchronize.Barrier
) -> tuple[str, str]:
    store = Store(state_dir)
    start.wait()
    run, outcome = store.prepare_atomic(machine, test_dir_hash, lambda: Run(test_dir=f"/tests/{test_dir_hash}"))
    return run.id, outcome.name


def create_and_update(state_dir: str, worker: int, count: int, start: multiprocessing.synchronize.Barrier) -> list[str]:
    store = Store(state_dir)
    start.wait()
    ids = []
    for index in range(count):
        run = store.create(Run(machine=f"w{worker}-{index}", test_dir_hash="h"))
        run.status = Status.RUNNING
        run.error_msg = f"worker {worker} step 1"
        store.update(run)
        run.status = Status.COMPLETED
        run.exit_code = worker * 1000 + index
        store.update(run)
        ids.append(run.id)
    return ids


def create_forever(state_dir: str) -> None:
    """Create and update runs until killed, printing each once ``create``/``update`` has returned.

    Lines are ``C <id>`` after a create and ``U <id> <exit code>`` after an update.
    """
    store = Store(state_dir)
    index = 0
    while True:
        machine = f"m{os.getpid()}-{index}"  # each run active on its own machine
        run = store.create(Run(machine=machine, test_dir_hash=f"h{index}", error_msg="x" * (index % 300)))
        sys.stdout.write(f"C {run.id}\n")
        sys.stdout.flush()
        run.exit_code = index
        store.update(run)
        sys.stdout.write(f"U {run.id} {index}\n")
        sys.stdout.flush()
        index += 1


if __name__ == "__main__":
    create_forever(sys.argv[1])


def load_cycles(
    state_dir: str, worker: int, cycles: int, machines: int, start: multiprocessing.synchronize.Barrier
) -> tuple[int, list[str]]:
    """Prepare, run and finish over and over; return the CREATED count and any invariant broken."""
    import random

    rng = random.Random(worker)
    store = Store(state_dir)
    created, broken = 0, []
    start.wait()
    for _ in range(cycles):
        machine = f"rig-{rng.randrange(machines)}"
        run, outcome = store.prepare_atomic(machine, f"h{rng.randrange(3)}", Run)
        if outcome.name == "CREATED":
            created += 1
            store.start(run.id)
        broken.extend(_more_than_one_active(store.list()))
        if outcome.name == "CREATED":
            store.finish(run.id, Status.COMPLETED, exit_code=0)
    return created, broken


def _more_than_one_active(runs: list[Run]) -> list[str]:
    active: dict[str, list[str]] = {}
    for run in runs:
        if not run.status.is_terminal:
            active.setdefault(run.machine, []).append(run.id)
    return [f"{machine}: {ids}" for machine, ids in active.items() if len(ids) > 1]
