"""Real pytest sessions in subprocesses, optionally in their own PID (and UTS) namespaces, for the fault tests.

Every session is started in a new session (its own process group), with its output in
files, so that a test can stop, continue or kill all of it, and clean up whatever is left.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from pytest_runs.owner import proc_stat
from pytest_runs.stopper import children

# The store's lock file, which the test never keeps locked.
RUNS_LOCK = "runs.lock"

#: A test that says it started (its PID, as its own PID namespace sees it), then holds
#: the machine until its release file appears (at most 120 s).
HOLD = """
import os, pathlib, time

def test_hold():
    marker = pathlib.Path(os.environ["STARTED_MARKER"])
    partial = marker.with_name(marker.name + ".partial")
    partial.write_text(str(os.getpid()))
    partial.rename(marker)  # whoever sees the marker can read the PID in it
    release = pathlib.Path(os.environ["RELEASE_FILE"])
    deadline = time.monotonic() + 120
    while not release.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
"""

# Arguments of every session: no cache written into the hashed test folder, and no
# hypothesis plugin, whose import alone costs a second on a small machine.
PYTEST = (sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:hypothesispytest", "-q")

# Run as PID 1 of the new namespace: set the host name (if one is given), then run the
# session as a child, so that killing this PID 1 kills the whole namespace.
_IN_NAMESPACE = 'if [ -n "$1" ]; then hostname "$1" || exit 111; fi; shift; "$@"; exit $?'


def sigint_at_default() -> None:
    """The ``preexec_fn`` of every child session the tests start: SIGINT at its default.

    A background job of a non-interactive shell (``pytest -n 2 &``) starts with SIGINT
    ignored, and a child inherits that through ``exec``; a session started so would sit
    out the SIGINT a test sends it. With this the suite passes however it is started.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def make_project(folder: Path, source: str = HOLD) -> Path:
    """A test folder of its own: its ini file makes it the identity of its runs, its name makes its hash its own."""
    folder.mkdir(parents=True)
    (folder / "pytest.ini").write_text(f"# the tests of {folder.name}\n[pytest]\n")
    (folder / "test_hold.py").write_text(source)
    return folder


@dataclasses.dataclass(frozen=True)
class Namespace:
    """Run a session in a new PID namespace (with its own /proc), and a new UTS namespace if ``host`` is set."""

    host: str = ""

    def wrap(self, command: list[str]) -> list[str]:
        flags = ["--pid", "--fork", "--mount-proc", *(["--uts"] if self.host else [])]
        return ["unshare", *flags, "sh", "-c", _IN_NAMESPACE, "sh", self.host, *command]


@functools.cache
def namespaces_unavailable() -> str | None:
    """Why sessions cannot be put in their own PID and UTS namespaces here, or ``None`` if they can."""
    if sys.platform != "linux":
        return "PID and UTS namespaces are Linux only"
    if os.geteuid() != 0:
        return "unshare --pid --uts needs root"
    if shutil.which("unshare") is None or shutil.which("hostname") is None:
        return "unshare or hostname is not installed"
    try:
        probe = subprocess.run(
            Namespace("probe-host").wrap(["sh", "-c", "echo $$ $(hostname)"]),
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError) as error:
        return f"unshare failed: {error}"
    # The shell run by PID 1 of the namespace is PID 2 or 3 there (hostname may have been PID 2).
    words = probe.stdout.split()
    if probe.returncode != 0 or len(words) != 2 or words[0] not in ("2", "3") or words[1] != "probe-host":
        return f"unshare does not give a new PID and UTS namespace here: {probe.stdout!r} {probe.stderr!r}"
    return None


