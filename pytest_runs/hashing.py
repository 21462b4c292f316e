"""The identity of a test folder: a SHA-256 over its files.

The hash covers every file's relative POSIX path, its kind (regular, executable,
symlink) and its content (for a symlink, its target text; for a file, its size and
its own SHA-256), in sorted path order. Each entry is length-prefixed, so no two
different trees feed the same bytes to the hash. Timestamps, owners and the folder's
own location play no part: the same tree gives the same hash in any folder on any
machine.

Small files are read whole with one ``os.read`` on the calling thread; files of
:data:`_THREAD_MIN` bytes or more are read and hashed on a few threads (``hashlib``
and reads let go of the GIL). A :class:`HashCache` can remember each file's digest by
its ``lstat`` (size, mtime, ctime, inode, device, mode), so that hashing an unchanged
folder again only stats it. A file modified within :data:`RACY_SECONDS` before the
hashing that wrote the cache began is never taken from it (git's "racy" rule: a later
change in the same timestamp tick would not show in its stat), and a digest is only ever
reused for a file whose whole stat is the same, so the cache can make hashing faster but
never give another hash.

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
import operator
import os
import re
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
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
# Files this big or bigger are read and hashed on the threads; smaller ones on the calling
# thread, where a file costs a few system calls and no hand-over between threads.
_THREAD_MIN = 256 << 10
# Bytes per task on the threads: many middling files share one task's overhead.
_BATCH_BYTES = 4 << 20
_THREADS = min(8, os.cpu_count() or 2)
_KIND_FILE = b"f"
_KIND_EXECUTABLE = b"x"
_KIND_SYMLINK = b"l"
# O_NONBLOCK: a file swapped for a FIFO after the walk must not block the open.
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
# os.fsencode, without a Python-level call per file.
_FS_ENCODING = sys.getfilesystemencoding()
_FS_ERRORS = sys.getfilesystemencodeerrors()

# What marks a folder as a pytest-runs store (the names and header of pytest_runs.store).
_STORE_LOCK = "runs.lock"
_STORE_STATE = "runs.json"
_STORE_FILES = (_STORE_LOCK, _STORE_STATE)
_STORE_HEADER = re.compile(rb'\s*\{\s*"format"\s*:\s*"pytest-runs-state"')
_HEADER_PREFIX = 256


class HashError(Exception):
    """A file in the test folder cannot be hashed; the message names it."""


# One file's identity for the cache: size, mtime_ns, ctime_ns, inode, device, mode.
_Stat = tuple[int, int, int, int, int, int]
_STAT_FIELDS = 6
_identity: Callable[[os.stat_result], _Stat] = operator.attrgetter(
    "st_size", "st_mtime_ns", "st_ctime_ns", "st_ino", "st_dev", "st_mode"
)
_UNREAD: _Stat = (0, 0, 0, 0, 0, 0)
_DIGEST_SIZE = 32


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

    def save(self, started_ns: int, paths: list[bytes], stats: list[_Stat], digests: list[bytes]) -> None:
        """Remember the files of one hashing that began at ``started_ns``, leaving out those modified too recently.

        ``started_ns`` is when the hashing began, before any file was read: a file read
        later in a long hashing was still modified within the window if it was modified
        within it before that start.
        """
        racy_from = started_ns - int(RACY_SECONDS * 1e9)
        kept = {
            relative.hex(): (identity, digest.hex())
            for relative, identity, digest in zip(paths, stats, digests, strict=True)
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
                if len(identity) != _STAT_FIELDS or len(bytes.fromhex(digest)) != _DIGEST_SIZE:
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
    root_text = str(Path(root))
    if not os.path.isdir(root_text):
        raise HashError(f"test dir {root_text} is not a folder")
    started_ns = time.time_ns()  # before any stat: the racy rule's reference
    walk = _Walk(*_matchers((*DEFAULT_IGNORE, *ignore)), _excluded(exclude), root_text, with_stats=cache is not None)
    walk.folder(root_text, "")
    files, links = sorted(walk.files, key=_first), sorted(walk.links)
    link_parts = [(relative, _KIND_SYMLINK + _framed(relative) + _framed(_readlink(full))) for relative, full in links]
    paths = [relative for relative, _, _ in files]
    stats, digests = _file_digests(files, cache)
    parts = [
        b"".join(
            (
                _KIND_EXECUTABLE if identity[5] & stat.S_IXUSR else _KIND_FILE,
                len(relative).to_bytes(8, "big"),
                relative,
                identity[0].to_bytes(8, "big"),
                file_digest,
            )
        )
        for relative, identity, file_digest in zip(paths, stats, digests, strict=True)
    ]
    if link_parts:
        parts = [part for _, part in sorted([*zip(paths, parts, strict=True), *link_parts])]
    digest = hashlib.sha256(_DOMAIN)
    for start in range(0, len(parts), 4096):
        digest.update(b"".join(parts[start : start + 4096]))
    tree = digest.digest()
    if cache is not None:
        cache.save(started_ns, paths, stats, digests)
    return tree.hex()


def _file_digests(
    files: list[tuple[bytes, str, _Stat | None]], cache: HashCache | None
) -> tuple[list[_Stat], list[bytes]]:
    """Each file's stat and SHA-256: from the cache where it may be trusted, else read (big files on threads)."""
    stats = [_UNREAD] * len(files)
    digests = [b""] * len(files)
    pool: concurrent.futures.ThreadPoolExecutor | None = None
    pending: list[tuple[list[int], concurrent.futures.Future[list[tuple[_Stat, bytes]]]]] = []
    batch: list[int] = []
    batch_bytes = 0
    try:
        for index, (relative, full, identity) in enumerate(files):
            if cache is not None and identity is not None:
                cached = cache.get(relative, identity)
                if cached is not None:
                    stats[index], digests[index] = identity, cached
                    continue
            done = _digest_file(full, _THREAD_MIN)
            if isinstance(done, int):  # a big file: read and hashed on a thread, while this one goes on
                batch.append(index)
                batch_bytes += done
                if batch_bytes >= _BATCH_BYTES:
                    pool = pool or concurrent.futures.ThreadPoolExecutor(max_workers=_THREADS)
                    pending.append((batch, pool.submit(_digest_batch, [files[i][1] for i in batch])))
                    batch, batch_bytes = [], 0
            else:
                stats[index], digests[index] = done
        if batch:
            pool = pool or concurrent.futures.ThreadPoolExecutor(max_workers=_THREADS)
            pending.append((batch, pool.submit(_digest_batch, [files[i][1] for i in batch])))
        for indexes, future in pending:
            for index, (identity, file_digest) in zip(indexes, future.result(), strict=True):
                stats[index], digests[index] = identity, file_digest
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return stats, digests


