"""A state dir shared by a group of Unix users: real users, real sessions, real permissions.

Each test creates a group and two users in it (``groupadd``/``useradd``, removed at the
end) and runs sessions and commands as root and as each of them (``runuser``). Root is
needed for that; elsewhere these tests skip, saying so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import grp
import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path

import pytest
from _sessions import HOLD, PYTEST

from pytest_runs import Store
from pytest_runs.hashing import RACY_SECONDS

EXIT_USAGE_ERROR = 4  # pytest's status for a usage error, which a refused store is
EXIT_MACHINE_LOST = 76
#: Every wait is bounded generously: the machine is shared, and a session takes seconds to start.
BOUND = 120.0

PASS = "def test_pass():\n    pass\n"


@dataclasses.dataclass
class Lab:
    """A group, two users in it, and a folder under /tmp that they can read (their files live there).

    The users run ``python`` (this interpreter, or one of the same version they can run)
    without its site-packages (``-S``), on a copy of pytest-runs and what it needs in
    ``<root>/site``: the checkout and the interpreter may be in folders they cannot enter.
    """

    group: str
    gid: int
    alice: str
    bob: str
    root: Path
    python: str = sys.executable
    #: Where the copied interpreter's shared library is, for a copy (its runpath is the original's).
    library_path: str = ""
    #: Every session started, each the leader of its process group: what is left of them is killed at the end.
    started: list[subprocess.Popen[str]] = dataclasses.field(default_factory=list)

    @property
    def site(self) -> Path:
        return self.root / "site"

    @property
    def state(self) -> Path:
        return self.root / "state"

    def project(self, name: str, source: str = HOLD) -> Path:
        folder = self.root / name
        folder.mkdir(mode=0o755)
        (folder / "pytest.ini").write_text(f"# the tests of {name}\n[pytest]\n")
        (folder / "test_it.py").write_text(source)
        for path in (folder, *folder.iterdir()):
            path.chmod(0o755 if path.is_dir() else 0o644)
        return folder

    def env(self, name: str, state: Path | None = None) -> dict[str, str]:
        markers = self.root / "markers"
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(markers),
            "LANG": "C.UTF-8",
            "PYTEST_ADDOPTS": "-p no:hypothesispytest",
            "PYTEST_RUNS_STATE_DIR": str(state or self.state),
            "STARTED_MARKER": str(markers / f"{name}.started"),
            "RELEASE_FILE": str(markers / f"{name}.release"),
            "PYTHONPATH": str(self.site),
            **({"LD_LIBRARY_PATH": self.library_path} if self.library_path else {}),
        }

    def command(self, user: str | None, argv: list[str], env: dict[str, str], umask: str | None = None) -> list[str]:
        """``argv`` as ``user`` (root if ``None``) with exactly ``env``, under ``umask`` if given."""
        if umask is not None:
            argv = ["sh", "-c", f'umask {umask} && exec "$@"', "sh", *argv]
        environment = ["env", "-i", *(f"{key}={value}" for key, value in env.items())]
        return [*(["runuser", "-u", user, "--"] if user else []), *environment, *argv]

    def session(
        self,
        name: str,
        user: str | None,
        project: Path,
        *args: str,
        state: Path | None = None,
        umask: str | None = None,
        released: bool = True,
    ) -> subprocess.Popen[str]:
        """A pytest session on ``rig-1`` (unless ``args`` say otherwise) as ``user``, its output in files."""
        env = self.env(name, state)
        if released:
            Path(env["RELEASE_FILE"]).write_text("go")
        logs = self.root / "logs"
        argv = [self.python, "-S", *PYTEST[1:], "-p", "pytest_runs.plugin", "--runs-machine=rig-1", *args]
        with (logs / f"{name}.out").open("w") as out:
            process = subprocess.Popen(
                self.command(user, argv, env, umask),
                cwd=project,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
        self.started.append(process)
        return process

    def output(self, name: str) -> str:
        return (self.root / "logs" / f"{name}.out").read_text(errors="replace")

    def finish(self, name: str, process: subprocess.Popen[str]) -> tuple[int, str]:
        try:
            process.wait(timeout=BOUND)
        except subprocess.TimeoutExpired:
            kill_group(process)
            raise AssertionError(f"session {name} did not end within {BOUND:g}s:\n{self.output(name)}") from None
        return process.returncode, self.output(name)

    def wait_started(self, name: str, process: subprocess.Popen[str]) -> None:
        marker = Path(self.env(name)["STARTED_MARKER"])
        deadline = time.monotonic() + BOUND
        while not marker.exists():
            if process.poll() is not None:
                raise AssertionError(f"session {name} ended ({process.returncode}):\n{self.output(name)}")
            assert time.monotonic() < deadline, f"session {name} never started its test:\n{self.output(name)}"
            time.sleep(0.02)

    def let_go(self, name: str) -> None:
        Path(self.env(name)["RELEASE_FILE"]).write_text("go")

    def cli(self, user: str | None, *args: str, state: Path | None = None) -> subprocess.CompletedProcess[str]:
        """``pytest-runs ARGS`` as ``user`` on the lab's store."""
        argv = [self.python, "-S", "-m", "pytest_runs", "--state-dir", str(state or self.state), *args]
        return subprocess.run(
            self.command(user, argv, self.env("cli", state)),
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=BOUND,
        )


