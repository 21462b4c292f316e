"""Faults, load and hostile state, with real processes."""

from __future__ import annotations

import contextlib
import itertools
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import racers
from _sessions import sigint_at_default

from pytest_runs import InvalidTransition, PrepareOutcome, Run, RunEnded, StateError, Status, Store
from pytest_runs.options import EXIT_MACHINE_LOST
from pytest_runs.owner import Owner, process_start_time

HERE = Owner.current(environ={})


def dead_owner_fields(state_dir: Path) -> dict[str, object]:
    """The owner fields of a process that took its liveness lock in ``state_dir`` and died."""
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from pytest_runs.liveness import "
         "LivenessLock; lock = LivenessLock(Path(sys.argv[1])); lock.acquire(); print(lock.token, flush=True); "
         "time.sleep(60)", str(state_dir)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert child.stdout is not None
    token = child.stdout.readline().strip()
    started = process_start_time(child.pid) or ""
    child.kill()
    child.wait()
    return {
        "owner_host": HERE.host,
        "owner_boot_id": HERE.boot_id,
        "owner_pid": child.pid,
        "owner_started": started,
        "owner_token": token,
    }


# -- reclaiming stale runs in the store -------------------------------------------------


def test_prepare_reclaims_a_run_whose_owner_died(tmp_path: Path) -> None:
    store = Store(tmp_path / "state")
    orphan = store.create(Run(machine="rig-1", test_dir_hash="h1", heartbeat_at=datetime.now(UTC)))
    store.start(orphan.id, **dead_owner_fields(store.state_dir))
    other_machine = store.create(Run(machine="rig-2", test_dir_hash="h1"))
    store.start(other_machine.id, **dead_owner_fields(store.state_dir))
    fresh, outcome = store.prepare_atomic("rig-1", "h2", Run)
    assert outcome is PrepareOutcome.CREATED
    ended = store.get(orphan.id)
    assert (ended.status, ended.error_code) == (Status.INTERRUPTED, "owner_lost")
    assert f"host {HERE.host} PID {ended.owner_pid}, last heartbeat " in ended.error_msg
    assert ended.error_msg.endswith("its liveness lock is free: the owning process has ended")
    assert ended.ended_at is not None
    assert store.get(other_machine.id).status is Status.RUNNING, "only the prepared machine is looked at"
    assert store.active_by_machine("rig-1") == fresh


def test_an_unclaimed_reservation_expires(tmp_path: Path) -> None:
    store = Store(tmp_path / "state")
    old = datetime.now(UTC) - timedelta(seconds=61)
    reservation = store.create(
        Run(machine="rig-1", test_dir_hash="h1", owner_host="elsewhere", owner_lease=60, heartbeat_at=old)
    )
    _, outcome = store.prepare_atomic("rig-1", "h2", Run)
    assert outcome is PrepareOutcome.CREATED
    assert store.get(reservation.id).error_code == "owner_lost"


def test_a_live_owner_keeps_its_machine(tmp_path: Path) -> None:
    store = Store(tmp_path / "state")
    run = store.create(Run(machine="rig-1", test_dir_hash="h1"))
    store.start(run.id, **HERE.run_fields(), heartbeat_at=datetime.now(UTC))
    holder, outcome = store.prepare_atomic("rig-1", "h2", Run)
    assert (holder.id, outcome) == (run.id, PrepareOutcome.BUSY)


def test_heartbeat_changes_only_heartbeat_at_and_never_revives(tmp_path: Path) -> None:
    store = Store(tmp_path / "state")
    run = store.create(Run(machine="rig-1", test_dir_hash="h1"))
    before = store.start(run.id, **HERE.run_fields(), heartbeat_at=datetime(2026, 1, 1, tzinfo=UTC))
    after = store.heartbeat(run.id, HERE)
    assert after.heartbeat_at is not None and before.heartbeat_at is not None
    assert after.heartbeat_at > before.heartbeat_at
    after.heartbeat_at = before.heartbeat_at
    assert after == before
    other = Owner(host=HERE.host, boot_id=HERE.boot_id, pid=1, started="1")
    with pytest.raises(InvalidTransition, match="owned by another process"):
        store.heartbeat(run.id, other)
    store.release(run.id, "gone fishing")
    with pytest.raises(RunEnded):
        store.heartbeat(run.id, HERE)
    assert store.get(run.id).status is Status.INTERRUPTED


