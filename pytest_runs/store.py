"""The run store: runs persisted to one JSON state file behind two locks.

Every public method takes an in-process lock (threads), then a cross-process
``flock`` on a separate lock file (processes; see :mod:`pytest_runs.storelock`), reads the state file,
acts, writes it back if it changed, and releases both before returning. Nothing
is cached between calls, so any number of processes and ``Store`` objects on one
directory see each other's writes. Taking the locks never blocks forever: past
``lock_timeout`` seconds a call raises :class:`StoreLocked`, naming the lock file
and, where the kernel tells, the PID that holds it.

Writes are atomic and durable: the new state goes to a temporary file in the
same directory, which is flushed and fsynced, renamed over the state file with
``os.replace``, and the directory is fsynced. A writer killed at any moment
leaves either the old or the new state.
"""

from __future__ import annotations

import builtins
import contextlib
import copy
import dataclasses
import errno
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

from . import liveness
from .hashing import HashCache
from .model import PrepareOutcome, Run, Status, run_created_at
from .owner import Owner, boot_id, describe_owner
from .settings import DEFAULT_LOCK_TIMEOUT
from .storelock import StoreLock

# An alias, because inside Store the name ``list`` is the method.
RunList = list[Run]

__all__ = [
    "FORMAT_VERSION",
    "InvalidTransition",
    "MachineState",
    "RunEnded",
    "RunNotFound",
    "StateError",
    "Store",
    "StoreLocked",
]

STATE_FILE_NAME = "runs.json"
LOCK_FILE_NAME = "runs.lock"
RUNS_DIR_NAME = "runs"
HASH_CACHE_DIR_NAME = "hash-cache"
FORMAT_NAME = "pytest-runs-state"
#: The state file format this version writes, and the newest it can read. Version 2 adds
#: the per-machine fence counters, which a version-1 writer would drop.
FORMAT_VERSION = 2

_log = logging.getLogger("pytest_runs")
# Every stored run has these, non-empty: a record without them is corrupt, not a default run.
_REQUIRED_KEYS = ("id", "machine", "status")
_RUN_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class RunNotFound(LookupError):
    """No run with the requested ID exists in the store."""

    def __init__(self, run_id: str) -> None:
        super().__init__(f"no run with ID {run_id!r}")
        self.run_id = run_id


class StateError(Exception):
    """The state on disk cannot be used; the message names the file and the problem."""


class StoreLocked(StateError):
    """The store's lock stayed taken for longer than the store's ``lock_timeout``."""

    def __init__(self, message: str, holders: builtins.list[int]) -> None:
        super().__init__(message)
        #: PIDs that hold the lock file, as far as the kernel tells (may be empty).
        self.holders = holders


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


@dataclasses.dataclass(frozen=True)
class MachineState:
    """What the store knows about one machine."""

    machine: str
    #: The earliest-inserted pending or running run, or ``None`` when the machine is idle.
    active: Run | None
    #: The run that ended most recently, or ``None``.
    last: Run | None


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _require_name(value: str, what: str) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string, got {value!r}")


def _oserror_text(error: OSError) -> str:
    return error.strerror or str(error)


