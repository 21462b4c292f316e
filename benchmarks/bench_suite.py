"""What tracking costs a whole pytest session of a real third-party suite: absent, installed but off, and on.

    .venv/bin/python benchmarks/bench_suite.py [--suite boltons] [--repeat 15] [--workdir DIR]

Downloads the suite's pinned sdist (its tests included) from PyPI into DIR (by default
``pytest-runs-bench-suite`` in the system temp folder, kept between runs), checks its
SHA-256, and makes a virtualenv there with this pytest, the suite's test dependencies and
this checkout (editable, so it measures the code as it is now). Then it runs the whole
suite in a new pytest process ``--repeat`` times for each variant, interleaved in a
rotating order so that machine load hits them alike, after one untimed warm-up round.
"on" tracks every session as a run on machine ``bench`` in one state dir, as a lab store
would. Bytecode is cached as Python does by default (PYTHONDONTWRITEBYTECODE is dropped
for the sessions). Prints median wall seconds, their ratio to "absent", the median of each
round's own ratio ("paired", steadier when the machine's load drifts), median CPU seconds
and their ratio, the load average, and pytest's final counts for each variant, which must
be the same.

Suites: ``boltons`` (the default: pure Python, about 670 tests with its doctests, a few
seconds), ``click`` (about 2,400 tests) and ``packaging`` (about 64,000 tiny tests in
about 50 s: the harshest case for per-test cost; try ``--repeat 3``).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.metadata
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Suite:
    project: str
    version: str
    sha256: str
    deps: tuple[str, ...]
    args: tuple[str, ...]  # pytest's arguments, run from the unpacked sdist's folder


SUITES = {
    "boltons": Suite(
        "boltons",
        "26.2.0",
        "d39cfd15c1a1c3bd4d705c82252fa9edb8e4f5e8cc039f8e39afac7b1b47e92c",
        (),
        ("--doctest-modules", "boltons", "tests"),  # as its tox.ini runs it
    ),
    "click": Suite("click", "8.5.1", "9bbfada76703fd1d784b83eea012e3e8c6a001a876543ef104fa56aaaeb072b4", (), ()),
    "packaging": Suite(
        "packaging",
        "26.4",
        "c4b671c41ddb9bf26e543c37723610d28fb6bf7affc4da17cf048d419d2c062a",
        ("pretend", "tomli_w", "hypothesis"),
        (),
    ),
}

# pytest -q's final line, such as "3 failed, 669 passed, 2 skipped in 4.01s".
FINAL_LINE = re.compile(r"^(?:=+ )?(?P<counts>(?:\d+ \w+)(?:, \d+ \w+)*|no tests ran) in [\d.]+s")


def fail(message: str) -> SystemExit:
    """One line on stderr and exit status 1."""
    return SystemExit(f"bench_suite: {message}")


def run_quietly(command: list[str], what: str) -> None:
    """Run a setup step; if it fails, exit with one line that says what and pip's last word."""
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        errors = [line for line in result.stderr.splitlines() if line.strip() and "WARNING" not in line]
        last = errors[-1].strip() if errors else f"exit status {result.returncode}"
        raise fail(f"{what}: {last}")


