"""One tracked session's life: prepare or wait, claim, heartbeat, deadline, finish.

:class:`TrackedSession` is registered as a plugin in the controlling process only
(never in an xdist worker). Its order of events carries the guarantees:

1. It starts its keeper (:mod:`pytest_runs.keeper`), a process of its own that takes the
   liveness lock, then prepares and claims its run, which records the lock's token, the
   session's own lease and the machine's new fence. The session's own process holds no
   lock and runs no thread of pytest-runs while tests run.
2. While it runs, the keeper refreshes the run and checks that it is still this
   session's; a session that lost its machine (released, reclaimed, its record gone, its
   database liveness connection closed, its keeper dead) stops: no further test starts,
   and it exits with :data:`EXIT_MACHINE_LOST`.
3. A deadline (kept by the keeper), a signal or a lost machine stops the session through
   :class:`Stopper`; the keeper ends it by force if it does not stop within the grace.
4. At the end it records how the session ended, and only then does the keeper let go of
   the liveness lock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Generator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import pytest
from _pytest._io import TerminalWriter

from .backend import OwnerLock
from .display import describe_holder, describe_unclaimed, format_duration, held_for
from .errors import StoreUnreachable
from .fds import OwnedFd
from .filebackend import ensure_state_dir
from .hashing import HashError, hash_test_dir
from .keeper_client import WORKER_KEEPER, KeeperClient
from .keys import RUN_KEY, SKIP_KEY, WORKER_RUN, WORKER_SKIP
from .model import PrepareOutcome, Run, Status
from .options import (
    EXIT_BUSY,
    EXIT_INTERRUPTED,
    EXIT_MACHINE_LOST,
    EXIT_STORE_UNREACHABLE,
    FENCE_ENV,
    OPTIONS,
    RUN_ID_ENV,
    Settings,
)
from .owner import Owner
from .queue import Waiter
from .runlog import RunLog
from .settings import mask_url
from .stopper import StopKind, Stopper, StopRequest
from .store import InvalidTransition, Prepared, RunEnded, RunNotFound, StateError, Store, StoreLocked, open_store

__all__ = ["TrackedSession"]
_WAIT_POLL_SECONDS = 0.5
_WAKEUP_WAIT_SECONDS = 1.0
# A waiter on a store that says when it changes looks again at least this often (to keep its
# place in line fresh); in between only its progress line moves.
_LOOK_AGAIN_SECONDS = 10.0
_WAIT_REPORT_EVERY = 30.0
# Leaving the line on the way out waits at most this long for the store's lock (best-effort:
# a waiter that could not leave is found gone by its liveness lock).
_LEAVE_LINE_SECONDS = 1.0


class TrackedSession:
    """The hooks of a tracked session, registered only in the controlling process."""

    def __init__(self, config: pytest.Config, settings: Settings, test_dir: Path, hash_ignore: tuple[str, ...]) -> None:
        self.config = config
        self.settings = settings
        self.test_dir = test_dir
        self.hash_ignore = hash_ignore
        self.store: Store | None = None
        self.run: Run | None = None
        self.session: pytest.Session | None = None
        self.final: Run | None = None
        self.ended_elsewhere: Run | None = None
        #: Whether the store may hold this session's place in line, or a machine handed to it and not yet
        #: claimed (so it leaves the line when it gives up); only once a look says so.
        self._in_line = False
        #: The end could not be recorded and the liveness lock was gone: the machine was maybe not ours.
        self.unproven = False
        self.skip_reason: str | None = None
        self.counts: Counter[str] = Counter()
        self.owner = dataclasses.replace(Owner.current(), lease=settings.lease)
        self.liveness: OwnerLock | None = None
        self.keeper: KeeperClient | None = None
        self.stopper = Stopper(
            grace=settings.grace,
            force=self._force_end,
            say=self._say,
            interrupted_status=EXIT_INTERRUPTED,
            arm=self._arm_grace,
            spare=self._spared,
        )
        self._ending = threading.Lock()
        #: The end is being recorded now (a force asked for meanwhile is the keeper's to carry out).
        self._recording = False
        # Everything the session holds, let go in reverse order by pytest_unconfigure.
        self._teardown = contextlib.ExitStack()
        self._say_fd: OwnedFd | None = None
        self._log: RunLog | None = None
        self._started = time.monotonic()
        self._refused = False
        self._end_tried = False
        self._interrupt_reason = ""
        self._final_line: _FinalLineClock | None = None
        #: The tests started and not finished (several with xdist), in the order they started.
        self._running: dict[str, None] = {}

    # -- session start ----------------------------------------------------------------

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionstart(self, session: pytest.Session) -> None:
        self.session = session
        # Capturing is suspended during sessionstart: this is the real stderr, where the
        # heartbeat and the watchdog can speak at once even while a test's output is captured.
        self._say_fd = OwnedFd(os.dup(2))
        self._teardown.callback(self._say_fd.close)
        self._final_line = _FinalLineClock.register(self.config)
        self.stopper.install()
        self._teardown.callback(self.stopper.uninstall)
        self._teardown.callback(self.stopper.disarm)
        settings = self.settings
        try:
            self.store = open_store(
                settings.state_dir, settings.store_url, lock_timeout=settings.lock_timeout, keep=settings.keep
            )
            if not settings.store_url:
                ensure_state_dir(self.store.state_dir)  # where the keeper takes the lock
            self.keeper = self.liveness = KeeperClient.start(
                state_dir=self.store.state_dir,
                store_url=settings.store_url,
                lock_timeout=settings.lock_timeout,
                keep=settings.keep,
                grace=settings.grace,
                ignored=self.stopper.ignored(),
            )
            self._teardown.callback(self.keeper.done)
            self.keeper.install(self._on_keeper_event)
            self._teardown.callback(self.keeper.uninstall)
            self._teardown.callback(self._let_go)
            self.owner = dataclasses.replace(self.owner, token=self.liveness.token)
            test_dir_hash = hash_test_dir(
                self.test_dir,
                self.hash_ignore,
                exclude=self._generated_dirs(),
                cache=self.store.hash_cache(self.test_dir),
            )
            self._prepare(self.store, test_dir_hash)
        except BaseException as error:
            if self.run is None and self.liveness is not None:
                # Interrupted or failed, perhaps after a run was created in our name: leave the
                # lock file for readers to find free, so that such a run is reclaimed at once.
                self.liveness.drop()
            if isinstance(error, StoreUnreachable):
                self._refuse(f"pytest-runs: {error}; no test ran", EXIT_STORE_UNREACHABLE)
            if isinstance(error, StateError | HashError):
                raise pytest.UsageError(f"pytest-runs: {error}") from None
            raise
        if self.run is not None:
            self._begin()
        elif self.liveness is not None:
            self.liveness.release()  # skipped: no run names this session

    def _let_go(self) -> None:
        """The liveness lock's last act: remove its file only if no unended run of ours names it."""
        if self.liveness is None:
            return
        if self.run is None or self.final is not None:
            self.liveness.release()
        else:
            self.liveness.drop()

    def _generated_dirs(self) -> list[Path]:
        """Folders that sessions write into, which must not change the identity of the tests."""
        generated = [self.settings.state_dir]
        if basetemp := self.config.option.basetemp:
            generated.append(self.config.invocation_params.dir / basetemp)
        return generated

    def _mk(self, test_dir_hash: str) -> Callable[[], Run]:
        settings = self.settings
        # Owned from birth: if this process dies before claiming it, the run is stale, not stuck.
        return lambda: Run(
            test_dir=str(self.test_dir),
            test_dir_hash=test_dir_hash,
            batch_id=settings.batch,
            plan_entry=settings.plan_entry,
            heartbeat_at=datetime.now(UTC),
            **self.owner.run_fields(),
        )

    def _prepare(self, store: Store, test_dir_hash: str) -> None:
        try:
            self._prepare_or_wait(store, test_dir_hash)
        finally:
            store.stop_waiting()
            if self._in_line and self.run is None:
                # Gave up (timeout, Ctrl-C, an error): out of the line at once.
                self._leave_line(store)
            # Waiting shortens the store's lock timeout to the wait left; the session's own
            # heartbeats and its end get the full timeout again.
            store.lock_timeout = self.settings.lock_timeout

    def _leave_line(self, store: Store) -> None:
        """Out of the line on the way out, best-effort: at most :data:`_LEAVE_LINE_SECONDS` for the store's lock.

        A wait ends within its own bound: leaving never waits a whole lock timeout again. If the
        store cannot be changed now, the liveness lock is let go with its file left in place, so
        that whoever looks next finds this waiter gone at once (and passes on a machine handed
        to it); a removed file would leave that to its lease.
        """
        store.lock_timeout = min(self.settings.lock_timeout, _LEAVE_LINE_SECONDS)
        try:
            store.leave_queue(self.owner.token)
        except StateError:
            if self.liveness is not None:
                self.liveness.drop()
            return
        self._in_line = False
        if self._refused and self.liveness is not None:
            self.liveness.release()  # out of the line, nothing of ours left on record: as _refuse would

    def _waiter(self, test_dir_hash: str) -> Waiter | None:
        """This session as it waits in line (with ``wait``), or ``None``."""
        if self.settings.on_busy != "wait" or not self.owner.token:
            return None
        template = self._mk(test_dir_hash)()
        return Waiter(list(self.settings.machines), self.settings.priority, datetime.now(UTC), template)

    def _prepare_or_wait(self, store: Store, test_dir_hash: str) -> None:
        settings = self.settings
        waiting_since = time.monotonic()
        progress = _WaitProgress(self.config)
        wait_as = self._waiter(test_dir_hash)
        busy_since: datetime | None = None
        prepared: Prepared | None = None
        look_by = 0.0  # when to look at the store again even if nothing seemed to change
        changed = True
        while True:
            if settings.on_busy == "wait":
                store.lock_timeout = self._lock_wait_left(waiting_since)
            try:
                if changed or prepared is None or time.monotonic() >= look_by:
                    if not self._still_alive(progress, time.monotonic() - waiting_since):
                        raise StoreUnreachable(
                            "this session cannot take its liveness lock back: the store is unreachable"
                        )
                    with self.stopper.deferred():
                        prepared = store.prepare(
                            settings.machines, test_dir_hash, self._mk(test_dir_hash), wait_as=wait_as
                        )
                        # In line only once the store says so (a look that met a locked store put nobody in line).
                        self._in_line = self._in_line or prepared.place is not None
                    look_by = time.monotonic() + _LOOK_AGAIN_SECONDS
                    if prepared.look_again_in is not None:  # a machine handed to a stalled waiter passes on then
                        look_by = min(look_by, time.monotonic() + prepared.look_again_in + 0.05)
                run, outcome = prepared.run, prepared.outcome
            except StoreLocked as locked:
                waited = time.monotonic() - waiting_since
                if settings.on_busy != "wait" or waited >= settings.wait_timeout:
                    progress.done()
                    self._refuse(f"pytest-runs: {locked}")
                progress.show(line=f"pytest-runs: {locked}; still waiting", in_place=f"pytest-runs: {locked}")
                changed = True
                continue
            except StoreUnreachable as unreachable:
                # The store went away while this session waited (a restart): wait on, within the wait.
                waited = time.monotonic() - waiting_since
                if settings.on_busy != "wait" or waited >= settings.wait_timeout:
                    progress.done()
                    raise
                progress.show(line=f"pytest-runs: {unreachable}; still waiting", in_place=f"pytest-runs: {unreachable}")
                time.sleep(max(0.0, min(_WAKEUP_WAIT_SECONDS, settings.wait_timeout - waited)))
                changed = True
                continue
            # A pending run for exactly these tests is a reservation: claim it.
            reserved = outcome is PrepareOutcome.REUSE and run.status is Status.PENDING
            if outcome is PrepareOutcome.CREATED or reserved:
                if not self._still_alive(progress, time.monotonic() - waiting_since):
                    changed = True
                    continue  # never claimed without the lock: look again once it is back
                if settings.on_busy == "wait":
                    store.lock_timeout = self._lock_wait_left(waiting_since)
                try:
                    with self.stopper.deferred():
                        self.run = self._claim(store, run, busy_since)
                except (InvalidTransition, RunEnded):
                    changed = True
                    continue  # another session claimed that reservation first: look again
                except StoreLocked as locked:
                    if settings.on_busy != "wait":
                        self._give_up(store, run, locked)
                        raise
                    # The run stays pending in this session's name: the next look finds it again,
                    # and giving up (leaving the line) ends it.
                    self._in_line = True
                    if time.monotonic() - waiting_since >= settings.wait_timeout:
                        progress.done()
                        self._refuse(f"pytest-runs: {locked}")
                    changed = True
                    continue
                except StateError as error:
                    self._give_up(store, run, error)
                    raise
                progress.done()
                return
            busy_since = busy_since or datetime.now(UTC)
            holder = describe_holder(run)
            if prepared.unclaimed_for is not None:
                holder += f", {describe_unclaimed(prepared.unclaimed_for, store.claim_deadline)}"
            same = " (the same tests)" if outcome is PrepareOutcome.REUSE else ""
            if len(settings.machines) == 1:
                message = f"pytest-runs: machine {settings.machine} is busy with {holder}{same}"
            else:
                message = f"pytest-runs: every machine of {settings.machine} is busy; {run.machine} with {holder}{same}"
            if settings.on_busy == "skip":
                self.skip_reason = message
                self.config.stash[SKIP_KEY] = message
                return
            waited = time.monotonic() - waiting_since
            if settings.on_busy == "fail" or waited >= settings.wait_timeout:
                progress.done()
                if settings.on_busy == "wait":
                    message += f"; gave up after waiting {format_duration(waited)}"
                self._refuse(message)
            waiting = f"waiting {format_duration(waited)} of {format_duration(settings.wait_timeout)}"
            if prepared.place is not None:
                waiting = f"{waiting}, {_ordinal(prepared.place)} in line"
            progress.show(
                line=f"{message}; {waiting}",
                # On a terminal the changing part comes first, so that a narrow one cuts the rest.
                in_place=f"pytest-runs: {waiting}: {run.machine} {run.status.value} for {held_for(run)}, "
                + (
                    f"not claimed for {format_duration(prepared.unclaimed_for)}, "
                    if prepared.unclaimed_for is not None
                    else ""
                )
                + f"run {run.id} (hash {run.short_hash})",
            )
            # A store that wakes its waiters when it changes is looked at again at least once a
            # second, for the progress line; one that cannot, every half second.
            poll = _WAKEUP_WAIT_SECONDS if store.backend.wakes_on_change else _WAIT_POLL_SECONDS
            pause = max(0.0, min(poll * random.uniform(0.8, 1.2), settings.wait_timeout - waited))
            try:
                changed = store.wait_for_change(run, pause)
            except StateError:
                time.sleep(pause)
                changed = True

    def _lock_wait_left(self, waiting_since: float) -> float:
        """How long the next store call may wait for the store's lock: never past the wait timeout."""
        left = self.settings.wait_timeout - (time.monotonic() - waiting_since)
        return max(0.1, min(self.settings.lock_timeout, left))

    def _still_alive(self, progress: _WaitProgress, waited: float) -> bool:
        """Before each look and each claim: hold the liveness lock, taking it back if it was lost.

        A waiter's lock can be lost while it waits (its connection to the database ended); a run
        in its name is then stale for everyone else, so it must never start on one. False while
        a waiting session may wait on (the database may be restarting), else it exits.
        """
        if self.liveness is not None and not self.liveness.still_held():
            if self.settings.on_busy == "wait" and waited < self.settings.wait_timeout:
                return False
            progress.done()
            self._refuse(
                "pytest-runs: this session lost its liveness lock while it waited and cannot take it again; "
                "no test ran",
                EXIT_STORE_UNREACHABLE,
            )
        return True

    def _refuse(self, message: str, status: int = EXIT_BUSY) -> NoReturn:
        """No test runs: exit with ``status`` (:data:`EXIT_BUSY`), saying why once."""
        self._refused = True
        if self.liveness is not None and not self._in_line:
            self.liveness.release()  # busy or locked out: no run was created in our name
        # (In line, it leaves the line first: see _leave_line.)
        pytest.exit(message, returncode=status)

    def _give_up(self, store: Store, run: Run, error: StateError) -> None:
        """A run this session created but cannot use: end it at once rather than leave it to be reclaimed."""
        with contextlib.suppress(StateError, RunEnded, InvalidTransition, RunNotFound):
            store.finish(run.id, Status.FAILED, error_code="usage_error", error_msg=str(error), owner=self.owner)

    def _claim(self, store: Store, run: Run, waited_since: datetime | None = None) -> Run:
        run_dir = store.make_run_dir(run.id)
        changes: dict[str, Any] = {
            **self.owner.run_fields(),
            "heartbeat_at": datetime.now(UTC),
            "test_dir": str(self.test_dir),
            "artifacts_path": str(run_dir / "artifacts"),
            "logs_path": str(run_dir / "log.jsonl"),
        }
        if waited_since is not None:
            changes["waited_since"] = waited_since
        if self.settings.batch:
            changes["batch_id"] = self.settings.batch
        if self.settings.plan_entry:
            changes["plan_entry"] = self.settings.plan_entry
        return store.start(run.id, **changes)

    def _begin(self) -> None:
        assert self.run is not None and self.store is not None
        self._started = time.monotonic()
        try:
            self._log = RunLog(self.store.open_log(self.run.id), self._say)
        except StateError as error:
            # The run holds the machine all the same; only its log is lost. Tests run as they would.
            self._say(f"pytest-runs: WARNING: no run log for run {self.run.id}: {error}")
        else:
            self._log.write(
                "session_start",
                run_id=self.run.id,
                machine=self.run.machine,
                fence=self.run.fence,
                test_dir=self.run.test_dir,
                test_dir_hash=self.run.test_dir_hash,
                pytest_version=pytest.__version__,
                args=[mask_url(str(arg)) for arg in self.config.invocation_params.args],
                host=self.owner.host,
                pid=self.owner.pid,
            )
        self._add_junit_properties(self.run)
        self.config.stash[RUN_KEY] = self.run
        # For the tests and everything they start (xdist workers start after this hook).
        self._set_env(RUN_ID_ENV, self.run.id)
        self._set_env(OPTIONS["machine"].env or "PYTEST_RUNS_MACHINE", self.run.machine)
        self._set_env(FENCE_ENV, str(self.run.fence) if self.run.fence is not None else None)
        if self.keeper is not None:
            self.keeper.begin(self.run.id, self.owner.run_fields(), self.settings.heartbeat, self.settings.timeout)

    def _set_env(self, name: str, value: str | None) -> None:
        self._teardown.enter_context(_environment_variable(name, value))

    def _on_deadline(self, reason: str) -> None:
        __tracebackhide__ = True
        self.stopper.stop(StopKind.TIMEOUT, reason, EXIT_INTERRUPTED)

    def _on_keeper_event(self, event: dict[str, Any]) -> None:
        """News from the keeper, on the main thread (a signal handler, or before a test)."""
        __tracebackhide__ = True
        op = event.get("op")
        if op == "lost":
            self._lose_machine(str(event.get("reason")))
        elif op == "timeout":
            self._on_deadline(str(event.get("reason")))
        elif op == "force" and not self._recording:
            self.stopper.end_now()
        elif op == "gone" and self.final is None:
            self._lose_machine(
                f"its keeper process ended (exit status {event.get('status')}), and its liveness lock with it"
            )

    def _arm_grace(self, request: StopRequest) -> bool:
        """A stop was asked for: the keeper keeps the grace (False if it cannot, and a watchdog thread must)."""
        return self.keeper is not None and self.keeper.ask_to_stop(request.kind.value, request.reason)

    def _spared(self) -> set[int]:
        """Children a stop leaves alone: the keeper ends after the session, by itself."""
        return {self.keeper.process.pid} if self.keeper is not None else set()

    def _lose_machine(self, reason: str) -> None:
        __tracebackhide__ = True
        machine = self.run.machine if self.run is not None else self.settings.machine
        if self.stopper.request is not None:
            return  # stopping already: the first stop wins
        # Said before the stop, which may interrupt this very thread.
        self._say(
            f"pytest-runs: ERROR: this session lost machine {machine}: {reason}; "
            f"stopping, exit status {EXIT_MACHINE_LOST}"
        )
        self.stopper.stop(StopKind.LOST, f"lost machine {machine}: {reason}", EXIT_MACHINE_LOST)

    def _say(self, line: str) -> None:
        fd = self._say_fd.fileno() if self._say_fd is not None else None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.write(fd, f"\n{line}\n".encode(errors="backslashreplace"))

    def pytest_keyboard_interrupt(self, excinfo: pytest.ExceptionInfo[BaseException]) -> None:
        # pytest.exit("why"), xdist's "stopping after N failures", a KeyboardInterrupt: keep the why.
        self._interrupt_reason = f"{excinfo.typename}: {excinfo.value}".rstrip(": ")

    @pytest.hookimpl(optionalhook=True)
    def pytest_configure_node(self, node: Any) -> None:
        """xdist: hand the run (or the skip reason) to each worker."""
        if self.keeper is not None:
            node.workerinput[WORKER_KEEPER] = {**self.keeper.worker_input(), "boot_id": self.owner.boot_id}
        if self.run is not None:
            node.workerinput[WORKER_RUN] = self.run.to_dict()
        if self.skip_reason is not None:
            node.workerinput[WORKER_SKIP] = self.skip_reason

    # -- while it runs ----------------------------------------------------------------

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(self, item: pytest.Item) -> bool | None:
        if self.keeper is not None and os.getpid() == self.owner.pid:
            self.keeper.dispatch()  # in case a test replaced the handlers that would have said it at once
        request = self.stopper.request
        if request is None:
            return None
        # Stopping (a test may have swallowed the interrupt): no further test starts.
        item.session.shouldstop = request.reason
        return True

    def pytest_runtest_logstart(self, nodeid: str) -> None:
        self._running[nodeid] = None

    def pytest_runtest_logfinish(self, nodeid: str) -> None:
        self._running.pop(nodeid, None)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if self.run is None:
            return
        if report.when == "call" or not report.passed:
            self.counts[_outcome_word(report)] += 1
        if self._log is not None:
            self._log.report(report)

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if self.run is not None and report.failed:
            self.counts["error"] += 1
            if self._log is not None:
                self._log.report(report)

    def _add_junit_properties(self, run: Run) -> None:
        """With --junitxml, the report's testsuite links back to the run."""
        try:
            from _pytest.junitxml import xml_key
        except ImportError:  # pragma: no cover - a pytest that moved it
            return
        xml = self.config.stash.get(xml_key, None)
        if xml is None:
            return
        properties = {
            "pytest_runs_run_id": run.id,
            "pytest_runs_machine": run.machine,
            "pytest_runs_fence": "" if run.fence is None else str(run.fence),
            "pytest_runs_batch": run.batch_id,
            "pytest_runs_plan_entry": run.plan_entry,
        }
        for name, value in properties.items():
            if value:
                xml.add_global_property(name, value)

    # -- session finish ---------------------------------------------------------------

    # Around every other plugin's end of session, so that xdist has stopped its workers before the
    # machine is given back, and pytest's final line ("in 1.48s") is written: the duration recorded
    # is the one it shows, whatever the other plugins do at the end.
    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> Generator[None, object, object]:
        if os.getpid() != self.owner.pid:
            return (yield)  # a child a test forked, run on into pytest's shutdown: the run is not its own
        self.stopper.ending()
        try:
            return (yield)
        finally:
            self._session_finished(session, exitstatus)

    def _session_finished(self, session: pytest.Session, exitstatus: int) -> None:
        status = int(exitstatus)
        request = self.stopper.request
        if request is not None and request.kind is StopKind.LOST:
            status = EXIT_MACHINE_LOST
        elif request is not None and status == pytest.ExitCode.OK:
            status = EXIT_INTERRUPTED  # a stop was asked for: never a success
        self._finish(status, request)
        if self.ended_elsewhere is not None or self.unproven:
            # Released or reclaimed before the end was recorded, though no heartbeat saw it in
            # time; or nothing proves the machine stayed ours.
            status = EXIT_MACHINE_LOST
        if status != int(exitstatus):
            session.exitstatus = status

    @pytest.hookimpl(wrapper=True)
    def pytest_runtestloop(self, session: pytest.Session) -> Generator[None, object, object]:
        try:
            return (yield)
        finally:
            # No test runs any more: a stop asked for from now on is noted, never raised into
            # pytest's own shutdown (the watchdog still ends a session that hangs).
            self.stopper.ending()

    @pytest.hookimpl(wrapper=True)
    def pytest_unconfigure(self, config: pytest.Config) -> Generator[None]:
        if os.getpid() != self.owner.pid:
            return (yield)
        self.stopper.ending()
        if self._refused:
            # pytest already said "Exit: <why>"; its terminal would repeat it as "! Exit: <why> !".
            reporter = config.pluginmanager.get_plugin("terminalreporter")
            if reporter is not None and getattr(reporter, "_keyboardinterrupt_memo", None) is not None:
                reporter._keyboardinterrupt_memo = None
        try:
            return (yield)
        finally:
            # After every other plugin's unconfigure: the run's line is the very last one.
            self._unconfigure(config)

    def _unconfigure(self, config: pytest.Config) -> None:
        self.stopper.ending()
        # pytest skips sessionfinish when a later plugin's sessionstart fails.
        if self.run is not None and self.final is None and not self._end_tried:
            status = getattr(self.session, "exitstatus", None)
            self._finish(
                int(status) if status is not None else int(pytest.ExitCode.INTERNAL_ERROR), self.stopper.request
            )
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            self._summarise(reporter)
        self._teardown.close()

    def _stop_beating(self) -> None:
        if self.keeper is not None:
            self.keeper.ending()

    def _finish(self, exitstatus: int, request: StopRequest | None) -> None:
        """Record how the session ended (``request``: the stop asked for before the end, if any)."""
        self._stop_beating()
        if self.run is None or self.store is None or self.final is not None:
            return
        self._end_tried = True
        summary = self._summary()
        status, error_code, error_msg = self._outcome(exitstatus, request, summary["text"])
        held = self.liveness is None or self.liveness.still_held()
        self._record_end(status, exitstatus, error_code, error_msg, summary)
        if self.final is None and not held:
            # Neither the end on record nor the liveness lock: nothing proves the machine stayed ours.
            self.unproven = True
            self._say(
                f"pytest-runs: ERROR: run {self.run.id} cannot prove it held machine {self.run.machine} "
                f"to the end (its liveness lock is gone and its end could not be recorded); exit status "
                f"{EXIT_MACHINE_LOST}"
            )
        if self._log is not None:
            final = self.final or self.run
            self._log.write(
                "session_finish",
                status=final.status.value,
                exit_code=exitstatus,
                error_code=error_code,
                summary=summary,
            )
            self._log.close()
            self._log = None
        # Only now, with the end on record, may another session see this one as gone.
        self._let_go()

    def _summary(self) -> dict[str, Any]:
        """pytest's counts as on its final line, and how long the session ran."""
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        text = ""
        if reporter is not None:
            with contextlib.suppress(Exception):  # a reporter that differs: fall back to our own counts
                parts, _ = reporter.build_summary_stats_line()
                text = ", ".join(part for part, _ in parts)
        if not text or text == "no tests ran":
            text = _summary(self.counts) or "no tests ran"
        counts: dict[str, int] = {}
        for part in text.split(", "):
            number, _, word = part.partition(" ")
            if number.isdigit():
                counts[word] = int(number)
        exitstatus = getattr(self.session, "exitstatus", None)
        if self.stopper.request is not None or exitstatus == pytest.ExitCode.INTERRUPTED:
            text = _interrupted(list(self._running), "" if text == "no tests ran" else text)
        duration = time.monotonic() - self._started
        if self._final_line is not None and self._final_line.seconds is not None:
            duration = self._final_line.seconds  # what pytest's final line said
        else:
            session_start = getattr(reporter, "_session_start", None)  # what pytest's final line measures
            with contextlib.suppress(Exception):
                duration = float(session_start.elapsed().seconds) if session_start is not None else duration
        return {"text": text, "counts": counts, "duration": round(duration, 3)}

    def _record_end(
        self, status: Status, exit_code: int, error_code: str, error_msg: str, summary: dict[str, Any] | None = None
    ) -> None:
        assert self.run is not None and self.store is not None
        with self._ending:
            if self.final is not None:
                return
            self._recording = True
            try:
                self.final = self.store.finish(
                    self.run.id,
                    status,
                    exit_code=exit_code,
                    error_code=error_code,
                    error_msg=error_msg,
                    summary=summary,
                    owner=self.owner,
                )
            except RunEnded as ended:
                self.final = self.ended_elsewhere = ended.run
            except (RunNotFound, InvalidTransition) as error:
                self.final = self.run
                self._say(f"pytest-runs: the end of run {self.run.id} was not recorded: {error}")
            except StateError as error:
                self._say(f"pytest-runs: could not record the end of run {self.run.id}: {error}")
            finally:
                self._recording = False

    def _force_end(self, request: StopRequest) -> None:
        """The watchdog's last act: record the end, quickly, from its own thread."""
        if self.run is None or self.store is None:
            return
        if request.kind is not StopKind.LOST:
            status = Status.TIMEOUT if request.kind is StopKind.TIMEOUT else Status.INTERRUPTED
            forced = f"{request.reason}; ended by force after a grace of {self.settings.grace:g}s"
            self._record_end(status, request.exit_status, status.value, forced, self._summary())
        self._let_go()
        run = self.final or self.run
        self._say(f"pytest-runs: run {run.id} on {run.machine}: {run.status.value} (exit status {request.exit_status})")

    def _outcome(self, exitstatus: int, request: StopRequest | None, counts: str) -> tuple[Status, str, str]:
        shouldfail = str(getattr(self.session, "shouldfail", "") or "")
        if request is not None and request.kind is StopKind.TIMEOUT:
            return Status.TIMEOUT, "timeout", request.reason
        if shouldfail.startswith("session-timeout:"):
            return Status.TIMEOUT, "session_timeout", shouldfail
        if request is not None and request.kind is StopKind.LOST:
            return Status.INTERRUPTED, "machine_lost", request.reason
        if request is not None or exitstatus == pytest.ExitCode.INTERRUPTED:
            reason = request.reason if request is not None else (self._interrupt_reason or "interrupted")
            return Status.INTERRUPTED, "interrupted", reason
        if exitstatus == pytest.ExitCode.OK:
            return Status.COMPLETED, "", ""
        try:
            code = pytest.ExitCode(exitstatus).name.lower()
        except ValueError:
            code = f"exit_{exitstatus}"
        if counts == "no tests ran" or not counts:
            counts = code.replace("_", " ")
        if self._interrupt_reason:
            counts += f"; {self._interrupt_reason}"
        return Status.FAILED, code, counts

    def _summarise(self, terminalreporter: Any) -> None:
        """The session's last words, after pytest's own final line: what became of the run."""
        run = self.final or self.run
        if self.skip_reason is not None:
            terminalreporter.write_line(f"{self.skip_reason}: every test skipped, no run recorded")
            return
        if run is None:
            return
        request = self.stopper.request
        if self.ended_elsewhere is not None or (request is not None and request.kind is StopKind.LOST):
            why = (
                request.reason.removeprefix(f"lost machine {run.machine}: ")
                if request is not None and request.kind is StopKind.LOST
                else (f"run {run.id} was ended by someone else ({run.status.value}, {run.error_msg})")
            )
            terminalreporter.write_line(
                f"pytest-runs: this session lost machine {run.machine} while it ran "
                f"(exit status {EXIT_MACHINE_LOST}): {why}; run {run.id} was left as it is",
                red=True,
            )
        if self.final is None:
            terminalreporter.write_line(
                f"pytest-runs: run {run.id} on {run.machine}: its end could not be recorded; the next session "
                f"on {run.machine} will find its owner gone and end it (artifacts {run.artifacts_path}, "
                f"log {run.logs_path})",
                yellow=True,
            )
            return
        terminalreporter.write_line(
            f"pytest-runs: run {run.id} on {run.machine}: {run.status.value}"
            f" (artifacts {run.artifacts_path}, log {run.logs_path})"
        )


