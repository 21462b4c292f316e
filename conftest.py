"""Keep the developer's own pytest-runs settings out of the test suite."""

from __future__ import annotations

import os
import sys

import pytest

pytest_plugins = ["pytester"]

# Sessions under test (in process and in subprocesses) rewrite the asserts of every plugin
# module they import; with PYTHONDONTWRITEBYTECODE (set on some machines) none of that is
# cached, and each session spends a second or more compiling the same modules again.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.dont_write_bytecode = False


@pytest.fixture(autouse=True)
def _isolated_runs_environment(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    for name in list(os.environ):
        if name.startswith("PYTEST_RUNS_") or name in ("COLUMNS", "NO_COLOR"):
            monkeypatch.delenv(name)
    # Whatever a test forgets to point elsewhere lands in a throwaway folder, never in ~/.local/state.
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("xdg-state")))
    # Sessions under test need no hypothesis; its plugin costs each of them a second or more.
    monkeypatch.setenv("PYTEST_ADDOPTS", "-p no:hypothesispytest")
