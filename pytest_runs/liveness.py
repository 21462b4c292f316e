"""Whether the owner of a run is alive, decided by the kernel where it can be, else by the owner's lease.

An owning session holds, for its whole life, an exclusive lock on a file of its own,
``<state dir>/owners/<token>.lock``, and records the token in its run. The kernel drops
that lock the moment the process dies, however it dies, and keeps it while the process is
stopped: so a reader on the same kernel (any PID namespace, any container sharing the
state dir) asks the lock, never a PID or a host name.

The lock is an open-file-description lock (``F_OFD_SETLK``, Linux), falling back to a
POSIX record lock elsewhere. An OFD lock is not lost when the process closes some *other*
descriptor of the file (a test that copies the store), which a POSIX lock would be; it
would be inherited by ``fork``, so a forked child closes its copy at once
(``os.register_at_fork``). A tracked session does not hold its lock in its own process at
all: its keeper process does (:mod:`pytest_runs.keeper`), so that nothing a test forks,
even from C code where at-fork handlers do not run, inherits it, and a daemon a test
forks cannot keep the machine.

Guarantees:

- The owner takes its lock before its run records the token, and removes the file only
  after its run is recorded as ended (:meth:`LivenessLock.release`); on any other way out
  it only lets go of the lock (:meth:`LivenessLock.drop`), so that the file is there for
  readers to find free and the run is reclaimed at once.
- A reader never holds what it probes: it asks with ``F_OFD_GETLK``, which takes nothing
  (or, without OFD locks, a shared lock it drops at once). A reader in the owner's own
  process answers from this process's table of held tokens.
- An owner whose lock cannot be observed (another host, another boot: the boot IDs
  differ) is judged only by its heartbeat against the lease *it* recorded; a reader's own
  settings never judge another's run.
- Only the process that took a lock removes its file: a forked child that runs on into
  pytest's own shutdown cannot give the machine away.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import secrets
import stat
import struct
import threading
from datetime import datetime, timedelta
from pathlib import Path

from . import sharing
from .model import Run

__all__ = ["DEFAULT_LEASE", "OWNERS_DIR_NAME", "LivenessLock", "lock_path", "probe", "stale_reason"]

#: Seconds without a heartbeat after which an owner that cannot be observed is stale,
#: for runs that recorded no lease of their own.
DEFAULT_LEASE = 300.0
OWNERS_DIR_NAME = "owners"

_TOKEN = re.compile(r"^[0-9a-f]{32}$")
# Tokens whose lock this process holds: a probe from inside the owner's own process
# answers from here (and, without OFD locks, must not close a descriptor of the file).
_held_here: set[str] = set()
_held_locks: list[LivenessLock] = []
_held_guard = threading.Lock()
# Tokens whose lock this process found there but not readable, and why: the lease judged them.
_unprobed: dict[str, str] = {}
_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", None)
_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", None)


def _flock_struct(kind: int) -> bytes:
    # struct flock {short l_type, l_whence; off_t l_start, l_len; pid_t l_pid;} on 64-bit Linux;
    # whole file (start 0, length 0), l_pid 0 as OFD locks require.
    return struct.pack("@hhqqi4x", kind, os.SEEK_SET, 0, 0, 0)


def _lock_exclusively(fd: int) -> None:
    if _OFD_SETLK is not None:
        try:
            fcntl.fcntl(fd, _OFD_SETLK, _flock_struct(fcntl.F_WRLCK))
            return
        except OSError as error:
            if error.errno != errno.EINVAL:  # EINVAL: no OFD locks on this kernel or file system
                raise
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _is_locked(fd: int) -> bool:
    if _OFD_GETLK is not None:
        try:
            answer = fcntl.fcntl(fd, _OFD_GETLK, _flock_struct(fcntl.F_WRLCK))
        except OSError as error:
            if error.errno != errno.EINVAL:
                raise
        else:
            kind: int = struct.unpack("@hhqqi4x", answer)[0]
            return kind != fcntl.F_UNLCK
    try:
        fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno in (errno.EACCES, errno.EAGAIN):
            return True
        raise
    return False  # the shared lock just taken goes with the descriptor


def _forget_inherited_locks() -> None:
    """In a forked child: close the copies of the parent's lock descriptors, forget its tokens."""
    for lock in _held_locks:
        lock._forget()
    _held_locks.clear()
    _held_here.clear()


def lock_path(state_dir: Path, token: str) -> Path:
    """The liveness lock file of ``token``; ``ValueError`` for a token that is not ours to build paths from."""
    if not _TOKEN.match(token):
        raise ValueError(f"owner token {token!r} is not 32 lowercase hex digits")
    return state_dir / OWNERS_DIR_NAME / f"{token}.lock"


