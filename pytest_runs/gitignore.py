"""Which files a test folder's ``.gitignore`` files leave out, by git's own rules.

A small, self-contained matcher (the standard library only) for the rules of gitignore(5), as
git's ``dir.c`` and ``wildmatch.c`` apply them, on the bytes of each name:

- A line is a pattern; blank lines and lines starting with ``#`` are none. Trailing spaces
  are dropped unless escaped (``\\ ``), as is a trailing CR; a NUL ends the pattern (git reads
  patterns as C strings); a UTF-8 BOM at the start of the file is skipped.
- ``!`` negates (re-includes); ``\\!`` and ``\\#`` are literal. A trailing ``/`` matches only
  folders. A pattern with no other ``/`` matches a name at any depth below its file's folder;
  one with a ``/`` at the start or in the middle matches the path relative to that folder.
- ``*`` and ``?`` never match ``/``; ``[...]`` is a set (``!`` or ``^`` negates, ranges,
  ``[:alpha:]`` and git's other classes, ASCII only), never matching ``/``; ``\\`` escapes the
  next character. ``**`` as a whole segment: ``**/x`` matches ``x`` in any folder, ``a/**/b``
  zero or more folders between, ``a/**`` everything inside ``a``; elsewhere ``**`` is ``*``.
  A malformed pattern (an unclosed ``[``, an unknown class, a trailing ``\\``) matches nothing,
  as in git.
- Within a file the last matching pattern decides; a deeper folder's ``.gitignore`` goes
  before its parents'. A folder left out is not entered, so nothing in it can be re-included
  (and its own ``.gitignore`` is not read).

Matching is case-sensitive (git's default on Linux, ``core.ignorecase=false``). Only the
``.gitignore`` files inside the test folder count: not those of folders above it, nor
``.git/info/exclude`` nor a user's ``core.excludesFile``, so that the same tree gives the same
identity wherever it is and whoever hashes it.

Each pattern becomes a regular expression with atomic groups where git's matcher would
backtrack, so that no pattern, however hostile, costs more than a few passes over a path:
stars in a name take the leftmost fit of the fixed part that follows them (as ``fnmatch`` does
since Python 3.11), and ``**`` the leftmost folder where the segments up to the next ``**`` fit.
Patterns without wildcards, ``*.suffix`` and ``prefix*`` are looked up in sets. A ``.gitignore``
of more than :data:`MAX_BYTES`, or with more than :data:`MAX_WILD` other patterns, is not read
(its rules do not apply), as git does past its own limit (100 MiB).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterable

__all__ = ["MAX_BYTES", "MAX_WILD", "IgnoreFile", "parse"]

#: A ``.gitignore`` bigger than this is not read (git's own limit is 100 MiB).
MAX_BYTES = 256 << 10
#: Nor one with more patterns than this that need a regular expression (every pattern but a plain
#: name or path, ``*.suffix`` and ``prefix*``): each costs a little for every file hashed.
MAX_WILD = 1000

_FS_ENCODING = sys.getfilesystemencoding()
_FS_ERRORS = sys.getfilesystemencodeerrors()
# Patterns per compiled expression: bounds the size of each, whatever the file holds.
_CHUNK = 256

# git's character classes (sane_ctype: ASCII only).
_UPPER, _LOWER, _DIGIT = range(0x41, 0x5B), range(0x61, 0x7B), range(0x30, 0x3A)
_PUNCT = [c for c in range(0x21, 0x7F) if not (c in _UPPER or c in _LOWER or c in _DIGIT)]
_CLASSES: dict[bytes, list[int]] = {
    b"alnum": [*_UPPER, *_LOWER, *_DIGIT],
    b"alpha": [*_UPPER, *_LOWER],
    b"blank": [0x20, 0x09],
    b"cntrl": [*range(0x20), 0x7F],
    b"digit": list(_DIGIT),
    b"graph": list(range(0x21, 0x7F)),
    b"lower": list(_LOWER),
    b"print": list(range(0x20, 0x7F)),
    b"punct": _PUNCT,
    b"space": [0x20, 0x09, 0x0A, 0x0B, 0x0C, 0x0D],
    b"upper": list(_UPPER),
    b"xdigit": [*_DIGIT, *range(0x41, 0x47), *range(0x61, 0x67)],
}

_SLASH = ord("/")
# Tokens of a pattern: a literal byte (bytes, ``/`` too), a regex for one byte (str), or a run of stars.
_STAR = object()  # one star
_GLOBSTAR = object()  # two or more: ``**``, special only as a whole segment


class _Malformed(Exception):
    """A pattern git's matcher gives up on: it matches nothing."""


