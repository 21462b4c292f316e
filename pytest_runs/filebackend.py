"""The JSON-file backend: active runs in a small state, ended runs in per-machine histories.

Layout of a state dir (format 3)::

    runs.lock               the store lock (flock), never removed or replaced
    runs.json               a marker: the format and version, so that an older pytest-runs
                            refuses this store instead of starting a new one beside it
    runs.state.0, .1        two slots, each a header line (seq, length, BLAKE2b digest) and
                            a JSON state: fence counters, the newest ID given out, one entry
                            per machine's history (file, committed head and size, count,
                            largest ID), and the active runs
    history/<machine>-<digest>-<random>.jsonl
                            the ended runs of one machine, one JSON run per line, in ID
                            (creation) order

A commit writes the whole state into the slot that does not hold the current one and
flushes it with ``fdatasync``: one flush, no rename. A reader takes the slot with the
higher sequence number among those whose digest matches; a write cut short by a kill or a
power cut fails its digest, and the other slot still holds the state committed before it.
A heartbeat's commit is not flushed (its loss only makes a run look a little older): its
slot's header says ``"flushed": false``, and the next commit writes over that slot again,
so that the other one keeps the newest flushed state until a flushed commit replaces it.
Ended runs go to their machine's history file first: appended past its committed size and
flushed, then committed with the state. Bytes past a history's committed size are not part
of the store; the next writer cuts them off. A machine holds one active run at a time, so
its runs end in ID order and a finish is an append; a run that ends out of order (one
made with ``create`` beside an active one) makes its machine's file be rewritten in order,
so every history file stays sorted. Retention moves a history's committed head; the dead
prefix is copied away once it outweighs the live part, so each ended run is written a
bounded number of times.

So the hot path (prepare, claim, heartbeat, finish, release) reads and writes a state
whose size depends on the active runs and the machines, never on history, and a finish
appends one line. Before a run takes or ends on a machine, its history file is checked
cheaply (:meth:`FileBackend.check_history`: kind, size, a few bytes), so that a file cut,
removed or replaced is refused before any test runs, never padded or re-created. Listing
the newest runs reads history files from their ends; finding an ended run by ID searches
the history files' bytes and decodes one line.

Older formats (1 and 2: every run in ``runs.json``) are upgraded on first use, in one
atomic step (the slots and history files first, then ``runs.json`` renamed into place),
keeping the old file as ``runs.json.v<N>.bak`` and logging one line; a newer format is
refused.
"""

from __future__ import annotations

import bisect
import contextlib
import copy
import dataclasses
import errno
import hashlib
import heapq
import itertools
import json
import logging
import mmap
import os
import re
import secrets
import stat
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import liveness, sharing
from .errors import StateError, StoreLocked
from .model import Run, in_run_order, run_created_at, run_order
from .owner import boot_id
from .queue import Waiter
from .storelock import StoreLock, describe_holders

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "FileBackend", "lock_holders"]

STATE_FILE_NAME = "runs.json"
SLOT_FILE_NAME = "runs.state"
LOCK_FILE_NAME = "runs.lock"
HISTORY_DIR_NAME = "history"
FORMAT_NAME = "pytest-runs-state"
#: The state format this version writes, and the newest it reads. Version 2 added the
#: per-machine fence counters; version 3 keeps ended runs in per-machine history files.
FORMAT_VERSION = 3

#: A history file's dead prefix is copied away once it is this large and outweighs the live part.
COMPACT_MIN_BYTES = 1 << 20

_log = logging.getLogger("pytest_runs")
# Every stored run has these, non-empty: a record without them is corrupt, not a default run.
_REQUIRED_KEYS = ("id", "machine", "status")
_HISTORY_FILE = re.compile(r"^[A-Za-z0-9._-]{1,120}\.jsonl$")
# How every history line starts, as this module writes it (the ID is the contract's first key).
_RECORD_START = b'{"id": '
_READ_CHUNK = 1 << 18
_FIRST_CHUNK = 1 << 13
_CHANGE_POLL_SECONDS = 0.05
_SEGMENT_KEYS = {"file", "head", "size", "count", "last"}
_MARKER = {
    "format": FORMAT_NAME,
    "version": FORMAT_VERSION,
    "layout": f"active runs in {SLOT_FILE_NAME}.0 and .1 (the valid one with the higher seq); ended runs in history/",
}


def _oserror_text(error: OSError) -> str:
    return error.strerror or str(error)


def _file_kind(mode: int) -> str:
    """What a path that should be a regular file is instead, in words."""
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a device"


def _zeros(found: bytes) -> str:
    return " (zero bytes there: the file was cut, then padded or rewritten)" if found and not found.strip(b"\0") else ""


@dataclasses.dataclass
class _Segment:
    """The committed part of one machine's history file: bytes ``[head, size)``, ``count`` runs.

    ``last`` is the largest ID in it: a run that ends with a smaller one cannot be appended.
    """

    file: str
    head: int = 0
    size: int = 0
    count: int = 0
    last: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "head": self.head, "size": self.size, "count": self.count, "last": self.last}


@dataclasses.dataclass
class _State:
    #: The format of ``runs.json`` as found (the current one for a store not yet written).
    version: int = FORMAT_VERSION
    #: Whether ``runs.json`` is the current format's marker, so that the slots hold the state.
    marker: bool = False
    #: The slot holding this state, and its sequence number; the next commit takes the other slot.
    slot: int = 1
    seq: int = 0
    #: Whether that slot was flushed when it was written: if not (a heartbeat's commit), the
    #: other slot holds the newest flushed state, and the next commit writes over this one.
    flushed: bool = True
    latest_id: str | None = None
    fences: dict[str, int] = dataclasses.field(default_factory=dict)
    history: dict[str, _Segment] = dataclasses.field(default_factory=dict)
    active: list[Run] = dataclasses.field(default_factory=list)
    queue: list[Waiter] = dataclasses.field(default_factory=list)
    #: Ended runs of a format 1 or 2 file, to be moved into history files by the upgrade.
    legacy_ended: list[Run] = dataclasses.field(default_factory=list)


