"""The source distribution carries everything its own test suite needs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def tracked_files() -> list[str]:
    """The files git tracks in this checkout; the test skips outside one (in an unpacked sdist, say)."""
    if shutil.which("git") is None:
        pytest.skip("no git: no tracked files to compare the sdist with")
    top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=ROOT, capture_output=True, text=True)
    if top.returncode != 0 or Path(top.stdout.strip()).resolve() != ROOT:
        pytest.skip("not a git checkout of pytest-runs: no tracked files to compare the sdist with")
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
    return [name for name in os.fsdecode(listed.stdout).split("\0") if name and (ROOT / name).is_file()]


def build_sdist(source: Path, out: Path) -> Path:
    """Build with the project's own build backend (its PEP 517 ``build_sdist`` hook, as ``build`` calls it)."""
    backend = tomllib.loads((source / "pyproject.toml").read_text())["build-system"]["build-backend"]
    result = subprocess.run(
        [sys.executable, "-c", f"import sys, {backend} as backend; print(backend.build_sdist(sys.argv[1]))", out],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"the build backend failed (is '.[test]' installed?):\n{result.stderr[-3000:]}"
    return out / result.stdout.strip().splitlines()[-1]


def collect(folder: Path) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_XDIST_", "PYTEST_CURRENT_TEST"))}
    return subprocess.Popen(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
        cwd=folder,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def collected(process: subprocess.Popen[str]) -> list[str]:
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 0, out[-3000:]
    return [line for line in out.splitlines() if "::" in line]


def test_the_sdist_holds_the_test_suite_and_collects_the_same_tests(tmp_path: Path) -> None:
    tracked = tracked_files()
    # Build from what a fresh clone holds, plus the bytecode a test run leaves behind.
    source = tmp_path / "clone"
    for name in tracked:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    (source / "tests" / "__pycache__").mkdir()
    (source / "tests" / "__pycache__" / "test_cli.cpython-311.pyc").write_bytes(b"\0")
    sdist = build_sdist(source, tmp_path / "dist")

    with tarfile.open(sdist) as archive:
        top = sdist.name.removesuffix(".tar.gz") + "/"
        shipped = {member.name.removeprefix(top) for member in archive.getmembers() if member.isfile()}
        if hasattr(tarfile, "data_filter"):  # Python 3.11.4 and later
            archive.extractall(tmp_path / "unpacked", filter="data")
        else:
            archive.extractall(tmp_path / "unpacked")  # our own archive, just built
    # Every tracked file but the dot-files (.ci/, .gitignore): the package, the tests and their
    # helpers, conftest.py, the docs and benchmarks the README links to, and the license.
    wanted = {name for name in tracked if not any(part.startswith(".") for part in Path(name).parts)}
    assert {"conftest.py", "docs/reliability.md", "README.md", "LICENSE", "pyproject.toml"} <= wanted
    assert {name for name in tracked if name.startswith("tests/")} <= wanted
    assert sorted(wanted - shipped) == []
    assert [name for name in shipped if "__pycache__" in name or name.endswith(".pyc")] == []

    unpacked = tmp_path / "unpacked" / top
    here, there = collect(ROOT), collect(unpacked)
    in_repo, in_sdist = collected(here), collected(there)
    assert len(in_sdist) == len(in_repo) > 0
    assert in_sdist == in_repo
