"""The file layout of format 3: a hot path that never reads history, history files, upgrades, retention."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from pytest_runs import Run, RunNotFound, StateError, Status, Store, filebackend
from pytest_runs.filebackend import FileBackend
from pytest_runs.owner import Owner

NOW = datetime(2026, 11, 1, tzinfo=UTC)


def ended(machine: str, index: int, **fields: object) -> Run:
    return Run(
        machine=machine,
        test_dir="/src/tests",
        test_dir_hash=f"{index:064x}",
        status=Status.COMPLETED,
        exit_code=0,
        started_at=NOW + timedelta(minutes=index),
        ended_at=NOW + timedelta(minutes=index, seconds=30),
        **fields,  # type: ignore[arg-type]
    )


def history_files(state: Path) -> list[str]:
    folder = state / "history"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def session_cycle(store: Store, machine: str = "rig-1") -> Run:
    """What a tracked session does to the store: prepare, claim, one heartbeat, finish."""
    owner = Owner.current()
    run, _ = store.prepare_atomic(machine, "h-session", lambda: Run(**owner.run_fields()))
    store.start(run.id, **owner.run_fields())
    store.heartbeat(run.id, owner)
    return store.finish(run.id, Status.COMPLETED, exit_code=0, owner=owner)


# -- the hot path -----------------------------------------------------------------------


def test_the_hot_path_never_reads_history(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(tmp_path / "state")
    store.create_many(ended(f"rig-{i % 3}", i) for i in range(300))

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("the hot path read a history file")

    for name in ("read_region", "find_line", "lines_forwards", "lines_backwards"):
        monkeypatch.setattr(FileBackend, name, forbidden)
    finished = session_cycle(store)
    assert finished.status is Status.COMPLETED
    run, _ = store.prepare_atomic("rig-2", "h", Run)
    released = store.release(run.id, "bench")
    assert released.error_code == "released"
    assert store.active_by_machine("rig-1") is None
    monkeypatch.undo()
    assert store.get(finished.id) == finished
    assert len(store.list()) == 302


def test_the_state_file_does_not_grow_with_history(tmp_path: Path) -> None:
    small, large = Store(tmp_path / "small"), Store(tmp_path / "large")
    small.create_many(ended("rig-1", i) for i in range(10))
    large.create_many(ended("rig-1", i) for i in range(2000))
    for store in (small, large):
        store.prepare_atomic("rig-1", "h", Run)
    sizes = [store.state_path.stat().st_size for store in (small, large)]
    assert sizes[1] - sizes[0] < 10, f"runs.json holds no history: {sizes}"
    assert sizes[0] < 2000


def test_ended_runs_live_in_one_history_file_per_machine(tmp_path: Path) -> None:
    store = Store(tmp_path / "state")
    store.create_many([ended("rig-1", 1), ended("board/7 \N{SNOWMAN}", 2), ended("rig-1", 3)])
    names = history_files(store.state_dir)
    assert len(names) == 2
    assert all(name.endswith(".jsonl") and "/" not in name for name in names)
    for name in names:
        lines = (store.state_dir / "history" / name).read_bytes().splitlines()
        assert all(json.loads(line)["status"] == "completed" for line in lines)
    header = FileBackend(store.state_dir, lock_timeout=1).committed_document()
    assert header["runs"] == []
    assert header["history"]["rig-1"]["count"] == 2


def test_get_finds_an_ended_run_by_its_line_and_not_by_text_inside_another(tmp_path: Path) -> None:
    store = Store(tmp_path / "state")
    target = store.create(ended("rig-1", 1))
    lookalike = f'{{"id": "{target.id}", "machine": "x"}}\n{{"id": "{target.id}",'
    decoy = store.create(ended("rig-1", 2, error_msg=lookalike))
    assert store.get(target.id) == target
    assert store.get(decoy.id) == decoy
    with pytest.raises(RunNotFound):
        store.get(target.id[:-1] + "z")


def test_recent_reads_newest_first_across_machines(tmp_path: Path) -> None:
    store = Store(tmp_path / "state")
    runs = store.create_many(ended(f"rig-{i % 4}", i) for i in range(40))
    active, _ = store.prepare_atomic("rig-9", "h", Run)
    newest = [active, *reversed(runs)]
    assert [r.id for r in store.recent(7)] == [r.id for r in newest[:7]]
    assert [r.id for r in store.recent(3, where=lambda r: r.machine == "rig-1")] == [
        r.id for r in newest if r.machine == "rig-1"
    ][:3]
    assert [r.id for r in store.recent()] == [r.id for r in newest]


def test_long_lines_are_read_backwards_and_forwards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(filebackend, "_READ_CHUNK", 64)  # every line crosses several chunks
    monkeypatch.setattr(filebackend, "_FIRST_CHUNK", 64)
    store = Store(tmp_path / "state", keep=3)
    runs = [store.create(ended("rig-1", i, error_msg="x" * (i * 37))) for i in range(8)]
    assert store.recent() == list(reversed(runs[-3:]))
    assert store.list() == runs[-3:]
    assert store.machines()[0].last == runs[-1]


# -- durability and refusal ------------------------------------------------------------


def test_bytes_past_the_committed_size_are_ignored_then_cut_off(tmp_path: Path) -> None:
    store = Store(tmp_path / "state")
    first = store.create(ended("rig-1", 1))
    (path,) = (store.state_dir / "history").iterdir()
    with path.open("ab") as torn:
        torn.write(b'{"id": "20990101-000000-000000-ffffff", "machine": "rig-1", "sta')
    assert store.list() == [first], "a killed writer's uncommitted tail is not part of the store"
    second = store.create(ended("rig-1", 2))
    assert store.list() == [first, second]
    assert len(path.read_bytes().splitlines()) == 2


def test_a_writer_killed_mid_finish_leaves_the_run_active_or_ended(tmp_path: Path) -> None:
    """SIGKILL a process finishing runs at random moments; every state left is whole."""
    state = tmp_path / "state"
    script = f"""