class _Matcher:
    """One block of consecutive patterns of the same sign: names and paths, literal and wild."""

    def __init__(self) -> None:
        self.names: set[bytes] = set()
        self.paths: set[bytes] = set()
        # "*.log" and "test_*" names, by the length of their literal part.
        self.suffixes: dict[int, set[bytes]] = {}
        self.prefixes: dict[int, set[bytes]] = {}
        self.name_wild: list[bytes] = []
        self.path_wild: list[bytes] = []
        self.name_match: list[Callable[[bytes], object]] = []
        self.path_match: list[Callable[[bytes], object]] = []

    def compile(self) -> None:
        self.name_match = _compiled(self.name_wild)
        self.path_match = _compiled(self.path_wild)

    def __call__(self, name: bytes, path: bytes) -> bool:
        if name in self.names or path in self.paths:
            return True
        size = len(name)
        for length, suffixes in self.suffixes.items():
            if length <= size and name[size - length :] in suffixes:
                return True
        for length, prefixes in self.prefixes.items():
            if length <= size and name[:length] in prefixes:
                return True
        return any(match(name) for match in self.name_match) or any(match(path) for match in self.path_match)


class IgnoreFile:
    """The compiled patterns of one ``.gitignore``.

    :meth:`verdict` tells for an entry below the file's folder: ``True`` left out, ``False``
    re-included by a ``!`` pattern, ``None`` no pattern matches (a parent's file decides).
    """

    def __init__(self, lines: Iterable[bytes]) -> None:
        # (negated, matcher for files and symlinks, matcher for folders), in file order.
        self._blocks: list[tuple[bool, _Matcher, _Matcher]] = []
        #: Whether the file had too many patterns that need a regular expression, and is not read.
        self.too_wild = False
        # Every pattern, whatever its sign: most names match none, and are told so in one look.
        self._any = (_Matcher(), _Matcher())
        parsed_lines = [parsed for line in lines if (parsed := _parse_line(line)) is not None]
        if sum(kind.endswith("-wild") for _, _, kind, _ in parsed_lines) > MAX_WILD:
            self.too_wild = True
            return
        for negated, folders_only, kind, text in parsed_lines:
            if not self._blocks or self._blocks[-1][0] != negated:
                self._blocks.append((negated, _Matcher(), _Matcher()))
            _, files, folders = self._blocks[-1]
            for matcher in (folders, self._any[1]) if folders_only else (files, folders, *self._any):
                if kind == "name":
                    matcher.names.add(text)
                elif kind == "path":
                    matcher.paths.add(text)
                elif kind == "name-suffix":
                    matcher.suffixes.setdefault(len(text), set()).add(text)
                elif kind == "name-prefix":
                    matcher.prefixes.setdefault(len(text), set()).add(text)
                elif kind == "name-wild":
                    matcher.name_wild.append(text)
                else:
                    matcher.path_wild.append(text)
        for _, files, folders in [*self._blocks, (False, *self._any)]:
            files.compile()
            folders.compile()

    def __bool__(self) -> bool:
        return bool(self._blocks)

    def verdict(self, name: bytes, path: bytes, is_dir: bool) -> bool | None:
        """``name`` is the entry's own name, ``path`` its path relative to this file's folder."""
        if len(self._blocks) > 1 and not self._any[is_dir](name, path):
            return None
        for negated, files, folders in reversed(self._blocks):
            if (folders if is_dir else files)(name, path):
                return not negated
        return None


def parse(data: bytes) -> IgnoreFile:
    """The patterns of a ``.gitignore`` whose content is ``data``."""
    return IgnoreFile(data.removeprefix(b"\xef\xbb\xbf").split(b"\n"))


def encode(text: str) -> bytes:
    """A name as the file system's bytes (what git matches)."""
    return text.encode(_FS_ENCODING, _FS_ERRORS)


# -- one line ---------------------------------------------------------------------------------