class FileBackend:
    """Runs kept under ``state_dir`` (see the module docs); safe across threads and processes.

    ``state_dir`` is created 0700 on the first write; a transaction that only reads a store
    that does not exist creates nothing. An existing state dir that others may write to is
    refused, and so is one with a file or folder this user cannot use (:func:`check_state_dir`);
    in a state dir shared with a group, files are 0660 and folders 2770 (:mod:`pytest_runs.sharing`).
    Entering a transaction waits at most ``lock_timeout`` seconds for the
    in-process and the cross-process lock, then raises :class:`StoreLocked`.
    """

    def __init__(self, state_dir: Path, *, lock_timeout: float) -> None:
        self.state_dir = state_dir
        self.location = str(state_dir)
        self.wakes_on_change = True
        self.lock_timeout = lock_timeout
        self.state_path = state_dir / STATE_FILE_NAME
        self.lock_path = state_dir / LOCK_FILE_NAME
        self.history_dir = state_dir / HISTORY_DIR_NAME
        check_state_dir(state_dir)
        self._mutex = threading.Lock()
        self._inside = threading.local()
        # Never removed or replaced: the lock file keeps its inode for ever.
        self._file_lock = StoreLock(self.lock_path)
        self.boot_id = boot_id()
        #: The holder token whose free liveness lock last woke :meth:`wait_for_change`.
        self._found_dead: str | None = None

    def wait_for_change(self, holder: Run, timeout: float) -> bool:
        """Return once a commit changed the state (a slot was written) or ``holder``'s owner died, or after ``timeout``.

        Looks at the two slots' ``stat`` every 50 ms: a few syscalls, no lock taken, so a
        waiter starts within about 50 ms of the machine being handed to it. A holder killed
        outright writes no slot: while its owner runs on this kernel, the same loop also asks
        its liveness lock (:func:`pytest_runs.liveness.probe`, a lock query that takes
        nothing), so the next look finds it stale within about 50 ms too. A lock found free
        wakes the caller once per holder: should the next look not judge it stale (it has no
        other way to), the wait goes on by the slots alone rather than spinning.
        """
        deadline = time.monotonic() + max(0.0, timeout)
        seen = self._slot_stamps()
        token = holder.owner_token if liveness.observable(holder, self.boot_id) else None
        if token is not None and token == self._found_dead:
            token = None
        while (left := deadline - time.monotonic()) > 0:
            time.sleep(min(_CHANGE_POLL_SECONDS, left))
            if self._slot_stamps() != seen:
                return True
            if token is not None and not self._owner_alive(token):
                self._found_dead = token
                return True
        return False

    def _owner_alive(self, token: str) -> bool:
        """False only when the liveness lock of ``token`` is there and free; what cannot be asked counts as alive."""
        try:
            return liveness.probe(self.state_dir, token) is not False
        except OSError:
            return True  # not this user's to ask, or the file system cannot tell: the slots and the lease decide

    def _slot_stamps(self) -> tuple[tuple[int, int, int], ...]:
        stamps = []
        for slot in (0, 1):
            try:
                info = os.stat(self.slot_path(slot))
            except OSError:
                stamps.append((0, 0, 0))
            else:
                stamps.append((info.st_ino, info.st_size, info.st_mtime_ns))
        return tuple(stamps)

    def stop_waiting(self) -> None:
        """Nothing is kept between waits."""

    def liveness_lock(self) -> liveness.LivenessLock:
        """An OFD lock on ``owners/<token>.lock``, already held (see :mod:`pytest_runs.liveness`)."""
        ensure_state_dir(self.state_dir)
        lock = liveness.LivenessLock(self.state_dir)
        try:
            lock.acquire()
        except OSError as error:
            raise StateError(f"cannot take a liveness lock in {self.state_dir}: {_oserror_text(error)}") from None
        return lock

    @contextlib.contextmanager
    def transaction(self, *, write: bool, durable: bool = True) -> Iterator[FileTransaction]:
        """A critical section over the state dir; see :class:`pytest_runs.backend.Backend`."""
        if getattr(self._inside, "active", False):
            raise RuntimeError(
                f"Store({str(self.state_dir)!r}) was called again from inside one of its own operations (from mk?)"
            )
        if not write and not any(os.path.lexists(path) for path in (self.state_path, *self._slot_paths())):
            yield FileTransaction(self, _State())  # nothing to read, and looking must not create the store
            return
        ensure_state_dir(self.state_dir)
        if not self._mutex.acquire(timeout=self.lock_timeout):
            raise StoreLocked(
                f"store {self.state_dir} is busy in another thread of this process for more than "
                f"{self.lock_timeout:g}s",
                [os.getpid()],
            )
        try:
            self._inside.active = True
            _make_lock_file(self.lock_path)
            try:
                self._file_lock.acquire(timeout=self.lock_timeout)
            except TimeoutError:
                raise self._locked_out() from None
            except OSError as error:
                raise StateError(f"cannot lock {self.lock_path}: {_oserror_text(error)}") from None
            try:
                transaction = FileTransaction(self, self._read_state())
                if transaction.state.version < FORMAT_VERSION:
                    transaction.changed = True  # the upgrade happens on first use, read or write
                yield transaction
                if transaction.changed:
                    transaction.commit(durable=durable)
            finally:
                self._file_lock.release()
        finally:
            self._inside.active = False
            self._mutex.release()

    # -- reading ----------------------------------------------------------------------

    def _read_state(self) -> _State:
        path = self.state_path
        raw = _read_file(path, "state file")
        slots = [self.slot_path(slot) for slot in (0, 1)]
        if raw is None:
            if kept := [slot for slot in slots if os.path.lexists(slot)]:
                raise StateError(
                    f"state file {path} is missing, but {kept[0]} holds a store; put runs.json back, "
                    f"or remove {' and '.join(map(str, kept))} to start an empty store"
                )
            return _State()
        document = _load_document(raw, path)
        newest: tuple[int, int, bytes, bool] | None = None
        for slot in (0, 1):
            found = self._read_slot(slot)
            if found is not None and (newest is None or found[0] > newest[0]):
                newest = (found[0], slot, found[1], found[2])
        if document["version"] < FORMAT_VERSION:
            # Slots beside an older runs.json are an upgrade cut short (seq 1 in slot 0, no
            # slot 1: redone from runs.json), or a newer store whose runs.json was replaced
            # by its backup: redoing the upgrade then would drop every run made since.
            if newest is not None and (newest[0] > 1 or os.path.lexists(slots[1])):
                raise StateError(
                    f"state file {path} has format version {document['version']}, but {self.slot_path(newest[1])} "
                    f"holds a newer store (commit {newest[0]}); was runs.json restored from a backup? To go back "
                    f"to it, move {slots[0].name}, {slots[1].name} and {HISTORY_DIR_NAME}/ out of {self.state_dir}"
                )
            return _decode_legacy(document, path)
        if "runs" in document:
            raise StateError(f"state file {path} has format version 3 but holds runs; pytest-runs did not write it")
        if newest is None:
            if not os.path.lexists(slots[1]):
                # Slot 0 missing, empty or cut short, and no slot 1: the store's first commit
                # never completed (killed, power cut, disk full). It is an empty store.
                return _State(marker=True)
            present = " and ".join(str(slot) for slot in slots if os.path.lexists(slot))
            raise StateError(f"state file {path} keeps the runs in {present}, but none holds a complete state")
        seq, slot, body, flushed = newest
        state = _decode_body(_load_document(body, self.slot_path(slot)), self.slot_path(slot))
        state.marker, state.slot, state.seq, state.flushed = True, slot, seq, flushed
        return state

    def committed_document(self) -> dict[str, Any]:
        """The committed state as JSON (format header, fences, history map, active runs), for tools and tests."""
        with self.transaction(write=False) as transaction:
            state = transaction.state
            return json.loads(_encode_state(state)) if state.marker or state.version < FORMAT_VERSION else {}

    def slot_path(self, slot: int) -> Path:
        return self.state_dir / f"{SLOT_FILE_NAME}.{slot}"

    def _slot_paths(self) -> tuple[Path, Path]:
        return self.slot_path(0), self.slot_path(1)

    def _read_slot(self, slot: int) -> tuple[int, bytes, bool] | None:
        """A slot's sequence number, state and whether it was flushed; ``None`` if missing or never completed."""
        raw = _read_file(self.slot_path(slot), "state file")
        if raw is None:
            return None
        header, _, body = raw.partition(b"\n")
        try:
            fields = json.loads(header)
            seq, length, digest = fields["seq"], fields["length"], fields["blake2b"]
        except (ValueError, TypeError, KeyError):
            return None
        if type(seq) is not int or type(length) is not int or not 0 <= length <= len(body):
            return None
        body = body[:length]
        if hashlib.blake2b(body, digest_size=16).hexdigest() != digest:
            return None  # torn: a writer was killed or the power cut while it wrote
        return seq, body, fields.get("flushed") is not False

    def read_region(self, segment: _Segment, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of a history file, checking it still holds its committed part."""
        fd = self._open_history(segment)
        try:
            return os.pread(fd, end - start, start) if end > start else b""
        finally:
            os.close(fd)

    def _open_history(self, segment: _Segment) -> int:
        """A history file opened for reading, once it is a file at least as long as its committed part."""
        path = self.history_dir / segment.file
        if os.path.islink(self.history_dir):
            raise StateError(f"history folder {self.history_dir} is a symbolic link; refusing to use it")
        runs = f"{segment.count} run{'' if segment.count == 1 else 's'}"
        missing = f"history file {path} is missing; the store's state records {runs} in it"
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            raise StateError(missing) from None
        except OSError as error:
            raise StateError(f"cannot open history file {path}: {_oserror_text(error)}") from None
        if not stat.S_ISREG(mode):
            raise StateError(
                f"history file {path} is not a regular file but {_file_kind(mode)}; the store's state records "
                f"{runs} in it; refusing to use it"
            )
        try:
            fd = open_regular_file(path, os.O_RDONLY, "history file")
        except FileNotFoundError:
            raise StateError(missing) from None
        size = os.fstat(fd).st_size
        if size < segment.size:
            os.close(fd)
            raise StateError(
                f"history file {path} is shorter than the {segment.size} bytes the store's state records "
                f"(it has {size}); it was cut or replaced"
            )
        return fd

    def check_history(self, segment: _Segment) -> None:
        """Make sure, cheaply, that a history file still holds its committed part, before it is relied on.

        For the hot path (a run taking or ending on a machine): the file's kind and size,
        that a run's record starts at the committed head and that one ends at the committed
        size; a few bytes read, never the history. A file cut short, missing, replaced by a
        symlink, a folder or a FIFO, or overwritten with other bytes is refused (StateError
        naming it) and left untouched. Bytes changed in between are found by readers.
        """
        if segment.size <= segment.head:
            return
        path = self.history_dir / segment.file
        fd = self._open_history(segment)
        try:
            first = os.pread(fd, len(_RECORD_START), segment.head)
            last = os.pread(fd, 1, segment.size - 1)
        except OSError as error:
            raise StateError(f"cannot read history file {path}: {_oserror_text(error)}") from None
        finally:
            os.close(fd)
        if first != _RECORD_START:
            raise StateError(
                f"history file {path} does not hold the runs the store's state records: no run record starts at "
                f"byte {segment.head}{_zeros(first)}; it was overwritten or replaced"
            )
        if last != b"\n":
            raise StateError(
                f"history file {path} does not hold the runs the store's state records: no run record ends at "
                f"byte {segment.size}{_zeros(last)}; it was overwritten or replaced"
            )

    def find_line(self, segment: _Segment, run_id: str) -> Run | None:
        """The run with ``run_id`` in a history file, found in its bytes; one line decoded."""
        if segment.size <= segment.head:
            return None
        # Every line starts with its ID (the contract's first key), as this module writes it.
        needle = b'{"id": ' + json.dumps(run_id).encode() + b","
        fd = self._open_history(segment)
        try:
            with mmap.mmap(fd, segment.size, prot=mmap.PROT_READ) as view:
                position = view.find(needle, segment.head, segment.size)
                while position >= 0:
                    if position == segment.head or view[position - 1] == 0x0A:
                        end = view.find(b"\n", position, segment.size)
                        end = segment.size if end < 0 else end
                        run = _decode_line(view[position:end], self.history_dir / segment.file, position)
                        if run.id == run_id:
                            return run
                    position = view.find(needle, position + 1, segment.size)
        finally:
            os.close(fd)
        return None

    def lines_backwards(self, segment: _Segment) -> Iterator[Run]:
        """The committed runs of a history file, last first, read from the end in growing chunks.

        A line longer than a chunk is gathered piece by piece and joined once, so that even a
        huge record costs time in proportion to its size.
        """
        path = self.history_dir / segment.file
        end = segment.size
        pending: list[bytes] = []  # the unfinished line's pieces after ``end``, rightmost first
        chunk = _FIRST_CHUNK  # small at first: the newest few runs are what most readers want
        while end > segment.head:
            start = max(segment.head, end - chunk)
            chunk = min(chunk * 4, _READ_CHUNK)
            data = self.read_region(segment, start, end)
            end = start
            parts = data.split(b"\n")
            if len(parts) == 1:
                pending.append(data)
                continue
            # The last part and the pieces after it are one whole line.
            position = start + len(data) - len(parts[-1])
            line = parts[-1] + b"".join(reversed(pending))
            if line:
                yield _decode_line(line, path, position)
            for part in reversed(parts[1:-1]):
                position -= len(part) + 1
                if part:
                    yield _decode_line(part, path, position)
            pending = [parts[0]]
        if line := b"".join(reversed(pending)):
            yield _decode_line(line, path, segment.head)

    def lines_forwards(self, segment: _Segment, limit: int | None = None) -> Iterator[tuple[int, Run]]:
        """``(length with its newline, run)`` of a history file's committed runs, first first."""
        path = self.history_dir / segment.file
        pending: list[bytes] = []  # the unfinished line's pieces, left to right
        line_start = segment.head
        read_to = segment.head
        taken = 0
        blank = 0  # empty lines before the next run, counted into its length
        if limit is not None and limit <= 0:
            return
        while read_to < segment.size:
            end = min(segment.size, read_to + _READ_CHUNK)
            data = self.read_region(segment, read_to, end)
            read_to = end
            parts = data.split(b"\n")
            if len(parts) == 1:
                pending.append(data)
                continue
            for line in (b"".join(pending) + parts[0], *parts[1:-1]):
                if line:
                    taken += 1
                    yield blank + len(line) + 1, _decode_line(line, path, line_start)
                    blank = 0
                    if limit is not None and taken >= limit:
                        return
                else:
                    blank += 1
                line_start += len(line) + 1
            pending = [parts[-1]]
        if line := b"".join(pending):
            yield blank + len(line), _decode_line(line, path, line_start)

    # -- writing ----------------------------------------------------------------------

    def write_state(self, state: _State, *, durable: bool = True) -> None:
        """Commit ``state``: into the older slot, or for a new or upgraded store, the slots then ``runs.json``.

        ``durable=False`` (a heartbeat) skips the slot's flush. Such a slot may be lost in a
        power cut, so the other slot must keep the newest flushed state: the commit after an
        unflushed one writes over that same slot (flushing it or not) instead of the other.
        At every moment one slot holds a flushed state, and a power cut loses at most the
        unflushed commits made since.
        """
        body = _encode_state(state)
        if state.marker:
            slot = 1 - state.slot if state.flushed else state.slot
            self._write_slot(slot, state.seq + 1, body, flush=durable)
            state.slot, state.seq, state.flushed = slot, state.seq + 1, durable
            return
        # A slot of an earlier attempt that failed before runs.json changed could be newer.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.slot_path(1))
        if state.version == FORMAT_VERSION:
            # A new store: the marker first, so that a slot is never found without it.
            self._write_marker(state)
            self._write_slot(0, 1, body)
        else:
            # An upgrade: runs.json, renamed over the old file, is the commit point.
            self._write_slot(0, 1, body)
            self._write_marker(state)
        state.marker, state.slot, state.seq = True, 0, 1

    def _write_slot(self, slot: int, seq: int, body: bytes, *, flush: bool = True) -> None:
        path = self.slot_path(slot)
        digest = hashlib.blake2b(body, digest_size=16).hexdigest()
        header: dict[str, Any] = {"seq": seq, "length": len(body), "blake2b": digest}
        if not flush:
            header["flushed"] = False  # readers then keep the other slot, which was
        data = json.dumps(header).encode() + b"\n" + body
        try:
            created = False
            try:
                fd = open_regular_file(path, os.O_WRONLY, "state file")
            except FileNotFoundError:
                fd = open_regular_file(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, "state file")
                created = True
            try:
                _write_all(fd, data, 0)
                os.ftruncate(fd, len(data))
                if flush:
                    os.fdatasync(fd)
            except OSError:
                _spoil(fd, len(data))
                raise
            finally:
                os.close(fd)
            if created:
                fsync_dir(self.state_dir)
        except OSError as error:
            raise StateError(
                f"cannot write state file {path}: {_oserror_text(error)}; the previous state is intact"
            ) from None

    def _write_marker(self, state: _State) -> None:
        data = json.dumps(_MARKER, indent=1).encode() + b"\n"
        _refuse_symlink(self.state_path, "state file")
        self._remove_orphaned_temporaries()
        # A hard link keeps an older format's bytes once the new state is renamed over it.
        backup = self.state_dir / f"{STATE_FILE_NAME}.v{state.version}.bak"
        made_backup = state.version < FORMAT_VERSION and _link_if_absent(self.state_path, backup)
        tmp_path: str | None = None
        try:
            # mkstemp creates the file 0600 whatever the umask (0660 in a shared store, below).
            fd, tmp_path = tempfile.mkstemp(dir=self.state_dir, prefix=f".{STATE_FILE_NAME}.", suffix=".tmp")
            try:
                sharing.share_file(fd, sharing.shared_folder(self.state_dir))
                _write_all(fd, data, 0)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp_path, self.state_path)
            tmp_path = None
            fsync_dir(self.state_dir)
        except OSError as error:
            if made_backup:
                with contextlib.suppress(OSError):
                    os.unlink(backup)
            raise StateError(
                f"cannot write state file {self.state_path}: {_oserror_text(error)}; the previous state is intact"
            ) from None
        finally:
            if tmp_path is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp_path)
        if state.version < FORMAT_VERSION:
            _log.warning(
                "pytest-runs: upgraded state file %s from format %d to %d; the old file is kept as %s",
                self.state_path,
                state.version,
                FORMAT_VERSION,
                backup,
            )
            state.version = FORMAT_VERSION

    def append_history(self, segment: _Segment, data: bytes) -> None:
        """Write ``data`` after the committed part of a history file and flush it (not yet committed).

        A file that no longer holds its committed part is refused first, never padded or re-created.
        """
        self.check_history(segment)
        fd = self._open_for_writing(segment.file, create=False)
        try:
            # Bytes past the committed size belong to a writer killed before its commit.
            os.ftruncate(fd, segment.size)
            _write_all(fd, data, segment.size)
            os.fdatasync(fd)
        except OSError as error:
            raise self._cannot_write(segment.file, error) from None
        finally:
            os.close(fd)

    def new_history_file(self, machine: str, chunks: Iterable[bytes]) -> tuple[str, int]:
        """A fresh, flushed history file for ``machine`` holding ``chunks``; its name and size."""
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", machine).lstrip(".")[:60] or "machine"
        digest = hashlib.sha256(machine.encode("utf-8", "surrogatepass")).hexdigest()[:8]
        name = f"{safe}-{digest}-{secrets.token_hex(4)}.jsonl"
        fd = self._open_for_writing(name, exclusive=True)
        size = 0
        try:
            for chunk in chunks:
                _write_all(fd, chunk, size)
                size += len(chunk)
            os.fsync(fd)
        except OSError as error:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(self.history_dir / name)
            raise self._cannot_write(name, error) from None
        os.close(fd)
        return name, size

    def _cannot_write(self, name: str, error: OSError) -> StateError:
        return StateError(
            f"cannot write history file {self.history_dir / name}: {_oserror_text(error)}; the previous state is intact"
        )

    def _open_for_writing(self, name: str, *, exclusive: bool = False, create: bool = True) -> int:
        make_private_dir(self.history_dir)
        path = self.history_dir / name
        flags = os.O_WRONLY | (os.O_CREAT if create else 0) | (os.O_EXCL if exclusive else 0)
        try:
            return open_regular_file(path, flags, "history file")
        except FileNotFoundError as error:
            raise StateError(f"cannot write history file {path}: {_oserror_text(error)}") from None

    def remove_unreferenced_history(self, keep: set[str]) -> None:
        """Delete history files no committed state names (left by a writer killed mid-commit)."""
        if os.path.islink(self.history_dir) or not self.history_dir.is_dir():
            return
        for path in self.history_dir.iterdir():
            if path.name not in keep and _HISTORY_FILE.match(path.name):
                with contextlib.suppress(OSError):
                    path.unlink()

    def _remove_orphaned_temporaries(self) -> None:
        # Temporaries are only written under the file lock, which we hold: any still here
        # belong to a writer that was killed mid-write.
        for orphan in self.state_dir.glob(f".{STATE_FILE_NAME}.*.tmp"):
            with contextlib.suppress(OSError):
                orphan.unlink()

    def _locked_out(self) -> StoreLocked:
        holders = lock_holders(self.lock_path)
        advice = "if that process is stuck, stop it"
        if holders == [os.getpid()]:
            # Another Store on this dir, used inside a critical section of this one?
            who = f" by this process (PID {os.getpid()}), through another Store object,"
        else:
            holders, who, advice = describe_holders(self.lock_path, holders)
        return StoreLocked(
            f"store lock {self.lock_path} has been held{who} for more than {self.lock_timeout:.3g}s; {advice}",
            holders,
        )


