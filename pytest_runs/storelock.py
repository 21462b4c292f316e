"""The store's cross-process lock: an exclusive ``flock`` that is waited for in the kernel, never for ever.

Why not poll: a waiter that retries every few milliseconds almost never finds the lock
free while other processes take it back to back, and can starve; a waiter blocked in
``flock`` is woken by the kernel the moment the holder lets go. Why not block without a
bound: a frozen holder (a stopped process, a hung NFS client) would hang every session
and every command. So a contended acquire blocks in ``flock`` on a helper thread, and the
caller waits for that thread at most ``timeout`` seconds. A helper that gets the lock after
its caller gave up closes its descriptor at once, which lets the lock go.

Guarantees: the lock file is opened without following symlinks, created 0600 and never
removed or replaced; each hold uses its own open file description, so two ``StoreLock``
objects in one process exclude each other like two processes do; a process that dies
holding the lock loses it.

Forks: a ``flock`` belongs to the open file description, which a child forked during a
hold shares; closing one descriptor of it lets nothing go while a copy is open. So the
holder lets go with ``LOCK_UN`` before it closes, which frees the lock for every copy,
however the child was forked (``os.fork``, ``multiprocessing``, or C code calling
``fork()``, which runs no at-fork handler). A child only closes its copies (Python's
at-fork handler does that at once): its ``LOCK_UN`` would free a lock its parent holds.

:func:`describe_holders` says who holds the lock for an error message: the PID that took
it (``/proc/locks``) may be gone while a process it forked keeps the lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import threading
import weakref
from pathlib import Path

__all__ = ["StoreLock", "describe_holders"]

# Descriptors of this process's store locks, held or being waited for: a child forked
# through ``os.fork`` closes its copies at once (see the module docs). A number leaves the
# set before it is closed, so the set never names a descriptor already closed (or reused).
_open_fds: set[int] = set()
_fds_guard = threading.Lock()


def _opened(fd: int) -> None:
    with _fds_guard:
        _open_fds.add(fd)


def _close(fd: int, *, unlock: bool) -> None:
    """Close a descriptor of the lock file; with ``unlock``, let go of its lock for every copy first."""
    with _fds_guard:
        _open_fds.discard(fd)
    if unlock:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
    with contextlib.suppress(OSError):  # code under test may have closed it already
        os.close(fd)


class StoreLock:
    """An exclusive lock on ``path``, for one holder at a time within this object."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._pid = os.getpid()
        _locks.add(self)

    def acquire(self, timeout: float) -> None:
        """Take the lock, waiting at most ``timeout`` seconds.

        Raises ``TimeoutError`` past that, and ``OSError`` if the lock file cannot be opened.
        """
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        _opened(fd)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(f"{self.path} is not a regular file")
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pass  # contended: wait for it in the kernel, below
        except BaseException:
            _close(fd, unlock=False)
            raise
        else:
            self._fd, self._pid = fd, os.getpid()
            return
        waiter = _Waiter(fd)
        if waiter.wait(timeout):
            self._fd, self._pid = fd, os.getpid()
            return
        raise TimeoutError(f"{self.path} stayed locked for {timeout:g}s")

    def release(self) -> None:
        """Let the lock go for every copy of its descriptor (``LOCK_UN``), then close it.

        In a child forked during the hold, only close: the lock is the parent's.
        """
        if self._fd is not None:
            fd, self._fd = self._fd, None
            _close(fd, unlock=os.getpid() == self._pid)

    def _forget(self) -> None:
        """In a forked child: the parent's hold is not this process's to end."""
        self._fd = None


_locks: weakref.WeakSet[StoreLock] = weakref.WeakSet()


def _forget_inherited() -> None:
    # The child's only thread: a guard another thread held at the fork stays taken here.
    global _fds_guard
    _fds_guard = threading.Lock()
    for lock in list(_locks):
        lock._forget()
    inherited = list(_open_fds)
    _open_fds.clear()
    for fd in inherited:
        with contextlib.suppress(OSError):
            os.close(fd)


