"""The pytest plugin: a session run with ``--runs-machine`` is a tracked run.

Without a machine (option, environment or ini) the plugin registers its options
and fixtures and nothing else. With one, the controlling process (never an xdist
worker) hashes the test folder, prepares the run in one critical section of the
store, applies the busy policy, and at the end records how the session ended.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Generator
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import IO, TYPE_CHECKING, Any

import pytest

from .display import describe_holder, format_duration, held_for
from .model import PrepareOutcome, Run, Status
from .settings import LEASE_ENV, STATE_DIR_ENV, check_machine_name, parse_seconds, resolve_state_dir

if TYPE_CHECKING:
    from .owner import Owner
    from .store import Store

__all__ = ["EXIT_BUSY", "runs_artifacts_dir", "runs_run"]

#: Exit status when the machine is busy (EX_TEMPFAIL, "try again later"); CI can retry on it.
EXIT_BUSY = 75

_RUN_KEY = pytest.StashKey[Run]()
_SKIP_KEY = pytest.StashKey[str]()
_WORKER_RUN = "pytest_runs_run"
_WORKER_SKIP = "pytest_runs_skip"
_BUSY_POLICIES = ("fail", "skip", "wait")
_WAIT_POLL_SECONDS = 0.5
_WAIT_REPORT_EVERY = 30.0


@dataclasses.dataclass(frozen=True)
class _Option:
    flag: str
    ini: str | None
    env: str | None
    metavar: str
    help: str


_OPTIONS = {
    "machine": _Option(
        "--runs-machine", "runs_machine", "PYTEST_RUNS_MACHINE", "NAME",
        "track this session as a run on target machine NAME (turns pytest-runs on)",
    ),
    "state_dir": _Option(
        "--runs-state-dir", "runs_state_dir", STATE_DIR_ENV, "DIR",
        "the run store (default: $XDG_STATE_HOME/pytest-runs, else ~/.local/state/pytest-runs)",
    ),
    "on_busy": _Option(
        "--runs-on-busy", "runs_on_busy", "PYTEST_RUNS_ON_BUSY", "fail|skip|wait",
        f"when the machine is busy: fail (exit {EXIT_BUSY}), skip every test, or wait (default: fail)",
    ),
    "wait_timeout": _Option(
        "--runs-wait-timeout", "runs_wait_timeout", "PYTEST_RUNS_WAIT_TIMEOUT", "SECONDS",
        "with --runs-on-busy=wait: give up (as fail does) after SECONDS (default: 3600)",
    ),
    "test_dir": _Option(
        "--runs-test-dir", "runs_test_dir", None, "PATH",
        "the folder whose content identifies the run (default: pytest's rootdir)",
    ),
    "timeout": _Option(
        "--runs-timeout", "runs_timeout", "PYTEST_RUNS_TIMEOUT", "SECONDS",
        "deadline for the session once the run starts; past it the session stops and the run ends as timeout",
    ),
    "heartbeat": _Option(
        "--runs-heartbeat", "runs_heartbeat", "PYTEST_RUNS_HEARTBEAT", "SECONDS",
        "seconds between the session's heartbeats (default: 15)",
    ),
    "lease": _Option(
        "--runs-lease", "runs_lease", LEASE_ENV, "SECONDS",
        "a run whose heartbeat is older than this is stale and its machine is freed (default: 300)",
    ),
    "batch": _Option(
        "--runs-batch", None, "PYTEST_RUNS_BATCH", "ID", "record the run as part of batch ID (batch_id)",
    ),
    "plan_entry": _Option(
        "--runs-plan-entry", None, "PYTEST_RUNS_PLAN_ENTRY", "NAME",
        "record the plan entry this run fulfils (plan_entry)",
    ),
}  # fmt: skip


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("runs", "pytest-runs: track the session as a run on a target machine")
    for name, option in _OPTIONS.items():
        where = " ".join(
            part for part in (option.env and f"[env {option.env}]", option.ini and f"[ini {option.ini}]") if part
        )
        group.addoption(
            option.flag,
            dest=f"runs_{name}",
            default=None,
            metavar=option.metavar,
            help=f"{option.help} {where}".strip(),
        )
        if option.ini:
            parser.addini(option.ini, option.help, default=None)
    parser.addini(
        "runs_hash_ignore",
        "glob patterns (names or relative paths) left out of the test folder's hash",
        type="linelist",
        default=[],
    )


def _setting(config: pytest.Config, name: str) -> str | None:
    """Command line, then environment, then ini file; ``None`` when unset everywhere."""
    option = _OPTIONS[name]
    value = config.getoption(f"runs_{name}")
    if value is None and option.env:
        value = os.environ.get(option.env) or None
    if value is None and option.ini:
        value = config.getini(option.ini) or None
    return value if value is None else str(value)


@dataclasses.dataclass(frozen=True)
class _Settings:
    machine: str
    state_dir: Path
    on_busy: str
    wait_timeout: float
    test_dir: Path
    timeout: float | None
    heartbeat: float
    lease: float
    batch: str
    plan_entry: str
    hash_ignore: tuple[str, ...]

    @classmethod
    def from_config(cls, config: pytest.Config, machine: str) -> _Settings:
        def seconds(name: str, default: str | None, *, allow_zero: bool = True) -> float | None:
            text = _setting(config, name) or default
            if text is None:
                return None
            return parse_seconds(text, _OPTIONS[name].flag, allow_zero=allow_zero)

        on_busy = (_setting(config, "on_busy") or "fail").strip().lower()
        if on_busy not in _BUSY_POLICIES:
            raise ValueError(f"--runs-on-busy must be one of {', '.join(_BUSY_POLICIES)}, not {on_busy!r}")
        test_dir = Path(_setting(config, "test_dir") or config.rootpath).expanduser()
        test_dir = (config.invocation_params.dir / test_dir).resolve()
        if not test_dir.is_dir():
            raise ValueError(f"--runs-test-dir {test_dir} is not a folder")
        state_dir = resolve_state_dir(_setting(config, "state_dir"))
        from .owner import DEFAULT_HEARTBEAT, DEFAULT_LEASE

        wait_timeout = seconds("wait_timeout", "3600")
        heartbeat = seconds("heartbeat", str(DEFAULT_HEARTBEAT), allow_zero=False)
        lease = seconds("lease", str(DEFAULT_LEASE), allow_zero=False)
        assert wait_timeout is not None and heartbeat is not None and lease is not None
        if lease <= heartbeat:
            raise ValueError(f"--runs-lease ({lease:g}s) must be longer than --runs-heartbeat ({heartbeat:g}s)")
        return cls(
            machine=check_machine_name(machine),
            state_dir=(config.invocation_params.dir / state_dir).absolute(),
            on_busy=on_busy,
            wait_timeout=wait_timeout,
            test_dir=test_dir,
            timeout=seconds("timeout", None, allow_zero=False),
            heartbeat=heartbeat,
            lease=lease,
            batch=_setting(config, "batch") or "",
            plan_entry=_setting(config, "plan_entry") or "",
            hash_ignore=tuple(config.getini("runs_hash_ignore")),
        )


def pytest_configure(config: pytest.Config) -> None:
    workerinput: dict[str, Any] | None = getattr(config, "workerinput", None)
    if workerinput is not None:
        # An xdist worker: the controller owns the run and hands it over.
        if (record := workerinput.get(_WORKER_RUN)) is not None:
            config.stash[_RUN_KEY] = Run.from_dict(record)
        if (reason := workerinput.get(_WORKER_SKIP)) is not None:
            config.stash[_SKIP_KEY] = reason
        return
    machine = _setting(config, "machine")
    if machine is None:
        return
    try:
        settings = _Settings.from_config(config, machine)
    except ValueError as error:
        raise pytest.UsageError(f"pytest-runs: {error}") from None
    config.pluginmanager.register(RunTracker(config, settings), "pytest-runs-tracker")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = config.stash.get(_SKIP_KEY, None)
    if reason is not None:
        marker = pytest.mark.skip(reason=reason)
        for item in items:
            item.add_marker(marker)


@pytest.fixture(scope="session")
def runs_run(pytestconfig: pytest.Config) -> Run | None:
    """The run this session is tracked as, or ``None`` when tracking is off."""
    return pytestconfig.stash.get(_RUN_KEY, None)


@pytest.fixture(scope="session")
def runs_artifacts_dir(runs_run: Run | None) -> Path | None:
    """The folder to write this run's artifacts into, or ``None`` when tracking is off."""
    if runs_run is None or not runs_run.artifacts_path:
        return None
    path = Path(runs_run.artifacts_path)
    path.mkdir(parents=True, exist_ok=True)
    return path