class FileTransaction:
    """One critical section of a :class:`FileBackend`: the state read, and the changes to commit."""

    def __init__(self, backend: FileBackend, state: _State) -> None:
        self.backend = backend
        self.state = state
        self.changed = False
        # Per machine: ended runs to append, the whole new list of committed runs (when a
        # change is not an append or a cut from the head), and (bytes, runs) cut from the head.
        self._appended: dict[str, list[Run]] = {}
        self._rewritten: dict[str, list[Run]] = {}
        self._cut: dict[str, tuple[int, int]] = {}
        # Machines whose history file this transaction found sound (see check_history).
        self._checked: set[str] = set()
        for run in state.legacy_ended:
            self._append(run)
        state.legacy_ended = []

    # -- clock and liveness ----------------------------------------------------------

    def now(self) -> datetime:
        return datetime.now(UTC)

    def stale_reason(self, run: Run) -> str | None:
        return liveness.stale_reason(run, self.now(), self.backend.boot_id, self.backend.state_dir)

    def forget_owner(self, run: Run) -> None:
        if liveness.observable(run, self.backend.boot_id):
            liveness.remove_lock_file(self.backend.state_dir, run.owner_token)

    def sweep_owners(self) -> None:
        """Lock files of sessions killed while waiting (they had no run to be reclaimed with)."""
        folder = self.backend.state_dir / liveness.OWNERS_DIR_NAME
        if os.path.islink(folder) or not folder.is_dir():
            return
        named = {run.owner_token for run in self.state.active if run.owner_token}
        for path in folder.glob("*.lock"):
            token = path.name.removesuffix(".lock")
            # Not named by an active run, older than a minute (never one being taken), and free.
            with contextlib.suppress(OSError):
                old = time.time() - path.lstat().st_mtime > 60
                if token not in named and old and liveness.probe(self.backend.state_dir, token) is False:
                    path.unlink()

    # -- reads ------------------------------------------------------------------------

    def latest_id(self) -> str | None:
        return self.state.latest_id

    def active(self) -> list[Run]:
        return [_copy(run) for run in self.state.active]

    def get(self, run_id: str) -> Run | None:
        for run in self.state.active:
            if run.id == run_id:
                return _copy(run)
        for machine in self._touched_or_kept():
            for run in self._appended.get(machine, []) + self._rewritten.get(machine, []):
                if run.id == run_id:
                    return _copy(run)
            segment = self.state.history.get(machine)
            if segment is not None and machine not in self._rewritten:
                found = self.backend.find_line(self._live(machine, segment), run_id)
                if found is not None:
                    return found
        return None

    def machines(self) -> list[str]:
        names = {run.machine for run in self.state.active}
        names.update(machine for machine in self._touched_or_kept() if self.ended_count(machine))
        return sorted(names)

    def ended_count(self, machine: str) -> int:
        if machine in self._rewritten:
            committed = len(self._rewritten[machine])
        else:
            segment = self.state.history.get(machine)
            committed = segment.count - self._cut.get(machine, (0, 0))[1] if segment else 0
        return committed + len(self._appended.get(machine, []))

    def last_ended(self, machine: str) -> Run | None:
        return next(self._backwards(machine), None)

    def oldest_ended(self, machine: str, count: int) -> list[Run]:
        if count <= 0:
            return []
        return list(itertools.islice(self._forwards(machine, limit=count), count))

    def ended(self) -> Iterator[Run]:
        for machine in sorted(self._touched_or_kept()):
            yield from self._forwards(machine)

    def newest_first(self) -> Iterator[Run]:
        streams: list[Iterator[Run]] = [iter(sorted(self.active(), key=in_run_order, reverse=True))]
        streams.extend(self._backwards(machine) for machine in self._touched_or_kept())
        return heapq.merge(*streams, key=in_run_order, reverse=True)

    # -- the line of waiters ----------------------------------------------------------

    def waiters(self) -> list[Waiter]:
        return [Waiter.from_dict(waiter.to_dict()) for waiter in self.state.queue]

    def put_waiter(self, waiter: Waiter) -> None:
        self.remove_waiter(waiter.token)
        self.state.queue.append(Waiter.from_dict(waiter.to_dict()))
        self.changed = True

    def remove_waiter(self, token: str) -> None:
        kept = [waiter for waiter in self.state.queue if waiter.token != token]
        if len(kept) != len(self.state.queue):
            self.state.queue = kept
            self.changed = True

    # -- changes ----------------------------------------------------------------------

    def next_fence(self, machine: str) -> int:
        # The counter survives prune; active runs' own fences cover a counter that was lost.
        latest = max((run.fence or 0 for run in self.state.active if run.machine == machine), default=0)
        fence = max(self.state.fences.get(machine, 0), latest) + 1
        self.state.fences[machine] = fence
        self.changed = True
        return fence

    def add(self, run: Run) -> None:
        # Only IDs this store generated: an imported one must not hold back the creation order.
        if run_created_at(run.id) is not None and (self.state.latest_id is None or run.id > self.state.latest_id):
            self.state.latest_id = run.id
        if run.status.is_terminal:
            self._append(_copy(run))
        else:
            self._check_history(run.machine)
            self.state.active.append(_copy(run))
        self.changed = True

    def replace(self, run: Run) -> None:
        self.changed = True
        for index, stored in enumerate(self.state.active):
            if stored.id == run.id:
                if stored.status != run.status:
                    # A run takes its machine or ends on it (a heartbeat does neither): no test
                    # may start, nor a run end, on a machine whose history file lies.
                    self._check_history(run.machine)
                if run.status.is_terminal:
                    del self.state.active[index]
                    self._append(_copy(run))
                else:
                    self.state.active[index] = _copy(run)
                return
        appended = self._appended.get(run.machine, [])
        for index, stored in enumerate(appended):
            if stored.id == run.id:
                appended[index] = _copy(run)
                return
        records = self._committed_list(run.machine)
        self._rewritten[run.machine] = [_copy(run) if stored.id == run.id else stored for stored in records]

    def delete(self, runs: list[Run]) -> None:
        doomed: dict[str, set[str]] = {}
        for run in runs:
            doomed.setdefault(run.machine, set()).add(run.id)
        for machine, ids in doomed.items():
            self.changed = True
            appended = self._appended.get(machine, [])
            self._appended[machine] = [run for run in appended if run.id not in ids]
            ids -= {run.id for run in appended}
            if not ids:
                continue
            if machine not in self._rewritten:
                self._cut_head(machine, ids)
            if ids:
                records = self._committed_list(machine)
                self._rewritten[machine] = [run for run in records if run.id not in ids]

    def _append(self, run: Run) -> None:
        bisect.insort(self._appended.setdefault(run.machine, []), run, key=in_run_order)

    def _cut_head(self, machine: str, ids: set[str]) -> None:
        """Drop doomed runs that are the oldest committed ones by moving the head; leave the rest in ``ids``."""
        segment = self.state.history.get(machine)
        if segment is None:
            return
        cut_bytes, cut_runs = self._cut.get(machine, (0, 0))
        for length, run in self.backend.lines_forwards(self._live(machine, segment)):
            if run.id not in ids:
                break
            ids.discard(run.id)
            cut_bytes += length
            cut_runs += 1
        self._cut[machine] = (cut_bytes, cut_runs)

    # -- commit -----------------------------------------------------------------------

    def commit(self, *, durable: bool = True) -> None:
        """Write the changes: history first (always flushed), then the state (flushed if ``durable``)."""
        backend = self.backend
        state = self.state
        history = dict(state.history)
        replaced: set[str] = set()
        created = False
        for machine in set(self._appended) | set(self._rewritten) | set(self._cut):
            segment = history.get(machine)
            appended = self._appended.get(machine, [])
            if (
                appended
                and segment is not None
                and machine not in self._rewritten
                and run_order(appended[0].id) <= run_order(segment.last)
            ):
                # Ended out of ID order: rewrite the file in order rather than append.
                self._rewritten[machine] = self._committed_list(machine)
            if machine in self._rewritten or segment is None:
                if segment is not None:
                    replaced.add(segment.file)
                records = sorted(self._rewritten.get(machine, []) + appended, key=in_run_order)
                if not records:
                    history.pop(machine, None)
                    continue
                name, size = backend.new_history_file(machine, (_encode_line(run) for run in records))
                history[machine] = _Segment(name, 0, size, len(records), records[-1].id)
                created = True
                continue
            segment = self._live(machine, segment)
            if appended:
                data = b"".join(_encode_line(run) for run in appended)
                backend.append_history(segment, data)
                segment.size += len(data)
                segment.count += len(appended)
                segment.last = appended[-1].id
            if segment.count == 0:
                replaced.add(segment.file)
                history.pop(machine)
            elif segment.head >= COMPACT_MIN_BYTES and segment.head * 2 > segment.size:
                live = backend.read_region(segment, segment.head, segment.size)
                name, size = backend.new_history_file(machine, [live])
                replaced.add(segment.file)
                history[machine] = _Segment(name, 0, size, segment.count, segment.last)
                created = True
            else:
                history[machine] = segment
        if created:
            fsync_dir(backend.history_dir)
        upgrading = state.version < FORMAT_VERSION
        state.history = history
        backend.write_state(state, durable=durable)
        self._appended, self._rewritten, self._cut = {}, {}, {}
        if upgrading or replaced:
            backend.remove_unreferenced_history({segment.file for segment in history.values()})

    # -- internals --------------------------------------------------------------------

    def _check_history(self, machine: str) -> None:
        segment = self.state.history.get(machine)
        if segment is None or machine in self._checked or machine in self._rewritten:
            return
        self.backend.check_history(self._live(machine, segment))
        self._checked.add(machine)

    def _touched_or_kept(self) -> set[str]:
        return set(self.state.history) | set(self._appended) | set(self._rewritten)

    def _live(self, machine: str, segment: _Segment) -> _Segment:
        cut_bytes, cut_runs = self._cut.get(machine, (0, 0))
        return _Segment(segment.file, segment.head + cut_bytes, segment.size, segment.count - cut_runs, segment.last)

    def _forwards(self, machine: str, limit: int | None = None) -> Iterator[Run]:
        appended = (_copy(run) for run in self._appended.get(machine, []))
        return heapq.merge(self._committed_forwards(machine, limit), appended, key=in_run_order)

    def _committed_forwards(self, machine: str, limit: int | None = None) -> Iterator[Run]:
        if machine in self._rewritten:
            yield from (_copy(run) for run in self._rewritten[machine][:limit])
            return
        segment = self.state.history.get(machine)
        if segment is not None:
            for _, run in self.backend.lines_forwards(self._live(machine, segment), limit):
                yield run

    def _committed_list(self, machine: str) -> list[Run]:
        return list(self._committed_forwards(machine))

    def _backwards(self, machine: str) -> Iterator[Run]:
        appended = (_copy(run) for run in reversed(self._appended.get(machine, [])))
        return heapq.merge(appended, self._committed_backwards(machine), key=in_run_order, reverse=True)

    def _committed_backwards(self, machine: str) -> Iterator[Run]:
        if machine in self._rewritten:
            yield from (_copy(run) for run in reversed(self._rewritten[machine]))
            return
        segment = self.state.history.get(machine)
        if segment is not None:
            yield from self.backend.lines_backwards(self._live(machine, segment))