def kill_group(process: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=30)


def _run(*argv: str) -> None:
    """Run a user-admin command, again if another one held /etc/passwd's lock (status 10 for useradd, groupadd)."""
    for _ in range(20):
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        if done.returncode != 10:
            break
        time.sleep(0.5)
    assert done.returncode == 0, f"{' '.join(argv)}: {done.stderr.strip()}"


@pytest.fixture
def lab(portable_python: Callable[[], Path]) -> Iterator[Lab]:
    if os.geteuid() != 0:
        pytest.skip("creating Unix users and running sessions as them (groupadd, useradd, runuser) needs root")
    for tool in ("groupadd", "useradd", "userdel", "groupdel", "runuser"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    tag = f"{os.getpid() % 100000}{secrets.token_hex(2)}"
    group, alice, bob = f"prlab{tag}", f"pra{tag}", f"prb{tag}"
    root = Path(tempfile.mkdtemp(prefix="pytest-runs-shared-", dir="/tmp"))
    made: list[tuple[str, str]] = []
    here: Lab | None = None
    try:
        _run("groupadd", group)
        made.append(("groupdel", group))
        for user in (alice, bob):
            # A user group of its own (its primary group) and the lab group beside it, as people have.
            _run("useradd", "--no-create-home", "--user-group", "--groups", group, "--shell", "/bin/sh", user)
            made.insert(0, ("userdel", user))
        root.chmod(0o755)
        (root / "logs").mkdir()
        (root / "markers").mkdir()
        (root / "markers").chmod(0o1777)  # each user writes its markers here
        state = root / "state"
        state.mkdir()
        gid = grp.getgrnam(group).gr_gid
        os.chown(state, -1, gid)
        state.chmod(0o2770)  # the README's recipe: chgrp lab DIR && chmod 2770 DIR
        here = Lab(group, gid, alice, bob, root)
        _copy_runtime(here.site)
        here.python = _interpreter_for(here, portable_python)
        yield here
    finally:
        for process in here.started if here is not None else []:
            kill_group(process)
        for command, name in made:
            _remove(command, name)
        shutil.rmtree(root, ignore_errors=True)


def _remove(command: str, name: str) -> None:
    """``userdel``/``groupdel NAME``, again while the user's last processes end (``userdel`` refuses then)."""
    deadline = time.monotonic() + 30
    while subprocess.run([command, name], capture_output=True, timeout=60).returncode not in (0, 6):
        if time.monotonic() > deadline:
            subprocess.run([command, "--force", name], capture_output=True, timeout=60)
            return
        time.sleep(0.2)


def _runtime_modules() -> set[str]:
    """The top-level modules of pytest-runs and of everything it needs to run (not its extras)."""
    from packaging.requirements import Requirement

    provided: dict[str, set[str]] = {}
    for module, names in metadata.packages_distributions().items():
        for name in names:
            provided.setdefault(_normal(name), set()).add(module)
    modules, seen, todo = {"pytest_runs"}, set(), ["pytest-runs", "pytest"]
    while todo:
        name = _normal(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        modules |= provided.get(name, set())
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for line in requires:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return {module for module in modules if not module.startswith("__") and importlib.util.find_spec(module)}


def _normal(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _copy_runtime(site: Path) -> None:
    """Copy pytest-runs (as this test process imports it) and its runtime into ``site``, readable by all."""
    site.mkdir()
    for module in sorted(_runtime_modules()):
        spec = importlib.util.find_spec(module)
        assert spec is not None and spec.origin is not None, module
        if spec.submodule_search_locations:
            (source,) = spec.submodule_search_locations
            shutil.copytree(source, site / module, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(spec.origin, site / Path(spec.origin).name)
    for path in (site, *site.rglob("*")):
        path.chmod(0o755 if path.is_dir() else 0o644)


def _interpreter_for(lab: Lab, portable: Callable[[], Path]) -> str:
    """This interpreter if the test users can run it, else one of the same version that they can; or skip.

    The last resort is a copy of this interpreter (``portable``) in a folder they can read.
    """
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    candidates: list[str | Callable[[], Path]] = [
        *dict.fromkeys([sys.executable, f"/usr/bin/python{version}", f"/usr/local/bin/python{version}"]),
        portable,
    ]
    check = f"import sys, pytest, pytest_runs; assert sys.version_info[:2] == {tuple(sys.version_info[:2])}"
    failures = []
    for candidate in candidates:
        if callable(candidate):
            copy = candidate()
            lab.library_path = str(copy / "lib")
            python = str(copy / "bin" / f"python{version}")
        else:
            python = candidate
        done = subprocess.run(
            lab.command(lab.alice, [python, "-S", "-c", check], lab.env("probe")),
            capture_output=True,
            text=True,
            timeout=BOUND,
        )
        if done.returncode == 0:
            return python
        failures.append(f"{python}: {(done.stderr.strip().splitlines() or [str(done.returncode)])[-1]}")
    pytest.skip(f"no Python {version} that a test user can run: {'; '.join(failures)}")


@pytest.fixture(scope="session")
def portable_python() -> Iterator[Callable[[], Path]]:
    """On demand, once per test session: this interpreter and its standard library copied where every user can read.

    For an interpreter installed where other users cannot go (pyenv under /root): the
    program, its shared library and its standard library without site-packages, tests
    and build files, bytecode caches kept. Removed at the end.
    """
    made: list[Path] = []

    def copy() -> Path:
        if made:
            return made[0]
        prefix, version = Path(sys.base_prefix), f"{sys.version_info.major}.{sys.version_info.minor}"
        target = Path(tempfile.mkdtemp(prefix="pytest-runs-python-", dir="/tmp"))
        made.append(target)
        (target / "bin").mkdir()
        shutil.copy2(Path(sys.executable).resolve(), target / "bin" / f"python{version}")
        (target / "lib").mkdir()
        for library in (prefix / "lib").glob(f"libpython{version}*.so*"):
            shutil.copy2(library, target / "lib" / library.name, follow_symlinks=False)
        skipped = ("site-packages", "test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "config-*")
        shutil.copytree(
            prefix / "lib" / f"python{version}",
            target / "lib" / f"python{version}",
            ignore=lambda folder, names: (
                shutil.ignore_patterns(*skipped)(folder, names)
                if Path(folder) == prefix / "lib" / f"python{version}"
                else set()
            ),
            symlinks=True,
        )
        (target / "lib" / f"python{version}" / "site-packages").mkdir()
        for path in (target, *target.rglob("*")):
            if not path.is_symlink():
                path.chmod(0o755 if path.is_dir() or path.parent.name == "bin" else 0o644)
        return target

    yield copy
    for target in made:
        shutil.rmtree(target, ignore_errors=True)


def modes(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``folder`` (itself too): its mode bits and group."""
    found = {}
    for path in (folder, *folder.rglob("*")):
        info = path.lstat()
        found[str(path.relative_to(folder))] = (stat.S_IMODE(info.st_mode), info.st_gid)
    return found


def one_run(lab: Lab) -> dict[str, object]:
    (run,) = json.loads(lab.cli(None, "list", "--json").stdout)
    assert isinstance(run, dict)
    return run


# -- liveness across users ------------------------------------------------------------------


def test_a_root_session_killed_frees_the_machine_for_another_user_at_once(lab: Lab) -> None:
    """Root's session SIGKILLed mid-test: alice's session gets the machine at once, not after the 300 s lease."""
    held = lab.project("held")
    root_session = lab.session("root", None, held, released=False)
    try:
        lab.wait_started("root", root_session)
    except BaseException:
        kill_group(root_session)
        raise
    kill_group(root_session)  # SIGKILL: nothing of root's session ends its run
    status, out = lab.finish("alice", lab.session("alice", lab.alice, held, "--runs-on-busy=fail"))
    assert status == 0 and "1 passed" in out, out
    assert "cannot be read" not in out, out
    # Alice's session reclaimed root's run by its free lock, and ran its own.
    runs = {run["status"]: run for run in json.loads(lab.cli(lab.alice, "list", "--json").stdout)}
    assert runs["interrupted"]["error_code"] == "owner_lost", runs
    assert "its liveness lock is free" in str(runs["interrupted"]["error_msg"]), runs
    assert runs["completed"]["exit_code"] == 0, runs


def test_list_machines_and_prune_work_for_every_member_after_each_wrote(lab: Lab) -> None:
    passing = lab.project("passing", PASS)
    for name, user, machine in (("root", None, "rig-1"), ("alice", lab.alice, "rig-2"), ("bob", lab.bob, "rig-1")):
        status, out = lab.finish(name, lab.session(name, user, passing, f"--runs-machine={machine}"))
        assert status == 0, out
        for reader in (None, lab.alice, lab.bob):
            for command in (["list"], ["machines"]):
                done = lab.cli(reader, *command)
                assert done.returncode == 0 and not done.stderr, (name, reader, command, done)
                assert "rig-1" in done.stdout, done.stdout
    # Each prunes in turn: history files, run folders and lock files written by the others.
    for reader in (lab.bob, lab.alice, None):
        done = lab.cli(reader, "prune", "--keep", "0")
        assert done.returncode == 0 and not done.stderr, (reader, done)
        assert lab.cli(reader, "list").stdout == "no runs\n"
        status, out = lab.finish(f"after-{reader}", lab.session(f"after-{reader}", reader, passing))
        assert status == 0, out
    kept = {run["id"] for run in json.loads(lab.cli(None, "list", "--json").stdout)}
    assert {path.name for path in (lab.state / "runs").iterdir()} == kept, "prune removed every user's run folders"


# -- modes ------------------------------------------------------------------------------------


def test_a_shared_store_is_group_rw_whatever_the_umask_and_a_private_one_stays_private(lab: Lab) -> None:
    held = lab.project("held")
    time.sleep(RACY_SECONDS + 0.5)  # files old enough for the hash cache to keep them: it is written too
    alice = lab.session("alice", lab.alice, held, "--runs-keep=1", umask="077", released=False)
    try:
        lab.wait_started("alice", alice)
        (lock,) = (lab.state / "owners").iterdir()
        info = lock.stat()
        # The liveness lock of a running session: every member can open it to ask it.
        assert (stat.S_IMODE(info.st_mode), info.st_gid) == (0o660, lab.gid), oct(info.st_mode)
        assert info.st_uid != 0
    finally:
        lab.let_go("alice")
    status, out = lab.finish("alice", alice)
    assert status == 0, out
    # Root too, under umask 077, on another machine; then a second run on rig-1 so that
    # retention deletes one (a history file rewritten) and the hash cache is written again.
    for name, user in (("root", None), ("bob", lab.bob)):
        status, out = lab.finish(name, lab.session(name, user, held, "--runs-keep=1", umask="077"))
        assert status == 0, out
    found = modes(lab.state)
    for path, (mode, gid) in found.items():
        kind = "folder" if (lab.state / path).is_dir() else "file"
        assert (mode, gid) == ((0o2770 if kind == "folder" else 0o660), lab.gid), f"{kind} {path}: {mode:04o} {gid}"
    assert {"runs.lock", "runs.json", "runs.state.0", "runs.state.1", "history", "owners", "hash-cache"} <= set(
        found
    ), sorted(found)
    assert any(path.endswith("log.jsonl") for path in found) and any(path.endswith("artifacts") for path in found)
    assert any(path.startswith("hash-cache/") for path in found) and any(path.startswith("history/") for path in found)

    # A private store beside it (no setgid, no group write), made by alice's own session
    # under the usual umask: 0700 and 0600, exactly as always.
    private = lab.root / "markers" / "alice-private"
    status, out = lab.finish("private", lab.session("private", lab.alice, held, state=private, umask="022"))
    assert status == 0, out
    for path, (mode, _) in modes(private).items():
        kind = "folder" if (private / path).is_dir() else "file"
        assert mode == (0o700 if kind == "folder" else 0o600), f"{kind} {path}: {mode:04o}"
    assert lab.cli(lab.bob, "list", state=private).returncode != 0, "bob cannot read alice's private store"


# -- refusals ---------------------------------------------------------------------------------


def test_a_store_with_a_file_this_user_cannot_write_is_refused_in_one_line_naming_it(lab: Lab) -> None:
    passing = lab.project("passing", PASS)
    status, out = lab.finish("root", lab.session("root", None, passing))
    assert status == 0, out
    (history,) = (lab.state / "history").iterdir()
    history.chmod(0o600)  # as an older pytest-runs, or a careless chmod, would leave it
    marker = lab.root / "markers" / "ran"
    tests = lab.project("marking", f"import pathlib\n\ndef test_mark():\n    pathlib.Path({str(marker)!r}).touch()\n")
    status, out = lab.finish("alice", lab.session("alice", lab.alice, tests))
    assert status == EXIT_USAGE_ERROR, out
    assert not marker.exists(), "no test may run on a store this user cannot use"
    assert "Traceback" not in out and "EACCES" not in out, out
    (line,) = [line for line in out.splitlines() if "pytest-runs" in line]
    assert str(history) in line and f"chmod g+rw {history}" in line and lab.alice in line, line
    # The commands say the same, in one line, and change nothing.
    for command in (["list"], ["machines"], ["prune", "--keep", "0"]):
        done = lab.cli(lab.alice, *command)
        assert done.returncode == 1 and not done.stdout, done
        (line,) = done.stderr.splitlines()
        assert line.startswith("pytest-runs: store ") and str(history) in line, line
    assert len(json.loads(lab.cli(None, "list", "--json").stdout)) == 1
    history.chmod(0o660)  # what the line says to do
    status, out = lab.finish("alice-again", lab.session("alice-again", lab.alice, tests))
    assert status == 0 and marker.exists(), out


def test_a_reader_that_cannot_ask_a_lock_says_so(lab: Lab) -> None:
    """A lock file this user cannot read (here made 0600 after the store was checked) is judged by the lease, aloud."""
    held = lab.project("held")
    root_session = lab.session("root", None, held, released=False)
    ready, go = lab.root / "markers" / "ready", lab.root / "markers" / "go"
    reader = (
        "import pathlib, sys, time\n"
        "from pytest_runs import Store\n"
        "from pytest_runs.display import owner_of\n"
        f"store = Store({str(lab.state)!r})\n"
        f"pathlib.Path({str(ready)!r}).touch()\n"
        f"while not pathlib.Path({str(go)!r}).exists():\n"
        "    time.sleep(0.02)\n"
        "(state,) = store.machines()\n"
        "print('stale:', store.stale_reason(state.active))\n"
        "print(state.active.id if state.active else None, '|', owner_of(state.active) if state.active else '')\n"
    )
    try:
        lab.wait_started("root", root_session)
        alice = subprocess.Popen(
            lab.command(lab.alice, [lab.python, "-S", "-c", reader], lab.env("reader")),
            cwd=lab.root,  # not this checkout: the copy in lab.site is what runs
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        lab.started.append(alice)
        deadline = time.monotonic() + BOUND
        while not ready.exists():
            assert alice.poll() is None, alice.communicate()[0]
            assert time.monotonic() < deadline, "the reader never opened the store"
            time.sleep(0.02)
        (lock,) = (lab.state / "owners").iterdir()
        lock.chmod(0o600)
        go.touch()
        out, _ = alice.communicate(timeout=BOUND)
        assert alice.returncode == 0, out
        assert "stale: None" in out, f"root's run counts as alive: judged by its lease {out}"
        assert f"its liveness lock {lock} cannot be read by user {lab.alice}" in out, out
        assert "lease of 300s" in out, out
        # And a session or command started now is refused up front, naming the lock file.
        done = lab.cli(lab.alice, "machines")
        assert done.returncode == 1 and str(lock) in done.stderr and "chmod g+rw" in done.stderr, done
    finally:
        kill_group(root_session)


# -- release ----------------------------------------------------------------------------------


def test_release_of_another_users_run_says_whose_it_was_and_records_who_released_it(lab: Lab) -> None:
    held = lab.project("held")
    alice = lab.session("alice", lab.alice, held, released=False)
    try:
        lab.wait_started("alice", alice)
        run_id = str(one_run(lab)["id"])
        done = lab.cli(lab.bob, "release", run_id, "--reason", "bob took the rig")
        assert done.returncode == 0, done
        assert done.stdout == f"released {lab.alice}'s run {run_id} on rig-1 (now interrupted): bob took the rig\n"
        status, out = lab.finish("alice", alice)
    finally:
        kill_group(alice)
    assert status == EXIT_MACHINE_LOST, out
    run = Store(lab.state).get(run_id)
    # The record keeps what release always recorded, and adds who did it.
    recorded = (run.status.value, run.error_code, run.error_msg)
    assert recorded == ("interrupted", "released", "released: bob took the rig")
    assert run.released_by == f"{lab.bob}@{socket.gethostname()}"
    assert one_run(lab)["released_by"] == run.released_by
    # One's own run: the line as before, without a name.
    alice_again = lab.session("alice-2", lab.alice, held, released=False)
    try:
        lab.wait_started("alice-2", alice_again)
        own = next(r for r in json.loads(lab.cli(None, "list", "--json").stdout) if r["status"] == "running")
        done = lab.cli(lab.alice, "release", str(own["id"]), "--reason", "mine")
        assert done.stdout == f"released run {own['id']} on rig-1 (now interrupted): mine\n", done
    finally:
        kill_group(alice_again)


def test_a_shared_store_of_ones_own_group_is_group_rw_under_umask_077(tmp_path: Path) -> None:
    """Without other users (any user may run it): a session under umask 077 in a 2770 state dir of its own group."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "pytest.ini").write_text("[pytest]\n")
    (project / "test_it.py").write_text(PASS)
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(0o2770)
    done = subprocess.run(
        ["sh", "-c", 'umask 077 && exec "$@"', "sh", *PYTEST, "--runs-machine=rig-1"],
        cwd=project,
        env={**os.environ, "PYTEST_RUNS_STATE_DIR": str(state)},
        capture_output=True,
        text=True,
        timeout=BOUND,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    found = modes(state)
    assert len(found) > 8, sorted(found)
    for path, (mode, gid) in found.items():
        kind = "folder" if (state / path).is_dir() else "file"
        wanted = 0o2770 if kind == "folder" else 0o660
        assert (mode, gid) == (wanted, state.stat().st_gid), f"{kind} {path}: {mode:04o}"
