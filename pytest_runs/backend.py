"""The seam between the store's rules and where runs are kept.

:class:`~pytest_runs.store.Store` holds every lifecycle rule (busy, reuse, claim, stale,
fence, release, retention, prune) once. A backend only keeps runs: it opens
*transactions*, and a transaction reads and changes runs without judging them. The
JSON-file backend (:mod:`pytest_runs.filebackend`) is the default; a database backend
implements the same two protocols.

What every backend guarantees:

- **One writer at a time.** Between entering and leaving :meth:`Backend.transaction`, no
  other transaction, in this process or any other, sees or changes the store. Entering
  waits at most the backend's lock timeout, then raises
  :class:`~pytest_runs.errors.StoreLocked`.
- **All or nothing, and durable.** The changes of a transaction become visible together
  when it is left without an exception, and are on stable storage by then; a transaction
  left by an exception, or a process killed inside one, changes nothing.
- **Refusal, never repair.** State that cannot be read (corrupt, unknown, newer format) is
  a :class:`~pytest_runs.errors.StateError` naming where and what, and is left untouched.
- **Copies.** Runs returned by a transaction are the caller's own objects.
- **Cost.** Reading or changing *active* (pending or running) runs costs the same however
  many ended runs are kept; only the calls documented as walking history grow with it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import datetime
from typing import Protocol

from .model import Run
from .queue import Waiter

__all__ = ["Backend", "OwnerLock", "Transaction"]


class OwnerLock(Protocol):
    """What keeps a session's runs alive: held for the session's life, released when its process dies.

    Readers judge a run whose ``owner_token`` is this lock's ``token`` by whether it is held
    (:meth:`Transaction.stale_reason`). A process forked from the holder does not hold it.
    """

    token: str

    def still_held(self) -> bool:
        """Whether it is still held, taking it again if it was lost and is free; never raises."""

    def release(self) -> None:
        """Let go for good, once no active run names this token any more."""

    def drop(self) -> None:
        """Let go, so that a run still naming this token is judged stale at once."""


class Transaction(Protocol):
    """Reads and changes inside one critical section of a :class:`Backend`."""

    def now(self) -> datetime:
        """The store's clock (aware, UTC): every time the rules record comes from it."""

    def stale_reason(self, run: Run) -> str | None:
        """Why the owner of active ``run`` is gone (its liveness lock is free, its own lease ran out), or ``None``."""

    def forget_owner(self, run: Run) -> None:
        """``run`` was reclaimed: drop what kept its owner's liveness, if anything is left."""

    def sweep_owners(self) -> None:
        """Remove liveness leftovers that no active run names and nobody holds."""

    def latest_id(self) -> str | None:
        """The largest run ID the store has ever given out (kept even when that run is deleted)."""

    def active(self) -> list[Run]:
        """Every pending or running run, in insertion order. Never reads history."""

    def get(self, run_id: str) -> Run | None:
        """The run with that ID, active or ended; ``None`` if there is none."""

    def machines(self) -> list[str]:
        """Every machine with a run kept, active or ended, sorted."""

    def last_ended(self, machine: str) -> Run | None:
        """The newest ended run of ``machine`` (the last in run order: creation, imported IDs first), or ``None``."""

    def ended_count(self, machine: str) -> int:
        """How many ended runs of ``machine`` are kept."""

    def oldest_ended(self, machine: str, count: int) -> list[Run]:
        """The ``count`` oldest ended runs of ``machine``, in run order."""

    def ended(self) -> Iterator[Run]:
        """Every ended run, machine by machine, each in run order. Walks history."""

    def newest_first(self) -> Iterator[Run]:
        """Every run, newest ID first (active runs included); lazily, so taking a few is cheap."""

    def waiters(self) -> list[Waiter]:
        """Every session registered as waiting, in no particular order."""

    def put_waiter(self, waiter: Waiter) -> None:
        """Register ``waiter``, or replace the one with its token."""

    def remove_waiter(self, token: str) -> None:
        """Take the waiter with ``token`` out of the line (nothing if it is not in it)."""

    def next_fence(self, machine: str) -> int:
        """Count one more active run on ``machine`` and return its fence; never the same number twice."""

    def add(self, run: Run) -> None:
        """Store a new run, active or ended, whose ID and fence the rules have set."""

    def replace(self, run: Run) -> None:
        """Store ``run`` over the kept run with its ID (an active run may become ended here)."""

    def delete(self, runs: list[Run]) -> None:
        """Remove ended runs from the store."""


class Backend(Protocol):
    """Where a :class:`~pytest_runs.store.Store` keeps its runs."""

    #: For messages: the file, folder or database the runs are kept in.
    location: str
    #: Seconds a transaction waits for the store's lock before :class:`~pytest_runs.errors.StoreLocked`.
    lock_timeout: float
    #: Whether :meth:`wait_for_change` returns as soon as the machine may be free (else it just sleeps).
    wakes_on_change: bool

    def wait_for_change(self, holder: Run, timeout: float) -> bool:
        """Return True when the machine ``holder`` occupies may be free, False after ``timeout`` seconds."""

    def stop_waiting(self) -> None:
        """Let go of whatever :meth:`wait_for_change` kept for the next call."""

    def liveness_lock(self) -> OwnerLock:
        """A new :class:`OwnerLock`, already held; :class:`~pytest_runs.errors.StateError` if it cannot be taken."""

    def transaction(self, *, write: bool, durable: bool = True) -> contextlib.AbstractContextManager[Transaction]:
        """A critical section; its changes are committed when it is left without an exception.

        ``write=False`` promises no changes (a backend may then skip creating anything).
        ``durable=False`` allows a change whose loss in a power cut is harmless (a heartbeat)
        to skip the last flush of its commit; it is still atomic.
        """