class Store:
    """Runs persisted to ``<state_dir>/runs.json``, safe across threads and processes.

    ``state_dir`` is created with mode 0700 on the first write; reading a store that does
    not exist creates nothing. An existing state dir that others may write to is refused.
    Returned runs are copies:
    changing one changes nothing until :meth:`update`. Every call waits at most
    ``lock_timeout`` seconds for the store's locks, then raises :class:`StoreLocked`.
    """

    def __init__(self, state_dir: str | os.PathLike[str], *, lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> None:
        if not 0 < lock_timeout < 1e9:
            raise ValueError(f"lock_timeout must be a positive number of seconds, not {lock_timeout!r}")
        self.lock_timeout = lock_timeout
        self._boot_id = boot_id()
        # What the state file held besides its runs, as read in the current critical section.
        self._fences: dict[str, int] = {}
        self._read_version = FORMAT_VERSION
        self.state_dir = Path(state_dir).absolute()
        self.state_path = self.state_dir / STATE_FILE_NAME
        self.lock_path = self.state_dir / LOCK_FILE_NAME
        # Created on the first write, so that looking at a store never makes one.
        self._check_dir()
        self._mutex = threading.Lock()
        self._inside = threading.local()
        # Never removed or replaced: the lock file keeps its inode for ever.
        self._file_lock = StoreLock(self.lock_path)

    def __repr__(self) -> str:
        return f"Store({str(self.state_dir)!r})"

    # -- the contract of the Go store -------------------------------------------------

    def create(self, run: Run) -> Run:
        """Give ``run`` a fresh ID (overwriting any it had), append and persist it; return it.

        A pending or running run also gets the machine's next ``fence``.
        """
        with self._locked() as runs:
            self._append(runs, run)
            self._write(runs)
        return run

    def get(self, run_id: str) -> Run:
        """A copy of the run with that ID; :class:`RunNotFound` if there is none."""
        with self._locked(readonly=True) as runs:
            return _copy(runs[self._index(runs, run_id)])

    def list(self) -> RunList:
        """Every run, in insertion order."""
        with self._locked(readonly=True) as runs:
            return runs

    def update(self, run: Run) -> None:
        """Overwrite the stored record with ``run.id``.

        Raises :class:`RunNotFound` for an unknown ID and :class:`InvalidTransition` when
        the update would move a terminal run to another status or change a run's machine
        or test-dir hash (either could put two active runs on one machine).
        """
        with self._locked() as runs:
            index = self._index(runs, run.id)
            _check_transition(runs[index], run)
            runs[index] = _copy(run)
            self._write(runs)

    def active_by_machine(self, name: str) -> Run | None:
        """The earliest-inserted pending or running run on machine ``name``, or ``None``."""
        with self._locked(readonly=True) as runs:
            return _active(runs, name)

    def find_by_test_dir_hash_and_machine(self, test_dir_hash: str, machine: str) -> RunList:
        """Every run with that (hash, machine), in insertion order."""
        with self._locked(readonly=True) as runs:
            return [r for r in runs if r.test_dir_hash == test_dir_hash and r.machine == machine]

    def prepare_atomic(self, machine: str, test_dir_hash: str, mk: Callable[[], Run]) -> tuple[Run, PrepareOutcome]:
        """Reuse, report busy, or create, all in one critical section.

        If ``machine`` has a non-terminal run with ``test_dir_hash``, return it with
        ``REUSE``; if it has one with another hash, return that with ``BUSY``; otherwise
        call ``mk()`` (only then) for the pending run to create, give it an ID and the
        machine's next ``fence``, persist it and return it with ``CREATED``. Two callers
        can never both create a run for one machine. ``mk`` must not call this store.

        First, in the same critical section, the machine's stale runs (whose owner is
        gone, see :func:`~pytest_runs.liveness.stale_reason`) end as ``interrupted`` with
        ``error_code`` ``owner_lost``, so a killed session never blocks its machine.
        """
        _require_name(machine, "machine")
        _require_name(test_dir_hash, "test dir hash")
        with self._locked() as runs:
            reclaimed = self._reclaim_stale(runs, machine)
            active = _active(runs, machine)
            if active is not None:
                if reclaimed:
                    self._write(runs)
                outcome = PrepareOutcome.REUSE if active.test_dir_hash == test_dir_hash else PrepareOutcome.BUSY
                return active, outcome
            run = mk()
            if not isinstance(run, Run):
                raise TypeError(f"mk() must return a Run, not {type(run).__name__}")
            for field, wanted in (("machine", machine), ("test_dir_hash", test_dir_hash)):
                if getattr(run, field) not in ("", wanted):
                    raise ValueError(f"mk() returned a run with {field}={getattr(run, field)!r}, not {wanted!r}")
                setattr(run, field, wanted)
            if run.status.is_terminal:
                raise ValueError(f"mk() must return a pending or running run, not {run.status.value}")
            self._append(runs, run)
            self._write(runs)
            return _copy(run), PrepareOutcome.CREATED

    # -- lifecycle rules shared by the plugin and the command line --------------------

    def start(self, run_id: str, **changes: Any) -> Run:
        """Claim a pending run: mark it running (``started_at`` now unless given) with ``changes``.

        Atomic, so of several sessions claiming one reservation exactly one wins; the
        others get :class:`InvalidTransition` (it is running) or :class:`RunEnded`.
        """

        def claim(run: Run) -> None:
            if run.status.is_terminal:
                raise RunEnded(run, "start")
            if run.status is not Status.PENDING:
                raise InvalidTransition(f"run {run.id} is already {run.status.value}")
            changes.setdefault("started_at", _utcnow())
            _apply(run, status=Status.RUNNING, **changes)

        return self._modify(run_id, claim)

    def finish(
        self,
        run_id: str,
        status: Status,
        *,
        exit_code: int | None = None,
        error_code: str = "",
        error_msg: str = "",
        ended_at: datetime | None = None,
        summary: dict[str, Any] | None = None,
        owner: Owner | None = None,
    ) -> Run:
        """End a non-terminal run with a terminal ``status``; :class:`RunEnded` if it already ended.

        A run ended elsewhere (released, reclaimed) is never overwritten. With ``owner``, a
        run that another owner holds is refused with :class:`InvalidTransition`.
        """
        if not Status(status).is_terminal:
            raise ValueError(f"finish needs a terminal status, not {Status(status).value}")
        return self._end(
            run_id,
            "finish",
            owner=owner,
            status=Status(status),
            exit_code=exit_code,
            error_code=error_code,
            error_msg=error_msg,
            ended_at=ended_at or _utcnow(),
            summary=summary,
        )

    def release(self, run_id: str, reason: str) -> Run:
        """Free a machine whose holder is gone: end the run as ``interrupted``/``released``."""
        _require_name(reason, "reason")
        return self._end(
            run_id,
            "release",
            status=Status.INTERRUPTED,
            error_code="released",
            error_msg=f"released: {reason}",
            ended_at=_utcnow(),
        )

    def _end(self, run_id: str, action: str, owner: Owner | None = None, **outcome: Any) -> Run:
        """Apply a terminal ``outcome`` to a run that has not ended; :class:`RunEnded` if it has."""

        def end(run: Run) -> None:
            if run.status.is_terminal:
                raise RunEnded(run, action)
            if owner is not None and not owner.owns(run):
                raise InvalidTransition(f"run {run.id} is owned by another process ({describe_owner(run)})")
            _apply(run, **outcome)

        return self._modify(run_id, end)

    def heartbeat(self, run_id: str, owner: Owner) -> Run:
        """Refresh ``heartbeat_at`` of a run that is still ``owner``'s and not ended; nothing else changes.

        Raises :class:`RunEnded` if the run has ended (it was released or reclaimed) and
        :class:`InvalidTransition` if another process owns it: a heartbeat never
        overwrites a concurrent finish or release.
        """

        def beat(run: Run) -> None:
            if run.status.is_terminal:
                raise RunEnded(run, "heartbeat")
            if not owner.owns(run):
                raise InvalidTransition(f"run {run.id} is owned by another process ({describe_owner(run)})")
            run.heartbeat_at = _utcnow()

        return self._modify(run_id, beat)

    def stale_reason(self, run: Run) -> str | None:
        """Why ``run`` has lost its owner (by its liveness lock, else its own lease); ``None`` if it has not."""
        return liveness.stale_reason(run, _utcnow(), self._boot_id, self.state_dir)

    def machines(self) -> builtins.list[MachineState]:
        """One entry per machine seen in the store, sorted by name."""
        with self._locked(readonly=True) as runs:
            names = sorted({r.machine for r in runs})
            states = []
            for name in names:
                ended = [r for r in runs if r.machine == name and r.status.is_terminal]
                last = max(ended, key=_end_order, default=None)
                states.append(MachineState(machine=name, active=_active(runs, name), last=last))
            return states

    def prune(
        self,
        *,
        keep: int | None = None,
        older_than: timedelta | None = None,
        dry_run: bool = False,
        now: datetime | None = None,
    ) -> RunList:
        """Delete terminal runs, and their run folders, by one rule; return the runs removed.

        ``keep=N`` keeps the N newest terminal runs of each machine; ``older_than`` removes
        terminal runs whose ``ended_at`` is older than that. Pending and running runs are
        never touched. With ``dry_run`` nothing is deleted.
        """
        if (keep is None) == (older_than is None):
            raise ValueError("prune needs exactly one of keep or older_than")
        if keep is not None and keep < 0:
            raise ValueError(f"keep must be >= 0, got {keep}")
        cutoff = (now or _utcnow()) - older_than if older_than is not None else None
        with self._locked(readonly=dry_run) as runs:
            doomed_ids: set[str] = set()
            if keep is not None:
                for name in {r.machine for r in runs}:
                    ended = sorted(
                        (r for r in runs if r.machine == name and r.status.is_terminal),
                        key=_end_order,
                        reverse=True,
                    )
                    doomed_ids.update(r.id for r in ended[keep:])
            else:
                assert cutoff is not None
                doomed_ids = {
                    r.id for r in runs if r.status.is_terminal and r.ended_at is not None and r.ended_at < cutoff
                }
            doomed = [r for r in runs if r.id in doomed_ids]
            if not dry_run:
                if doomed:
                    self._write([r for r in runs if r.id not in doomed_ids])
                # In the same critical section: no run can come to name a lock file meanwhile.
                self._remove_orphaned_liveness_locks(runs)
        if not dry_run:
            for run in doomed:
                self._remove_files(run)
        return doomed

    def _remove_orphaned_liveness_locks(self, runs: RunList) -> None:
        """Lock files of sessions killed while waiting (they had no run to be reclaimed with)."""
        folder = self.state_dir / liveness.OWNERS_DIR_NAME
        if os.path.islink(folder) or not folder.is_dir():
            return
        named = {r.owner_token for r in runs if not r.status.is_terminal and r.owner_token}
        for path in folder.glob("*.lock"):
            token = path.name.removesuffix(".lock")
            # Not named by an active run, older than a minute (never one being taken), and free.
            with contextlib.suppress(OSError):
                old = _utcnow().timestamp() - path.lstat().st_mtime > 60
                if token not in named and old and liveness.probe(self.state_dir, token) is False:
                    path.unlink()

    def run_dir(self, run_id: str) -> Path:
        """The folder that holds a run's log and artifacts: ``<state_dir>/runs/<id>``.

        Refuses an ID that could point anywhere else.
        """
        if not isinstance(run_id, str) or not _RUN_ID.match(run_id):
            raise StateError(f"run ID {run_id!r} is not a safe path component; refusing to build paths from it")
        return self.state_dir / RUNS_DIR_NAME / run_id

    def make_run_dir(self, run_id: str) -> Path:
        """Create (0700, whatever the umask) the run folder and its ``artifacts`` folder; return the run folder.

        Never follows a symlink: a ``runs`` folder, run folder or ``artifacts`` folder that
        is a symbolic link (or not a folder) is refused with :class:`StateError`.
        """
        folder = self.run_dir(run_id)
        self._ensure_dir()
        for where in (folder.parent, folder, folder / "artifacts"):
            _make_private_dir(where)
        return folder

    def open_log(self, run_id: str) -> IO[str]:
        """The run's ``log.jsonl``, opened to append (0600, never through a symlink), UTF-8."""
        path = self.make_run_dir(run_id) / "log.jsonl"
        fd = _open_regular_file(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, "run log")
        return open(fd, "a", encoding="utf-8", errors="backslashreplace")

    def hash_cache(self, test_dir: Path) -> HashCache:
        """The stat cache of ``test_dir``'s file digests, ``<state dir>/hash-cache/<key>.json``."""
        self._ensure_dir()
        folder = self.state_dir / HASH_CACHE_DIR_NAME
        _make_private_dir(folder)
        key = hashlib.sha256(os.fsencode(os.path.realpath(test_dir))).hexdigest()[:32]
        return HashCache(folder / f"{key}.json")

    def liveness_lock(self) -> liveness.LivenessLock:
        """A new liveness lock in this store, already held; :class:`StateError` if it cannot be taken."""
        self._ensure_dir()
        lock = liveness.LivenessLock(self.state_dir)
        try:
            lock.acquire()
        except OSError as error:
            raise StateError(f"cannot take a liveness lock in {self.state_dir}: {_oserror_text(error)}") from None
        return lock

    # -- internals --------------------------------------------------------------------

    def _check_dir(self) -> None:
        """Refuse a state dir that can never work, or that others may write to."""
        where = self.state_dir
        try:
            info = os.lstat(where)
        except FileNotFoundError:
            return
        except NotADirectoryError:
            raise StateError(f"cannot create state dir {where}: a parent is not a directory") from None
        except OSError as error:
            raise StateError(f"cannot use state dir {where}: {_oserror_text(error)}") from None
        if stat.S_ISLNK(info.st_mode):
            info = os.stat(where)  # a symlinked state dir is the user's choice; its target must be sound
        if not stat.S_ISDIR(info.st_mode):
            raise StateError(f"state dir {where} exists and is not a directory")
        if info.st_mode & stat.S_IWOTH and not info.st_mode & stat.S_ISVTX:
            raise StateError(
                f"state dir {where} can be written by any user (mode {stat.S_IMODE(info.st_mode):04o}); "
                f"make it private with: chmod 700 {where}"
            )
        if not os.access(where, os.W_OK | os.X_OK):
            raise StateError(f"state dir {where} is not writable")

    def _ensure_dir(self) -> None:
        where = self.state_dir
        if where.is_dir():
            return
        try:
            where.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as error:
            reason = "a parent is not a directory" if isinstance(error, FileExistsError) else _oserror_text(error)
            raise StateError(f"cannot create state dir {where}: {reason}") from None
        try:
            os.mkdir(where, 0o700)
            # mkdir's mode is filtered through the umask; make it exactly 0700.
            os.chmod(where, 0o700)
        except FileExistsError:
            if not where.is_dir():  # another thread or process may have made it meanwhile: fine
                raise StateError(f"state dir {where} exists and is not a directory") from None
        except OSError as error:
            reason = "a parent is not a directory" if isinstance(error, NotADirectoryError) else _oserror_text(error)
            raise StateError(f"cannot create state dir {where}: {reason}") from None

    @contextlib.contextmanager
    def _locked(self, *, readonly: bool = False) -> Iterator[RunList]:
        if getattr(self._inside, "active", False):
            raise RuntimeError(f"{self!r} was called again from inside one of its own operations (from mk?)")
        if readonly and not self.state_path.exists() and not self.state_path.is_symlink():
            yield []  # nothing to read, and looking must not create the store
            return
        self._ensure_dir()
        if not self._mutex.acquire(timeout=self.lock_timeout):
            raise StoreLocked(
                f"store {self.state_dir} is busy in another thread of this process for more than "
                f"{self.lock_timeout:g}s",
                [os.getpid()],
            )
        try:
            self._inside.active = True
            self._refuse_symlink(self.lock_path, "lock file")
            try:
                self._file_lock.acquire(timeout=self.lock_timeout)
            except TimeoutError:
                raise self._locked_out() from None
            except OSError as error:
                raise StateError(f"cannot lock {self.lock_path}: {_oserror_text(error)}") from None
            try:
                yield self._read()
            finally:
                self._file_lock.release()
        finally:
            self._inside.active = False
            self._mutex.release()

    def _locked_out(self) -> StoreLocked:
        holders = lock_holders(self.lock_path)
        if holders == [os.getpid()]:
            # Another Store on this dir, used inside a critical section of this one?
            who = f" by this process (PID {os.getpid()}), through another Store object,"
        else:
            who = f" by PID {', '.join(map(str, holders))}" if holders else ""
        return StoreLocked(
            f"store lock {self.lock_path} has been held{who} for more than {self.lock_timeout:.3g}s; "
            "if that process is stuck, stop it",
            holders,
        )

    @staticmethod
    def _refuse_symlink(path: Path, what: str) -> None:
        if path.is_symlink():
            raise StateError(f"{what} {path} is a symbolic link; refusing to use it")

    def _read(self) -> RunList:
        path = self.state_path
        try:
            fd = _open_regular_file(path, os.O_RDONLY, "state file")
        except FileNotFoundError:
            return []
        with open(fd, "rb") as handle:
            raw = handle.read()
        runs, self._fences, self._read_version = _decode_state(raw, path)
        return runs

    def _write(self, runs: RunList) -> None:
        data = _encode_state(runs, self._fences)
        if self._read_version < FORMAT_VERSION:
            self._keep_backup_of_old_format()
        self._refuse_symlink(self.state_path, "state file")
        self._remove_orphaned_temporaries()
        tmp_path: str | None = None
        try:
            # mkstemp creates the file 0600 whatever the umask.
            fd, tmp_path = tempfile.mkstemp(dir=self.state_dir, prefix=f".{STATE_FILE_NAME}.", suffix=".tmp")
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp_path, self.state_path)
            tmp_path = None
            dir_fd = os.open(self.state_dir, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as error:
            raise StateError(
                f"cannot write state file {self.state_path}: {_oserror_text(error)}; the previous state is intact"
            ) from None
        finally:
            if tmp_path is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp_path)

    def _keep_backup_of_old_format(self) -> None:
        # A hard link keeps the old file's bytes once the new state is renamed over it.
        backup = self.state_dir / f"{STATE_FILE_NAME}.v{self._read_version}.bak"
        with contextlib.suppress(FileNotFoundError, FileExistsError):
            os.link(self.state_path, backup)
            _log.warning(
                "pytest-runs: upgraded state file %s from format %d to %d; the old file is kept as %s",
                self.state_path,
                self._read_version,
                FORMAT_VERSION,
                backup,
            )
        self._read_version = FORMAT_VERSION

    def _remove_orphaned_temporaries(self) -> None:
        # Temporaries are only written under the file lock, which we hold: any still here
        # belong to a writer that was killed mid-write.
        for orphan in self.state_dir.glob(f".{STATE_FILE_NAME}.*.tmp"):
            with contextlib.suppress(OSError):
                orphan.unlink()

    def _reclaim_stale(self, runs: RunList, machine: str) -> bool:
        now = _utcnow()
        reclaimed = False
        for run in runs:
            if run.machine != machine:
                continue
            reason = liveness.stale_reason(run, now, self._boot_id, self.state_dir)
            if reason is None:
                continue
            _apply(
                run,
                status=Status.INTERRUPTED,
                error_code="owner_lost",
                error_msg=f"owner lost ({describe_owner(run)}): {reason}",
                ended_at=now,
            )
            if liveness.observable(run, self._boot_id):
                liveness.remove_lock_file(self.state_dir, run.owner_token)
            reclaimed = True
        return reclaimed

    def _append(self, runs: RunList, run: Run) -> None:
        run.id = _new_id(runs)
        if not run.status.is_terminal:
            run.fence = self._next_fence(runs, run.machine)
        runs.append(_copy(run))

    def _next_fence(self, runs: RunList, machine: str) -> int:
        # The counter survives prune; the runs' own fences cover a store whose counter was lost.
        latest = max((r.fence or 0 for r in runs if r.machine == machine), default=0)
        fence = max(self._fences.get(machine, 0), latest) + 1
        self._fences[machine] = fence
        return fence

    @staticmethod
    def _index(runs: RunList, run_id: str) -> int:
        for index, run in enumerate(runs):
            if run.id == run_id:
                return index
        raise RunNotFound(run_id)

    def _modify(self, run_id: str, change: Callable[[Run], None]) -> Run:
        with self._locked() as runs:
            index = self._index(runs, run_id)
            change(runs[index])
            self._write(runs)
            return runs[index]

    def _remove_files(self, run: Run) -> None:
        try:
            folder = self.run_dir(run.id)
        except StateError:
            return  # an ID we did not generate: nothing of ours to delete
        if os.path.islink(folder.parent) or not folder.parent.is_dir():
            return  # a symlinked runs folder leads outside the store: delete nothing through it
        # rmtree refuses a symlinked root and never follows symlinks inside it.
        shutil.rmtree(folder, ignore_errors=True)


