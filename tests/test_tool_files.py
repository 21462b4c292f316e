"""A test folder's identity does not change with what tools write into it (issue 17, point 12).

attrs' suite got 5 hashes in 5 runs: hypothesis writes ``.hypothesis/``, coverage ``.coverage``
and ``htmlcov/``, packaging ``build/``, ``dist/`` and ``*.egg-info``. Those are left out of the
hash, and so is whatever the folder's ``.gitignore`` files leave out; a file git would track
still changes the identity. ``pytest-runs reserve`` computes the same identity as the session,
so a reservation made before the tools wrote is claimed after.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_runs.hashing import hash_test_dir

PYTEST = (sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:randomly", "-q")


def project(folder: Path, tests: str = "def test_a():\n    pass\n") -> Path:
    folder.mkdir(parents=True)
    (folder / "pytest.ini").write_text("[pytest]\n")
    (folder / "test_a.py").write_text(tests)
    return folder


def session(folder: Path, state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTEST_RUNS_STATE_DIR": str(state)}
    return subprocess.run(
        [*PYTEST, "--runs-machine=rig-1", *args], cwd=folder, env=env, capture_output=True, text=True, timeout=120
    )


def runs_cli(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest_runs", "--state-dir", str(state), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def reserve(state: Path, folder: Path) -> dict[str, object]:
    reserved = runs_cli(state, "reserve", "--machine", "rig-1", "--test-dir", str(folder), "--json")
    assert reserved.returncode == 0, reserved.stderr
    reservation: dict[str, object] = json.loads(reserved.stdout)
    return reservation


def listed(state: Path) -> list[dict[str, object]]:
    shown = runs_cli(state, "list", "--json")
    assert shown.returncode == 0, shown.stderr
    runs: list[dict[str, object]] = json.loads(shown.stdout)
    return runs


# What tools write into a test folder, each a path and its content.
TOOL_FILES = {
    "hypothesis": ".hypothesis/examples/0123abcd/4567ef",
    "coverage": ".coverage",
    "coverage-parallel": ".coverage.rig-host.4242.XkZxkRnx",
    "htmlcov": "htmlcov/index.html",
    "build": "build/lib/pkg/__init__.py",
    "dist": "dist/pkg-1.0-py3-none-any.whl",
    "egg-info": "src/pkg.egg-info/PKG-INFO",
    "eggs": ".eggs/README.txt",
    "tox": ".tox/py311/log/1-commands[0].log",
    "nox": ".nox/tests/bin/python",
    "pycache": "sub/__pycache__/test_a.cpython-311.pyc",
    "pytest-cache": ".pytest_cache/v/cache/lastfailed",
    "mypy-cache": ".mypy_cache/3.11/x.json",
    "ruff-cache": ".ruff_cache/0.1.0/123",
    "benchmarks": ".benchmarks/Linux-CPython-3.11-64bit/0001_x.json",
}


@pytest.mark.parametrize("path", TOOL_FILES.values(), ids=TOOL_FILES.keys())
def test_a_reservation_made_before_a_tool_wrote_is_claimed_after(tmp_path: Path, path: str) -> None:
    folder = project(tmp_path / "tests")
    state = tmp_path / "state"
    before = hash_test_dir(folder)
    reservation = reserve(state, folder)
    assert reservation["test_dir_hash"] == before
    written = folder / path
    written.parent.mkdir(parents=True, exist_ok=True)
    written.write_bytes(os.urandom(64))
    assert hash_test_dir(folder) == before
    claimed = session(folder, state)
    assert claimed.returncode == 0, claimed.stdout + claimed.stderr
    (run,) = listed(state)
    assert (run["id"], run["status"], run["test_dir_hash"]) == (reservation["id"], "completed", before)


def test_a_build_folder_of_tests_below_the_top_is_part_of_the_identity(tmp_path: Path) -> None:
    folder = project(tmp_path / "tests")
    (folder / "build").write_text("a file named build is no build folder")
    (folder / "sub" / "build").mkdir(parents=True)
    (folder / "sub" / "build" / "test_build.py").write_text("def test_b(): pass\n")
    before = hash_test_dir(folder)
    (folder / "sub" / "build" / "test_build.py").write_text("def test_b(): assert False\n")
    assert hash_test_dir(folder) != before
    (folder / "build").write_text("changed")
    assert hash_test_dir(folder) != before


HYPOTHESIS = """
from hypothesis import given, strategies as st

@given(st.integers())
def test_property(n):
    assert n == n
