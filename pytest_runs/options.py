"""Every option of a tracked session, once: its flag, ini key, environment name, default and parser.

Also the exit statuses pytest-runs adds to pytest's own 0-6. Importing this module does
not import the store, so that a session without ``--runs-machine`` stays cheap.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
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
        "--runs-machine", "runs_machine", "PYTEST_RUNS_MACHINE", "NAME[,NAME...]",
        "track this session as a run on target machine NAME (turns pytest-runs on); with several, "
        "take the first that is free",
    ),
    "pool": Option(
        "--runs-pool", "runs_pool", "PYTEST_RUNS_POOL", "POOL",
        "take any free machine of POOL, named in the ini key runs_pools (turns pytest-runs on)",
    ),
    "priority": Option(
        "--runs-priority", "runs_priority", "PYTEST_RUNS_PRIORITY", "N",
        "place in the line of waiting sessions: higher is served first, then first come (default: 0)",
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

    #: For messages: the machine, the machines (``rig-1,rig-2``) or the pool asked for.
    machine: str
    #: The machines that may be taken, in order of preference.
    machines: tuple[str, ...]
    priority: int
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
    def read(cls, lookup: Lookup, invocation_dir: Path, pools: Sequence[str] = ()) -> Settings:
        """Read and check every setting; ``ValueError`` naming the value and where it came from.

        ``pools``: the lines of the ini key ``runs_pools``, ``NAME: MACHINE MACHINE...``.
        """

        def text(name: str) -> str | None:
            found = lookup(name)
            return None if found is None else found[0]

        def seconds(name: str, default: float | None, *, allow_zero: bool = True) -> float | None:
            found = lookup(name)
            if found is None:
                return default
            return parse_seconds(found[0], found[1], allow_zero=allow_zero)

        machine, machines = _machines(lookup, pools)
        on_busy_found = lookup("on_busy") or ("fail", "")
        on_busy = on_busy_found[0].strip().lower()
        if on_busy not in BUSY_POLICIES:
            raise ValueError(f"{on_busy_found[1]} must be one of {', '.join(BUSY_POLICIES)}, not {on_busy!r}")
        heartbeat = seconds("heartbeat", DEFAULT_HEARTBEAT, allow_zero=False)
        lease = seconds("lease", DEFAULT_LEASE, allow_zero=False)
        assert heartbeat is not None and lease is not None
        if lease <= heartbeat:
            raise ValueError(f"--runs-lease ({lease:g}s) must be longer than --runs-heartbeat ({heartbeat:g}s)")
        priority_found = lookup("priority")
        priority = 0
        if priority_found is not None:
            text_value = priority_found[0].strip()
            if not re.fullmatch(r"[+-]?[0-9]{1,9}", text_value):
                raise ValueError(
                    f"{priority_found[1]} must be a whole number (higher is served first), not {text_value!r}"
                )
            priority = int(text_value)
        state_dir = resolve_state_dir(text("state_dir"))
        store_url, store_dir = split_store(text("store"))
        if store_dir is not None:
            state_dir = store_dir
        keep = lookup("keep")
        return cls(
            machine=machine,
            machines=machines,
            priority=priority,
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


def parse_pools(lines: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """The ini key ``runs_pools``: lines of ``NAME: MACHINE MACHINE...``; ``ValueError`` naming a bad line."""
    pools: dict[str, tuple[str, ...]] = {}
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, colon, members = line.partition(":")
        name = name.strip()
        if not colon or not name or not members.split():
            raise ValueError(f"ini runs_pools: {line.strip()!r} is not 'NAME: MACHINE MACHINE...'")
        try:
            pools[name] = tuple(check_machine_name(member) for member in members.replace(",", " ").split())
        except ValueError as error:
            raise ValueError(f"ini runs_pools, pool {name}: {error}") from None
    return pools


def _machines(lookup: Lookup, pool_lines: Sequence[str]) -> tuple[str, tuple[str, ...]]:
    """What to take: (for messages, the machines in order)."""
    machine, pool = lookup("machine"), lookup("pool")
    if machine is not None and pool is not None:
        raise ValueError(f"give {machine[1]} or {pool[1]}, not both")
    if pool is not None:
        pools = parse_pools(pool_lines)
        if pool[0] not in pools:
            known = ", ".join(sorted(pools)) or "none"
            raise ValueError(f"{pool[1]}: no pool {pool[0]!r} in ini runs_pools (pools: {known})")
        return f"pool {pool[0]}", pools[pool[0]]
    assert machine is not None, "tracking is on only with a machine or a pool"
    names = [part.strip() for part in machine[0].split(",")]
    try:
        checked = tuple(dict.fromkeys(check_machine_name(name) for name in names))
    except ValueError as error:
        raise ValueError(f"{machine[1]}: {error}") from None
    return ",".join(checked), checked
