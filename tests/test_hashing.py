"""The identity of a test folder."""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
import shutil
import time
from collections.abc import Mapping
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytest_runs import hashing
from pytest_runs.hashing import HashCache, HashError, hash_test_dir


def make_tree(root: Path, files: Mapping[str, bytes | tuple[bytes, bool]]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for relative, spec in files.items():
        content, executable = spec if isinstance(spec, tuple) else (spec, False)
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        path.chmod(0o755 if executable else 0o644)
    return root


BASE = {"test_a.py": b"def test_a(): pass\n", "sub/test_b.py": b"def test_b(): pass\n", "data/x.bin": b"\0\1\2"}


def test_same_tree_in_two_folders_gives_the_same_hash(tmp_path: Path) -> None:
    first = make_tree(tmp_path / "one", BASE)
    second = make_tree(tmp_path / "elsewhere" / "two", dict(reversed(BASE.items())))
    assert hash_test_dir(first) == hash_test_dir(second)
    assert len(hash_test_dir(first)) == 64


def test_golden_value_is_stable_across_versions_and_machines(tmp_path: Path) -> None:
    # Changing this value changes every stored run's identity: bump the framing's domain string instead.
    root = make_tree(tmp_path / "t", {"a.py": b"a", "b/c.txt": (b"c", True)})
    (root / "link").symlink_to("a.py")

    def framed(data: bytes) -> bytes:
        return len(data).to_bytes(8, "big") + data

    def content(data: bytes) -> bytes:
        return len(data).to_bytes(8, "big") + hashlib.sha256(data).digest()

    # The format, spelled out: a domain string, then per entry in sorted path order its
    # kind (f file, x executable, l symlink), its framed path, and for a file its size and
    # SHA-256, for a symlink its framed link text.
    expected = hashlib.sha256(
        b"pytest-runs tree v2\0"
        + b"f" + framed(b"a.py") + content(b"a")
        + b"x" + framed(b"b/c.txt") + content(b"c")
        + b"l" + framed(b"link") + framed(b"a.py")
    ).hexdigest()  # fmt: skip
    assert hash_test_dir(root) == expected


@pytest.mark.parametrize(
    "change",
    ["content", "rename", "add", "remove", "exec-bit", "move-to-subdir", "empty-content"],
)
def test_any_change_changes_the_hash(tmp_path: Path, change: str) -> None:
    root = make_tree(tmp_path / "t", BASE)
    before = hash_test_dir(root)
    target = root / "test_a.py"
    if change == "content":
        target.write_bytes(b"def test_a(): assert 0\n")
    elif change == "rename":
        target.rename(root / "test_z.py")
    elif change == "add":
        (root / "conftest.py").write_bytes(b"")
    elif change == "remove":
        target.unlink()
    elif change == "exec-bit":
        target.chmod(0o755)
    elif change == "move-to-subdir":
        target.rename(root / "sub" / "test_a.py")
    elif change == "empty-content":
        target.write_bytes(b"")
    assert hash_test_dir(root) != before


def test_framing_keeps_names_and_contents_apart(tmp_path: Path) -> None:
    pairs = [
        ({"ab": b"c"}, {"a": b"bc"}),
        ({"a": b"xy", "b": b""}, {"a": b"x", "b": b"y"}),
        ({"a": b"", "b": b"x"}, {"a": b"x", "b": b""}),
        ({"a/b": b"x"}, {"a_b": b"x"}),
    ]
    for index, (left, right) in enumerate(pairs):
        assert hash_test_dir(make_tree(tmp_path / f"l{index}", left)) != hash_test_dir(
            make_tree(tmp_path / f"r{index}", right)
        )


def test_default_ignores(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "t", BASE)
    before = hash_test_dir(root)
    noise = [
        "__pycache__/x.cpython-311.pyc",
        "sub/__pycache__/y.pyc",
        "stray.pyc",
        ".pytest_cache/v/cache",
        ".git/HEAD",
        ".hg/x",
        ".svn/x",
        ".tox/x",
        ".nox/x",
        ".venv/bin/python",
        "venv/x",
        "node_modules/x/index.js",
        ".mypy_cache/x",
        ".ruff_cache/x",
        "pkg.egg-info/PKG-INFO",
    ]
    make_tree(root, dict.fromkeys(noise, b"noise"))
    assert hash_test_dir(root) == before


def test_extra_ignore_patterns_match_names_and_paths(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "t", BASE)
    before = hash_test_dir(root)
    make_tree(root, {"out/report.html": b"1", "sub/run.log": b"2"})
    assert hash_test_dir(root) != before
    assert hash_test_dir(root, ignore=["out", "*.log"]) == before
    assert hash_test_dir(root, ignore=["sub/run.log", "out/*"]) == before


def test_state_dir_inside_is_left_out(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "t", BASE)
    before = hash_test_dir(root, exclude=[root / "state"])
    make_tree(root / "state", {"runs.json": b"{}"})
    assert hash_test_dir(root, exclude=[root / "state"]) == before
    assert hash_test_dir(root) != before


def test_symlinks_are_hashed_as_links_and_never_followed(tmp_path: Path) -> None:
    outside = make_tree(tmp_path / "outside", {"big.txt": b"v1"})
    root = make_tree(tmp_path / "t", BASE)
    (root / "ext").symlink_to(outside, target_is_directory=True)
    (root / "loop").symlink_to(root, target_is_directory=True)
    (root / "dangling").symlink_to(tmp_path / "missing")
    before = hash_test_dir(root)
    (outside / "big.txt").write_bytes(b"v2")
    assert hash_test_dir(root) == before, "the link's target content must not matter"
    (root / "dangling").unlink()
    (root / "dangling").symlink_to(tmp_path / "missing-too")
    assert hash_test_dir(root) != before, "the link's target text must matter"


def test_link_and_file_with_same_text_differ(tmp_path: Path) -> None:
    as_file = make_tree(tmp_path / "f", {"x": b"target"})
    as_link = make_tree(tmp_path / "l", {})
    (as_link / "x").symlink_to("target")
    assert hash_test_dir(as_file) != hash_test_dir(as_link)


def test_unreadable_file_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_tree(tmp_path / "t", BASE)

    real_open = os.open

    def denied(path: str, flags: int, mode: int = 0o777) -> int:
        if str(path).endswith(".py"):
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, flags, mode)

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(HashError, match=r"cannot read /.*: Permission denied$"):
        hash_test_dir(root)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
