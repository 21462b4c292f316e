"""The line of sessions waiting for a machine: who waits, for which machines, in what order.

A waiting session is registered in the store as a :class:`Waiter`. Machines are handed out
first by priority (higher first), then by arrival (the store's clock), then by token. A
waiter is judged alive by the same rule as a run's owner (its liveness lock, else its own
lease against its heartbeat), so a dead waiter leaves the line without anyone waiting
behind it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from .model import Run, Status, format_timestamp, parse_timestamp

__all__ = ["Waiter", "place_in_line", "serve_order"]


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

    @property
    def token(self) -> str:
        return self.run.owner_token

    def wants(self, machine: str) -> bool:
        return machine in self.machines

    def as_owner(self) -> Run:
        """A stand-in run that liveness rules judge exactly as they judge this waiter."""
        return dataclasses.replace(self.run, status=Status.PENDING)

    def to_dict(self) -> dict[str, Any]:
        return {
            "machines": list(self.machines),
            "priority": self.priority,
            "since": format_timestamp(self.since),
            "run": self.run.to_dict(),
        }

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
        return cls(machines=machines, priority=priority, since=parse_timestamp(since), run=run)


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