class _FinalLineClock:
    """pytest's own session duration, read when its final line ("1 passed in 1.48s") has been written.

    It is registered after the terminal reporter, so its wrapper of ``pytest_sessionfinish`` is
    just around the reporter's (which writes that line after every other plugin's end of session)
    and reads the clock that line shows.
    """

    def __init__(self, reporter: Any) -> None:
        self._reporter = reporter
        self.seconds: float | None = None

    @classmethod
    def register(cls, config: pytest.Config) -> _FinalLineClock | None:
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        if reporter is None:
            return None
        clock = cls(reporter)
        config.pluginmanager.register(clock, "pytest-runs-final-line-clock")
        return clock

    @pytest.hookimpl(wrapper=True)
    def pytest_sessionfinish(self) -> Generator[None, object, object]:
        try:
            return (yield)
        finally:
            with contextlib.suppress(Exception):  # a reporter that differs: the session's own clock then
                self.seconds = float(self._reporter._session_start.elapsed().seconds)


@contextlib.contextmanager
def _environment_variable(name: str, value: str | None) -> Iterator[None]:
    """``name`` set to ``value`` (unset for ``None``) in ``os.environ`` for the context."""
    saved = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


_SUMMARY_ORDER = ("failed", "passed", "skipped", "xfailed", "xpassed", "error")


