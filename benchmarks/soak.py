"""Soak: many real tracked pytest sessions on 3 machines, with every fault at once, bounded in time.

    .venv/bin/python benchmarks/soak.py --sessions 40                  # quick: 1-2 minutes for both
    .venv/bin/python benchmarks/soak.py --sessions 1000 --seed 1       # full: files, then PostgreSQL

For each backend (``--backend files|postgres|postgres-shared|both``; ``both``, the default,
is the files and then a private PostgreSQL server) it runs ``--sessions`` pytest sessions,
at most ``--concurrency`` at a time, each on one of 3 machines, planned from ``--seed`` (one
plan for both backends):

- a third in their own PID namespace (``unshare --pid --fork --mount-proc``, as root), half
  of those also in their own UTS namespace under another host name;
- busy policies ``fail``, ``wait`` (wait timeouts of 2-20 s) and ``skip``; heartbeats of
  0.1-1 s and leases of a few heartbeats; some with a short ``--runs-lock-timeout`` and some
  with a ``--runs-timeout`` shorter than their tests; tests of 0.1-0.5 s, or 0.8-2.5 s;
- some under xdist (``-n 2``); some whose first test forks helpers that outlive it by
  0.2-2 s (``os.fork``, ``multiprocessing`` with fork, ``ctypes.CDLL(None).fork()``);
- SIGKILL of sessions (the pytest process, its whole process group, or an xdist
  controller alone) and SIGSTOP/SIGCONT for 0.3-2.5 s (the group, or the pytest process or
  xdist controller alone), soon after their launch or once their first test has started;
- on PostgreSQL: ``pg_terminate_backend`` of sessions' connections (all, or one; found from
  their sockets), and, on the private server the soak starts itself (``initdb`` and
  ``pg_ctl`` from /usr/lib/postgresql/15/bin, run as the ``postgres`` user, on a free port,
  in a temporary folder), ``pg_ctl -m fast restart`` ``--restarts`` times (one per 100
  sessions, at least 3). The shared server (``RUNS_TEST_DATABASE``, else 127.0.0.1:5432) is
  used only by ``postgres-shared``: a schema of its own, dropped at the end, only the soak's
  own sessions' connections terminated, never restarted. A stopped session cannot notice
  that it lost its connections, and the machine may pass on before it wakes (a limit the
  README names: only fencing keeps it off the rig then), so no session is stopped during a
  restart or just after its connections were terminated, and neither happens to a stopped one.

Every test writes stamps (start, a tick every 50 ms, end; wall time, machine, session, run
ID, fence, PID, xdist worker, host name) to a file of its session. A test left open by a
death lasts until its last tick, or until the SIGKILL of the process it ran in. Once every
process the soak started is gone, one look per machine (``Store.prepare_atomic``) reclaims
stale runs, and the soak prints a table per backend: sessions started, faults dealt, exit
statuses (any outside the documented 0, 1, 2, 4, 5, 69, 75, 76 flagged, and a SIGKILL's
-9/137 unless the soak sent it); **overlaps** between different sessions' tests on one
machine (count, worst in ms); **runs left non-terminal**; **records missing** (a run ID a
session printed or stamped that the store lacks, or holds on another machine or fence);
**duplicate fences** on one machine (in the store, or stamped by two sessions); and, as
signs of the faults of issue 17: sessions told their machine was busy with the run of a
session that had ended before they started, sessions that met the store's lock held too
long, and how long sessions' processes outlived them (killed after 10 s).

Exit status 1 if any overlap, non-terminal run, missing record or duplicate fence was found
(also an undocumented exit status, or a session whose exit status and run record disagree,
with ``--strict``), else 0. ``--seconds`` bounds each
backend's sessions (default 60 + 1.5 s a session; launching stops at 85% of it, and what
still runs at the bound is killed and counted as cut off); setting up, reclaiming and
cleaning up add well under a minute. Every process (found by a token in its environment,
in any namespace), namespace and server the soak started is ended and its folders removed
(``--keep`` keeps the stamps, outputs, stores and ``sessions.json``), also on Ctrl-C or
SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import heapq
import itertools
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from pytest_runs.owner import proc_stat

MACHINES = ("rig-0", "rig-1", "rig-2")
POLICIES = ("fail", "wait", "skip")
#: Exit statuses the README documents for a session (pytest's own, and pytest-runs' 75, 76, 69).
DOCUMENTED = frozenset({0, 1, 2, 4, 5, 69, 75, 76})
#: A session killed by SIGKILL: its own process (-9), or the shell of its PID namespace (137).
KILLED = frozenset({-signal.SIGKILL, 128 + signal.SIGKILL})
PG_BIN = Path("/usr/lib/postgresql/15/bin")
SHARED_URL = os.environ.get("RUNS_TEST_DATABASE", "postgresql://127.0.0.1:5432/test")
PYTEST = ("-m", "pytest", "-p", "no:cacheprovider", "-p", "no:hypothesispytest", "-q")
TICK = 0.05
#: How long each test of a session holds its machine, by kind (drawn between these): short, and
#: long enough for a fault to land inside a test (the issue's xdist orphans ran 3 s tests).
SECONDS = {"short": (0.1, 0.5), "long": (0.8, 2.0), "xdist": (1.0, 2.5)}
#: Once every session has ended, how long the soak waits for the processes they left to end.
LINGER_WAIT = 8.0
#: A process of a session still alive this long after the session ended is killed (and counted):
#: orphaned xdist workers end by then, and a C-forked helper that never got the GIL back never ends.
OUTLIVE_LIMIT = 10.0
#: Run as PID 1 of a new namespace: set the host name (if given), then run the session as a child.
IN_NAMESPACE = 'if [ -n "$1" ]; then hostname "$1" || exit 111; fi; shift; "$@"; exit $?'
RUN_LINE = re.compile(r"pytest-runs: run (\S+) on ")
BUSY_LINE = re.compile(r"is busy with run (\S+) \(")
#: A session that met the store's lock held past its lock timeout (75 "store lock held by PID ...").
STORE_LOCKED = re.compile(r"store lock .* has been held|has been locked by another session")

# The tests of every session (the project folders differ by their first line only, so
# that several sessions share a test-folder identity). What a session does comes from
# its environment: how many tests, how long each, which helpers they fork.
TESTS = r'''
import ctypes, json, multiprocessing, os, socket, subprocess, time

import pytest

TICK = __TICK__


def stamp(kind, name):
    record = {
        "k": kind, "t": time.time(), "s": os.environ["SOAK_SID"], "m": os.environ.get("PYTEST_RUNS_MACHINE", ""),
        "r": os.environ.get("PYTEST_RUNS_RUN_ID", ""), "f": os.environ.get("PYTEST_RUNS_FENCE", ""),
        "p": os.getpid(), "w": os.environ.get("PYTEST_XDIST_WORKER", ""), "n": name, "h": socket.gethostname(),
    }
    fd = os.open(os.environ["SOAK_STAMPS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(record) + "\n").encode())  # one write of one line: never torn
    finally:
        os.close(fd)


def linger(seconds):
    """In a forked child: stay a moment, then go without running any of the parent's exit code."""
    try:
        time.sleep(seconds)
    finally:
        os._exit(0)


