"""The identity of a test folder: a SHA-256 over its files.

The hash covers every file's relative POSIX path, its kind (regular, executable,
symlink) and its content (for a symlink, its target text; for a file, its size and
its own SHA-256), in sorted path order. Each entry is length-prefixed, so no two
different trees feed the same bytes to the hash. Timestamps, owners and the folder's
own location play no part: the same tree gives the same hash in any folder on any
machine.

Files are hashed on a few threads (``hashlib`` and reads let go of the GIL), and a
:class:`HashCache` can remember each file's digest by its ``lstat`` (size, mtime,
ctime, inode), so that hashing an unchanged folder again only stats it. A file modified
within :data:`RACY_SECONDS` before the hashing that wrote the cache began is never taken
from it (git's "racy" rule: a later change in the same timestamp tick would not show in its
stat), and a digest is only ever reused for a file whose whole stat is the same, so the
cache can make hashing faster but never give another hash.

A folder that holds another pytest-runs store (its ``runs.lock``, or a ``runs.json``
starting with the store's header) is refused rather than hashed: its content changes
with every run recorded there, so no hash over it could identify the tests.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fnmatch
import hashlib
import json
import os
import re
import stat
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

__all__ = ["DEFAULT_IGNORE", "RACY_SECONDS", "HashCache", "HashError", "hash_test_dir"]

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
_DOMAIN = b"pytest-runs tree v2\0"
_CHUNK = 1 << 20
#: A file modified this close to the start of a hashing is never taken from the cache it writes.
RACY_SECONDS = 2.0
# Files per task on the hashing threads: many small files share one task's overhead.
_BATCH_BYTES = 4 << 20
_THREADS = min(8, os.cpu_count() or 2)
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


# One file's identity for the cache: size, mtime_ns, ctime_ns, inode, device.
_Stat = tuple[int, int, int, int, int]


class HashCache:
    """File digests remembered by their stat, in one JSON file (for one test folder).

    Load and save never raise: an unreadable, foreign or corrupt cache file is treated as
    empty (it is a cache, and starts over); a cache that cannot be written is not written.
    The file is written atomically, 0600, and never through a symlink.
    """

    FORMAT = "pytest-runs-hash-cache"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._entries: dict[str, tuple[_Stat, str]] = {}
        self._written_ns = 0
        self._load()

    def get(self, relative: bytes, identity: _Stat) -> bytes | None:
        """The digest of a file whose stat is exactly ``identity``, if it may be trusted."""
        found = self._entries.get(relative.hex())
        if found is None or found[0] != identity:
            return None
        if identity[1] >= self._written_ns - int(RACY_SECONDS * 1e9):
            return None  # modified too close to the cache's writing: it may have changed since
        return bytes.fromhex(found[1])

    def save(self, digests: dict[bytes, tuple[_Stat, bytes]], started_ns: int) -> None:
        """Remember ``digests`` (and only them), leaving out files modified too recently to trust.

        ``started_ns`` is when the hashing began, before any file was read: a file read
        later in a long hashing was still modified within the window if it was modified
        within it before that start.
        """
        racy_from = started_ns - int(RACY_SECONDS * 1e9)
        kept = {
            relative.hex(): (identity, digest.hex())
            for relative, (identity, digest) in digests.items()
            if identity[1] < racy_from and identity[2] < racy_from
        }
        if kept == self._entries:
            return  # nothing new to remember: an unchanged folder costs no write
        entries = {key: [list(identity), digest] for key, (identity, digest) in kept.items()}
        data = json.dumps({"format": self.FORMAT, "written_ns": started_ns, "files": entries}).encode()
        with contextlib.suppress(OSError):
            fd, temporary = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
            try:
                with open(fd, "wb") as handle:
                    handle.write(data)
                os.replace(temporary, self.path)
            except OSError:
                os.unlink(temporary)
                raise

    def _load(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            with open(fd, "rb") as handle:
                document = json.loads(handle.read())
            if not isinstance(document, dict) or document.get("format") != self.FORMAT:
                return
            written_ns = int(document["written_ns"])
            entries = {}
            for key, (identity, digest) in document["files"].items():
                bytes.fromhex(key)
                if len(identity) != 5 or len(bytes.fromhex(digest)) != 32:
                    return
                entries[key] = (tuple(int(part) for part in identity), digest)
        except (OSError, ValueError, TypeError, KeyError, RecursionError, AttributeError):
            return
        self._entries, self._written_ns = entries, written_ns  # type: ignore[assignment]


def hash_test_dir(
    root: str | os.PathLike[str],
    ignore: Iterable[str] = (),
    exclude: Iterable[str | os.PathLike[str]] = (),
    cache: HashCache | None = None,
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
    started_ns = time.time_ns()  # before any stat: the racy rule's reference
    # One regular expression for all the patterns: matched once per name and once per path.
    patterns = re.compile("|".join(fnmatch.translate(p) for p in (*DEFAULT_IGNORE, *ignore)))
    excluded = {os.path.realpath(p) for p in exclude}
    digest = hashlib.sha256(_DOMAIN)
    entries = sorted(_walk(str(root_path), "", patterns, excluded, str(root_path)))
    files = {relative: (full, identity) for relative, full, kind, identity in entries if kind != _KIND_SYMLINK}
    digests = _file_digests(files, cache)
    for relative, full, kind, _ in entries:
        digest.update(kind)
        digest.update(_framed(relative))
        if kind == _KIND_SYMLINK:
            digest.update(_framed(os.fsencode(_readlink(full))))
        else:
            identity, file_digest = digests[relative]
            digest.update(identity[0].to_bytes(8, "big"))
            digest.update(file_digest)
    if cache is not None:
        cache.save(digests, started_ns)
    return digest.hexdigest()


def _file_digests(files: dict[bytes, tuple[str, _Stat]], cache: HashCache | None) -> dict[bytes, tuple[_Stat, bytes]]:
    """Each file's (stat, SHA-256): from the cache where it may be trusted, else read, on a few threads."""
    found: dict[bytes, tuple[_Stat, bytes]] = {}
    batches: list[list[tuple[bytes, str, _Stat]]] = [[]]
    batch_bytes = 0
    for relative, (full, identity) in files.items():
        cached = cache.get(relative, identity) if cache is not None else None
        if cached is not None:
            found[relative] = (identity, cached)
            continue
        if batch_bytes >= _BATCH_BYTES:
            batches.append([])
            batch_bytes = 0
        batches[-1].append((relative, full, identity))
        batch_bytes += identity[0] + 4096
    if len(batches) == 1:
        found.update(_digest_batch(batches[0]))  # a few small files: threads would cost more than they give
        return found
    with concurrent.futures.ThreadPoolExecutor(max_workers=_THREADS) as pool:
        for done in pool.map(_digest_batch, batches):
            found.update(done)
    return found


