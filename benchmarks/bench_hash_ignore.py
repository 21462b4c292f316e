"""The cost of honouring ``.gitignore`` files when hashing a test folder of 5,000 files.

    .venv/bin/python benchmarks/bench_hash_ignore.py [--repeat 7]
    PYTHONPATH=/path/to/older/checkout .venv/bin/python benchmarks/bench_hash_ignore.py   # the same, before

Two trees of 5,000 files of 2 KB in 50 folders: ``plain`` has no ``.gitignore``; ``gitignore``
has a project's ``.gitignore`` at the top (GitHub's Python template, 60-odd patterns, negations
and folder patterns among them) and a small one in each of 10 folders, and 300 more files that
they leave out (logs, a ``.hypothesis`` database, a ``build`` folder). For each: the least
time (and CPU time) of a cold hash (no cache) and of a warm one (an unchanged tree, with its stat
cache), the least of ``--repeat`` runs. Run it
against an older checkout too (``PYTHONPATH``) and divide: the ratio is what honouring the
``.gitignore`` files costs (the older code hashes the files they leave out instead).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest_runs.hashing
from pytest_runs.hashing import RACY_SECONDS, HashCache, hash_test_dir

# A trimmed copy of GitHub's Python.gitignore, with a negation and a few anchored patterns.
PYTHON_GITIGNORE = """\
# Byte-compiled / optimized / DLL files
__pycache__/
*.py[cod]
*$py.class
*.so
.Python
build/
develop-eggs/
dist/
downloads/
eggs/
.eggs/
lib/
lib64/
parts/
sdist/
var/
wheels/
share/python-wheels/
*.egg-info/
.installed.cfg
*.egg
MANIFEST
*.manifest
*.spec
pip-log.txt
pip-delete-this-directory.txt
htmlcov/
.tox/
.nox/
.coverage
.coverage.*
.cache
nosetests.xml
coverage.xml
*.cover
*.py,cover
.hypothesis/
.pytest_cache/
cover/
*.mo
*.pot
*.log
!important.log
local_settings.py
db.sqlite3
db.sqlite3-journal
instance/
.webassets-cache
.scrapy
docs/_build/
.pybuilder/
target/
.ipynb_checkpoints
profile_default/
ipython_config.py
.pdm.toml
__pypackages__/
celerybeat-schedule
celerybeat.pid
*.sage.py
.env
.venv
env/
venv/
ENV/
/site
.mypy_cache/
.dmypy.json
dmypy.json
.pyre/
.pytype/
cython_debug/
/d0*/generated/**
"""


def best_s(action: Callable[[], object], repeat: int) -> tuple[float, float]:
    """The least wall time and the least CPU time of ``repeat`` runs (on a shared machine the least
    is the run others disturbed least; CPU time does not count waiting for a core)."""
    action()
    walls, cpus = [], []
    for _ in range(repeat):
        started, cpu = time.perf_counter(), time.process_time()
        action()
        walls.append(time.perf_counter() - started)
        cpus.append(time.process_time() - cpu)
    return min(walls), min(cpus)


def build(root: Path, with_gitignore: bool) -> None:
    block = os.urandom(2048)
    for index in range(5000):
        folder = root / f"d{index % 50:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"test_{index:05d}.py").write_bytes(block[index % 256 :] + block[: index % 256])
    if with_gitignore:
        (root / ".gitignore").write_text(PYTHON_GITIGNORE)
        for index in range(10):
            (root / f"d{index:02d}" / ".gitignore").write_text("*.tmp\n!keep.tmp\nfixtures/out/\n")
        for index in range(100):
            (root / f"d{index % 50:02d}" / f"run{index}.log").write_text("log")
        for index in range(150):
            path = root / ".hypothesis" / "examples" / f"{index:04x}" / "x"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("example")
        for index in range(50):
            path = root / "build" / "lib" / f"m{index}.py"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("built")
    past = time.time() - 3600
    for path in root.rglob("*"):
        os.utime(path, (past, past), follow_symlinks=False)
    time.sleep(RACY_SECONDS + 0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    print(f"pytest_runs from {Path(pytest_runs.hashing.__file__).parent}")
    print(f"{'tree':<10} {'cold s':>8} {'cold cpu':>9} {'warm s':>8} {'warm cpu':>9}")
    for name, with_gitignore in (("plain", False), ("gitignore", True)):
        with tempfile.TemporaryDirectory() as folder:
            root = Path(folder) / "tree"
            build(root, with_gitignore)
            cache_file = Path(folder) / "cache"

            def cold(root: Path = root) -> str:
                return hash_test_dir(root)

            def warm(root: Path = root, cache_file: Path = cache_file) -> str:
                return hash_test_dir(root, cache=HashCache(cache_file))

            (cold_s, cold_cpu), (warm_s, warm_cpu) = best_s(cold, args.repeat), best_s(warm, args.repeat)
            print(f"{name:<10} {cold_s:>8.4f} {cold_cpu:>9.4f} {warm_s:>8.4f} {warm_cpu:>9.4f}")
    print(f"best of {args.repeat}")


if __name__ == "__main__":
    main()