import sys
from pytest_runs import Run, Status, Store
store = Store({str(state)!r}, keep=5)
while True:
    run, _ = store.prepare_atomic("rig-1", "h", lambda: Run(error_msg="y" * 3000))
    store.start(run.id)
    store.finish(run.id, Status.COMPLETED, exit_code=0)
    print(run.id, flush=True)
"""
    finished: list[str] = []
    for delay in (0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5):
        writer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        try:
            writer.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            os.kill(writer.pid, signal.SIGKILL)
        out, _ = writer.communicate()
        finished.extend(out.split())
        store = Store(state, keep=5)
        active = store.active_by_machine("rig-1")
        if active is not None:  # killed between prepare and finish: a later prepare sees it
            store.finish(active.id, Status.INTERRUPTED)
        kept = store.list()
        assert all(r.status.is_terminal for r in kept)
        assert len(kept) <= 5
    kept_ids = {r.id for r in Store(state).list()}
    assert finished, "the writers got some work done"
    assert set(finished[-3:]) <= kept_ids or len(kept_ids) == 5, "what was reported finished is kept"


def test_a_missing_or_cut_history_file_is_refused_and_left_alone(tmp_path: Path) -> None:
    store = Store(tmp_path / "state")
    store.create_many(ended("rig-1", i) for i in range(5))
    (path,) = (store.state_dir / "history").iterdir()
    content = path.read_bytes()
    path.write_bytes(content[:-40])
    with pytest.raises(StateError, match=r"history file .* is shorter than the \d+ bytes .* records"):
        store.list()
    assert path.read_bytes() == content[:-40]
    path.unlink()
    with pytest.raises(StateError, match=r"history file .* is missing; .* records 5 runs in it"):
        store.list()
    assert not path.exists()


def test_a_corrupt_history_line_is_refused_naming_the_file_and_byte(tmp_path: Path) -> None:
    store = Store(tmp_path / "state")
    store.create_many(ended("rig-1", i) for i in range(3))
    (path,) = (store.state_dir / "history").iterdir()
    content = bytearray(path.read_bytes())
    second = content.index(b"\n") + 1
    content[second + 2 : second + 4] = b"\xff\xfe"
    path.write_bytes(bytes(content))
    with pytest.raises(StateError, match=rf"history file {path} at byte {second}.* not valid JSON"):
        store.list()
    assert path.read_bytes() == bytes(content)


def test_a_symlinked_history_folder_is_refused(tmp_path: Path) -> None:
    store = Store(tmp_path / "state")
    store.create(ended("rig-1", 1))
    elsewhere = tmp_path / "elsewhere"
    (store.state_dir / "history").rename(elsewhere)
    (store.state_dir / "history").symlink_to(elsewhere)
    with pytest.raises(StateError, match="is a symbolic link"):
        store.list()
    with pytest.raises(StateError, match="is a symbolic link"):
        store.create(ended("rig-1", 2))


@pytest.mark.parametrize(
    ("history", "complaint"),
    [
        ('{"rig-1": {"file": "../runs.json", "head": 0, "size": 0, "count": 0, "last": ""}}', "bad file name"),
        ('{"rig-1": {"file": "a.jsonl", "head": 5, "size": 2, "count": 0, "last": ""}}', "0 <= head <= size"),
        ('{"rig-1": {"file": "a.jsonl", "head": 0, "size": 0}}', "must be an object with"),
        ("[]", 'no "history" map'),
    ],
)
def test_a_bad_history_map_is_refused(tmp_path: Path, history: str, complaint: str) -> None:
    store = Store(tmp_path / "state")
    store.create(Run(machine="rig-1"))
    slot = store.state_dir / "runs.state.0"
    body = f'{{"format": "pytest-runs-state", "version": 3, "fences": {{}}, "history": {history}, "runs": []}}'
    digest = hashlib.blake2b(body.encode(), digest_size=16).hexdigest()
    slot.write_text(json.dumps({"seq": 99, "length": len(body), "blake2b": digest}) + "\n" + body)
    with pytest.raises(StateError, match=complaint):
        store.prepare_atomic("rig-1", "h", Run)
    assert slot.read_text().endswith(body)


def test_a_newer_format_is_refused_and_left_alone(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    raw = b'{"format": "pytest-runs-state", "version": 4, "runs": []}'
    (state / "runs.json").write_bytes(raw)
    with pytest.raises(StateError, match="format version 4, newer than this pytest-runs reads"):
        Store(state).list()
    assert (state / "runs.json").read_bytes() == raw
    assert sorted(p.name for p in state.iterdir()) == ["runs.json", "runs.lock"]


# -- upgrades ---------------------------------------------------------------------------


def old_store(state: Path, version: int) -> tuple[bytes, list[Run]]:
    """A store as pytest-runs 0.1 (format 1) or 0.2 (format 2) left it: every run in runs.json."""
    runs = [
        Run(id=f"20260101-00000{i}-000000-abcdef", machine=f"rig-{i % 2}", test_dir_hash=f"h{i}",
            status=Status.COMPLETED, exit_code=0, fence=None if version == 1 else i + 1)
        for i in range(5)
    ]  # fmt: skip
    runs.append(Run(id="20260101-000009-000000-abcdef", machine="rig-0", test_dir_hash="live",
                    status=Status.RUNNING, fence=None if version == 1 else 7))  # fmt: skip
    document: dict[str, object] = {"format": "pytest-runs-state", "version": version}
    if version == 2:
        document["fences"] = {"rig-0": 7, "rig-1": 4}
    document["runs"] = [run.to_dict() for run in runs]
    raw = json.dumps(document).encode()
    state.mkdir(mode=0o700)
    (state / "runs.json").write_bytes(raw)
    return raw, runs


@pytest.mark.parametrize("version", [1, 2])
def test_an_old_store_is_upgraded_once_with_a_backup_and_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, version: int
) -> None:
    state = tmp_path / "state"
    raw, runs = old_store(state, version)
    store = Store(state)
    with caplog.at_level("WARNING", logger="pytest_runs"):
        assert store.get(runs[1].id) == runs[1]
        assert store.list() == runs
    assert [r.getMessage() for r in caplog.records] == [
        f"pytest-runs: upgraded state file {state / 'runs.json'} from format {version} to 3; "
        f"the old file is kept as {state / f'runs.json.v{version}.bak'}"
    ]
    assert (state / f"runs.json.v{version}.bak").read_bytes() == raw
    assert json.loads(store.state_path.read_bytes())["version"] == 3
    header = FileBackend(store.state_dir, lock_timeout=1).committed_document()
    assert [r["id"] for r in header["runs"]] == [runs[-1].id], "only the active run stays in the state"
    assert len(history_files(state)) == 2
    assert store.active_by_machine("rig-0") == runs[-1]
    store.finish(runs[-1].id, Status.COMPLETED, exit_code=0)
    fresh, _ = store.prepare_atomic("rig-0", "h-new", Run)
    assert fresh.fence == (8 if version == 2 else 1), "fences continue where the old store left them"
    assert fresh.id > runs[-1].id


def test_an_upgrade_that_cannot_finish_leaves_the_old_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = tmp_path / "state"
    raw, runs = old_store(state, 2)

    def full(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(StateError, match=r"cannot write state file .* previous state is intact"):
        Store(state).list()
    monkeypatch.undo()
    assert (state / "runs.json").read_bytes() == raw
    assert not (state / "runs.json.v2.bak").exists(), "no backup claims an upgrade that did not happen"
    assert Store(state).list() == runs, "the next use upgrades it"
    assert len(history_files(state)) == 2, "files of the failed attempt are gone"


# -- retention --------------------------------------------------------------------------


def test_retention_keeps_the_newest_ended_runs_of_each_machine_and_deletes_their_folders(tmp_path: Path) -> None:
    store = Store(tmp_path / "state", keep=2)
    finished = {machine: [session_cycle(store, machine) for _ in range(4)] for machine in ("rig-1", "rig-2")}
    folders = {run.id: store.make_run_dir(run.id) for runs in finished.values() for run in runs}
    folder_of_doomed = folders[finished["rig-1"][2].id]
    active, _ = store.prepare_atomic("rig-1", "h", Run)
    latest = session_cycle(store, "rig-2")
    kept = {r.id for r in store.list()}
    assert kept == {finished["rig-1"][2].id, finished["rig-1"][3].id, active.id, finished["rig-2"][3].id, latest.id}
    assert not folders[finished["rig-2"][2].id].exists(), "deleted with its run"
    assert folders[finished["rig-2"][3].id].exists()
    store.finish(active.id, Status.FAILED)
    assert finished["rig-1"][2].id not in {r.id for r in store.list()}
    assert not folder_of_doomed.exists()
    assert store.run_dir(finished["rig-1"][3].id).exists()


def test_keep_zero_keeps_no_ended_run(tmp_path: Path) -> None:
    store = Store(tmp_path / "state", keep=0)
    run = session_cycle(store)
    assert store.list() == []
    with pytest.raises(RunNotFound):
        store.get(run.id)
    assert store.prepare_atomic("rig-1", "h", Run)[0].fence == 2, "fences are never reused"


def test_retention_compacts_history_so_it_stays_small(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(filebackend, "COMPACT_MIN_BYTES", 4096)
    store = Store(tmp_path / "state", keep=3)
    sizes = []
    for _ in range(60):
        store.create(ended("rig-1", 1, error_msg="z" * 500))
        (path,) = (store.state_dir / "history").iterdir()
        sizes.append(path.stat().st_size)
    assert max(sizes) < 4096 + 2 * 3 * 1024, "the dead prefix is copied away once it outweighs the live part"
    assert len(store.list()) == 3


def test_the_plugin_and_the_command_line_apply_runs_keep(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_one(): pass")
    state = pytester.path / "state"
    pytester.makeini(f"[pytest]\nruns_state_dir = {state}\nruns_keep = 2\n")
    for _ in range(4):
        pytester.runpytest("--runs-machine=rig-1", "-p", "no:cacheprovider").assert_outcomes(passed=1)
    assert len(Store(state).list()) == 2
    assert len(list((state / "runs").iterdir())) == 2, "deleted runs take their run folders with them"
    result = pytester.runpytest("--runs-machine=rig-1", "--runs-keep=many")
    assert result.ret == 4
    result.stderr.fnmatch_lines(["*--runs-keep must be a whole number of runs to keep (0 or more), not 'many'*"])


def test_a_run_that_ends_out_of_id_order_keeps_its_history_file_sorted(tmp_path: Path) -> None:
    store = Store(tmp_path / "state")
    early = store.create(Run(machine="rig-1", test_dir_hash="h"))  # active while later runs end
    later = store.create_many(ended("rig-1", i) for i in range(3))
    store.finish(early.id, Status.COMPLETED, exit_code=0)
    (path,) = (store.state_dir / "history").iterdir()
    ids = [json.loads(line)["id"] for line in path.read_bytes().splitlines()]
    assert ids == sorted(ids) == [early.id, *(r.id for r in later)]
    assert [r.id for r in store.recent(2)] == [later[2].id, later[1].id]
    assert store.machines()[0].last == later[2]


# -- found by an adversarial trial --------------------------------------------------------


def test_a_first_commit_cut_short_leaves_an_empty_store_not_a_broken_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store(tmp_path / "state")
    real_pwrite = os.pwrite

    def full(fd: int, data: bytes, offset: int) -> int:
        if os.readlink(f"/proc/self/fd/{fd}").endswith("runs.state.0"):
            raise OSError(28, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(StateError, match="No space left on device"):
        store.prepare_atomic("rig-1", "h", Run)
    monkeypatch.undo()
    assert store.state_path.exists() and (store.state_dir / "runs.state.0").stat().st_size == 0
    assert store.list() == []
    run, _ = store.prepare_atomic("rig-1", "h", Run)
    assert store.list() == [run], "the next write works"


@pytest.mark.parametrize("machine", [".hidden", "..", "...x"])
def test_machine_names_starting_with_a_dot(tmp_path: Path, machine: str) -> None:
    store = Store(tmp_path / "state")
    runs = [store.create(ended(machine, i)) for i in range(2)]
    assert store.list() == runs
    assert store.list() == runs, "the state it wrote reads back"
    assert all(not name.startswith(".") for name in history_files(store.state_dir))


def test_a_restored_backup_beside_a_newer_store_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    _, runs = old_store(state, 2)
    store = Store(state)
    assert store.list() == runs  # upgraded
    newer = [store.create(ended("rig-0", 10 + i)) for i in range(3)]
    backup = (state / "runs.json.v2.bak").read_bytes()
    (state / "runs.json").unlink()
    (state / "runs.json").write_bytes(backup)  # an operator puts the "old file" back
    with pytest.raises(StateError, match=r"was runs.json restored from a backup\? To go back to it, move"):
        store.prepare_atomic("rig-0", "h", Run)
    assert (state / "runs.json").read_bytes() == backup, "left as it is"
    for name in ("runs.state.0", "runs.state.1", "history"):
        (state / name).rename(tmp_path / name)
    assert len(Store(state).list()) == len(runs), "back to the backup, as the message says"
    assert newer


def test_reads_refuse_a_store_whose_runs_json_is_missing(tmp_path: Path) -> None:
    store = Store(tmp_path / "state")
    store.prepare_atomic("rig-1", "h", Run)
    store.state_path.unlink()
    for read in (store.list, store.machines, lambda: store.active_by_machine("rig-1")):
        with pytest.raises(StateError, match=r"runs\.json is missing"):
            read()


@pytest.mark.parametrize("where", ["history", "runs.json"])
def test_a_fifo_in_a_files_place_is_refused_not_waited_on(tmp_path: Path, where: str) -> None:
    store = Store(tmp_path / "state")
    store.create(ended("rig-1", 1))
    path = next((store.state_dir / "history").iterdir()) if where == "history" else store.state_path
    path.unlink()
    os.mkfifo(path)
    script = f"from pytest_runs import Store; Store({str(store.state_dir)!r}).list()"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "is not a regular file" in result.stderr, result.stderr


def test_prune_removes_run_folders_that_no_run_names(tmp_path: Path) -> None:
    store = Store(tmp_path / "state")
    kept = store.create(ended("rig-1", 1))
    store.make_run_dir(kept.id)
    orphan = store.make_run_dir("20200101-000000-000000-abcdef")  # its run was deleted by a killed process
    store.prune(keep=5)
    assert store.run_dir(kept.id).is_dir()
    assert not orphan.exists()


def test_imported_ids_sort_before_generated_ones_and_finishing_appends(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    legacy = [Run(id=f"run-{i:06d}", machine="rig-1", test_dir_hash="h", status=Status.COMPLETED).to_dict()
              for i in range(50)]  # fmt: skip
    (state / "runs.json").write_text(json.dumps({"format": "pytest-runs-state", "version": 2, "runs": legacy}))
    store = Store(state)
    assert len(store.list()) == 50  # upgraded
    (path,) = (state / "history").glob("*.jsonl")
    inode = path.stat().st_ino
    run, _ = store.prepare_atomic("rig-1", "h2", Run)
    store.finish(run.id, Status.COMPLETED)
    assert path.stat().st_ino == inode, "appended, not rewritten"
    assert store.recent(1) == [store.get(run.id)], "the new run is the newest"
    assert [r.id for r in store.list()][-1] == run.id


def test_a_huge_record_reads_back(tmp_path: Path) -> None:
    store = Store(tmp_path / "state")
    huge = store.create(ended("rig-1", 1, error_msg="e" * (16 << 20)))
    small = store.create(ended("rig-1", 2))
    assert store.recent(2) == [small, huge]
    assert store.list() == [huge, small]
    assert store.get(huge.id) == huge