def _encode_state(runs: RunList, fences: dict[str, int]) -> bytes:
    # One run per line: readable and diffable, and each line goes through json's C encoder
    # (an indent would force its pure-Python one, about ten times slower on a large store).
    header = json.dumps({"format": FORMAT_NAME, "version": FORMAT_VERSION, "fences": fences})[:-1]
    # ASCII escapes: any text a run holds (a surrogate from an undecodable path) stays valid JSON.
    lines = ",\n".join(json.dumps(r.to_dict()) for r in runs)
    return f'{header}, "runs": [\n{lines}\n]}}\n'.encode()


def _decode_state(raw: bytes, path: Path) -> tuple[RunList, dict[str, int], int]:
    if not raw.strip():
        raise StateError(f"state file {path} is empty; refusing to treat it as an empty store")
    try:
        document = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise StateError(f"state file {path} is not valid JSON ({error})") from None
    except (ValueError, RecursionError) as error:
        # A number of thousands of digits, or nesting deeper than Python's stack.
        what = "nested too deeply" if isinstance(error, RecursionError) else str(error).split(";")[0]
        raise StateError(f"state file {path} cannot be read: {what}") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT_NAME:
        raise StateError(f'state file {path} is not a pytest-runs state file (no "format": "{FORMAT_NAME}")')
    version = document.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise StateError(f"state file {path} has an invalid format version {version!r}")
    if version > FORMAT_VERSION:
        raise StateError(
            f"state file {path} has format version {version}, newer than this pytest-runs reads "
            f"({FORMAT_VERSION}); upgrade pytest-runs"
        )
    records = document.get("runs")
    if not isinstance(records, list):
        raise StateError(f'state file {path} has no "runs" list')
    fences = document.get("fences", {})
    if not isinstance(fences, dict) or not all(
        isinstance(value, int) and not isinstance(value, bool) for value in fences.values()
    ):
        raise StateError(f'state file {path} has a bad "fences" map (machine names to integers)')
    runs = []
    for position, record in enumerate(records):
        try:
            run = Run.from_dict(record)
            if missing := [key for key in _REQUIRED_KEYS if not record.get(key)]:
                raise ValueError(f"required field {missing[0]!r} is missing or empty")
            runs.append(run)
        except (TypeError, ValueError) as error:
            raise StateError(f"state file {path}: run #{position}: {error}") from None
    return runs, fences, version


