"""Where a session keeps its run for fixtures, and how the controller hands it to xdist workers."""

from __future__ import annotations

import pytest

from .model import Run

__all__ = ["RUN_KEY", "SKIP_KEY", "WORKER_RUN", "WORKER_SKIP"]

#: The run the session is tracked as (controller and workers).
RUN_KEY = pytest.StashKey[Run]()
#: Why every test is skipped (the machine was busy with ``--runs-on-busy=skip``).
SKIP_KEY = pytest.StashKey[str]()
#: The ``workerinput`` keys that carry them to xdist workers.
WORKER_RUN = "pytest_runs_run"
WORKER_SKIP = "pytest_runs_skip"
