"""What the keeper process costs, and how fast a closed liveness connection stops a session.

    .venv/bin/python benchmarks/bench_keeper.py [--repeat 20] [--database postgresql://127.0.0.1:5432/test]

- **Start**: ``KeeperClient.start`` until the keeper holds the liveness lock and has said so,
  then release and ``done`` (the keeper exits and is reaped): on the JSON files and, with a
  database, on PostgreSQL. Also a bare ``python -c pass`` for comparison: the interpreter's
  own start is most of it.
- **Closed connection to exit 76** (database only): a real session holding the machine with
  ``--runs-heartbeat=30``, its test stamping the time every 5 ms; its keeper's liveness
  connection is terminated with ``pg_terminate_backend``; the time until the test's last
  stamp (it was interrupted) and until the session has exited (76).

Prints medians and the spread (min-max) of ``--repeat`` rounds.
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from pytest_runs.keeper_client import KeeperClient

HOLD = """
import os, pathlib, time

def test_hold():
    pathlib.Path(os.environ["STARTED_MARKER"]).write_text("")
    end = time.monotonic() + 120
    with open(os.environ["STARTED_MARKER"] + ".last", "a") as stamps:
        while time.monotonic() < end:  # the test's signs of life, every 5 ms
            stamps.write(f"{time.time()}\\n")
            stamps.flush()
            time.sleep(0.005)
"""


def start_cost(store_url: str | None) -> float:
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        keeper = KeeperClient.start(state_dir=Path(folder), store_url=store_url, lock_timeout=10, keep=None, grace=1)
        took = time.perf_counter() - started
        keeper.release()
        keeper.done()
        return took


def bare_python() -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    return time.perf_counter() - started


def closed_connection_to_exit(url: str) -> tuple[float, float]:
    """Seconds from ``pg_terminate_backend`` to the test's last stamp, and to the session's exit (76)."""
    import psycopg

    schema = f"bench_{secrets.token_hex(4)}"
    store = f"{url}{'&' if '?' in url else '?'}schema={schema}"
    with tempfile.TemporaryDirectory() as folder:
        project = Path(folder) / "tests"
        project.mkdir()
        (project / "pytest.ini").write_text("[pytest]\n")
        (project / "test_hold.py").write_text(HOLD)
        marker = Path(folder) / "started"
        session = subprocess.Popen(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--runs-machine=rig-1",
             f"--runs-store={store}", f"--runs-state-dir={folder}/state", "--runs-heartbeat=30", "--runs-lease=120"],
            cwd=project, env={**os.environ, "STARTED_MARKER": str(marker)},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            while not marker.exists():
                assert session.poll() is None, "the session ended before its test started"
                time.sleep(0.01)
            with psycopg.connect(url, autocommit=True) as conn:
                (token,) = conn.execute(f"SELECT record->>'owner_token' FROM {schema}.runs").fetchone()  # type: ignore[misc]
                value = int(token[:16], 16)
                (pid,) = conn.execute(
                    "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1 "
                    "AND classid = %s AND objid = %s",
                    (value >> 32, value & 0xFFFFFFFF),
                ).fetchone()  # type: ignore[misc]
                started, wall = time.perf_counter(), time.time()
                conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
                session.wait(timeout=60)
                took = time.perf_counter() - started
                assert session.returncode == 76, session.returncode
                conn.execute(f"DROP SCHEMA {schema} CASCADE")
            last = float(Path(f"{marker}.last").read_text().split()[-1])
            return last - wall, took
        finally:
            session.kill()
            session.wait()


def summarise(name: str, measure: Callable[[], float], repeat: int) -> None:
    show(name, [measure() for _ in range(repeat)])


def show(name: str, times: list[float]) -> None:
    print(
        f"| {name} | {statistics.median(times) * 1000:.1f} | {min(times) * 1000:.1f}-{max(times) * 1000:.1f} |",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--database", default=os.environ.get("RUNS_TEST_DATABASE", "postgresql://127.0.0.1:5432/test"))
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f}; Python {sys.version.split()[0]}")
    print("| what | median ms | min-max ms |\n|---|---|---|")
    summarise("`python -c pass` (for comparison)", bare_python, args.repeat)
    summarise("keeper start, JSON files (lock held, answered)", lambda: start_cost(None), args.repeat)
    if args.database != "skip":
        summarise("keeper start, PostgreSQL", lambda: start_cost(args.database), args.repeat)
        rounds = [closed_connection_to_exit(args.database) for _ in range(max(3, args.repeat // 4))]
        show("liveness connection terminated -> the test's last stamp (every 5 ms)", [r[0] for r in rounds])
        show("liveness connection terminated -> the session exited 76", [r[1] for r in rounds])


if __name__ == "__main__":
    main()
