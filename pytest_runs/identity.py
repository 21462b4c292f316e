"""Which folder identifies a session's tests, and which of its files the hash leaves out.

The rule (the same in the plugin and in ``pytest-runs reserve``):

1. The **test folder** is the folder of pytest's ini file when there is one; else the
   deepest folder holding every positional argument pytest collects (a file counts as
   its folder, a ``::node::id`` suffix is dropped, a path that does not exist is left
   out); else the folder pytest was invoked from. It is always absolute with symlinks
   resolved.
2. Its ``runs_hash_ignore`` patterns come from **the folder's own ini file** (the one
   pytest would pick among the files in that very folder), never from an ini file
   elsewhere.

Why not pytest's rootdir: pytest settles its rootdir and ini file before it knows the
plugin's options, so in ``--runs-state-dir STATE`` (two words) it takes ``STATE`` for a
test path, and when ``STATE`` exists it looks for the ini file above ``STATE`` instead of
above the tests. ``config.rootpath`` and ``config.inipath`` then depend on the spelling of
an option and on whether the store exists yet. ``config.args`` does not: pytest fills it
after parsing every option. :func:`locate_ini_file` therefore finds the ini file again
from ``config.args``, the way pytest does, and :func:`derive_test_folder` takes it from
there. Only an ini file given with ``-c``/``--config-file`` is taken as pytest reports it.

This module uses the standard library only (the command line uses it without pytest).
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

__all__ = [
    "HASH_IGNORE_KEY",
    "INI_FILE_NAMES",
    "derive_test_folder",
    "find_ini_file",
    "locate_ini_file",
    "read_hash_ignore",
]

#: The ini key holding extra glob patterns left out of the hash.
HASH_IGNORE_KEY = "runs_hash_ignore"

#: The file names pytest looks for in a folder, in its order of precedence (pytest 9).
INI_FILE_NAMES: tuple[str, ...] = (
    "pytest.toml",
    ".pytest.toml",
    "pytest.ini",
    ".pytest.ini",
    "pyproject.toml",
    "tox.ini",
    "setup.cfg",
)

# (mode, settings) of a file's pytest section. Mode "ini": values are strings, or lists from
# [tool.pytest.ini_options]; mode "toml": native TOML types ([pytest] in pytest.toml, [tool.pytest]).
_Section = tuple[str, Mapping[str, object]]


def derive_test_folder(inipath: Path | None, args: Sequence[str], invocation_dir: Path) -> Path:
    """The folder whose content identifies the tests, absolute with symlinks resolved.

    - ``inipath`` (resolved against ``invocation_dir``) names a regular file: its folder.
    - Else the common ancestor folder of the ``args`` that exist: each is a path relative
      to ``invocation_dir`` (or absolute), with any ``::node::id`` suffix dropped; a file
      counts as its folder; options (``-x``) and paths that do not exist are left out.
    - Else ``invocation_dir``.

    The plugin passes ``config.args`` (pytest's collected arguments: the command line's
    paths, else the ``testpaths`` it globbed, else the invocation dir) and, for
    ``inipath``, ``config.inipath`` only when the ini file came from ``-c``; otherwise
    :func:`locate_ini_file` of the same arguments. The result never depends on how an
    option was spelled nor on folders that option values name. Touches the file system
    only to test existence and resolve symlinks; never raises for missing paths.
    """
    base = Path(os.path.abspath(invocation_dir))
    if inipath is not None:
        ini = base / inipath
        if ini.is_file():
            return ini.parent.resolve()
    folders = list(_argument_folders(args, base))
    if folders:
        return Path(os.path.commonpath(folders)).resolve()
    return base.resolve()


def locate_ini_file(args: Sequence[str], invocation_dir: Path) -> Path | None:
    """The ini file pytest would read for the collected ``args``, or ``None``.

    pytest's own search, fed with the collected arguments rather than the raw command
    line: starting at the common ancestor folder of the ``args`` (as in
    :func:`derive_test_folder`; ``invocation_dir`` when none exists) and going up, the
    first folder where :func:`find_ini_file` finds a file wins; when no folder has one,
    the nearest ``pyproject.toml`` (even without a pytest table) is the ini file, as in
    pytest. The path is absolute but not symlink-resolved. Unlike pytest, there is no
    second search from each argument when the common one finds nothing. Raises
    :class:`ValueError` for a malformed candidate met on the way, as pytest would fail.
    """
    base = Path(os.path.abspath(invocation_dir))
    folders = list(_argument_folders(args, base))
    ancestor = Path(os.path.commonpath(folders)) if folders else base
    first_pyproject: Path | None = None
    for folder in (ancestor, *ancestor.parents):
        found = find_ini_file(folder)
        if found is not None:
            return found
        if first_pyproject is None and _is_file(folder / "pyproject.toml"):
            first_pyproject = folder / "pyproject.toml"
    return first_pyproject


def find_ini_file(folder: Path) -> Path | None:
    """The ini file pytest would pick among the files in ``folder`` itself, or ``None``.

    pytest's names and order: ``pytest.toml``, ``.pytest.toml``, ``pytest.ini``,
    ``.pytest.ini`` (each counts even without a pytest section), ``pyproject.toml`` (only
    with a ``[tool.pytest]`` or ``[tool.pytest.ini_options]`` table), ``tox.ini`` (only
    with ``[pytest]``), ``setup.cfg`` (only with ``[tool:pytest]``). Parent folders are
    not searched. Raises :class:`ValueError`, one line naming the file, for a candidate
    that cannot be read or parsed before the winner is found.
    """
    for name in INI_FILE_NAMES:
        path = folder / name
        if _is_file(path) and _pytest_section(path) is not None:
            return path
    return None


def read_hash_ignore(folder: Path) -> list[str]:
    """The ``runs_hash_ignore`` patterns of ``folder``'s own ini file; ``[]`` without one.

    The file is the one :func:`find_ini_file` picks. Values are read as pytest reads a
    ``linelist`` option: a string is split into lines, each stripped, empty lines
    dropped; a TOML list of strings is taken as it is. In pytest's native TOML mode
    (``pytest.toml``, ``[tool.pytest]``) the value must be a list, as pytest requires.
    Raises :class:`ValueError`, one line naming the file and the problem, for a file that
    cannot be read or parsed or a value of the wrong type.
    """
    path = find_ini_file(folder)
    if path is None:
        return []
    section = _pytest_section(path)
    assert section is not None
    mode, values = section
    if HASH_IGNORE_KEY not in values:
        return []
    return _linelist(path, mode, values[HASH_IGNORE_KEY])


# -- finding the arguments' folders ---------------------------------------------------------


def _argument_folders(args: Sequence[str], base: Path) -> Iterator[str]:
    """Absolute, normalised folders of the ``args`` that exist (a file gives its folder)."""
    for arg in args:
        if arg.startswith("-"):
            continue
        path = os.path.abspath(os.path.join(base, arg.partition("::")[0]))
        try:
            if os.path.isdir(path):
                yield path
            elif os.path.exists(path):
                yield os.path.dirname(path)
        except (OSError, ValueError):  # a name too long, or with a NUL: not a path pytest collects
            continue


# -- reading ini files ----------------------------------------------------------------------


def _pytest_section(path: Path) -> _Section | None:
    """(mode, values) of the pytest configuration in ``path``, or ``None`` when it has none."""
    loader = _LOADERS[path.name]
    return loader(path)


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError as error:
        raise ValueError(f"{path}: cannot read: {error.strerror or error}") from None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise ValueError(f"{path}: cannot read: {reason}") from None


def _load_pytest_ini(path: Path) -> _Section | None:
    sections = _parse_ini(path)
    return "ini", sections.get("pytest", {})


def _load_tox_ini(path: Path) -> _Section | None:
    sections = _parse_ini(path)
    return ("ini", sections["pytest"]) if "pytest" in sections else None


def _load_setup_cfg(path: Path) -> _Section | None:
    sections = _parse_ini(path)
    if "tool:pytest" in sections:
        return "ini", sections["tool:pytest"]
    if "pytest" in sections:
        raise ValueError(f"{path}: a [pytest] section in setup.cfg is not supported, use [tool:pytest]")
    return None


def _load_pytest_toml(path: Path) -> _Section | None:
    document = _parse_toml(path)
    if "pytest" in document:
        return "toml", _table(path, document["pytest"], "[pytest]")
    top_level = [key for key, value in document.items() if not isinstance(value, dict)]
    if top_level:
        raise ValueError(
            f"{path}: pytest configuration must be under a [pytest] table (found top-level options: "
            f"{', '.join(top_level)})"
        )
    return "toml", {}


def _load_pyproject_toml(path: Path) -> _Section | None:
    document = _parse_toml(path)
    tool = _table(path, document.get("tool", {}), "[tool]")
    tool_pytest = _table(path, tool.get("pytest", {}), "[tool.pytest]")
    native = {key: value for key, value in tool_pytest.items() if key != "ini_options"}
    ini_options = tool_pytest.get("ini_options")
    if native and ini_options is not None:
        raise ValueError(f"{path}: cannot use both [tool.pytest] and [tool.pytest.ini_options]")
    if native:
        return "toml", native
    if ini_options is not None:
        return "ini", _table(path, ini_options, "[tool.pytest.ini_options]")
    return None


_LOADERS: dict[str, Callable[[Path], _Section | None]] = {
    "pytest.toml": _load_pytest_toml,
    ".pytest.toml": _load_pytest_toml,
    "pytest.ini": _load_pytest_ini,
    ".pytest.ini": _load_pytest_ini,
    "pyproject.toml": _load_pyproject_toml,
    "tox.ini": _load_tox_ini,
    "setup.cfg": _load_setup_cfg,
}
assert tuple(_LOADERS) == INI_FILE_NAMES


def _table(path: Path, value: object, name: str) -> Mapping[str, object]:
    if not isinstance(value, dict):
        raise ValueError(f"{path}: {name} must be a table, not {type(value).__name__}")
    return value


def _parse_toml(path: Path) -> dict[str, object]:
    try:
        return tomllib.loads(_read_text(path))
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"{path}: {_one_line(str(error))}") from None


def _parse_ini(path: Path) -> dict[str, dict[str, str]]:
    """Sections of an ini file, parsed as pytest's parser (iniconfig) does.

    Full-line comments start with ``#`` or ``;``; a line starting with whitespace
    continues the previous value; ``name = value`` or ``name: value``; no inline comments.
    """
    sections: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    last: tuple[dict[str, str], str] | None = None
    for number, raw in enumerate(_read_text(path).removeprefix("\ufeff").splitlines(), start=1):
        stripped = raw.lstrip()
        line = "" if stripped[:1] in ("#", ";") else raw.rstrip()
        if not line:
            continue
        if line[0] == "[":
            header = re.split("[#;]", line, maxsplit=1)[0].rstrip()
            if header.endswith("]"):
                name = header[1:-1]
                if not name:
                    raise _ini_error(path, number, "empty section name")
                if name in sections:
                    raise _ini_error(path, number, f"duplicate section {name!r}")
                current = sections[name] = {}
                last = None
                continue
            continuation: str | None = line.strip()  # iniconfig reads "[x" as a continuation
        elif line[0].isspace():
            continuation = line.strip()
        else:
            continuation = None
        if continuation is not None:
            if last is None:
                raise _ini_error(path, number, "unexpected value continuation")
            values, key = last
            values[key] = f"{values[key]}\n{continuation}" if values[key] else continuation
            continue
        name, separator, value = line.partition("=")
        if not separator or ":" in name:
            name, separator, value = line.partition(":")
            if not separator:
                raise _ini_error(path, number, f"unexpected line: {line!r}")
        if current is None:
            raise _ini_error(path, number, "no section header defined")
        key = name.strip()
        if key in current:
            raise _ini_error(path, number, f"duplicate name {key!r}")
        current[key] = value.strip()
        last = (current, key)
    return sections


def _linelist(path: Path, mode: str, value: object) -> list[str]:
    """``value`` as pytest's ``linelist`` ini type reads it in ``mode``."""
    if mode == "ini" and not isinstance(value, list):
        # [tool.pytest.ini_options] turns scalars into strings, as pytest does.
        return [line for raw in str(value).split("\n") if (line := raw.strip())]
    if not isinstance(value, list):
        raise ValueError(f"{path}: {HASH_IGNORE_KEY} must be a list of strings, not {type(value).__name__}")
    for index, item in enumerate(value):
        if not isinstance(item, str):
            raise ValueError(
                f"{path}: {HASH_IGNORE_KEY} must be a list of strings, but item {index} is {type(item).__name__}"
            )
    return list(value)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _ini_error(path: Path, number: int, message: str) -> ValueError:
    return ValueError(f"{path}:{number}: {message}")
