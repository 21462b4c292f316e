"""Hashing a test folder: cold against the ``sha256sum`` pipeline, and warm (unchanged) against cold.

    .venv/bin/python benchmarks/bench_hash.py [--repeat 5] [--big-mib 50]

Two trees, built in a temporary folder: 5,000 files of 2 KB, and 20 files of ``--big-mib``
MiB. For each: ``find DIR -type f -print0 | sort -z | xargs -0 sha256sum`` (the yardstick),
``hash_test_dir`` with no cache (cold), and ``hash_test_dir`` with a warm cache of the
unchanged tree. The page cache is warm for all three (each is run once before timing),
so this measures hashing, not the disk. Prints medians and the ratios asked for:
cold throughput / pipeline throughput (target >= 0.8) and warm time / cold time (<= 0.1).

The last column, "stat/cold", is the floor under warm/cold: the time of only listing the
tree and ``lstat``-ing each file (``os.scandir`` and ``DirEntry.stat``, nothing else), which
any cache keyed on each file's stat must pay, over the cold time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from pytest_runs.hashing import RACY_SECONDS, HashCache, hash_test_dir


def median_s(action: Callable[[], object], repeat: int) -> float:
    action()  # warm the page cache (and, for the warm variant, the hash cache)
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        action()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def build(root: Path, files: int, size: int) -> None:
    block = os.urandom(size)
    for index in range(files):
        folder = root / f"d{index % 50:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"f{index:05d}.bin").write_bytes(block[index % 256 :] + block[: index % 256])
    # Old enough that the cache may trust every file (the racy-git rule skips fresh ones).
    past = time.time() - 3600
    for path in root.rglob("*.bin"):
        os.utime(path, (past, past))
    time.sleep(RACY_SECONDS + 0.5)  # and the ctime that utime set is old enough too


def stat_only(folder: str) -> None:
    """Only list the tree and lstat each file: the least a cache keyed on every file's stat can cost."""
    with os.scandir(folder) as listing:
        for entry in listing:
            if entry.is_dir(follow_symlinks=False):
                stat_only(entry.path)
            else:
                entry.stat(follow_symlinks=False)


def pipeline(root: Path) -> None:
    subprocess.run(f"find {root} -type f -print0 | sort -z | xargs -0 sha256sum > /dev/null", shell=True, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--big-mib", type=int, default=50)
    args = parser.parse_args()
    header = ("tree", "pipeline s", "cold s", "warm s", "stat s", "cold/pipeline throughput", "warm/cold", "stat/cold")
    print(
        f"{header[0]:<18} {header[1]:>10} {header[2]:>8} {header[3]:>8} {header[4]:>8} {header[5]:>25} "
        f"{header[6]:>10} {header[7]:>10}"
    )
    for name, files, size in (("5000 x 2 KB", 5000, 2048), (f"20 x {args.big_mib} MiB", 20, args.big_mib << 20)):
        with tempfile.TemporaryDirectory() as folder:
            root = Path(folder) / "tree"
            build(root, files, size)
            cache_file = Path(folder) / "cache"

            def yardstick_run(root: Path = root) -> None:
                pipeline(root)

            def cold_hash(root: Path = root) -> str:
                return hash_test_dir(root)

            def warm_hash(root: Path = root, cache_file: Path = cache_file) -> str:
                return hash_test_dir(root, cache=HashCache(cache_file))

            def stat_walk(root: Path = root) -> None:
                stat_only(str(root))

            yardstick = median_s(yardstick_run, args.repeat)
            cold = median_s(cold_hash, args.repeat)
            warm = median_s(warm_hash, args.repeat)
            floor = median_s(stat_walk, args.repeat)
            print(
                f"{name:<18} {yardstick:>10.3f} {cold:>8.3f} {warm:>8.3f} {floor:>8.3f} {yardstick / cold:>25.2f} "
                f"{warm / cold:>10.3f} {floor / cold:>10.3f}"
            )
    print(f"medians of {args.repeat}; throughput ratio = pipeline time / cold time (same bytes)")


if __name__ == "__main__":
    main()
