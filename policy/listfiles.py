"""Reading the admin's list files, in Exim's ``lsearch`` file format.

Format (what an Exim admin already knows, spec chapter "Single-key lookup types"):

* one entry per line: a key, terminated by a colon, white space or the end of the line, then the
  data: the rest of the line after the colon and any white space (``info: alice, bob``);
* a key may be written in double quotes to hold colons or spaces (``"a b": x``), with ``\\"``
  and ``\\\\`` escapes inside;
* a line that starts with white space continues the data of the entry above (joined with a
  space), so long alias lists can be folded;
* ``#`` starts a comment only at the start of a line; blank lines are ignored;
* keys compare case-insensitively; with duplicate keys the first one wins (``mailpolicy check``
  warns about the later ones).

A parse error carries ``path:line``; the caller decides what a broken file means (the loader keeps
the last good version in force).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Entry:
    key: str  # as written, unquoted (not case-folded)
    value: str
    line: int


class ListFileError(Exception):
    """A problem at one line of one file; ``str()`` is ``path:line: message``."""

    def __init__(self, path: str, line: int, message: str) -> None:
        super().__init__(f"{path}:{line}: {message}")
        self.path = path
        self.line = line
        self.message = message


def parse_lsearch(text: Text, path: str) -> list[Entry]:
    """Parse an lsearch file into entries in file order. Raises ListFileError."""
    return list(iter_lsearch(text, path))


def iter_lsearch(text: Text, path: str) -> Iterator[Entry]:
    """``parse_lsearch`` one entry at a time: a 100 000-line file is never a list of entries
    besides the table built from it (the peak size decides the daemon's resident memory)."""
    key = value = ""
    more: list[str] = []  # continuation lines of the entry being read
    start = 0
    for number, raw in enumerate(lines_of(text), 1):
        if not raw or raw[0] == "#":
            continue
        if raw[0] == " " or raw[0] == "\t":
            part = raw.strip()
            if not part:
                continue
            if start == 0:
                raise ListFileError(path, number, "continuation line with no entry above it")
            more.append(part)
            continue
        if start:
            yield Entry(key, " ".join([value, *more]) if more else value, start)
            more = []
        key, value = split_key(raw, path, number)
        start = number
    if start:
        yield Entry(key, " ".join([value, *more]) if more else value, start)


_ITEM_COMMENT = re.compile(r"\s#")


def parse_items(text: Text, path: str) -> Iterator[Entry]:
    """Parse a file of list items, one per line, as Exim reads a file named in a host list:
    ``#`` at the start of a line, or after white space, starts a comment. IPv6 items keep their
    colons (an lsearch key would stop at the first one)."""
    for number, raw in enumerate(lines_of(text), 1):
        item = (_ITEM_COMMENT.split(raw, maxsplit=1)[0] if "#" in raw else raw).strip()
        if item and not item.startswith("#"):
            yield Entry(item, "", number)


def split_lines(text: str) -> Iterator[str]:
    """Lines as Exim reads them: split at LF only (a CR before it is dropped). ``splitlines``
    would also split at form feeds, U+2028 and the like, changing entries and line numbers.
    One line at a time: a list of every line of a 100 000-line file would raise the daemon's
    peak memory, and with it its resident size for good."""
    start, end_of_text = 0, len(text)
    while start < end_of_text:
        end = text.find("\n", start)
        if end < 0:
            end = end_of_text
        line = text[start:end]
        yield line[:-1] if line.endswith("\r") else line
        start = end + 1


_KEY_END = re.compile(r"[: \t]")


def split_key(line: str, path: str, number: int) -> tuple[str, str]:
    if line.startswith('"'):
        chars: list[str] = []
        i = 1
        while i < len(line):
            c = line[i]
            if c == "\\" and i + 1 < len(line):
                chars.append(line[i + 1])
                i += 2
                continue
            if c == '"':
                break
            chars.append(c)
            i += 1
        else:
            raise ListFileError(path, number, "unterminated quoted key")
        key, rest = "".join(chars), line[i + 1 :]
    else:
        found = _KEY_END.search(line)
        end = found.start() if found else len(line)
        key, rest = line[:end], line[end:]
    rest = rest.lstrip(" \t")
    if rest.startswith(":"):
        rest = rest[1:]
    if not key:
        raise ListFileError(path, number, "empty key")
    return key, rest.strip()


Text = str | Iterable[str]  # a whole file, or its lines (``read_lines``) as the parsers take it


def lines_of(text: Text) -> Iterator[str]:
    return split_lines(text) if isinstance(text, str) else iter(text)


_SURROGATE = re.compile("[\ud800-\udfff]")


def read_lines(path: str, rel: str) -> Iterator[str]:
    """The lines of a list file, streamed: a 100 000-line file is never one string in memory
    (its peak stays in the daemon's resident size). UTF-8, split at LF only, a CR before the
    LF dropped, as ``split_lines``. Raises OSError, or ListFileError naming ``rel`` and the
    line that is not UTF-8."""
    with open(path, encoding="utf-8", errors="surrogateescape", newline="\n") as f:
        for number, line in enumerate(f, 1):
            if line.endswith("\n"):
                line = line[:-1]
            if line.endswith("\r"):
                line = line[:-1]
            if not line.isascii() and _SURROGATE.search(line):
                raise ListFileError(rel, number, "not valid UTF-8")
            yield line


def read_text(path: str) -> str:
    """Read a list file as UTF-8 (raises OSError, or ListFileError naming the bad line)."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ListFileError(path, line, "not valid UTF-8") from None