def _digest_batch(batch: list[tuple[bytes, str, _Stat]]) -> dict[bytes, tuple[_Stat, bytes]]:
    return {relative: _digest_file(full, identity) for relative, full, identity in batch}


def _framed(data: bytes) -> bytes:
    return len(data).to_bytes(8, "big") + data


def _ignored(name: str, relative: str, patterns: re.Pattern[str]) -> bool:
    return patterns.match(name) is not None or patterns.match(relative) is not None


def _walk(
    folder: str, prefix: str, patterns: re.Pattern[str], excluded: set[str], root: str
) -> Iterator[tuple[bytes, str, bytes, _Stat]]:
    """Yield (relative path as bytes, full path, kind, lstat identity) for every file below ``folder``."""
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
            info = entry.stat(follow_symlinks=False)
        except OSError as error:
            raise HashError(f"cannot stat {entry.path}: {error.strerror or error}") from None
        mode = info.st_mode
        if stat.S_ISLNK(mode):
            yield os.fsencode(relative), entry.path, _KIND_SYMLINK, _identity(info)
        elif stat.S_ISDIR(mode):
            if os.path.realpath(entry.path) not in excluded:
                yield from _walk(entry.path, relative + "/", patterns, excluded, root)
        elif stat.S_ISREG(mode):
            kind = _KIND_EXECUTABLE if mode & stat.S_IXUSR else _KIND_FILE
            yield os.fsencode(relative), entry.path, kind, _identity(info)
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


def _digest_file(path: str, identity: _Stat) -> tuple[_Stat, bytes]:
    """The file's stat as it was read, and the SHA-256 of exactly that many bytes."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as error:
        raise HashError(f"cannot read {path}: {error.strerror or error}") from None
    with open(fd, "rb", buffering=0) as handle:
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise HashError(f"cannot hash {path}: it is no longer a regular file")
            read_identity = _identity(info)
            digest = hashlib.sha256()
            buffer = bytearray(min(_CHUNK, max(info.st_size, 1)))
            view = memoryview(buffer)
            remaining = info.st_size
            while remaining > 0:
                count = handle.readinto(view[: min(len(buffer), remaining)])
                if not count:
                    raise HashError(f"{path} shrank while it was being hashed")
                digest.update(view[:count])
                remaining -= count
        except OSError as error:
            raise HashError(f"cannot read {path}: {error.strerror or error}") from None
    return read_identity, digest.digest()


def _identity(info: os.stat_result) -> _Stat:
    return (info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino, info.st_dev)
