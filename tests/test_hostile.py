"""Bad input and a hostile or failing file system: one clear line, nothing lost, results unchanged."""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from pytest_runs import Run, StateError, Status, Store
from pytest_runs.cli import main

FAILING_AND_PASSING = """
import os

def test_fails_with_a_surrogate():
    raise FileNotFoundError(os.fsdecode(b"caf\\xe9.bin"))

def test_passes():
    pass
"""


def tracked(pytester: pytest.Pytester, state_dir: Path, *args: str) -> pytest.RunResult:
    return pytester.runpytest(
        "--runs-machine=rig-1",
        f"--runs-state-dir={state_dir}",
        "-p",
        "no:cacheprovider",
        # In process, pytest_runs is already imported by the outer session.
        "-W",
        "ignore::pytest.PytestAssertRewriteWarning",
        *args,
    )


# -- tracking never changes a session's results -----------------------------------------


def test_a_failure_message_with_a_surrogate_is_logged_and_changes_nothing(
    pytester: pytest.Pytester, tmp_path: Path
) -> None:
    pytester.makepyfile(FAILING_AND_PASSING)
    result = tracked(pytester, tmp_path / "state")
    result.assert_outcomes(failed=1, passed=1)
    assert result.ret == 1
    (run,) = Store(tmp_path / "state").list()
    lines = [json.loads(line) for line in Path(run.logs_path).read_text(encoding="utf-8").splitlines()]
    failed = next(line for line in lines if line.get("outcome") == "failed")
    assert "caf\udce9.bin" in failed["longrepr"], "the text survives, escaped, as valid JSON"


def test_a_test_folder_whose_path_is_not_utf8(pytester: pytest.Pytester, tmp_path: Path) -> None:
    folder = Path(os.fsdecode(bytes(tmp_path) + b"/caf\xe9"))
    folder.mkdir()
    (folder / "test_it.py").write_text("def test_it(): pass\n")
    result = pytester.runpytest(
        "--runs-machine=rig-1", f"--runs-state-dir={tmp_path / 'state'}", "-p", "no:cacheprovider", str(folder)
    )
    assert result.ret == 0
    (run,) = Store(tmp_path / "state").list()
    assert run.test_dir == str(folder) and run.status is Status.COMPLETED
    assert main(["--state-dir", str(tmp_path / "state"), "show", run.id]) == 0


def test_a_run_log_that_fails_to_write_changes_nothing(
    pytester: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # /dev/full fails every write with ENOSPC: a disk that filled up during the session.
    monkeypatch.setattr(Store, "open_log", lambda self, run_id: open("/dev/full", "a", encoding="utf-8"))  # noqa: SIM115
    pytester.makepyfile(FAILING_AND_PASSING)
    result = tracked(pytester, tmp_path / "state")
    result.assert_outcomes(failed=1, passed=1)
    assert result.ret == 1
    (run,) = Store(tmp_path / "state").list()
    assert (run.status, run.error_msg) == (Status.FAILED, "1 failed, 1 passed")


def test_a_store_that_fails_to_record_the_end_changes_nothing(
    pytester: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    def full_disk(self: Store, *args: object, **kwargs: object) -> Run:
        raise StateError(f"cannot write state file {self.state_path}: No space left on device")

    monkeypatch.setattr(Store, "finish", full_disk)
    pytester.makepyfile(FAILING_AND_PASSING)
    result = tracked(pytester, tmp_path / "state")
    result.assert_outcomes(failed=1, passed=1)
    assert result.ret == 1
    err = capfd.readouterr().err
    assert "could not record the end of run" in err and "No space left on device" in err
    assert "Traceback" not in err


def test_the_store_removed_during_the_session(pytester: pytest.Pytester, tmp_path: Path) -> None:
    state = tmp_path / "state"
    pytester.makepyfile(
        f"""
        import glob, os, time
        def test_removes_the_store():
            for path in glob.glob({str(state / "runs.*")!r}):
                if not path.endswith(".lock"):
                    os.remove(path)
            time.sleep(2)
        def test_after():
            pass
        """
    )
    result = tracked(pytester, state, "--runs-heartbeat=0.2")
    # The record is gone: the session cannot prove the machine is still its own.
    assert result.ret == 76
    result.stdout.fnmatch_lines(["*this session lost machine rig-1*is gone from the store*"])
    assert "Traceback" not in result.stdout.str()


def test_runs_json_removed_beside_a_store_is_refused_not_started_over(tmp_path: Path) -> None:
    store = Store(tmp_path / "state")
    kept = store.create(Run(machine="rig-1"))
    store.state_path.unlink()
    with pytest.raises(StateError, match=r"runs.json is missing, but .*runs.state.0 holds a store; put runs.json back"):
        store.prepare_atomic("rig-1", "h", Run)
    assert not store.state_path.exists()
    store.state_path.write_text('{"format": "pytest-runs-state", "version": 3}')
    assert store.list() == [kept]


# -- state that cannot be used is refused, and left as it is ----------------------------


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"format": "pytest-runs-state", "version": 2, "runs": [], "n": ' + b"9" * 5000 + b"}", "cannot be read"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"format": "pytest-runs-state", "version": 2, "runs": [{"id": "x"}]}', "required field 'machine'"),
        (
            b'{"format": "pytest-runs-state", "version": 2, "runs": [{"id": "x", "machine": "m"}]}',
            "required field 'status'",
        ),
    ],
    ids=["huge-number", "deep-nesting", "no-machine", "no-status"],
)
def test_unreadable_state_is_one_line(tmp_path: Path, content: bytes, message: str) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "runs.json").write_bytes(content)
    with pytest.raises(StateError, match=message) as raised:
        Store(state).list()
    assert "\n" not in str(raised.value) and len(str(raised.value)) < 500
    assert (state / "runs.json").read_bytes() == content


