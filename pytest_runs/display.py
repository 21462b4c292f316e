"""How runs are described to people: durations, ages and who holds a machine."""

from __future__ import annotations

from datetime import UTC, datetime

from .liveness import unprobed
from .model import Run, format_timestamp, run_created_at

__all__ = [
    "describe_holder",
    "describe_unclaimed",
    "format_ago",
    "format_duration",
    "held_for",
    "held_since",
    "owner_of",
]


def format_duration(seconds: float) -> str:
    """``42s``, ``3m12s``, ``2h05m``, ``3d04h``: short, and exact enough for people."""
    whole = max(0, int(seconds))
    if whole < 60:
        return f"{whole}s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def format_ago(moment: datetime | None, now: datetime | None = None) -> str:
    """``just now``, ``42 s ago``, ``3 min ago``, ``5 h ago``, ``2 d ago``; ``-`` for none."""
    if moment is None:
        return "-"
    seconds = ((now or datetime.now(UTC)) - moment).total_seconds()
    if seconds < 0:
        return "in the future"
    if seconds < 5:
        return "just now"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{int(seconds // size)} {unit} ago"
    return f"{int(seconds)} s ago"


def held_since(run: Run) -> datetime | None:
    """When a run took its machine: its start, or for a pending run its creation."""
    return run.started_at or run_created_at(run.id)


def held_for(run: Run, now: datetime | None = None) -> str:
    """How long ``run`` has held its machine, as :func:`format_duration` writes it; ``?`` if unknown."""
    since = held_since(run)
    return "?" if since is None else format_duration(((now or datetime.now(UTC)) - since).total_seconds())


def describe_holder(run: Run, now: datetime | None = None) -> str:
    """``run ID (running, hash 0123456789ab, held for 3m12s since ..., by host ci-7 PID 42, batch b, CI url)``.

    Who holds a machine, for the person who wanted it: since when, which host and process,
    which batch and CI job, as far as the run records them.
    """
    held = f"held for {held_for(run, now)}"
    if (since := held_since(run)) is not None:
        held += f" since {format_timestamp(since)}"
    parts = [run.status.value, f"hash {run.short_hash}", held]
    if who := owner_of(run):
        parts.append(f"by {who}")
    if run.batch_id:
        parts.append(f"batch {run.batch_id}")
    if run.owner_ci_url:
        parts.append(f"CI {run.owner_ci_url}")
    return f"run {run.id} ({', '.join(parts)})"


def owner_of(run: Run) -> str:
    """``host ci-7 PID 4242``, as far as the run records it; ``""`` if it does not.

    Says so when this process could not ask its liveness lock (another user's, not shared).
    """
    host = f"host {run.owner_host}" if run.owner_host else ""
    pid = f"PID {run.owner_pid}" if run.owner_pid is not None else ""
    who = " ".join(part for part in (host, pid) if part)
    if run.owner_token and (why := unprobed(run.owner_token)):
        who = f"{who or 'its owner'} ({why})"  # judged by its lease, not its lock: say so
    return who


def describe_unclaimed(seconds: float, deadline: float) -> str:
    """``handed to a waiter that has not claimed it for 12s (it goes to the next waiter after 15s)``."""
    text = f"handed to a waiter that has not claimed it for {format_duration(seconds)}"
    if seconds < deadline:
        return f"{text} (it goes to the next waiter after {format_duration(deadline)})"
    return f"{text} (past the claim deadline of {format_duration(deadline)}: it goes to the next waiter that looks)"