def _copy(run: Run) -> Run:
    duplicate: Run = copy.deepcopy(run)
    return duplicate


def _active(runs: RunList, machine: str) -> Run | None:
    for run in runs:
        if run.machine == machine and not run.status.is_terminal:
            return _copy(run)
    return None


def _end_order(run: Run) -> tuple[datetime, str]:
    return (run.ended_at or datetime.min.replace(tzinfo=UTC), run.id)


def _apply(run: Run, **changes: Any) -> None:
    for name, value in changes.items():
        if not hasattr(run, name) or name == "id":
            raise TypeError(f"unknown or read-only run field {name!r}")
        setattr(run, name, value)


def _check_transition(stored: Run, new: Run) -> None:
    if stored.status.is_terminal and new.status != stored.status:
        raise InvalidTransition(
            f"run {stored.id} has ended as {stored.status.value}; it cannot become {Status(new.status).value}"
        )
    for field in ("machine", "test_dir_hash"):
        if getattr(new, field) != getattr(stored, field):
            raise InvalidTransition(f"run {stored.id}: {field} cannot change after creation")


def _new_id(runs: RunList) -> str:
    """``YYYYMMDD-HHMMSS-ffffff-xxxxxx``: sorts in creation order, safe in paths and URLs."""
    moment = _utcnow()
    # Created under the store lock, so a strictly later time than every earlier ID
    # keeps IDs in creation order even if the clock steps back.
    latest = max((created for r in runs if (created := run_created_at(r.id)) is not None), default=None)
    if latest is not None and moment <= latest:
        moment = latest + timedelta(microseconds=1)
    return moment.strftime("%Y%m%d-%H%M%S-%f") + "-" + secrets.token_hex(3)


