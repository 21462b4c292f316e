"""What the plugin costs a pytest session: absent, installed but off, and on.

    .venv/bin/python benchmarks/bench_overhead.py [--repeat 15]

Runs a small suite in fresh pytest processes, interleaving the three variants in a
rotating order so that machine load hits them alike. Prints median wall times and ratios to "absent".
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SUITE = "import pytest\n@pytest.mark.parametrize('n', range(200))\ndef test_n(n):\n    assert n >= 0\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        (root / "suite").mkdir()
        (root / "suite" / "test_suite.py").write_text(SUITE)
        (root / "suite" / "pytest.ini").write_text("[pytest]\n")
        base = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "suite"]
        variants = {
            "absent (-p no:runs)": [*base, "-p", "no:runs"],
            "installed, off": base,
            "on (--runs-machine)": [*base, "--runs-machine=bench", f"--runs-state-dir={root / 'state'}"],
        }
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_RUNS_")}
        times: dict[str, list[float]] = {name: [] for name in variants}
        names = list(variants)
        for round_ in range(args.repeat):
            # Rotate the order every round so that no variant always runs first or last.
            for name in names[round_ % 3 :] + names[: round_ % 3]:
                command = variants[name]
                start = time.perf_counter()
                subprocess.run(command, cwd=root, env=env, check=True, stdout=subprocess.DEVNULL)
                times[name].append(time.perf_counter() - start)
    reference = statistics.median(times["absent (-p no:runs)"])
    print(f"{'variant':<22}  {'median s':>8}  {'vs absent':>9}")
    for name, samples in times.items():
        median = statistics.median(samples)
        print(f"{name:<22}  {median:>8.3f}  {median / reference:>9.3f}")
    print(f"{args.repeat} interleaved runs each of a 200-test suite in a new process")


if __name__ == "__main__":
    main()
