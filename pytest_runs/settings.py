"""Settings shared by the plugin and the command line: where the store is, what a valid value is."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from pathlib import Path

__all__ = [
    "DEFAULT_LOCK_TIMEOUT",
    "KEEP_ENV",
    "LEASE_ENV",
    "LOCK_TIMEOUT_ENV",
    "MAX_SECONDS",
    "STATE_DIR_ENV",
    "STORE_ENV",
    "check_machine_name",
    "default_state_dir",
    "mask_url",
    "parse_keep",
    "parse_seconds",
    "resolve_state_dir",
    "split_store",
]

STATE_DIR_ENV = "PYTEST_RUNS_STATE_DIR"
LEASE_ENV = "PYTEST_RUNS_LEASE"
LOCK_TIMEOUT_ENV = "PYTEST_RUNS_LOCK_TIMEOUT"
KEEP_ENV = "PYTEST_RUNS_KEEP"
STORE_ENV = "PYTEST_RUNS_STORE"
#: Seconds a store call waits for the store's lock before giving up.
DEFAULT_LOCK_TIMEOUT = 10.0
#: The longest time any setting may give: ten years. Longer ones overflow the system's timers.
MAX_SECONDS = 10 * 365 * 86400.0
_MACHINE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")


def default_state_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """``$XDG_STATE_HOME/pytest-runs``, else ``~/.local/state/pytest-runs``."""
    xdg = environ.get("XDG_STATE_HOME", "")
    # The XDG spec says a relative value is invalid and must be ignored.
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".local" / "state"
    return base / "pytest-runs"


def resolve_state_dir(given: str | None, environ: Mapping[str, str] = os.environ) -> Path:
    """The state dir: ``given`` if set, else ``$PYTEST_RUNS_STATE_DIR``, else the default."""
    chosen = given or environ.get(STATE_DIR_ENV) or ""
    return Path(chosen).expanduser() if chosen else default_state_dir(environ)


def check_machine_name(name: str) -> str:
    """Return ``name`` if it is a valid machine name, else raise ``ValueError`` saying why."""
    if not _MACHINE_NAME.fullmatch(name):
        raise ValueError(
            f"invalid machine name {name!r}: use 1-128 characters from letters, digits and '._-:@', "
            "starting with a letter or digit"
        )
    return name


def parse_seconds(text: str, what: str, *, allow_zero: bool = True) -> float:
    """A non-negative, finite number of seconds; ``ValueError`` naming ``what`` otherwise."""
    try:
        seconds = float(text)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number of seconds, not {text!r}") from None
    if not math.isfinite(seconds) or seconds < 0 or (seconds == 0 and not allow_zero):
        limit = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{what} must be a {limit} number of seconds, not {text!r}")
    if seconds > MAX_SECONDS:
        raise ValueError(f"{what} must be at most {MAX_SECONDS:.0f} seconds (ten years), not {text!r}")
    return seconds


def parse_keep(text: str, what: str) -> int:
    """Retention: how many ended runs of each machine to keep, a whole number >= 0; ``ValueError`` naming ``what``."""
    value = text.strip()
    if not value.isascii() or not value.isdigit() or len(value) > 12:
        raise ValueError(f"{what} must be a whole number of runs to keep (0 or more), not {text!r}")
    return int(value)


def split_store(given: str | None) -> tuple[str | None, Path | None]:
    """A store setting as ``(database URL, None)``, ``(None, folder)`` or ``(None, None)`` when unset.

    ``postgresql://`` and ``postgres://`` select the database; ``file:PATH`` (or
    ``file://PATH``) and a plain path select the JSON files in that folder. Raises
    :class:`ValueError` (one line) for a setting that is the user's mistake: an unknown kind, or a
    database URL that cannot be parsed or names no database (see :func:`pgbackend.parse_url`);
    whether the database can be reached is only found when the store is opened.
    """
    if not given:
        return None, None
    if given.startswith(("postgresql://", "postgres://")):
        from .pgbackend import parse_url

        parse_url(given)  # a URL that is the user's mistake is found here, not deep inside a session
        return given, None
    if given.startswith("file:"):
        path = given.removeprefix("file:")
        path = path.removeprefix("//") if path.startswith("//") else path
        return None, Path(path).expanduser()
    if "://" in given:
        scheme = given.split("://", 1)[0]
        where = given.split("@")[-1]  # never the credentials
        raise ValueError(f"store {where!r}: unknown kind {scheme!r}; use postgresql://..., file:PATH or a path")
    return None, Path(given).expanduser()


_URL_IN_TEXT = re.compile(r"(postgres(?:ql)?://)([^\s@/]*)@")


def mask_url(text: str) -> str:
    """``text`` with the password of any database URL in it replaced by ``***``."""

    def masked(match: re.Match[str]) -> str:
        user, colon, _ = match.group(2).partition(":")
        return f"{match.group(1)}{user}{':***' if colon else ''}@"

    return _URL_IN_TEXT.sub(masked, text)