# -- encoding ---------------------------------------------------------------------------


def _encode_line(run: Run) -> bytes:
    # ASCII escapes: any text a run holds (a surrogate from an undecodable path) stays one valid line.
    return json.dumps(run.to_dict()).encode() + b"\n"


def _decode_line(line: bytes, path: Path, offset: int) -> Run:
    try:
        return _decode_run(_load_json(line, f"history file {path} at byte {offset}"))
    except (TypeError, ValueError) as error:
        raise StateError(f"history file {path} at byte {offset}: {error}") from None


def _decode_run(record: Any) -> Run:
    run = Run.from_dict(record)
    if missing := [key for key in _REQUIRED_KEYS if not record.get(key)]:
        raise ValueError(f"required field {missing[0]!r} is missing or empty")
    return run


def _load_json(raw: bytes, what: str) -> Any:
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise StateError(f"{what} is not valid JSON ({_json_problem(raw, error)})") from None
    except (ValueError, RecursionError) as error:
        # A number of thousands of digits, or nesting deeper than Python's stack.
        reason = "nested too deeply" if isinstance(error, RecursionError) else str(error).split(";")[0]
        raise StateError(f"{what} cannot be read: {reason}") from None


def _json_problem(raw: bytes, error: ValueError) -> str:
    """What is wrong with bytes that are not JSON, in words (not a codec's or a parser's)."""
    if (zero := raw.find(0)) >= 0 and not raw[zero:].strip(b"\0"):
        return f"zero bytes from its byte {zero} on: the file was cut, then padded or overwritten"
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as bad:
        return f"its byte {bad.start} is not UTF-8 text: binary data where text should be"
    if zero >= 0:
        return f"a zero byte at its byte {zero}: binary data where text should be"
    if not isinstance(error, json.JSONDecodeError):
        return "it is not UTF-8 text"
    where = f"line {error.lineno} column {error.colno}"
    if error.msg.startswith("Invalid control character"):
        return f"a control character (code {ord(error.doc[error.pos])}) inside a string at {where}"
    if error.msg == "Extra data":
        return f"more after the end of the JSON value, at {where}"
    return f"{error.msg.removesuffix(' at').removesuffix(' starting at').lower()} at {where}"


