"""The run log: ``<state dir>/runs/<id>/log.jsonl``, one JSON object per line.

Every line has ``ts`` (RFC 3339 UTC, microseconds) and ``event``:

- ``session_start``: ``run_id``, ``machine``, ``fence``, ``test_dir``, ``test_dir_hash``,
  ``pytest_version``, ``args`` (the command line's arguments), ``host``, ``pid``.
- ``report``: one test phase or a failed collection: ``nodeid``, ``when`` (``setup``,
  ``call``, ``teardown``, ``collect``), ``outcome``, ``duration``; ``subtest`` (its message
  and parameters) for a subtest's report; ``worker`` (the xdist worker); for a failure
  ``longrepr`` (the traceback as pytest prints it) and ``sections`` (captured stdout,
  stderr and log, as ``[title, text]`` pairs); for a skip, ``longrepr`` is the reason.
- ``session_finish``: ``status``, ``exit_code``, ``error_code``, ``summary``.

Lines are written with ASCII escapes, so that any text (even a surrogate from a file name
that is not valid UTF-8) stays valid JSON. A write that fails (a full disk) closes the log
with one warning; the session and its tests go on as they would.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import IO, Any

import pytest

from .model import format_timestamp

__all__ = ["RunLog", "report_entry"]


class RunLog:
    """An open run log; :meth:`write` never raises."""

    def __init__(self, handle: IO[str], warn: Callable[[str], None]) -> None:
        self._handle: IO[str] | None = handle
        self._warn = warn

    def write(self, event: str, **fields: Any) -> None:
        """Append one line: ``ts``, ``event``, then ``fields``."""
        if self._handle is None:
            return
        line = {"ts": format_timestamp(datetime.now(UTC)), "event": event, **fields}
        try:
            self._handle.write(json.dumps(line, default=str) + "\n")
            self._handle.flush()
        except (OSError, ValueError) as error:
            self._warn(f"pytest-runs: WARNING: the run log stopped: {error}")
            self.close()

    def close(self) -> None:
        """Close the log; later writes do nothing."""
        if self._handle is not None:
            with contextlib.suppress(OSError):
                self._handle.close()
            self._handle = None


def report_entry(report: pytest.TestReport | pytest.CollectReport) -> dict[str, Any]:
    """The fields of a ``report`` line for one test or collection report."""
    entry: dict[str, Any] = {
        "nodeid": report.nodeid,
        "when": getattr(report, "when", None) or "collect",
        "outcome": report.outcome,
        "duration": getattr(report, "duration", 0.0),
    }
    context = getattr(report, "context", None)  # pytest's own subtests (and pytest-subtests)
    if context is not None:
        entry["subtest"] = {"msg": getattr(context, "msg", None), "kwargs": dict(getattr(context, "kwargs", {}))}
    if report.failed:
        entry["longrepr"] = str(report.longrepr)
        entry["sections"] = [[title, text] for title, text in report.sections]
    elif report.skipped and isinstance(report.longrepr, tuple):
        entry["longrepr"] = report.longrepr[2]
    # xdist marks reports from its workers with the worker's node.
    if (gateway := getattr(getattr(report, "node", None), "gateway", None)) is not None:
        entry["worker"] = gateway.id
    return entry