def test_heartbeat_racing_finish_in_threads(tmp_path: Path) -> None:
    store = Store(tmp_path / "state")
    for _ in range(30):
        run, _ = store.prepare_atomic("rig-1", "h", Run)
        store.start(run.id, **HERE.run_fields())
        stop = threading.Event()

        def beat(run_id: str = run.id, stop: threading.Event = stop) -> None:
            while not stop.is_set():
                try:
                    store.heartbeat(run_id, HERE)
                except RunEnded:
                    return

        beater = threading.Thread(target=beat)
        beater.start()
        store.finish(run.id, Status.COMPLETED, exit_code=0)
        stop.set()
        beater.join()
        assert store.get(run.id).status is Status.COMPLETED


# -- real sessions killed, released, racing ---------------------------------------------

HOLD = """
import os, pathlib, time

def test_hold():
    pathlib.Path(os.environ["STARTED_MARKER"]).write_text(str(os.getpid()))
    release = pathlib.Path(os.environ["RELEASE_FILE"])
    deadline = time.monotonic() + 120
    while not release.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
"""


def session(
    pytester: pytest.Pytester, state_dir: Path, tmp_path: Path, name: str, *args: str, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[str], Path, Path]:
    marker, release = tmp_path / f"{name}.started", tmp_path / f"{name}.release"
    process = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--runs-machine=rig-1", *args],
        cwd=pytester.path,
        env={
            **os.environ,
            "PYTEST_RUNS_STATE_DIR": str(state_dir),
            "STARTED_MARKER": str(marker),
            "RELEASE_FILE": str(release),
            **(env or {}),
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=sigint_at_default,
    )
    return process, marker, release


def session_of_other_tests(pytester: pytest.Pytester, state_dir: Path) -> subprocess.CompletedProcess[str]:
    """A whole session on rig-1 of tests other than the pytester folder's, run to its end."""
    other = pytester.mkdir("other")
    (other / "test_other.py").write_text("def test_other(): pass\n")
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--runs-machine=rig-1", str(other)],
        cwd=other,
        env={**os.environ, "PYTEST_RUNS_STATE_DIR": str(state_dir)},
        capture_output=True,
        text=True,
        timeout=120,
    )


def wait_for(path: Path, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 60
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.02)


def test_sigkill_of_a_session_frees_its_machine_at_once(pytester: pytest.Pytester, tmp_path: Path) -> None:
    pytester.makepyfile(HOLD)
    state_dir = tmp_path / "state"
    victim, started, _ = session(pytester, state_dir, tmp_path, "victim")
    wait_for(started, victim)
    victim.kill()
    victim.communicate()
    (tmp_path / "next.release").write_text("go")
    follower, _, _ = session(pytester, state_dir, tmp_path, "next")
    out, err = follower.communicate(timeout=120)
    assert follower.returncode == 0, (out, err)
    old, new = Store(state_dir).list()
    assert (old.status, old.error_code) == (Status.INTERRUPTED, "owner_lost")
    assert f"PID {victim.pid}" in old.error_msg
    assert new.status is Status.COMPLETED


