"""The soak's analysis (benchmarks/soak.py) on planted data: no session is started here."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest


@pytest.fixture(scope="module")
def soak() -> ModuleType:
    path = Path(__file__).parent.parent / "benchmarks" / "soak.py"
    spec = importlib.util.spec_from_file_location("soak", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["soak"] = module  # dataclasses look their module up
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules["soak"]
    return module


def line(kind: str, t: float, sid: str, *, machine: str = "rig-1", run: str = "", fence: str = "1",
         pid: int = 100, worker: str = "", test: str = "t[0]") -> str:  # fmt: skip
    return json.dumps({"k": kind, "t": t, "s": sid, "m": machine, "r": run or f"run-{sid}", "f": fence, "p": pid,
                       "w": worker, "n": test, "h": "vm"})  # fmt: skip


def test_a_planted_overlap_is_found_with_its_size(soak: ModuleType) -> None:
    lines = [
        line("start", 10.0, "a"), line("tick", 10.05, "a"), line("end", 10.5, "a"),
        line("start", 10.3, "b", fence="2"), line("end", 10.8, "b", fence="2"),
        # The same session's two xdist workers at once: not an overlap.
        line("start", 20.0, "c", fence="3", pid=7, worker="gw0"), line("end", 21.0, "c", fence="3", pid=7),
        line("start", 20.1, "c", fence="3", pid=8, worker="gw1"), line("end", 20.9, "c", fence="3", pid=8),
        # Another machine at the same time: not an overlap.
        line("start", 10.2, "d", machine="rig-2"), line("end", 10.9, "d", machine="rig-2"),
        "not json",  # ignored
    ]  # fmt: skip
    found = soak.intervals(soak.parse_stamps(lines), {})
    assert len(found) == 5
    (overlap,) = soak.overlaps(found)
    assert (overlap.machine, overlap.first.sid, overlap.second.sid) == ("rig-1", "a", "b")
    assert overlap.ms == pytest.approx(200)
    assert soak.overlaps([i for i in found if i.sid != "b"]) == []


def test_a_test_left_open_lasts_until_its_sigkill_or_its_last_tick(soak: ModuleType) -> None:
    lines = [
        # Killed at 11.0 (its main process): on the machine until then, after its last tick at 10.1.
        line("start", 10.0, "a"), line("tick", 10.1, "a"),
        line("start", 10.6, "b", fence="2"), line("end", 10.7, "b", fence="2"),
        # An xdist worker's test left open: its death is unknown, its last tick counts.
        line("start", 20.0, "c", fence="3", worker="gw0"), line("tick", 20.2, "c", fence="3", worker="gw0"),
        line("start", 20.5, "d", fence="4"), line("end", 20.6, "d", fence="4"),
    ]  # fmt: skip
    found = soak.intervals(soak.parse_stamps(lines), {"a": 11.0, "c": 30.0})
    (overlap,) = soak.overlaps(found)
    assert (overlap.first.sid, overlap.second.sid, overlap.first.closed) == ("a", "b", False)
    assert overlap.ms == pytest.approx(100)
    # Without the kill time, the last tick bounds it, and b starts after it.
    assert soak.overlaps(soak.intervals(soak.parse_stamps(lines), {})) == []


def test_duplicate_fences_missing_records_and_odd_statuses_are_flagged(soak: ModuleType) -> None:
    records = {
        "run-a": soak.Record("run-a", "rig-1", 1, "completed", True),
        "run-b": soak.Record("run-b", "rig-1", 1, "interrupted", True),
        "run-c": soak.Record("run-c", "rig-2", 1, "completed", True),
    }
    lines = [line("start", 1, "a"), line("end", 2, "a"), line("start", 3, "e", fence="2"), line("end", 4, "e")]
    found = soak.intervals(soak.parse_stamps(lines), {})
    assert soak.duplicate_fences(records.values(), found) == ["rig-1: fence 1 held by 2 runs"]
    planted = soak.intervals(soak.parse_stamps([*lines, line("start", 5, "f"), line("end", 6, "f")]), {})
    assert soak.duplicate_fences([], planted) == ["rig-1: fence 1 stamped by sessions a, f"]

    def ending(sid: str, status: int | None, *, killed: float | None = None, printed: tuple[str, ...] = ()) -> object:
        return soak.Ending(sid, "rig-1", status, killed, False, frozenset(printed))

    endings = [ending("a", 0), ending("e", 0), ending("g", 75, printed=("run-g",))]
    missing = soak.missing_records(endings, found, records)
    assert missing == [
        "e: its tests ran as run run-e, which the store does not have",
        "g: printed run run-g, which the store does not have",
    ]
    assert soak.missing_records([ending("a", 0)], found, records) == []
    statuses = [ending("a", 0), ending("b", -9, killed=5.0), ending("c", -9), ending("d", 3), ending("h", 137)]
    assert soak.flagged_statuses(statuses) == ["c: exit status -9", "d: exit status 3", "h: exit status 137"]


def test_a_busy_answer_naming_the_run_of_a_session_already_gone_is_flagged(soak: ModuleType) -> None:
    found = soak.intervals(soak.parse_stamps([line("start", 1, "a"), line("end", 2, "a")]), {})

    def ending(sid: str, launched: float, exited: float, busy: tuple[str, ...] = ()) -> Any:
        return soak.Ending(sid, "rig-1", 0, None, False, frozenset(), launched, exited, frozenset(busy))

    # b asked while a lived (launched before a ended): an honest busy answer; c started 3 s after a was gone.
    endings = [ending("a", 0, 2.5), ending("b", 1, 4, ("run-a",)), ending("c", 5.5, 6, ("run-a",))]
    assert soak.kept_by_the_dead(endings, found) == [
        "c was told rig-1 is busy with run run-a of a, which had ended 3.0 s before it started"
    ]
    # a was killed while its group was stopped: its keeper, stopped too, held the lock until the SIGCONT at 6.
    stopped = dataclasses.replace(endings[0], status=-9, continued=6.0)
    assert soak.kept_by_the_dead([stopped, *endings[1:]], found) == []


def test_an_exit_status_the_run_record_contradicts_is_flagged(soak: ModuleType) -> None:
    records = {
        "run-a": soak.Record("run-a", "rig-1", 1, "interrupted", True, None, "owner_lost"),
        "run-b": soak.Record("run-b", "rig-1", 2, "completed", True, 0),
        "run-c": soak.Record("run-c", "rig-1", 3, "interrupted", True, None, "owner_lost"),
    }
    lines = [line("start", 1, sid, fence=fence) for sid, fence in (("a", "1"), ("b", "2"), ("c", "3"))]
    found = soak.intervals(soak.parse_stamps(lines), {})
    endings = [
        soak.Ending("a", "rig-1", 0, None, False, frozenset()),  # passed, yet its run was taken from it
        soak.Ending("b", "rig-1", 0, None, False, frozenset()),
        soak.Ending("c", "rig-1", -9, 1.5, False, frozenset()),  # killed: either way
    ]
    assert soak.disagreements(endings, found, records) == ["a exited 0; its run run-a is interrupted (owner_lost)"]
