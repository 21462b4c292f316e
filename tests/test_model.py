"""The run record's JSON contract."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime, timedelta, timezone

import pytest
from contract import CONTRACT_KEYS

from pytest_runs import PrepareOutcome, Run, Status


def test_status_values_in_contract_order() -> None:
    assert [s.value for s in Status] == ["pending", "running", "completed", "failed", "interrupted", "timeout"]
    assert isinstance(Status.PENDING, str)
    assert Status("running") is Status.RUNNING


@pytest.mark.parametrize(
    ("status", "terminal"),
    [
        (Status.PENDING, False),
        (Status.RUNNING, False),
        (Status.COMPLETED, True),
        (Status.FAILED, True),
        (Status.INTERRUPTED, True),
        (Status.TIMEOUT, True),
    ],
)
def test_is_terminal(status: Status, terminal: bool) -> None:
    assert status.is_terminal is terminal


def test_prepare_outcome_members() -> None:
    assert [o.name for o in PrepareOutcome] == ["CREATED", "REUSE", "BUSY"]


def test_fields_are_the_json_keys_in_order() -> None:
    names = [f.name for f in dataclasses.fields(Run)]
    assert names[: len(CONTRACT_KEYS) + 2] == [*CONTRACT_KEYS, "batch_id", "plan_entry"]


def test_defaults() -> None:
    run = Run()
    assert run.status is Status.PENDING
    assert run.exit_code is None and run.started_at is None and run.ended_at is None
    assert run.id == run.machine == run.error_msg == run.batch_id == ""


def test_pending_run_json_has_nulls_and_no_batch_keys() -> None:
    data = Run(id="r1", machine="rig-1", test_dir="/t", test_dir_hash="ab").to_dict()
    assert list(data) == CONTRACT_KEYS
    assert data["status"] == "pending"
    assert data["exit_code"] is None and data["started_at"] is None and data["ended_at"] is None
    assert json.loads(json.dumps(data)) == data


def test_batch_fields_written_only_when_set() -> None:
    data = Run(id="r1", batch_id="b7", plan_entry="smoke").to_dict()
    assert list(data) == [*CONTRACT_KEYS, "batch_id", "plan_entry"]
    assert (data["batch_id"], data["plan_entry"]) == ("b7", "smoke")
    assert "plan_entry" not in Run(batch_id="b7").to_dict()


def test_timestamps_are_rfc3339_utc_with_microseconds() -> None:
    moment = datetime(2026, 11, 26, 20, 4, 58, 123456, tzinfo=timezone(timedelta(hours=2)))
    data = Run(started_at=moment, ended_at=moment.replace(microsecond=0)).to_dict()
    assert data["started_at"] == "2026-11-26T18:04:58.123456Z"
    assert data["ended_at"] == "2026-11-26T18:04:58.000000Z"
    back = Run.from_dict(data)
    assert back.started_at == moment
    assert back.started_at is not None and back.started_at.tzinfo is not None


def test_naive_timestamp_is_refused() -> None:
    with pytest.raises(ValueError, match="no time zone"):
        Run(started_at=datetime(2026, 1, 1)).to_dict()


def test_reads_go_style_nanosecond_timestamps() -> None:
    run = Run.from_dict({"started_at": "2026-06-01T12:00:00.123456789Z", "ended_at": "2026-06-01T14:00:00+02:00"})
    assert run.started_at == datetime(2026, 6, 1, 12, 0, 0, 123456, tzinfo=UTC)
    assert run.ended_at == datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


def test_round_trip_of_a_finished_run() -> None:
    run = Run(
        id="r1",
        machine="rig-1",
        test_dir="/t",
        test_dir_hash="ab",
        status=Status.FAILED,
        exit_code=1,
        started_at=datetime(2026, 1, 1, tzinfo=UTC),
        ended_at=datetime(2026, 1, 1, 0, 1, tzinfo=UTC),
        artifacts_path="/a",
        logs_path="/l",
        error_code="tests_failed",
        error_msg="1 failed",
        batch_id="b",
        plan_entry="p",
    )
    assert Run.from_dict(json.loads(json.dumps(run.to_dict()))) == run


def test_unknown_keys_survive_a_round_trip() -> None:
    data = {**Run(id="r1").to_dict(), "priority": 3, "labels": {"a": [1, None]}}
    again = Run.from_dict(data).to_dict()
    assert again == data
    assert list(again)[-2:] == ["priority", "labels"]


def test_unknown_keys_are_not_dataclass_fields() -> None:
    assert "unknown_keys" not in {f.name for f in dataclasses.fields(Run)}


@pytest.mark.parametrize(
    ("record", "culprit"),
    [
        ({"status": "paused"}, "unknown status 'paused'"),
        ({"exit_code": "1"}, "exit_code must be an integer"),
        ({"exit_code": True}, "exit_code must be an integer"),
        ({"started_at": "yesterday"}, "started_at"),
        ({"started_at": "2026-01-01T00:00:00"}, "no time zone"),
        ({"machine": 5}, "machine must be a string"),
    ],
)
def test_bad_records_name_the_key(record: dict[str, object], culprit: str) -> None:
    with pytest.raises(ValueError, match=culprit):
        Run.from_dict(record)