def test_unreadable_file_on_disk(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "t", BASE)
    (root / "test_a.py").chmod(0)
    with pytest.raises(HashError, match="cannot read"):
        hash_test_dir(root)


def test_special_files_are_refused(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "t", BASE)
    os.mkfifo(root / "pipe")
    with pytest.raises(HashError, match=r"cannot hash .*pipe: not a regular file"):
        hash_test_dir(root)


def test_not_a_folder(tmp_path: Path) -> None:
    with pytest.raises(HashError, match="is not a folder"):
        hash_test_dir(tmp_path / "missing")


names = st.text(alphabet="abcXYZ019._-", min_size=1, max_size=6).filter(lambda n: n not in (".", ".."))
trees = st.dictionaries(
    st.lists(names, min_size=1, max_size=3).map("/".join),
    st.tuples(st.binary(max_size=20), st.booleans()),
    max_size=6,
)


def _consistent(tree: dict[str, tuple[bytes, bool]]) -> bool:
    # A path cannot be both a file and a folder.
    return not any(other.startswith(path + "/") for path in tree for other in tree)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(left=trees.filter(_consistent), right=trees.filter(_consistent))
def test_hash_equal_exactly_when_trees_equal(
    tmp_path_factory: pytest.TempPathFactory, left: dict[str, tuple[bytes, bool]], right: dict[str, tuple[bytes, bool]]
) -> None:
    base = tmp_path_factory.mktemp("prop")
    try:
        left_hash = hash_test_dir(make_tree(base / "l", dict(left)))
        right_hash = hash_test_dir(make_tree(base / "r", dict(right)))
        left_again = hash_test_dir(make_tree(base / "l2", dict(left)))
    finally:
        shutil.rmtree(base)
    assert left_hash == left_again
    assert (left_hash == right_hash) == (left == right)


