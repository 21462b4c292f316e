"""The run record and its public JSON contract.

A :class:`Run` serialises to a JSON object whose keys, order and value types are a
public contract read by other tools: snake_case keys, ``null`` for unset pointers,
RFC 3339 UTC timestamps with microseconds, ``batch_id``/``plan_entry`` and the
owner fields left out when empty, and unknown keys carried through untouched.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

__all__ = [
    "OPTIONAL_KEYS",
    "PrepareOutcome",
    "Run",
    "Status",
    "format_timestamp",
    "in_run_order",
    "parse_timestamp",
    "run_created_at",
    "run_order",
]


class Status(enum.StrEnum):
    """Lifecycle state of a run. The string values are the JSON contract."""

    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    INTERRUPTED = "interrupted"
    TIMEOUT = "timeout"

    @property
    def is_terminal(self) -> bool:
        """True once the run has ended; a terminal run never transitions again."""
        return self not in (Status.PENDING, Status.RUNNING)


class PrepareOutcome(enum.Enum):
    """What :meth:`Store.prepare_atomic <pytest_runs.Store.prepare_atomic>` did."""

    #: A fresh pending run was created; the returned run is new.
    CREATED = "created"
    #: A non-terminal run with the same (machine, hash) exists; it is returned.
    REUSE = "reuse"
    #: The machine holds a non-terminal run for another hash; the occupying run is returned.
    BUSY = "busy"


def format_timestamp(moment: datetime) -> str:
    """RFC 3339 in UTC with microseconds and a ``Z``: ``2026-11-26T18:04:58.123456Z``."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"timestamp {moment.isoformat()} has no time zone; use an aware datetime")
    return moment.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def parse_timestamp(text: str) -> datetime:
    """Read an RFC 3339 timestamp (any offset, any fraction length) as an aware UTC datetime."""
    try:
        moment = datetime.fromisoformat(text)
    except (TypeError, ValueError):
        raise ValueError(f"not an RFC 3339 timestamp: {text!r}") from None
    if moment.tzinfo is None:
        raise ValueError(f"timestamp {text!r} has no time zone offset")
    return moment.astimezone(UTC)


# Store-generated IDs: ``YYYYMMDD-HHMMSS-ffffff-<random hex>``, creation time in UTC.
_GENERATED_ID = re.compile(r"^(\d{8})-(\d{6})-(\d{6})-[0-9a-f]+$")


def run_created_at(run_id: str) -> datetime | None:
    """When a store-generated run ID was created (IDs embed it), else ``None``."""
    match = _GENERATED_ID.match(run_id)
    if match is None:
        return None
    day, clock, micro = match.groups()
    try:
        # By hand: strptime's first call imports _strptime, a few ms of every session's start.
        return datetime(int(day[:4]), int(day[4:6]), int(day[6:]), int(clock[:2]), int(clock[2:4]),
                        int(clock[4:]), int(micro), tzinfo=UTC)  # fmt: skip
    except ValueError:
        return None


def run_order(run_id: str) -> tuple[bool, str]:
    """The order of runs: IDs this store generated, in creation order, after any others (imported ones)."""
    return _GENERATED_ID.match(run_id) is not None, run_id


def in_run_order(run: Run) -> tuple[bool, str]:
    """:func:`run_order` of a run, as a sort key."""
    return run_order(run.id)


# Keys written only when they hold a value, so that the JSON of a plain single run
# is the same as before batches and owners existed.
OPTIONAL_KEYS = frozenset(
    {
        "batch_id",
        "plan_entry",
        "owner_host",
        "owner_boot_id",
        "owner_pid",
        "owner_started",
        "heartbeat_at",
        "owner_ci_url",
        "owner_token",
        "owner_lease",
        "fence",
        "summary",
        "waited_since",
        "released_by",
    }
)
# Ten years: longer leases overflow date arithmetic, and no owner needs one.
_MAX_LEASE = 10 * 365 * 86400.0
_TIMESTAMP_KEYS = frozenset({"started_at", "ended_at", "heartbeat_at", "waited_since"})
_OPTIONAL_INT_KEYS = frozenset({"exit_code", "owner_pid", "fence"})


