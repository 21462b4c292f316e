"""The README's shell snippets do what it says they do."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pytest_runs import Run, Status, Store

README = Path(__file__).parent.parent / "README.md"
#: The CI recipes, GitHub Actions and GitLab CI.
RECIPES = ["ci-github", "ci-gitlab"]


def snippet(marker: str, language: str = "sh") -> str:
    match = re.search(rf"<!-- {marker} -->\n```{language}\n(.*?)```", README.read_text(), re.DOTALL)
    assert match is not None, f"no snippet marked {marker} in the README"
    return match.group(1)


def recipe_shell(marker: str, first: str, last: str) -> str:
    """The shell lines of a CI recipe from the one that starts with ``first`` to the one that starts with ``last``.

    Lines of a YAML block (``run: |``, ``- |``) and items of a YAML list of commands alike.
    """
    lines = snippet(marker, "yaml").splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().removeprefix("- ").startswith(first))
    end = next(i for i, line in enumerate(lines) if i >= start and line.strip().removeprefix("- ").startswith(last))
    chosen = lines[start : end + 1]
    if chosen[0].lstrip().startswith("- "):
        return "".join(line.strip().removeprefix("- ") + "\n" for line in chosen)
    return textwrap.dedent("\n".join(chosen)) + "\n"


def retry_loop(source: str) -> tuple[str, str]:
    """The retry loop of ``source`` (the README's own, or a CI recipe's) and the arguments it gives pytest."""
    if source == "retry-loop":
        return snippet(source), "--runs-machine=rig-1"
    return recipe_shell(source, "while :; do", 'exit "$status"'), "--runs-machine=rig-1 tests/hil"


@pytest.mark.parametrize(
    ("statuses", "expected_status", "attempts"),
    [([75, 75, 1], 1, 3), ([75, 0], 0, 2), ([2], 2, 1), ([76], 76, 1), ([0], 0, 1)],
)
@pytest.mark.parametrize("shell", [["sh"], ["bash", "-e"]])
@pytest.mark.parametrize("source", ["retry-loop", *RECIPES])
def test_the_retry_loop_retries_on_75_and_keeps_every_other_status(
    tmp_path: Path, statuses: list[int], expected_status: int, attempts: int, shell: list[str], source: str
) -> None:
    loop, arguments = retry_loop(source)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    # A stand-in pytest that exits with the next status of the list; a sleep that does not wait.
    fake_pytest = bin_dir / "pytest"
    fake_pytest.write_text(
        "#!/bin/sh\n"
        f'n=$(wc -l < "{calls}" 2>/dev/null || echo 0)\n'
        f'echo "$*" >> "{calls}"\n'
        f"set -- {' '.join(map(str, statuses))}\n"
        'shift "$n"\n'
        'exit "$1"\n'
    )
    (bin_dir / "sleep").write_text("#!/bin/sh\nexit 0\n")
    for tool in bin_dir.iterdir():
        tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
    result = subprocess.run(
        [*shell, "-c", loop],
        env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == expected_status, result.stderr
    assert calls.read_text().splitlines() == [arguments] * attempts


def _ended_run(store: Store, batch: str) -> Run:
    run = store.create(Run(machine="rig-1", test_dir="/t", test_dir_hash="ab" * 32, batch_id=batch))
    store.start(run.id)
    folder = store.make_run_dir(run.id)
    (folder / "log.jsonl").write_text(f'{{"event": "session_start", "run_id": "{run.id}"}}\n')
    (folder / "artifacts" / "serial.log").write_text(f"serial of {batch}\n")
    run = store.get(run.id)
    run.logs_path, run.artifacts_path = str(folder / "log.jsonl"), str(folder / "artifacts")
    store.update(run)
    return store.finish(run.id, Status.FAILED, exit_code=1)


@pytest.mark.parametrize("recipe", RECIPES)
def test_a_ci_recipe_keeps_its_own_jobs_run_and_nobody_elses(tmp_path: Path, recipe: str) -> None:
    state = tmp_path / "state"
    store = Store(state)
    mine = _ended_run(store, "job-7")
    _ended_run(store, "job-8")  # another job's run on the same machine, newer
    collect = recipe_shell(recipe, "pytest-runs list --batch", 'if [ -n "$run_dir" ]')
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"

    def job(batch: str) -> Path:
        workspace = tmp_path / batch
        workspace.mkdir()
        env = {**os.environ, "PATH": path, "PYTEST_RUNS_STATE_DIR": str(state), "PYTEST_RUNS_BATCH": batch}
        # GitHub Actions runs its steps with bash -e -o pipefail; GitLab with bash -e too.
        result = subprocess.run(
            ["bash", "-e", "-o", "pipefail", "-c", collect], cwd=workspace, env=env, capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr
        return workspace

    workspace = job("job-7")
    assert [run["id"] for run in json.loads((workspace / "pytest-run.json").read_text())] == [mine.id]
    assert mine.id in (workspace / "pytest-run" / "log.jsonl").read_text()
    assert (workspace / "pytest-run" / "artifacts" / "serial.log").read_text() == "serial of job-7\n"
    # A job whose every attempt found the rig busy recorded no run: nothing to keep, and no failure.
    workspace = job("job-9")
    assert json.loads((workspace / "pytest-run.json").read_text()) == []
    assert not (workspace / "pytest-run").exists()


@pytest.mark.parametrize(("recipe", "upload", "always"), [
    ("ci-github", "- uses: actions/upload-artifact", "if: always()"),
    ("ci-gitlab", "  artifacts:", "when: always"),
])  # fmt: skip
def test_a_ci_recipe_uploads_what_it_collects_and_the_report(recipe: str, upload: str, always: str) -> None:
    made, uploaded = snippet(recipe, "yaml").split(upload)
    assert "> pytest-run.json" in made and 'cp -R "$run_dir" pytest-run;' in made
    assert "pytest-runs report --html runs.html --since 7d" in made
    assert all(name in uploaded for name in ("pytest-run.json", "pytest-run/", "runs.html"))
    assert always in uploaded, "the upload happens whether the tests passed or not"