# -- the stat cache ---------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _short_racy_window(monkeypatch: pytest.MonkeyPatch) -> None:
    # Files are written by the tests themselves, a moment before they are hashed.
    monkeypatch.setattr(hashing, "RACY_SECONDS", 0.05)


def old_tree(path: Path, files: dict[str, bytes]) -> Path:
    """A tree whose files were last changed well before the racy window: the cache may trust them."""
    root = make_tree(path, files)
    past = time.time() - 3600
    for file in root.rglob("*"):
        os.utime(file, (past, past), follow_symlinks=False)
    time.sleep(0.1)  # past the (shortened) racy window, for the ctime that utime just set too
    return root


def counting_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    read: list[str] = []
    real_open = os.open

    def counting(path: str, flags: int, mode: int = 0o777) -> int:
        read.append(os.path.basename(path))
        return real_open(path, flags, mode)

    monkeypatch.setattr(os, "open", counting)
    return read


def test_a_warm_hash_reads_nothing_and_equals_the_cold_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = old_tree(tmp_path / "t", {f"test_{n}.py": f"def test_{n}(): pass\n".encode() for n in range(20)})
    cold = hash_test_dir(root)
    cache_file = tmp_path / "cache.json"
    assert hash_test_dir(root, cache=HashCache(cache_file)) == cold
    read = counting_reads(monkeypatch)
    assert hash_test_dir(root, cache=HashCache(cache_file)) == cold
    assert read == ["cache.json"], "only the cache itself was opened"


def test_a_file_changed_behind_the_caches_back_is_read_again(tmp_path: Path) -> None:
    root = old_tree(tmp_path / "t", {"test_a.py": b"def test_a(): pass\n", "test_b.py": b"x"})
    cache_file = tmp_path / "cache.json"
    hash_test_dir(root, cache=HashCache(cache_file))
    target = root / "test_a.py"
    before = target.stat()
    # Same size, and the old mtime put back: only the ctime (which nobody can set) tells.
    target.write_bytes(b"def test_a(): fail\n")
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert target.stat().st_size == before.st_size and target.stat().st_mtime_ns == before.st_mtime_ns
    assert hash_test_dir(root, cache=HashCache(cache_file)) == hash_test_dir(root)


def test_a_file_modified_just_before_the_cache_was_written_is_never_trusted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = make_tree(tmp_path / "t", {"fresh.py": b"a"})  # modified now: racy
    cache_file = tmp_path / "cache.json"
    hash_test_dir(root, cache=HashCache(cache_file))
    read = counting_reads(monkeypatch)
    hash_test_dir(root, cache=HashCache(cache_file))
    assert "fresh.py" in read, "a file as new as the cache is hashed again"


def cache_is_valid(cache_file: Path) -> bool:
    """Whether ``cache_file`` holds a cache that loads with at least one file in it."""
    return len(HashCache(cache_file)._paths) > 0