@dataclasses.dataclass
class Session:
    """A pytest session in a subprocess, the leader of its own process group."""

    name: str
    process: subprocess.Popen[bytes]
    out: Path
    err: Path
    started: Path
    release: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        """stdout and stderr so far."""
        return self.out.read_text(errors="replace") + self.err.read_text(errors="replace")

    def finish(self, timeout: float = 120) -> tuple[int, str]:
        """Wait for the end (killing the group if it does not come) and return (exit status, output)."""
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_group()
            raise AssertionError(f"session {self.name} did not end within {timeout}s:\n{self.output()}") from None
        return self.process.returncode, self.output()

    def signal_group(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signum)

    def kill_group(self) -> None:
        """Kill whatever is left of the session (stopped processes too) and reap it."""
        self.signal_group(signal.SIGKILL)
        self.signal_group(signal.SIGCONT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=30)

    def namespace_init(self) -> int:
        """The outer PID of PID 1 of the session's namespace (the only child of ``unshare``)."""
        (init,) = children(self.pid)
        return init

    def kill_namespace(self) -> None:
        """SIGKILL PID 1 of the namespace: the kernel kills every process in it, and ``unshare`` ends after them."""
        os.kill(self.namespace_init(), signal.SIGKILL)
        self.process.wait(timeout=30)


def start(
    name: str,
    project: Path,
    state_dir: Path,
    *args: str,
    env: dict[str, str] | None = None,
    namespace: Namespace | None = None,
    machine: str = "rig-1",
    released: bool = False,
) -> Session:
    """Start ``pytest --runs-machine=MACHINE ARGS`` on ``project`` with ``state_dir`` as its store.

    ``released``: the release file exists from the start, so that the test holds nothing.
    """
    logs = state_dir.parent / "logs"
    logs.mkdir(exist_ok=True)
    out, err = logs / f"{name}.out", logs / f"{name}.err"
    started, release = logs / f"{name}.started", logs / f"{name}.release"
    if released:
        release.write_text("go")
    command = [*PYTEST, f"--runs-machine={machine}", *args]
    with out.open("wb") as stdout, err.open("wb") as stderr:
        process = subprocess.Popen(
            namespace.wrap(command) if namespace is not None else command,
            cwd=project,
            env={
                **os.environ,
                "PYTEST_RUNS_STATE_DIR": str(state_dir),
                "STARTED_MARKER": str(started),
                "RELEASE_FILE": str(release),
                **(env or {}),
            },
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,
            preexec_fn=sigint_at_default,
        )
    return Session(name, process, out, err, started, release)


def wait_for(path: Path, session: Session, timeout: float = 60) -> None:
    """Wait until ``path`` exists while ``session`` runs."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if session.process.poll() is not None:
            raise AssertionError(f"session {session.name} ended ({session.process.returncode}):\n{session.output()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path.name} never appeared:\n{session.output()}")
        time.sleep(0.02)


def group_states(pgid: int) -> dict[int, str]:
    """The state letter (``R``, ``S``, ``T``, ``Z``...) of each process in process group ``pgid``."""
    states = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = proc_stat(entry)
        except OSError:
            continue
        if len(fields) > 2 and int(fields[2]) == pgid:
            states[int(entry)] = fields[0]
    return states


def wait_stopped(pgid: int) -> None:
    """Wait until every process of group ``pgid`` has really stopped (a signal is delivered asynchronously)."""
    deadline = time.monotonic() + 10
    while any(state not in "TtZX" for state in group_states(pgid).values()):
        assert time.monotonic() < deadline, f"process group {pgid} did not stop: {group_states(pgid)}"
        time.sleep(0.002)


def store_lock_is_free(state_dir: Path) -> bool:
    """True if nobody holds the store's lock now (asked without keeping it)."""
    fd = os.open(state_dir / RUNS_LOCK, os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def stop_outside_the_store_lock(session: Session, state_dir: Path) -> None:
    """SIGSTOP the session's whole process group at a moment when it does not hold the store's lock.

    A session stopped inside the store's critical section would make every other one
    wait for the lock: a different fault from a stopped owner, tested elsewhere.
    """
    for _ in range(500):
        session.signal_group(signal.SIGSTOP)
        wait_stopped(session.pid)
        if store_lock_is_free(state_dir):
            return
        session.signal_group(signal.SIGCONT)
        time.sleep(0.01)
    raise AssertionError(f"session {session.name} never let go of {state_dir / RUNS_LOCK}")