def _outcome_word(report: pytest.TestReport) -> str:
    if hasattr(report, "wasxfail"):
        return "xfailed" if report.skipped else "xpassed"
    if report.failed:
        return "failed" if report.when == "call" else "error"
    return "skipped" if report.skipped else "passed"


def _interrupted(running: list[str], done: str) -> str:
    """What an interrupted session was doing: ``interrupted during t.py::test_slow after 1 passed``."""
    if not running:
        return f"interrupted after {done}" if done else "interrupted before any test ran"
    during = ", ".join(running[:3]) + (f" and {len(running) - 3} more" if len(running) > 3 else "")
    return f"interrupted during {during} " + (f"after {done}" if done else "before any test had finished")


def _summary(counts: Counter[str]) -> str:
    parts = []
    for word in _SUMMARY_ORDER:
        if counts[word]:
            label = "errors" if word == "error" and counts[word] > 1 else word
            parts.append(f"{counts[word]} {label}")
    return ", ".join(parts)


class _WaitProgress:
    """Shows who holds the machine: in place on a terminal, else a line every 30 seconds."""

    def __init__(self, config: pytest.Config) -> None:
        # With -p no:terminal there is no terminal writer: a plain one on stderr then.
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        self.writer = config.get_terminal_writer() if reporter is not None else TerminalWriter(sys.stderr)
        self.in_place = reporter is not None and sys.stdout.isatty() and os.environ.get("TERM") != "dumb"
        self.last_line_at: float | None = None
        self.shown = False

    def show(self, line: str, in_place: str) -> None:
        if self.in_place:
            width = max(20, self.writer.fullwidth - 1)
            self.writer.write("\r" + in_place[:width].ljust(width), flush=True)
            self.shown = True
            return
        now = time.monotonic()
        if self.last_line_at is None or now - self.last_line_at >= _WAIT_REPORT_EVERY:
            self.writer.line(line, flush=True)
            self.last_line_at = now

    def done(self) -> None:
        if self.shown:
            self.writer.line()
            self.shown = False


def _ordinal(number: int) -> str:
    """``1st``, ``2nd``, ``3rd``, ``4th``, ``11th``, ``21st``..."""
    suffix = "th" if 10 <= number % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(number % 10, "th")
    return f"{number}{suffix}"
