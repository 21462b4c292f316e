"""The store's exceptions, shared by the rules and every backend."""

from __future__ import annotations

from .model import Run

__all__ = [
    "ConnectionLost",
    "InvalidTransition",
    "RunEnded",
    "RunNotFound",
    "StateError",
    "StoreLocked",
    "StoreUnreachable",
]


class RunNotFound(LookupError):
    """No run with the requested ID exists in the store."""

    def __init__(self, run_id: str) -> None:
        super().__init__(f"no run with ID {run_id!r}")
        self.run_id = run_id


class StateError(Exception):
    """The state on disk cannot be used; the message names the file and the problem."""


class StoreLocked(StateError):
    """The store's lock stayed taken for longer than the store's ``lock_timeout``."""

    def __init__(self, message: str, holders: list[int]) -> None:
        super().__init__(message)
        #: PIDs that hold the lock file, as far as the kernel tells (may be empty).
        self.holders = holders


class StoreUnreachable(StateError):
    """The store (a database) cannot be reached, or went away mid-call; this call recorded nothing."""


class ConnectionLost(StoreUnreachable):
    """The connection closed inside a transaction: it may or may not have committed.

    The store retries such a call; each change it retries recognises its own earlier effect.
    """


class InvalidTransition(ValueError):
    """An update would break a store invariant (a terminal run changing status, a run changing machine)."""


class RunEnded(Exception):
    """The run has already ended; ``run`` is its stored, terminal record."""

    def __init__(self, run: Run, action: str) -> None:
        super().__init__(
            f"run {run.id} has already ended as {run.status.value}"
            + (f" ({run.error_code})" if run.error_code else "")
            + f"; cannot {action} it"
        )
        self.run = run