def flip_byte(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


@pytest.mark.parametrize(
    "content",
    [
        b"not json",
        b'{"format": "other"}',
        b'{"format": "pytest-runs-hash-cache", "written_ns": 1, "files": 7}',  # the first release's JSON cache
        b"",
        HashCache._MAGIC,
        HashCache._MAGIC + bytes(200),
    ],
)
def test_a_corrupt_cache_is_ignored_and_rewritten(tmp_path: Path, content: bytes) -> None:
    root = old_tree(tmp_path / "t", {"test_a.py": b"a"})
    cache_file = tmp_path / "cache.json"
    cache_file.write_bytes(content)
    assert hash_test_dir(root, cache=HashCache(cache_file)) == hash_test_dir(root)
    assert cache_file.read_bytes().startswith(b"pytest-runs-hash-cache 2, pytest-runs tree v2\n")
    assert cache_is_valid(cache_file)


@pytest.mark.parametrize("where", ["truncated", "stats", "digest", "tree", "checksum", "older framing"])
def test_a_damaged_cache_is_refused_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    root = old_tree(tmp_path / "t", {"test_a.py": b"a", "test_b.py": b"b"})
    cache_file = tmp_path / "cache.json"
    expected = hash_test_dir(root, cache=HashCache(cache_file))
    data = cache_file.read_bytes()
    assert cache_is_valid(cache_file)
    # The layout: magic, header, paths, 2 x 6 int64 stats, 2 digests, (no links), tree digest, checksum.
    stats_at = len(HashCache._MAGIC) + HashCache._HEADER.size + len(b"test_a.py\0test_b.py")
    offsets = {"stats": stats_at + 8, "digest": stats_at + 96 + 5, "tree": len(data) - 40, "checksum": len(data) - 1}
    if where == "truncated":
        damaged = data[:-1]
    elif where == "older framing":  # a well-formed cache written for another tree format: its tree digest is foreign
        body = data[:-32].replace(b"pytest-runs tree v2\n", b"pytest-runs tree v1\n", 1)
        damaged = body + hashlib.sha256(body).digest()
    else:
        damaged = flip_byte(data, offsets[where])
    cache_file.write_bytes(damaged)
    assert not cache_is_valid(cache_file)
    read = counting_reads(monkeypatch)
    assert hash_test_dir(root, cache=HashCache(cache_file)) == expected
    assert {"test_a.py", "test_b.py"} <= set(read), "every file was read again"


def forge(cache_file: Path, digest: bytes) -> None:
    """Rewrite ``cache_file`` (checksum included) so that it gives ``digest`` for every file and for the tree."""
    cache = HashCache(cache_file)
    count = len(cache._paths)
    data = HashCache._encode(cache._written_ns, cache._paths, cache._stats, digest * count, cache._links, digest)
    cache_file.write_bytes(data)
    assert HashCache(cache_file)._digests == digest * count


def test_a_lying_cache_cannot_change_the_hash_of_a_changed_file(tmp_path: Path) -> None:
    root = old_tree(tmp_path / "t", {"test_a.py": b"a"})
    cache_file = tmp_path / "cache.json"
    hash_test_dir(root, cache=HashCache(cache_file))
    # A wrong digest for the same stat: only a file changed since is safe from it.
    forge(cache_file, bytes(32))
    (root / "test_a.py").write_bytes(b"b")
    assert hash_test_dir(root, cache=HashCache(cache_file)) == hash_test_dir(root)


def test_a_cache_that_says_a_fresh_file_is_old_is_refused(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "t", {"fresh.py": b"a"})
    cache_file = tmp_path / "cache.json"
    stats = [hashing._identity((root / "fresh.py").stat())]
    cache_file.write_bytes(HashCache._encode(time.time_ns(), [b"fresh.py"], stats, bytes(32), b"", bytes(32)))
    assert HashCache(cache_file)._paths == [], "a cache that save() could not have written is not loaded"
    assert hash_test_dir(root, cache=HashCache(cache_file)) == hash_test_dir(root)


def test_a_file_whose_stat_does_not_fit_in_int64_is_not_remembered(tmp_path: Path) -> None:
    stats = [(1, 1, 1, 1 << 63, 1, 0o100644), (1, 1, 1, 5, 1, 0o100644)]  # an inode past int64, as on some filesystems
    cache_file = tmp_path / "cache.json"
    cache_file.write_bytes(HashCache._encode(time.time_ns(), [b"a", b"b"], stats, bytes(64), b"", bytes(32)))
    cache = HashCache(cache_file)
    assert (cache._paths, cache._stats, cache._tree) == ([b"b"], [stats[1]], b"")


def test_a_symlinked_cache_file_is_not_followed(tmp_path: Path) -> None:
    root = old_tree(tmp_path / "t", {"test_a.py": b"a"})
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "cache.json").symlink_to(victim)
    assert hash_test_dir(root, cache=HashCache(tmp_path / "cache.json")) == hash_test_dir(root)
    assert victim.read_text() == "precious"


