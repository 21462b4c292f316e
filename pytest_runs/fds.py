"""Descriptors that pytest-runs owns in the session's process, used only while they are still its own.

A test may close every descriptor (``os.closerange(3, ...)``) and open files that get the
same numbers. :class:`OwnedFd` remembers what its descriptor named when it was opened
(``st_dev``, ``st_ino``) and checks it before each use: a descriptor that is gone or now
names something else is never written to nor closed, only forgotten.
"""

from __future__ import annotations

import contextlib
import os

__all__ = ["OwnedFd"]


class OwnedFd:
    """A descriptor of ours, verified before each use."""

    def __init__(self, fd: int) -> None:
        info = os.fstat(fd)
        self._fd: int | None = fd
        self._identity = (info.st_dev, info.st_ino)

    def fileno(self) -> int | None:
        """The descriptor while it still names what it was opened on, else ``None`` (and it is forgotten)."""
        if self._fd is None:
            return None
        try:
            info = os.fstat(self._fd)
        except OSError:
            info = None
        if info is None or (info.st_dev, info.st_ino) != self._identity:
            self._fd = None
        return self._fd

    def close(self) -> None:
        """Close it if it is still ours; forget it either way."""
        fd = self.fileno()
        self._fd = None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