"""


def test_a_hypothesis_session_leaves_the_identity_as_it_found_it(tmp_path: Path) -> None:
    pytest.importorskip("hypothesis")
    folder = project(tmp_path / "tests", HYPOTHESIS)
    state = tmp_path / "state"
    before = hash_test_dir(folder)
    reservation = reserve(state, folder)
    first = session(folder, state)
    assert first.returncode == 0, first.stdout + first.stderr
    assert (folder / ".hypothesis").is_dir(), "hypothesis wrote its database"
    assert hash_test_dir(folder) == before
    again = reserve(state, folder)  # the next dispatch of the same tests
    assert again["test_dir_hash"] == before
    second = session(folder, state)
    assert second.returncode == 0, second.stdout + second.stderr
    runs = listed(state)
    assert [(r["id"], r["status"], r["test_dir_hash"]) for r in runs] == [
        (again["id"], "completed", before),
        (reservation["id"], "completed", before),
    ]


def test_the_gitignore_of_the_test_folder_decides_what_else_is_left_out(tmp_path: Path) -> None:
    folder = project(tmp_path / "tests")
    (folder / ".gitignore").write_text("*.log\nout/\n!out-keep.log\nreports/*\n!reports/summary.txt\n/local.cfg\n")
    (folder / "sub").mkdir()
    (folder / "sub" / ".gitignore").write_text("!wanted.log\ngenerated/\n")
    for path in [
        "run.log", "out-keep.log", "out/x.txt", "reports/r1.txt", "reports/summary.txt", "local.cfg",
        "sub/local.cfg", "sub/wanted.log", "sub/other.log", "sub/generated/g.py", "out",
    ]:  # fmt: skip
        target = folder / path
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text("v1")
    state = tmp_path / "state"
    before = hash_test_dir(folder)
    reservation = reserve(state, folder)

    # Changing, adding or removing what the .gitignore files leave out changes nothing.
    (folder / "run.log").write_text("v2")
    (folder / "new.log").write_text("new")
    (folder / "out" / "x.txt").unlink()
    (folder / "reports" / "r2.txt").write_text("new")
    (folder / "local.cfg").write_text("v2")
    (folder / "sub" / "other.log").write_text("v2")
    (folder / "sub" / "generated" / "more.py").write_text("new")
    assert hash_test_dir(folder) == before
    claimed = session(folder, state)
    assert claimed.returncode == 0, claimed.stdout + claimed.stderr
    (run,) = listed(state)
    assert (run["id"], run["test_dir_hash"]) == (reservation["id"], before)

    # Each file git would track changes the identity: re-included by a negation, a directory
    # pattern's namesake elsewhere, an anchored pattern's namesake below, the .gitignore itself.
    for path in [
        "out-keep.log", "reports/summary.txt", "sub/local.cfg", "sub/wanted.log", "test_a.py", ".gitignore",
        "sub/.gitignore",
    ]:  # fmt: skip
        target = folder / path
        saved = target.read_bytes()
        target.write_bytes(saved + b"\n# changed\n")
        assert hash_test_dir(folder) != before, path
        target.write_bytes(saved)
        assert hash_test_dir(folder) == before, path


def test_runs_hash_ignore_still_leaves_out_what_the_gitignore_keeps(tmp_path: Path) -> None:
    folder = project(tmp_path / "tests")
    (folder / "pytest.ini").write_text("[pytest]\nruns_hash_ignore =\n    notes\n    *.tmp\n")
    (folder / ".gitignore").write_text("*.log\n!keep.tmp\n")
    (folder / "notes").mkdir()
    (folder / "notes" / "n.txt").write_text("v1")
    (folder / "keep.tmp").write_text("v1")
    state = tmp_path / "state"
    reservation = reserve(state, folder)
    (folder / "notes" / "n.txt").write_text("v2")
    (folder / "keep.tmp").write_text("v2")  # re-included by the .gitignore, left out by runs_hash_ignore
    (folder / "x.log").write_text("v2")
    claimed = session(folder, state)
    assert claimed.returncode == 0, claimed.stdout + claimed.stderr
    (run,) = listed(state)
    assert run["id"] == reservation["id"]


def test_a_hostile_gitignore_never_stops_a_session(tmp_path: Path) -> None:
    folder = project(tmp_path / "tests")
    (folder / ".gitignore").write_bytes(os.urandom(50_000) + b"\n" + b"*a" * 3000 + b"\n[[:nope:]\n\\")
    state = tmp_path / "state"
    result = session(folder, state)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    (run,) = listed(state)
    assert run["status"] == "completed"