def test_a_state_file_that_is_a_folder(tmp_path: Path) -> None:
    state = tmp_path / "state"
    (state / "runs.json").mkdir(parents=True)
    with pytest.raises(StateError, match="is not a regular file"):
        Store(state).list()


def test_a_runs_entry_that_is_a_file_is_a_usage_error(pytester: pytest.Pytester, tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / "runs").write_text("not a folder")
    pytester.makepyfile("def test_a(): pass\n")
    result = tracked(pytester, state)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: pytest-runs: {state / 'runs'} exists and is not a folder"])
    (run,) = Store(state).list()
    assert (run.status, run.error_code) == (Status.FAILED, "usage_error"), "the run it could not use is ended"


# -- nothing written outside the store, modes ------------------------------------------


def test_a_symlinked_runs_folder_is_refused(pytester: pytest.Pytester, tmp_path: Path) -> None:
    state, outside = tmp_path / "state", tmp_path / "outside"
    state.mkdir(mode=0o700)
    outside.mkdir()
    (state / "runs").symlink_to(outside)
    pytester.makepyfile("def test_a(): pass\n")
    result = tracked(pytester, state)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: pytest-runs: * is a symbolic link; refusing to write through it"])
    assert list(outside.iterdir()) == []


def test_prune_deletes_nothing_through_a_symlinked_runs_folder(tmp_path: Path) -> None:
    store = Store(tmp_path / "state")
    run = store.create(Run(machine="rig-1", test_dir_hash="h"))
    store.make_run_dir(run.id)
    store.finish(run.id, Status.COMPLETED, exit_code=0)
    outside = tmp_path / "outside"
    (outside / run.id).mkdir(parents=True)
    (outside / run.id / "precious").write_text("keep")
    real_runs = store.state_dir / "runs"
    real_runs.rename(tmp_path / "moved")
    real_runs.symlink_to(outside)
    assert [r.id for r in store.prune(keep=0)] == [run.id]
    assert (outside / run.id / "precious").read_text() == "keep"


def test_a_planted_log_symlink_is_not_written_through(pytester: pytest.Pytester, tmp_path: Path) -> None:
    store = Store(tmp_path / "state")
    reservation = store.create(Run(machine="rig-1", test_dir_hash="x"))
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (store.make_run_dir(reservation.id) / "log.jsonl").symlink_to(victim)
    with pytest.raises(StateError, match="is a symbolic link"):
        store.open_log(reservation.id)
    assert victim.read_text() == "precious\n"