def _digest_batch(paths: list[str]) -> list[tuple[_Stat, bytes]]:
    done = [_digest_file(path, None) for path in paths]
    return [result for result in done if not isinstance(result, int)]


_first = operator.itemgetter(0)


def _framed(data: bytes) -> bytes:
    return len(data).to_bytes(8, "big") + data


class _Walk:
    """The files (relative path, full path, lstat identity or None) and symlinks found below a folder."""

    def __init__(
        self,
        match: Callable[[str], object],
        match_path: Callable[[str], object] | None,
        excluded: tuple[set[tuple[int, int]], set[str]],
        root: str,
        with_stats: bool,
    ) -> None:
        self.match = match
        self.match_path = match_path
        self.excluded = excluded
        self.root = root
        self.with_stats = with_stats
        self.files: list[tuple[bytes, str, _Stat | None]] = []
        self.links: list[tuple[bytes, str]] = []

    def folder(self, folder: str, prefix: str) -> None:
        try:
            with os.scandir(folder) as listing:
                entries = list(listing)
        except OSError as error:
            raise HashError(f"cannot list {folder}: {error.strerror or error}") from None
        match, files, with_stats = self.match, self.files, self.with_stats
        match_path = self.match_path if prefix else None
        store_files: list[str] = []
        subfolders: list[tuple[os.DirEntry[str], str]] = []
        special = None
        for entry in entries:
            name = entry.name
            try:
                # The kind comes from the listing (d_type): no stat per entry unless the cache needs one.
                if name in _STORE_FILES and entry.is_file(follow_symlinks=False):
                    store_files.append(name)
                if match(name) is not None:
                    continue
                relative = prefix + name
                if match_path is not None and match_path(relative) is not None:
                    continue
                if entry.is_file(follow_symlinks=False):
                    identity = _identity(entry.stat(follow_symlinks=False)) if with_stats else None
                    files.append((relative.encode(_FS_ENCODING, _FS_ERRORS), entry.path, identity))
                elif entry.is_dir(follow_symlinks=False):
                    subfolders.append((entry, relative))
                elif entry.is_symlink():
                    self.links.append((relative.encode(_FS_ENCODING, _FS_ERRORS), entry.path))
                elif special is None:
                    special = entry.path
            except OSError as error:
                raise HashError(f"cannot stat {entry.path}: {error.strerror or error}") from None
        if _holds_store(folder, store_files):
            if not prefix:
                raise HashError(
                    f"test dir {self.root} is itself a pytest-runs store; keep the store outside the tests' folder "
                    "or pass --runs-test-dir with the tests' folder"
                )
            raise HashError(
                f"test dir {self.root} contains another pytest-runs store, {folder}; pass --runs-test-dir with a "
                f"folder that does not hold it, add {prefix.rstrip('/')!r} to runs_hash_ignore, or move that store"
            )
        if special is not None:
            raise HashError(f"cannot hash {special}: not a regular file, folder or symlink")
        for entry, relative in subfolders:
            if not self._is_excluded(entry):
                self.folder(entry.path, relative + "/")

    def _is_excluded(self, entry: os.DirEntry[str]) -> bool:
        identities, real_paths = self.excluded
        if not identities:
            return False
        try:
            info = entry.stat(follow_symlinks=False)
        except OSError as error:
            raise HashError(f"cannot stat {entry.path}: {error.strerror or error}") from None
        # The same folder has the same device and inode: realpath only for a likely match.
        return (info.st_dev, info.st_ino) in identities and os.path.realpath(entry.path) in real_paths


