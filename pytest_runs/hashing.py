"""The identity of a test folder: a SHA-256 over its files.

The hash covers every file's relative POSIX path, its kind (regular, executable,
symlink) and its bytes (for a symlink, its target text), in sorted path order.
Each entry is length-prefixed, so no two different trees feed the same bytes to
the hash. Timestamps, owners and the folder's own location play no part: the same
tree gives the same hash in any folder on any machine.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path

__all__ = ["DEFAULT_IGNORE", "HashError", "hash_test_dir"]

#: Names left out of the hash wherever they appear in the tree.
DEFAULT_IGNORE: tuple[str, ...] = (
    "__pycache__",
    "*.pyc",
    ".pytest_cache",
    ".git",
    ".hg",
    ".svn",
    ".tox",
    ".nox",
    ".venv",
    "venv",
    "node_modules",
    ".mypy_cache",
    ".ruff_cache",
    "*.egg-info",
)

# Bump when the framing changes, so that old and new hashes never coincide.
_DOMAIN = b"pytest-runs tree v1\0"
_CHUNK = 1 << 20
_KIND_FILE = b"f"
_KIND_EXECUTABLE = b"x"
_KIND_SYMLINK = b"l"


class HashError(Exception):
    """A file in the test folder cannot be hashed; the message names it."""


def hash_test_dir(
    root: str | os.PathLike[str],
    ignore: Iterable[str] = (),
    exclude: Iterable[str | os.PathLike[str]] = (),
) -> str:
    """Hex SHA-256 identifying the content of the folder ``root``.

    ``ignore`` adds glob patterns to :data:`DEFAULT_IGNORE`; a pattern matches an
    entry's name or its relative POSIX path. ``exclude`` lists folders (such as the
    run store) left out when they lie inside ``root``. Symlinks are hashed as links
    and never followed. Raises :class:`HashError` for a file that cannot be read.
    """
    root_path = Path(root)
    if not root_path.is_dir():
        raise HashError(f"test dir {root_path} is not a folder")
    patterns = (*DEFAULT_IGNORE, *ignore)
    excluded = {os.path.realpath(p) for p in exclude}
    digest = hashlib.sha256(_DOMAIN)
    for relative, full, kind in sorted(_walk(str(root_path), "", patterns, excluded)):
        digest.update(kind)
        digest.update(_framed(relative))
        if kind == _KIND_SYMLINK:
            digest.update(_framed(os.fsencode(_readlink(full))))
        else:
            _hash_file(digest, full)
    return digest.hexdigest()


def _framed(data: bytes) -> bytes:
    return len(data).to_bytes(8, "big") + data


def _ignored(name: str, relative: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(relative, p) for p in patterns)


def _walk(
    folder: str, prefix: str, patterns: tuple[str, ...], excluded: set[str]
) -> Iterator[tuple[bytes, str, bytes]]:
    """Yield (relative path as bytes, full path, kind) for every file below ``folder``."""
    try:
        entries = list(os.scandir(folder))
    except OSError as error:
        raise HashError(f"cannot list {folder}: {error.strerror or error}") from None
    for entry in entries:
        relative = prefix + entry.name
        if _ignored(entry.name, relative, patterns):
            continue
        try:
            mode = entry.stat(follow_symlinks=False).st_mode
        except OSError as error:
            raise HashError(f"cannot stat {entry.path}: {error.strerror or error}") from None
        if stat.S_ISLNK(mode):
            yield os.fsencode(relative), entry.path, _KIND_SYMLINK
        elif stat.S_ISDIR(mode):
            if os.path.realpath(entry.path) not in excluded:
                yield from _walk(entry.path, relative + "/", patterns, excluded)
        elif stat.S_ISREG(mode):
            kind = _KIND_EXECUTABLE if mode & stat.S_IXUSR else _KIND_FILE
            yield os.fsencode(relative), entry.path, kind
        else:
            raise HashError(f"cannot hash {entry.path}: not a regular file, folder or symlink")


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError as error:
        raise HashError(f"cannot read symlink {path}: {error.strerror or error}") from None


def _hash_file(digest: hashlib._Hash, path: str) -> None:
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            digest.update(size.to_bytes(8, "big"))
            remaining = size
            while remaining > 0:
                chunk = handle.read(min(_CHUNK, remaining))
                if not chunk:
                    raise HashError(f"{path} shrank while it was being hashed")
                digest.update(chunk)
                remaining -= len(chunk)
    except OSError as error:
        raise HashError(f"cannot read {path}: {error.strerror or error}") from None