def _parse_line(line: bytes) -> tuple[bool, bool, str, bytes] | None:
    """(negated, folders only, kind, literal or regex) of one line, or ``None`` for no pattern.

    kind: ``name`` / ``path`` (a literal name, or path relative to the file's folder), or
    ``name-suffix`` / ``name-prefix`` (the literal part of ``*.log`` / ``test_*``), or
    ``name-wild`` / ``path-wild`` (a regex for either).
    """
    line = line.partition(b"\0")[0]
    if line.endswith(b"\r"):
        line = line[:-1]
    if not line or line.startswith(b"#"):
        return None
    line = _trim_trailing_spaces(line)
    negated = line.startswith(b"!")
    if negated:
        line = line[1:]
    folders_only = line.endswith(b"/")
    if folders_only:
        line = line[:-1]
    if not line:
        return None
    by_name = b"/" not in line
    if not by_name and line.startswith(b"/"):
        line = line[1:]
    try:
        tokens = _tokens(line)
    except _Malformed:
        return None
    if all(isinstance(token, bytes) for token in tokens):
        literal = b"".join(token for token in tokens if isinstance(token, bytes))
        if by_name:
            return negated, folders_only, "name", literal
        if b"//" in literal or literal.startswith(b"/") or literal.endswith(b"/") or not literal:
            return None  # an empty segment: git's matcher never meets one in a path
        return negated, folders_only, "path", literal
    if by_name:
        stars = [token is _STAR or token is _GLOBSTAR for token in tokens]
        if stars.count(True) == 1 and all(
            isinstance(token, bytes) or star for token, star in zip(tokens, stars, strict=True)
        ):
            literal = b"".join(token for token in tokens if isinstance(token, bytes))
            if stars[0]:
                return negated, folders_only, "name-suffix", literal
            if stars[-1]:
                return negated, folders_only, "name-prefix", literal
        return negated, folders_only, "name-wild", _segment(tokens) + rb"\Z"
    regex = _after_literal_prefix(line) or _path_regex(tokens)
    if regex is None:
        return None
    return negated, folders_only, "path-wild", regex


def _trim_trailing_spaces(line: bytes) -> bytes:
    """git's trim_trailing_spaces: trailing spaces go, unless escaped; a trailing lone backslash keeps them."""
    last_space: int | None = None
    index = 0
    while index < len(line):
        byte = line[index]
        if byte == 0x20:
            if last_space is None:
                last_space = index
        elif byte == 0x5C:
            index += 1
            if index >= len(line):
                return line
            last_space = None
        else:
            last_space = None
        index += 1
    return line if last_space is None else line[:last_space]


def _tokens(pattern: bytes) -> list[object]:
    """Literal bytes, one-byte regexes (``?``, sets, as str), :data:`_STAR` runs and ``/`` (as b"/")."""
    tokens: list[object] = []
    index, size = 0, len(pattern)
    while index < size:
        byte = pattern[index]
        if byte == 0x5C:  # backslash: the next byte is literal
            index += 1
            if index >= size:
                raise _Malformed
            tokens.append(pattern[index : index + 1])
            index += 1
        elif byte == 0x2A:  # a run of stars
            end = index
            while end < size and pattern[end] == 0x2A:
                end += 1
            tokens.append(_GLOBSTAR if end - index >= 2 else _STAR)  # which ** are special is decided later
            index = end
        elif byte == 0x3F:  # ?
            tokens.append("[^/]")
            index += 1
        elif byte == 0x5B:  # [
            regex, index = _bracket(pattern, index + 1)
            tokens.append(regex)
        else:
            tokens.append(pattern[index : index + 1])
            index += 1
    return tokens


def _bracket(pattern: bytes, index: int) -> tuple[str, int]:
    """A set starting after ``[`` at ``index``, as a regex for one byte (never ``/``), and the index after it."""
    size = len(pattern)

    def at(position: int) -> int:
        return pattern[position] if position < size else 0

    p = index
    negated = at(p) in (0x21, 0x5E)  # ! or ^
    if negated:
        p += 1
    members: set[int] = set()
    previous = 0
    current = at(p)
    while True:
        if not current:
            raise _Malformed  # no closing ]
        if current == 0x5C:
            p += 1
            current = at(p)
            if not current:
                raise _Malformed
            members.add(current)
        elif current == 0x2D and previous and at(p + 1) and at(p + 1) != 0x5D:  # a range
            p += 1
            current = at(p)
            if current == 0x5C:
                p += 1
                current = at(p)
                if not current:
                    raise _Malformed
            members.update(range(previous, current + 1))
            current = 0  # the next "-" cannot start a range from here
        elif current == 0x5B and at(p + 1) == 0x3A:  # [:class:]
            start = p + 2
            end = start
            while at(end) and at(end) != 0x5D:
                end += 1
            if not at(end):
                raise _Malformed
            if end - start - 1 < 0 or pattern[end - 1] != 0x3A:
                members.add(0x5B)  # no ":]": a plain "["
            else:
                name = pattern[start : end - 1]
                if name not in _CLASSES:
                    raise _Malformed
                members.update(_CLASSES[name])
                p = end
                current = 0
        else:
            members.add(current)
        previous = current
        p += 1
        current = at(p)
        if current == 0x5D:
            break
    members.discard(_SLASH)
    listed = "".join(f"\\x{member:02x}" for member in sorted(members))
    if negated:
        return f"[^/{listed}]", p + 1
    return (f"[{listed}]" if listed else "(?!)"), p + 1


