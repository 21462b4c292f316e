"""The ``pytest-runs`` command: see and manage runs and machines.

It only parses, calls the store, and prints: tables for people, ``--json`` for
scripts (the run contract exactly as ``Run.to_dict()`` gives it). Exit codes:
0 done, 1 not found or refused, 2 usage error, 75 machine busy, 141 the reader of
the output went away.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shutil
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn

from .display import describe_holder, describe_unclaimed, format_ago, format_duration, held_for, owner_of
from .errors import StoreUnreachable
from .hashing import HashError, hash_test_dir
from .identity import read_hash_ignore
from .liveness import DEFAULT_LEASE, lock_path
from .model import PrepareOutcome, Run, Status, run_created_at
from .options import EXIT_BUSY, EXIT_STORE_UNREACHABLE
from .owner import Owner
from .queue import InLine
from .settings import (
    DEFAULT_LOCK_TIMEOUT,
    KEEP_ENV,
    LEASE_ENV,
    LOCK_TIMEOUT_ENV,
    STORE_ENV,
    check_machine_name,
    parse_keep,
    parse_seconds,
    resolve_state_dir,
    split_store,
)
from .sharing import user_name
from .store import MachineState, RunEnded, RunNotFound, StateError, Store, open_store

__all__ = ["main"]

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
#: 128 + SIGPIPE, as a Unix tool killed by a closed pipe ends.
EXIT_BROKEN_PIPE = 141

_DURATION = re.compile(r"(\d+)([smhdw])")
_LONGEST_DURATION = 100 * 365 * 86400
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_STATUS_COLOURS = {
    Status.PENDING: "36",  # cyan
    Status.RUNNING: "34;1",  # bold blue
    Status.COMPLETED: "32",  # green
    Status.FAILED: "31;1",  # bold red
    Status.INTERRUPTED: "33",  # yellow
    Status.TIMEOUT: "35",  # magenta
}


class _Failure(Exception):
    """An expected failure: print one line to stderr and exit with ``code``."""

    def __init__(self, message: str, code: int = EXIT_REFUSED) -> None:
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line naming the culprit, and the usage hint, without argparse's usage block.
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def parse_duration(text: str) -> timedelta:
    """``90s``, ``15m``, ``12h``, ``30d``, ``2w`` as a ``timedelta``."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: use a number and s, m, h, d or w, e.g. 30d")
    seconds = int(match[1]) * _UNIT_SECONDS[match[2]]
    if seconds > _LONGEST_DURATION:
        raise argparse.ArgumentTypeError(f"duration {text!r} is longer than 100 years")
    return timedelta(seconds=seconds)


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {value}")
    return value


