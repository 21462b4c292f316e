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
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import threading
from pathlib import Path

__all__ = ["StoreLock"]


class StoreLock:
    """An exclusive lock on ``path``, for one holder at a time within this object."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self, timeout: float) -> None:
        """Take the lock, waiting at most ``timeout`` seconds.

        Raises ``TimeoutError`` past that, and ``OSError`` if the lock file cannot be opened.
        """
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(f"{self.path} is not a regular file")
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pass  # contended: wait for it in the kernel, below
        except BaseException:
            os.close(fd)
            raise
        else:
            self._fd = fd
            return
        waiter = _Waiter(fd)
        if waiter.wait(timeout):
            self._fd = fd
            return
        raise TimeoutError(f"{self.path} stayed locked for {timeout:g}s")

    def release(self) -> None:
        """Let the lock go (closing the descriptor releases it)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


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
                    os.close(self.fd)
        else:
            with self._guard:
                if self._abandoned:
                    os.close(self.fd)  # the caller gave up: let the lock go at once
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
                with contextlib.suppress(OSError):
                    os.close(self.fd)
                raise self._error
            self._abandoned = True
            return False