def _encode_state(state: _State) -> bytes:
    header = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "latest_id": state.latest_id,
        "fences": state.fences,
        "history": {machine: segment.to_dict() for machine, segment in sorted(state.history.items())},
        "queue": [waiter.to_dict() for waiter in state.queue],
    }
    # One active run per line: readable and diffable.
    lines = ",\n".join(json.dumps(run.to_dict()) for run in state.active)
    return f'{json.dumps(header)[:-1]}, "runs": [\n{lines}\n]}}\n'.encode()


def _read_file(path: Path, what: str) -> bytes | None:
    """A whole small file, never through a symlink; ``None`` if it does not exist."""
    try:
        fd = open_regular_file(path, os.O_RDONLY, what)
    except FileNotFoundError:
        return None
    with open(fd, "rb") as handle:
        return handle.read()


def _load_document(raw: bytes, path: Path) -> dict[str, Any]:
    """A state document whose format this version reads; :class:`StateError` naming ``path`` otherwise."""
    if not raw.strip():
        raise StateError(f"state file {path} is empty; refusing to treat it as an empty store")
    document = _load_json(raw, f"state file {path}")
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
    return document


def _decode_runs(document: dict[str, Any], path: Path) -> tuple[list[Run], dict[str, int]]:
    records = document.get("runs")
    if not isinstance(records, list):
        raise StateError(f'state file {path} has no "runs" list')
    fences = document.get("fences", {})
    if not isinstance(fences, dict) or not all(_is_count(value) for value in fences.values()):
        raise StateError(f'state file {path} has a bad "fences" map (machine names to integers)')
    runs = []
    for position, record in enumerate(records):
        try:
            runs.append(_decode_run(record))
        except (TypeError, ValueError) as error:
            raise StateError(f"state file {path}: run #{position}: {error}") from None
    return runs, fences