def test_a_file_left_out_as_racy_then_removed_leaves_the_hash(tmp_path: Path) -> None:
    root = old_tree(tmp_path / "t", {"test_a.py": b"a"})
    (root / "fresh.py").write_bytes(b"new")  # too new to remember: the cache holds test_a.py only
    cache_file = tmp_path / "cache.json"
    hash_test_dir(root, cache=HashCache(cache_file))
    (root / "fresh.py").unlink()
    # The files left now are exactly the remembered ones, with the same stats: the tree must still be hashed anew.
    assert hash_test_dir(root, cache=HashCache(cache_file)) == hash_test_dir(root)


def test_a_warm_cache_sees_a_new_mode_and_a_new_link_target(tmp_path: Path) -> None:
    root = old_tree(tmp_path / "t", {"test_a.py": b"a", "test_b.py": b"b"})
    (root / "link").symlink_to("test_a.py")
    cache_file = tmp_path / "cache.json"
    first = hash_test_dir(root, cache=HashCache(cache_file))
    assert hash_test_dir(root, cache=HashCache(cache_file)) == first
    (root / "link").unlink()
    (root / "link").symlink_to("test_b.py")
    second = hash_test_dir(root, cache=HashCache(cache_file))
    assert second == hash_test_dir(root) != first
    (root / "test_a.py").chmod(0o755)
    third = hash_test_dir(root, cache=HashCache(cache_file))
    assert third == hash_test_dir(root) != second


def test_the_racy_rule_counts_from_the_start_of_the_hashing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = old_tree(tmp_path / "t", {"test_a.py": b"a"})
    (root / "fresh.py").write_bytes(b"new")
    real_digest_file = hashing._digest_file

    def slow(path: str, limit: int | None) -> tuple[tuple[int, ...], bytes] | int:
        time.sleep(0.2)  # the hashing outlasts the racy window: fresh.py is old by the time the cache is written
        return real_digest_file(path, limit)

    monkeypatch.setattr(hashing, "_digest_file", slow)
    cache_file = tmp_path / "cache.json"
    hash_test_dir(root, cache=HashCache(cache_file))
    assert HashCache(cache_file)._paths == [b"test_a.py"], "fresh.py changed within the window before the hashing"


@pytest.mark.parametrize(("chunk", "thread_min"), [(7, 10), (1 << 20, 1 << 20), (3, 1)])
def test_every_read_path_gives_the_same_hash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int, thread_min: int
) -> None:
    sizes = [0, 1, 2, 6, 7, 8, 9, 10, 11, 100, 5000]
    root = old_tree(tmp_path / "t", {f"f{size}": os.urandom(size) for size in sizes})
    expected = hash_test_dir(root)
    monkeypatch.setattr(hashing, "_CHUNK", chunk)
    monkeypatch.setattr(hashing, "_THREAD_MIN", thread_min)
    assert hash_test_dir(root) == expected
    assert hash_test_dir(root, cache=HashCache(tmp_path / "cache.json")) == expected
    assert hash_test_dir(root, cache=HashCache(tmp_path / "cache.json")) == expected


glob_patterns = st.text(alphabet="ab./*?[]!-", min_size=1, max_size=6)
relative_paths = st.lists(st.text(alphabet="ab.-*?[]", min_size=1, max_size=4), min_size=2, max_size=3).map("/".join)


@settings(max_examples=300, deadline=None)
@given(patterns=st.lists(glob_patterns, min_size=1, max_size=4), relative=relative_paths)
def test_matching_names_first_leaves_out_exactly_what_matching_both_does(patterns: list[str], relative: str) -> None:
    # Below the top, an entry is left out when a pattern matches its name or its relative path.
    try:
        naive = re.compile("|".join(fnmatch.translate(p) for p in patterns))
    except re.error:
        return
    match, match_path = hashing._matchers(tuple(patterns))
    name = relative.rsplit("/", 1)[1]
    expected = naive.match(name) is not None or naive.match(relative) is not None
    assert (match(name) is not None or (match_path is not None and match_path(relative) is not None)) == expected
