"""The run store: every lifecycle rule, once, above a small backend.

:class:`Store` decides (busy, reuse, claim, stale, fence, release, retention, prune); a
backend (:mod:`pytest_runs.backend`) only keeps runs, inside transactions that exclude
each other across threads and processes, commit all or nothing, and are durable when
they return. Nothing is cached between calls, so any number of processes and ``Store``
objects on one store see each other's writes. Entering a transaction never blocks
forever: past ``lock_timeout`` seconds a call raises :class:`StoreLocked`, naming the
lock and, where the kernel tells, the PID that holds it.

The default backend keeps runs as JSON files in the state dir (:mod:`pytest_runs.filebackend`):
the active runs in ``runs.json``, ended runs in per-machine history files, so the calls a
session makes cost the same however much history is kept.
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import hashlib
import itertools
import os
import re
import secrets
import shutil
import socket
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

from . import sharing
from .backend import Backend, OwnerLock, Transaction
from .errors import ConnectionLost, InvalidTransition, RunEnded, RunNotFound, StateError, StoreLocked
from .filebackend import (
    FORMAT_NAME,
    FORMAT_VERSION,
    FileBackend,
    ensure_state_dir,
    lock_holders,
    make_private_dir,
    open_regular_file,
)
from .hashing import HashCache
from .liveness import DEFAULT_LEASE
from .model import PrepareOutcome, Run, Status, in_run_order, run_created_at
from .owner import Owner, describe_owner
from .queue import CLAIM_DEADLINE, InLine, Waiter, place_in_line, serve_order
from .settings import DEFAULT_LOCK_TIMEOUT

# An alias, because inside Store the name ``list`` is the method.
RunList = list[Run]

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "InvalidTransition",
    "MachineState",
    "RunEnded",
    "RunNotFound",
    "StateError",
    "Store",
    "StoreLocked",
    "lock_holders",
    "open_store",
]

RUNS_DIR_NAME = "runs"
HASH_CACHE_DIR_NAME = "hash-cache"

_RUN_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclasses.dataclass(frozen=True)
class MachineState:
    """What the store knows about one machine."""

    machine: str
    #: The earliest-inserted pending or running run, or ``None`` when the machine is idle.
    active: Run | None
    #: The newest run (by creation) that has ended, or ``None``.
    last: Run | None
    #: How many live sessions wait in line for it (alone or as one of a pool).
    waiting: int = 0
    #: ``active`` is a machine handed to a waiter that has not claimed it for this many seconds.
    unclaimed_for: float | None = None


@dataclasses.dataclass(frozen=True)
class Prepared:
    """What :meth:`Store.prepare` found or did."""

    outcome: PrepareOutcome
    #: ``CREATED``/``REUSE``: the run. ``BUSY``: the run on the first machine asked for.
    run: Run
    #: With ``wait_as``, while busy: 1 + the waiters served first that want one of its machines.
    place: int | None = None
    #: ``BUSY``: ``run`` was handed to a waiter that has not claimed it for this many seconds.
    unclaimed_for: float | None = None
    #: While busy: in this many seconds a machine asked for passes on from a waiter that has not
    #: claimed it (look again then, even if nothing else changed).
    look_again_in: float | None = None


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _require_name(value: str, what: str) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string, got {value!r}")


def _oserror_text(error: OSError) -> str:
    return error.strerror or str(error)


def open_store(
    state_dir: str | os.PathLike[str],
    store_url: str | None = None,
    *,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
    keep: int | None = None,
    claim_deadline: float = CLAIM_DEADLINE,
) -> Store:
    """A :class:`Store` on the JSON files in ``state_dir``, or on the database ``store_url`` names.

    Run folders (logs, artifacts) and hash caches stay in ``state_dir`` either way.
    """
    backend: Backend | None = None
    if store_url:
        from .pgbackend import PgBackend

        backend = PgBackend(store_url, lock_timeout=lock_timeout)
    return Store(state_dir, lock_timeout=lock_timeout, keep=keep, backend=backend, claim_deadline=claim_deadline)


class Store:
    """Runs of one state dir, safe across threads and processes.

    ``state_dir`` holds run folders (logs, artifacts), liveness locks and hash caches, and,
    with the default backend, the runs themselves; it is created with mode 0700 on the
    first write, and reading a store that does not exist creates nothing. An existing state
    dir that others may write to is refused; one shared with a group (setgid, group write:
    :mod:`pytest_runs.sharing`) gets group-writable files and folders; one that this user
    cannot fully use is refused, naming what it cannot use. Returned runs are copies:
    changing one changes nothing until :meth:`update`. Every call waits at most ``lock_timeout`` seconds for the
    store's locks, then raises :class:`StoreLocked`.

    ``keep`` (retention): when a run ends, only the ``keep`` newest ended runs of its
    machine are kept; older ones, and their run folders, are deleted. ``None`` keeps all.
    ``claim_deadline``: see :mod:`pytest_runs.queue`.
    """

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        *,
        lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
        keep: int | None = None,
        backend: Backend | None = None,
        claim_deadline: float = CLAIM_DEADLINE,
    ) -> None:
        if not 0 < lock_timeout < 1e9:
            raise ValueError(f"lock_timeout must be a positive number of seconds, not {lock_timeout!r}")
        if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 0):
            raise ValueError(f"keep must be a whole number >= 0 or None, not {keep!r}")
        if not 0 < claim_deadline < 1e9:
            raise ValueError(f"claim_deadline must be a positive number of seconds, not {claim_deadline!r}")
        self.keep = keep
        #: Seconds a waiter has to claim a machine handed to it before it goes to the next waiter
        #: (:data:`~pytest_runs.queue.CLAIM_DEADLINE`; every ``Store`` on one store should agree).
        self.claim_deadline = claim_deadline
        self.state_dir = Path(state_dir).absolute()
        self._files = FileBackend(self.state_dir, lock_timeout=lock_timeout)
        self.backend: Backend = backend if backend is not None else self._files
        # For tests and tools that look at the JSON files: where the default backend keeps them.
        self.state_path = self._files.state_path
        self.lock_path = self._files.lock_path
        # Runs that retention deleted in this thread's current transaction.
        self._local = threading.local()

    def __repr__(self) -> str:
        return f"Store({str(self.state_dir)!r})"

    @property
    def lock_timeout(self) -> float:
        """How long a call waits for the store's locks (settable: a waiting session shortens it)."""
        return self.backend.lock_timeout

    @lock_timeout.setter
    def lock_timeout(self, seconds: float) -> None:
        self.backend.lock_timeout = seconds
        self._files.lock_timeout = seconds

    # -- the contract of the Go store -------------------------------------------------

    def create(self, run: Run) -> Run:
        """Give ``run`` a fresh ID (overwriting any it had), append and persist it; return it.

        A pending or running run also gets the machine's next ``fence``, and is refused with
        :class:`InvalidTransition` if its machine already has one (the Go package allowed
        that; here, as in the database backend's index, a machine holds one active run).
        """
        return self.create_many([run])[0]

    def create_many(self, runs: Iterable[Run]) -> RunList:
        """:meth:`create` for many runs in one critical section (an import, a benchmark's history)."""
        created = []
        with self._transaction() as tx:
            latest = tx.latest_id()
            busy = {run.machine: run for run in tx.active()}
            for run in runs:
                _require_name(run.machine, "machine")
                if not run.status.is_terminal:
                    if (holder := busy.get(run.machine)) is not None:
                        raise InvalidTransition(
                            f"machine {run.machine} already has an active run ({holder.id}, {holder.status.value}); "
                            "a machine holds one pending or running run at a time"
                        )
                    busy[run.machine] = run
                latest = self._add(tx, run, latest)
                created.append(run)
            for machine in {run.machine for run in created if run.status.is_terminal}:
                self._retain(tx, machine)
        return created

    def get(self, run_id: str) -> Run:
        """A copy of the run with that ID; :class:`RunNotFound` if there is none."""
        with self._transaction(write=False) as tx:
            return _found(tx.get(run_id), run_id)

    def list(self) -> RunList:
        """Every run, in insertion order. Reads the whole history: see :meth:`recent`."""
        with self._transaction(write=False) as tx:
            return sorted(itertools.chain(tx.active(), tx.ended()), key=in_run_order)

    def recent(
        self,
        limit: int | None = None,
        where: Callable[[Run], bool] | None = None,
        *,
        stop: Callable[[Run], bool] | None = None,
    ) -> RunList:
        """The newest runs first, at most ``limit`` of them, only those ``where`` accepts.

        Reads history from its newest end, so a small ``limit`` costs little however much
        is kept; ``stop`` ends the reading at the first run it accepts (older ones are not read).
        """
        with self._transaction(write=False) as tx:
            runs: Iterator[Run] = tx.newest_first()
            if stop is not None:
                runs = itertools.takewhile(lambda run: not stop(run), runs)
            if where is not None:
                runs = filter(where, runs)
            return builtins.list(itertools.islice(runs, limit))

    def update(self, run: Run) -> None:
        """Overwrite the stored record with ``run.id``.

        Raises :class:`RunNotFound` for an unknown ID and :class:`InvalidTransition` when
        the update would move a terminal run to another status or change a run's machine
        or test-dir hash (either could put two active runs on one machine).
        """
        with self._transaction() as tx:
            stored = _found(tx.get(run.id), run.id)
            _check_transition(stored, run)
            tx.replace(run)
            if run.status.is_terminal and not stored.status.is_terminal:
                self._ended(tx, run.machine)

    def active_by_machine(self, name: str) -> Run | None:
        """The earliest-inserted pending or running run on machine ``name``, or ``None``."""
        with self._transaction(write=False) as tx:
            return _active(tx.active(), name)

    def find_by_test_dir_hash_and_machine(self, test_dir_hash: str, machine: str) -> RunList:
        """Every run with that (hash, machine), in insertion order. Reads the whole history."""
        return [r for r in self.list() if r.test_dir_hash == test_dir_hash and r.machine == machine]

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
        Sessions waiting in line come first: a free machine someone waits for is handed to
        them, and is then ``BUSY`` with their pending run (see :meth:`prepare`).
        """
        prepared = self.prepare([machine], test_dir_hash, mk)
        return prepared.run, prepared.outcome

    def prepare(
        self,
        machines: Sequence[str],
        test_dir_hash: str,
        mk: Callable[[], Run],
        *,
        wait_as: Waiter | None = None,
    ) -> Prepared:
        """Take one of ``machines`` (the first free one), reuse a run of these tests on one, or find them busy.

        In one critical section: stale runs of ``machines`` are reclaimed, dead waiters
        leave the line, and each free machine that a live waiter wants is handed to the
        first of them (a pending run in its name). Then a pending or running run of
        ``test_dir_hash`` on any of them is returned with ``REUSE`` (a reservation, or the
        machine handed to this waiter); else the first free machine gets a new run from
        ``mk()``, with ``CREATED``; else ``BUSY``, with the run on the first machine. With
        ``wait_as``, a caller that is not served is put in line (or keeps its place, its
        heartbeat refreshed), and learns its place; it stays in line until it claims its run
        (:meth:`start`).

        A machine handed to another waiter that has not claimed it within ``claim_deadline``
        seconds is taken back (that run ends ``interrupted``/``unclaimed``) and handed to the
        next waiter; the one passed over keeps its place, and hand-overs pass it by until it
        looks again (this call, with its ``wait_as``).
        """
        names = list(dict.fromkeys(machines))
        if not names:
            raise ValueError("prepare needs at least one machine")
        for name in names:
            _require_name(name, "machine")
        _require_name(test_dir_hash, "test dir hash")
        with self._transaction() as tx:
            now = tx.now()
            token = wait_as.token if wait_as is not None else None
            if token:
                self._looked(tx, token)
            for name in names:
                self._reclaim_stale(tx, name)
                self._pass_on_unclaimed(tx, name, now, spare=token)
            busy = {run.machine for run in tx.active()}
            for name in names:
                if name not in busy:
                    self._hand_over(tx, name)
            line = self._live_waiters(tx)
            everywhere = tx.active()
            active = {run.machine: run for run in everywhere if run.machine in names}
            same_tests: Run | None = None
            for name in names:
                run = active.get(name)
                if run is None or run.test_dir_hash != test_dir_hash:
                    continue
                # A pending run in another live session's name (handed to a waiter, or just
                # created by a session about to claim it) is its own, even for the same tests.
                if run.status is Status.PENDING and run.owner_token not in ("", token):
                    continue
                if run.status is Status.PENDING or wait_as is None:
                    # A waiter keeps its place until it claims the run (start), so that a machine
                    # handed to it passes on if it stops before claiming it.
                    return Prepared(PrepareOutcome.REUSE, run)
                same_tests = same_tests or run  # running: a waiter keeps (or takes) its place in line
            holding = _holding(everywhere)
            order = serve_order(line)
            mine = next((index for index, waiter in enumerate(order) if waiter.token == token), None)
            for name in names:
                if name not in active and same_tests is None:  # free, and no live waiter wants it
                    run = _made(mk, name, test_dir_hash)
                    self._add(tx, run, tx.latest_id())
                    if mine is not None:  # in line until it claims it, as if handed to it
                        tx.put_waiter(dataclasses.replace(order[mine], handed_at=now))
                    return Prepared(PrepareOutcome.CREATED, dataclasses.replace(run))
            holder = same_tests or active[names[0]]
            outcome = PrepareOutcome.REUSE if same_tests is not None else PrepareOutcome.BUSY
            handovers = self._handovers(line, everywhere, now)
            unclaimed = handovers[holder.owner_token][1] if holder.owner_token in handovers else None
            passes_on = [self.claim_deadline - held for run, held in handovers.values() if run.machine in names]
            look_again = max(0.0, min(passes_on)) if passes_on else None
            if wait_as is None:
                return Prepared(outcome, holder, unclaimed_for=unclaimed, look_again_in=look_again)
            known = order[mine] if mine is not None else None
            entry = known
            if known is None or known.machines != names or known.priority != wait_as.priority or _beat_due(known, now):
                # Written only when something changed, or to refresh its heartbeat now and then:
                # every write wakes the other waiters, who look again.
                since = known.since if known is not None else now
                entry = Waiter(names, wait_as.priority, since, dataclasses.replace(wait_as.run, heartbeat_at=now))
                tx.put_waiter(entry)
            assert entry is not None
            # Those handed a machine wait no more: they count for nobody's place.
            others = [waiter for waiter in line if waiter.token != token and waiter.token not in holding]
            place = place_in_line([*others, entry], entry.token)
            return Prepared(outcome, holder, place, unclaimed_for=unclaimed, look_again_in=look_again)

    def leave_queue(self, token: str) -> None:
        """A waiter gives up: out of the line at once, and a machine just handed to it goes to the next."""
        with self._transaction() as tx:
            tx.remove_waiter(token)
            for run in tx.active():
                if run.owner_token == token and run.status is Status.PENDING:
                    _apply(run, status=Status.INTERRUPTED, error_code="gave_up", ended_at=tx.now(),
                           error_msg="handed a machine, its waiter gave up before claiming it")  # fmt: skip
                    tx.replace(run)
                    self._ended(tx, run.machine)

    def queue(self, machine: str | None = None) -> builtins.list[Waiter]:
        """The live waiters (for ``machine``, or all), in the order they will be served.

        A waiter stays in line until it claims the machine handed to it: see :meth:`line`.
        """
        return [entry.waiter for entry in self.line(machine)]

    def line(self, machine: str | None = None) -> builtins.list[InLine]:
        """:meth:`queue` with each waiter's place, and the machine handed to it that it has not claimed."""
        with self._transaction(write=False) as tx:
            line = [waiter for waiter in tx.waiters() if tx.stale_reason(waiter.as_owner()) is None]
            handovers = self._handovers(line, tx.active(), tx.now())
        entries = []
        place = 0
        for waiter in serve_order(line):
            if machine is not None and not waiter.wants(machine):
                continue
            if waiter.token in handovers:
                run, unclaimed = handovers[waiter.token]
                entries.append(InLine(waiter, None, run, unclaimed))
            else:
                place += 1
                entries.append(InLine(waiter, place))
        return entries

    # -- lifecycle rules shared by the plugin and the command line --------------------

    def start(self, run_id: str, **changes: Any) -> Run:
        """Claim a pending run: mark it running (``started_at`` now unless given) with ``changes``.

        Atomic, so of several sessions claiming one reservation exactly one wins; the
        others get :class:`InvalidTransition` (it is running) or :class:`RunEnded`.
        """

        tried = False

        def claim(run: Run, now: datetime) -> None:
            nonlocal tried
            if run.status.is_terminal:
                raise RunEnded(run, "start")
            if run.status is not Status.PENDING:
                if tried and run.status is Status.RUNNING and run.owner_token == changes.get("owner_token", "") != "":
                    raise _Done(run)  # a retry: the attempt whose answer was lost had claimed it
                raise InvalidTransition(f"run {run.id} is already {run.status.value}")
            tried = True
            changes.setdefault("started_at", now)
            _apply(run, status=Status.RUNNING, **changes)

        return self._modify(run_id, claim, then=self._claimed)

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
        run that another owner holds is refused with :class:`InvalidTransition`. Retention
        (``keep``) is applied to the run's machine in the same critical section.
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
            ended_at=ended_at,
            summary=summary,
        )

    def release(self, run_id: str, reason: str) -> Run:
        """Free a machine whose holder is gone: end the run as ``interrupted``/``released``.

        ``released_by`` records who did: this process's user and host, ``user@host``.
        """
        _require_name(reason, "reason")
        return self._end(
            run_id,
            "release",
            status=Status.INTERRUPTED,
            error_code="released",
            error_msg=f"released: {reason}",
            released_by=f"{sharing.user_name()}@{socket.gethostname()}",
            ended_at=None,
        )

    def _end(self, run_id: str, action: str, owner: Owner | None = None, **outcome: Any) -> Run:
        """Apply a terminal ``outcome`` to a run that has not ended; :class:`RunEnded` if it has."""

        tried = False

        def end(run: Run, now: datetime) -> None:
            nonlocal tried
            if run.status.is_terminal:
                if tried and owner is not None and owner.owns(run) and _same_outcome(run, outcome):
                    raise _Done(run)  # a retry: the attempt whose answer was lost had ended it so
                raise RunEnded(run, action)
            if owner is not None and not owner.owns(run):
                raise InvalidTransition(f"run {run.id} is owned by another process ({describe_owner(run)})")
            tried = True
            _apply(run, **outcome)
            run.ended_at = run.ended_at or now

        return self._modify(run_id, end)

    def heartbeat(self, run_id: str, owner: Owner) -> Run:
        """Refresh ``heartbeat_at`` of a run that is still ``owner``'s and not ended; nothing else changes.

        Raises :class:`RunEnded` if the run has ended (it was released or reclaimed) and
        :class:`InvalidTransition` if another process owns it: a heartbeat never
        overwrites a concurrent finish or release. Atomic; a heartbeat lost in a power cut
        only makes the run look a little older, so its commit skips the last flush.
        """

        def beat(run: Run, now: datetime) -> None:
            if run.status.is_terminal:
                raise RunEnded(run, "heartbeat")
            if not owner.owns(run):
                raise InvalidTransition(f"run {run.id} is owned by another process ({describe_owner(run)})")
            run.heartbeat_at = now

        return self._modify(run_id, beat, durable=False)

    def stale_reason(self, run: Run) -> str | None:
        """Why ``run`` has lost its owner (by its liveness lock, else its own lease); ``None`` if it has not."""
        with self._transaction(write=False) as tx:
            return tx.stale_reason(run)

    def machines(self) -> builtins.list[MachineState]:
        """One entry per machine with a run kept, sorted by name. Reads one ended run per machine."""
        with self._transaction(write=False) as tx:
            active = tx.active()
            line = [waiter for waiter in tx.waiters() if tx.stale_reason(waiter.as_owner()) is None]
            handovers = self._handovers(line, active, tx.now())
            unclaimed = {run.machine: seconds for run, seconds in handovers.values()}
            waiting = [waiter for waiter in line if waiter.token not in handovers]
            names = sorted(set(tx.machines()).union(*(waiter.machines for waiter in line)))
            return [
                MachineState(
                    machine=name,
                    active=_active(active, name),
                    last=tx.last_ended(name),
                    waiting=sum(1 for waiter in waiting if waiter.wants(name)),
                    unclaimed_for=unclaimed.get(name),
                )
                for name in names
            ]

    def prune(
        self,
        *,
        keep: int | None = None,
        older_than: timedelta | None = None,
        dry_run: bool = False,
        now: datetime | None = None,
    ) -> RunList:
        """Delete terminal runs, and their run folders, by one rule; return the runs removed.

        ``keep=N`` keeps the N newest terminal runs of each machine (newest by creation, as
        retention and ``machines`` count: run IDs this store generated, after imported ones);
        run folders no run names any more (left by a process killed between deleting runs and
        their folders) go too. ``older_than`` removes
        terminal runs whose ``ended_at`` is older than that. Pending and running runs are
        never touched. With ``dry_run`` nothing is deleted.
        """
        if (keep is None) == (older_than is None):
            raise ValueError("prune needs exactly one of keep or older_than")
        if keep is not None and keep < 0:
            raise ValueError(f"keep must be >= 0, got {keep}")
        with self._transaction(write=not dry_run) as tx:
            cutoff = (now or tx.now()) - older_than if older_than is not None else None
            if keep is not None:
                doomed: RunList = []
                for name in tx.machines():
                    ended = _ended_of(tx, name)  # oldest first, as retention counts
                    doomed.extend(ended[: max(0, len(ended) - keep)])
            else:
                assert cutoff is not None
                doomed = [r for r in tx.ended() if r.ended_at is not None and r.ended_at < cutoff]
            doomed.sort(key=in_run_order)
            if not dry_run:
                if doomed:
                    tx.delete(doomed)
                # In the same critical section: no run can come to name a lock file or a run
                # folder meanwhile (a run exists before its folder does).
                tx.sweep_owners()
                kept = {run.id for run in itertools.chain(tx.active(), tx.ended())} - {run.id for run in doomed}
                self._remove_orphaned_run_dirs(kept)
        if not dry_run:
            self._remove_files(doomed)
        return doomed

    def run_dir(self, run_id: str) -> Path:
        """The folder that holds a run's log and artifacts: ``<state_dir>/runs/<id>``.

        Refuses an ID that could point anywhere else.
        """
        if not isinstance(run_id, str) or not _RUN_ID.match(run_id):
            raise StateError(f"run ID {run_id!r} is not a safe path component; refusing to build paths from it")
        return self.state_dir / RUNS_DIR_NAME / run_id

    def make_run_dir(self, run_id: str) -> Path:
        """Create (0700, 2770 in a shared store, whatever the umask) the run folder and its ``artifacts`` folder.

        Returns the run folder.

        Never follows a symlink: a ``runs`` folder, run folder or ``artifacts`` folder that
        is a symbolic link (or not a folder) is refused with :class:`StateError`.
        """
        folder = self.run_dir(run_id)
        ensure_state_dir(self.state_dir)
        for where in (folder.parent, folder, folder / "artifacts"):
            make_private_dir(where)
        return folder

    def open_log(self, run_id: str) -> IO[str]:
        """The run's ``log.jsonl``, opened to append (0600, 0660 in a shared store, never through a symlink), UTF-8."""
        path = self.make_run_dir(run_id) / "log.jsonl"
        fd = open_regular_file(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, "run log")
        return open(fd, "a", encoding="utf-8", errors="backslashreplace")

    def hash_cache(self, test_dir: Path) -> HashCache:
        """The stat cache of ``test_dir``'s file digests: ``<state dir>/hash-cache/<key>.bin``."""
        ensure_state_dir(self.state_dir)
        folder = self.state_dir / HASH_CACHE_DIR_NAME
        make_private_dir(folder)
        key = hashlib.sha256(os.fsencode(os.path.realpath(test_dir))).hexdigest()[:32]
        return HashCache(folder / f"{key}.bin")

    def wait_for_change(self, holder: Run, timeout: float) -> bool:
        """Wait until the machine ``holder`` occupies may have become free, at most ``timeout`` seconds.

        True when something changed (look again), False when ``timeout`` passed quietly.
        The database backend is woken when a run ends or ``holder``'s owner lets go or dies;
        the file backend notices any commit, or ``holder``'s owner dying on this kernel, within 50 ms.
        """
        return self.backend.wait_for_change(holder, timeout)

    def stop_waiting(self) -> None:
        """Let go of what :meth:`wait_for_change` kept between calls (the database backend's connections)."""
        self.backend.stop_waiting()

    def liveness_lock(self) -> OwnerLock:
        """A new liveness lock for a session in this store, already held; :class:`StateError` if it cannot be taken."""
        return self.backend.liveness_lock()

    # -- internals --------------------------------------------------------------------

    @contextlib.contextmanager
    def _transaction(self, *, write: bool = True, durable: bool = True) -> Iterator[Transaction]:
        doomed: RunList = []
        with self.backend.transaction(write=write, durable=durable) as tx:
            self._local.doomed = doomed
            try:
                yield tx
            finally:
                del self._local.doomed
        # Retention deleted these runs in the transaction just committed; now their folders.
        self._remove_files(doomed)

    def _add(self, tx: Transaction, run: Run, latest: str | None) -> str:
        run.id = _new_id(latest, tx.now())
        run.fence = None if run.status.is_terminal else tx.next_fence(run.machine)
        tx.add(run)
        return run.id

    def _modify(
        self,
        run_id: str,
        change: Callable[[Run, datetime], None],
        *,
        durable: bool = True,
        then: Callable[[Transaction, Run], None] | None = None,
    ) -> Run:
        """Apply ``change`` to one run (and ``then`` in the same transaction), retried if the connection closed."""
        attempts = 0
        while True:
            attempts += 1
            try:
                with self._transaction(durable=durable) as tx:
                    run = _found(tx.get(run_id), run_id)
                    was_terminal = run.status.is_terminal
                    change(run, tx.now())
                    tx.replace(run)
                    if run.status.is_terminal and not was_terminal:
                        self._ended(tx, run.machine)
                    if then is not None:
                        then(tx, run)
                    return run
            except _Done as done:
                return done.run
            except ConnectionLost:
                # The connection closed inside the transaction, perhaps after it committed: do it
                # again (each change recognises its own earlier effect, raising _Done).
                if attempts >= _ATTEMPTS:
                    raise

    def _ended(self, tx: Transaction, machine: str) -> None:
        """A run of ``machine`` ended: retention, then the machine goes to the first live waiter for it."""
        self._retain(tx, machine)
        self._hand_over(tx, machine)

    def _hand_over(self, tx: Transaction, machine: str) -> None:
        """If ``machine`` is free and a live waiter wants it, start a pending run in the first one's name.

        Passed by: waiters already handed a machine, and those passed over (until they look again).
        The waiter stays in line, noted as handed the machine, until it claims it.
        """
        active = tx.active()
        if any(run.machine == machine for run in active):
            return
        holding = _holding(active)
        for waiter in serve_order(self._live_waiters(tx)):
            if waiter.wants(machine) and waiter.token not in holding and waiter.passed_over is None:
                run = dataclasses.replace(waiter.run, machine=machine, status=Status.PENDING)
                self._add(tx, run, tx.latest_id())
                tx.put_waiter(dataclasses.replace(waiter, handed_at=tx.now()))
                return

    def _handovers(self, line: Iterable[Waiter], active: Iterable[Run], now: datetime) -> dict[str, tuple[Run, float]]:
        """The machines handed to waiters in ``line`` and not claimed yet: token -> (pending run, seconds since)."""
        in_line = {waiter.token: waiter for waiter in line}
        handed = {}
        for run in active:
            if run.status is Status.PENDING and (waiter := in_line.get(run.owner_token)) is not None:
                since = waiter.handed_at or run_created_at(run.id) or now
                handed[waiter.token] = (run, max(0.0, (now - since).total_seconds()))
        return handed

    def _pass_on_unclaimed(self, tx: Transaction, machine: str, now: datetime, spare: str | None) -> None:
        """Take ``machine`` back from a live waiter that has not claimed it in time, and hand it to the next.

        The waiter ``spare`` (the caller, looking now: it claims next) is never passed over.
        """
        waiters = tx.waiters()
        for token, (run, unclaimed) in self._handovers(waiters, tx.active(), now).items():
            if run.machine != machine or token == spare or unclaimed < self.claim_deadline:
                continue
            waiter = next(waiter for waiter in waiters if waiter.token == token)
            why = (
                f"handed to a waiter that did not claim it within {self.claim_deadline:g}s (stopped or frozen?); "
                "the machine went to the next waiter, and the one passed over keeps its place in line"
            )
            _apply(run, status=Status.INTERRUPTED, error_code="unclaimed", ended_at=now, error_msg=why)
            tx.replace(run)
            tx.put_waiter(dataclasses.replace(waiter, handed_at=None, passed_over=now))
            self._ended(tx, machine)

    def _looked(self, tx: Transaction, token: str) -> None:
        """The waiter ``token`` looks at the store: it is running, so hand-overs no longer pass it by."""
        for waiter in tx.waiters():
            if waiter.token == token and waiter.passed_over is not None:
                tx.put_waiter(dataclasses.replace(waiter, passed_over=None))

    def _claimed(self, tx: Transaction, run: Run) -> None:
        """``run`` was claimed: its session leaves the line, and gives up any other machine handed to it."""
        if not run.owner_token:
            return
        tx.remove_waiter(run.owner_token)
        for other in tx.active():
            if other.id != run.id and other.owner_token == run.owner_token and other.status is Status.PENDING:
                why = f"handed a machine, its waiter claimed run {run.id} on {run.machine} instead"
                _apply(other, status=Status.INTERRUPTED, error_code="gave_up", ended_at=tx.now(), error_msg=why)
                tx.replace(other)
                self._ended(tx, other.machine)

    def _live_waiters(self, tx: Transaction) -> builtins.list[Waiter]:
        """The waiters whose session is alive; the others leave the line now."""
        live = []
        for waiter in tx.waiters():
            if tx.stale_reason(waiter.as_owner()) is None:
                live.append(waiter)
            else:
                tx.remove_waiter(waiter.token)
        return live

    def _retain(self, tx: Transaction, machine: str) -> None:
        """Retention: delete the oldest ended runs of ``machine`` beyond ``keep``."""
        if self.keep is None:
            return
        surplus = tx.ended_count(machine) - self.keep
        if surplus > 0:
            doomed = tx.oldest_ended(machine, surplus)
            tx.delete(doomed)
            self._local.doomed.extend(doomed)

    def _reclaim_stale(self, tx: Transaction, machine: str) -> None:
        now = tx.now()
        for run in tx.active():
            if run.machine != machine:
                continue
            reason = tx.stale_reason(run)
            if reason is None:
                continue
            _apply(
                run,
                status=Status.INTERRUPTED,
                error_code="owner_lost",
                error_msg=f"owner lost ({describe_owner(run)}): {reason}",
                ended_at=now,
            )
            tx.replace(run)
            tx.forget_owner(run)
            # A waiter handed this machine stays in line until it claims it: gone by the same token.
            if run.owner_token:
                tx.remove_waiter(run.owner_token)
            self._ended(tx, machine)

    def _remove_orphaned_run_dirs(self, kept: set[str]) -> None:
        """Run folders of runs deleted by a process killed before it removed their folders."""
        folder = self.state_dir / RUNS_DIR_NAME
        if os.path.islink(folder) or not folder.is_dir():
            return
        for entry in os.scandir(folder):
            if entry.name not in kept and _RUN_ID.match(entry.name) and entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)

    def _remove_files(self, runs: Iterable[Run]) -> None:
        for run in runs:
            try:
                folder = self.run_dir(run.id)
            except StateError:
                continue  # an ID we did not generate: nothing of ours to delete
            if os.path.islink(folder.parent) or not folder.parent.is_dir():
                return  # a symlinked runs folder leads outside the store: delete nothing through it
            # rmtree refuses a symlinked root and never follows symlinks inside it.
            shutil.rmtree(folder, ignore_errors=True)


