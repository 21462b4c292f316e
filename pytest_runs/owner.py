"""Who owns a run.

A session records its owner in its run: host name, the kernel's boot ID (which tells a
reader whether the owner shares its kernel), PID and the process's start time (for
people), the CI job's URL, the token of its liveness lock and its own lease, and a
heartbeat it refreshes while it runs. Whether the owner is alive is
:mod:`pytest_runs.liveness`'s question.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Mapping
from typing import Any

from .liveness import DEFAULT_LEASE
from .model import Run, format_timestamp

__all__ = ["DEFAULT_HEARTBEAT", "DEFAULT_LEASE", "Owner", "ci_job_url", "process_start_time"]

#: Seconds between heartbeats of a running session.
DEFAULT_HEARTBEAT = 15.0

_BOOT_ID_FILE = "/proc/sys/kernel/random/boot_id"


@dataclasses.dataclass(frozen=True)
class Owner:
    """The process that owns a run."""

    host: str
    boot_id: str
    pid: int
    started: str
    ci_url: str = ""
    #: The token of the owner's liveness lock, once it holds one.
    token: str = ""
    #: The owner's lease: how long its heartbeat stays valid for readers on other hosts.
    lease: float = DEFAULT_LEASE

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
            "owner_token": self.token,
            "owner_lease": self.lease,
        }

    def owns(self, run: Run) -> bool:
        """True when ``run`` records this owner (its token, where it has one)."""
        if run.owner_token or self.token:
            return run.owner_token == self.token
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
        fields = proc_stat(pid)
    except FileNotFoundError:
        return None
    except OSError:
        return _exists_without_proc(pid)
    state, start_ticks = fields[0], fields[19]
    if state in ("Z", "X"):
        return None  # killed, not yet reaped: it will never run again
    return start_ticks


def proc_stat(pid: int | str) -> list[str]:
    """The fields of ``/proc/PID/stat`` from the state (field 3) on; ``OSError`` if it cannot be read."""
    with open(f"/proc/{pid}/stat", "rb") as handle:
        stat = handle.read().decode("ascii", "replace")
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    return stat[stat.rfind(")") + 2 :].split()


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
