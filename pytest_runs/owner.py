"""Who owns a run, and whether that owner is still alive.

A session records its owner in its run: host name, the kernel's boot ID (so that a
reboot is noticed), PID and the process's start time (so that a reused PID is not
mistaken for the owner), the CI job's URL, and a heartbeat it refreshes while it runs.
From those, :func:`stale_reason` judges a non-terminal run whose owner is gone.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from .model import Run, format_timestamp

__all__ = ["DEFAULT_HEARTBEAT", "DEFAULT_LEASE", "Owner", "ci_job_url", "process_start_time", "stale_reason"]

#: Seconds between heartbeats of a running session.
DEFAULT_HEARTBEAT = 15.0
#: Seconds without a heartbeat after which a run is stale, wherever its owner is.
DEFAULT_LEASE = 300.0

_BOOT_ID_FILE = "/proc/sys/kernel/random/boot_id"


@dataclasses.dataclass(frozen=True)
class Owner:
    """The process that owns a run."""

    host: str
    boot_id: str
    pid: int
    started: str
    ci_url: str = ""

    @classmethod
    def current(cls, environ: Mapping[str, str] = os.environ) -> Owner:
        """This process."""
        pid = os.getpid()
        return cls(
            host=socket.gethostname(),
            boot_id=boot_id(),
            pid=pid,
            started=process_start_time(pid) or "",
            ci_url=ci_job_url(environ),
        )

    def run_fields(self) -> dict[str, Any]:
        """The run fields that record this owner."""
        return {
            "owner_host": self.host,
            "owner_boot_id": self.boot_id,
            "owner_pid": self.pid,
            "owner_started": self.started,
            "owner_ci_url": self.ci_url,
        }

    def owns(self, run: Run) -> bool:
        """True when ``run`` records this process as its owner."""
        return (run.owner_host, run.owner_boot_id, run.owner_pid, run.owner_started) == (
            self.host,
            self.boot_id,
            self.pid,
            self.started,
        )


def boot_id() -> str:
    """The kernel's boot ID, or ``""`` where the system has none."""
    try:
        with open(_BOOT_ID_FILE, encoding="ascii") as handle:
            return handle.read().strip()
    except OSError:
        return ""


def process_start_time(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot), or ``None`` if it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read().decode("ascii", "replace")
    except FileNotFoundError:
        return None
    except OSError:
        return _exists_without_proc(pid)
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    fields = stat[stat.rfind(")") + 2 :].split()
    state, start_ticks = fields[0], fields[19]
    if state in ("Z", "X"):
        return None  # killed, not yet reaped: it will never run again
    return start_ticks


def _exists_without_proc(pid: int) -> str | None:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return ""


def ci_job_url(environ: Mapping[str, str] = os.environ) -> str:
    """The URL of the CI job this process runs in, from the CI system's own variables."""
    if environ.get("GITHUB_ACTIONS") == "true" and environ.get("GITHUB_RUN_ID"):
        server = environ.get("GITHUB_SERVER_URL", "https://github.com")
        url = f"{server}/{environ.get('GITHUB_REPOSITORY', '')}/actions/runs/{environ['GITHUB_RUN_ID']}"
        attempt = environ.get("GITHUB_RUN_ATTEMPT")
        return f"{url}/attempts/{attempt}" if attempt else url
    for variable in ("CI_JOB_URL", "BUILD_URL", "CIRCLE_BUILD_URL"):  # GitLab, Jenkins, CircleCI
        if environ.get(variable):
            return environ[variable]
    if environ.get("BUILDKITE_BUILD_URL"):
        job = environ.get("BUILDKITE_JOB_ID")
        return environ["BUILDKITE_BUILD_URL"] + (f"#{job}" if job else "")
    return ""


def stale_reason(run: Run, now: datetime, lease: float, here: Owner) -> str | None:
    """Why the non-terminal ``run`` has lost its owner, or ``None`` if it may still be alive.

    Stale: its owner is on this host and boot and that process is gone (or the PID now
    belongs to another process); its owner is on this host from an earlier boot; or its
    heartbeat is older than ``lease`` seconds. A run with neither owner nor heartbeat is
    never stale.
    """
    if run.status.is_terminal:
        return None
    if run.owner_host == here.host and run.owner_pid is not None:
        if run.owner_boot_id and here.boot_id and run.owner_boot_id != here.boot_id:
            return "its host has rebooted since"
        started = process_start_time(run.owner_pid)
        if started is None:
            return f"process {run.owner_pid} is gone"
        if run.owner_started and started and started != run.owner_started:
            return f"PID {run.owner_pid} now belongs to another process"
    if run.heartbeat_at is not None and now - run.heartbeat_at > timedelta(seconds=lease):
        return f"no heartbeat for more than {lease:g}s"
    return None


def describe_owner(run: Run) -> str:
    """``host ci-7 PID 4242, last heartbeat 2026-11-26T18:04:58.123456Z``."""
    parts = []
    if run.owner_host:
        parts.append(f"host {run.owner_host}")
    if run.owner_pid is not None:
        parts.append(f"PID {run.owner_pid}")
    who = " ".join(parts) or "unknown owner"
    beat = format_timestamp(run.heartbeat_at) if run.heartbeat_at else "never"
    return f"{who}, last heartbeat {beat}"
