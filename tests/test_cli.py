"""The pytest-runs command."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
from contract import CONTRACT_KEYS
from terminal import run_on_a_terminal

from pytest_runs import Run, Status, Store
from pytest_runs.cli import EXIT_BROKEN_PIPE, build_parser, main
from pytest_runs.model import OPTIONAL_KEYS
from pytest_runs.store import open_store


@pytest.fixture
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "state"
    monkeypatch.setenv("PYTEST_RUNS_STATE_DIR", str(path))
    monkeypatch.delenv("COLUMNS", raising=False)
    return path


#: The command runs against each backend: the JSON files, and PostgreSQL (through PYTEST_RUNS_STORE).
KINDS = ("files", "postgresql")
file_only = pytest.mark.kinds("files")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "store_kind" in metafunc.fixturenames:
        marker = metafunc.definition.get_closest_marker("kinds")
        metafunc.parametrize("store_kind", marker.args if marker else KINDS)


@pytest.fixture
def store(state_dir: Path, store_kind: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Store:
    if store_kind == "files":
        return Store(state_dir)
    url = request.getfixturevalue("pg_url")
    monkeypatch.setenv("PYTEST_RUNS_STORE", url)
    return open_store(state_dir, url)


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def json_out(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    code, out, err = run_cli(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


def assert_contract(data: dict[str, Any]) -> None:
    assert list(data)[: len(CONTRACT_KEYS)] == CONTRACT_KEYS
    assert set(data) - set(CONTRACT_KEYS) <= OPTIONAL_KEYS
    for key in ("started_at", "ended_at"):
        value = data[key]
        assert value is None or (value.endswith("Z") and len(value) == len("2026-11-26T18:04:58.123456Z"))


def finished(
    store: Store,
    machine: str,
    status: Status = Status.COMPLETED,
    ago: float = 60,
    batch_id: str = "",
    plan_entry: str = "",
) -> Run:
    run = store.create(
        Run(machine=machine, test_dir="/t", test_dir_hash="ab" * 32, batch_id=batch_id, plan_entry=plan_entry)
    )
    ended = datetime.now(UTC) - timedelta(seconds=ago)
    store.start(run.id, started_at=ended - timedelta(seconds=75))
    run_dir = store.run_dir(run.id)
    (run_dir / "artifacts").mkdir(parents=True)
    (run_dir / "log.jsonl").write_text("{}\n")
    run = store.get(run.id)
    run.artifacts_path, run.logs_path = str(run_dir / "artifacts"), str(run_dir / "log.jsonl")
    store.update(run)
    return store.finish(run.id, status, exit_code=0 if status is Status.COMPLETED else 1, ended_at=ended)


def running(store: Store, machine: str, test_dir_hash: str = "cd" * 32) -> Run:
    run = store.create(Run(machine=machine, test_dir="/t", test_dir_hash=test_dir_hash))
    return store.start(run.id)


# -- list -------------------------------------------------------------------------------


def test_list_table_newest_first(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    older = finished(store, "rig-1", ago=600)
    newer = running(store, "rig-2")
    code, out, _ = run_cli(capsys, "list")
    assert code == 0
    header, first, second = out.splitlines()
    assert header.split() == ["ID", "MACHINE", "STATUS", "EXIT", "STARTED", "DURATION", "HASH"]
    assert first.startswith(newer.id) and second.startswith(older.id)
    assert "completed" in second and "11 min ago" in second and "1m15s" in second and "abababababab" in second
    assert header.index("STATUS") == first.index("running") == second.index("completed"), "columns align"
    assert "\x1b[" not in out, "no colour when stdout is not a terminal"


def test_list_json_and_filters(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    a = finished(store, "rig-1", Status.FAILED, batch_id="b1", plan_entry="smoke")
    b = finished(store, "rig-1")
    c = running(store, "rig-2")
    everything = json_out(capsys, "list")
    assert [r["id"] for r in everything] == [c.id, b.id, a.id]
    for record in everything:
        assert_contract(record)
    assert everything[2] == a.to_dict()
    assert [r["id"] for r in json_out(capsys, "list", "--machine", "rig-1")] == [b.id, a.id]
    assert [r["id"] for r in json_out(capsys, "list", "--status", "failed")] == [a.id]
    assert [r["id"] for r in json_out(capsys, "list", "--batch", "b1")] == [a.id]
    assert [r["id"] for r in json_out(capsys, "list", "--limit", "2")] == [c.id, b.id]
    assert json_out(capsys, "list", "--machine", "nowhere") == []


def test_list_shows_batch_column_only_when_needed(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    finished(store, "rig-1")
    assert "BATCH/PLAN" not in run_cli(capsys, "list")[1]
    finished(store, "rig-1", batch_id="nightly", plan_entry="smoke")
    out = run_cli(capsys, "list")[1]
    assert "BATCH/PLAN" in out and "nightly/smoke" in out


def test_list_fits_the_terminal_width(
    store: Store, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    run = finished(store, "a-machine-with-a-very-long-name-" + "x" * 60)
    monkeypatch.setenv("COLUMNS", "100")
    out = run_cli(capsys, "list")[1]
    assert all(len(line) <= 100 for line in out.splitlines())
    assert run.id in out, "IDs are never cut"
    assert "…" in out


def test_empty_store(state_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(capsys, "list")[:2] == (0, "no runs\n")
    assert run_cli(capsys, "machines")[:2] == (0, "no machines\n")
    assert json_out(capsys, "list") == []
    assert json_out(capsys, "machines") == []


# -- show -------------------------------------------------------------------------------


def test_show(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    run = finished(store, "rig-1", Status.FAILED)
    code, out, _ = run_cli(capsys, "show", run.id)
    assert code == 0
    for key in CONTRACT_KEYS:
        assert any(line.split()[0] == key for line in out.splitlines()), key
    assert ["log", "exists"] in [line.split() for line in out.splitlines()]
    assert ["artifacts", "exists"] in [line.split() for line in out.splitlines()]
    assert json_out(capsys, "show", run.id) == run.to_dict()
    Path(run.logs_path).unlink()
    assert ["log", "missing"] in [line.split() for line in run_cli(capsys, "show", run.id)[1].splitlines()]


def test_show_unknown_id(state_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    Store(state_dir)
    code, out, err = run_cli(capsys, "show", "nope")
    assert (code, out) == (1, "")
    assert err == "pytest-runs: no run with ID 'nope'\n"


# -- machines ---------------------------------------------------------------------------


def test_machines(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    last = finished(store, "rig-1", Status.FAILED)
    holder = running(store, "rig-1")
    idle_last = finished(store, "rig-2")
    code, out, _ = run_cli(capsys, "machines")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["MACHINE", "STATE", "HELD", "BY", "WAITING", "LAST", "RUN"]
    assert lines[1].startswith("rig-1") and "busy" in lines[1] and holder.id in lines[1] and last.id in lines[1]
    assert lines[2].startswith("rig-2") and "idle" in lines[2] and idle_last.id in lines[2]
    data = json_out(capsys, "machines")
    assert data == [
        {"machine": "rig-1", "state": "busy", "active": holder.to_dict(), "last": last.to_dict(), "waiting": 0},
        {"machine": "rig-2", "state": "idle", "active": None, "last": idle_last.to_dict(), "waiting": 0},
    ]


# -- release ----------------------------------------------------------------------------


def test_release_a_running_run(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    holder = running(store, "rig-1")
    data = json_out(capsys, "release", holder.id, "--reason", "runner vanished")
    assert_contract(data)
    assert (data["status"], data["error_code"]) == ("interrupted", "released")
    assert "runner vanished" in data["error_msg"]
    assert data["ended_at"] is not None
    assert store.active_by_machine("rig-1") is None


def test_release_refuses_a_terminal_run(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    done = finished(store, "rig-1")
    code, out, err = run_cli(capsys, "release", done.id, "--reason", "x")
    assert (code, out) == (1, "")
    assert err.startswith("pytest-runs: refused: run ") and "already ended as completed" in err
    assert store.get(done.id) == done


def test_release_table_output_says_released_once(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    holder = running(store, "rig-1")
    code, out, _ = run_cli(capsys, "release", holder.id, "--reason", "stuck")
    assert code == 0
    assert out == f"released run {holder.id} on rig-1 (now interrupted): stuck\n"
    # The record keeps its one line of what happened, as every ended run's error_msg does.
    assert store.get(holder.id).error_msg == "released: stuck"


# -- prune ------------------------------------------------------------------------------


def test_prune_keep(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    old = [finished(store, "rig-1", ago=3000 - i) for i in range(3)]
    newest = finished(store, "rig-1", ago=10)
    other = finished(store, "rig-2", ago=5000)
    active = running(store, "rig-1")
    removed = json_out(capsys, "prune", "--keep", "1")
    assert sorted(r["id"] for r in removed) == sorted(r.id for r in old)
    assert {r.id for r in store.list()} == {newest.id, other.id, active.id}
    for run in old:
        assert not store.run_dir(run.id).exists()
    assert Path(newest.artifacts_path).is_dir()


def test_prune_keep_zero_never_touches_active_runs(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    finished(store, "rig-1")
    active = running(store, "rig-1")
    assert len(json_out(capsys, "prune", "--keep", "0")) == 1
    assert store.list() == [active]


def test_prune_older_than_and_dry_run(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    ancient = finished(store, "rig-1", ago=3 * 86400)
    recent = finished(store, "rig-1", ago=3600)
    running(store, "rig-2")
    before = store.list()
    code, out, _ = run_cli(capsys, "prune", "--older-than", "2d", "--dry-run")
    assert code == 0
    assert out.startswith("would remove 1 run\n") and ancient.id in out
    assert store.list() == before
    assert Path(ancient.artifacts_path).is_dir()
    removed = json_out(capsys, "prune", "--older-than", "2d")
    assert [r["id"] for r in removed] == [ancient.id]
    assert not store.run_dir(ancient.id).exists()
    assert recent.id in {r.id for r in store.list()}
    assert json_out(capsys, "prune", "--older-than", "90s", "--dry-run")[0]["id"] == recent.id
    for unit in ("15m", "12h", "2w"):
        assert run_cli(capsys, "prune", "--older-than", unit, "--dry-run")[0] == 0


# -- reserve ----------------------------------------------------------------------------


def test_reserve_then_busy(tmp_path: Path, store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    tests = tmp_path / "tests"
    tests.mkdir()
    (tests / "test_x.py").write_text("def test(): pass\n")
    data = json_out(
        capsys, "reserve", "--machine", "rig-1", "--test-dir", str(tests), "--batch", "b", "--plan-entry", "p"
    )
    assert_contract(data)
    assert (data["status"], data["batch_id"], data["plan_entry"], data["test_dir"]) == ("pending", "b", "p", str(tests))
    again = json_out(capsys, "reserve", "--machine", "rig-1", "--test-dir", str(tests))
    assert again["id"] == data["id"], "reserving the same tests again is idempotent"
    (tests / "test_y.py").write_text("")
    code, out, err = run_cli(capsys, "reserve", "--machine", "rig-1", "--test-dir", str(tests))
    assert (code, out) == (75, "")
    assert f"machine rig-1 is busy with run {data['id']} (pending" in err
    assert len(store.list()) == 1


def test_reserve_then_a_real_pytest_claims_it(
    pytester: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state_dir = tmp_path / "state"
    pytester.makepyfile("def test_ok(runs_run):\n    assert runs_run.batch_id == 'nightly'\n")
    pytester.makeini("[pytest]\nruns_hash_ignore =\n    stdout\n    stderr\n    runpytest-*\n")
    env = {**os.environ, "PYTEST_RUNS_STATE_DIR": str(state_dir)}
    reserve = [sys.executable, "-m", "pytest_runs", "reserve", "--machine", "rig-1", "--test-dir", str(pytester.path)]
    ignores = ["--hash-ignore", "stdout", "--hash-ignore", "stderr", "--hash-ignore", "runpytest-*", "--json"]
    done = subprocess.run([*reserve, *ignores, "--batch", "nightly"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    reserved = json.loads(done.stdout)
    monkeypatch.setenv("PYTEST_RUNS_STATE_DIR", str(state_dir))
    result = pytester.runpytest_subprocess("--runs-machine=rig-1")
    assert result.ret == 0
    (run,) = Store(state_dir).list()
    assert run.id == reserved["id"]
    assert run.status is Status.COMPLETED


def test_reserve_bad_test_dir(state_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "reserve", "--machine", "rig-1", "--test-dir", "/does/not/exist")
    assert code == 2
    assert err == "pytest-runs: --test-dir /does/not/exist is not a folder\n"


# -- usage errors and bad state ---------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "culprit"),
    [
        ([], "the following arguments are required: COMMAND"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["list", "--status", "paused"], "argument --status: invalid choice: 'paused'"),
        (["list", "--limit", "0"], "argument --limit: must be 1 or more"),
        (["list", "--limit", "ten"], "argument --limit: not a whole number: 'ten'"),
        (["show"], "the following arguments are required: ID"),
        (["release", "x"], "the following arguments are required: --reason"),
        (["release", "x", "--reason", "  "], "--reason must not be empty"),
        (["prune"], "one of the arguments --keep --older-than is required"),
        (["prune", "--keep", "1", "--older-than", "1d"], "not allowed with argument"),
        (["prune", "--older-than", "yesterday"], "invalid duration 'yesterday'"),
        (["prune", "--older-than", "10y"], "invalid duration '10y'"),
        (["prune", "--keep", "-1"], "must be 0 or more"),
        (["reserve", "--machine", "bad name", "--test-dir", "."], "invalid machine name 'bad name'"),
        (["reserve", "--test-dir", "."], "the following arguments are required: --machine"),
    ],
)
def test_usage_errors_exit_2_with_one_line(
    state_dir: Path, capsys: pytest.CaptureFixture[str], argv: list[str], culprit: str
) -> None:
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    assert out == ""
    assert culprit in err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err


def test_corrupt_state_file(state_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state_dir.mkdir()
    (state_dir / "runs.json").write_text('{"format": "pytest-runs-state", "version": 1, "runs": [{')
    before = (state_dir / "runs.json").read_bytes()
    for argv in (["list"], ["machines"], ["show", "x"], ["prune", "--keep", "0"], ["list", "--json"]):
        code, out, err = run_cli(capsys, *argv)
        assert code == 1
        assert out == ""
        assert err.startswith(f"pytest-runs: state file {state_dir}/runs.json is not valid JSON")
        assert len(err.splitlines()) == 1
    assert (state_dir / "runs.json").read_bytes() == before


def test_state_dir_option_wins_over_environment(
    tmp_path: Path, state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = Store(tmp_path / "other")
    run = finished(other, "rig-9")
    assert [r["id"] for r in json_out(capsys, "--state-dir", str(tmp_path / "other"), "list")] == [run.id]
    assert json_out(capsys, "list") == []


def _parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """``parser`` and every parser of its commands."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