def _positive_int(text: str) -> int:
    value = _non_negative_int(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return value


def _lock_timeout(text: str) -> float:
    try:
        return parse_seconds(text, "--lock-timeout", allow_zero=False)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _machine_name(text: str) -> str:
    try:
        return check_machine_name(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


class _Version(argparse.Action):
    """``--version``: print ``pytest-runs X.Y.Z`` from the installed metadata, looked up only when asked."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings, dest=dest, default=argparse.SUPPRESS, nargs=0, help=help)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        sys.stdout.write(f"pytest-runs {_version()}\n")
        parser.exit(EXIT_OK)


def _version() -> str:
    """The installed distribution's version; ``unknown`` when it is not installed (a bare source tree)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed_version

    try:
        return installed_version("pytest-runs")
    except PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``pytest-runs``."""
    parser = _Parser(
        prog="pytest-runs",
        description="See and manage the runs that pytest sessions record with --runs-machine.",
        epilog="example: pytest-runs list --machine rig-1 --status failed --limit 5",
    )
    parser.add_argument(
        "--lock-timeout",
        metavar="SECONDS",
        type=_lock_timeout,
        help=f"give up (exit 1) when the store stays locked this long (default: ${LOCK_TIMEOUT_ENV}, else "
        f"{DEFAULT_LOCK_TIMEOUT:g})",
    )
    parser.add_argument(
        "--store",
        metavar="URL",
        help="where runs are kept: postgresql://... for a shared database, or a folder or file: URL "
        f"(default: ${STORE_ENV}, else the state dir)",
    )
    parser.add_argument(
        "--state-dir",
        metavar="DIR",
        help="the run store (default: $PYTEST_RUNS_STATE_DIR, else $XDG_STATE_HOME/pytest-runs, "
        "else ~/.local/state/pytest-runs)",
    )
    json_help = "print only JSON on stdout, for scripts (before or after the command)"
    parser.add_argument("--json", action="store_true", help=json_help)
    parser.add_argument("--version", action=_Version, help="print the version of pytest-runs and exit")
    commands = parser.add_subparsers(
        dest="command",
        metavar="COMMAND",
        required=True,
        parser_class=_Parser,
        help="what to do; pytest-runs COMMAND --help tells more",
    )
    # Each command takes --json too. Its default is SUPPRESS, so that a command line without
    # it after the command leaves the value given (or not) before the command as it is.
    common = _Parser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help=json_help)

    def command(name: str, help: str, example: str) -> argparse.ArgumentParser:
        return commands.add_parser(
            name,
            help=help,
            description=help[0].upper() + help[1:] + ".",
            epilog=f"example: {example}",
            parents=[common],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    listing = command("list", "list runs, newest first", "pytest-runs list --machine rig-1 --status failed")
    listing.add_argument("--machine", metavar="M", help="only runs on machine M")
    listing.add_argument("--status", metavar="S", choices=[s.value for s in Status], help="only runs with status S")
    listing.add_argument("--batch", metavar="B", help="only runs of batch B")
    listing.add_argument("--limit", metavar="N", type=_positive_int, help="at most N runs")

    show = command("show", "show every field of one run", "pytest-runs show 20261126-180458-123456-a1b2c3")
    show.add_argument("run_id", metavar="ID", help="the run's ID, as list shows it")

    command("machines", "show each machine: idle or busy, who waits for it, its last run", "pytest-runs machines")

    report = command(
        "report",
        "write one self-contained HTML page of who held the machines, who waited, and rig-or-code failure rates",
        "pytest-runs report --html lab.html --since 7d",
    )
    report.add_argument(
        "--html", metavar="FILE", type=Path, help="write the page to FILE (no network needed to open it)"
    )
    report.add_argument(
        "--since", metavar="DURATION", type=parse_duration, default=timedelta(days=7),
        help="the window: runs of the last DURATION (90s, 15m, 12h, 30d, 2w; default 7d)",
    )  # fmt: skip
    report.add_argument("--machine", metavar="M", action="append", default=[], help="only machine M (repeatable)")

    queue = command(
        "queue", "list the sessions waiting for machines, in the order they will be served", "pytest-runs queue"
    )
    queue.add_argument("--machine", metavar="M", help="only those waiting for machine M")

    release = command(
        "release",
        "end a pending or running run as interrupted, freeing its machine",
        "pytest-runs release 20261126-180458-123456-a1b2c3 --reason 'runner died'",
    )
    release.add_argument("run_id", metavar="ID", help="the run to end, pending or running")
    release.add_argument("--reason", required=True, metavar="TEXT", help="why (kept in error_msg)")

    prune = command(
        "prune", "delete ended runs with their logs and artifacts", "pytest-runs prune --older-than 30d --dry-run"
    )
    rule = prune.add_mutually_exclusive_group(required=True)
    rule.add_argument("--keep", metavar="N", type=_non_negative_int, help="keep the N newest ended runs per machine")
    rule.add_argument(
        "--older-than",
        metavar="DURATION",
        type=parse_duration,
        help="runs that ended longer ago: 90s, 15m, 12h, 30d, 2w",
    )
    prune.add_argument("--dry-run", action="store_true", help="list what would go; delete nothing")

    reserve = command(
        "reserve",
        "reserve a machine for the tests in a folder; a later pytest --runs-machine on them claims it",
        "pytest-runs reserve --machine rig-1 --test-dir ./tests --batch nightly-42",
    )
    reserve.add_argument("--machine", required=True, metavar="M", type=_machine_name, help="the machine to reserve")
    reserve.add_argument(
        "--test-dir",
        required=True,
        metavar="D",
        type=Path,
        help="the folder of the tests: its content is hashed as the plugin hashes its test folder",
    )
    reserve.add_argument("--batch", metavar="B", default="", help="the reservation's batch_id (as --runs-batch)")
    reserve.add_argument(
        "--plan-entry", metavar="P", default="", help="the reservation's plan_entry (as --runs-plan-entry)"
    )
    reserve.add_argument(
        "--hash-ignore",
        metavar="GLOB",
        action="append",
        default=[],
        help="a pattern left out of the hash, as the ini key runs_hash_ignore (repeatable; must match it)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``pytest-runs`` with ``argv`` (default: the command line); return the exit code."""
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            # A run may hold text that is not valid Unicode (a path of undecodable bytes).
            stream.reconfigure(errors="backslashreplace")
    try:
        try:
            code = _main(argv)
        except SystemExit:
            # --help, --version and usage errors end here; what they printed goes out now.
            sys.stdout.flush()
            raise
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # The reader went away (`pytest-runs list | head`): stop quietly, as Unix tools do.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.lease = parse_seconds(os.environ.get(LEASE_ENV) or str(DEFAULT_LEASE), LEASE_ENV, allow_zero=False)
        lock_timeout = args.lock_timeout
        if lock_timeout is None:
            given = os.environ.get(LOCK_TIMEOUT_ENV)
            lock_timeout = parse_seconds(given, LOCK_TIMEOUT_ENV, allow_zero=False) if given else DEFAULT_LOCK_TIMEOUT
        # Retention applies to the runs the command line ends too (release, a stale reclaim).
        keep = parse_keep(os.environ[KEEP_ENV], KEEP_ENV) if os.environ.get(KEEP_ENV) else None
        store_url, store_dir = split_store(args.store or os.environ.get(STORE_ENV))
    except ValueError as error:
        return _fail(str(error), EXIT_USAGE)
    try:
        state_dir = store_dir if store_dir is not None else resolve_state_dir(args.state_dir)
        store = open_store(state_dir, store_url, lock_timeout=lock_timeout, keep=keep)
        return int(_COMMANDS[args.command](store, args))
    except _Failure as failure:
        return _fail(str(failure), failure.code)
    except StoreUnreachable as error:
        return _fail(str(error), EXIT_STORE_UNREACHABLE)
    except (StateError, RunNotFound, RunEnded) as error:
        return _fail(str(error), EXIT_REFUSED)


def _fail(message: str, code: int) -> int:
    sys.stderr.write(f"pytest-runs: {message}\n")
    return code


# -- commands -------------------------------------------------------------------------


def _list(store: Store, args: argparse.Namespace) -> int:
    runs = store.recent(
        args.limit,
        where=lambda r: (
            (args.machine is None or r.machine == args.machine)
            and (args.status is None or r.status.value == args.status)
            and (args.batch is None or r.batch_id == args.batch)
        ),
    )
    if args.json:
        _print_json([r.to_dict() for r in runs])
        return EXIT_OK
    if not runs:
        print("no runs")
        return EXIT_OK
    now = datetime.now(UTC)
    headers = ["ID", "MACHINE", "STATUS", "EXIT", "STARTED", "DURATION", "HASH"]
    with_batch = any(r.batch_id or r.plan_entry for r in runs)
    if with_batch:
        headers.append("BATCH/PLAN")
    rows = []
    for run in runs:
        row = [
            run.id,
            run.machine,
            run.status.value + (" (stale)" if store.stale_reason(run) else ""),
            "-" if run.exit_code is None else str(run.exit_code),
            format_ago(run.started_at, now),
            _duration(run, now),
            run.short_hash,
        ]
        if with_batch:
            row.append("/".join(part for part in (run.batch_id, run.plan_entry) if part) or "-")
        rows.append(row)
    shrinkable = {1, len(headers) - 1} if with_batch else {1}
    _print_table(headers, rows, shrinkable=shrinkable, status_column=2)
    return EXIT_OK


def _show(store: Store, args: argparse.Namespace) -> int:
    run = store.get(args.run_id)
    if args.json:
        _print_json(run.to_dict())
        return EXIT_OK
    data = run.to_dict()
    width = max(len(key) for key in data)
    for key, value in data.items():
        text = "null" if value is None else str(value)
        if key == "status":
            text = _colour_status(run.status, text)
        print(f"{key:<{width}}  {text}")
    for label, path, exists in (
        ("log", run.logs_path, Path(run.logs_path).is_file() if run.logs_path else False),
        ("artifacts", run.artifacts_path, Path(run.artifacts_path).is_dir() if run.artifacts_path else False),
    ):
        state = "not recorded" if not path else ("exists" if exists else "missing")
        print(f"{label:<{width}}  {state}")
    return EXIT_OK


def _machines(store: Store, args: argparse.Namespace) -> int:
    states = store.machines()
    if args.json:
        _print_json([_machine_json(s) for s in states])
        return EXIT_OK
    if not states:
        print("no machines")
        return EXIT_OK
    now = datetime.now(UTC)
    rows = []
    for state in states:
        machine_state, holder = "idle", "-"
        if state.active is not None:
            held = held_for(state.active, now)
            stale = store.stale_reason(state.active)
            unclaimed = state.unclaimed_for is not None and not stale
            machine_state = "busy (stale)" if stale else "busy (unclaimed)" if unclaimed else "busy"
            details = [state.active.status.value, held, owner_of(state.active), state.active.owner_ci_url]
            if unclaimed and state.unclaimed_for is not None:
                details.append(describe_unclaimed(state.unclaimed_for, store.claim_deadline))
            holder = f"{state.active.id} ({', '.join(d for d in details if d)}" + (
                f"; stale: {stale})" if stale else ")"
            )
        last = "-"
        if state.last is not None:
            last = f"{state.last.id} {state.last.status.value} {format_ago(state.last.ended_at, now)}"
        rows.append([state.machine, machine_state, holder, str(state.waiting), last])
    _print_table(["MACHINE", "STATE", "HELD BY", "WAITING", "LAST RUN"], rows, shrinkable={0, 2, 4})
    return EXIT_OK


def _report(store: Store, args: argparse.Namespace) -> int:
    from .report import LONGEST_RUN, figures, render_html

    if args.html is None and not args.json:
        raise _Failure("report needs --html FILE or --json", EXIT_USAGE)
    now = datetime.now(UTC)
    since = now - args.since
    oldest = since - LONGEST_RUN

    def too_old(run: Run) -> bool:
        created = run_created_at(run.id)
        return created is not None and created < oldest

    wanted = set(args.machine)
    runs = store.recent(where=lambda run: not wanted or run.machine in wanted, stop=too_old)
    data = figures(runs, store.queue(), now=now, since=since, machines=args.machine)
    if args.html is not None:
        page = render_html(
            data, title=f"pytest-runs: the lab, {format_duration(args.since.total_seconds())} to {now:%Y-%m-%d %H:%M}Z"
        )
        try:
            args.html.write_text(page, encoding="utf-8")
        except OSError as error:
            raise _Failure(f"cannot write {args.html}: {error.strerror or error}") from None
        if not args.json:
            print(f"wrote {args.html} ({len(data['runs'])} runs on {len(data['machines'])} machines)")
    if args.json:
        _print_json(data)
    return EXIT_OK


def _queue(store: Store, args: argparse.Namespace) -> int:
    line = store.line(args.machine)
    if args.json:
        _print_json([_in_line_json(entry) for entry in line])
        return EXIT_OK
    if not line:
        print("nobody waits" + (f" for {args.machine}" if args.machine else ""))
        return EXIT_OK
    now = datetime.now(UTC)
    rows = [
        [
            "-" if entry.place is None else str(entry.place),
            ",".join(entry.waiter.machines),
            str(entry.waiter.priority),
            format_ago(entry.waiter.since, now),
            owner_of(entry.waiter.run),
            entry.waiter.run.short_hash,
            entry.waiter.run.owner_ci_url or "-",
            _in_line_state(entry, store.claim_deadline, now),
        ]
        for entry in line
    ]
    _print_table(
        ["#", "MACHINES", "PRIORITY", "SINCE", "WHO", "HASH", "CI JOB", "STATE"], rows, shrinkable={1, 4, 6, 7}
    )
    return EXIT_OK


def _in_line_state(entry: InLine, deadline: float, now: datetime) -> str:
    """``waiting``; ``rig-1 handed to it, ...``; or ``passed over 20 s ago ...``."""
    if entry.handed is not None and entry.unclaimed_for is not None:
        return f"{entry.handed.machine} (run {entry.handed.id}) {describe_unclaimed(entry.unclaimed_for, deadline)}"
    if entry.waiter.passed_over is not None:
        return (
            f"passed over {format_ago(entry.waiter.passed_over, now)}: did not claim a machine handed to it "
            f"within {format_duration(deadline)}; keeps its place, served again once it looks"
        )
    return "waiting"


def _in_line_json(entry: InLine) -> dict[str, Any]:
    data: dict[str, Any] = {"place": entry.place, **entry.waiter.to_dict()}
    if entry.handed is not None:  # a machine handed to it, not claimed yet (then place is null)
        data.update(handed=entry.handed.to_dict(), unclaimed_for=round(entry.unclaimed_for or 0.0, 3))
    return data


def _machine_json(state: MachineState) -> dict[str, Any]:
    return {
        "machine": state.machine,
        "state": "busy" if state.active is not None else "idle",
        "active": state.active.to_dict() if state.active is not None else None,
        "last": state.last.to_dict() if state.last is not None else None,
        "waiting": state.waiting,
        # Only for a machine handed to a waiter that has not claimed it yet: for how many seconds.
        **({} if state.unclaimed_for is None else {"unclaimed_for": round(state.unclaimed_for, 3)}),
    }


def _release(store: Store, args: argparse.Namespace) -> int:
    if not args.reason.strip():
        raise _Failure("--reason must not be empty", EXIT_USAGE)
    try:
        run = store.release(args.run_id, args.reason)
    except RunEnded as ended:
        raise _Failure(f"refused: {ended}") from None
    if args.json:
        _print_json(run.to_dict())
    else:
        # The record's error_msg is "released: REASON"; the line says "released" once.
        whose = _whose(store, run)
        whose_run = f"{whose}'s run" if whose else "run"  # another user's: say whose it was
        print(f"released {whose_run} {run.id} on {run.machine} (now {run.status.value}): {args.reason}")
    return EXIT_OK


def _whose(store: Store, run: Run) -> str | None:
    """The user whose session made ``run`` (its liveness lock's or run folder's owner), if not this user."""
    places = [store.run_dir(run.id)]
    if run.owner_token:
        with contextlib.suppress(ValueError):
            places.insert(0, lock_path(store.state_dir, run.owner_token))
    for place in places:
        try:
            uid = os.lstat(place).st_uid
        except OSError:
            continue
        return None if uid == os.geteuid() else user_name(uid)
    return None


def _prune(store: Store, args: argparse.Namespace) -> int:
    removed = store.prune(keep=args.keep, older_than=args.older_than, dry_run=args.dry_run)
    if args.json:
        _print_json([r.to_dict() for r in removed])
        return EXIT_OK
    verb = "would remove" if args.dry_run else "removed"
    print(f"{verb} {len(removed)} run{'s' if len(removed) != 1 else ''}")
    for run in removed:
        print(f"  {run.id}  {run.machine}  {run.status.value}  ended {format_ago(run.ended_at)}")
    return EXIT_OK


def _reserve(store: Store, args: argparse.Namespace) -> int:
    test_dir = args.test_dir.expanduser().resolve()
    if not test_dir.is_dir():
        raise _Failure(f"--test-dir {test_dir} is not a folder", EXIT_USAGE)
    try:
        # The same identity as the plugin's: the folder's own ini file's patterns, and any given here.
        ignore = [*read_hash_ignore(test_dir), *args.hash_ignore]
        test_dir_hash = hash_test_dir(test_dir, ignore, exclude=[store.state_dir], cache=store.hash_cache(test_dir))
    except (HashError, ValueError) as error:
        raise _Failure(str(error)) from None

    owner = Owner.current()

    def mk() -> Run:
        # No PID and no liveness lock: this command exits at once. Its heartbeat and its own
        # lease ($PYTEST_RUNS_LEASE) let an unclaimed reservation expire.
        return Run(
            test_dir=str(test_dir),
            batch_id=args.batch,
            plan_entry=args.plan_entry,
            owner_host=owner.host,
            owner_ci_url=owner.ci_url,
            owner_lease=args.lease,
            heartbeat_at=datetime.now(UTC),
        )

    run, outcome = store.prepare_atomic(args.machine, test_dir_hash, mk)
    if outcome is PrepareOutcome.BUSY or run.status is not Status.PENDING:
        same = " (the same tests)" if outcome is PrepareOutcome.REUSE else ""
        raise _Failure(f"machine {args.machine} is busy with {describe_holder(run)}{same}", EXIT_BUSY)
    if args.json:
        _print_json(run.to_dict())
    elif outcome is PrepareOutcome.CREATED:
        print(f"reserved {args.machine} for {test_dir} (hash {run.short_hash}): run {run.id}")
    else:
        print(f"{args.machine} was already reserved for these tests: run {run.id}")
    return EXIT_OK


_COMMANDS: dict[str, Callable[[Store, argparse.Namespace], int]] = {
    "list": _list,
    "show": _show,
    "machines": _machines,
    "queue": _queue,
    "report": _report,
    "release": _release,
    "prune": _prune,
    "reserve": _reserve,
}


# -- output ---------------------------------------------------------------------------


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False))