#: How many times a change is tried when the connection closes inside its transaction.
_ATTEMPTS = 3


class _Done(Exception):
    """A retried change finds that its earlier attempt, whose answer was lost, had applied."""

    def __init__(self, run: Run) -> None:
        super().__init__(run.id)
        self.run = run


def _same_outcome(run: Run, outcome: dict[str, Any]) -> bool:
    """Whether the ended ``run`` ended with ``outcome`` (its end time aside)."""
    return all(getattr(run, name) == value for name, value in outcome.items() if name != "ended_at")


def _holding(active: Iterable[Run]) -> set[str]:
    """The owner tokens of active runs: sessions that hold a machine, or were handed one."""
    return {run.owner_token for run in active if run.owner_token}


def _beat_due(waiter: Waiter, now: datetime) -> bool:
    """Whether a waiter's heartbeat is old enough to refresh: a quarter of its lease, at most 30 s."""
    beat = waiter.run.heartbeat_at
    lease = waiter.run.owner_lease or DEFAULT_LEASE
    return beat is None or now - beat > timedelta(seconds=min(30.0, lease / 4))


def _made(mk: Callable[[], Run], machine: str, test_dir_hash: str) -> Run:
    run = mk()
    if not isinstance(run, Run):
        raise TypeError(f"mk() must return a Run, not {type(run).__name__}")
    for field, wanted in (("machine", machine), ("test_dir_hash", test_dir_hash)):
        if getattr(run, field) not in ("", wanted):
            raise ValueError(f"mk() returned a run with {field}={getattr(run, field)!r}, not {wanted!r}")
        setattr(run, field, wanted)
    if run.status.is_terminal:
        raise ValueError(f"mk() must return a pending or running run, not {run.status.value}")
    return run


def _found(run: Run | None, run_id: str) -> Run:
    if run is None:
        raise RunNotFound(run_id)
    return run


def _active(runs: RunList, machine: str) -> Run | None:
    for run in runs:
        if run.machine == machine and not run.status.is_terminal:
            return run
    return None


def _ended_of(tx: Transaction, machine: str) -> RunList:
    return tx.oldest_ended(machine, tx.ended_count(machine))


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


def _new_id(latest: str | None, moment: datetime) -> str:
    """``YYYYMMDD-HHMMSS-ffffff-xxxxxx``: sorts in creation order, safe in paths and URLs."""
    # Created under the store lock, so a strictly later time than every earlier ID
    # keeps IDs in creation order even if the clock steps back.
    created = run_created_at(latest) if latest is not None else None
    if created is not None and moment <= created:
        moment = created + timedelta(microseconds=1)
    return moment.strftime("%Y%m%d-%H%M%S-%f") + "-" + secrets.token_hex(3)