def _decode_legacy(document: dict[str, Any], path: Path) -> _State:
    """Format 1 or 2, every run in ``runs.json``: the upgrade moves the ended ones to history."""
    runs, fences = _decode_runs(document, path)
    state = _State(version=document["version"], fences=fences)
    state.active = [run for run in runs if not run.status.is_terminal]
    state.legacy_ended = [run for run in runs if run.status.is_terminal]
    state.latest_id = max((run.id for run in runs if run_created_at(run.id) is not None), default=None)
    for run in runs:
        if run.fence is not None and run.fence > fences.get(run.machine, 0):
            fences[run.machine] = run.fence
    return state


def _decode_body(document: dict[str, Any], path: Path) -> _State:
    runs, fences = _decode_runs(document, path)
    if terminal := [run.id for run in runs if run.status.is_terminal]:
        raise StateError(f'state file {path}: ended run {terminal[0]} is among the active "runs"')
    state = _State(fences=fences, active=runs)
    latest = document.get("latest_id")
    if latest is not None and not isinstance(latest, str):
        raise StateError(f'state file {path} has a bad "latest_id" {latest!r}')
    state.latest_id = latest
    history = document.get("history")
    if not isinstance(history, dict):
        raise StateError(f'state file {path} has no "history" map')
    for machine, entry in history.items():
        try:
            state.history[machine] = _decode_segment(entry)
        except (TypeError, ValueError) as error:
            raise StateError(f"state file {path}: history of {machine!r}: {error}") from None
    queue = document.get("queue", [])
    if not isinstance(queue, list):
        raise StateError(f'state file {path} has a bad "queue" (a list of waiters)')
    for position, entry in enumerate(queue):
        try:
            state.queue.append(Waiter.from_dict(entry))
        except (TypeError, ValueError) as error:
            raise StateError(f"state file {path}: waiter #{position}: {error}") from None
    return state