def test_sigkill_frees_a_waiting_session(pytester: pytest.Pytester, tmp_path: Path) -> None:
    pytester.makepyfile(HOLD)
    state_dir = tmp_path / "state"
    victim, started, _ = session(pytester, state_dir, tmp_path, "victim")
    wait_for(started, victim)
    (tmp_path / "waiter.release").write_text("go")
    waiter, _, _ = session(pytester, state_dir, tmp_path, "waiter", "--runs-on-busy=wait", "--runs-wait-timeout=300")
    assert waiter.stdout is not None
    first_line = ""
    while "is busy" not in first_line:
        first_line = waiter.stdout.readline()
        assert first_line, "the waiter never reported the busy machine"
    victim.kill()
    victim.communicate()
    killed_at = time.monotonic()
    out, err = waiter.communicate(timeout=280)
    assert waiter.returncode == 0, (out, err)
    assert time.monotonic() - killed_at < 120, "the waiter should proceed at once, not wait out a lease"
    old, new = Store(state_dir).list()
    assert old.error_code == "owner_lost" and new.status is Status.COMPLETED


def test_a_session_released_while_running_stops_and_fails(pytester: pytest.Pytester, tmp_path: Path) -> None:
    pytester.makepyfile(
        HOLD
        + "\n    pathlib.Path(os.environ['STARTED_MARKER'] + '.held-to-the-end').write_text('')\n"
        + "\ndef test_after():\n    pathlib.Path(os.environ['STARTED_MARKER'] + '.after').write_text('')\n"
    )
    state_dir = tmp_path / "state"
    ci = {"GITHUB_ACTIONS": "true", "GITHUB_REPOSITORY": "o/r", "GITHUB_RUN_ID": "77", "GITHUB_RUN_ATTEMPT": ""}
    process, started, _ = session(pytester, state_dir, tmp_path, "s", "--runs-heartbeat=0.2", "--runs-grace=30", env=ci)
    wait_for(started, process)
    store = Store(state_dir)
    (run,) = store.list()
    assert (run.owner_host, run.owner_pid, run.owner_boot_id) == (HERE.host, process.pid, HERE.boot_id)
    assert run.owner_started == process_start_time(process.pid)
    assert run.owner_ci_url == "https://github.com/o/r/actions/runs/77"
    assert run.heartbeat_at is not None and run.owner_token and run.fence == 1
    released = store.release(run.id, "operator took the rig")
    # The release file is never written: the session must stop by itself, mid-test.
    out, err = process.communicate(timeout=100)
    assert process.returncode == EXIT_MACHINE_LOST, (out, err)
    assert f"pytest-runs: ERROR: this session lost machine rig-1: run {run.id} was ended by someone else" in err
    assert "operator took the rig" in err
    assert f"this session lost machine rig-1 while it ran (exit status {EXIT_MACHINE_LOST})" in out
    assert not (tmp_path / "s.started.held-to-the-end").exists(), "the test holding the machine was interrupted"
    assert not (tmp_path / "s.started.after").exists(), "no further test starts on a lost machine"
    assert "Traceback" not in err
    assert store.get(run.id) == released, "the session must not overwrite a release"


def test_a_session_released_before_its_heartbeat_noticed_still_fails(pytester: pytest.Pytester, tmp_path: Path) -> None:
    """The release lands between two heartbeats and the tests end first: the end finds it, exit 76."""
    pytester.makepyfile(HOLD)
    state_dir = tmp_path / "state"
    process, started, release = session(pytester, state_dir, tmp_path, "s", "--runs-heartbeat=600", "--runs-lease=900")
    wait_for(started, process)
    store = Store(state_dir)
    (run,) = store.list()
    released = store.release(run.id, "operator took the rig")
    release.write_text("go")
    out, err = process.communicate(timeout=100)
    assert process.returncode == EXIT_MACHINE_LOST, (out, err)
    assert "1 passed" in out
    assert f"this session lost machine rig-1 while it ran (exit status {EXIT_MACHINE_LOST})" in out
    assert "(interrupted, released: operator took the rig)" in out
    assert store.get(run.id) == released