def _duration(run: Run, now: datetime) -> str:
    if run.started_at is None:
        return "-"
    return format_duration(((run.ended_at or now) - run.started_at).total_seconds())


def _use_colour() -> bool:
    return sys.stdout.isatty() and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"


def _colour_status(status: Status, text: str) -> str:
    return f"\x1b[{_STATUS_COLOURS[status]}m{text}\x1b[0m" if _use_colour() else text


def _print_table(
    headers: list[str], rows: list[list[str]], shrinkable: set[int], status_column: int | None = None
) -> None:
    """Aligned columns; on a terminal (or with $COLUMNS) the ``shrinkable`` ones are cut to fit it."""
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]
    if sys.stdout.isatty() or "COLUMNS" in os.environ:
        _fit(widths, shrinkable, shutil.get_terminal_size().columns)
    for index, row in enumerate([headers, *rows]):
        cells = []
        for column, (cell, width) in enumerate(zip(row, widths, strict=True)):
            text = cell if len(cell) <= width else cell[: max(0, width - 1)] + "…"
            padded = text.ljust(width)
            if index > 0 and column == status_column:
                padded = _colour_status(Status(cell.split()[0]), text) + " " * (width - len(text))
            cells.append(padded)
        print("  ".join(cells).rstrip())


def _fit(widths: list[int], shrinkable: set[int], columns: int) -> None:
    """Shrink the widest shrinkable column until the table fits ``columns`` (none below 8)."""
    while sum(widths) + 2 * (len(widths) - 1) > columns:
        widest = max(shrinkable, key=widths.__getitem__)
        if widths[widest] <= 8:
            return
        widths[widest] -= 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
