"""Owners, liveness and staleness."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

import pytest

from pytest_runs import Run, Status
from pytest_runs.owner import Owner, boot_id, ci_job_url, process_start_time, stale_reason

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
    owner = Owner(host="ci-7", boot_id="b", pid=42, started="123", ci_url="https://ci/job/1")
    run = Run(id="r", heartbeat_at=NOW, **owner.run_fields())
    data = run.to_dict()
    assert list(data)[12:] == [
        "owner_host",
        "owner_boot_id",
        "owner_pid",
        "owner_started",
        "heartbeat_at",
        "owner_ci_url",
    ]
    assert data["heartbeat_at"] == "2026-11-26T12:00:00.000000Z"
    assert Run.from_dict(data) == run
    assert owner.owns(run)
    assert not Owner(host="ci-7", boot_id="b", pid=42, started="999").owns(run)


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


def dead_pid() -> tuple[int, str]:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    started = process_start_time(child.pid) or ""
    child.wait()
    return child.pid, started


HERE = Owner.current(environ={})


def running(**fields: object) -> Run:
    return Run(id="r", machine="rig-1", status=Status.RUNNING, **fields)  # type: ignore[arg-type]


def test_no_owner_no_heartbeat_is_never_stale() -> None:
    assert stale_reason(running(), NOW + timedelta(days=365), 300, HERE) is None


def test_live_owner_on_this_host_is_not_stale() -> None:
    run = running(**HERE.run_fields(), heartbeat_at=NOW)
    assert stale_reason(run, NOW + timedelta(seconds=10), 300, HERE) is None


def test_dead_owner_on_this_host_is_stale_at_once() -> None:
    pid, started = dead_pid()
    run = running(owner_host=HERE.host, owner_boot_id=HERE.boot_id, owner_pid=pid, owner_started=started,
                  heartbeat_at=NOW)  # fmt: skip
    assert stale_reason(run, NOW, 300, HERE) == f"process {pid} is gone"


def test_reused_pid_is_not_the_owner() -> None:
    run = running(owner_host=HERE.host, owner_boot_id=HERE.boot_id, owner_pid=os.getpid(), owner_started="1")
    assert stale_reason(run, NOW, 300, HERE) == f"PID {os.getpid()} now belongs to another process"


def test_owner_from_an_earlier_boot_is_stale() -> None:
    run = running(owner_host=HERE.host, owner_boot_id="an-earlier-boot", owner_pid=os.getpid(),
                  owner_started=HERE.started)  # fmt: skip
    assert stale_reason(run, NOW, 300, HERE) == "its host has rebooted since"


def test_other_host_is_judged_by_its_heartbeat_only() -> None:
    run = running(owner_host="elsewhere", owner_boot_id="x", owner_pid=1, owner_started="1", heartbeat_at=NOW)
    assert stale_reason(run, NOW + timedelta(seconds=299), 300, HERE) is None
    assert stale_reason(run, NOW + timedelta(seconds=301), 300, HERE) == "no heartbeat for more than 300s"


def test_terminal_runs_are_never_stale() -> None:
    run = Run(status=Status.COMPLETED, heartbeat_at=NOW)
    assert stale_reason(run, NOW + timedelta(days=9), 300, HERE) is None
