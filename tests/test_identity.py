"""The test identity: which folder is hashed, which ini file it reads, and stores kept out of it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from pytest_runs import Run, Store, hashing
from pytest_runs.hashing import HashError, hash_test_dir
from pytest_runs.identity import (
    INI_FILE_NAMES,
    derive_test_folder,
    find_ini_file,
    locate_ini_file,
    read_hash_ignore,
)

PATTERNS = ["out", "*.log", "data/big/*"]


def write(path: Path, text: str | bytes = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def ini_text(kind: str, patterns: Sequence[str]) -> str:
    """A config file of ``kind`` (a file name, or ``pyproject.toml:native``) setting ``runs_hash_ignore``."""
    lines = "".join(f"    {p}\n" for p in patterns)
    as_toml = json.dumps(list(patterns))
    texts = {
        "pytest.ini": f"[pytest]\nruns_hash_ignore =\n{lines}",
        ".pytest.ini": f"[pytest]\nruns_hash_ignore =\n{lines}",
        "tox.ini": f"[tox]\nenvlist = py311\n\n[pytest]\nruns_hash_ignore =\n{lines}",
        "setup.cfg": f"[metadata]\nname = x\n\n[tool:pytest]\nruns_hash_ignore =\n{lines}",
        "pytest.toml": f"[pytest]\nruns_hash_ignore = {as_toml}\n",
        ".pytest.toml": f"[pytest]\nruns_hash_ignore = {as_toml}\n",
        "pyproject.toml": f'[project]\nname = "x"\n\n[tool.pytest.ini_options]\nruns_hash_ignore = {as_toml}\n',
        "pyproject.toml:native": f'[project]\nname = "x"\n\n[tool.pytest]\nruns_hash_ignore = {as_toml}\n',
    }
    return texts[kind]


KINDS = ["pytest.toml", ".pytest.toml", "pytest.ini", ".pytest.ini", "pyproject.toml", "pyproject.toml:native"]
KINDS += ["tox.ini", "setup.cfg"]


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without any pytest-runs settings (or extra pytest options) of the caller."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_RUNS_") and k != "PYTEST_ADDOPTS"}
    env.update(extra)
    return env


# -- find_ini_file and read_hash_ignore -------------------------------------------------------


def test_pytest_9_looks_for_these_files_in_this_order() -> None:
    findpaths = pytest.importorskip("_pytest.config.findpaths")
    names = getattr(findpaths, "CONFIG_LOADERS_BY_NAME", None)
    if names is None:
        pytest.skip("this pytest has no table of config file names")
    assert tuple(names) == INI_FILE_NAMES


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_of_ini_file_is_found_and_read(tmp_path: Path, kind: str) -> None:
    path = write(tmp_path / kind.partition(":")[0], ini_text(kind, PATTERNS))
    assert find_ini_file(tmp_path) == path
    assert read_hash_ignore(tmp_path) == PATTERNS


@pytest.mark.parametrize("kind", KINDS)
def test_read_hash_ignore_agrees_with_pytest(pytester: pytest.Pytester, kind: str) -> None:
    write(pytester.path / kind.partition(":")[0], ini_text(kind, [*PATTERNS, "sub/x y.txt"]))
    config = pytester.parseconfig()
    assert config.inipath == find_ini_file(pytester.path)
    assert config.getini("runs_hash_ignore") == read_hash_ignore(pytester.path) == [*PATTERNS, "sub/x y.txt"]


def test_precedence_is_pytests(tmp_path: Path) -> None:
    for name in INI_FILE_NAMES:
        write(tmp_path / name, ini_text(name, [name]))
    for name in INI_FILE_NAMES:
        assert find_ini_file(tmp_path) == tmp_path / name
        assert read_hash_ignore(tmp_path) == [name]
        (tmp_path / name).unlink()
    assert find_ini_file(tmp_path) is None
    assert read_hash_ignore(tmp_path) == []


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("pytest.ini", ""),
        ("pytest.ini", "[other]\nruns_hash_ignore = nope\n"),
        (".pytest.ini", "# nothing\n"),
        ("pytest.toml", ""),
        (".pytest.toml", "[other]\nx = 1\n"),
    ],
)
def test_dedicated_files_win_even_without_a_pytest_section(tmp_path: Path, name: str, text: str) -> None:
    write(tmp_path / name, text)
    write(tmp_path / "tox.ini", ini_text("tox.ini", ["from-tox"]))
    assert find_ini_file(tmp_path) == tmp_path / name
    assert read_hash_ignore(tmp_path) == []


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("pyproject.toml", '[project]\nname = "x"\n[tool.ruff]\nline-length = 1\n'),
        ("pyproject.toml", "[tool.pytest]\n"),
        ("tox.ini", "[tox]\nenvlist = py311\n[testenv]\ncommands = pytest\n"),
        ("setup.cfg", "[metadata]\nname = x\n"),
    ],
)
def test_shared_files_count_only_with_a_pytest_table(tmp_path: Path, name: str, text: str) -> None:
    write(tmp_path / name, text)
    assert find_ini_file(tmp_path) is None
    assert read_hash_ignore(tmp_path) == []
    if name != "setup.cfg":
        write(tmp_path / "setup.cfg", ini_text("setup.cfg", ["from-setup-cfg"]))
        assert find_ini_file(tmp_path) == tmp_path / "setup.cfg"
        assert read_hash_ignore(tmp_path) == ["from-setup-cfg"]


def test_an_empty_ini_options_table_counts(tmp_path: Path) -> None:
    write(tmp_path / "pyproject.toml", "[tool.pytest.ini_options]\n")
    write(tmp_path / "tox.ini", ini_text("tox.ini", ["from-tox"]))
    assert find_ini_file(tmp_path) == tmp_path / "pyproject.toml"
    assert read_hash_ignore(tmp_path) == []


def test_parent_folders_are_not_searched(tmp_path: Path) -> None:
    write(tmp_path / "pytest.ini", ini_text("pytest.ini", PATTERNS))
    (tmp_path / "sub").mkdir()
    assert find_ini_file(tmp_path / "sub") is None
    assert read_hash_ignore(tmp_path / "sub") == []


def test_missing_key_reads_as_no_patterns(tmp_path: Path) -> None:
    write(tmp_path / "pytest.ini", "[pytest]\naddopts = -ra\n")
    assert read_hash_ignore(tmp_path) == []


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        # ini files: lines stripped, empty ones dropped, comments are whole lines only
        ("pytest.ini", "[pytest]\nruns_hash_ignore = out\n", ["out"]),
        ("pytest.ini", "[pytest]\nruns_hash_ignore: out\n", ["out"]),
        ("pytest.ini", "[pytest]\nruns_hash_ignore = first\n  second\n\n    third  \n", ["first", "second", "third"]),
        ("pytest.ini", "[pytest]\nruns_hash_ignore =\n# gone\n  a\n  ; gone too\n  b\nx = y\n", ["a", "b"]),
        ("pytest.ini", "[pytest]\nruns_hash_ignore = a # not a comment\n", ["a # not a comment"]),
        ("pytest.ini", "\ufeff[pytest]  # header comment\nruns_hash_ignore = a\n", ["a"]),
        ("pytest.ini", "[pytest]\nruns_hash_ignore = a=b\n", ["a=b"]),
        ("pytest.ini", "[pytest]\nruns_hash_ignore =\n", []),
        ("setup.cfg", "[pytest-other]\n[tool:pytest]\nruns_hash_ignore = a\n  b\n", ["a", "b"]),
        # [tool.pytest.ini_options]: a list as it is, a string split into lines
        ("pyproject.toml", '[tool.pytest.ini_options]\nruns_hash_ignore = ["a", " b "]\n', ["a", " b "]),
        ("pyproject.toml", '[tool.pytest.ini_options]\nruns_hash_ignore = """\na\n  b\n\n"""\n', ["a", "b"]),
        ("pyproject.toml", '[tool.pytest.ini_options]\nruns_hash_ignore = "out"\n', ["out"]),
        ("pyproject.toml", "[tool.pytest.ini_options]\nruns_hash_ignore = []\n", []),
        # native TOML: a list
        ("pytest.toml", '[pytest]\nruns_hash_ignore = ["a", "b/*"]\n', ["a", "b/*"]),
        ("pyproject.toml", '[tool.pytest]\naddopts = ["-ra"]\nruns_hash_ignore = ["a"]\n', ["a"]),
    ],
)
def test_values_are_read_as_pytest_reads_a_linelist(
    pytester: pytest.Pytester, name: str, text: str, expected: list[str]
) -> None:
    write(pytester.path / name, text)
    assert read_hash_ignore(pytester.path) == expected
    assert pytester.parseconfig().getini("runs_hash_ignore") == expected


MALFORMED = [
    ("pytest.ini", "[pytest]\nthis is not a setting\n", r"pytest\.ini:2: unexpected line"),
    ("pytest.ini", "runs_hash_ignore = x\n", r"pytest\.ini:1: no section header defined"),
    ("pytest.ini", "  continued\n", r"pytest\.ini:1: unexpected value continuation"),
    ("pytest.ini", "[pytest]\na = 1\na = 2\n", r"pytest\.ini:3: duplicate name 'a'"),
    ("pytest.ini", "[]\n", r"pytest\.ini:1: empty section name"),
    ("tox.ini", "[pytest]\n[pytest]\n", r"tox\.ini:2: duplicate section 'pytest'"),
    ("setup.cfg", "[pytest]\nruns_hash_ignore = a\n", r"setup\.cfg: a \[pytest\] section .* use \[tool:pytest\]"),
    ("pytest.ini", b"[pytest]\nruns_hash_ignore = \xff\n", r"pytest\.ini: cannot read: .*utf-8"),
    ("pyproject.toml", "[tool.pytest.ini_options\n", r"pyproject\.toml: .*line 1"),
    ("pytest.toml", "[pytest]\nruns_hash_ignore = [\n", r"pytest\.toml: "),
    (
        "pytest.toml",
        'runs_hash_ignore = ["a"]\n',
        r"pytest\.toml: .*must be under a \[pytest\] table.*runs_hash_ignore",
    ),
    (
        "pyproject.toml",
        '[tool.pytest]\naddopts = ["-ra"]\n[tool.pytest.ini_options]\nruns_hash_ignore = ["a"]\n',
        r"pyproject\.toml: cannot use both \[tool\.pytest\] and \[tool\.pytest\.ini_options\]",
    ),
    ("pytest.toml", '[pytest]\nruns_hash_ignore = "out"\n', r"pytest\.toml: runs_hash_ignore must be a list .*str"),
    (
        "pyproject.toml",
        '[tool.pytest]\nruns_hash_ignore = "out"\n',
        r"pyproject\.toml: runs_hash_ignore must be a list",
    ),
    (
        "pyproject.toml",
        '[tool.pytest.ini_options]\nruns_hash_ignore = ["a", 1]\n',
        r"pyproject\.toml: runs_hash_ignore must be a list of strings, but item 1 is int",
    ),
]


@pytest.mark.parametrize(("name", "text", "match"), MALFORMED)
def test_a_malformed_file_is_one_line_naming_it(tmp_path: Path, name: str, text: str | bytes, match: str) -> None:
    path = write(tmp_path / name, text)
    with pytest.raises(ValueError, match=match) as caught:
        read_hash_ignore(tmp_path)
    message = str(caught.value)
    assert message.startswith(str(path))
    assert "\n" not in message


# pytest takes a list from [tool.pytest.ini_options] as it is, whatever its items.
PYTEST_REFUSES_TOO = [case for case in MALFORMED if "item 1 is int" not in case[2]]


@pytest.mark.parametrize(("name", "text", "match"), PYTEST_REFUSES_TOO)
def test_pytest_refuses_the_malformed_files_too(
    pytester: pytest.Pytester, name: str, text: str | bytes, match: str
) -> None:
    write(pytester.path / name, text)
    with pytest.raises((pytest.UsageError, pytest.fail.Exception, UnicodeDecodeError)):
        pytester.parseconfig().getini("runs_hash_ignore")


def test_a_malformed_file_after_the_winner_is_not_read(tmp_path: Path) -> None:
    write(tmp_path / "pytest.ini", ini_text("pytest.ini", ["a"]))
    write(tmp_path / "pyproject.toml", "this is [ not toml")
    assert read_hash_ignore(tmp_path) == ["a"]


# -- derive_test_folder and locate_ini_file -----------------------------------------------------


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    write(root / "tests" / "unit" / "test_u.py", "def test_u(): pass\n")
    write(root / "tests" / "func" / "test_f.py", "def test_f(): pass\n")
    write(root / "tests" / "test[1].py", "def test_b(): pass\n")
    write(root / "other" / "test_o.py", "def test_o(): pass\n")
    return root


def test_the_ini_files_folder_comes_first(project: Path) -> None:
    ini = write(project / "pytest.ini", "[pytest]\n")
    assert derive_test_folder(ini, ["tests/unit"], project / "tests") == project
    assert derive_test_folder(Path("../pytest.ini"), ["unit"], project / "tests") == project


@pytest.mark.parametrize("inipath", [Path("/dev/null"), Path("missing.ini"), Path("tests")])
def test_an_ini_path_that_is_no_file_is_passed_over(project: Path, inipath: Path) -> None:
    assert derive_test_folder(inipath, ["tests/unit"], project) == project / "tests" / "unit"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["tests"], "tests"),
        (["tests/unit/test_u.py"], "tests/unit"),
        (["tests/unit/test_u.py::test_u"], "tests/unit"),
        (["tests/unit/test_u.py::TestX::test_y[a::b-1]"], "tests/unit"),
        (["tests/test[1].py"], "tests"),
        (["tests/unit", "tests/func/test_f.py::test_f"], "tests"),
        (["tests/unit", "other"], "."),
        (["tests/unit", "tests/unit/test_u.py"], "tests/unit"),
        (["missing", "tests/func"], "tests/func"),
        (["tests/missing.py::test_x", "tests/func/test_f.py"], "tests/func"),
        (["-x", "tests/unit"], "tests/unit"),
        (["tests/./unit/../func"], "tests/func"),
        (["missing"], "."),
        ([], "."),
    ],
)
def test_else_the_common_folder_of_the_collected_arguments(project: Path, args: list[str], expected: str) -> None:
    assert derive_test_folder(None, args, project) == (project / expected).resolve()


def test_arguments_may_be_absolute_or_lead_out_of_the_invocation_dir(project: Path) -> None:
    assert derive_test_folder(None, [str(project / "other")], project / "tests") == project / "other"
    assert derive_test_folder(None, ["../other", "unit"], project / "tests") == project


def test_the_result_is_absolute_and_resolved(project: Path, tmp_path: Path) -> None:
    (tmp_path / "link").symlink_to(project, target_is_directory=True)
    assert derive_test_folder(None, ["tests"], tmp_path / "link") == project.resolve() / "tests"
    assert derive_test_folder(None, [], tmp_path / "link") == project.resolve()
    write(project / "pytest.ini", "[pytest]\n")
    assert derive_test_folder(tmp_path / "link" / "pytest.ini", [], tmp_path) == project.resolve()
    assert derive_test_folder(None, ["link/tests"], tmp_path).is_absolute()


def test_locate_ini_file_searches_up_from_the_collected_arguments(project: Path) -> None:
    assert locate_ini_file(["tests/unit"], project) is None
    write(project / "pyproject.toml", '[project]\nname = "x"\n')
    # A pyproject.toml without a pytest table is the ini file only when no folder has a real one.
    assert locate_ini_file(["tests/unit"], project) == project / "pyproject.toml"
    write(project / "tests" / "tox.ini", "[tox]\n")
    assert locate_ini_file(["tests/unit"], project) == project / "pyproject.toml"
    write(project.parent / "pytest.ini", "[pytest]\n")
    assert locate_ini_file(["tests/unit"], project) == project.parent / "pytest.ini"
    write(project / "setup.cfg", "[tool:pytest]\n")
    assert locate_ini_file(["tests/unit", "tests/func"], project) == project / "setup.cfg"
    assert locate_ini_file([], project / "tests" / "unit") == project / "setup.cfg"
    write(project / "tests" / "unit" / "pytest.toml", "")
    assert locate_ini_file(["tests/unit/test_u.py::test_u"], project) == project / "tests" / "unit" / "pytest.toml"
    assert locate_ini_file(["tests/unit", "other"], project) == project / "setup.cfg"


def test_locate_ini_file_agrees_with_pytest(pytester: pytest.Pytester) -> None:
    write(pytester.path / "pytest.ini", "[pytest]\n")
    write(pytester.path / "tests" / "unit" / "test_u.py", "def test_u(): pass\n")
    write(pytester.path / "tests" / "tox.ini", "[pytest]\n")
    for args in (["tests/unit"], ["tests/unit/test_u.py::test_u"], ["."], ["tests", "."]):
        config = pytester.parseconfig(*args)
        assert locate_ini_file(config.args, config.invocation_params.dir) == config.inipath, args


# -- other stores inside the test folder ------------------------------------------------------------


def real_store(path: Path) -> Path:
    store = Store(path)
    store.prepare_atomic("rig-1", "f" * 64, lambda: Run(test_dir="/elsewhere"))
    return path


def tree(root: Path) -> Path:
    write(root / "test_a.py", "def test_a(): pass\n")
    write(root / "sub" / "data.txt", "x")
    return root


@pytest.mark.parametrize(
    "make_store",
    [
        real_store,
        lambda p: write(p / "runs.lock").parent,
        lambda p: write(p / "runs.json", '{"format": "pytest-runs-state", "version": 1, "runs": [\n').parent,
        lambda p: write(p / "runs.json", '\n{\n  "format" : "pytest-runs-state",\n  "version": 9\n}\n').parent,
    ],
    ids=["real", "lock-only", "state-only", "indented-state"],
)
def test_another_store_inside_is_refused_in_one_line(tmp_path: Path, make_store: Callable[[Path], Path]) -> None:
    root = tree(tmp_path / "t")
    own = real_store(root / "state")
    other = make_store(root / "sub" / "old-state")
    with pytest.raises(HashError) as caught:
        hash_test_dir(root, exclude=[own])
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"test dir {root} contains another pytest-runs store, {other};")
    assert "--runs-test-dir" in message and "'sub/old-state' to runs_hash_ignore" in message


def test_the_own_store_stays_excluded(tmp_path: Path) -> None:
    root = tree(tmp_path / "t")
    before = hash_test_dir(root)
    own = real_store(root / "state")
    write(own / "runs" / "r1" / "log.jsonl", "{}\n")
    assert hash_test_dir(root, exclude=[own]) == before
    assert hash_test_dir(root, exclude=[tmp_path / "t" / "." / "state"]) == before


def test_an_ignored_store_is_not_looked_at(tmp_path: Path) -> None:
    root = tree(tmp_path / "t")
    before = hash_test_dir(root)
    real_store(root / "stores" / "a")
    real_store(root / ".venv" / "state")
    assert hash_test_dir(root, ignore=["stores"]) == before


def test_files_that_only_look_like_a_store_are_hashed(tmp_path: Path) -> None:
    root = tree(tmp_path / "t")
    write(root / "fixtures" / "runs.json", '{"format": "something-else"}')
    write(root / "fixtures2" / "runs.json", "")
    (root / "fixtures3").mkdir()
    (root / "fixtures3" / "runs.lock").mkdir()
    (root / "fixtures4").mkdir()
    (root / "fixtures4" / "runs.lock").symlink_to("nowhere")
    with_look_alikes = hash_test_dir(root)
    (root / "fixtures" / "runs.json").write_text('{"format": "something-else", "v": 2}')
    assert hash_test_dir(root) != with_look_alikes


def test_the_test_dir_itself_a_store_is_refused(tmp_path: Path) -> None:
    root = real_store(tmp_path / "state")
    for exclude in ([], [root]):
        with pytest.raises(HashError, match=rf"^test dir {root} is itself a pytest-runs store; "):
            hash_test_dir(root, exclude=exclude)


def test_each_file_is_opened_once_and_only_runs_json_is_peeked_at(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tree(tmp_path / "t")
    write(root / "sub" / "runs.json", "[]")
    opened: list[str] = []
    real_os_open = os.open

    def counting_open(path: Any, mode: str = "r", **kwargs: Any) -> Any:
        if not isinstance(path, int):  # a descriptor already counted below
            opened.append(os.path.relpath(path, root))
        return open(path, mode, **kwargs)

    def counting_os_open(path: Any, flags: int, mode: int = 0o777) -> int:
        opened.append(os.path.relpath(path, root))
        return real_os_open(path, flags, mode)

    monkeypatch.setattr(hashing, "open", counting_open, raising=False)
    monkeypatch.setattr(os, "open", counting_os_open)
    hash_test_dir(root)
    assert sorted(opened) == ["sub/data.txt", "sub/runs.json", "sub/runs.json", "test_a.py"]


# -- real pytest runs -------------------------------------------------------------------------------


class _Probe:
    """A plugin that notes what pytest decided, and the test folder derived from it."""

    def __init__(self) -> None:
        self.seen: dict[str, Any] = {}

    def pytest_configure(self, config: pytest.Config) -> None:
        inv = config.invocation_params.dir
        ini = config.inipath if config.getoption("inifilename") else locate_ini_file(config.args, inv)
        self.seen = {
            "args": config.args,
            "inipath": str(config.inipath),
            "rootpath": str(config.rootpath),
            "folder": str(derive_test_folder(ini, config.args, inv)),
        }


def probe(monkeypatch: pytest.MonkeyPatch, cwd: Path, *args: str) -> dict[str, Any]:
    """What pytest reports, and the test folder derived from it, for ``pytest ARGS`` run in ``cwd`` (in process)."""
    plugin = _Probe()
    with monkeypatch.context() as patch:
        patch.chdir(cwd)
        # Without the python plugin nothing is imported: config is all that is looked at.
        code = pytest.main(["-p", "no:cacheprovider", "-p", "no:python", "--co", "-q", *args], plugins=[plugin])
    # Nothing is collected (and a node ID is then "not found"): only what configure saw matters.
    assert code in (pytest.ExitCode.NO_TESTS_COLLECTED, pytest.ExitCode.USAGE_ERROR) and plugin.seen, code
    return plugin.seen


@pytest.fixture
def layout(tmp_path: Path) -> Path:
    """``work/project`` (pytest.ini, tests/), an existing store ``work/STATE``, siblings, and ``work/other``."""
    work = tmp_path / "work"
    write(work / "project" / "pytest.ini", "[pytest]\ntestpaths = tests\n")
    write(work / "project" / "tests" / "test_a.py", "def test_a(): pass\n")
    real_store(work / "STATE")
    write(work / "sibling" / "notes.txt", "not the tests")
    write(work / "other" / "pytest.ini", "[pytest]\n")
    (work / "other" / "state").mkdir()
    return work


@pytest.mark.parametrize(
    ("cwd", "args"),
    [
        ("project", ["--runs-state-dir", "{work}/STATE"]),
        ("project", ["--runs-state-dir={work}/STATE"]),
        ("project", ["--runs-state-dir", "../STATE"]),
        ("project", ["--runs-state-dir", "{work}/NOT-YET"]),
        ("project", ["--runs-state-dir", "{work}/other/state"]),
        ("project", ["--runs-state-dir", "{work}/project/state-inside"]),
        ("project/tests", ["--runs-state-dir", "{work}/STATE"]),
        ("project/tests", ["--runs-state-dir", "{work}/STATE", "test_a.py::test_a"]),
        ("project", ["-c", "pytest.ini", "--runs-state-dir", "{work}/STATE"]),
        ("project", ["tests", "--runs-state-dir", "{work}/STATE"]),
    ],
)
def test_the_folder_does_not_depend_on_option_spelling(
    layout: Path, monkeypatch: pytest.MonkeyPatch, cwd: str, args: list[str]
) -> None:
    (layout / "project" / "state-inside").mkdir(exist_ok=True)
    args = [a.format(work=layout) for a in args]
    seen = probe(monkeypatch, layout / cwd, *args)
    assert seen["folder"] == str((layout / "project").resolve()), seen
    state = args[args.index("--runs-state-dir") + 1] if "--runs-state-dir" in args else None
    assert state not in seen["args"], seen


def test_the_folder_without_an_ini_file_is_the_arguments_or_the_invocation_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = tmp_path / "work"
    write(work / "project" / "tests" / "test_a.py", "def test_a(): pass\n")
    real_store(work / "STATE")
    project = work / "project"
    for args in (["--runs-state-dir", str(work / "STATE")], [f"--runs-state-dir={work / 'STATE'}"]):
        assert probe(monkeypatch, project, *args)["folder"] == str(project.resolve())
        assert probe(monkeypatch, project, "tests", *args)["folder"] == str((project / "tests").resolve())


# -- the plugin and `pytest-runs reserve`, end to end ------------------------------------------------


def run_pytest(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--runs-machine=rig-1", *args]
    return subprocess.run(command, cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=120)


def runs_cli(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "pytest_runs", "--state-dir", str(state), *args]
    return subprocess.run(command, env=clean_env(), capture_output=True, text=True, timeout=120)


def listed(state: Path) -> list[dict[str, Any]]:
    done = runs_cli(state, "list", "--json")
    assert done.returncode == 0, done.stderr
    runs: list[dict[str, Any]] = json.loads(done.stdout)
    return runs


# needs the plugin to use pytest_runs.identity
@pytest.mark.parametrize(
    ("cwd", "state_at"),
    [
        pytest.param("project", "STATE", id="outside"),
        pytest.param("project", "project/STATE", id="inside"),
        pytest.param("project/tests", "STATE", id="from-a-subfolder"),
        pytest.param("project", "other/STATE", id="under-another-project"),
    ],
)
def test_wired_spelling_and_reserve_share_one_identity(tmp_path: Path, cwd: str, state_at: str) -> None:
    work = tmp_path / "work"
    project = work / "project"
    write(project / "pytest.ini", "[pytest]\n")
    write(project / "tests" / "test_a.py", "def test_a(): pass\n")
    write(work / "sibling" / "notes.txt", "not the tests")
    write(work / "other" / "pytest.ini", "[pytest]\n")
    real_store(work / "old-store")
    state = work / state_at
    state.mkdir()

    two_words = run_pytest(work / cwd, "--runs-state-dir", str(state))
    assert two_words.returncode == 0, two_words.stdout + two_words.stderr
    one_word = run_pytest(work / cwd, f"--runs-state-dir={state}")
    assert one_word.returncode == 0, one_word.stdout + one_word.stderr
    runs = listed(state)
    assert [(r["test_dir"], r["status"]) for r in runs] == [(str(project.resolve()), "completed")] * 2
    assert runs[0]["test_dir_hash"] == runs[1]["test_dir_hash"]

    reserved = runs_cli(state, "reserve", "--machine", "rig-1", "--test-dir", str(project), "--json")
    assert reserved.returncode == 0, reserved.stderr
    reservation = json.loads(reserved.stdout)
    assert reservation["test_dir_hash"] == runs[0]["test_dir_hash"]

    claimed = run_pytest(work / cwd, "--runs-state-dir", str(state))
    assert claimed.returncode == 0, claimed.stdout + claimed.stderr
    assert reservation["id"] in claimed.stdout
    after = listed(state)
    assert len(after) == 3
    assert (after[0]["id"], after[0]["status"]) == (reservation["id"], "completed")


# needs the plugin to use pytest_runs.identity (and `reserve` to read runs_hash_ignore with read_hash_ignore)
@pytest.mark.parametrize("kind", ["pytest.ini", "pyproject.toml", "pytest.toml"])
def test_wired_reserve_reads_runs_hash_ignore_from_the_folders_ini(tmp_path: Path, kind: str) -> None:
    project = tmp_path / "project"
    write(project / kind, ini_text(kind, ["out", "*.log"]))
    write(project / "test_a.py", "def test_a(): pass\n")
    write(project / "out" / "report.txt", "before")
    state = tmp_path / "STATE"

    reserved = runs_cli(state, "reserve", "--machine", "rig-1", "--test-dir", str(project), "--json")
    assert reserved.returncode == 0, reserved.stderr
    reservation = json.loads(reserved.stdout)
    write(project / "out" / "report.txt", "after: ignored")
    write(project / "session.log", "ignored too")

    claimed = run_pytest(project, "--runs-state-dir", str(state))
    assert claimed.returncode == 0, claimed.stdout + claimed.stderr
    after = listed(state)
    assert [(r["id"], r["status"]) for r in after] == [(reservation["id"], "completed")]
