"""An example lab for the HTML report: three rigs over a day, one of which fails what passes elsewhere.

    .venv/bin/python examples/lab_report.py STATE_DIR [--runs 60]
    .venv/bin/pytest-runs --state-dir STATE_DIR report --html lab.html --since 1d

The runs are made through the store's own calls, with times set as a day of CI would.
"""

from __future__ import annotations

import argparse
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

from pytest_runs import Run, Status, Store

SUITES = {"firmware": "3f9a" + "0" * 60, "power": "b71c" + "1" * 60, "radio": "c04e" + "2" * 60}
RIGS = ["rig-1", "rig-2", "rig-3"]
HOSTS = ["ci-runner-01", "ci-runner-02", "ci-runner-03"]


def build(store: Store, runs: int, now: datetime, seed: int = 7) -> None:
    """``runs`` ended runs over the last day; rig-3 fails the radio tests, which pass elsewhere."""
    rng = random.Random(seed)
    clock = {rig: now - timedelta(hours=23) for rig in RIGS}
    made = []
    for index in range(runs):
        rig = min(RIGS, key=lambda r: clock[r])
        suite = rng.choice(list(SUITES))
        waited = timedelta(minutes=rng.choice([0, 0, 0, 3, 7, 12]))
        start = clock[rig] + timedelta(minutes=rng.randint(1, 25))
        duration = timedelta(minutes=rng.randint(4, 30))
        end = start + duration
        if end > now - timedelta(minutes=5):
            break
        flaky_rig = rig == "rig-3" and suite == "radio"
        failed = rng.random() < (0.75 if flaky_rig else 0.08)
        status = Status.FAILED if failed else Status.COMPLETED
        if rng.random() < 0.03:
            status = Status.TIMEOUT
        made.append(
            Run(
                machine=rig,
                test_dir=f"/builds/lab/{suite}/tests",
                test_dir_hash=SUITES[suite],
                status=status,
                exit_code={Status.COMPLETED: 0, Status.FAILED: 1}.get(status, 2),
                started_at=start,
                ended_at=end,
                owner_host=rng.choice(HOSTS),
                owner_ci_url=f"https://gitlab.example.com/lab/{suite}/-/jobs/{41000 + index}",
                batch_id=f"nightly-{start:%m%d}" if start.hour < 6 else "",
                summary={"text": "3 failed, 41 passed" if failed else "44 passed", "counts": {}, "duration": 0.0},
                waited_since=start - waited if waited else None,
                error_msg="3 failed, 41 passed" if failed else "",
            )
        )
        clock[rig] = end
    store.create_many(made)
    holder, _ = store.prepare_atomic("rig-1", SUITES["power"], lambda: Run(test_dir="/builds/lab/power/tests"))
    store.start(holder.id, started_at=now - timedelta(minutes=4), owner_host="ci-runner-02")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("state_dir", type=Path)
    parser.add_argument("--runs", type=int, default=120)
    args = parser.parse_args()
    build(Store(args.state_dir), args.runs, datetime.now(UTC))


if __name__ == "__main__":
    main()