def _decode_segment(entry: Any) -> _Segment:
    if not isinstance(entry, dict) or entry.keys() != _SEGMENT_KEYS:
        raise ValueError('must be an object with "file", "head", "size", "count" and "last"')
    name, head, size, count, last = entry["file"], entry["head"], entry["size"], entry["count"], entry["last"]
    if type(last) is not str:
        raise ValueError(f"bad last ID {last!r}")
    if type(name) is not str or not _HISTORY_FILE.match(name) or name.startswith("."):
        raise ValueError(f"bad file name {name!r}")
    if type(head) is not int or type(size) is not int or type(count) is not int or not 0 <= head <= size or count < 0:
        raise ValueError("head, size and count must be integers with 0 <= head <= size")
    return _Segment(name, head, size, count, last)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _copy(run: Run) -> Run:
    # Every field is immutable but the two dicts: copying just those is a deep copy, fast.
    duplicate = copy.copy(run)
    if run.summary is not None:
        duplicate.summary = copy.deepcopy(run.summary)
    duplicate.unknown_keys = copy.deepcopy(run.unknown_keys) if run.unknown_keys else {}
    return duplicate


# -- files ------------------------------------------------------------------------------


def _write_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def _spoil(fd: int, length: int) -> None:
    """Make a slot whose write failed midway invalid, so that it can never pass for a commit.

    Cutting it to nothing frees space rather than needing any; if even that fails, zeros
    over what was written break its digest.
    """
    try:
        os.ftruncate(fd, 0)
    except OSError:
        with contextlib.suppress(OSError):
            os.pwrite(fd, bytes(min(length, 4096)), 0)


def _link_if_absent(source: Path, link: Path) -> bool:
    """Hard-link ``source`` as ``link`` unless ``link`` exists; whether this call made it."""
    try:
        os.link(source, link)
    except FileExistsError:
        return False
    except OSError as error:
        raise StateError(f"cannot keep a backup of {source} as {link}: {_oserror_text(error)}") from None
    if sharing.shared_folder(link.parent):
        # The old file's own bytes, kept for the group too (if this user may change its mode).
        with contextlib.suppress(OSError):
            fd = os.open(link, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
            try:
                sharing.share_file(fd, True)
            finally:
                os.close(fd)
    return True


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (a rename or a new file in it) to stable storage."""
    dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _make_lock_file(path: Path) -> None:
    """Refuse a symlinked lock file; create a missing one with the store's modes (0660 when shared)."""
    try:
        is_link = stat.S_ISLNK(os.lstat(path).st_mode)
    except FileNotFoundError:
        with contextlib.suppress(FileNotFoundError):
            os.close(open_regular_file(path, os.O_RDWR | os.O_CREAT, "lock file"))
        return
    except OSError:
        return  # opening it to lock it says what is wrong
    if is_link:
        raise StateError(f"lock file {path} is a symbolic link; refusing to use it")


def _refuse_symlink(path: Path, what: str) -> None:
    if path.is_symlink():
        raise StateError(f"{what} {path} is a symbolic link; refusing to use it")


def check_state_dir(where: Path) -> None:
    """Refuse a state dir that can never work, that others may write to, or that this user cannot fully use.

    The last: a file or folder of the store (its own files, ``history/``, ``owners/``,
    ``hash-cache/``, ``runs/``) that this user cannot read or write as pytest-runs needs,
    named in one line with what to do; a mode that becomes right within a second (a file
    another session has just created and not yet given its mode) is not one.
    """
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
            f"make it private with: chmod 700 {where} (or share it with a group: chgrp GROUP {where} && "
            f"chmod 2770 {where})"
        )
    if not os.access(where, os.W_OK | os.X_OK):
        raise StateError(f"state dir {where} is not writable{_state_dir_advice(where, info)}")
    if problem := _unusable_entry(where, sharing.is_shared(info.st_mode)):
        raise StateError(problem)


