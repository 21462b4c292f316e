"""Private and group-shared state dirs: the modes of what pytest-runs creates in them.

A folder whose mode has the setgid bit and group write (``chgrp lab DIR && chmod 2770
DIR``) is *shared* with its group. In a shared folder pytest-runs creates files 0660 and
folders 2770, whatever the umask (it sets the mode again after creating, with ``fchmod``
or ``chmod``); the setgid bit makes everything in it belong to the folder's group, and
passes itself on to the folders made inside. Elsewhere it creates files 0600 and folders
0700, as it always did. Whether a folder is shared is read from the folder itself, so a
shared state dir's own folders (``history/``, ``owners/``, ``runs/<id>/`` ...) are shared
because they were created shared.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from pathlib import Path

__all__ = [
    "DIR_PRIVATE",
    "DIR_SHARED",
    "FILE_PRIVATE",
    "FILE_SHARED",
    "dir_mode",
    "file_mode",
    "group_name",
    "is_shared",
    "make_dir",
    "share_file",
    "shared_folder",
    "user_name",
]

FILE_PRIVATE = 0o600
FILE_SHARED = 0o660
DIR_PRIVATE = 0o700
DIR_SHARED = 0o2770


def is_shared(mode: int) -> bool:
    """True for the mode of a folder shared with its group: setgid and group-writable."""
    return bool(mode & stat.S_ISGID) and bool(mode & stat.S_IWGRP)


def shared_folder(folder: str | os.PathLike[str]) -> bool:
    """True when ``folder`` is shared with its group (False if it cannot be looked at)."""
    try:
        return stat.S_ISDIR((info := os.stat(folder)).st_mode) and is_shared(info.st_mode)
    except (OSError, ValueError):
        return False


def file_mode(folder: str | os.PathLike[str]) -> int:
    """The mode of a new file in ``folder``: 0660 in a shared folder, else 0600."""
    return FILE_SHARED if shared_folder(folder) else FILE_PRIVATE


def dir_mode(folder: str | os.PathLike[str]) -> int:
    """The mode of a new folder in ``folder``: 2770 in a shared folder, else 0700."""
    return DIR_SHARED if shared_folder(folder) else DIR_PRIVATE


def share_file(fd: int, shared: bool) -> None:
    """Make a file of this user in a shared folder group-readable and -writable, whatever the umask.

    Does nothing in a private folder, or to another user's file (that one's modes are its
    owner's to set; :func:`pytest_runs.filebackend.check_state_dir` names it if this user
    cannot use it).
    """
    if not shared:
        return
    info = os.fstat(fd)
    if info.st_uid == os.geteuid() and stat.S_IMODE(info.st_mode) != FILE_SHARED:
        os.fchmod(fd, FILE_SHARED)


def make_dir(path: Path) -> bool:
    """Create ``path`` with its parent's mode rule (2770 in a shared folder, else 0700); False if it exists."""
    mode = dir_mode(path.parent)
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        return False
    # mkdir's mode is filtered through the umask (and may drop setgid): set it exactly.
    os.chmod(path, mode)
    return True


def user_name(uid: int | None = None) -> str:
    """The name of user ``uid`` (default: this process's effective user), or its number."""
    uid = os.geteuid() if uid is None else uid
    try:
        return pwd.getpwuid(uid).pw_name
    except (KeyError, OverflowError):
        return str(uid)


def group_name(gid: int) -> str:
    """The name of group ``gid``, or its number."""
    try:
        return grp.getgrgid(gid).gr_name
    except (KeyError, OverflowError):
        return str(gid)
