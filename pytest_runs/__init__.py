"""pytest-runs: track every pytest session as a run on a named target machine.

PYTEST_DONT_REWRITE: a library, not tests; in-process test sessions import it again as a plugin.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .model import PrepareOutcome, Run, Status

if TYPE_CHECKING:
    from .store import InvalidTransition, MachineState, RunEnded, RunNotFound, StateError, Store, StoreLocked

__all__ = [
    "InvalidTransition",
    "MachineState",
    "PrepareOutcome",
    "Run",
    "RunEnded",
    "RunNotFound",
    "StateError",
    "Status",
    "Store",
    "StoreLocked",
]

_FROM_STORE = frozenset(
    {"InvalidTransition", "MachineState", "RunEnded", "RunNotFound", "StateError", "Store", "StoreLocked"}
)


def __getattr__(name: str) -> Any:
    # The store loads on first use, so that a pytest session without
    # --runs-machine, which imports this package for its plugin, does not pay for them.
    if name in _FROM_STORE:
        from . import store

        return getattr(store, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