@pytest.mark.parametrize("umask", [0o000, 0o022])
def test_run_folders_and_logs_are_private_whatever_the_umask(
    pytester: pytest.Pytester, tmp_path: Path, umask: int
) -> None:
    pytester.makepyfile("def test_a(runs_artifacts_dir): (runs_artifacts_dir / 'made').write_text('x')\n")
    old = os.umask(umask)
    try:
        result = tracked(pytester, tmp_path / "state")
    finally:
        os.umask(old)
    assert result.ret == 0
    (run,) = Store(tmp_path / "state").list()
    run_dir = Path(run.logs_path).parent
    modes = {path: stat.S_IMODE(path.stat().st_mode) for path in (run_dir.parent, run_dir, Path(run.artifacts_path))}
    assert set(modes.values()) == {0o700}, modes
    assert stat.S_IMODE(Path(run.logs_path).stat().st_mode) == 0o600


def test_a_state_dir_anyone_can_write_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(0o777)
    with pytest.raises(StateError, match=r"can be written by any user \(mode 0777\); make it private with: chmod 700"):
        Store(state)
    assert main(["--state-dir", str(state), "list"]) == 1
    assert capsys.readouterr().err.count("\n") == 1


def test_looking_at_a_store_that_does_not_exist_creates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    for command in (["list"], ["machines"], ["list", "--json"], ["prune", "--keep", "1", "--dry-run"]):
        assert main(["--state-dir", str(state), *command]) == 0
    assert main(["--state-dir", str(state), "show", "nope"]) == 1
    assert not state.exists()


FILLS_THE_DISK = """
import os

def test_one():
    pass

def test_fills_the_disk():
    with open(os.environ["FILLER"], "wb") as filler:
        try:
            while True:
                filler.write(b"x" * 65536)
                filler.flush()
        except OSError:
            pass

def test_fails():
    assert 0

def test_after():
    pass
"""


