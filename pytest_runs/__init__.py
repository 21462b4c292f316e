"""pytest-runs: track every pytest session as a run on a named target machine."""

from .model import PrepareOutcome, Run, Status
from .store import InvalidTransition, MachineState, RunEnded, RunNotFound, StateError, Store

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
]
