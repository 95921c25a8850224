"""policy.listfiles: Exim lsearch syntax, host-list items, UTF-8 reading."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policy.listfiles import (
    Entry,
    ListFileError,
    parse_items,
    parse_lsearch,
    read_text,
    split_key,
)
from policy.mailtree import parse_aliases, parse_rewrite_domains


def kv(entries: list[Entry]) -> list[tuple[str, str, int]]:
    return [(e.key, e.value, e.line) for e in entries]


# --- lsearch -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "key", "value"),
    [
        ("info: alice, bob", "info", "alice, bob"),
        ("info:alice", "info", "alice"),
        ("info :  alice  ", "info", "alice"),
        ("info alice", "info", "alice"),
        ("info\talice", "info", "alice"),
        ("info", "info", ""),
        ("info:", "info", ""),
        ("a:b: c", "a", "b: c"),
        ("*: carol", "*", "carol"),
        ("*.example.org", "*.example.org", ""),
        ("^bounce-[0-9]+@x$", "^bounce-[0-9]+@x$", ""),
        ('"a b": x', "a b", "x"),
        ('"a:b":x', "a:b", "x"),
        ('"a\\"b": x', 'a"b', "x"),
        ('"a\\\\b": x', "a\\b", "x"),
        ('"a b" x', "a b", "x"),
        ('"#x": y', "#x", "y"),
        ("key: value # not a comment", "key", "value # not a comment"),
    ],
)
def test_lsearch_line(line: str, key: str, value: str) -> None:
    assert kv(parse_lsearch(line + "\n", "f")) == [(key, value, 1)]


def test_lsearch_comments_blank_lines_and_continuations() -> None:
    text = (
        "# a comment\n"
        "\n"
        "info: alice,\n"
        "   bob,\n"
        "\tcarol\n"
        "   \n"
        "# comment inside the entry\n"
        "  dave\n"
        "sales: bob\n"
        "#nospace: x\n"
        "webmaster: alice\n"
    )
    assert kv(parse_lsearch(text, "f")) == [
        ("info", "alice, bob, carol dave", 3),
        ("sales", "bob", 9),
        ("webmaster", "alice", 11),
    ]


def test_lsearch_hash_only_starts_a_comment_at_line_start() -> None:
    # "#" after the start is data; an indented "#" line is a continuation.
    assert kv(parse_lsearch("a: x\n  # more\n", "f")) == [("a", "x # more", 1)]
    assert kv(parse_lsearch("a#b: x\n", "f")) == [("a#b", "x", 1)]


def test_lsearch_keeps_duplicates_in_order_first_wins_in_consumers() -> None:
    text = "info: alice\nINFO: bob\ninfo: carol\n"
    assert kv(parse_lsearch(text, "f")) == [
        ("info", "alice", 1),
        ("INFO", "bob", 2),
        ("info", "carol", 3),
    ]
    aliases = parse_aliases(text, "aliases/example.org")
    assert aliases["info"].targets == ("alice",)
    assert aliases["info"].line == 1
    rewrite = parse_rewrite_domains("a.example: b.example\nA.EXAMPLE: c.example\n", "f")
    assert rewrite == {"a.example": ("b.example", 1)}


def test_lsearch_crlf_and_no_final_newline() -> None:
    assert kv(parse_lsearch("a: x\r\nb: y\r\n  z", "f")) == [("a", "x", 1), ("b", "y z", 2)]
    assert parse_lsearch("", "f") == []
    assert parse_lsearch("\n\n# only comments\n", "f") == []


def test_lsearch_lines_split_only_at_lf() -> None:
    # A form feed or U+2028 inside a line is not a line break (Exim reads LF-terminated lines),
    # so entries and line numbers agree with read_text and with the admin's editor.
    assert kv(parse_lsearch("a: x\x0cb: y\nc: z\u2028 d\n", "f")) == [
        ("a", "x\x0cb: y", 1),
        ("c", "z\u2028 d", 2),
    ]
    with pytest.raises(ListFileError) as info:
        parse_lsearch('a: x\x0c\n"bad: y\n', "f")
    assert info.value.line == 2


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("  continued: x\n", 1, "continuation line with no entry above it"),
        ("# c\n\n\tx\n", 3, "continuation line with no entry above it"),
        ('a: b\n"unterminated: x\n', 2, "unterminated quoted key"),
        ('a: b\n\n"a\\": x\n', 3, "unterminated quoted key"),
        ('"": x\n', 1, "empty key"),
        (":x\n", 1, "empty key"),
    ],
)
def test_lsearch_errors_carry_path_and_line(text: str, line: int, message: str) -> None:
    with pytest.raises(ListFileError) as info:
        parse_lsearch(text, "aliases/example.org")
    e = info.value
    assert (e.path, e.line, e.message) == ("aliases/example.org", line, message)
    assert str(e) == f"aliases/example.org:{line}: {message}"


def test_split_key_direct() -> None:
    assert split_key('"x y" : z', "f", 7) == ("x y", "z")
    with pytest.raises(ListFileError, match=r"^f:7: "):
        split_key('"x', "f", 7)


keys = st.text(st.characters(codec="utf-8", exclude_characters="\n\r\x00"), min_size=1, max_size=15)
values = st.text(st.sampled_from('abc ,@.:#\t"\\é'), max_size=20)


def quote(key: str) -> str:
    return '"' + key.replace("\\", "\\\\").replace('"', '\\"') + '"'


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(keys, values), min_size=1, max_size=8))
def test_lsearch_quoted_keys_round_trip(pairs: list[tuple[str, str]]) -> None:
    text = "".join(f"{quote(k)}: {v}\n" for k, v in pairs)
    entries = parse_lsearch(text, "f")
    assert [(e.key, e.value, e.line) for e in entries] == [
        (k, v.strip(" \t"), n) for n, (k, v) in enumerate(pairs, 1)
    ]


# --- items (host lists) ------------------------------------------------------------------------


def test_items_ipv6_colons_and_inline_comments() -> None:
    text = (
        "# relay hosts\n"
        "192.0.2.0/24\n"
        "  198.51.100.7   # the old server\n"
        "2001:db8::/32\n"
        "\n"
        "   # indented comment\n"
        "!2001:db8::1\t# excluded\n"
        "::1\n"
        "10.0.0.1#not-a-comment\n"
    )
    assert kv(parse_items(text, "f")) == [
        ("192.0.2.0/24", "", 2),
        ("198.51.100.7", "", 3),
        ("2001:db8::/32", "", 4),
        ("!2001:db8::1", "", 7),
        ("::1", "", 8),
        ("10.0.0.1#not-a-comment", "", 9),
    ]


def test_items_crlf() -> None:
    assert kv(parse_items("192.0.2.1\r\n::1\r\n", "f")) == [("192.0.2.1", "", 1), ("::1", "", 2)]


# --- read_text ---------------------------------------------------------------------------------


def test_read_text_utf8(tmp_path: Path) -> None:
    p = tmp_path / "aliases"
    p.write_bytes("jörg: alice\n".encode())
    assert read_text(str(p)) == "jörg: alice\n"


@pytest.mark.parametrize(
    ("data", "line"),
    [
        (b"\xff\n", 1),
        (b"a: b\nc: d\ne: \xc3(\n", 3),
        (b"a\n\n\n\nb\xe9\n", 5),
        (b"a\x0cb\n\xfe", 2),
    ],
)
def test_read_text_invalid_utf8_names_the_line(tmp_path: Path, data: bytes, line: int) -> None:
    p = tmp_path / "list"
    p.write_bytes(data)
    with pytest.raises(ListFileError) as info:
        read_text(str(p))
    assert info.value.line == line
    assert str(info.value) == f"{p}:{line}: not valid UTF-8"


def test_read_text_missing_file_is_oserror(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_text(str(tmp_path / "nope"))