class RunTracker:
    """The hooks of a tracked session, registered only in the controlling process."""

    def __init__(self, config: pytest.Config, settings: _Settings) -> None:
        self.config = config
        self.settings = settings
        self.store: Store | None = None
        self.run: Run | None = None
        self.session: pytest.Session | None = None
        self.final: Run | None = None
        self.ended_elsewhere: Run | None = None
        self.skip_reason: str | None = None
        self.stop_reason: str = ""
        self.timed_out = False
        self.counts: Counter[str] = Counter()
        from .owner import Owner

        self.owner: Owner = Owner.current()
        self._heartbeat_stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self._warn_fd: int | None = None
        self._log: IO[str] | None = None
        self._timer: threading.Timer | None = None
        self._previous_sigterm: Any = None
        self._main_thread = 0

    # -- session start ----------------------------------------------------------------

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionstart(self, session: pytest.Session) -> None:
        from .hashing import HashError, hash_test_dir
        from .store import StateError, Store

        self.session = session
        settings = self.settings
        try:
            self.store = Store(settings.state_dir, lease=settings.lease)
            test_dir_hash = hash_test_dir(settings.test_dir, settings.hash_ignore, exclude=self._generated_dirs())
            self._prepare(self.store, test_dir_hash)
        except (StateError, HashError) as error:
            raise pytest.UsageError(f"pytest-runs: {error}") from None
        if self.run is not None:
            self._begin()

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
            machine=settings.machine,
            test_dir=str(settings.test_dir),
            test_dir_hash=test_dir_hash,
            batch_id=settings.batch,
            plan_entry=settings.plan_entry,
            heartbeat_at=datetime.now(UTC),
            **self.owner.run_fields(),
        )

    def _prepare(self, store: Store, test_dir_hash: str) -> None:
        from .store import InvalidTransition, RunEnded

        settings = self.settings
        waiting_since = time.monotonic()
        progress = _WaitProgress(self.config)
        while True:
            run, outcome = store.prepare_atomic(settings.machine, test_dir_hash, self._mk(test_dir_hash))
            # A pending run for exactly these tests is a reservation: claim it.
            reserved = outcome is PrepareOutcome.REUSE and run.status is Status.PENDING
            if outcome is PrepareOutcome.CREATED or reserved:
                try:
                    self.run = self._claim(store, run)
                except (InvalidTransition, RunEnded):
                    continue  # another session claimed that reservation first: look again
                progress.done()
                return
            holder = describe_holder(run)
            same = " (the same tests)" if outcome is PrepareOutcome.REUSE else ""
            message = f"pytest-runs: machine {settings.machine} is busy with {holder}{same}"
            if settings.on_busy == "skip":
                self.skip_reason = message
                self.config.stash[_SKIP_KEY] = message
                return
            waited = time.monotonic() - waiting_since
            if settings.on_busy == "fail" or waited >= settings.wait_timeout:
                progress.done()
                if settings.on_busy == "wait":
                    message += f"; gave up after waiting {format_duration(waited)}"
                pytest.exit(message, returncode=EXIT_BUSY)
            waiting = f"waiting {format_duration(waited)} of {format_duration(settings.wait_timeout)}"
            progress.show(
                line=f"{message}; {waiting}",
                # On a terminal the changing part comes first, so that a narrow one cuts the rest.
                in_place=f"pytest-runs: {waiting}: {settings.machine} {run.status.value} for {held_for(run)}, "
                f"run {run.id} (hash {run.short_hash})",
            )
            time.sleep(min(_WAIT_POLL_SECONDS * random.uniform(0.8, 1.2), settings.wait_timeout - waited))

    def _claim(self, store: Store, run: Run) -> Run:
        run_dir = store.run_dir(run.id)
        changes: dict[str, Any] = {
            **self.owner.run_fields(),
            "heartbeat_at": datetime.now(UTC),
            "test_dir": str(self.settings.test_dir),
            "artifacts_path": str(run_dir / "artifacts"),
            "logs_path": str(run_dir / "log.jsonl"),
        }
        if self.settings.batch:
            changes["batch_id"] = self.settings.batch
        if self.settings.plan_entry:
            changes["plan_entry"] = self.settings.plan_entry
        return store.start(run.id, **changes)

    def _begin(self) -> None:
        assert self.run is not None
        artifacts = Path(self.run.artifacts_path)
        artifacts.mkdir(parents=True, exist_ok=True)
        self._log = open(self.run.logs_path, "a", encoding="utf-8")  # noqa: SIM115 - open for the whole session
        self.config.stash[_RUN_KEY] = self.run
        if threading.current_thread() is threading.main_thread():
            self._previous_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)
        # Capturing is suspended during sessionstart: this is the real stderr, where the
        # heartbeat thread can warn at once even while a test's output is being captured.
        self._warn_fd = os.dup(2)
        self._heartbeat = threading.Thread(target=self._beat, name="pytest-runs-heartbeat", daemon=True)
        self._heartbeat.start()
        if self.settings.timeout is not None:
            self._main_thread = threading.get_ident()
            self._timer = threading.Timer(self.settings.timeout, self._on_deadline)
            self._timer.daemon = True
            self._timer.start()

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        if not self.stop_reason:
            self.stop_reason = "terminated by SIGTERM"
        raise KeyboardInterrupt(self.stop_reason)

    def _on_deadline(self) -> None:
        self.timed_out = True
        self.stop_reason = f"session passed its deadline (--runs-timeout={self.settings.timeout:g}s)"
        # A real SIGINT, so that a main thread blocked in a system call wakes up too; its
        # KeyboardInterrupt then stops the session through pytest's own path.
        signal.pthread_kill(self._main_thread, signal.SIGINT)

    def _beat(self) -> None:
        from .store import InvalidTransition, RunEnded, StateError

        assert self.run is not None and self.store is not None
        while not self._heartbeat_stop.wait(self.settings.heartbeat):
            try:
                self.store.heartbeat(self.run.id, self.owner)
            except RunEnded as ended:
                self.ended_elsewhere = ended.run
                self._warn(
                    f"run {ended.run.id} was ended by someone else while this session runs "
                    f"({ended.run.status.value}, {ended.run.error_code}: {ended.run.error_msg}); "
                    f"machine {ended.run.machine} may no longer be this session's"
                )
                return
            except (InvalidTransition, StateError) as error:
                self._warn(f"heartbeat of run {self.run.id} failed: {error}")

    def _warn(self, message: str) -> None:
        if self._warn_fd is not None:
            with contextlib.suppress(OSError):
                os.write(self._warn_fd, f"\npytest-runs: WARNING: {message}\n".encode())

    @pytest.hookimpl(optionalhook=True)
    def pytest_configure_node(self, node: Any) -> None:
        """xdist: hand the run (or the skip reason) to each worker."""
        if self.run is not None:
            node.workerinput[_WORKER_RUN] = self.run.to_dict()
        if self.skip_reason is not None:
            node.workerinput[_WORKER_SKIP] = self.skip_reason

    # -- while it runs ----------------------------------------------------------------

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if self.run is None:
            return
        if report.when == "call" or not report.passed:
            self.counts[_outcome_word(report)] += 1
        self._write_log(report, report.when)

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if self.run is not None and report.failed:
            self.counts["error"] += 1
            self._write_log(report, "collect")

    def _write_log(self, report: pytest.TestReport | pytest.CollectReport, when: str | None) -> None:
        if self._log is None:
            return
        entry: dict[str, Any] = {
            "nodeid": report.nodeid,
            "when": when,
            "outcome": report.outcome,
            "duration": getattr(report, "duration", 0.0),
        }
        if report.failed:
            entry["longrepr"] = str(report.longrepr)
        elif report.skipped and isinstance(report.longrepr, tuple):
            entry["longrepr"] = report.longrepr[2]
        # xdist marks reports from its workers with the worker's node.
        if (gateway := getattr(getattr(report, "node", None), "gateway", None)) is not None:
            entry["worker"] = gateway.id
        self._log.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self._log.flush()

    # -- session finish ---------------------------------------------------------------

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        self._finish(int(exitstatus))

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        # pytest skips sessionfinish when a later plugin's sessionstart fails.
        if self.run is not None and self.final is None:
            status = getattr(self.session, "exitstatus", None)
            self._finish(int(status) if status is not None else int(pytest.ExitCode.INTERNAL_ERROR))
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None

    def _finish(self, exitstatus: int) -> None:
        from .store import RunEnded, StateError

        if self._timer is not None:
            self._timer.cancel()
        self._heartbeat_stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
        if self._warn_fd is not None:
            os.close(self._warn_fd)
            self._warn_fd = None
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.run is None or self.store is None or self.final is not None:
            return
        status, error_code, error_msg = self._outcome(exitstatus)
        try:
            self.final = self.store.finish(
                self.run.id, status, exit_code=exitstatus, error_code=error_code, error_msg=error_msg
            )
        except RunEnded as ended:
            self.final = self.ended_elsewhere = ended.run
        except StateError as error:
            sys.stderr.write(f"pytest-runs: could not record the end of run {self.run.id}: {error}\n")

    def _outcome(self, exitstatus: int) -> tuple[Status, str, str]:
        shouldfail = str(getattr(self.session, "shouldfail", "") or "")
        if self.timed_out:
            return Status.TIMEOUT, "timeout", self.stop_reason
        if shouldfail.startswith("session-timeout:"):
            return Status.TIMEOUT, "session_timeout", shouldfail
        if exitstatus == pytest.ExitCode.OK:
            return Status.COMPLETED, "", ""
        if exitstatus == pytest.ExitCode.INTERRUPTED:
            return Status.INTERRUPTED, "interrupted", self.stop_reason or "interrupted (KeyboardInterrupt)"
        try:
            code = pytest.ExitCode(exitstatus).name.lower()
        except ValueError:
            code = f"exit_{exitstatus}"
        summary = _summary(self.counts) or code.replace("_", " ")
        return Status.FAILED, code, summary

    # The outermost wrapper, so that its line comes after pytest's own summary sections.
    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_terminal_summary(self, terminalreporter: Any) -> Generator[None]:
        try:
            return (yield)
        finally:
            self._summarise(terminalreporter)

    def _summarise(self, terminalreporter: Any) -> None:
        run = self.final or self.run
        if self.skip_reason is not None:
            terminalreporter.write_line(f"{self.skip_reason}: every test skipped, no run recorded")
            return
        if run is None:
            return
        if self.ended_elsewhere is not None:
            terminalreporter.write_line(
                f"pytest-runs: run {run.id} was ended by someone else while this session ran "
                f"({run.status.value}, {run.error_code}: {run.error_msg}); its record was left as it is",
                yellow=True,
            )
        terminalreporter.write_line(
            f"pytest-runs: run {run.id} on {run.machine}: {run.status.value}"
            f" (artifacts {run.artifacts_path}, log {run.logs_path})"
        )


_SUMMARY_ORDER = ("failed", "passed", "skipped", "xfailed", "xpassed", "error")


def _outcome_word(report: pytest.TestReport) -> str:
    if hasattr(report, "wasxfail"):
        return "xfailed" if report.skipped else "xpassed"
    if report.failed:
        return "failed" if report.when == "call" else "error"
    return "skipped" if report.skipped else "passed"


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
        self.writer = config.get_terminal_writer()
        self.in_place = sys.stdout.isatty() and os.environ.get("TERM") != "dumb"
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