def test_heartbeat_racing_finish_in_many_short_sessions(pytester: pytest.Pytester, tmp_path: Path) -> None:
    pytester.makepyfile(
        "import time, pytest\n@pytest.mark.parametrize('n', range(3))\ndef test_q(n): time.sleep(0.02)\n"
    )
    state_dir = tmp_path / "state"
    store = Store(state_dir)
    seen_terminal: set[str] = set()
    reverted: list[str] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            for run in store.list():
                if run.status.is_terminal:
                    seen_terminal.add(run.id)
                elif run.id in seen_terminal:
                    reverted.append(run.id)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for index in range(4):
            process, _, _ = session(pytester, state_dir, tmp_path, f"s{index}", "--runs-heartbeat=0.01")
            out, err = process.communicate(timeout=120)
            assert process.returncode == 0, (out, err)
    finally:
        stop.set()
        watcher.join()
    assert not reverted
    runs = store.list()
    assert len(runs) == 4 and all(r.status is Status.COMPLETED for r in runs)


# -- load -------------------------------------------------------------------------------


def test_load_8_processes_30_cycles_4_machines(tmp_path: Path) -> None:
    spawn = multiprocessing.get_context("spawn")
    state_dir = str(tmp_path / "state")
    workers, cycles, machines = 8, 30, 4
    manager = spawn.Manager()
    start = manager.Barrier(workers)
    with spawn.Pool(workers) as pool:
        pending = [
            pool.apply_async(racers.load_cycles, (state_dir, w, cycles, machines, start)) for w in range(workers)
        ]
        results = [p.get(timeout=600) for p in pending]
    manager.shutdown()
    broken = [b for _, found in results for b in found]
    assert not broken, broken[:5]
    runs = Store(state_dir).list()
    assert len(runs) == sum(created for created, _ in results)
    assert all(r.status.is_terminal for r in runs)
    by_machine: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        by_machine[run.machine].append(run)
    for machine_runs in by_machine.values():
        machine_runs.sort(key=lambda r: r.started_at or datetime.min.replace(tzinfo=UTC))
        for earlier, later in itertools.pairwise(machine_runs):
            assert earlier.ended_at is not None and later.started_at is not None
            assert later.started_at >= earlier.ended_at, f"{earlier.id} and {later.id} overlap"


# -- hostile state ----------------------------------------------------------------------


def hostile_state(state_dir: Path, record: dict[str, object]) -> None:
    state_dir.mkdir(mode=0o700)
    document = {"format": "pytest-runs-state", "version": 1, "runs": [record]}
    (state_dir / "runs.json").write_text(json.dumps(document))


