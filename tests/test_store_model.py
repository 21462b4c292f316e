"""A stateful property test: the store against a plain in-memory model.

Run twice: keeping every run, and with retention (``keep=2``) and history files compacted
as soon as their dead part outweighs the live one, so that cutting, compacting and
reading history from either end are all checked against the model.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from pytest_runs import InvalidTransition, PrepareOutcome, Run, RunEnded, RunNotFound, Status, Store, filebackend
from pytest_runs.pgbackend import PgBackend
from pytest_runs.store import open_store

#: As in conftest.py: the server of the database tests.
TEST_DATABASE = os.environ.get("RUNS_TEST_DATABASE", "postgresql://127.0.0.1:5432/test")

machines = st.sampled_from(["rig-1", "rig-2", "board:7"])
hashes = st.sampled_from(["h1", "h2"])
statuses = st.sampled_from(list(Status))
terminal = st.sampled_from([s for s in Status if s.is_terminal])


@dataclass
class Expected:
    id: str
    machine: str
    test_dir_hash: str
    status: Status
    exit_code: int | None = None
    error_msg: str = ""
    #: When the run was stored as ended, in the order of the model's events.
    ended: int | None = None


def summary(run: Run) -> tuple[str, str, str, Status, int | None, str]:
    return (run.id, run.machine, run.test_dir_hash, run.status, run.exit_code, run.error_msg)


def expected_summary(e: Expected) -> tuple[str, str, str, Status, int | None, str]:
    return (e.id, e.machine, e.test_dir_hash, e.status, e.exit_code, e.error_msg)


class StoreAgainstModel(RuleBasedStateMachine):
    ids = Bundle("ids")
    keep: int | None = None

    def __init__(self) -> None:
        super().__init__()
        self.folder = Path(tempfile.mkdtemp(prefix="runs-model-"))
        self.store = Store(self.folder / "state", keep=self.keep)
        self.model: list[Expected] = []
        self.events = 0
        self.compact_min = filebackend.COMPACT_MIN_BYTES
        if self.keep is not None:
            filebackend.COMPACT_MIN_BYTES = 1

    def teardown(self) -> None:
        filebackend.COMPACT_MIN_BYTES = self.compact_min
        shutil.rmtree(self.folder, ignore_errors=True)

    def ended(self, expected: Expected) -> None:
        """The run was stored as ended: note when, and apply retention to its machine."""
        self.events += 1
        expected.ended = self.events
        if self.keep is None:
            return
        kept = sorted((e for e in self.model if e.machine == expected.machine and e.ended), key=lambda e: e.id)
        for doomed in kept[: max(0, len(kept) - self.keep)]:
            self.model.remove(doomed)

    def find(self, run_id: str) -> Expected | None:
        return next((e for e in self.model if e.id == run_id), None)

    def active(self, machine: str) -> Expected | None:
        return next((e for e in self.model if e.machine == machine and not e.status.is_terminal), None)

    @rule(target=ids, machine=machines, test_dir_hash=hashes, status=statuses)
    def create(self, machine: str, test_dir_hash: str, status: Status) -> str:
        if not status.is_terminal and self.active(machine) is not None:
            with pytest.raises(InvalidTransition, match="already has an active run"):
                self.store.create(Run(machine=machine, test_dir_hash=test_dir_hash, status=status))
            return "refused"
        run = self.store.create(Run(id="ignored", machine=machine, test_dir_hash=test_dir_hash, status=status))
        assert run.id != "ignored"
        assert all(run.id > e.id for e in self.model), "IDs sort in creation order"
        self.model.append(Expected(run.id, machine, test_dir_hash, status))
        if status.is_terminal:
            self.ended(self.model[-1])
        return run.id

    @rule(target=ids, machine=machines, test_dir_hash=hashes)
    def prepare(self, machine: str, test_dir_hash: str) -> str:
        holder = self.active(machine)
        run, outcome = self.store.prepare_atomic(machine, test_dir_hash, Run)
        if holder is None:
            assert outcome is PrepareOutcome.CREATED
            self.model.append(Expected(run.id, machine, test_dir_hash, Status.PENDING))
        else:
            same = holder.test_dir_hash == test_dir_hash
            assert outcome is (PrepareOutcome.REUSE if same else PrepareOutcome.BUSY)
            assert summary(run) == expected_summary(holder)
        return run.id

    @rule(run_id=ids, status=statuses, message=st.text(max_size=5))
    def update(self, run_id: str, status: Status, message: str) -> None:
        expected = self.find(run_id)
        if expected is None:
            with pytest.raises(RunNotFound):
                self.store.get(run_id)
            return
        run = self.store.get(run_id)
        run.status, run.error_msg = status, message
        if expected.status.is_terminal and status != expected.status:
            with pytest.raises(InvalidTransition):
                self.store.update(run)
            return
        self.store.update(run)
        ends = status.is_terminal and not expected.status.is_terminal
        expected.status, expected.error_msg = status, message
        if ends:
            self.ended(expected)

    @rule(run_id=ids, status=terminal, exit_code=st.integers(0, 5))
    def finish(self, run_id: str, status: Status, exit_code: int) -> None:
        expected = self.find(run_id)
        if expected is None:
            with pytest.raises(RunNotFound):
                self.store.finish(run_id, status, exit_code=exit_code)
            return
        if expected.status.is_terminal:
            with pytest.raises(RunEnded) as ended:
                self.store.finish(run_id, status, exit_code=exit_code)
            assert summary(ended.value.run) == expected_summary(expected)
            return
        run = self.store.finish(run_id, status, exit_code=exit_code)
        # finish records the whole outcome: an error message it is not given is cleared.
        expected.status, expected.exit_code, expected.error_msg = status, exit_code, ""
        assert summary(run) == expected_summary(expected)
        self.ended(expected)

    @rule(run_id=consumes(ids))
    def get(self, run_id: str) -> None:
        expected = self.find(run_id)
        if expected is None:
            with pytest.raises(RunNotFound):
                self.store.get(run_id)
        else:
            assert summary(self.store.get(run_id)) == expected_summary(expected)

    @rule(run_id=st.text(min_size=1, max_size=8))
    def get_unknown(self, run_id: str) -> None:
        if self.find(run_id) is None:
            with pytest.raises(RunNotFound):
                self.store.get(run_id)

    @rule(machine=machines)
    def active_by_machine(self, machine: str) -> None:
        found, expected = self.store.active_by_machine(machine), self.active(machine)
        assert (found and summary(found)) == (expected and expected_summary(expected))

    @rule(machine=machines, test_dir_hash=hashes)
    def find_by_hash(self, machine: str, test_dir_hash: str) -> None:
        found = self.store.find_by_test_dir_hash_and_machine(test_dir_hash, machine)
        wanted = [e for e in self.model if e.machine == machine and e.test_dir_hash == test_dir_hash]
        assert [summary(r) for r in found] == [expected_summary(e) for e in wanted]

    @rule(limit=st.integers(0, 6))
    def recent(self, limit: int) -> None:
        newest = sorted(self.model, key=lambda e: e.id, reverse=True)[:limit]
        assert [summary(r) for r in self.store.recent(limit)] == [expected_summary(e) for e in newest]

    @invariant()
    def list_matches(self) -> None:
        assert [summary(r) for r in self.store.list()] == [expected_summary(e) for e in self.model]

    @invariant()
    def machines_match(self) -> None:
        states = {state.machine: state for state in self.store.machines()}
        assert sorted(states) == sorted({e.machine for e in self.model})
        for name, state in states.items():
            ended = [e for e in self.model if e.machine == name and e.ended]
            last = max(ended, key=lambda e: e.id, default=None)
            assert (state.last and summary(state.last)) == (last and expected_summary(last))
            active = self.active(name)
            assert (state.active and summary(state.active)) == (active and expected_summary(active))


class StoreWithRetentionAgainstModel(StoreAgainstModel):
    keep = 2


class DatabaseStoreAgainstModel(StoreAgainstModel):
    """The same rules on the PostgreSQL backend, with retention, on a schema of its own."""

    keep = 2

    def __init__(self) -> None:
        super().__init__()
        if TEST_DATABASE == "skip":
            pytest.skip("RUNS_TEST_DATABASE=skip")
        self.schema = f"model_{os.getpid()}_{secrets.token_hex(4)}"
        self.store = open_store(self.folder / "files", f"{TEST_DATABASE}?schema={self.schema}", keep=self.keep)

    def teardown(self) -> None:
        backend = self.store.backend
        if isinstance(backend, PgBackend):
            backend.close()
        with psycopg.connect(TEST_DATABASE, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {self.schema} CASCADE")
        super().teardown()


class UpgradedStoreAgainstModel(StoreAgainstModel):
    """Starts from a format-1 store as pytest-runs 0.1 left it, with ended and active runs."""

    def __init__(self) -> None:
        super().__init__()
        legacy = [
            Expected("20260101-000000-000000-aaaaaa", "rig-1", "h1", Status.COMPLETED, 0, "", 1),
            Expected("20260101-000001-000000-aaaaaa", "rig-2", "h2", Status.FAILED, 1, "boom", 2),
            Expected("20260101-000002-000000-aaaaaa", "rig-1", "h2", Status.RUNNING),
        ]
        records = [
            Run(id=e.id, machine=e.machine, test_dir_hash=e.test_dir_hash, status=e.status, exit_code=e.exit_code,
                error_msg=e.error_msg).to_dict()
            for e in legacy
        ]  # fmt: skip
        state = self.folder / "state"
        state.mkdir(mode=0o700)
        (state / "runs.json").write_text(json.dumps({"format": "pytest-runs-state", "version": 1, "runs": records}))
        self.model = legacy
        self.events = 2


StoreAgainstModel.TestCase.settings = settings(max_examples=30, stateful_step_count=25, deadline=None)
TestStoreAgainstModel = StoreAgainstModel.TestCase
StoreWithRetentionAgainstModel.TestCase.settings = settings(max_examples=30, stateful_step_count=30, deadline=None)
TestStoreWithRetentionAgainstModel = StoreWithRetentionAgainstModel.TestCase
DatabaseStoreAgainstModel.TestCase.settings = settings(max_examples=15, stateful_step_count=25, deadline=None)
TestDatabaseStoreAgainstModel = DatabaseStoreAgainstModel.TestCase
UpgradedStoreAgainstModel.TestCase.settings = settings(max_examples=20, stateful_step_count=20, deadline=None)
TestUpgradedStoreAgainstModel = UpgradedStoreAgainstModel.TestCase