@dataclasses.dataclass
class Run:
    """The persisted record of one test dispatch on one machine.

    The dataclass fields are exactly the JSON keys, in JSON order. ``exit_code``,
    ``started_at`` and ``ended_at`` stay ``None`` while the run is pending.
    """

    id: str = ""
    machine: str = ""
    test_dir: str = ""
    test_dir_hash: str = ""
    status: Status = Status.PENDING
    exit_code: int | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    artifacts_path: str = ""
    logs_path: str = ""
    error_code: str = ""
    error_msg: str = ""
    batch_id: str = ""
    plan_entry: str = ""
    #: Hostname of the process that owns (runs) this run.
    owner_host: str = ""
    #: The kernel boot ID of the owner's host, so that a reboot is noticed.
    owner_boot_id: str = ""
    #: PID of the owning process.
    owner_pid: int | None = None
    #: Start time of the owning process (clock ticks since boot), so a reused PID is not mistaken for it.
    owner_started: str = ""
    #: Last time the owner proved it was alive.
    heartbeat_at: datetime | None = None
    #: The CI job's URL when the owner runs in CI.
    owner_ci_url: str = ""
    #: Names the owner's liveness lock, ``<state dir>/owners/<token>.lock``, which the owner
    #: holds for as long as it lives; a reader on the same kernel judges the owner by it.
    owner_token: str = ""
    #: The owner's own lease in seconds: how long its heartbeat stays valid for readers that
    #: cannot observe its liveness lock (another host). No reader's setting replaces it.
    owner_lease: float | None = None
    #: Grows by one with each run that becomes active on this machine, never reused: a rig
    #: controller can refuse any holder whose fence is older than the newest it has seen.
    fence: int | None = None
    #: How the session ended, as pytest counted it: ``{"text": "3 passed, 1 skipped",
    #: "counts": {"passed": 3, "skipped": 1}, "duration": 4.021}`` (seconds).
    summary: dict[str, Any] | None = None
    #: When the session that runs it began to wait for a machine (only for one that waited).
    waited_since: datetime | None = None
    #: Who ended it with ``release``: ``user@host`` (only for a released run).
    released_by: str = ""

    def __post_init__(self) -> None:
        # Not a dataclass field: the fields are exactly the contract's keys. Keys written by
        # a newer version live here so that they survive a round trip through this one.
        self.unknown_keys: dict[str, Any] = {}

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of the run contract: plain JSON types, keys in contract order."""
        out: dict[str, Any] = {}
        for field in _CONTRACT_FIELDS:
            value = getattr(self, field.name)
            if field.name in OPTIONAL_KEYS and value in ("", None):
                continue
            if isinstance(value, Status):
                value = value.value
            elif isinstance(value, datetime):
                value = format_timestamp(value)
            out[field.name] = value
        for key, value in self.unknown_keys.items():
            out.setdefault(key, value)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Run:
        """Read a run from its JSON object; raises ``ValueError`` naming the bad key."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a run must be a JSON object, not {type(data).__name__}")
        values: dict[str, Any] = {}
        unknown: dict[str, Any] = {}
        for key, value in data.items():
            if key not in _FIELD_NAMES:
                unknown[key] = value
            else:
                values[key] = _decode(key, value)
        run = cls(**values)
        run.unknown_keys = unknown
        return run

    @property
    def short_hash(self) -> str:
        """The first 12 hex digits of ``test_dir_hash``, for people."""
        return self.test_dir_hash[:12]


_CONTRACT_FIELDS = dataclasses.fields(Run)
_FIELD_NAMES = frozenset(f.name for f in _CONTRACT_FIELDS)


def _decode(key: str, value: Any) -> Any:
    if key == "status":
        try:
            return Status(value)
        except ValueError:
            known = ", ".join(s.value for s in Status)
            raise ValueError(f"unknown status {value!r} (known: {known})") from None
    if key in _TIMESTAMP_KEYS:
        if value is None:
            return None
        if not isinstance(value, str):
            raise ValueError(f"{key} must be a timestamp string or null, not {value!r}")
        try:
            return parse_timestamp(value)
        except ValueError as error:
            raise ValueError(f"{key}: {error}") from None
    if key == "owner_lease":
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= _MAX_LEASE:
            raise ValueError(f"owner_lease must be a number of seconds from 0 to ten years, or null, not {value!r}")
        return float(value)
    if key == "summary":
        if value is not None and not isinstance(value, dict):
            raise ValueError(f"summary must be an object or null, not {value!r}")
        return value
    if key in _OPTIONAL_INT_KEYS:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"{key} must be an integer or null, not {value!r}")
        return value
    if value is None and key in OPTIONAL_KEYS:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{key} must be a string, not {value!r}")
    return value