def test_prune_never_deletes_outside_the_state_dir(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious").write_text("keep me")
    state_dir = tmp_path / "state"
    hostile_state(
        state_dir,
        {"id": "../../victim", "machine": "rig-1", "status": "completed", "ended_at": "2020-01-01T00:00:00Z",
         "artifacts_path": str(victim), "logs_path": str(victim / "precious")},
    )  # fmt: skip
    removed = Store(state_dir).prune(keep=0)
    assert [r.id for r in removed] == ["../../victim"]
    assert (victim / "precious").read_text() == "keep me"


def test_a_session_refuses_to_claim_a_run_with_an_unsafe_id(
    pytester: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pytest_runs.hashing import hash_test_dir

    pytester.makepyfile("def test_a(): pass\n")
    pytester.makeini("[pytest]\nruns_hash_ignore =\n    stdout\n    stderr\n    runpytest-*\n")
    state_dir = tmp_path / "state"
    test_hash = hash_test_dir(pytester.path, ignore=["stdout", "stderr", "runpytest-*"])
    hostile: dict[str, object] = {
        "id": "../../../tmp/evil",
        "machine": "rig-1",
        "test_dir_hash": test_hash,
        "status": "pending",
    }
    hostile_state(state_dir, hostile)
    monkeypatch.setenv("PYTEST_RUNS_STATE_DIR", str(state_dir))
    result = pytester.runpytest_subprocess("--runs-machine=rig-1")
    assert result.ret == 4
    result.stderr.fnmatch_lines(["ERROR: pytest-runs: run ID '../../../tmp/evil' is not a safe path component*"])
    assert not Path("/tmp/evil").exists()


def test_cli_shows_a_stale_holder_as_stale(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pytest_runs.cli import main

    store = Store(tmp_path / "state")
    run = store.create(Run(machine="rig-1", test_dir_hash="h"))
    store.start(run.id, **dead_owner_fields(store.state_dir), heartbeat_at=datetime.now(UTC))
    assert main(["--state-dir", str(tmp_path / "state"), "machines"]) == 0
    out = capsys.readouterr().out
    assert "busy (stale)" in out and "stale: its liveness lock is free" in out
    assert main(["--state-dir", str(tmp_path / "state"), "list"]) == 0
    assert "running (stale)" in capsys.readouterr().out
    assert store.get(run.id).status is Status.RUNNING, "looking never changes anything"


def test_unwritable_state_dir_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(StateError, match=f"state dir {state_dir} is not writable"):
        Store(state_dir)


def test_killed_session_signal_is_sigkill_not_term(pytester: pytest.Pytester, tmp_path: Path) -> None:
    """Guards the fault above: SIGKILL gives the session no chance to end its own run."""
    pytester.makepyfile(HOLD)
    state_dir = tmp_path / "state"
    victim, started, _ = session(pytester, state_dir, tmp_path, "victim")
    wait_for(started, victim)
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    (run,) = Store(state_dir).list()
    assert run.status is Status.RUNNING, "nothing but the next prepare_atomic may end it"


def test_a_forked_child_that_runs_into_pytests_end_does_not_give_the_machine_away(
    pytester: pytest.Pytester, tmp_path: Path
) -> None:
    pytester.makepyfile(
        """
        import os, pathlib, sys, time

        def test_forks():
            if os.fork() == 0:
                sys.exit(0)  # the child runs on through pytest's own end, in its own copy of the session

        def test_holds():
            pathlib.Path(os.environ["STARTED_MARKER"]).write_text("")
            release = pathlib.Path(os.environ["RELEASE_FILE"])
            while not release.exists():
                time.sleep(0.02)
        """
    )
    state_dir = tmp_path / "state"
    # Without pytest-rerunfailures, which runs a thread of its own wherever xdist is installed:
    # on Python 3.12+ any thread makes the fork warn, and pytest-runs' own must not.
    holder, started, release = session(pytester, state_dir, tmp_path, "holder", "-p", "no:rerunfailures")
    wait_for(started, holder)
    time.sleep(1)  # the forked child has long finished its copy of the session by now
    intruder = session_of_other_tests(pytester, state_dir)
    assert intruder.returncode == 75, intruder.stdout + intruder.stderr
    release.write_text("go")
    out, err = holder.communicate(timeout=120)
    assert holder.returncode == 0, (out, err)
    (run,) = Store(state_dir).list()
    assert (run.status, run.summary and run.summary["text"]) == (Status.COMPLETED, "2 passed")


def _lock_lines() -> list[list[str]]:
    with open("/proc/locks") as locks:
        return [line.split() for line in locks]


def _wait_until_lock_held(pid: int) -> None:
    """Until process ``pid`` holds a flock."""
    deadline = time.monotonic() + 60
    while not any("FLOCK" in fields and "->" not in fields and str(pid) in fields for fields in _lock_lines()):
        assert time.monotonic() < deadline, f"process {pid} never took its lock"
        time.sleep(0.05)


def _wait_until_lock_awaited(process: subprocess.Popen[str]) -> None:
    """Until ``process`` is blocked waiting for a flock (a ``->`` line of /proc/locks with its PID)."""
    deadline = time.monotonic() + 90
    while not any(fields[1] == "->" and str(process.pid) in fields for fields in _lock_lines() if len(fields) > 1):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the session never waited for the store lock"
        time.sleep(0.05)


def test_a_session_interrupted_while_it_prepares_does_not_block_the_machine(
    pytester: pytest.Pytester, tmp_path: Path
) -> None:
    pytester.makepyfile("def test_a(): pass\n")
    state_dir = tmp_path / "state"
    Store(state_dir).create(Run(machine="rig-0", test_dir_hash="h"))  # a store whose lock we can hold
    blocker = subprocess.Popen(["flock", str(state_dir / "runs.lock"), "sleep", "120"], start_new_session=True)
    try:
        _wait_until_lock_held(blocker.pid)
        victim, _, _ = session(pytester, state_dir, tmp_path, "victim")
        # It waits for the store lock inside prepare (however slow the machine, it is seen waiting
        # in /proc/locks); SIGTERM is held back until prepare returns, once the lock is free.
        _wait_until_lock_awaited(victim)
        victim.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        os.killpg(blocker.pid, signal.SIGKILL)
        out, err = victim.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(blocker.pid, signal.SIGKILL)
        blocker.wait()
    assert victim.returncode == pytest.ExitCode.INTERRUPTED, (out, err)
    # Other tests, so that the victim's run is not simply claimed as a reservation of the same tests.
    follower = session_of_other_tests(pytester, state_dir)
    assert follower.returncode == 0, follower.stdout + follower.stderr
    runs = [r for r in Store(state_dir).list() if r.machine == "rig-1"]
    assert all(r.status.is_terminal for r in runs)
    assert runs[-1].status is Status.COMPLETED


def test_xdist_workers_start_no_test_once_the_machine_is_lost(pytester: pytest.Pytester, tmp_path: Path) -> None:
    pytester.makepyfile(
        """
        import os, pathlib, time, pytest

        @pytest.mark.parametrize("n", range(8))
        def test_slow(n):
            pathlib.Path(os.environ["STARTED_MARKER"] + f".{n}").write_text("")
            time.sleep(3)
        """
    )
    state_dir = tmp_path / "state"
    process, _, _ = session(pytester, state_dir, tmp_path, "s", "-n", "2", "-p", "xdist", "--runs-heartbeat=0.3")
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob("s.started.*")):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.02)
    store = Store(state_dir)
    (run,) = store.list()
    store.release(run.id, "taken back")
    out, err = process.communicate(timeout=120)
    assert process.returncode == EXIT_MACHINE_LOST, (out, err)
    started = len(list(tmp_path.glob("s.started.*")))
    # Only the tests in flight when the loss was found (one per worker), never the rest of the queue.
    assert started <= 2, f"{started} of 8 tests started"


def test_a_session_that_waited_gets_the_full_lock_timeout_for_its_end(
    pytester: pytest.Pytester, tmp_path: Path
) -> None:
    """Waiting shortens the store-lock timeout to the wait left; the end must get the full one again."""
    state_dir = tmp_path / "state"
    pytester.makepyfile(
        f"""
        import subprocess, time

        def test_holds_the_store_lock_past_its_end():
            # Another process holds the store lock for 2 s, across this session's end.
            subprocess.Popen(["flock", {str(state_dir / "runs.lock")!r}, "sleep", "2"], start_new_session=True)
            time.sleep(0.3)
        """
    )
    store = Store(state_dir)
    holder, _ = store.prepare_atomic("rig-1", "f" * 64, Run)

    def free_soon() -> None:
        time.sleep(1)
        store.finish(holder.id, Status.COMPLETED, exit_code=0)

    freer = threading.Thread(target=free_soon)
    freer.start()
    process, _, _ = session(pytester, state_dir, tmp_path, "s", "--runs-on-busy=wait", "--runs-wait-timeout=1.5")
    out, err = process.communicate(timeout=120)
    freer.join()
    assert process.returncode == 0, (out, err)
    assert "could not record" not in err
    assert Store(state_dir).list()[-1].status is Status.COMPLETED