COMMANDS = [parser.prog.split()[-1] for parser in list(_parsers(build_parser()))[1:]]


def test_help_has_examples(capsys: pytest.CaptureFixture[str]) -> None:
    assert {"list", "show", "machines", "queue", "release", "prune", "reserve"} <= set(COMMANDS)
    for command in COMMANDS:
        code, out, _ = run_cli(capsys, command, "--help")
        assert code == 0
        assert "example: pytest-runs " + command in out
        assert "--json" in out


def test_every_option_argument_and_command_has_help() -> None:
    missing = []
    for parser in _parsers(build_parser()):
        for action in parser._actions:
            name = "/".join(action.option_strings) or str(action.metavar or action.dest)
            if not (action.help or "").strip() or action.help == argparse.SUPPRESS:
                missing.append(f"{parser.prog} {name}")
            if isinstance(action, argparse._SubParsersAction):
                missing += [f"{parser.prog} {c.dest}" for c in action._choices_actions if not (c.help or "").strip()]
    assert missing == []


def test_help_shows_every_options_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "reserve", "--help")
    assert code == 0
    assert re.search(r"--machine M\s+the machine to reserve", out), out
    assert re.search(r"--test-dir D\s+the folder of the tests", out), out


# -- --version and --json -----------------------------------------------------------------


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "--version")
    assert (code, out, err) == (0, f"pytest-runs {version('pytest-runs')}\n", "")
    assert re.fullmatch(r"pytest-runs \d+\.\d+\.\d+\S*\n", out)


