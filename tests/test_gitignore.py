"""The test folder's ``.gitignore`` files, by git's rules (issue 17, point 12).

Every case is checked against git itself: the files the hash covers are exactly those that
``git ls-files --others --exclude-standard`` lists in a fresh repository of the same tree (with
no global or system configuration). Hostile ``.gitignore`` files are one line or ignored, never a
traceback, and never slow.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from pytest_runs.gitignore import MAX_BYTES, MAX_WILD, parse
from pytest_runs.hashing import hash_test_dir, tree_files

GIT = shutil.which("git")
needs_git = pytest.mark.skipif(GIT is None, reason="git is not installed")


def git_lists(root: Path) -> list[str]:
    """The files git does not ignore in ``root`` (made a fresh repository for the question, then not)."""
    assert GIT is not None
    home = root.parent / "git-home"
    home.mkdir(exist_ok=True)
    env = {
        **os.environ,
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home),
        "GIT_CONFIG_GLOBAL": os.devnull,
        "GIT_CONFIG_SYSTEM": os.devnull,
    }
    subprocess.run([GIT, "init", "-q", str(root)], env=env, check=True)
    try:
        listed = subprocess.run(
            [GIT, "-C", str(root), "ls-files", "-z", "--others", "--exclude-standard"],
            env=env,
            check=True,
            capture_output=True,
        ).stdout
    finally:
        shutil.rmtree(root / ".git")
    return sorted(os.fsdecode(path) for path in listed.split(b"\0") if path)


def make_tree(root: Path, files: list[str], ignores: dict[str, bytes]) -> None:
    for relative in files:
        path = root / relative
        if relative.endswith("@"):  # a symlink to a folder
            path = path.with_name(path.name[:-1])
            path.parent.mkdir(parents=True, exist_ok=True)
            path.symlink_to(".")
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(relative)
    for folder, content in ignores.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / ".gitignore").write_bytes(content)


FILES = [
    "a.log", "keep.log", "sub/b.log", "sub/keep.log", "top.txt", "sub/top.txt", "doc/x.txt", "doc/deep/y.txt",
    "tmp/t", "sub/tmp/t", "a/z", "a/b/z", "a/b/c/z", "out/o", "out/deep/o", "foo", "bar/foo/f", "logs/keep",
    "logs/other", "cache/keep", "cache/other", "x.tmp", "sub/x.tmp", "sub/y.tmp", "#hash", "!bang", "sp ", "sp",
    "a.txt", "d.txt", "1.n", "n.n", "]x.b", "abc", "axbyc", "ab", "aXXb", "q/q", "r/s/q", "src/m/gen", "src/m/n/gen",
    "s[1", "linkdir/x", "lnk@", "sub/lnk@", "cr", "ONE", "one", "é.txt", "e.txt",
]  # fmt: skip

CASES: dict[str, dict[str, bytes]] = {
    "names-and-globs": {"": b"*.log\n!keep.log\n/top.txt\ndoc/*.txt\n**/tmp\na/**/z\nout/**\nfoo/\n"},
    "negation-inside-an-excluded-folder": {"": b"logs/\n!logs/keep\ncache/*\n!cache/keep\n"},
    "deeper-file-wins": {"": b"*.tmp\n", "sub": b"!x.tmp\n"},
    "escapes-and-spaces": {"": b"\\#hash\n\\!bang\nsp\\ \nsp   \n# a comment\n\n   \n"},
    "crlf": {"": b"cr\r\nab\r\n"},
    "brackets": {"": b"[a-c].txt\n[!a-c].n\n[[:digit:]]*.n\n[]x].b\n[[:upper:]]NE\n"},
    "stars": {"": b"a*b*c\na**b\n***/q\n"},
    "itself": {"": b".gitignore\n*.txt\n"},
    "folder-only-and-symlinks": {"": b"lnk/\nlinkdir/\n"},
    "malformed": {"": b"s[1\nab\\\n[[:nope:]]\n[z-a]x\n"},
    "middle-slash-and-star": {"": b"src/*/gen\n"},
    "globstar-alone": {"sub": b"**\n"},
    "anchored-globstar": {"": b"/**/z\n/a/**\n"},
    "globstar-after-a-literal-part": {"": b"a**/z\nsrc/m**\n"},
    "non-ascii": {"": "é*\n".encode()},
    "bom": {"": b"\xef\xbb\xbfab\n"},
    "nul-ends-a-pattern": {"": b"ab\0c\n"},
}


@needs_git
@pytest.mark.parametrize("case", sorted(CASES))
def test_the_files_hashed_are_those_git_does_not_ignore(tmp_path: Path, case: str) -> None:
    root = tmp_path / "tests"
    make_tree(root, FILES, CASES[case])
    assert tree_files(root) == git_lists(root)


def random_pattern(rng: random.Random) -> str:
    pieces = ["a", "b", "ab", ".x", "*", "?", "**", "[ab]", "[!a]", "/", "\\*", "d", "[a-b]", "[[:lower:]]", "***"]
    body = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 5)))
    lead = rng.choice(["", "", "", "!", "/", "!/", "**/"])
    return lead + body + rng.choice(["", "", "/", " ", "\\ "])


def random_tree(rng: random.Random) -> list[str]:
    names = ["a", "b", "ab", "ba", "a.x", "d", "aab", "*", "bb.x"]
    files = set()
    for _ in range(rng.randint(3, 25)):
        depth = rng.randint(1, 4)
        files.add("/".join(rng.choice(names) for _ in range(depth)) + rng.choice(["", "f"]))
    # A file and a folder cannot share a path.
    kept: list[str] = []
    for path in sorted(files, key=len):
        if not any(path.startswith(other + "/") or other.startswith(path + "/") for other in kept):
            kept.append(path)
    return kept


@needs_git
@pytest.mark.parametrize("seed", range(8))
def test_random_patterns_and_trees_agree_with_git(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    for trial in range(12):
        root = tmp_path / f"t{trial}"
        files = random_tree(rng)
        folders = sorted({"", *(str(Path(f).parent) for f in files if "/" in f)})
        ignores = {
            folder: "\n".join(random_pattern(rng) for _ in range(rng.randint(1, 6))).encode()
            for folder in rng.sample(folders, min(len(folders), rng.randint(1, 3)))
        }
        make_tree(root, files, {"" if k == "" else k: v for k, v in ignores.items()})
        assert tree_files(root) == git_lists(root), (files, ignores)


# -- hostile .gitignore files ---------------------------------------------------------------


@pytest.mark.parametrize(
    "tail",
    [b"#" * MAX_BYTES, b"".join(b"a*b%d\n" % n for n in range(MAX_WILD + 1))],
    ids=["too-big", "too-many-wildcards"],
)
def test_a_huge_gitignore_is_not_read_and_hashed_like_any_file(tmp_path: Path, tail: bytes) -> None:
    root = tmp_path / "tests"
    root.mkdir()
    (root / "test_a.py").write_text("def test_a(): pass\n")
    (root / "a.log").write_text("log")
    (root / ".gitignore").write_bytes(b"*.log\n" + tail)
    started = time.monotonic()
    assert tree_files(root) == [".gitignore", "a.log", "test_a.py"]
    assert time.monotonic() - started < 30  # never stuck on it
    (root / ".gitignore").write_bytes(b"*.log\n")
    assert tree_files(root) == [".gitignore", "test_a.py"]


def test_a_binary_gitignore_is_read_as_git_reads_it(tmp_path: Path) -> None:
    root = tmp_path / "tests"
    root.mkdir()
    (root / "test_a.py").write_text("def test_a(): pass\n")
    (root / "a.log").write_text("log")
    noise = random.Random(7).randbytes(60_000)
    (root / ".gitignore").write_bytes(noise + b"\n*.log\n" + noise)
    listed = tree_files(root)
    assert "a.log" not in listed and "test_a.py" in listed
    if GIT is not None:
        assert listed == git_lists(root)


@pytest.mark.parametrize(
    "line",
    [
        b"*a" * 2000 + b"b",  # stars that would backtrack on every name
        b"**/a" * 500 + b"/b",  # globstars that would backtrack on every path
        b"[" * 5000,
        b"\\" * 9999,
        b"[[:alpha:]" * 3000,
        b"a" * 200_000,
    ],
    ids=["stars", "globstars", "brackets", "backslashes", "classes", "long"],
)
def test_a_hostile_pattern_is_fast_and_never_a_traceback(tmp_path: Path, line: bytes) -> None:
    rules = parse(line + b"\n")
    name = b"a" * 250
    path = b"/".join([b"a"] * 200)
    started = time.monotonic()
    for _ in range(20):
        rules.verdict(name, path, False)
        rules.verdict(name, path, True)
    assert time.monotonic() - started < 10, "a pattern backtracked"
    root = tmp_path / "tests"
    (root / "a" / "a").mkdir(parents=True)
    (root / "a" / "a" / "b").write_text("b")
    (root / ".gitignore").write_bytes(line + b"\n")
    assert hash_test_dir(root)


def test_an_unreadable_gitignore_is_one_line(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads every file")
    root = tmp_path / "tests"
    root.mkdir()
    (root / ".gitignore").write_text("*.log\n")
    (root / ".gitignore").chmod(0)
    with pytest.raises(Exception, match=r"^cannot read .*\.gitignore: Permission denied$"):
        hash_test_dir(root)
