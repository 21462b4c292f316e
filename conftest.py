"""Keep the developer's own pytest-runs settings out of the test suite."""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Iterator
from typing import Protocol

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


#: The PostgreSQL server the database tests use (the README's test command expects it there);
#: ``RUNS_TEST_DATABASE=skip`` skips those tests on a machine without one. CI never sets it.
TEST_DATABASE = os.environ.get("RUNS_TEST_DATABASE", "postgresql://127.0.0.1:5432/test")


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A store URL on a schema of its own, dropped after the test."""
    if TEST_DATABASE == "skip":
        pytest.skip("RUNS_TEST_DATABASE=skip: no PostgreSQL server for the database tests")
    import psycopg

    schema = f"t_{os.getpid()}_{secrets.token_hex(4)}"
    try:
        admin = psycopg.connect(TEST_DATABASE, autocommit=True, connect_timeout=10)
    except psycopg.OperationalError as error:
        pytest.fail(f"the database tests need PostgreSQL at {TEST_DATABASE} (RUNS_TEST_DATABASE): {error}")
    try:
        separator = "&" if "?" in TEST_DATABASE else "?"
        yield f"{TEST_DATABASE}{separator}schema={schema}"
    finally:
        admin.execute("SET lock_timeout = '30s'")
        admin.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        admin.close()


class _Started(Protocol):
    def kill_group(self) -> None: ...


@pytest.fixture
def sessions() -> Iterator[list[_Started]]:
    """Every session (``tests/_sessions.Session``) a test starts; whatever is left of them is killed at the end."""
    started: list[_Started] = []
    yield started
    for session in started:
        session.kill_group()
