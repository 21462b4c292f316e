"""Atomicity for real: many OS processes and threads racing on one store."""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import racers

from pytest_runs import PrepareOutcome, Run, Status, Store

PROCESSES = 16


@pytest.fixture(scope="module")
def spawn() -> multiprocessing.context.SpawnContext:
    return multiprocessing.get_context("spawn")


@pytest.mark.parametrize("same_hash", [False, True], ids=["different-hashes", "same-hash"])
def test_processes_racing_prepare_atomic(
    tmp_path: Path, spawn: multiprocessing.context.SpawnContext, same_hash: bool
) -> None:
    state_dir = str(tmp_path / "state")
    manager = spawn.Manager()
    start = manager.Barrier(PROCESSES)
    with spawn.Pool(PROCESSES) as pool:
        pending = [
            pool.apply_async(racers.prepare_once, (state_dir, "rig-1", "same" if same_hash else f"h{i}", start))
            for i in range(PROCESSES)
        ]
        results = [p.get(timeout=120) for p in pending]
    manager.shutdown()
    outcomes = Counter(outcome for _, outcome in results)
    created = [run_id for run_id, outcome in results if outcome == "CREATED"]
    assert outcomes["CREATED"] == 1, outcomes
    loser = "REUSE" if same_hash else "BUSY"
    assert outcomes[loser] == PROCESSES - 1, outcomes
    assert {run_id for run_id, _ in results} == set(created), "every loser must be handed the winner's run"
    assert [r.id for r in Store(state_dir).list()] == created


@pytest.mark.parametrize("same_hash", [False, True], ids=["different-hashes", "same-hash"])
def test_threads_racing_prepare_atomic_on_one_store(tmp_path: Path, same_hash: bool) -> None:
    store = Store(tmp_path / "state")
    start = threading.Barrier(PROCESSES)

    def race(index: int) -> tuple[str, PrepareOutcome]:
        start.wait()
        run, outcome = store.prepare_atomic("rig-1", "same" if same_hash else f"h{index}", Run)
        return run.id, outcome

    with ThreadPoolExecutor(PROCESSES) as pool:
        results = list(pool.map(race, range(PROCESSES)))
    outcomes = Counter(outcome for _, outcome in results)
    assert outcomes[PrepareOutcome.CREATED] == 1
    assert outcomes[PrepareOutcome.REUSE if same_hash else PrepareOutcome.BUSY] == PROCESSES - 1
    assert len({run_id for run_id, _ in results}) == 1
    assert len(store.list()) == 1


def test_processes_creating_and_updating_lose_nothing(
    tmp_path: Path, spawn: multiprocessing.context.SpawnContext
) -> None:
    state_dir = str(tmp_path / "state")
    workers, per_worker = 8, 15
    manager = spawn.Manager()
    start = manager.Barrier(workers)
    with spawn.Pool(workers) as pool:
        pending = [
            pool.apply_async(racers.create_and_update, (state_dir, w, per_worker, start)) for w in range(workers)
        ]
        ids_by_worker = [p.get(timeout=300) for p in pending]
    manager.shutdown()
    runs = {r.id: r for r in Store(state_dir).list()}
    assert len(runs) == workers * per_worker
    for worker, ids in enumerate(ids_by_worker):
        for index, run_id in enumerate(ids):
            run = runs[run_id]
            assert run.status is Status.COMPLETED
            assert run.exit_code == worker * 1000 + index
            assert run.error_msg == f"worker {worker} step 1"
            assert run.machine == f"w{worker}-{index}"


def test_writers_killed_at_random_moments(tmp_path: Path) -> None:
    """SIGKILL mid-write, many times: the state always loads and no returned create or update is lost."""
    state_dir = tmp_path / "state"
    rng = random.Random(1234)
    created: list[str] = []
    updated: dict[str, int] = {}
    for _ in range(15):
        writer = subprocess.Popen(
            [sys.executable, racers.__file__, str(state_dir)],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
        assert writer.stdout is not None
        lines = [writer.stdout.readline()]  # at least one write has landed
        time.sleep(rng.uniform(0, 0.05))
        writer.send_signal(signal.SIGKILL)
        out, _ = writer.communicate()
        lines.extend(out.splitlines())
        for line in lines:
            match line.split():
                case ["C", run_id]:
                    created.append(run_id)
                case ["U", run_id, exit_code]:
                    updated[run_id] = int(exit_code)
        runs = {r.id: r for r in Store(state_dir).list()}
        missing = [run_id for run_id in created if run_id not in runs]
        assert not missing, f"{len(missing)} runs whose create had returned are gone"
        lost = [run_id for run_id, code in updated.items() if runs[run_id].exit_code != code]
        assert not lost, f"{len(lost)} updates that had returned are gone"
    assert len(created) >= 25 and updated
    # Nothing but the store's own files is left behind by killed writers.
    Store(state_dir).create(Run(machine="last", test_dir_hash="h"))
    assert sorted(p.name for p in state_dir.iterdir()) == ["runs.json", "runs.lock", "runs.state.0", "runs.state.1"]