os.register_at_fork(after_in_child=_forget_inherited)


class _Waiter:
    """Blocks in ``flock`` on its own thread; whoever finishes second cleans up."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._guard = threading.Lock()
        self._done = threading.Event()
        self._acquired = False
        self._abandoned = False
        self._error: OSError | None = None
        threading.Thread(target=self._block, name="pytest-runs-store-lock", daemon=True).start()

    def _block(self) -> None:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except OSError as error:
            with self._guard:
                self._error = error
                if self._abandoned:
                    _close(self.fd, unlock=False)
        else:
            with self._guard:
                if self._abandoned:
                    # The caller gave up: let the lock go at once, also for a child forked meanwhile.
                    _close(self.fd, unlock=True)
                else:
                    self._acquired = True
        self._done.set()

    def wait(self, timeout: float) -> bool:
        """True once the lock is held; False (and the descriptor is left to the helper) after ``timeout``."""
        self._done.wait(timeout)
        with self._guard:
            if self._acquired:
                return True
            if self._error is not None:
                _close(self.fd, unlock=False)
                raise self._error
            self._abandoned = True
            return False


def describe_holders(path: Path, takers: list[int]) -> tuple[list[int], str, str]:
    """Who holds the lock on ``path``: their PIDs, and for a message ``" by PID 42"`` and what to do.

    ``takers`` are the PIDs ``/proc/locks`` names: those that took the lock. A taker may be
    gone while a process it forked keeps the lock through an inherited descriptor; this
    looks for the processes whose descriptors hold it (``/proc/PID/fdinfo``, as far as this
    user may look) and names them. Linux only; elsewhere, or with nothing found, the takers.
    """
    # The takers first (a process that inherited the descriptor comes after the one that took
    # the lock), however /proc happens to list them: PIDs wrap around.
    keepers = sorted(_keepers(path), key=lambda pid: pid not in takers)
    gone = [pid for pid in takers if not _alive(pid)]
    if keepers and set(keepers) != set(takers):
        previous = [pid for pid in takers if pid not in keepers]
        whose = ""
        if previous:
            state = "which is gone" if set(previous) <= set(gone) else "which let go of it"
            whose = f" (taken by PID {_pids(previous)}, {state}; inherited through a fork)"
        return keepers, f" by PID {_pids(keepers)}{whose}", "if that process is stuck, stop it"
    if not takers:
        return [], "", "if that process is stuck, stop it"
    if len(gone) == len(takers):
        return (
            takers,
            f" by PID {_pids(takers)}, which is gone: a process it forked still holds the lock",
            "find that process (fuser -v on the lock file names it) and stop it",
        )
    return takers, f" by PID {_pids(takers)}", "if that process is stuck, stop it"


def _pids(pids: list[int]) -> str:
    return ", ".join(map(str, pids))


def _alive(pid: int) -> bool:
    """Whether ``pid`` names a process that can still run (a zombie cannot, and holds no descriptor)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            fields = handle.read().rsplit(b")", 1)[-1].split()
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except OSError:
            pass
        return True
    return not fields or fields[0] not in (b"Z", b"X")


def _keepers(path: Path) -> list[int]:
    """PIDs with a descriptor of ``path`` that holds a lock on it, from ``/proc`` (those this user may see)."""
    try:
        target = os.stat(path)
        processes = [name for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return []
    keepers = []
    for pid in processes:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue  # gone meanwhile, or another user's
        for fd in fds:
            try:
                info = os.stat(f"/proc/{pid}/fd/{fd}")
                if (info.st_dev, info.st_ino) != (target.st_dev, target.st_ino):
                    continue
                with open(f"/proc/{pid}/fdinfo/{fd}", "rb") as handle:
                    locked = b"\nlock:" in handle.read()
            except OSError:
                continue
            if locked:
                keepers.append(int(pid))
                break
    return keepers
