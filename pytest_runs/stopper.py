"""Stopping a session: politely first, then for certain.

A stop is requested by a signal (SIGINT, SIGTERM), by the session's deadline or by the
loss of its machine. The first request wins and is never replaced. It interrupts the
main thread (a ``KeyboardInterrupt``, pytest's own way to stop) and arms the grace
through ``arm`` (the session's keeper process keeps it, see :mod:`pytest_runs.keeper`);
only where ``arm`` cannot, a watchdog thread keeps it here. When the grace is over
(:meth:`Stopper.end_now`, or the watchdog), because a test swallowed the interrupt,
ignores signals or hangs in teardown, the end is recorded through ``force``, every
process the session started is killed (``spare`` excepted) and the process ends with
the request's exit status. Repeated signals while a stop is under way are absorbed with
one line, so that a second Ctrl-C (or ``timeout``'s second SIGTERM) can never turn an
interrupted session into a traceback or a success.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import os
import re
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Collection, Iterator
from types import FrameType
from typing import Any

from .owner import proc_stat

__all__ = ["StopKind", "StopRequest", "Stopper", "children", "descendants"]

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopKind(enum.Enum):
    """Why a session stops."""

    INTERRUPTED = "interrupted"
    TIMEOUT = "timeout"
    LOST = "lost"


@dataclasses.dataclass(frozen=True)
class StopRequest:
    """The first stop requested: its kind, one line of reason, and the exit status if forced."""

    kind: StopKind
    reason: str
    exit_status: int


class Stopper:
    """Signal handlers, the main-thread interrupt, and the watchdog that ends a stuck session.

    ``force(request)`` runs on the watchdog thread when the grace is over: it must record
    what it can quickly and return; the process then ends with ``request.exit_status``.
    ``say(line)`` writes one line where the user sees it, from any thread.
    """

    def __init__(
        self,
        *,
        grace: float,
        force: Callable[[StopRequest], None],
        say: Callable[[str], None],
        interrupted_status: int,
        arm: Callable[[StopRequest], bool] | None = None,
        spare: Callable[[], Collection[int]] = frozenset,
    ) -> None:
        self.grace = grace
        self._force = force
        self._say = say
        self._interrupted_status = interrupted_status
        self._arm = arm
        self._spare = spare
        # Reentrant: a signal handler may request a stop while the main thread records another.
        self._guard = threading.RLock()
        self._request: StopRequest | None = None
        self._watchdog: threading.Timer | None = None
        self._previous: dict[int, Any] = {}
        self._main_ident = threading.main_thread().ident
        self._own_interrupt = False
        self._deferring = 0
        self._deferred = False
        self._ending = False

    @property
    def request(self) -> StopRequest | None:
        """The first stop requested, or ``None``."""
        return self._request

    def install(self) -> None:
        """Take over SIGINT and SIGTERM (main thread only; elsewhere this does nothing)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in _SIGNALS:
            self._previous[signum] = signal.signal(signum, self._on_signal)

    def ignored(self) -> list[int]:
        """The signals that were ignored before :meth:`install` (and so stay ignored)."""
        return [signum for signum, previous in self._previous.items() if previous == signal.SIG_IGN]

    def uninstall(self) -> None:
        """Give SIGINT and SIGTERM back to their previous handlers."""
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def stop(self, kind: StopKind, reason: str, exit_status: int) -> bool:
        """Request a stop from any thread: interrupt the main thread and arm the watchdog.

        Returns ``False`` (and changes nothing) if a stop was already requested.
        """
        __tracebackhide__ = True
        if not self._record(StopRequest(kind, reason, exit_status)):
            return False
        # Nobody else signals them: stop the session's children too (xdist workers start no
        # further test; a test's own subprocesses end with it). First: called on the main
        # thread (a signal handler), the interrupt below raises right there.
        spared = self._spare()
        for child in children(os.getpid()):
            if child not in spared:
                with contextlib.suppress(OSError):
                    os.kill(child, signal.SIGINT)
        self._interrupt_main()
        return True

    def disarm(self) -> None:
        """The session has ended by itself: the watchdog is not needed any more."""
        with self._guard:
            if self._watchdog is not None:
                self._watchdog.cancel()
                self._watchdog = None

    def ending(self) -> None:
        """The session is recording its end: from now on signals are noted (the first one still
        counts as a stop request) but never raised, since nothing is left to interrupt."""
        self._ending = True

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Hold interrupts back (they are noted, then raised on leaving) around bookkeeping that must not tear."""
        self._deferring += 1
        try:
            yield
        finally:
            self._deferring -= 1
        if not self._deferring and self._deferred:
            self._deferred = False
            raise KeyboardInterrupt(self._request.reason if self._request else "interrupted")

    # -- internals --------------------------------------------------------------------

    def _record(self, request: StopRequest) -> bool:
        with self._guard:
            if self._request is not None:
                return False
            self._request = request
        if self._arm is not None and self._arm(request):
            return True  # the grace is kept outside this process (the keeper)
        with self._guard:
            self._watchdog = threading.Timer(self.grace, self._end_for_certain)
            self._watchdog.daemon = True
            self._watchdog.start()
        return True

    def end_now(self) -> None:
        """The grace is over (the keeper says so): record what can be recorded and end the process now."""
        if self._request is not None:
            self._end_for_certain()

    def _interrupt_main(self) -> None:
        __tracebackhide__ = True
        if not self._previous or self._main_ident is None:
            # No handler of ours to receive it (not installed from the main thread): the
            # watchdog alone ends the session.
            return
        self._own_interrupt = True
        with contextlib.suppress(OSError, ValueError):
            signal.pthread_kill(self._main_ident, signal.SIGINT)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        __tracebackhide__ = True  # pytest then shows where the test was interrupted, not this handler
        if signum == signal.SIGINT and self._own_interrupt:
            self._own_interrupt = False
            self._raise(frame)
            return
        previous = self._previous.get(signum)
        if previous == signal.SIG_IGN:
            return  # ignored before us (SIGINT in a background job): it stays ignored
        name = signal.Signals(signum).name
        if not self._record(StopRequest(StopKind.INTERRUPTED, f"interrupted by {name}", self._interrupted_status)):
            if self._ending:
                self._say(
                    f"pytest-runs: {name} received while the session records its end; it ends within {self.grace:g}s"
                )
            else:
                reason = self._request.reason if self._request else ""
                self._say(f"pytest-runs: {name} received while stopping ({reason}); it ends within {self.grace:g}s")
            return
        if callable(previous) and previous is not signal.default_int_handler:
            previous(signum, frame)  # a handler of the user's: let it decide, the watchdog is armed
            return
        self._raise(frame)

    def _raise(self, frame: FrameType | None) -> None:
        __tracebackhide__ = True
        if self._ending:
            return
        reason = self._request.reason if self._request else "interrupted"
        _pass_through_old_style_wrappers(reason)
        if self._deferring:
            self._deferred = True
            return
        raise KeyboardInterrupt(reason)

    def _end_for_certain(self) -> None:
        request = self._request
        assert request is not None
        self._say(f"pytest-runs: the session did not stop within {self.grace:g}s ({request.reason}); ending it")
        try:
            self._force(request)
        finally:
            _flush_quickly()
            spared = self._spare()
            for pid in descendants(os.getpid()):
                if pid not in spared:
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
            os._exit(request.exit_status)


def _pass_through_old_style_wrappers(reason: str) -> None:
    """Let this interrupt pass through other plugins' old-style hook wrappers as the interrupt it is.

    pluggy warns (``PluggyTeardownRaisedWarning``) when an exception leaves the teardown of an
    old-style ``hookwrapper`` (hypothesis's ``(yield).get_result()`` re-raises it); under
    ``filterwarnings = error`` that warning is raised instead of the ``KeyboardInterrupt``, which
    pytest then reports as an INTERNALERROR (exit 3) or a failed test. The warning for this very
    interrupt is ignored: it says nothing about the plugin, and pluggy then re-raises the interrupt.
    """
    try:
        from pluggy import PluggyTeardownRaisedWarning
    except ImportError:  # pragma: no cover - a pluggy without the warning
        return
    # pluggy's message has a line "<type>: <message>" of the exception.
    message = rf"(?sm).*^KeyboardInterrupt: {re.escape(reason)}$"
    warnings.filterwarnings("ignore", message=message, category=PluggyTeardownRaisedWarning)


def _flush_quickly() -> None:
    # The main thread may be blocked writing to a full pipe: never wait on it for long.
    flusher = threading.Thread(target=_flush_streams, daemon=True)
    flusher.start()
    flusher.join(1.0)


def _flush_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def children(pid: int) -> list[int]:
    """The live children of process ``pid`` (Linux ``/proc``; empty elsewhere)."""
    return _process_tree().get(pid, [])


def descendants(pid: int) -> list[int]:
    """Every live descendant of process ``pid`` (Linux ``/proc``; empty elsewhere), children first."""
    parents = _process_tree()
    found: list[int] = []
    frontier = [pid]
    while frontier:
        kids = parents.get(frontier.pop(), [])
        found.extend(kids)
        frontier.extend(kids)
    return found


def _process_tree() -> dict[int, list[int]]:
    """Each process's children, by parent PID."""
    parents: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return {}
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            fields = proc_stat(entry)
        except OSError:
            continue
        if len(fields) > 1 and fields[1].isdigit():
            parents.setdefault(int(fields[1]), []).append(int(entry))
    return parents