#: What a user needs of each thing in a state dir to use it fully: sessions, list, machines, prune.
_RW, _R, _RWX = os.R_OK | os.W_OK, os.R_OK, os.R_OK | os.W_OK | os.X_OK
#: The folders of a state dir, and what of the files in each is needed (the others are not ours).
_STORE_FOLDERS: tuple[tuple[str, re.Pattern[str] | None, int], ...] = (
    (HISTORY_DIR_NAME, _HISTORY_FILE, _RW),
    (liveness.OWNERS_DIR_NAME, re.compile(r"^[0-9a-f]{32}\.lock$"), _R),  # probed, never written by others
    ("hash-cache", re.compile(r"^[0-9a-f]{32}\.bin$"), _R),  # replaced by a rename, never written in place
    ("runs", None, 0),  # each session makes its own run folder in it
)
#: How long a file found unusable gets to become usable: its creator sets its mode just after creating it.
_SETTLE_SECONDS = (0.2, 0.8)


def _store_entries(where: Path) -> Iterator[tuple[Path, int]]:
    """Each thing in the state dir ``where`` that pytest-runs uses, and the access it needs."""
    yield where / LOCK_FILE_NAME, _RW
    yield where / STATE_FILE_NAME, _R  # replaced by a rename
    for slot in (0, 1):
        yield where / f"{SLOT_FILE_NAME}.{slot}", _RW  # written in place
    for name, pattern, need in _STORE_FOLDERS:
        folder = where / name
        yield folder, _RWX
        if pattern is not None:
            try:
                names = sorted(entry.name for entry in os.scandir(folder))
            except OSError:
                continue  # missing, a symlink or unreadable: using it says so (unreadable: above)
            yield from ((folder / entry, need) for entry in names if pattern.match(entry))


def _lacks(path: Path, need: int) -> int:
    """The access of ``need`` this user lacks on ``path`` (0: it has it, or ``path`` is gone or not ours)."""
    try:
        info = os.lstat(path)
    except OSError:
        return 0
    if not (stat.S_ISDIR if need & os.X_OK else stat.S_ISREG)(info.st_mode):
        return 0  # a symlink, a special file, a file for a folder: refused, naming it, when it is used
    return sum(bit for bit in (os.R_OK, os.W_OK, os.X_OK) if need & bit and not os.access(path, bit))


def _first_unusable(where: Path) -> tuple[Path, int] | None:
    for path, need in _store_entries(where):
        if lacking := _lacks(path, need):
            return path, lacking
    return None


def _unusable_entry(where: Path, shared: bool) -> str | None:
    """One line naming a file or folder of the store this user cannot use, and what to do; ``None`` if all is well."""
    found = _first_unusable(where)
    for pause in _SETTLE_SECONDS:
        if found is None:
            return None
        # Another session may have created it a moment ago and not yet set its mode: look again.
        time.sleep(pause)
        found = _first_unusable(where)
    if found is None:
        return None
    path, lacking = found
    try:
        info = os.lstat(path)
    except OSError:
        return None
    folder = stat.S_ISDIR(info.st_mode)
    verbs = [verb for bit, verb in ((os.R_OK, "read"), (os.W_OK, "written"), (os.X_OK, "entered")) if lacking & bit]
    me, owner, group = sharing.user_name(), sharing.user_name(info.st_uid), sharing.group_name(info.st_gid)
    what = f"{'folder' if folder else 'file'} {path} cannot be {' or '.join(verbs)} by user {me}"
    facts = f"(owner {owner}, group {group}, mode {stat.S_IMODE(info.st_mode):04o})"
    bits = "2770" if folder else "g+rw"
    if shared:
        store_group = sharing.group_name(os.stat(where).st_gid)
        if group != store_group:
            advice = f"give it the store's group: chgrp {store_group} {path} && chmod {bits} {path}"
        else:
            advice = f"make it group-{'writable' if folder else 'readable and -writable'}: chmod {bits} {path}"
    elif info.st_uid != os.geteuid():
        advice = (
            f"the store is private and this is {owner}'s: give it back (chown {me} {path}) "
            "or share the store with a group (see the README, sharing a state dir between users)"
        )
    else:
        advice = f"chmod u+rw{'x' if folder else ''} {path}"
    return f"store {where} cannot be used: {what} {facts}; {advice}"


def _state_dir_advice(where: Path, info: os.stat_result) -> str:
    """Why this user may not use the state dir, and what to do, for a state dir it cannot write."""
    me, owner, group = sharing.user_name(), sharing.user_name(info.st_uid), sharing.group_name(info.st_gid)
    facts = f" by user {me} (owner {owner}, group {group}, mode {stat.S_IMODE(info.st_mode):04o})"
    if sharing.is_shared(info.st_mode) and info.st_gid not in os.getgroups() and info.st_gid != os.getegid():
        return f"{facts}: it is shared with group {group}; add {me} to it (usermod -aG {group} {me}) and log in again"
    if info.st_uid != os.geteuid():
        share = f"chgrp GROUP {where} && chmod 2770 {where}"
        return f"{facts}: it is {owner}'s; use a state dir of your own, or share it: {share}"
    return facts


def ensure_state_dir(where: Path) -> None:
    """Create the state dir (0700, whatever the umask) and its parents if missing."""
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


def lock_holders(path: Path) -> list[int]:
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


def open_regular_file(path: Path, flags: int, what: str) -> int:
    """Open ``path`` never through a symlink, and only if it is a regular file.

    Created with ``O_CREAT``: 0600, or 0660 in a shared folder (:mod:`pytest_runs.sharing`).

    ``FileNotFoundError`` passes through; any other failure is a :class:`StateError` naming ``what``.
    """
    try:
        # O_NONBLOCK: a FIFO put in a file's place must be refused, not wait for a writer for ever.
        shared = bool(flags & os.O_CREAT) and sharing.shared_folder(path.parent)
        mode = sharing.FILE_SHARED if shared else sharing.FILE_PRIVATE
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, mode)
    except FileNotFoundError:
        raise
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise StateError(f"{what} {path} is a symbolic link; refusing to use it") from None
        raise StateError(f"cannot open {what} {path}: {_oserror_text(error)}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise StateError(f"{what} {path} is not a regular file")
        sharing.share_file(fd, shared)
    except OSError as error:
        os.close(fd)
        raise StateError(f"cannot make {what} {path} group-writable: {_oserror_text(error)}") from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def make_private_dir(path: Path) -> None:
    """Create a 0700 folder (2770 in a shared folder), whatever the umask, unless it exists.

    Refuses a symlink or non-folder there.
    """
    try:
        sharing.make_dir(path)
    except OSError as error:
        raise StateError(f"cannot create {path}: {_oserror_text(error)}") from None
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        raise StateError(f"{path} is a symbolic link; refusing to write through it")
    if not stat.S_ISDIR(info.st_mode):
        raise StateError(f"{path} exists and is not a folder")
