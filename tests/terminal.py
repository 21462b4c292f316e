"""Run a command with a pseudo-terminal as its stdout and stderr, as a person would see it."""

from __future__ import annotations

import os
import pty
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path


def run_on_a_terminal(argv: Sequence[str], env: Mapping[str, str], cwd: Path | None = None) -> tuple[int, str]:
    primary, secondary = pty.openpty()
    with subprocess.Popen(list(argv), stdout=secondary, stderr=secondary, env=dict(env), cwd=cwd) as process:
        os.close(secondary)
        chunks = []
        while True:
            try:
                chunk = os.read(primary, 4096)
            except OSError:  # EIO: the other side closed
                break
            if not chunk:
                break
            chunks.append(chunk)
    os.close(primary)
    return process.returncode, b"".join(chunks).decode(errors="replace")
