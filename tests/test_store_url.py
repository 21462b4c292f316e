"""One rule for a store URL (issue 17, point 16): the user's mistake, or a database that cannot be reached.

A URL that cannot be parsed, or names no database, is a usage error: exit 4 for a session (before any
test), 2 for the command, one line naming the URL with its password masked. Only a database that
cannot be reached is 69. Every URL here names port 1, where nothing listens: code that took one of
them for a URL to connect to finds nothing there (69), and no database is ever written.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

MALFORMED = {
    "port-out-of-range": "postgresql://u:s3cr3t@127.0.0.1:99999/test",
    "ipv6-unclosed": "postgresql://u:s3cr3t@[::1:1/test",
    "unknown-parameter": "postgresql://u:s3cr3t@127.0.0.1:1/test?foo=bar",
    "bad-percent-encoding": "postgresql://u:s3cr3t@127.0.0.1:1/%zz",
    "space-in-host": "postgresql://u:s3cr3t@a b:1/test",
    "bad-sslmode": "postgresql://u:s3cr3t@127.0.0.1:1/test?sslmode=bogus",
    "bad-connect-timeout": "postgresql://u:s3cr3t@127.0.0.1:1/test?connect_timeout=soon",
    "bad-port-parameter": "postgresql://u:s3cr3t@127.0.0.1/test?port=1,x",
    "bad-schema": "postgresql://u:s3cr3t@127.0.0.1:1/test?schema=Bad-Name",
    "empty-schema": "postgresql://u:s3cr3t@127.0.0.1:1/test?schema=",
    "a-fragment": "postgresql://u:s3cr3t@127.0.0.1:1/test#main",
    "no-database": "postgresql://u:s3cr3t@127.0.0.1:1",
    "no-database-slash": "postgresql://u:s3cr3t@127.0.0.1:1/?schema=x",
    "nothing-at-all": "postgresql://",
}


@pytest.fixture(autouse=True)
def _no_libpq_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PGDATABASE", "PGSERVICE", "PYTEST_RUNS_STORE"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("url", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_store_url_is_a_usage_error_for_the_session_and_the_command(
    pytester: pytest.Pytester, url: str
) -> None:
    pytester.makepyfile("def test_one(): pass")
    result = pytester.runpytest_subprocess("--runs-machine=rig-1", f"--runs-store={url}", "-p", "no:cacheprovider")
    output = result.stdout.str() + result.stderr.str()
    assert result.ret == pytest.ExitCode.USAGE_ERROR, output
    errors = [line for line in result.stderr.lines if "pytest-runs" in line]
    assert len(errors) == 1 and errors[0].startswith("ERROR: pytest-runs: store postgresql://"), output
    assert "s3cr3t" not in output and "Traceback" not in output and "passed" not in output
    command = subprocess.run(
        [sys.executable, "-m", "pytest_runs", "--store", url, "list"], capture_output=True, text=True, timeout=60
    )
    assert command.returncode == 2, command.stderr
    assert command.stderr.startswith("pytest-runs: store postgresql://") and len(command.stderr.splitlines()) == 1
    assert "s3cr3t" not in command.stderr + command.stdout


def test_a_database_named_by_the_environment_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    from pytest_runs.pgbackend import parse_url

    monkeypatch.setenv("PGDATABASE", "test")
    assert parse_url("postgresql://127.0.0.1:1") == ("postgresql://127.0.0.1:1", "pytest_runs")
    monkeypatch.delenv("PGDATABASE")
    assert parse_url("postgresql://127.0.0.1:1/?service=lab&schema=a") == ("postgresql://127.0.0.1:1/?service=lab", "a")


def test_the_url_given_to_libpq_keeps_everything_but_the_schema() -> None:
    from pytest_runs.pgbackend import parse_url

    assert parse_url("postgresql:///test?schema=b") == ("postgresql:///test", "b")
    assert parse_url("postgres://u@h:5/d?sslmode=require&schema=s_1&application_name=x") == (
        "postgres://u@h:5/d?sslmode=require&application_name=x",
        "s_1",
    )


def test_an_unreachable_database_is_69_for_the_session_and_the_command(pytester: pytest.Pytester) -> None:
    url = "postgresql://u:s3cr3t@127.0.0.1:1/test?schema=x"
    pytester.makepyfile("def test_one(): pass")
    result = pytester.runpytest_subprocess("--runs-machine=rig-1", f"--runs-store={url}", "-p", "no:cacheprovider")
    assert result.ret == 69
    command = subprocess.run(
        [sys.executable, "-m", "pytest_runs", "--store", url, "list"], capture_output=True, text=True, timeout=60
    )
    assert command.returncode == 69
    assert command.stderr.startswith("pytest-runs: cannot reach the store postgresql://u:***@127.0.0.1:1/test")
