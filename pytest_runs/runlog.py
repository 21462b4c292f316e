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

import json
import math
import os
import time
from collections.abc import Callable
from json.encoder import encode_basestring_ascii
from typing import IO, Any

import pytest

from .fds import OwnedFd

__all__ = ["RunLog", "report_entry"]

# One encoder for every line (json.dumps would build one per call); ASCII escapes, as json.dumps writes.
_ENCODER = json.JSONEncoder(default=str)


class RunLog:
    """An open run log; :meth:`write` and :meth:`report` never raise.

    Every line is written through to the file at once (flushed, not fsynced), so that the
    log of a session that dies on a test shows the last phase that ended.
    """

    def __init__(self, handle: IO[str], warn: Callable[[str], None]) -> None:
        # A descriptor checked before each write and the close: a test may close it (os.closerange)
        # and get its number for a file of its own, which the log must never write to nor close.
        self._handle: OwnedFd | None = OwnedFd(os.dup(handle.fileno()))
        handle.close()
        self._warn = warn

    def write(self, event: str, **fields: Any) -> None:
        """Append one line: ``ts``, ``event``, then ``fields``."""
        if self._handle is not None:
            self._append(_ENCODER.encode({"ts": _now(), "event": event, **fields}))

    def report(self, report: pytest.TestReport | pytest.CollectReport) -> None:
        """Append the ``report`` line of one test phase or collection report.

        This runs for every test phase, so a phase that passed, by far the most common, takes
        a short way to the very same line; every other report is encoded from :func:`report_entry`.
        """
        if self._handle is None:
            return
        ts = _now()
        line = _passed_line(ts, report)
        if line is None:
            line = _ENCODER.encode({"ts": ts, "event": "report", **report_entry(report)})
        self._append(line)

    def _append(self, line: str) -> None:
        assert self._handle is not None
        fd = self._handle.fileno()
        if fd is None:
            self._warn("pytest-runs: WARNING: the run log stopped: its descriptor was closed under it (by a test?)")
            self._handle = None
            return
        data = (line + "\n").encode("ascii", "backslashreplace")
        try:
            while data:
                data = data[os.write(fd, data) :]
        except OSError as error:
            self._warn(f"pytest-runs: WARNING: the run log stopped: {error}")
            self.close()

    def close(self) -> None:
        """Close the log (if its descriptor is still its own); later writes do nothing."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None


_PHASES = frozenset({"setup", "call", "teardown"})
# The current second and its text: a session writes many lines a second, each formats only its microseconds.
_second: tuple[int, str] = (-1, "")


def _now() -> str:
    """What ``format_timestamp(datetime.now(UTC))`` gives: ``2026-11-26T18:04:58.123456Z``."""
    global _second
    seconds, micros = divmod(time.time_ns() // 1000, 1_000_000)
    second = _second
    if second[0] != seconds:
        second = _second = (seconds, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)))
    return f"{second[1]}.{micros:06d}Z"


def _passed_line(ts: str, report: pytest.TestReport | pytest.CollectReport) -> str | None:
    """The line of a phase that passed, the very text that encoding :func:`report_entry` gives; else ``None``.

    Strings are escaped by the encoder's own function and the duration written as its
    ``float.__repr__``, as the encoder does for a finite float.
    """
    nodeid, when, duration = report.nodeid, getattr(report, "when", None), getattr(report, "duration", None)
    if (
        report.outcome != "passed"
        or when not in _PHASES
        or type(nodeid) is not str
        or type(duration) is not float
        or not math.isfinite(duration)
        or getattr(report, "context", None) is not None
    ):
        return None
    worker = ""
    if (gateway := getattr(getattr(report, "node", None), "gateway", None)) is not None:
        if type(gateway.id) is not str:
            return None
        worker = f', "worker": {encode_basestring_ascii(gateway.id)}'
    return (
        f'{{"ts": "{ts}", "event": "report", "nodeid": {encode_basestring_ascii(nodeid)}, '
        f'"when": "{when}", "outcome": "passed", "duration": {duration!r}{worker}}}'
    )


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