def _segment(tokens: list[object]) -> bytes:
    """A regex for one name (no ``/``): its stars take the leftmost fit of what follows (atomic groups)."""
    parts: list[list[object]] = [[]]
    for token in tokens:
        if token is _STAR or token is _GLOBSTAR:
            parts.append([])
        else:
            parts[-1].append(token)
    fixed = [b"".join(_one(token) for token in part) for part in parts]
    if len(fixed) == 1:
        return fixed[0]
    middle = b"".join(b"(?>[^/]*?" + part + b")" for part in fixed[1:-1])
    return fixed[0] + middle + b"[^/]*" + fixed[-1]


def _one(token: object) -> bytes:
    if isinstance(token, bytes):
        return re.escape(token)
    assert isinstance(token, str)
    return token.encode("ascii")


def _path_regex(tokens: list[object]) -> bytes | None:
    """A regex for a path (relative to the file's folder) matching the pattern ``tokens``; ``None`` if none can."""
    segments: list[list[object]] = [[]]
    for token in tokens:
        if token == b"/":
            segments.append([])
        else:
            segments[-1].append(token)
    if any(not segment for segment in segments):
        return None  # an empty segment ("a//b"): no path has one
    # Consecutive ``**`` segments are one; a group is the names between two of them.
    items: list[object] = []
    for segment in segments:
        if len(segment) == 1 and segment[0] is _GLOBSTAR:
            if not items or items[-1] is not _GLOBSTAR:
                items.append(_GLOBSTAR)
        elif items and isinstance(items[-1], list):
            items[-1].append(_segment(segment))
        else:
            items.append([_segment(segment)])
    out = b""
    started = False
    pending_star = False
    for position, item in enumerate(items):
        last = position == len(items) - 1
        if item is _GLOBSTAR:
            if last:  # a trailing "/**": one name or more below
                out += (b"/" if started else b"") + b".+"
            pending_star = True
            continue
        assert isinstance(item, list)
        group = b"/".join(item)
        slash = b"/" if started else b""
        if not pending_star:
            out += group
        elif last:
            out += slash + b"(?:[^/]+/)*?" + group
        else:  # the leftmost folder where the group fits: the next ** takes whatever is between
            out += slash + b"(?>(?:[^/]+/)*?" + group + b"(?=/))"
        if last:
            out += rb"\Z"
        started = True
        pending_star = False
    return out


def _after_literal_prefix(pattern: bytes) -> bytes | None:
    """git's reading of a path pattern whose first wildcard is a ``**`` right after a literal part of a name.

    git compares the part before the first wildcard (``*?[\\``) literally and matches the rest on
    its own, where a ``**`` at its start counts as a whole segment: ``b**/x`` matches ``bx``,
    ``b/x`` and ``bq/r/x``, and ``d/b**`` everything below ``d`` that starts with ``b``.
    ``None`` for any other pattern (read as usual).
    """
    first = min((i for i in (pattern.find(c) for c in b"*?[\\") if i >= 0), default=-1)
    if first <= 0 or pattern[first : first + 2] != b"**" or pattern[first - 1] == _SLASH:
        return None
    end = first
    while end < len(pattern) and pattern[end] == 0x2A:
        end += 1
    rest = pattern[end:]
    literal = re.escape(pattern[:first])
    if not rest:
        return literal + b".*"
    if rest.startswith(b"\\/"):
        rest = rest[1:]
    if not rest.startswith(b"/"):
        return None
    try:
        tail = _path_regex(_tokens(rest[1:]))
    except _Malformed:
        return b"(?!)"
    return literal + b"(?:[^/]*/)*?" + tail if tail is not None else b"(?!)"


def _compiled(regexes: list[bytes]) -> list[Callable[[bytes], object]]:
    """Matchers for ``regexes``, a few hundred to an expression; one that cannot be compiled matches nothing."""
    matchers: list[Callable[[bytes], object]] = []
    for start in range(0, len(regexes), _CHUNK):
        chunk = regexes[start : start + _CHUNK]
        try:
            matchers.append(re.compile(b"|".join(b"(?:" + regex + b")" for regex in chunk), re.DOTALL).match)
        except (re.error, OverflowError, RecursionError):
            for regex in chunk:  # one at a time, leaving out those that cannot be compiled
                try:
                    matchers.append(re.compile(regex, re.DOTALL).match)
                except (re.error, OverflowError, RecursionError):
                    continue
    return matchers