def test_version_of_the_console_script_without_pytest() -> None:
    by_script = subprocess.run([_script(), "--version"], capture_output=True, text=True, check=True)
    assert by_script.stdout == f"pytest-runs {version('pytest-runs')}\n"
    code = (
        "import sys\n"
        "from pytest_runs.cli import main\n"
        "try:\n    main(['--version'])\nexcept SystemExit:\n    pass\n"
        "sys.exit(sorted(m for m in sys.modules if m.split('.')[0] in ('pytest', '_pytest')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert (result.stdout, result.stderr) == (by_script.stdout, "[]\n")


def test_json_is_accepted_before_or_after_the_command() -> None:
    parser = build_parser()
    assert parser.parse_args(["list"]).json is False
    assert parser.parse_args(["--json", "list"]).json is True
    assert parser.parse_args(["list", "--json"]).json is True
    assert parser.parse_args(["--json", "list", "--json"]).json is True
    for command in _parsers(parser):
        assert "--json" in command._option_string_actions, f"{command.prog} takes no --json"


@file_only
def test_every_command_prints_the_same_json_with_json_before_or_after_it(
    store: Store, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    done = finished(store, "rig-1")
    holders = [running(store, "rig-2"), running(store, "rig-3", test_dir_hash="ef" * 32)]
    tests = tmp_path / "tests"
    tests.mkdir()
    (tests / "test_x.py").write_text("def test(): pass\n")

    def printed(*argv: str) -> Any:
        code, out, err = run_cli(capsys, *argv)
        assert code == 0, err
        return json.loads(out)

    read_only = [["list"], ["show", done.id], ["machines"], ["queue"], ["prune", "--keep", "0", "--dry-run"]]
    for argv in read_only:
        assert printed("--json", *argv) == printed(*argv, "--json"), argv
        code, out, _ = run_cli(capsys, *argv)
        assert code == 0 and not out.startswith(("[", "{")), f"{argv}: JSON without --json"
    # The commands that change something: each way once, and both print the run as JSON.
    assert printed("--json", "release", holders[0].id, "--reason", "x")["id"] == holders[0].id
    assert printed("release", holders[1].id, "--reason", "x", "--json")["id"] == holders[1].id
    reserve = ["reserve", "--machine", "rig-4", "--test-dir", str(tests)]
    assert printed("--json", *reserve) == printed(*reserve, "--json")


# -- colour and the real command --------------------------------------------------------


def _script() -> str:
    return str(Path(sys.executable).with_name("pytest-runs"))


def test_colour_only_on_a_terminal_and_never_with_no_color(store: Store, state_dir: Path) -> None:
    finished(store, "rig-1", Status.FAILED)
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"} | {"TERM": "xterm"}
    code, coloured = run_on_a_terminal([_script(), "list"], env)
    assert code == 0
    assert "\x1b[31;1mfailed\x1b[0m" in coloured
    code, plain = run_on_a_terminal([_script(), "list"], env | {"NO_COLOR": "1"})
    assert code == 0
    assert "failed" in plain and "\x1b[" not in plain
    piped = subprocess.run([_script(), "list"], capture_output=True, text=True, check=True).stdout
    assert "failed" in piped and "\x1b[" not in piped


def test_console_script_and_module_agree(store: Store) -> None:
    finished(store, "rig-1")
    by_script = subprocess.run([_script(), "list", "--json"], capture_output=True, text=True, check=True)
    by_module = subprocess.run(
        [sys.executable, "-m", "pytest_runs", "list", "--json"], capture_output=True, text=True, check=True
    )
    assert json.loads(by_script.stdout) == json.loads(by_module.stdout)
    assert len(json.loads(by_script.stdout)) == 1


# -- what a person sees -------------------------------------------------------------------


def test_machines_names_the_holders_host_and_ci_job(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    run = store.create(
        Run(machine="rig-1", test_dir_hash="h", owner_host="ci-7", owner_pid=4242, owner_ci_url="https://ci/jobs/9")
    )
    store.start(run.id)
    code, out, _ = run_cli(capsys, "machines")
    assert code == 0
    assert f"{run.id} (running, " in out and "host ci-7 PID 4242" in out and "https://ci/jobs/9" in out


def test_a_reader_that_goes_away_ends_the_command_quietly(store: Store, state_dir: Path) -> None:
    for n in range(300):
        store.create(Run(machine=f"rig-{n % 5}", test_dir_hash=f"{n:064x}", status=Status.COMPLETED))
    result = subprocess.run(
        f"{sys.executable} -m pytest_runs --state-dir {state_dir} list --json | head -n 1",
        shell=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.stdout == "[\n"
    assert result.stderr == "", "no BrokenPipeError traceback"


@file_only
def test_a_reader_gone_before_the_output_ends_every_command_quietly(
    store: Store, state_dir: Path, tmp_path: Path
) -> None:
    done = finished(store, "rig-1")
    holder = running(store, "rig-2")
    tests = tmp_path / "tests"
    tests.mkdir()
    (tests / "test_x.py").write_text("def test(): pass\n")
    cases = [
        ["--version"],
        ["--help"],
        ["list", "--help"],
        ["list"],
        ["--json", "list"],
        ["show", done.id],
        ["show", done.id, "--json"],
        ["machines"],
        ["--json", "machines"],
        ["queue", "--machine", "rig-2"],
        ["prune", "--keep", "0", "--dry-run"],
        ["reserve", "--machine", "rig-3", "--test-dir", str(tests)],
        ["release", holder.id, "--reason", "x", "--json"],
    ]
    for argv in cases:
        # A reader that closed the pipe before the first byte: every write fails at once.
        read, write = os.pipe()
        os.close(read)
        try:
            result = subprocess.run([_script(), *argv], stdout=write, stderr=subprocess.PIPE, text=True, timeout=60)
        finally:
            os.close(write)
        # argparse itself ignores a failed write of its help; everything else ends as a closed pipe ends a tool.
        expected = 0 if "--help" in argv else EXIT_BROKEN_PIPE
        assert (result.returncode, result.stderr) == (expected, ""), argv
    assert store.get(holder.id).status is Status.INTERRUPTED, "the release was done; only its report was lost"


def test_an_environment_value_out_of_range_is_one_line(
    state_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTEST_RUNS_LEASE", "1e300")
    code, _, err = run_cli(capsys, "machines")
    assert code == 2
    assert err == "pytest-runs: PYTEST_RUNS_LEASE must be at most 315360000 seconds (ten years), not '1e300'\n"


def test_the_command_does_not_import_pytest() -> None:
    code = (
        "import sys, pytest_runs.cli\n"
        "sys.exit(sorted(m for m in sys.modules if m.split('.')[0] in ('pytest', '_pytest')))"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stderr == "[]\n"


def test_reserve_a_folder_whose_path_is_not_utf8(
    state_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = Path(os.fsdecode(bytes(tmp_path) + b"/caf\xe9"))
    folder.mkdir()
    (folder / "test_it.py").write_text("def test_it(): pass\n")
    data = json_out(capsys, "reserve", "--machine", "rig-1", "--test-dir", str(folder))
    assert data["test_dir"] == str(folder)
    assert Store(state_dir).get(data["id"]).test_dir == str(folder)


@pytest.mark.parametrize("duration", ["99999999999d", "999999d"])
def test_a_duration_too_long_is_a_usage_error(
    state_dir: Path, capsys: pytest.CaptureFixture[str], duration: str
) -> None:
    code, _, err = run_cli(capsys, "prune", "--older-than", duration, "--dry-run")
    assert code == 2
    assert f"duration '{duration}' is longer than 100 years" in err and err.count("\n") == 1