def _matchers(patterns: tuple[str, ...]) -> tuple[Callable[[str], object], Callable[[str], object] | None]:
    """Matchers for entry names (every pattern) and for relative paths (the patterns that need it), one regex each.

    A pattern with no ``/`` that is a plain name (``.git``) or ``*`` and a plain suffix (``*.pyc``)
    matches a path below the top exactly when it matches its last name, already tested: only
    the other patterns are matched against the relative path too.
    """
    by_path = [p for p in patterns if "/" in p or any(c in p.removeprefix("*") for c in "*?[")]
    match = re.compile("|".join(fnmatch.translate(p) for p in patterns)).match
    return match, re.compile("|".join(fnmatch.translate(p) for p in by_path)).match if by_path else None


def _excluded(exclude: Iterable[str | os.PathLike[str]]) -> tuple[set[tuple[int, int]], set[str]]:
    """The (device, inode) and real path of each folder to leave out that exists."""
    identities, real_paths = set(), set()
    for path in exclude:
        try:
            info = os.stat(path)
        except (OSError, ValueError):
            continue  # a folder that does not exist holds nothing to leave out
        identities.add((info.st_dev, info.st_ino))
        real_paths.add(os.path.realpath(path))
    return identities, real_paths


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


def _readlink(path: str) -> bytes:
    try:
        return os.fsencode(os.readlink(path))
    except OSError as error:
        raise HashError(f"cannot read symlink {path}: {error.strerror or error}") from None


def _digest_file(path: str, limit: int | None) -> tuple[_Stat, bytes] | int:
    """The file's stat as it was read and the SHA-256 of exactly that many bytes; only its size if ``limit`` or more."""
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as error:
        raise HashError(f"cannot read {path}: {error.strerror or error}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise HashError(f"cannot hash {path}: it is no longer a regular file")
        size = info.st_size
        if limit is not None and size >= limit:
            return size
        if size <= _CHUNK:  # one read, one update
            data = os.read(fd, size) if size else b""
            if len(data) < size:
                data = _read_rest(fd, data, size, path)
            return _identity(info), hashlib.sha256(data).digest()
        digest = hashlib.sha256()
        buffer = bytearray(_CHUNK)
        view = memoryview(buffer)
        remaining = size
        while remaining > 0:
            count = os.readv(fd, [view[: min(_CHUNK, remaining)]])
            if not count:
                raise HashError(f"{path} shrank while it was being hashed")
            digest.update(view[:count])
            remaining -= count
        return _identity(info), digest.digest()
    except OSError as error:
        raise HashError(f"cannot read {path}: {error.strerror or error}") from None
    finally:
        os.close(fd)


def _read_rest(fd: int, data: bytes, size: int, path: str) -> bytes:
    """``data`` (a short first read) completed to ``size`` bytes."""
    parts = [data]
    missing = size - len(data)
    while missing > 0:
        more = os.read(fd, missing)
        if not more:
            raise HashError(f"{path} shrank while it was being hashed")
        parts.append(more)
        missing -= len(more)
    return b"".join(parts)
