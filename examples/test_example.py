"""A tiny suite to try pytest-runs on: ``pytest --runs-machine=rig-1 examples``."""

import platform


def test_records_where_it_ran(runs_run, runs_artifacts_dir):
    if runs_run is None:
        return  # tracking is off: run without --runs-machine
    (runs_artifacts_dir / "host.txt").write_text(f"{platform.node()} ran {runs_run.id} on {runs_run.machine}\n")


def test_arithmetic():
    assert 6 * 7 == 42
