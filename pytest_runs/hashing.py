"""The identity of a test folder: a SHA-256 over its files.

The hash covers every file's relative POSIX path, its kind (regular, executable,
symlink) and its bytes (for a symlink, its target text), in sorted path order.
Each entry is length-prefixed, so no two different trees feed the same bytes to
the hash. Timestamps, owners and the folder's own location play no part: the same
tree gives the same hash in any folder on any machine.

A folder that holds another pytest-runs store (its ``runs.lock``, or a ``runs.json``
starting with the store's header) is refused rather than hashed: its content changes
with every run recorded there, so no hash over it could identify the tests.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
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

# What marks a folder as a pytest-runs store (the names and header of pytest_runs.store).
_STORE_LOCK = "runs.lock"
_STORE_STATE = "runs.json"
_STORE_FILES = (_STORE_LOCK, _STORE_STATE)
_STORE_HEADER = re.compile(rb'\s*\{\s*"format"\s*:\s*"pytest-runs-state"')
_HEADER_PREFIX = 256


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
    and never followed. Raises :class:`HashError` for a file that cannot be read, and
    for a folder met in the walk (``root`` included) that holds a pytest-runs store
    other than an excluded one: the message names the store and how to keep it out.
    """
    root_path = Path(root)
    if not root_path.is_dir():
        raise HashError(f"test dir {root_path} is not a folder")
    patterns = (*DEFAULT_IGNORE, *ignore)
    excluded = {os.path.realpath(p) for p in exclude}
    digest = hashlib.sha256(_DOMAIN)
    for relative, full, kind in sorted(_walk(str(root_path), "", patterns, excluded, str(root_path))):
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
    folder: str, prefix: str, patterns: tuple[str, ...], excluded: set[str], root: str
) -> Iterator[tuple[bytes, str, bytes]]:
    """Yield (relative path as bytes, full path, kind) for every file below ``folder``."""
    try:
        entries = list(os.scandir(folder))
    except OSError as error:
        raise HashError(f"cannot list {folder}: {error.strerror or error}") from None
    if _holds_store(folder, [e.name for e in entries if e.name in _STORE_FILES and e.is_file(follow_symlinks=False)]):
        if not prefix:
            raise HashError(
                f"test dir {root} is itself a pytest-runs store; keep the store outside the tests' folder "
                "or pass --runs-test-dir with the tests' folder"
            )
        raise HashError(
            f"test dir {root} contains another pytest-runs store, {folder}; pass --runs-test-dir with a folder "
            f"that does not hold it, add {prefix.rstrip('/')!r} to runs_hash_ignore, or move that store"
        )
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
                yield from _walk(entry.path, relative + "/", patterns, excluded, root)
        elif stat.S_ISREG(mode):
            kind = _KIND_EXECUTABLE if mode & stat.S_IXUSR else _KIND_FILE
            yield os.fsencode(relative), entry.path, kind
        else:
            raise HashError(f"cannot hash {entry.path}: not a regular file, folder or symlink")


def _holds_store(folder: str, file_names: list[str]) -> bool:
    """Whether ``folder``, whose regular files include ``file_names``, is a pytest-runs store.

    Only a file named ``runs.json`` is opened, and only its first bytes are read.
    """
    if _STORE_LOCK in file_names:
        return True
    if _STORE_STATE not in file_names:
        return False
    try:
        with open(os.path.join(folder, _STORE_STATE), "rb") as handle:
            return _STORE_HEADER.match(handle.read(_HEADER_PREFIX)) is not None
    except OSError as error:
        raise HashError(f"cannot read {os.path.join(folder, _STORE_STATE)}: {error.strerror or error}") from None


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
