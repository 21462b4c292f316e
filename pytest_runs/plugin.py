"""The pytest plugin: a session run with ``--runs-machine`` is a tracked run.

Without a machine (option, environment or ini) the plugin registers its options
and fixtures and nothing else, and does not import the store. With
one, the controlling process (never an xdist worker) registers a
:class:`~pytest_runs.session.TrackedSession`, which owns the session's life.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from .keys import RUN_KEY, SKIP_KEY, WORKER_RUN, WORKER_SKIP
from .model import Run
from .options import EXIT_BUSY, EXIT_MACHINE_LOST, OPTIONS, RUN_ID_ENV, Lookup, Settings, lookup_for

__all__ = ["EXIT_BUSY", "EXIT_MACHINE_LOST", "runs_artifacts_dir", "runs_run"]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("runs", "pytest-runs: track the session as a run on a target machine")
    for name, option in OPTIONS.items():
        where = " ".join(
            part for part in (option.env and f"[env {option.env}]", option.ini and f"[ini {option.ini}]") if part
        )
        group.addoption(
            option.flag,
            dest=f"runs_{name}",
            default=None,
            metavar=option.metavar,
            help=f"{option.help} {where}".strip(),
        )
        if option.ini:
            parser.addini(option.ini, option.help, default=None)
    parser.addini(
        "runs_pools",
        "named pools of machines, one per line: NAME: MACHINE MACHINE... (taken with --runs-pool)",
        type="linelist",
        default=[],
    )
    parser.addini(
        "runs_hash_ignore",
        "glob patterns (names or relative paths) left out of the test folder's hash",
        type="linelist",
        default=[],
    )


def _lookup(config: pytest.Config) -> Lookup:
    return lookup_for(config.getoption, config.getini, os.environ)


def pytest_configure(config: pytest.Config) -> None:
    workerinput: dict[str, Any] | None = getattr(config, "workerinput", None)
    if workerinput is not None:
        # An xdist worker: the controller owns the run and hands it over.
        _tie_worker_to_its_session(workerinput)
        if (record := workerinput.get(WORKER_RUN)) is not None:
            config.stash[RUN_KEY] = Run.from_dict(record)
        if (reason := workerinput.get(WORKER_SKIP)) is not None:
            config.stash[SKIP_KEY] = reason
        return
    lookup = _lookup(config)
    machine = lookup("machine") or lookup("pool")
    if machine is None or _uses_no_machine(config) or _inside_a_tracked_session(machine[1]):
        return
    from .identity import derive_test_folder, find_ini_file, locate_ini_file, read_hash_ignore

    invocation_dir = config.invocation_params.dir
    try:
        settings = Settings.read(lookup, invocation_dir, config.getini("runs_pools"))
        given = lookup("test_dir")
        if given is not None:
            test_dir = (invocation_dir / Path(given[0]).expanduser()).resolve()
            if not test_dir.is_dir():
                raise ValueError(f"{given[1]} {test_dir} is not a folder")
        else:
            # Not config.inipath nor rootpath: pytest finds those before it knows plugin options,
            # so `--runs-state-dir STATE` (two words) can make it search from STATE.
            explicit = config.inipath if config.getoption("inifilename") else None
            ini = explicit or locate_ini_file(config.args, invocation_dir)
            test_dir = derive_test_folder(ini, config.args, invocation_dir)
        # The test folder's own ini file decides what its hash leaves out, as for `pytest-runs reserve`.
        if find_ini_file(test_dir) is not None:
            hash_ignore = tuple(read_hash_ignore(test_dir))
        elif config.inipath is not None and config.inipath.parent == test_dir:
            hash_ignore = tuple(config.getini("runs_hash_ignore"))  # an ini file given with -c
        else:
            hash_ignore = ()
    except ValueError as error:
        raise pytest.UsageError(f"pytest-runs: {error}") from None
    from .session import TrackedSession

    config.pluginmanager.register(TrackedSession(config, settings, test_dir, hash_ignore), "pytest-runs-tracker")


def _tie_worker_to_its_session(workerinput: dict[str, Any]) -> None:
    """Before this worker runs any test: it registers with the session's keeper (on the session's host)."""
    keeper = workerinput.get("pytest_runs_keeper")
    if keeper is None:
        return
    from .owner import boot_id

    if keeper.get("boot_id") != boot_id():
        return  # a worker on another host (xdist --tx ssh=...): only the session's fence ties it
    from .keeper_client import register_worker

    if (why := register_worker(keeper)) is not None:
        raise pytest.UsageError(f"pytest-runs: this xdist worker runs no test: {why}")


# Sessions that only list or plan, and run no test and no fixture: they take no machine.
_NO_MACHINE_OPTIONS = (
    "collectonly",
    "showfixtures",
    "show_fixtures_per_test",
    "markers",
    "setupplan",
    "help",
    "version",
)


def _inside_a_tracked_session(machine_source: str) -> bool:
    """A pytest run by a test of a tracked session, with the machine only inherited from its environment.

    The outer session holds the machine; the inner one is part of its run, not another
    session to wait for (it would wait on its own parent). A machine given explicitly on
    the inner command line or in its ini file is tracked as usual.
    """
    inherited = (OPTIONS["machine"].env, OPTIONS["pool"].env)
    return machine_source in inherited and bool(os.environ.get(RUN_ID_ENV))


def _uses_no_machine(config: pytest.Config) -> bool:
    return any(getattr(config.option, name, False) for name in _NO_MACHINE_OPTIONS)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = config.stash.get(SKIP_KEY, None)
    if reason is not None:
        marker = pytest.mark.skip(reason=reason)
        for item in items:
            item.add_marker(marker)


@pytest.fixture(scope="session")
def runs_run(pytestconfig: pytest.Config) -> Run | None:
    """The run this session is tracked as, or ``None`` when tracking is off."""
    return pytestconfig.stash.get(RUN_KEY, None)


@pytest.fixture(scope="session")
def runs_artifacts_dir(runs_run: Run | None) -> Path | None:
    """The folder to write this run's artifacts into, or ``None`` when tracking is off."""
    if runs_run is None or not runs_run.artifacts_path:
        return None
    path = Path(runs_run.artifacts_path)
    path.mkdir(parents=True, exist_ok=True)
    return path
