"""The README's shell snippets do what it says they do."""

from __future__ import annotations

import os
import re
import stat
import subprocess
from pathlib import Path

import pytest

README = Path(__file__).parent.parent / "README.md"


def snippet(marker: str) -> str:
    match = re.search(rf"<!-- {marker} -->\n```sh\n(.*?)```", README.read_text(), re.DOTALL)
    assert match is not None, f"no snippet marked {marker} in the README"
    return match.group(1)


@pytest.mark.parametrize(
    ("statuses", "expected_status", "attempts"),
    [([75, 75, 1], 1, 3), ([75, 0], 0, 2), ([2], 2, 1), ([76], 76, 1), ([0], 0, 1)],
)
@pytest.mark.parametrize("shell", [["sh"], ["bash", "-e"]])
def test_the_retry_loop_retries_on_75_and_keeps_every_other_status(
    tmp_path: Path, statuses: list[int], expected_status: int, attempts: int, shell: list[str]
) -> None:
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
        [*shell, "-c", snippet("retry-loop")],
        env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == expected_status, result.stderr
    assert calls.read_text().splitlines() == ["--runs-machine=rig-1"] * attempts
