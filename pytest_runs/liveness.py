"""Whether the owner of a run is alive, decided by the kernel where it can be, else by the owner's lease.

An owning session holds, for its whole life, an exclusive POSIX record lock
(``fcntl``/``lockf``) on a file of its own, ``<state dir>/owners/<token>.lock``, and
records the token in its run. The kernel drops that lock the moment the process dies,
however it dies, and keeps it while the process is stopped: so a reader on the same
kernel (any PID namespace, any container sharing the state dir) asks the lock, never a
PID or a host name. Record locks, unlike ``flock``, are not inherited by ``fork``: a
daemon that a test forks cannot keep the machine after its session is gone.

Guarantees:

- The owner takes its lock before its run records the token, and drops it only after
  its run is recorded as ended (:class:`LivenessLock` is used that way by the session).
- A reader never holds what it probes: it asks with a shared lock that it drops at once,
  and the kernel drops it too if the reader dies mid-probe. A reader in the owner's own
  process answers from this process's table of held tokens and never opens the file (a
  POSIX lock is lost when its process closes *any* descriptor of the file).
- An owner whose lock cannot be observed (another host, another boot: the boot IDs
  differ) is judged only by its heartbeat against the lease *it* recorded; a reader's own
  settings never judge another's run.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import secrets
import stat
import threading
from datetime import datetime, timedelta
from pathlib import Path

from .model import Run

__all__ = ["DEFAULT_LEASE", "OWNERS_DIR_NAME", "LivenessLock", "lock_path", "probe", "stale_reason"]

#: Seconds without a heartbeat after which an owner that cannot be observed is stale,
#: for runs that recorded no lease of their own.
DEFAULT_LEASE = 300.0
OWNERS_DIR_NAME = "owners"

_TOKEN = re.compile(r"^[0-9a-f]{32}$")
# Tokens whose lock this process holds: a probe from inside the owner's own process
# must not open (and then close) the file, which would drop the owner's POSIX lock.
_held_here: set[str] = set()
_held_guard = threading.Lock()


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

    def acquire(self) -> None:
        """Create the lock file (0600, never following symlinks) and lock it; ``OSError`` if that fails."""
        folder = self.path.parent
        with contextlib.suppress(FileExistsError):
            os.mkdir(folder, 0o700)
        if not stat.S_ISDIR(os.lstat(folder).st_mode):
            raise OSError(errno.ENOTDIR, f"{folder} is not a folder")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            raise
        with _held_guard:
            _held_here.add(self.token)
        self._fd = fd

    @property
    def held(self) -> bool:
        """True between a successful :meth:`acquire` and :meth:`release`."""
        return self._fd is not None

    def release(self) -> None:
        """Remove the file, then drop the lock. Call only once the run is recorded as ended."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        with _held_guard:
            _held_here.discard(self.token)
        os.close(self._fd)
        self._fd = None


def probe(state_dir: Path, token: str) -> bool | None:
    """True while some process on this kernel holds the liveness lock of ``token``, else False.

    ``None`` when there is no lock file to ask (or it is not a plain file): the owner
    creates it before its run names the token and removes it only after its run has
    ended, so for a run still active that is tampering, and the caller must judge by
    other means. A token that is not ours gives ``False``.
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
    except OSError:
        return None
    try:
        fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno in (errno.EACCES, errno.EAGAIN):
            return True
        raise
    finally:
        # Closing drops the shared lock this probe may have taken.
        os.close(fd)
    return False


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
    if observable(run, boot_id):
        try:
            alive = probe(state_dir, run.owner_token)
        except OSError:
            alive = None  # this file system cannot tell: fall back to the lease
        if alive is not None:
            return None if alive else "its liveness lock is free: the owning process has ended"
    if run.heartbeat_at is None:
        return None
    lease = run.owner_lease or DEFAULT_LEASE
    if now - run.heartbeat_at > timedelta(seconds=lease):
        return f"no heartbeat for more than its lease of {lease:g}s"
    return None


def remove_lock_file(state_dir: Path, token: str) -> None:
    """Delete the lock file of an owner found dead (under the store lock, so no probe races it)."""
    with contextlib.suppress(ValueError, OSError):
        os.unlink(lock_path(state_dir, token))
