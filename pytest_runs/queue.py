"""The line of sessions waiting for a machine: who waits, for which machines, in what order.

A waiting session is registered in the store as a :class:`Waiter`. Machines are handed out
first by priority (higher first), then by arrival (the store's clock), then by token. A
waiter is judged alive by the same rule as a run's owner (its liveness lock, else its own
lease against its heartbeat), so a dead waiter leaves the line without anyone waiting
behind it.

A machine handed to a waiter is a pending run in its name; the waiter stays in line until it
claims that run (:meth:`~pytest_runs.store.Store.start`). A waiter that is alive but does not
claim it within :data:`CLAIM_DEADLINE` seconds (stopped, frozen, swapped out) has the machine
taken back and handed to the next waiter; it keeps its place, and is passed over by hand-overs
until it looks at the store again, when it waits first in line as before.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from .model import Run, Status, format_timestamp, parse_timestamp

__all__ = ["CLAIM_DEADLINE", "InLine", "Waiter", "place_in_line", "serve_order"]

#: Seconds a waiter has to claim a machine handed to it. A live waiter looks within about a
#: second of the hand-over (it is woken by the change) and claims at once; one that has not
#: claimed it this long after is stopped or frozen, and the machine goes on to the next.
CLAIM_DEADLINE = 15.0


@dataclasses.dataclass
class Waiter:
    """A session waiting for one of ``machines``; ``run`` is the pending run it would start."""

    machines: list[str]
    priority: int
    #: When it joined the line, on the store's clock.
    since: datetime
    #: Its tests (``test_dir``, ``test_dir_hash``) and its owner fields, with ``heartbeat_at``
    #: refreshed each time it looks; ``machine`` is empty until one is handed to it.
    run: Run
    #: When a machine was handed to it (a pending run in its name), on the store's clock, while
    #: it has not claimed it.
    handed_at: datetime | None = None
    #: When a machine handed to it went on to the next waiter because it did not claim it in
    #: time; until it looks again, hand-overs pass it by (it keeps its place all the same).
    passed_over: datetime | None = None

    @property
    def token(self) -> str:
        return self.run.owner_token

    def wants(self, machine: str) -> bool:
        return machine in self.machines

    def as_owner(self) -> Run:
        """A stand-in run that liveness rules judge exactly as they judge this waiter."""
        return dataclasses.replace(self.run, status=Status.PENDING)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "machines": list(self.machines),
            "priority": self.priority,
            "since": format_timestamp(self.since),
            "run": self.run.to_dict(),
        }
        for key in ("handed_at", "passed_over"):
            if (moment := getattr(self, key)) is not None:
                data[key] = format_timestamp(moment)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Waiter:
        """Read a waiter; ``ValueError`` naming what is wrong."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a waiter must be an object, not {type(data).__name__}")
        machines, priority, since = data.get("machines"), data.get("priority"), data.get("since")
        if not isinstance(machines, list) or not machines or not all(isinstance(m, str) and m for m in machines):
            raise ValueError("a waiter's machines must be a non-empty list of names")
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise ValueError(f"a waiter's priority must be an integer, not {priority!r}")
        if not isinstance(since, str):
            raise ValueError(f"a waiter's since must be a timestamp, not {since!r}")
        run = Run.from_dict(data.get("run") or {})
        if not run.owner_token:
            raise ValueError("a waiter must name its liveness token")
        moments: dict[str, datetime | None] = {}
        for key in ("handed_at", "passed_over"):
            value = data.get(key)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"a waiter's {key} must be a timestamp, not {value!r}")
            moments[key] = parse_timestamp(value) if value is not None else None
        return cls(machines=machines, priority=priority, since=parse_timestamp(since), run=run, **moments)


def serve_order(waiters: Iterable[Waiter]) -> list[Waiter]:
    """``waiters`` in the order they are served: higher priority first, then first come."""
    return sorted(waiters, key=lambda w: (-w.priority, w.since, w.token))


def place_in_line(waiters: Iterable[Waiter], token: str) -> int | None:
    """1 + how many waiters, served before ``token``'s, want one of its machines; ``None`` if not in line."""
    ordered = serve_order(waiters)
    for index, waiter in enumerate(ordered):
        if waiter.token == token:
            mine = set(waiter.machines)
            return 1 + sum(1 for ahead in ordered[:index] if mine & set(ahead.machines))
    return None


@dataclasses.dataclass(frozen=True)
class InLine:
    """One waiter as the ``queue`` command shows it."""

    waiter: Waiter
    #: Its place among those still waiting, in serve order; ``None`` while a machine is handed to it.
    place: int | None
    #: The machine handed to it and not claimed yet (a pending run in its name), or ``None``.
    handed: Run | None = None
    #: For how many seconds it has not claimed ``handed``.
    unclaimed_for: float | None = None
