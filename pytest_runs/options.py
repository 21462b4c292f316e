"""Every option of a tracked session, once: its flag, ini key, environment name, default and parser.

Also the exit statuses pytest-runs adds to pytest's own 0-6. Importing this module does
not import the store, so that a session without ``--runs-machine`` stays cheap.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .liveness import DEFAULT_LEASE
from .owner import DEFAULT_HEARTBEAT
from .settings import (
    DEFAULT_LOCK_TIMEOUT,
    KEEP_ENV,
    LEASE_ENV,
    LOCK_TIMEOUT_ENV,
    STATE_DIR_ENV,
    STORE_ENV,
    check_machine_name,
    parse_keep,
    parse_seconds,
    resolve_state_dir,
    split_store,
)

__all__ = [
    "BUSY_POLICIES",
    "EXIT_BUSY",
    "EXIT_MACHINE_LOST",
    "EXIT_STORE_UNREACHABLE",
    "OPTIONS",
    "Option",
    "Settings",
]

#: Exit status when the machine is busy, or its store locked (EX_TEMPFAIL, "try again later").
EXIT_BUSY = 75
#: Exit status of a session that lost its machine while it ran (released or reclaimed).
EXIT_MACHINE_LOST = 76
#: Exit status when the store (a database) cannot be reached at the start: no test ran (EX_UNAVAILABLE).
EXIT_STORE_UNREACHABLE = 69
#: pytest's status for an interrupted session, which a forced stop ends with too.
EXIT_INTERRUPTED = 2

BUSY_POLICIES = ("fail", "skip", "wait")
#: Set by a tracked session for its tests (and every process they start).
RUN_ID_ENV = "PYTEST_RUNS_RUN_ID"
FENCE_ENV = "PYTEST_RUNS_FENCE"
DEFAULT_GRACE = 10.0
DEFAULT_WAIT_TIMEOUT = 3600.0


@dataclasses.dataclass(frozen=True)
class Option:
    """One setting: where it can be given, and what it means."""

    flag: str
    ini: str | None
    env: str | None
    metavar: str
    help: str


OPTIONS = {
    "machine": Option(
        "--runs-machine", "runs_machine", "PYTEST_RUNS_MACHINE", "NAME",
        "track this session as a run on target machine NAME (turns pytest-runs on)",
    ),
    "state_dir": Option(
        "--runs-state-dir", "runs_state_dir", STATE_DIR_ENV, "DIR",
        "the run store (default: $XDG_STATE_HOME/pytest-runs, else ~/.local/state/pytest-runs)",
    ),
    "store": Option(
        "--runs-store", "runs_store", STORE_ENV, "URL",
        "where runs are kept: postgresql://... for a database shared by many hosts (needs the postgres "
        "extra), or a folder or file: URL for the JSON files (default: the state dir)",
    ),
    "on_busy": Option(
        "--runs-on-busy", "runs_on_busy", "PYTEST_RUNS_ON_BUSY", "fail|skip|wait",
        f"when the machine is busy: fail (exit {EXIT_BUSY}), skip every test, or wait (default: fail)",
    ),
    "wait_timeout": Option(
        "--runs-wait-timeout", "runs_wait_timeout", "PYTEST_RUNS_WAIT_TIMEOUT", "SECONDS",
        "with --runs-on-busy=wait: give up (as fail does) after SECONDS (default: 3600)",
    ),
    "test_dir": Option(
        "--runs-test-dir", "runs_test_dir", None, "PATH",
        "the folder whose content identifies the run (default: the ini file's folder, else the common "
        "folder of the test arguments, else the current folder)",
    ),
    "timeout": Option(
        "--runs-timeout", "runs_timeout", "PYTEST_RUNS_TIMEOUT", "SECONDS",
        "deadline for the session once the run starts; past it the session stops and the run ends as timeout",
    ),
    "grace": Option(
        "--runs-grace", "runs_grace", "PYTEST_RUNS_GRACE", "SECONDS",
        "after a deadline, an interrupt or a lost machine, how long the session may take to stop "
        "before it is ended by force (default: 10)",
    ),
    "heartbeat": Option(
        "--runs-heartbeat", "runs_heartbeat", "PYTEST_RUNS_HEARTBEAT", "SECONDS",
        "seconds between the session's heartbeats, which also check it still holds its machine (default: 15)",
    ),
    "lease": Option(
        "--runs-lease", "runs_lease", LEASE_ENV, "SECONDS",
        "this session's lease, recorded in its run: for readers on other hosts, its run is stale once "
        "its heartbeat is older than this (default: 300)",
    ),
    "lock_timeout": Option(
        "--runs-lock-timeout", "runs_lock_timeout", LOCK_TIMEOUT_ENV, "SECONDS",
        f"how long to wait for the store's lock before giving up (exit {EXIT_BUSY}; default: 10)",
    ),
    "keep": Option(
        "--runs-keep", "runs_keep", KEEP_ENV, "N",
        "retention: as runs end, keep only the N newest ended runs of each machine and delete older "
        "ones with their logs and artifacts (default: keep all)",
    ),
    "batch": Option(
        "--runs-batch", None, "PYTEST_RUNS_BATCH", "ID", "record the run as part of batch ID (batch_id)",
    ),
    "plan_entry": Option(
        "--runs-plan-entry", None, "PYTEST_RUNS_PLAN_ENTRY", "NAME",
        "record the plan entry this run fulfils (plan_entry)",
    ),
}  # fmt: skip


#: Reads one setting: its value and the name of where it came from, or ``None`` if unset.
Lookup = Callable[[str], "tuple[str, str] | None"]


def lookup_for(
    option_value: Callable[[str], Any], ini_value: Callable[[str], Any], environ: Mapping[str, str]
) -> Lookup:
    """A :data:`Lookup` over the command line, then the environment, then the ini file."""

    def lookup(name: str) -> tuple[str, str] | None:
        option = OPTIONS[name]
        value = option_value(f"runs_{name}")
        if value is not None:
            return str(value), option.flag
        if option.env and environ.get(option.env):
            return environ[option.env], option.env
        if option.ini and (value := ini_value(option.ini)):
            return str(value), f"ini {option.ini}"
        return None

    return lookup


@dataclasses.dataclass(frozen=True)
class Settings:
    """A tracked session's settings, checked; ``test_dir`` is resolved by the caller."""

    machine: str
    state_dir: Path
    #: A database URL, or ``None`` for the JSON files in ``state_dir``.
    store_url: str | None
    on_busy: str
    wait_timeout: float
    timeout: float | None
    grace: float
    heartbeat: float
    lease: float
    lock_timeout: float
    keep: int | None
    batch: str
    plan_entry: str

    @classmethod
    def read(cls, lookup: Lookup, invocation_dir: Path) -> Settings:
        """Read and check every setting; ``ValueError`` naming the value and where it came from."""

        def text(name: str) -> str | None:
            found = lookup(name)
            return None if found is None else found[0]

        def seconds(name: str, default: float | None, *, allow_zero: bool = True) -> float | None:
            found = lookup(name)
            if found is None:
                return default
            return parse_seconds(found[0], found[1], allow_zero=allow_zero)

        machine = lookup("machine")
        assert machine is not None, "tracking is on only with a machine"
        on_busy_found = lookup("on_busy") or ("fail", "")
        on_busy = on_busy_found[0].strip().lower()
        if on_busy not in BUSY_POLICIES:
            raise ValueError(f"{on_busy_found[1]} must be one of {', '.join(BUSY_POLICIES)}, not {on_busy!r}")
        heartbeat = seconds("heartbeat", DEFAULT_HEARTBEAT, allow_zero=False)
        lease = seconds("lease", DEFAULT_LEASE, allow_zero=False)
        assert heartbeat is not None and lease is not None
        if lease <= heartbeat:
            raise ValueError(f"--runs-lease ({lease:g}s) must be longer than --runs-heartbeat ({heartbeat:g}s)")
        try:
            machine_name = check_machine_name(machine[0])
        except ValueError as error:
            raise ValueError(f"{machine[1]}: {error}") from None
        state_dir = resolve_state_dir(text("state_dir"))
        store_url, store_dir = split_store(text("store"))
        if store_dir is not None:
            state_dir = store_dir
        keep = lookup("keep")
        return cls(
            machine=machine_name,
            state_dir=(invocation_dir / state_dir).absolute(),
            store_url=store_url,
            on_busy=on_busy,
            wait_timeout=seconds("wait_timeout", DEFAULT_WAIT_TIMEOUT) or 0.0,
            timeout=seconds("timeout", None, allow_zero=False),
            grace=seconds("grace", DEFAULT_GRACE, allow_zero=False) or DEFAULT_GRACE,
            heartbeat=heartbeat,
            lease=lease,
            lock_timeout=seconds("lock_timeout", DEFAULT_LOCK_TIMEOUT, allow_zero=False) or DEFAULT_LOCK_TIMEOUT,
            keep=None if keep is None else parse_keep(keep[0], keep[1]),
            batch=text("batch") or "",
            plan_entry=text("plan_entry") or "",
        )