def lock_holders(path: Path) -> builtins.list[int]:
    """PIDs that hold a lock on ``path``, from ``/proc/locks`` (Linux); empty where the kernel does not tell."""
    try:
        info = os.stat(path)
        with open("/proc/locks", encoding="ascii", errors="replace") as handle:
            table = handle.read()
    except OSError:
        return []
    where = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    holders = []
    for line in table.splitlines():
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 4242 08:01:123 0 EOF"; waiters have a "->" before the kind.
        if len(fields) >= 6 and fields[1] != "->" and fields[5] == where and fields[4].lstrip("-").isdigit():
            pid = int(fields[4])
            if pid > 0 and pid not in holders:
                holders.append(pid)
    return holders


def _open_regular_file(path: Path, flags: int, what: str) -> int:
    """Open ``path`` (created 0600 with ``O_CREAT``) never through a symlink, and only if it is a regular file.

    ``FileNotFoundError`` passes through; any other failure is a :class:`StateError` naming ``what``.
    """
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except FileNotFoundError:
        raise
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise StateError(f"{what} {path} is a symbolic link; refusing to use it") from None
        raise StateError(f"cannot open {what} {path}: {_oserror_text(error)}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise StateError(f"{what} {path} is not a regular file")
    return fd


def _make_private_dir(path: Path) -> None:
    try:
        os.mkdir(path, 0o700)
        os.chmod(path, 0o700)  # whatever the umask
    except FileExistsError:
        pass
    except OSError as error:
        raise StateError(f"cannot create {path}: {_oserror_text(error)}") from None
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        raise StateError(f"{path} is a symbolic link; refusing to write through it")
    if not stat.S_ISDIR(info.st_mode):
        raise StateError(f"{path} exists and is not a folder")
