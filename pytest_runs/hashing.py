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
import operator
import os
import re
import stat
import struct
import sys
import tempfile
import time
from array import array
from collections.abc import Callable, Iterable
from pathlib import Path

from . import gitignore, sharing

__all__ = [
    "DEFAULT_IGNORE",
    "RACY_SECONDS",
    "TOP_LEVEL_IGNORE",
    "HashCache",
    "HashError",
    "hash_test_dir",
    "tree_files",
]

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
    ".eggs",
    ".hypothesis",
    ".coverage",
    ".coverage.*",
    "htmlcov",
    ".benchmarks",
)

#: Folders left out of the hash only at the top of the test folder, where packaging writes them
#: (a ``build`` folder of tests further down is part of the tests).
TOP_LEVEL_IGNORE: tuple[str, ...] = ("build", "dist")

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
_INT64 = range(-(1 << 63), 1 << 63)


class HashCache:
    """File digests remembered by their stat, in one file (for one test folder).

    The file is binary: a magic line (with the tree framing's version), a header (written_ns and the sizes of what
    follows), the sorted relative paths joined by NUL, each file's stat as six
    little-endian int64, each file's SHA-256, the symlinks and the tree digest of the
    last hashing (when it left no file out), then a SHA-256 of all of that. Load and save
    never raise: an unreadable, foreign, truncated or corrupt cache file (its checksum
    does not match) is treated as empty (it is a cache, and starts over); a cache that
    cannot be written is not written. The file is written atomically, 0600 (0660 in a
    group-shared state dir, :mod:`pytest_runs.sharing`), and never
    through a symlink, and not at all when nothing in it would change.
    """

    FORMAT = "pytest-runs-hash-cache"
    # The tree framing's domain is part of the magic: a remembered tree digest is only ever
    # reused by the framing that made it.
    _MAGIC = b"pytest-runs-hash-cache 2, " + _DOMAIN.rstrip(b"\0") + b"\n"
    # written_ns, files, bytes of paths, bytes of symlinks, bytes of tree digest
    _HEADER = struct.Struct("<qQQQQ")

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._written_ns = 0
        self._paths: list[bytes] = []
        self._stats: list[_Stat] = []
        self._digests = b""
        self._links = b""
        self._tree = b""
        self._entries: dict[bytes, tuple[_Stat, bytes]] | None = None
        self._load()

    def get(self, relative: bytes, identity: _Stat) -> bytes | None:
        """The digest of a file whose stat is exactly ``identity``, if it may be trusted."""
        if self._entries is None:
            digests = [self._digests[i : i + _DIGEST_SIZE] for i in range(0, len(self._digests), _DIGEST_SIZE)]
            self._entries = dict(zip(self._paths, zip(self._stats, digests, strict=True), strict=True))
        found = self._entries.get(relative)
        if found is None or found[0] != identity:
            return None
        racy_from = self._written_ns - int(RACY_SECONDS * 1e9)
        if identity[1] >= racy_from or identity[2] >= racy_from:
            return None  # modified too close to the hashing that wrote the cache: it may have changed since
        return found[1]

    def unchanged_tree(self, paths: list[bytes], stats: list[_Stat], links: bytes) -> bytes | None:
        """The tree digest last saved, if the folder's files have exactly the stats and the links saved with it."""
        if self._tree and paths == self._paths and stats == self._stats and links == self._links:
            return self._tree
        return None

    def save(
        self, started_ns: int, paths: list[bytes], stats: list[_Stat], digests: list[bytes], links: bytes, tree: bytes
    ) -> None:
        """Remember the files of one hashing that began at ``started_ns``, leaving out those modified too recently.

        ``paths`` are sorted, ``stats`` and ``digests`` go with them; ``links`` and ``tree``
        (the symlinks and the tree digest) are kept only if no file was left out.
        """
        racy_from = started_ns - int(RACY_SECONDS * 1e9)
        if paths and (
            max(map(operator.itemgetter(1), stats)) >= racy_from or max(map(operator.itemgetter(2), stats)) >= racy_from
        ):
            kept = [i for i, identity in enumerate(stats) if identity[1] < racy_from and identity[2] < racy_from]
            paths, stats, digests = [paths[i] for i in kept], [stats[i] for i in kept], [digests[i] for i in kept]
            links = tree = b""
        digest_bytes = b"".join(digests)
        saved = (self._paths, self._stats, self._digests, self._links, self._tree)
        if (paths, stats, digest_bytes, links, tree) == saved:
            return  # nothing new to remember: an unchanged folder costs no write
        data = self._encode(started_ns, paths, stats, digest_bytes, links, tree)
        with contextlib.suppress(OSError):
            fd, temporary = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
            try:
                with open(fd, "wb") as handle:
                    sharing.share_file(fd, sharing.shared_folder(self.path.parent))  # 0660 in a shared store
                    handle.write(data)
                os.replace(temporary, self.path)
            except OSError:
                os.unlink(temporary)
                raise

    @classmethod
    def _encode(
        cls, written_ns: int, paths: list[bytes], stats: list[_Stat], digests: bytes, links: bytes, tree: bytes
    ) -> bytes:
        try:
            numbers = array("q", [number for identity in stats for number in identity])
        except OverflowError:  # an inode or device beyond int64: those files are not remembered
            kept = [i for i, identity in enumerate(stats) if all(number in _INT64 for number in identity)]
            paths, stats = [paths[i] for i in kept], [stats[i] for i in kept]
            digests = b"".join(digests[i * _DIGEST_SIZE : (i + 1) * _DIGEST_SIZE] for i in kept)
            numbers = array("q", [number for identity in stats for number in identity])
            links = tree = b""
        if sys.byteorder == "big":
            numbers.byteswap()
        joined = b"\0".join(paths)
        header = cls._HEADER.pack(written_ns, len(paths), len(joined), len(links), len(tree))
        body = b"".join((cls._MAGIC, header, joined, numbers.tobytes(), digests, links, tree))
        return body + hashlib.sha256(body).digest()

    def _load(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
            with open(fd, "rb") as handle:
                data = handle.read()
        except OSError:
            return
        start = len(self._MAGIC) + self._HEADER.size
        if len(data) < start + _DIGEST_SIZE or not data.startswith(self._MAGIC):
            return
        body = memoryview(data)[:-_DIGEST_SIZE]
        if hashlib.sha256(body).digest() != data[-_DIGEST_SIZE:]:
            return  # truncated or corrupt
        written_ns, count, paths_size, links_size, tree_size = self._HEADER.unpack_from(data, len(self._MAGIC))
        stats_size = count * _STAT_FIELDS * 8
        sizes = (paths_size, stats_size, count * _DIGEST_SIZE, links_size, tree_size)
        if start + sum(sizes) != len(body) or tree_size not in (0, _DIGEST_SIZE):
            return
        offsets = [start]
        for size in sizes:
            offsets.append(offsets[-1] + size)
        paths = data[offsets[0] : offsets[1]].split(b"\0") if count else []
        numbers = array("q")
        numbers.frombytes(data[offsets[1] : offsets[2]])
        if len(paths) != count:
            return
        if sys.byteorder == "big":
            numbers.byteswap()
        columns = [numbers[field::_STAT_FIELDS] for field in range(_STAT_FIELDS)]
        racy_from = written_ns - int(RACY_SECONDS * 1e9)
        if count and (max(columns[1]) >= racy_from or max(columns[2]) >= racy_from):
            return  # never written by save(): not to be trusted
        self._written_ns = written_ns
        self._paths = paths
        self._stats = list(zip(*columns, strict=True))
        self._digests = data[offsets[2] : offsets[3]]
        self._links = data[offsets[3] : offsets[4]]
        self._tree = data[offsets[4] : offsets[5]]


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
    link_bytes = b"".join(part for _, part in link_parts)
    paths = [relative for relative, _, _ in files]
    if cache is not None:
        unchanged = cache.unchanged_tree(paths, [identity for _, _, identity in files if identity], link_bytes)
        if unchanged is not None:
            return unchanged.hex()
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
        cache.save(started_ns, paths, stats, digests, link_bytes, tree)
    return tree.hex()


def tree_files(
    root: str | os.PathLike[str], ignore: Iterable[str] = (), exclude: Iterable[str | os.PathLike[str]] = ()
) -> list[str]:
    """The relative POSIX paths of the files and symlinks that :func:`hash_test_dir` covers, sorted."""
    root_text = str(Path(root))
    if not os.path.isdir(root_text):
        raise HashError(f"test dir {root_text} is not a folder")
    walk = _Walk(*_matchers((*DEFAULT_IGNORE, *ignore)), _excluded(exclude), root_text, with_stats=False)
    walk.folder(root_text, "")
    found = [relative for relative, _, _ in walk.files] + [relative for relative, _ in walk.links]
    return [os.fsdecode(relative) for relative in sorted(found)]


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


# Each .gitignore met on the way down: (length of its folder's relative path in bytes, its rules).
_Ignores = tuple[tuple[int, gitignore.IgnoreFile], ...]


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

    def folder(self, folder: str, prefix: str, ignores: _Ignores = ()) -> None:
        try:
            with os.scandir(folder) as listing:
                entries = list(listing)
        except OSError as error:
            raise HashError(f"cannot list {folder}: {error.strerror or error}") from None
        match, files, with_stats = self.match, self.files, self.with_stats
        match_path = self.match_path if prefix else None
        prefix_bytes = prefix.encode(_FS_ENCODING, _FS_ERRORS)
        for entry in entries:
            if entry.name == _GITIGNORE:
                if match(_GITIGNORE) is None and (match_path is None or match_path(prefix + _GITIGNORE) is None):
                    rules = _read_gitignore(entry)
                    if rules:
                        ignores = (*ignores, (len(prefix_bytes), rules))
                break
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
                if not prefix and name in TOP_LEVEL_IGNORE and entry.is_dir(follow_symlinks=False):
                    continue
                name_bytes = name.encode(_FS_ENCODING, _FS_ERRORS)
                if ignores and _git_ignores(ignores, name_bytes, prefix_bytes + name_bytes, entry):
                    continue
                if entry.is_file(follow_symlinks=False):
                    identity = _identity(entry.stat(follow_symlinks=False)) if with_stats else None
                    files.append((prefix_bytes + name_bytes, entry.path, identity))
                elif entry.is_dir(follow_symlinks=False):
                    subfolders.append((entry, relative))
                elif entry.is_symlink():
                    self.links.append((prefix_bytes + name_bytes, entry.path))
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
                self.folder(entry.path, relative + "/", ignores)

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


_GITIGNORE = ".gitignore"


def _git_ignores(ignores: _Ignores, name: bytes, relative: bytes, entry: os.DirEntry[str]) -> bool:
    """Whether the ``.gitignore`` files on the way down leave the entry out: the deepest one that has a say decides."""
    is_dir = entry.is_dir(follow_symlinks=False)  # a symlink to a folder is not a folder, as for git
    for offset, rules in reversed(ignores):
        verdict = rules.verdict(name, relative[offset:], is_dir)
        if verdict is not None:
            return verdict
    return False


def _read_gitignore(entry: os.DirEntry[str]) -> gitignore.IgnoreFile | None:
    """The rules of a ``.gitignore`` that is a regular file (not a symlink), or ``None``.

    One too big to be a list of patterns (more than :data:`gitignore.MAX_BYTES`) is not read:
    its rules do not apply, as git does past its own limit, and it is hashed like any file.
    """
    if not entry.is_file(follow_symlinks=False):
        return None
    try:
        fd = os.open(entry.path, _OPEN_FLAGS)
    except OSError as error:
        raise HashError(f"cannot read {entry.path}: {error.strerror or error}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > gitignore.MAX_BYTES:
            return None
        data = os.read(fd, gitignore.MAX_BYTES + 1)
        while len(data) <= gitignore.MAX_BYTES and (more := os.read(fd, gitignore.MAX_BYTES + 1 - len(data))):
            data += more
    except OSError as error:
        raise HashError(f"cannot read {entry.path}: {error.strerror or error}") from None
    finally:
        os.close(fd)
    if len(data) > gitignore.MAX_BYTES:
        return None  # grew while it was read
    return gitignore.parse(data)


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