def test_a_disk_that_fills_during_the_session(tmp_path: Path) -> None:
    """A real full disk: the state dir on a 1 MiB tmpfs, in a mount namespace of its own."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare to mount a small tmpfs")
    state, project = tmp_path / "state", tmp_path / "project"
    state.mkdir(mode=0o700)
    project.mkdir()
    (project / "test_fill.py").write_text(FILLS_THE_DISK)
    pytest_command = [
        sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--runs-machine=rig-1",
        f"--runs-state-dir={state}", "--runs-heartbeat=0.2",
    ]  # fmt: skip
    script = f"mount -t tmpfs -o size=1m,mode=0700 tmpfs {state} && exec {shlex.join(pytest_command)}"
    result = subprocess.run(
        ["unshare", "--mount", "sh", "-c", script],
        cwd=project,
        env={**os.environ, "FILLER": str(state / "filler")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    if "mount:" in result.stderr:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "1 failed, 3 passed" in result.stdout, "every test ran, as without tracking"
    assert "INTERNALERROR" not in result.stdout + result.stderr and "Traceback" not in result.stderr
    assert result.stderr.count("could not record the end of run") == 1
    assert "No space left on device" in result.stderr
    assert "its end could not be recorded" in result.stdout


# -- history files that lie ---------------------------------------------------------------

#: What can be put in place of a machine's history file. Each is refused before any test runs:
#: the hot path checks the file's kind, its size and the bytes where its first and last
#: committed records start and end (a few bytes read; bytes changed in between are found by
#: the readers: `list`, `show`).
LIES = ["cut", "cut-at-a-line", "zeros", "garbage", "missing", "symlink", "fifo", "folder"]
_COMPLAINT = {
    "cut": "is shorter than the * bytes the store's state records (it has *); it was cut or replaced",
    "cut-at-a-line": "is shorter than the * bytes the store's state records (it has *); it was cut or replaced",
    "zeros": "does not hold the runs the store's state records: no run record ends at byte * (zero bytes there*",
    "garbage": "does not hold the runs the store's state records: no run record starts at byte 0; *",
    "missing": "is missing; the store's state records 3 runs in it",
    "symlink": "is not a regular file but a symbolic link; * refusing to use it",
    "fifo": "is not a regular file but a FIFO (named pipe); * refusing to use it",
    "folder": "is not a regular file but a folder; * refusing to use it",
}


def _history_with_a_lie(state: Path, lie: str, tmp_path: Path, *, running: bool = False) -> tuple[Path, Looks]:
    """Rig-1's history (3 ended runs, and a running run if ``running``) with ``lie`` in its file's place.

    Returns the file's path, and what must stay as it is: the file (or what is in its place),
    and the state's slots.
    """
    store = Store(state)
    for index in range(3):
        store.create(Run(machine="rig-1", test_dir_hash=f"h{index}", status=Status.COMPLETED, exit_code=0))
    if running:
        run, _ = store.prepare_atomic("rig-1", "h-running", Run)
        store.start(run.id)
    (path,) = (state / "history").iterdir()
    content = path.read_bytes()
    if lie == "cut":
        path.write_bytes(content[:-40])
    elif lie == "cut-at-a-line":
        path.write_bytes(content[: content.index(b"\n") + 1])
    elif lie == "zeros":  # what a finish used to leave: a cut file padded back to its size
        path.write_bytes(content[: len(content) // 2].ljust(len(content), b"\0"))
    elif lie == "garbage":
        path.write_bytes(hashlib.shake_256(content).digest(len(content)))
    elif lie == "missing":
        path.unlink()
    elif lie == "symlink":  # even to a faithful copy
        copy = tmp_path / "copy.jsonl"
        copy.write_bytes(content)
        path.unlink()
        path.symlink_to(copy)
    elif lie == "fifo":
        path.unlink()
        os.mkfifo(path)
    else:
        path.unlink()
        path.mkdir()

    def the_file() -> object:
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            return None
        body = path.read_bytes() if stat.S_ISREG(info.st_mode) or stat.S_ISLNK(info.st_mode) else b""
        rig_1 = sorted(p.name for p in (state / "history").glob("rig-1-*"))
        return stat.S_IFMT(info.st_mode), info.st_ino, info.st_mtime_ns, body, rig_1

    def the_state() -> object:
        return {slot.name: slot.read_bytes() for slot in state.glob("runs.state.*")}

    return path, Looks(the_file, the_state)


@dataclasses.dataclass
class Looks:
    file: Callable[[], object]
    state: Callable[[], object]


@pytest.mark.parametrize("lie", LIES)
def test_a_history_file_that_lies_stops_a_session_before_any_test(
    pytester: pytest.Pytester, tmp_path: Path, lie: str, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    path, looks = _history_with_a_lie(state, lie, tmp_path)
    file_before, state_before = looks.file(), looks.state()
    marker = tmp_path / "a-test-ran"
    pytester.makepyfile(f"def test_a():\n    open({str(marker)!r}, 'w').close()\n")
    result = tracked(pytester, state)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    errors = [line for line in result.stderr.lines if "pytest-runs" in line]
    assert len(errors) == 1, result.stderr.lines
    assert fnmatch.fnmatchcase(errors[0], f"ERROR: pytest-runs: history file {path} {_COMPLAINT[lie]}"), errors[0]
    assert "Traceback" not in result.stderr.str() + result.stdout.str()
    assert not marker.exists(), "no test ran"
    assert (looks.file(), looks.state()) == (file_before, state_before), "the file and the state as they were"
    # A reservation through the command line is refused alike.
    test_dir = tmp_path / "tests"
    test_dir.mkdir()
    capsys.readouterr()
    assert main(["--state-dir", str(state), "reserve", "--machine", "rig-1", "--test-dir", str(test_dir)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and fnmatch.fnmatchcase(err, f"pytest-runs: history file {path} {_COMPLAINT[lie]}\n"), err
    assert (looks.file(), looks.state()) == (file_before, state_before)
    # Sessions on another machine are not held up by rig-1's history.
    result = tracked(pytester, state, "--runs-machine=rig-2")
    assert result.ret == 0 and marker.exists()
    assert looks.file() == file_before


@pytest.mark.parametrize("lie", LIES)
def test_a_history_file_that_lies_is_refused_by_the_command_line(
    tmp_path: Path, lie: str, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    path, looks = _history_with_a_lie(state, lie, tmp_path, running=True)
    file_before, state_before = looks.file(), looks.state()
    running = Store(state).active_by_machine("rig-1")
    assert running is not None
    for command in (["release", running.id, "--reason", "runner died"], ["list"], ["list", "--machine", "rig-1"]):
        code = main(["--state-dir", str(state), *command])
        out, err = capsys.readouterr()
        assert code == 1 and out == "", (command, out, err)
        assert len(err.splitlines()) == 1 and err.startswith(f"pytest-runs: history file {path} "), (command, err)
        if command[0] == "release":
            assert fnmatch.fnmatchcase(err, f"pytest-runs: history file {path} {_COMPLAINT[lie]}\n"), err
        assert "codec" not in err and "Traceback" not in err
        assert (looks.file(), looks.state()) == (file_before, state_before), command
    assert Store(state).active_by_machine("rig-1") == running, "still running: nothing was recorded"