def fork_helpers():
    seconds = float(os.environ.get("SOAK_LINGER", "0.5"))
    for kind in filter(None, os.environ.get("SOAK_FORKS", "").split(",")):
        if kind == "os":
            if os.fork() == 0:
                linger(seconds)
        elif kind == "mp":
            multiprocessing.get_context("fork").Process(target=time.sleep, args=(seconds,)).start()
        elif kind == "c":
            pid = ctypes.CDLL(None).fork()  # no at-fork handler runs, as for a fork in C code
            if pid == 0:
                linger(seconds)
            # A C-forked child can wait forever for a GIL another thread held: end it in any case.
            reaper = "sleep %s; kill -9 %d 2>/dev/null" % (seconds + 1, pid)
            subprocess.Popen(["sh", "-c", reaper], env={**os.environ, "SOAK_REAPER": "1"})


@pytest.mark.parametrize("n", range(int(os.environ.get("SOAK_TESTS", "3"))))
def test_on_the_machine(n):
    name = "test_on_the_machine[%d]" % n
    stamp("start", name)
    try:
        if n == 0:
            fork_helpers()
        deadline = time.monotonic() + float(os.environ.get("SOAK_TEST_SECONDS", "0.2"))
        while (left := deadline - time.monotonic()) > 0:
            time.sleep(min(TICK, left))
            stamp("tick", name)
    finally:
        stamp("end", name)