class LivenessLock:
    """The owner's side: a fresh token and an exclusive lock held until :meth:`release`."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.token = secrets.token_hex(16)
        self.path = lock_path(state_dir, self.token)
        self._fd: int | None = None
        self._pid = os.getpid()
        self._identity: tuple[int, int] | None = None

    def acquire(self) -> None:
        """Create the lock file (never following symlinks) and lock it; ``OSError`` if that fails.

        0600 in a private store; in a shared one (:mod:`pytest_runs.sharing`) 0660, whatever
        the umask, so that every member of the group can probe it.
        """
        folder = self.path.parent
        sharing.make_dir(folder)
        if not stat.S_ISDIR(os.lstat(folder).st_mode):
            raise OSError(errno.ENOTDIR, f"{folder} is not a folder")
        shared = sharing.shared_folder(folder)
        mode = sharing.FILE_SHARED if shared else sharing.FILE_PRIVATE
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
        try:
            sharing.share_file(fd, shared)
            _lock_exclusively(fd)
        except OSError:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            raise
        info = os.fstat(fd)
        with _held_guard:
            _held_here.add(self.token)
            _held_locks.append(self)
        self._fd, self._pid, self._identity = fd, os.getpid(), (info.st_dev, info.st_ino)

    @property
    def held(self) -> bool:
        """True between a successful :meth:`acquire` and :meth:`release` or :meth:`drop`."""
        return self._fd is not None

    def still_held(self) -> bool:
        """Check, and mend where it can, that the lock is still this process's.

        Code under test may close every descriptor (``os.closerange``): that drops the lock.
        This notices (the descriptor is gone or now names another file) and takes the lock
        again on the same file. Returns False if it could not; the caller must then assume
        that a reader may have seen the owner as gone.
        """
        if self._fd is None or os.getpid() != self._pid:
            return False
        try:
            info = os.fstat(self._fd)
            if (info.st_dev, info.st_ino) == self._identity:
                return True
        except OSError:
            pass
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            _lock_exclusively(fd)
            info = os.fstat(fd)
        except OSError:
            os.close(fd)
            return False
        self._fd, self._identity = fd, (info.st_dev, info.st_ino)
        return True

    def release(self) -> None:
        """Remove the file, then let go of the lock. Call only once the run is recorded as ended."""
        if self._fd is None or os.getpid() != self._pid:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        self.drop()

    def drop(self) -> None:
        """Let go of the lock but leave the file, so that a run naming it is seen as owner-less at once."""
        if self._fd is None or os.getpid() != self._pid:
            return
        with _held_guard:
            _held_here.discard(self.token)
            if self in _held_locks:
                _held_locks.remove(self)
        with contextlib.suppress(OSError):  # code under test may have closed it already
            os.close(self._fd)
        self._fd = None

    def _forget(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


os.register_at_fork(after_in_child=_forget_inherited_locks)


def probe(state_dir: Path, token: str) -> bool | None:
    """True while some process on this kernel holds the liveness lock of ``token``, else False.

    ``None`` when there is no lock file to ask (or it is not a plain file): the owner
    creates it before its run names the token and removes it only after its run has
    ended, so for a run still active that is tampering, and the caller must judge by
    other means. A token that is not ours gives ``False``. ``PermissionError`` when the
    file is there but this user may not read it (another user's, in a store not shared).
    """
    with _held_guard:
        if token in _held_here:
            return True
    try:
        path = lock_path(state_dir, token)
    except ValueError:
        return False
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except PermissionError:
        raise  # there, but not for this user to ask: the caller must say so
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return _is_locked(fd)
    finally:
        os.close(fd)


def unprobed(token: str) -> str | None:
    """Why this process could not ask the liveness lock of ``token``, if it tried and could not."""
    return _unprobed.get(token)


def observable(run: Run, boot_id: str) -> bool:
    """True when the owner of ``run`` runs on this kernel, so its liveness lock tells the truth."""
    return bool(run.owner_token and run.owner_boot_id and run.owner_boot_id == boot_id)


def stale_reason(run: Run, now: datetime, boot_id: str, state_dir: Path) -> str | None:
    """Why the non-terminal ``run`` has lost its owner, or ``None`` while it may be alive.

    On this kernel: stale exactly when its liveness lock is free (a stopped owner keeps
    it). Otherwise, or when the lock file is missing or cannot be asked: stale when its
    heartbeat is older than the owner's recorded lease (:data:`DEFAULT_LEASE` if it
    recorded none). A run with neither a lock nor a heartbeat (library use) is never stale.
    """
    if run.status.is_terminal:
        return None
    lease = run.owner_lease or DEFAULT_LEASE
    if observable(run, boot_id):
        try:
            alive = probe(state_dir, run.owner_token)
        except PermissionError as error:
            alive = None  # not this user's to ask: the lease decides, and readers are told (unprobed)
            _unprobed[run.owner_token] = (
                f"its liveness lock {lock_path(state_dir, run.owner_token)} cannot be read by user "
                f"{sharing.user_name()} ({error.strerror}), so it counts as alive until its lease of {lease:g}s "
                "runs out; share the store with a group (see the README)"
            )
        except OSError:
            alive = None  # this file system cannot tell: fall back to the lease
        if alive is not None:
            _unprobed.pop(run.owner_token, None)
            return None if alive else "its liveness lock is free: the owning process has ended"
    if run.heartbeat_at is None:
        return None
    if now - run.heartbeat_at > timedelta(seconds=lease):
        return f"no heartbeat for more than its lease of {lease:g}s"
    return None


def remove_lock_file(state_dir: Path, token: str) -> None:
    """Delete the lock file of an owner found dead (under the store lock, so no probe races it)."""
    with contextlib.suppress(ValueError, OSError):
        os.unlink(lock_path(state_dir, token))
