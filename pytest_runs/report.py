"""The lab report: who held the machines and who waited, and whether a failure is the rig or the code.

:func:`figures` computes everything from a :class:`~pytest_runs.store.Store` as plain data
(what ``pytest-runs report --json`` prints); :func:`render_html` turns it into one
self-contained HTML file (no network: styles, script and data are inline).
"""

from __future__ import annotations

import html
import json
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from importlib import resources
from typing import Any

from .model import Run, Status, format_timestamp, run_created_at
from .queue import Waiter

__all__ = ["figures", "render_html"]

#: A run that began before the window is still shown if it ended inside it; runs are read
#: newest first, and reading stops this long before the window.
LONGEST_RUN = timedelta(days=7)
#: A machine "stands out" when it fails the shared tests this much more often than they fail
#: elsewhere, and at least twice as often...
STANDS_OUT_BY = 0.2
#: ...over at least this many runs of those tests on it.
STANDS_OUT_AFTER = 3


def _seconds(delta: timedelta) -> float:
    return delta.total_seconds()


def _start_of(run: Run) -> datetime | None:
    return run.started_at or run_created_at(run.id)


def figures(
    runs: Iterable[Run],
    waiters: Sequence[Waiter],
    *,
    now: datetime,
    since: datetime,
    machines: Sequence[str] = (),
) -> dict[str, Any]:
    """The report's data: runs in the window ``[since, now]``, per-machine figures, rig or code.

    ``runs`` are read newest first (as ``Store.recent`` gives them) until they are older
    than the window by :data:`LONGEST_RUN`; only those that overlap the window are kept.
    """
    wanted = set(machines)
    kept: list[Run] = []
    for run in runs:
        created = run_created_at(run.id) or _start_of(run)
        if created is not None and created < since - LONGEST_RUN:
            break
        if wanted and run.machine not in wanted:
            continue
        begun = _start_of(run)
        finished = run.ended_at or now
        if begun is None or finished < since or begun > now:
            continue
        kept.append(run)
    kept.reverse()
    lanes = sorted({run.machine for run in kept} | set(machines) | {m for w in waiters for m in w.machines
                                                                      if not wanted or m in wanted})  # fmt: skip
    window = max(_seconds(now - since), 1e-9)
    per_machine = []
    for lane in lanes:
        mine = [run for run in kept if run.machine == lane]
        busy = _union_seconds([(max(_start_of(r) or since, since), min(r.ended_at or now, now)) for r in mine])
        durations = [_seconds(r.ended_at - r.started_at) for r in mine if r.ended_at and r.started_at]
        waits = [_seconds(r.started_at - r.waited_since) for r in mine if r.started_at and r.waited_since]
        waits += [_seconds(now - w.since) for w in waiters if w.wants(lane)]
        per_machine.append(
            {
                "machine": lane,
                "runs": len(mine),
                "utilisation": round(busy / window, 4),
                "median_duration": round(statistics.median(durations), 3) if durations else None,
                "longest_wait": round(max(waits), 3) if waits else None,
                "waiting_now": sum(1 for w in waiters if w.wants(lane)),
            }
        )
    return {
        "generated_at": format_timestamp(now),
        "since": format_timestamp(since),
        "until": format_timestamp(now),
        "machines": lanes,
        "runs": [_run_entry(run, now) for run in kept],
        "waiting": [_wait_entry(waiter, now, wanted) for waiter in waiters],
        "per_machine": per_machine,
        "rig_or_code": _rig_or_code(kept, lanes),
    }


def _run_entry(run: Run, now: datetime) -> dict[str, Any]:
    begun = _start_of(run)
    assert begun is not None
    return {
        "id": run.id,
        "machine": run.machine,
        "status": run.status.value,
        "start": format_timestamp(begun),
        "end": format_timestamp(run.ended_at) if run.ended_at else None,
        "active": not run.status.is_terminal,
        "waited_since": format_timestamp(run.waited_since) if run.waited_since else None,
        "test_dir_hash": run.test_dir_hash,
        "test_dir": run.test_dir,
        "batch_id": run.batch_id,
        "owner_host": run.owner_host,
        "owner_ci_url": run.owner_ci_url,
        "exit_code": run.exit_code,
        "error_msg": run.error_msg,
        "summary": (run.summary or {}).get("text", "") if isinstance(run.summary, dict) else "",
        "fence": run.fence,
        "duration": round(_seconds((run.ended_at or now) - begun), 3),
    }