'''.replace("__TICK__", repr(TICK))


# -- the plan: what each session is and what is done to it, from the seed --------------------


@dataclasses.dataclass(frozen=True)
class Fault:
    """A signal or a termination dealt to one session: when (after its launch, or after its first test) and how."""

    trigger: str  # "launch" or "holding"
    delay: float
    scope: str  # kill and stop: "main" (the pytest process, an xdist controller) or "group"; terminate: "all" or "one"
    duration: float = 0.0  # stop: how long until SIGCONT


@dataclasses.dataclass(frozen=True)
class Plan:
    """One session of the soak."""

    index: int
    machine: str
    variant: str  # "plain", "fork" or "xdist"
    project: int
    policy: str
    wait_timeout: float
    heartbeat: float
    lease: float
    lock_timeout: float | None
    deadline: float | None
    namespace: str  # "", "pid" or "uts"
    host: str
    tests: int
    test_seconds: float
    forks: str
    linger: float
    kill: Fault | None
    stop: Fault | None
    terminate: Fault | None

    @property
    def sid(self) -> str:
        return f"s{self.index:04d}"

    def args(self) -> list[str]:
        args = [
            f"--runs-machine={self.machine}",
            f"--runs-on-busy={self.policy}",
            f"--runs-heartbeat={self.heartbeat:g}",
            f"--runs-lease={self.lease:g}",
        ]
        if self.policy == "wait":
            args.append(f"--runs-wait-timeout={self.wait_timeout:g}")
        if self.lock_timeout is not None:
            args.append(f"--runs-lock-timeout={self.lock_timeout:g}")
        if self.deadline is not None:
            args += [f"--runs-timeout={self.deadline:g}", "--runs-grace=3"]
        if self.variant == "xdist":
            args += ["-n", "2"]
        return args


def fault(
    rng: random.Random, probability: float, scopes: Sequence[str], weights: Sequence[float], holding: float = 0.7
) -> Fault | None:
    """A fault, with ``probability``: once the session's first test started (``holding``), else after its launch."""
    if rng.random() >= probability:
        return None
    once_holding = rng.random() < holding
    delay = rng.uniform(0.0, 1.0) if once_holding else rng.uniform(0.2, 3.0)
    scope = rng.choices(scopes, weights)[0]
    return Fault("holding" if once_holding else "launch", round(delay, 3), scope, round(rng.uniform(0.3, 2.5), 3))


def make_plans(count: int, seed: int, *, database: bool, namespaces: bool) -> list[Plan]:
    rng = random.Random(seed)
    plans = []
    for index in range(count):
        variant = rng.choices(("plain", "fork", "xdist"), (58, 30, 12))[0]
        namespace = ("pid", "uts")[rng.random() < 0.5] if namespaces and index % 3 == 2 else ""
        heartbeat = rng.choice((0.1, 0.2, 0.5, 1.0))
        long_tests = variant != "xdist" and rng.random() < 0.04
        length = "xdist" if variant == "xdist" else rng.choices(("short", "long"), (70, 30))[0]
        forks = ",".join(sorted(rng.sample(("os", "mp", "c"), rng.randint(1, 3)))) if variant == "fork" else ""
        terminate = fault(rng, 0.15, ("all", "one"), (50, 50))  # drawn on the files too: one plan for a seed
        # An xdist controller killed alone while its workers test is the harshest kill there is: more of them.
        xdist = variant == "xdist"
        kill = fault(rng, 0.5 if xdist else 0.3, ("main", "group"), (80, 20), 1.0 if xdist else 0.7)
        plans.append(
            Plan(
                index=index,
                machine=rng.choice(MACHINES),
                variant=variant,
                project=rng.randrange(8),
                policy=rng.choice(POLICIES),
                wait_timeout=round(rng.uniform(2, 20), 1),
                heartbeat=heartbeat,
                lease=round(heartbeat * rng.uniform(3, 8) + 0.5, 1),
                lock_timeout=3.0 if rng.random() < 0.3 else None,
                deadline=1.0 if long_tests else None,
                namespace=namespace,
                host=f"soak-host-{index % 2 + 1}" if namespace == "uts" else "",
                tests={"plain": 3, "fork": 2, "xdist": 4}[variant],
                test_seconds=1.5 if long_tests else round(rng.uniform(*SECONDS[length]), 3),
                forks=forks,
                linger=round(rng.uniform(0.2, 2.0), 3),
                kill=kill,
                stop=fault(rng, 0.25, ("main", "group"), (50, 50) if variant == "xdist" else (30, 70)),
                terminate=terminate if database else None,
            )
        )
    return plans


# -- processes, as /proc shows them ---------------------------------------------------------


def proc_table() -> dict[int, tuple[int, str]]:
    """Each live process: (parent PID, state letter)."""
    table: dict[int, tuple[int, str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = proc_stat(entry)
        except OSError:
            continue
        if len(fields) > 2:
            table[int(entry)] = (int(fields[1]), fields[0])
    return table


def children(table: dict[int, tuple[int, str]], pid: int) -> list[int]:
    return [child for child, (parent, _) in table.items() if parent == pid]


def descendants(table: dict[int, tuple[int, str]], pid: int) -> list[int]:
    found: list[int] = []
    frontier = [pid]
    while frontier:
        kids = children(table, frontier.pop())
        found += kids
        frontier += kids
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def census(token: str, *, reapers: bool = False) -> dict[str, list[int]]:
    """The live (not zombie) processes whose environment holds the soak's token, by their session ID.

    The reapers of C-forked helpers (the soak's own device, not the session's) only with ``reapers``.
    """
    needle, reaper = f"SOAK_TOKEN={token}".encode(), b"SOAK_REAPER=1"
    found: dict[str, list[int]] = defaultdict(list)
    for pid, (_, state) in proc_table().items():
        if state in "ZX" or pid == os.getpid():
            continue
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if needle not in environ or (reaper in environ and not reapers):
            continue
        sid = next((e[9:].decode() for e in environ if e.startswith(b"SOAK_SID=")), "?")
        found[sid].append(pid)
    return found


def is_ours(pid: int, token: str) -> bool:
    """Whether process ``pid`` carries the soak's token (a PID of the soak's that was not reused)."""
    try:
        return f"SOAK_TOKEN={token}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False


def signal_quietly(pid: int, signum: int, *, group: bool = False) -> bool:
    try:
        (os.killpg if group else os.kill)(pid, signum)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def tcp_ports(pids: Iterable[int], server_port: int) -> list[int]:
    """The local ports of the TCP connections to ``server_port`` that any of ``pids`` has open."""
    inodes: set[int] = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target.startswith("socket:["):
                        inodes.add(int(target[8:-1]))
    ports = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if len(fields) > 9 and int(fields[9]) in inodes and int(fields[2].rsplit(":", 1)[1], 16) == server_port:
                    ports.append(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def become_subreaper() -> None:
    """Orphans of the sessions (xdist workers, forked helpers) become the soak's children, which it reaps."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


def namespaces_unavailable() -> str | None:
    if sys.platform != "linux" or os.geteuid() != 0:
        return "PID and UTS namespaces need Linux and root"
    if shutil.which("unshare") is None or shutil.which("hostname") is None:
        return "unshare or hostname is not installed"
    probe = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", "--uts", "sh", "-c", "hostname soak-probe && echo $$"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if probe.returncode != 0 or probe.stdout.split() not in (["1"], ["2"], ["3"]):
        return f"unshare does not give new PID and UTS namespaces here: {probe.stdout!r} {probe.stderr.strip()!r}"
    return None


# -- PostgreSQL: a private server, and the shared one -----------------------------------------


class PrivateServer:
    """A PostgreSQL 15 server of the soak's own, in a temporary folder, on a free port; removed by :meth:`close`."""

    def __init__(self) -> None:
        if not (PG_BIN / "initdb").exists():
            raise SystemExit(f"soak: --backend postgres needs PostgreSQL 15's server binaries in {PG_BIN}")
        # Under /tmp itself: the postgres user must reach it.
        self.data = Path(tempfile.mkdtemp(prefix="pytest-runs-soak-pg-"))
        as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if os.geteuid() == 0:
            shutil.chown(self.data, "postgres")
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = int(probe.getsockname()[1])
        options = f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1 -c max_connections=300"
        self.pg_ctl = [*as_postgres, str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-o", options,
                       "-l", str(self.data / "log"), "-w", "-t", "60"]  # fmt: skip
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self.restarts: list[float] = []
        self.failed_restarts = 0
        try:
            initdb = [*as_postgres, str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres"]
            subprocess.run(initdb, check=True, capture_output=True, timeout=120)
            subprocess.run([*self.pg_ctl, "start"], check=True, capture_output=True, timeout=120)
        except BaseException:
            self.close()
            raise

    def restart(self) -> None:
        began = time.monotonic()
        done = subprocess.run([*self.pg_ctl, "-m", "fast", "restart"], capture_output=True, timeout=120)
        if done.returncode == 0:
            self.restarts.append(time.monotonic() - began)
        else:
            self.failed_restarts += 1

    def close(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            subprocess.run([*self.pg_ctl, "-m", "immediate", "stop"], capture_output=True, timeout=60)
        with contextlib.suppress(OSError, ValueError, IndexError):
            # If pg_ctl could not stop it: the postmaster's PID is the first line of postmaster.pid.
            postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
            if "postgres" in cmdline(postmaster):
                os.kill(postmaster, signal.SIGKILL)
        shutil.rmtree(self.data, ignore_errors=True)


def admin(url: str) -> Any:
    import psycopg

    return psycopg.connect(url, autocommit=True, connect_timeout=3)


# -- running the sessions -------------------------------------------------------------------


@dataclasses.dataclass
class Live:
    """A session the soak launched, and what happened to it."""

    plan: Plan
    process: subprocess.Popen[bytes]
    output: Path
    stamps: Path
    launched: float
    holding: float | None = None  # wall time when its first stamp was seen
    exited: float | None = None  # wall time when its end was seen
    status: int | None = None
    killed: float | None = None  # wall time just before the soak sent a SIGKILL that could end it
    kills: list[str] = dataclasses.field(default_factory=list)
    stops: int = 0
    terminated: int = 0
    terminated_at: float = -1e9  # monotonic
    stopped: bool = False
    continued: float | None = None  # wall time of the last SIGCONT (its group's stopped keeper woke then)
    cut_off: bool = False
    outlived: float = 0.0  # how long after its end a process of it was last seen alive
    pending: list[tuple[str, Fault]] = dataclasses.field(default_factory=list)  # faults waiting for the first test

    def main_pid(self) -> int | None:
        """The outer PID of the session's pytest process (for a namespaced one: the grandchild of ``unshare``)."""
        if not self.plan.namespace:
            return self.process.pid
        table = proc_table()
        for init in children(table, self.process.pid):
            for child in children(table, init):
                if "pytest" in cmdline(child):
                    return child
        return None


@dataclasses.dataclass
class Chaos:
    """What the soak dealt, in all."""

    kills: Counter[str] = dataclasses.field(default_factory=Counter)
    stops: Counter[str] = dataclasses.field(default_factory=Counter)
    terminated: int = 0  # connections
    terminations: int = 0  # occasions
    restarts: int = 0
    restarted_at: list[float] = dataclasses.field(default_factory=list)  # wall times
    skipped: int = 0  # stops, terminations and restarts not dealt: they would have met (see Runner._stop)


class Runner:
    """Launches the planned sessions, deals their faults, and ends every process they leave."""

    def __init__(
        self,
        plans: list[Plan],
        work: Path,
        url: str | None,
        server: PrivateServer | None,
        *,
        concurrency: int,
        seconds: float,
        restarts: int,
        seed: int,
    ) -> None:
        self.plans = plans
        self.work = work
        self.url = url
        self.server = server
        self.concurrency = concurrency
        self.seconds = seconds
        self.rng = random.Random(seed ^ 0x50AC)
        self.token = secrets.token_hex(8)
        self.lives: list[Live] = []
        self.chaos = Chaos()
        self.events: list[tuple[float, int, Callable[[], None]]] = []
        self.sequence = itertools.count()
        self.restart_at = sorted({len(plans) * (k + 1) // (restarts + 1) for k in range(restarts)}) if server else []
        self.restarter: threading.Thread | None = None
        self.restart_ended = -1e9  # monotonic
        self.adopted: set[int] = set()
        self.left_over = 0  # processes killed at the end, after their session had ended
        self.outlive_killed = 0  # processes killed OUTLIVE_LIMIT after their session ended
        (work / "stamps").mkdir(parents=True)
        (work / "out").mkdir()
        self.projects = self._make_projects()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_") and k != "PYTEST_ADDOPTS"}
        self.env["SOAK_TOKEN"] = self.token
        if url is not None:
            self.env["PYTEST_RUNS_STORE"] = url

    def _make_projects(self) -> list[Path]:
        projects = []
        for copy in range(8):
            folder = self.work / "projects" / f"p{copy}"
            folder.mkdir(parents=True)
            (folder / "pytest.ini").write_text(f"# soak project {copy}\n[pytest]\n")
            (folder / "test_soak.py").write_text(f"# soak project {copy}\n{TESTS}")
            projects.append(folder)
        return projects

    def state_dir(self, plan: Plan) -> Path:
        """The store (files), or the host's own state dir (a database store: logs only)."""
        if self.url is None or not plan.host:
            return self.work / "state"
        return self.work / f"state-{plan.host}"

    def at(self, delay: float, action: Callable[[], None]) -> None:
        heapq.heappush(self.events, (time.monotonic() + delay, next(self.sequence), action))

    # -- the loop -----------------------------------------------------------------------

    def run(self) -> None:
        began = time.monotonic()
        stop_launching, bound = began + self.seconds * 0.85, began + self.seconds
        upcoming = iter(self.plans)
        last_look = last_exit = 0.0
        lingering = True
        while True:
            now = time.monotonic()
            if now >= bound:
                break
            for live in self.lives:
                self._watch(live)
            while self.events and self.events[0][0] <= now:
                heapq.heappop(self.events)[2]()
            alive = sum(1 for live in self.lives if live.exited is None)
            if len(self.lives) < len(self.plans) and now < stop_launching and alive < self.concurrency:
                plan = next(upcoming)
                self._launch(plan)
                if self.restart_at and len(self.lives) >= self.restart_at[0]:
                    self.restart_at.pop(0)
                    self._restart()
            elif alive == 0 and (len(self.lives) == len(self.plans) or now >= stop_launching):
                last_exit = last_exit or now
                if not lingering or now - last_exit > LINGER_WAIT:
                    break
            if now - last_look > 0.5:
                last_look = now
                lingering = self._look()
            time.sleep(0.02)

    def _launch(self, plan: Plan) -> None:
        output, stamps = self.work / "out" / f"{plan.sid}.out", self.work / "stamps" / f"{plan.sid}.jsonl"
        command = [sys.executable, *PYTEST, *plan.args()]
        if plan.namespace:
            flags = ["--pid", "--fork", "--mount-proc", *(["--uts"] if plan.host else [])]
            command = ["unshare", *flags, "sh", "-c", IN_NAMESPACE, "sh", plan.host, *command]
        env = {
            **self.env,
            "PYTEST_RUNS_STATE_DIR": str(self.state_dir(plan)),
            "SOAK_SID": plan.sid,
            "SOAK_STAMPS": str(stamps),
            "SOAK_TESTS": str(plan.tests),
            "SOAK_TEST_SECONDS": f"{plan.test_seconds:g}",
            "SOAK_FORKS": plan.forks,
            "SOAK_LINGER": f"{plan.linger:g}",
        }
        with output.open("wb") as out:
            process = subprocess.Popen(
                command,
                cwd=self.projects[plan.project],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        live = Live(plan, process, output, stamps, time.time())
        self.lives.append(live)
        for kind, planned in (("kill", plan.kill), ("stop", plan.stop), ("terminate", plan.terminate)):
            if planned is None:
                continue
            if planned.trigger == "launch":
                self.at(planned.delay, self._dealer(kind, live, planned))
            else:
                live.pending.append((kind, planned))

    def _watch(self, live: Live) -> None:
        if live.exited is not None:
            return
        if live.pending and live.holding is None and live.stamps.exists():
            live.holding = time.time()
            for kind, planned in live.pending:
                self.at(planned.delay, self._dealer(kind, live, planned))
            live.pending.clear()
        status = live.process.poll()
        if status is not None:
            live.exited, live.status = time.time(), status

    def _dealer(self, kind: str, live: Live, planned: Fault) -> Callable[[], None]:
        def deal() -> None:
            if live.exited is not None or live.process.poll() is not None:
                return
            if kind == "kill":
                self._kill(live, planned.scope)
            elif kind == "stop":
                self._stop(live, planned)
            else:
                self._terminate(live, planned.scope)

        return deal

    def _signal(self, live: Live, signum: int, target: int | None) -> bool:
        """Send ``signum`` to one process of the session (``target``), or to its whole process group.

        Only to processes of the soak: the group through its leader while it is unreaped
        (so its PID cannot have been reused), else each process that carries the token.
        """
        if target is not None:
            return is_ours(target, self.token) and signal_quietly(target, signum)
        if live.process.poll() is None:
            return signal_quietly(live.process.pid, signum, group=True)
        found = census(self.token, reapers=True).get(live.plan.sid, [])
        return sum(signal_quietly(pid, signum) for pid in found) > 0  # each of them, not the first

    def _kill(self, live: Live, scope: str) -> None:
        target = live.main_pid() if scope == "main" else None
        how = ("controller" if live.plan.variant == "xdist" else "main") if target is not None else "group"
        live.killed = time.time()
        if self._signal(live, signal.SIGKILL, target):
            live.kills.append(how)
            self.chaos.kills[how] += 1

    def _outage(self) -> bool:
        """Whether the server restarts now, or did less than 2 s ago (sessions are still taking their locks back)."""
        restarting = self.restarter is not None and self.restarter.is_alive()
        return restarting or time.monotonic() < self.restart_ended + 2.0

    def _stop(self, live: Live, planned: Fault) -> None:
        # A session stopped while it lost its connections cannot notice the loss, and the
        # machine can pass on before it wakes: a limit the README names (only fencing
        # keeps it off the rig then), not combined here.
        if self._outage() or time.monotonic() < live.terminated_at + 1.0:
            self.chaos.skipped += 1
            return
        target = live.main_pid() if planned.scope == "main" else None
        how = ("controller" if live.plan.variant == "xdist" else "main") if target is not None else "group"
        if self._signal(live, signal.SIGSTOP, target):
            live.stops += 1
            live.stopped = True
            self.chaos.stops[how] += 1
            # Continued in any case: a kill in between does not end the stopped rest of its group.
            self.at(planned.duration, lambda: self._cont(live, target))

    def _cont(self, live: Live, target: int | None) -> None:
        if not self._signal(live, signal.SIGCONT, target) and target is not None:
            self._signal(live, signal.SIGCONT, None)
        live.stopped = False
        if target is None:  # the group was stopped, its keeper with it
            live.continued = time.time()

    def _terminate(self, live: Live, scope: str) -> None:
        if self.url is None or self._outage():
            return
        if live.stopped:  # see _stop
            self.chaos.skipped += 1
            return
        table = proc_table()
        pids = [live.process.pid, *descendants(table, live.process.pid)]
        ports = tcp_ports(pids, server_port(self.url))
        if not ports:
            return
        if scope == "one":
            ports = [self.rng.choice(ports)]
        try:
            with admin(strip_schema(self.url)) as conn:
                rows = conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE client_port = ANY(%s) AND pid <> pg_backend_pid()",
                    (ports,),
                ).fetchall()
        except Exception:  # the server restarting, say: this occasion passes
            return
        if rows:
            live.terminated += len(rows)
            live.terminated_at = time.monotonic()
            self.chaos.terminated += len(rows)
            self.chaos.terminations += 1

    def _restart(self, give_up: float | None = None) -> None:
        """Restart the private server, once no session is stopped (see _stop) and no restart runs."""
        server = self.server
        if server is None:
            return
        give_up = give_up if give_up is not None else time.monotonic() + 30
        if self._outage() or any(live.stopped and live.exited is None for live in self.lives):
            if time.monotonic() < give_up:
                self.at(0.2, lambda: self._restart(give_up))
            else:
                self.chaos.skipped += 1
            return

        def restart() -> None:
            try:
                server.restart()
            finally:
                self.restart_ended = time.monotonic()

        self.chaos.restarts += 1
        self.chaos.restarted_at.append(time.time())
        self.restarter = threading.Thread(target=restart, name="pg-restart", daemon=True)
        self.restarter.start()

    def _look(self) -> bool:
        """Note how long ended sessions' processes outlive them, and reap orphans; whether any of them lives."""
        found = census(self.token)
        now = time.time()
        lingering = False
        for live in self.lives:
            if live.exited is not None and live.plan.sid in found:
                live.outlived = max(live.outlived, now - live.exited)
                lingering = True
                if live.outlived > OUTLIVE_LIMIT:
                    self.outlive_killed += sum(signal_quietly(pid, signal.SIGKILL) for pid in found[live.plan.sid])
        self._reap(found)
        return lingering

    def _reap(self, found: dict[str, list[int]]) -> None:
        """Reap orphans handed to the soak (it is their subreaper), never a session's own process.

        Orphans seen alive with the token, and zombie children that are no session's (a
        zombie's environment cannot be read) while no ``pg_ctl`` of the soak's runs.
        """
        mine = {live.process.pid for live in self.lives}
        table = proc_table()
        for pids in found.values():
            self.adopted.update(pid for pid in pids if table.get(pid, (0, ""))[0] == os.getpid() and pid not in mine)
        if self.restarter is None or not self.restarter.is_alive():
            self.adopted.update(
                pid
                for pid, (parent, state) in table.items()
                if parent == os.getpid() and state == "Z" and pid not in mine
            )
        for pid in list(self.adopted):
            with contextlib.suppress(ChildProcessError):
                if os.waitpid(pid, os.WNOHANG)[0] == 0:
                    continue
            self.adopted.discard(pid)

    # -- the end ------------------------------------------------------------------------

    def end_everything(self) -> None:
        """Kill every process the soak's sessions started, wherever it is (namespaces too), and reap them."""
        for live in self.lives:
            if live.process.poll() is None:  # unreaped: its process group is still the session's
                live.cut_off = live.exited is None
                if live.killed is None:
                    live.killed = time.time()
                signal_quietly(live.process.pid, signal.SIGKILL, group=True)
                signal_quietly(live.process.pid, signal.SIGCONT, group=True)
        deadline = time.monotonic() + 30
        ended_sessions = {live.plan.sid for live in self.lives if live.exited is not None}
        first = True
        while time.monotonic() < deadline:
            found = census(self.token, reapers=True)
            if first:
                self.left_over = sum(len(pids) for sid, pids in found.items() if sid in ended_sessions)
                first = False
            if not found:
                break
            for pids in found.values():
                for pid in pids:
                    signal_quietly(pid, signal.SIGKILL)
                    signal_quietly(pid, signal.SIGCONT)
            self._reap(found)
            time.sleep(0.05)
        for live in self.lives:
            with contextlib.suppress(subprocess.TimeoutExpired):
                live.process.wait(timeout=10)
            if live.exited is None:
                live.exited, live.status = time.time(), live.process.returncode
        self._reap(census(self.token, reapers=True))
        if self.restarter is not None:
            self.restarter.join(timeout=130)


def strip_schema(url: str) -> str:
    return re.sub(r"[?&]schema=[^&]*", "", url)


def server_port(url: str) -> int:
    import urllib.parse

    return urllib.parse.urlsplit(url).port or 5432


# -- what the stamps and the store show (pure data: tests/test_soak.py) ----------------------


@dataclasses.dataclass(frozen=True)
class Stamp:
    kind: str
    t: float
    sid: str
    machine: str
    run: str
    fence: str
    pid: int
    worker: str
    test: str


@dataclasses.dataclass(frozen=True)
class Interval:
    """One test of one session on its machine, from its start to its end (or its death)."""

    sid: str
    machine: str
    start: float
    end: float
    run: str
    fence: str
    test: str
    closed: bool


@dataclasses.dataclass(frozen=True)
class Overlap:
    machine: str
    first: Interval
    second: Interval

    @property
    def ms(self) -> float:
        return (min(self.first.end, self.second.end) - self.second.start) * 1000


@dataclasses.dataclass(frozen=True)
class Record:
    """What the analysis needs of a stored run."""

    id: str
    machine: str
    fence: int | None
    status: str
    terminal: bool
    exit_code: int | None = None
    error_code: str = ""


@dataclasses.dataclass(frozen=True)
class Ending:
    """How a session ended as the soak saw it."""

    sid: str
    machine: str
    status: int | None
    killed: float | None
    cut_off: bool
    printed: frozenset[str]  # run IDs in its output
    launched: float = 0.0
    exited: float | None = None
    busy: frozenset[str] = frozenset()  # run IDs it was told held its machine
    continued: float | None = None  # the last SIGCONT: a keeper stopped with its group held the lock until then


def parse_stamps(lines: Iterable[str]) -> list[Stamp]:
    stamps = []
    for line in lines:
        try:
            raw = json.loads(line)
            stamp = Stamp(raw["k"], float(raw["t"]), raw["s"], raw["m"], raw["r"], raw["f"], int(raw["p"]), raw["w"],
                          raw["n"])  # fmt: skip
            stamps.append(stamp)
        except (ValueError, KeyError, TypeError):
            continue  # a line cut by a full disk: nothing a session did
    return stamps


def intervals(stamps: Iterable[Stamp], killed: dict[str, float]) -> list[Interval]:
    """Each test's time on the machine; an open one (its process died) lasts until its last tick or its SIGKILL.

    ``killed``: by session, when the soak sent the SIGKILL that ended its main process
    (tests outside xdist run there; an xdist worker's death is not known, so its last tick counts).
    """
    by_test: dict[tuple[str, int, str], list[Stamp]] = defaultdict(list)
    for stamp in stamps:
        by_test[stamp.sid, stamp.pid, stamp.test].append(stamp)
    found = []
    for (sid, _, test), seen in by_test.items():
        seen.sort(key=lambda s: s.t)
        starts = [s for s in seen if s.kind == "start"]
        if not starts:
            continue
        first = starts[0]
        ends = [s.t for s in seen if s.kind == "end"]
        if ends:
            end, closed = ends[0], True
        else:
            end, closed = max(s.t for s in seen), False
            if not first.worker and (death := killed.get(sid)) is not None and death > end:
                end = death
        found.append(Interval(sid, first.machine, first.t, end, first.run, first.fence, test, closed))
    return found


def overlaps(found: Iterable[Interval]) -> list[Overlap]:
    """Every pair of tests of different sessions on one machine at the same time."""
    by_machine: dict[str, list[Interval]] = defaultdict(list)
    for interval in found:
        by_machine[interval.machine].append(interval)
    pairs = []
    for machine, mine in sorted(by_machine.items()):
        mine.sort(key=lambda i: i.start)
        for index, first in enumerate(mine):
            for second in mine[index + 1 :]:
                if second.start >= first.end:
                    break
                if second.sid != first.sid:
                    pairs.append(Overlap(machine, first, second))
    return pairs


def duplicate_fences(records: Iterable[Record], found: Iterable[Interval]) -> list[str]:
    """A fence given to two runs on one machine, or stamped by tests of two sessions on one machine."""
    problems = []
    by_machine: dict[str, Counter[int]] = defaultdict(Counter)
    for record in records:
        if record.fence is not None:
            by_machine[record.machine][record.fence] += 1
    for machine, fences in sorted(by_machine.items()):
        problems += [f"{machine}: fence {fence} held by {n} runs" for fence, n in sorted(fences.items()) if n > 1]
    sessions: dict[tuple[str, str], set[str]] = defaultdict(set)
    for interval in found:
        sessions[interval.machine, interval.fence].add(interval.sid)
    problems += [
        f"{machine}: fence {fence} stamped by sessions {', '.join(sorted(sids))}"
        for (machine, fence), sids in sorted(sessions.items())
        if len(sids) > 1
    ]
    return problems


def missing_records(endings: Iterable[Ending], found: Iterable[Interval], records: dict[str, Record]) -> list[str]:
    """Run IDs a session printed or stamped that the store lacks, or has on another machine or with another fence."""
    stamped: dict[str, set[tuple[str, str, str]]] = defaultdict(set)
    for interval in found:
        stamped[interval.sid].add((interval.run, interval.machine, interval.fence))
    problems = []
    for ending in endings:
        seen = stamped.get(ending.sid, set())
        if len({run for run, _, _ in seen}) > 1:
            problems.append(f"{ending.sid}: tests stamped with several runs {sorted(seen)}")
        for run, machine, fence in sorted(seen):
            record = records.get(run)
            if not run:
                problems.append(f"{ending.sid}: a test ran with no run ID")
            elif record is None:
                problems.append(f"{ending.sid}: its tests ran as run {run}, which the store does not have")
            elif (record.machine, str(record.fence)) != (machine, fence) or machine != ending.machine:
                problems.append(
                    f"{ending.sid} (planned on {ending.machine}): tests stamped run {run} on {machine} fence {fence}; "
                    f"the store has it on {record.machine} fence {record.fence}"
                )
        problems += [
            f"{ending.sid}: printed run {run}, which the store does not have"
            for run in sorted(ending.printed)
            if run not in records
        ]
    return problems


def kept_by_the_dead(endings: Sequence[Ending], found: Iterable[Interval], slack: float = 0.5) -> list[str]:
    """Sessions told their machine was busy with the run of a session that had ended before they started.

    Once a session's process is gone, its run is stale at once (its liveness lock died with
    it), so such a busy answer means something else kept the machine: a forked helper that
    inherited the lock, say (issue 17, point 3). A session's keeper shares its process group:
    one killed while its group was stopped leaves the keeper stopped, holding the lock, until
    the SIGCONT, so such a session is gone from then only (a stopped keeper is its session's
    last process, and keeps the machine as a stopped session does).
    """
    owner = {interval.run: interval.sid for interval in found}
    owner.update((run, ending.sid) for ending in endings for run in ending.printed)
    ended = {
        ending.sid: max(ending.exited, ending.continued or ending.exited)
        for ending in endings
        if ending.exited is not None
    }
    kept = []
    for ending in endings:
        for run in sorted(ending.busy):
            holder = owner.get(run)
            gone = ended.get(holder) if holder is not None else None
            if holder is not None and holder != ending.sid and gone is not None and gone + slack < ending.launched:
                kept.append(f"{ending.sid} was told {ending.machine} is busy with run {run} of {holder}, "
                            f"which had ended {ending.launched - gone:.1f} s before it started")  # fmt: skip
    return kept


def disagreements(endings: Iterable[Ending], found: Iterable[Interval], records: dict[str, Record]) -> list[str]:
    """Sessions whose exit status and run record disagree: 0 but not completed, or completed but not 0.

    A session the soak killed is left out (its run may have ended either way).
    """
    runs: dict[str, set[str]] = defaultdict(set)
    for interval in found:
        runs[interval.sid].add(interval.run)
    problems = []
    for ending in endings:
        if ending.status is None or ending.status in KILLED:
            continue
        for run in sorted(runs.get(ending.sid, set()) | ending.printed):
            record = records.get(run)
            if record is None or not record.terminal:
                continue  # missing or non-terminal: counted as such
            if (ending.status == 0) != (record.status == "completed"):
                problems.append(
                    f"{ending.sid} exited {ending.status}; its run {run} is {record.status}"
                    + (f" ({record.error_code})" if record.error_code else "")
                )
    return problems


def flagged_statuses(endings: Iterable[Ending]) -> list[str]:
    """Exit statuses outside the documented set (a SIGKILL's only for the sessions the soak killed)."""
    flagged = []
    for ending in endings:
        if ending.status is None or ending.status in DOCUMENTED:
            continue
        if ending.status in KILLED and (ending.killed is not None or ending.cut_off):
            continue
        flagged.append(f"{ending.sid}: exit status {ending.status}")
    return flagged


# -- one backend, start to end ----------------------------------------------------------------


@dataclasses.dataclass
class Result:
    backend: str
    plans: list[Plan]
    lives: list[Live]
    chaos: Chaos
    seconds: float
    tests: int
    statuses: Counter[int]
    flagged: list[str]
    overlaps: list[Overlap]
    nonterminal: list[str]
    missing: list[str]
    fences: list[str]
    kept: list[str]
    disagree: list[str]
    left_over: int
    outlive_killed: int
    restarts: list[float]
    failed_restarts: int
    runs: int
    store_locked: int

    @property
    def lives_by_sid(self) -> dict[str, Live]:
        return {live.plan.sid: live for live in self.lives}

    @property
    def failed(self) -> bool:
        return bool(self.overlaps or self.nonterminal or self.missing or self.fences)


def reclaim_and_read(state_dir: Path, url: str | None) -> tuple[dict[str, Record], list[str]]:
    """One look per machine (stale runs are reclaimed in it), then every run; problems: a machine still held."""
    from pytest_runs import PrepareOutcome, Run, Status
    from pytest_runs.store import open_store

    store = open_store(state_dir, url, lock_timeout=10)
    problems: list[str] = []
    finals: set[str] = set()
    try:
        for machine in MACHINES:
            try:
                run, outcome = store.prepare_atomic(machine, f"soak-final-{machine}", lambda: Run(test_dir="/soak"))
                if outcome is PrepareOutcome.CREATED:
                    store.start(run.id)
                    store.finish(run.id, Status.COMPLETED, exit_code=0)
                    finals.add(run.id)
                else:
                    problems.append(f"{machine}: still {outcome.name} with run {run.id} ({run.status.value})")
            except Exception as error:
                problems.append(f"{machine}: the final look failed: {type(error).__name__}: {error}")
        runs = store.list()
    finally:
        close = getattr(store.backend, "close", None)
        if callable(close):
            close()
    records = {
        run.id: Record(
            run.id, run.machine, run.fence, run.status.value, run.status.is_terminal, run.exit_code, run.error_code
        )
        for run in runs
        if run.id not in finals
    }
    problems += [f"run {r.id} on {r.machine} is still {r.status}" for r in records.values() if not r.terminal]
    return records, problems


def soak(backend: str, args: argparse.Namespace, work: Path, namespaces: bool) -> Result:
    server: PrivateServer | None = None
    url: str | None = None
    schema = f"soak_{secrets.token_hex(4)}"
    began = time.monotonic()
    try:
        if backend == "postgres":
            server = PrivateServer()
            url = f"{server.url}?schema={schema}"
        elif backend == "postgres-shared":
            url = f"{SHARED_URL}{'&' if '?' in SHARED_URL else '?'}schema={schema}"
        plans = make_plans(args.sessions, args.seed, database=url is not None, namespaces=namespaces)
        runner = Runner(plans, work, url, server, concurrency=args.concurrency, seconds=args.seconds,
                        restarts=args.restarts, seed=args.seed)  # fmt: skip
        try:
            runner.run()
        finally:
            with shielded():
                runner.end_everything()
        records, nonterminal = reclaim_and_read(work / "state", url)
    finally:
        with shielded():
            if server is not None:
                server.close()
            if backend == "postgres-shared":
                with contextlib.suppress(Exception), admin(SHARED_URL) as conn:
                    conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    lives = runner.lives
    (work / "sessions.json").write_text(json.dumps([session_facts(live) for live in lives], indent=1))
    outputs = [live.output.read_text(errors="replace") for live in lives]
    endings = [
        Ending(live.plan.sid, live.plan.machine, live.status, live.killed, live.cut_off,
               frozenset(RUN_LINE.findall(output)), live.launched, live.exited, frozenset(BUSY_LINE.findall(output)),
               live.continued)
        for live, output in zip(lives, outputs, strict=True)
    ]  # fmt: skip
    stamps = [s for live in lives if live.stamps.exists() for s in parse_stamps(live.stamps.read_text().splitlines())]
    # Only a SIGKILL that ended the main process bounds its open tests.
    killed = {live.plan.sid: live.killed for live in lives if live.killed is not None and live.status in KILLED}
    found = intervals(stamps, killed)
    return Result(
        backend=backend,
        plans=plans,
        lives=lives,
        chaos=runner.chaos,
        seconds=time.monotonic() - began,
        tests=len(found),
        statuses=Counter(live.status for live in lives if live.status is not None),
        flagged=flagged_statuses(endings),
        overlaps=overlaps(found),
        nonterminal=nonterminal,
        missing=missing_records(endings, found, records),
        fences=duplicate_fences(records.values(), found),
        kept=kept_by_the_dead(endings, found),
        disagree=disagreements(endings, found, records),
        left_over=runner.left_over,
        outlive_killed=runner.outlive_killed,
        restarts=server.restarts if server is not None else [],
        failed_restarts=server.failed_restarts if server is not None else 0,
        runs=len(records),
        store_locked=sum(1 for output in outputs if STORE_LOCKED.search(output)),
    )


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """Cleaning up: a second Ctrl-C or SIGTERM must not cut it short."""
    previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


# -- the report -------------------------------------------------------------------------------


def figures(r: Result) -> list[tuple[str, str]]:
    """The report's rows for one backend."""

    def many(pick: Callable[[Live], bool]) -> int:
        return sum(1 for live in r.lives if pick(live))

    def counted(counter: Counter[str]) -> str:
        return f"{sum(counter.values())} (" + ", ".join(f"{k} {v}" for k, v in sorted(counter.items())) + ")"

    worst = f"{max(o.ms for o in r.overlaps):.0f}" if r.overlaps else "-"
    restarts = f"{len(r.restarts)} ({', '.join(f'{s:.1f}' for s in r.restarts)})"
    policies = [str(many(lambda live, p=p: live.plan.policy == p)) for p in POLICIES]  # type: ignore[misc]
    return [
        ("sessions planned / started / cut off at the bound",
         f"{len(r.plans)} / {len(r.lives)} / {many(lambda live: live.cut_off)}"),
        ("in a PID namespace (of which UTS, another host name)",
         f"{many(lambda live: bool(live.plan.namespace))} ({many(lambda live: live.plan.namespace == 'uts')})"),
        ("xdist -n 2 / forking tests",
         f"{many(lambda live: live.plan.variant == 'xdist')} / {many(lambda live: live.plan.variant == 'fork')}"),
        ("busy policy fail / wait / skip", " / ".join(policies)),
        ("SIGKILLs sent", counted(r.chaos.kills)),
        ("SIGSTOP/SIGCONT", counted(r.chaos.stops)),
        ("connections terminated (occasions)", f"{r.chaos.terminated} ({r.chaos.terminations})"),
        ("server restarts (seconds each)", restarts + (f", {r.failed_restarts} failed" if r.failed_restarts else "")),
        ("faults not dealt (a stop and a lost connection would have met)", str(r.chaos.skipped)),
        ("tests run on a machine (stamped)", str(r.tests)),
        ("runs recorded", str(r.runs)),
        ("exit statuses", ", ".join(f"{s}: {n}" for s, n in sorted(r.statuses.items()))),
        ("undocumented exit statuses", str(len(r.flagged))),
        ("sessions that met the store's lock held too long", str(r.store_locked)),
        ("sessions told busy by a run whose session had ended", str(len(r.kept))),
        ("sessions whose exit status and run record disagree", str(len(r.disagree))),
        ("**overlaps** (worst ms)", f"**{len(r.overlaps)}** ({worst})"),
        ("**runs left non-terminal**", f"**{len(r.nonterminal)}**"),
        ("**records missing**", f"**{len(r.missing)}**"),
        ("**duplicate fences**", f"**{len(r.fences)}**"),
        ("sessions outlived by a process of theirs (longest s)",
         f"{many(lambda live: live.outlived > 0)} ({max((live.outlived for live in r.lives), default=0):.1f})"),
        (f"processes killed {OUTLIVE_LIMIT:g} s after their session ended / at the end",
         f"{r.outlive_killed} / {r.left_over}"),
        ("wall time s", f"{r.seconds:.0f}"),
    ]  # fmt: skip


def report(results: list[Result], args: argparse.Namespace) -> None:
    print(f"\nsoak: --backend {args.backend} --sessions {args.sessions} --concurrency {args.concurrency} "
          f"--seed {args.seed} --seconds {args.seconds:g} --restarts {args.restarts}")  # fmt: skip
    print("| figure | " + " | ".join(r.backend for r in results) + " |")
    print("|---|" + "---|" * len(results))
    columns = [figures(r) for r in results]
    for index, (label, _) in enumerate(columns[0] if columns else []):
        print(f"| {label} | " + " | ".join(column[index][1] for column in columns) + " |")
    for r in results:
        lines = []
        by_session: dict[tuple[str, str], Overlap] = {}
        for o in r.overlaps:  # the worst overlap of each pair of sessions
            key = (o.first.sid, o.second.sid)
            if key not in by_session or o.ms > by_session[key].ms:
                by_session[key] = o
        lives = {live.plan.sid: live for live in r.lives}
        origin = min((live.launched for live in r.lives), default=0.0)  # times in seconds from the first launch

        def told(sid: str, r: Result = r, origin: float = origin) -> str:
            return describe(r.lives_by_sid[sid], origin, r.chaos.restarted_at)

        for o in sorted(by_session.values(), key=lambda o: -o.ms):
            a, b = o.first, o.second
            lines.append(
                f"overlap {o.ms:.0f} ms on {o.machine}: {a.sid} {a.test} [{a.start - origin:.3f}, {a.end - origin:.3f}]"
                f"{'' if a.closed else ' (open)'} ({told(a.sid)}) and {b.sid} {b.test} from "
                f"{b.start - origin:.3f} ({told(b.sid)})"
            )
        lines += [f"non-terminal: {p}" for p in r.nonterminal]
        lines += [f"missing: {p}" for p in r.missing]
        lines += [f"fence: {p}" for p in r.fences]
        for label, found in (("undocumented", r.flagged), ("kept by the dead", r.kept), ("disagree", r.disagree)):
            for problem in found:  # each starts with the session's ID
                live = lives.get(problem.split(":")[0].split()[0])
                line = f"{label}: {problem}" + (f" ({told(live.plan.sid)})" if live is not None else "")
                if label == "kept by the dead" and (holder := lives.get(problem.split(" of ")[-1].split(",")[0])):
                    line += f"; holder {holder.plan.sid}: {told(holder.plan.sid)}"  # the parenthesis is the told one's
                lines.append(line)
        if lines:
            print(f"\n{r.backend}: findings ({len(lines)})")
            for line in lines[:40]:
                print(f"  {line}")
            if len(lines) > 40:
                print(f"  ... and {len(lines) - 40} more")


def session_facts(live: Live) -> dict[str, Any]:
    """What the soak planned for a session and what happened to it (``sessions.json``, kept with ``--keep``)."""
    facts = dataclasses.asdict(live.plan)
    facts.update(
        sid=live.plan.sid, args=live.plan.args(), launched=live.launched, holding=live.holding, exited=live.exited,
        status=live.status, killed=live.killed, kills=live.kills, stops=live.stops, terminated=live.terminated,
        cut_off=live.cut_off, outlived=live.outlived,
    )  # fmt: skip
    return facts


def describe(live: Live, origin: float, restarts: Sequence[float] = ()) -> str:
    """The session's kind and what was done to it; times in seconds from ``origin``."""
    plan = live.plan
    ended = live.exited if live.exited is not None else float("inf")
    parts = [plan.variant, plan.policy, f"hb {plan.heartbeat:g}", f"exit {live.status}",
             f"ran {live.launched - origin:.3f}-{ended - origin:.3f}"]  # fmt: skip
    if plan.namespace:
        parts.append(plan.namespace + (f" {plan.host}" if plan.host else ""))
    if live.kills and live.killed is not None:
        parts.append("killed " + "+".join(live.kills) + f" at {live.killed - origin:.3f}")
    if live.stops:
        parts.append(f"stopped {live.stops}x")
    if live.terminated:
        parts.append(f"{live.terminated} conn terminated")
    parts += [f"server restarted at {t - origin:.3f}" for t in restarts if live.launched <= t <= ended]
    return ", ".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=40, help="sessions per backend (default 40)")
    parser.add_argument("--backend", choices=("files", "postgres", "postgres-shared", "both"), default="both")
    parser.add_argument("--seconds", type=float, help="bound of each backend's sessions (default 60 + 1.5 s a session)")
    parser.add_argument("--concurrency", type=int, default=6, help="sessions alive at once (default 6)")
    parser.add_argument("--seed", type=int, help="the plan's seed (default: random, printed)")
    parser.add_argument(
        "--restarts", type=int, help="restarts of the private server (default: one per 100 sessions, at least 3)"
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        help="an undocumented exit status, or an exit status its run record contradicts, fails the soak too",
    )
    parser.add_argument("--keep", action="store_true", help="keep the stamps, outputs and stores (path printed)")
    args = parser.parse_args(argv)
    if args.sessions < 1 or args.concurrency < 1 or (args.restarts or 0) < 0:
        parser.error("--sessions and --concurrency must be at least 1, --restarts at least 0")
    if args.seed is None:
        args.seed = random.randrange(1 << 32)
    if args.seconds is None:
        args.seconds = 60 + 1.5 * args.sessions
    if args.restarts is None:
        args.restarts = max(3, args.sessions // 100)
    backends = ["files", "postgres"] if args.backend == "both" else [args.backend]

    def interrupted(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    # Ctrl-C too, also where the soak was started with SIGINT ignored (a background job).
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, interrupted)
    become_subreaper()
    why = namespaces_unavailable()
    if why is not None:
        print(f"soak: no sessions in their own namespaces: {why}", file=sys.stderr)
    work = Path(tempfile.mkdtemp(prefix="pytest-runs-soak-"))
    results = []
    try:
        for backend in backends:
            print(f"soak: {backend}: {args.sessions} sessions, seed {args.seed}, bound {args.seconds:g} s", flush=True)
            results.append(soak(backend, args, work / backend, why is None))
    except KeyboardInterrupt:
        print("soak: interrupted; every process and server it started has been ended", file=sys.stderr)
        return 130
    finally:
        with shielded():
            if args.keep:
                print(f"soak: kept {work}", file=sys.stderr)
            else:
                shutil.rmtree(work, ignore_errors=True)
    report(results, args)
    failed = any(r.failed or (args.strict and (r.flagged or r.disagree)) for r in results)
    print("\nsoak: FAILED" if failed else "\nsoak: passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
