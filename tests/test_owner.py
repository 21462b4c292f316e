"""Owners, liveness and staleness."""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

import pytest

from pytest_runs import Run
from pytest_runs.owner import Owner, boot_id, ci_job_url, process_start_time

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def test_current_owner_is_this_process() -> None:
    owner = Owner.current(environ={})
    assert owner.host == socket.gethostname()
    assert owner.pid == os.getpid()
    assert owner.started and owner.started == process_start_time(os.getpid())
    assert owner.boot_id == boot_id() and len(owner.boot_id) == 36
    assert owner.ci_url == ""


def test_owner_fields_are_written_only_when_set() -> None:
    assert not {"owner_host", "owner_pid", "heartbeat_at", "owner_ci_url"} & set(Run(id="r").to_dict())
    owner = Owner(host="ci-7", boot_id="b", pid=42, started="123", ci_url="https://ci/job/1", token="a" * 32, lease=60)
    run = Run(id="r", heartbeat_at=NOW, fence=3, **owner.run_fields())
    data = run.to_dict()
    assert list(data)[12:] == [
        "owner_host",
        "owner_boot_id",
        "owner_pid",
        "owner_started",
        "heartbeat_at",
        "owner_ci_url",
        "owner_token",
        "owner_lease",
        "fence",
    ]
    assert data["heartbeat_at"] == "2026-11-26T12:00:00.000000Z"
    assert (data["owner_lease"], data["fence"]) == (60.0, 3)
    assert Run.from_dict(data) == run
    assert owner.owns(run)
    assert not dataclasses.replace(owner, token="b" * 32).owns(run), "the token decides, not the PID"
    legacy = Run(id="r", owner_host="ci-7", owner_boot_id="b", owner_pid=42, owner_started="123")
    assert Owner(host="ci-7", boot_id="b", pid=42, started="123").owns(legacy)
    assert not Owner(host="ci-7", boot_id="b", pid=42, started="999").owns(legacy)


def test_start_time_of_a_dead_and_of_a_zombie_process() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    assert process_start_time(child.pid)
    child.kill()
    # Killed but not yet reaped: a zombie is as dead as it gets.
    deadline = datetime.now(UTC) + timedelta(seconds=30)
    while process_start_time(child.pid) is not None:
        assert datetime.now(UTC) < deadline
        time.sleep(0.01)
    child.wait()
    assert process_start_time(child.pid) is None


@pytest.mark.parametrize(
    ("environ", "url"),
    [
        (
            {"GITHUB_ACTIONS": "true", "GITHUB_SERVER_URL": "https://github.com", "GITHUB_REPOSITORY": "o/r",
             "GITHUB_RUN_ID": "7", "GITHUB_RUN_ATTEMPT": "2"},
            "https://github.com/o/r/actions/runs/7/attempts/2",
        ),
        ({"GITLAB_CI": "true", "CI_JOB_URL": "https://gitlab.example/o/r/-/jobs/9"}, "https://gitlab.example/o/r/-/jobs/9"),
        ({"JENKINS_URL": "https://j/", "BUILD_URL": "https://j/job/x/5/"}, "https://j/job/x/5/"),
        ({"BUILDKITE_BUILD_URL": "https://buildkite.com/o/p/builds/3", "BUILDKITE_JOB_ID": "abc"},
         "https://buildkite.com/o/p/builds/3#abc"),
        ({"CIRCLE_BUILD_URL": "https://circleci.com/gh/o/r/11"}, "https://circleci.com/gh/o/r/11"),
        ({}, ""),
    ],
)  # fmt: skip
def test_ci_job_url(environ: dict[str, str], url: str) -> None:
    assert ci_job_url(environ) == url