def _wait_entry(waiter: Waiter, now: datetime, wanted: set[str]) -> dict[str, Any]:
    return {
        "machines": [m for m in waiter.machines if not wanted or m in wanted],
        "since": format_timestamp(waiter.since),
        "until": format_timestamp(now),
        "priority": waiter.priority,
        "owner_host": waiter.run.owner_host,
        "test_dir_hash": waiter.run.test_dir_hash,
        "owner_ci_url": waiter.run.owner_ci_url,
    }


def _union_seconds(intervals: list[tuple[datetime, datetime]]) -> float:
    total = 0.0
    reach: datetime | None = None
    for begin, end in sorted(intervals):
        if end <= begin:
            continue
        if reach is None or begin > reach:
            total += _seconds(end - begin)
            reach = end
        elif end > reach:
            total += _seconds(end - reach)
            reach = end
    return total


def _verdict(run: Run) -> str | None:
    """``pass`` or ``fail`` for a run that ran its tests to the end; ``None`` otherwise."""
    if run.status is Status.COMPLETED:
        return "pass"
    if run.status is Status.FAILED and run.exit_code == 1:
        return "fail"  # tests failed; other failures (usage, internal errors) say nothing of the rig
    return None


def _rig_or_code(runs: list[Run], lanes: list[str]) -> dict[str, Any]:
    """Per test-dir hash run on several machines: pass/fail by machine; per machine: its failure rate beside theirs."""
    counts: dict[str, dict[str, dict[str, int]]] = defaultdict(lambda: defaultdict(lambda: {"pass": 0, "fail": 0}))
    for run in runs:
        verdict = _verdict(run)
        if verdict is not None:
            counts[run.test_dir_hash][run.machine][verdict] += 1
    shared = {digest: by_machine for digest, by_machine in counts.items() if len(by_machine) >= 2}
    matrix = [
        {"test_dir_hash": digest, "by_machine": {m: dict(c) for m, c in sorted(by_machine.items())}}
        for digest, by_machine in sorted(shared.items())
    ]
    machines = []
    for lane in lanes:
        here = {"pass": 0, "fail": 0}
        elsewhere = {"pass": 0, "fail": 0}
        for by_machine in shared.values():
            if lane not in by_machine:
                continue
            for machine, tally in by_machine.items():
                target = here if machine == lane else elsewhere
                target["pass"] += tally["pass"]
                target["fail"] += tally["fail"]
        ran_here, ran_elsewhere = here["pass"] + here["fail"], elsewhere["pass"] + elsewhere["fail"]
        rate = here["fail"] / ran_here if ran_here else None
        rate_elsewhere = elsewhere["fail"] / ran_elsewhere if ran_elsewhere else None
        stands_out = (
            rate is not None
            and rate_elsewhere is not None
            and ran_here >= STANDS_OUT_AFTER
            and rate - rate_elsewhere >= STANDS_OUT_BY
            and rate >= 2 * rate_elsewhere
        )
        machines.append(
            {
                "machine": lane,
                "runs": ran_here,
                "failure_rate": None if rate is None else round(rate, 4),
                "runs_elsewhere": ran_elsewhere,
                "failure_rate_elsewhere": None if rate_elsewhere is None else round(rate_elsewhere, 4),
                "stands_out": stands_out,
            }
        )
    return {"matrix": matrix, "machines": machines}


def render_html(data: dict[str, Any], title: str = "pytest-runs: the lab") -> str:
    """One self-contained HTML page showing ``data`` (from :func:`figures`)."""
    template = resources.files("pytest_runs").joinpath("report.html").read_text(encoding="utf-8")
    # JSON inside <script>: "</" would end the element early; \\u003c keeps it data.
    payload = json.dumps(data, separators=(",", ":")).replace("<", "\\u003c")
    return template.replace("{{TITLE}}", html.escape(title)).replace("{{DATA}}", payload)