def fetch(suite: Suite, workdir: Path) -> Path:
    """The unpacked sdist's folder, downloaded and checked once."""
    source = workdir / f"{suite.project}-{suite.version}"
    if (source / ".bench-unpacked").exists():
        return source
    downloads = workdir / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    pin = f"{suite.project}=={suite.version}"
    pip = [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check"]
    run_quietly(
        [*pip, "--no-binary", ":all:", "--no-deps", "-d", str(downloads), pin], f"cannot download {pin} from PyPI"
    )
    name = re.sub(r"[-_.]+", "_", suite.project).lower()
    archives = sorted(downloads.glob(f"{name}-{suite.version}.tar.gz"))
    if not archives:
        raise fail(f"pip downloaded no sdist {name}-{suite.version}.tar.gz for {pin} into {downloads}")
    digest = hashlib.sha256(archives[0].read_bytes()).hexdigest()
    if digest != suite.sha256:
        raise fail(f"{archives[0]} has SHA-256 {digest}, not the pinned {suite.sha256}")
    shutil.rmtree(source, ignore_errors=True)
    with tempfile.TemporaryDirectory(dir=workdir) as scratch, tarfile.open(archives[0]) as archive:
        archive.extractall(scratch, filter="data")
        (top,) = Path(scratch).iterdir()
        top.rename(source)
    (source / ".bench-unpacked").touch()
    return source


def make_venv(suite: Suite, workdir: Path, source: Path) -> Path:
    """A virtualenv with this pytest, the suite and its test dependencies, and this checkout; made once."""
    venv = workdir / f"venv-{suite.project}-{suite.version}"
    python = venv / "bin" / "python"
    wanted = json.dumps(
        {"pytest": importlib.metadata.version("pytest"), "deps": suite.deps, "root": str(ROOT), "python": sys.version}
    )
    marker = venv / "bench-suite.json"
    if marker.exists() and marker.read_text() == wanted:
        return python
    shutil.rmtree(venv, ignore_errors=True)
    run_quietly([sys.executable, "-m", "venv", str(venv)], f"cannot make a virtualenv in {venv}")
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    pytest_pin = f"pytest=={importlib.metadata.version('pytest')}"
    run_quietly([*pip, pytest_pin, *suite.deps], f"cannot install {pytest_pin} {' '.join(suite.deps)} from PyPI")
    run_quietly([*pip, "--no-deps", str(source)], f"cannot install {suite.project} from {source}")
    run_quietly([*pip, "--no-deps", "-e", str(ROOT)], f"cannot install pytest-runs from {ROOT}")
    marker.write_text(wanted)
    return python


def final_counts(output: str) -> str:
    """pytest's final counts ("672 passed"), or what stood in its place."""
    for line in reversed(output.splitlines()):
        if match := FINAL_LINE.match(line.strip()):
            return match["counts"]
    return "no final line"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=sorted(SUITES), default="boltons")
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "pytest-runs-bench-suite")
    args = parser.parse_args()
    suite = SUITES[args.suite]
    workdir: Path = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    source = fetch(suite, workdir)
    python = make_venv(suite, workdir, source)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(dir=workdir, prefix="state-") as state:
        base = [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", *suite.args]
        variants = {
            "absent (-p no:runs)": [*base, "-p", "no:runs"],
            "installed, off": base,
            "on (--runs-machine)": [*base, "--runs-machine=bench", f"--runs-state-dir={state}"],
        }
        # Bytecode caches as Python keeps them by default, also where PYTHONDONTWRITEBYTECODE is set:
        # else every session compiles pytest-runs (and pytest rewrites the suite's asserts) anew.
        dropped = ("PYTEST_ADDOPTS", "PYTHONDONTWRITEBYTECODE")
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_RUNS_") and k not in dropped}
        walls: dict[str, list[float]] = {name: [] for name in variants}
        cpus: dict[str, list[float]] = {name: [] for name in variants}
        outcomes: dict[str, set[str]] = {name: set() for name in variants}
        names = list(variants)
        for round_ in range(args.repeat + 1):
            # Rotate the order every round so that no variant always runs first or last.
            for name in names[round_ % 3 :] + names[: round_ % 3]:
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                start = time.perf_counter()
                done = subprocess.run(variants[name], cwd=source, env=env, capture_output=True, text=True, check=False)
                wall = time.perf_counter() - start
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                outcomes[name].add(f"{final_counts(done.stdout)} (exit {done.returncode})")
                if round_ == 0:
                    continue  # the warm-up: bytecode caches, the page cache, the test folder's hash cache
                walls[name].append(wall)
                cpus[name].append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    load_after = os.getloadavg()[0]
    wall_ref = statistics.median(walls[names[0]])
    cpu_ref = statistics.median(cpus[names[0]])
    print(f"{suite.project} {suite.version}: {' '.join(['pytest', *suite.args])} in {source}")
    print(f"{'variant':<22}  {'median s':>8}  {'vs absent':>9}  {'paired':>6}  {'cpu s':>6}  {'vs absent':>9}")
    for name in names:
        wall, cpu = statistics.median(walls[name]), statistics.median(cpus[name])
        # The median of each round's ratio to "absent" in that round: load that drifts cancels out.
        paired = statistics.median(w / a for w, a in zip(walls[name], walls[names[0]], strict=True))
        print(f"{name:<22}  {wall:>8.3f}  {wall / wall_ref:>9.3f}  {paired:>6.3f}  {cpu:>6.3f}  {cpu / cpu_ref:>9.3f}")
    print(
        f"{args.repeat} interleaved runs of each variant in a new process, after one warm-up round; "
        f"load average {load_before:.1f} before, {load_after:.1f} after"
    )
    for name in names:
        print(f"tests, {name}: {' | '.join(sorted(outcomes[name]))}")
    if len({frozenset(found) for found in outcomes.values()}) != 1:
        print("WARNING: the variants did not end alike")


if __name__ == "__main__":
    main()
