"""The request/reply protocol between Exim (or any client) and the daemon. Sans-IO: bytes in,
``Request`` out; ``Verdict`` in, bytes out. No sockets, no asyncio here.

One request per connection, as Exim's ``${readsocket}`` does it: the client writes one line and
shuts down its write side; the daemon writes one reply line and closes.

Request line (at most ``MAX_LINE`` bytes including the LF; a trailing CR is ignored)::

    VERB field=value field=value ...

* VERB is one of ``VERBS``; fields are separated by spaces and may come in any order.
* Values of the fields marked ``b64`` in ``FIELDS`` (everything an SMTP client controls: sender,
  recipient, HELO name, login name, alias address) are standard base64, as Exim's ``${base64:}``
  writes them; the empty string encodes the empty value. ``ip`` is plain text (IPv4 or IPv6, or
  empty for locally submitted mail).
* Decoded values are UTF-8; bytes that are not valid UTF-8 are kept (surrogateescape) so that a
  hostile address is judged, never crashes the parser.

Reply line (one line, LF-terminated, never a CR, LF or control character inside but the one
TAB below, at most ``MAX_REPLY`` bytes; verdicts are ASCII, FOUND data UTF-8)::

    ACCEPT <code> <enhanced> <text>     e.g. ACCEPT 250 2.1.5 recipient ok
    ACCEPT <code> <enhanced> <text>\t<b64 headers>
                                        an accept that adds header lines to the message: after
                                        the TAB, base64 of the lines joined by LF (folded lines
                                        continue with LF + TAB); Exim's ${base64d:} gives them
                                        to add_header
    DEFER  <code> <enhanced> <text>     e.g. DEFER 451 4.3.0 temporary local problem
    DENY   <code> <enhanced> <text>     e.g. DENY 550 5.1.1 <bob@example.org>: no such user
    FOUND <data>                        lookup verbs: the data (ALIAS: comma-separated addresses)
    NOTFOUND                            lookup verbs: no such key (USER: no such user)
    OK user=<b64> home=<b64>            AUTH/USER: the canonical user and its home
    FAIL <text>                         AUTH: wrong password or unknown user
    PONG <version>                      PING

Anything wrong with a request (unknown verb, unknown, missing or duplicate field, bad base64, a
NUL or other control character, a line over ``MAX_LINE``) gets a ``DEFER 451 4.5.0`` reply that
names the problem: our trouble or a misconfigured Exim must never bounce mail.
See docs/protocol.md for the Exim side.
"""

from __future__ import annotations

import binascii
import re
from dataclasses import dataclass

from policy.verdict import TEMP_PROTOCOL, Verdict

# 4096 bytes: an RFC 5321 path is at most 256 octets (344 in base64), a HELO name 255; a RCPT
# request with every field at its maximum is under 1.5 KB. Anything longer is not from our Exim.
MAX_LINE = 4096
# Replies carry at most this many bytes; an ALIAS expansion is bounded by the fan-out limit.
MAX_REPLY = 65536
# Public text in a verdict reply (it ends up in an SMTP response line).
MAX_TEXT = 400

# Field name -> True when the value is base64-encoded.
FIELDS: dict[str, bool] = {
    "ip": False,
    "helo": True,
    "sender": True,
    "rcpt": True,
    "auth": True,
    "addr": True,
    # AUTH/USER (the auth socket): login name, password, Dovecot's service (imap, smtp ...).
    "user": True,
    "pass": True,
    "service": True,
    # DATA: Exim's message id, the message size in bytes and the number of recipients.
    "id": False,
    "size": False,
    "rcpts": False,
}
# Plain fields that must be a decimal number.
_NUMERIC = frozenset({"size", "rcpts"})
_NUMBER = re.compile(rb"[0-9]{1,15}")


@dataclass(frozen=True, slots=True)
class VerbSpec:
    required: frozenset[str]
    optional: frozenset[str] = frozenset()


VERBS: dict[str, VerbSpec] = {
    "PING": VerbSpec(frozenset()),
    # SMTP connection: the client's ip (empty for locally submitted mail).
    "CONNECT": VerbSpec(frozenset({"ip"})),
    # MAIL FROM stage: ip of the client, envelope sender ("" for <>), optional HELO and login.
    "MAIL": VerbSpec(frozenset({"ip", "sender"}), frozenset({"helo", "auth"})),
    # RCPT TO stage: as MAIL plus the recipient.
    "RCPT": VerbSpec(frozenset({"ip", "sender", "rcpt"}), frozenset({"helo", "auth"})),
    # End of DATA (the message is on Exim's spool): as MAIL plus id, size and recipient count.
    "DATA": VerbSpec(
        frozenset({"ip", "sender", "rcpts"}), frozenset({"helo", "auth", "id", "size"})
    ),
    # Router lookup: where does this address go? (alias expansion, rewrite domains)
    "ALIAS": VerbSpec(frozenset({"addr"})),
    # Logins, on the auth socket only (policy/auth.py): a password check, and a lookup.
    "AUTH": VerbSpec(frozenset({"user", "pass"}), frozenset({"service", "ip"})),
    "USER": VerbSpec(frozenset({"user"}), frozenset({"service"})),
}
# Which verbs each socket answers: Exim's socket never checks passwords, Dovecot's never
# decides about mail.
POLICY_VERBS = frozenset({"PING", "CONNECT", "MAIL", "RCPT", "DATA", "ALIAS"})
AUTH_VERBS = frozenset({"PING", "AUTH", "USER"})

_PLAIN_VALUE = re.compile(rb"[0-9A-Za-z.:_%-]*")
_PRINTABLE_BYTES = bytes(range(0x20, 0x7F))
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")
_UNPRINTABLE_UTF8 = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")

# Per verb: field name as bytes -> (name, base64?). Built once; the parser does no decoding
# or set arithmetic for names.
_ALLOWED: dict[bytes, dict[bytes, tuple[str, bool]]] = {
    verb.encode(): {
        name.encode(): (name, FIELDS[name]) for name in (*spec.required, *spec.optional)
    }
    for verb, spec in VERBS.items()
}


class ProtocolError(Exception):
    """A request the daemon cannot take; the message names the problem (it is sent back)."""


@dataclass(frozen=True, slots=True)
class Request:
    verb: str
    fields: dict[str, str]

    def get(self, name: str) -> str:
        return self.fields.get(name, "")


def parse(line: bytes) -> Request:
    """Parse one request line (with or without its LF). Raises ProtocolError."""
    if len(line) > MAX_LINE:
        raise ProtocolError(f"request line longer than {MAX_LINE} bytes")
    if line.endswith(b"\n"):
        line = line[:-1]
    if line.endswith(b"\r"):
        line = line[:-1]
    bad = line.translate(None, _PRINTABLE_BYTES)  # what is left is not printable ASCII
    if bad:
        if b"\0" in bad:
            raise ProtocolError("NUL byte in request")
        raise ProtocolError(f"control or non-ASCII byte 0x{bad[0]:02x} in request")
    parts = line.split()  # only spaces are left to split on
    if not parts:
        raise ProtocolError("empty request")
    verb_b = parts[0]
    allowed = _ALLOWED.get(verb_b)
    if allowed is None:
        raise ProtocolError(f"unknown verb {_printable(verb_b.decode('ascii'))!r}")
    verb = verb_b.decode("ascii")
    fields: dict[str, str] = {}
    for part in parts[1:]:
        name_b, eq, raw = part.partition(b"=")
        known = allowed.get(name_b)
        if known is None:
            name = _printable(name_b.decode("ascii"))
            if not eq:
                raise ProtocolError(f"field {name!r} has no '='")
            raise ProtocolError(f"unknown field {name!r} for {verb}")
        name, is_b64 = known
        if not eq:
            raise ProtocolError(f"field {name!r} has no '='")
        if name in fields:
            raise ProtocolError(f"duplicate field {name!r}")
        if is_b64:
            try:
                value = binascii.a2b_base64(raw, strict_mode=True)
            except (binascii.Error, ValueError):
                raise ProtocolError(f"field {name!r} is not valid base64") from None
            if b"\0" in value:
                raise ProtocolError(f"NUL byte in field {name!r}")
            fields[name] = value.decode("utf-8", "surrogateescape")
        else:
            if not _PLAIN_VALUE.fullmatch(raw):
                raise ProtocolError(f"field {name!r} has characters not allowed in it")
            if name in _NUMERIC and not _NUMBER.fullmatch(raw):
                raise ProtocolError(f"field {name!r} is not a number")
            fields[name] = raw.decode("ascii")
    if len(fields) < len(allowed):  # some field absent: is it a required one?
        missing = VERBS[verb].required - fields.keys()
        if missing:
            raise ProtocolError(f"missing field {sorted(missing)[0]!r} for {verb}")
    return Request(verb, fields)


def _printable(text: str, limit: int = MAX_TEXT) -> str:
    """Make text safe for a reply line: printable ASCII only, bounded."""
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    if text.isascii() and text.isprintable():  # the common case, without a regex
        return text
    return _UNPRINTABLE.sub("?", text)


def render_verdict(verdict: Verdict) -> bytes:
    line = verdict.status.prefix + (_printable(verdict.text) or "-")
    if verdict.headers and verdict.status.code < 300:
        line += "\t" + render_headers(verdict.headers)
    return (line + "\n").encode("ascii")


# A header field name (RFC 5322 ftext, without the colon), and at most this much header text
# per reply (Exim adds it to the message).
_HEADER_NAME = re.compile(r"[!-9;-~]{1,76}")
MAX_HEADERS = 8192


def render_headers(headers: tuple[str, ...] | list[str]) -> str:
    """Header lines as the base64 field of an accept. Each is ``Name: value``; a value may be
    folded with ``\n`` + TAB or space. Nothing else reaches Exim's add_header: other control
    characters and non-ASCII become ``?``, a CR or an LF not followed by white space becomes a
    space (no header of ours can be split into two, whatever a peer's text held), and a bad
    name is a ValueError (the bug is ours)."""
    lines = []
    for header in headers:
        name, colon, value = header.partition(":")
        if not colon or not _HEADER_NAME.fullmatch(name):
            raise ValueError(f"not a header line: {header[:80]!r}")
        value = _FOLD_OR_BREAK.sub(lambda m: "\n" + m.group(1) if m.group(1) else " ", value)
        value = _HEADER_UNSAFE.sub("?", value)
        lines.append(f"{name}:{value}")
    text = "\n".join(lines)
    if len(text) > MAX_HEADERS:
        raise ValueError(f"headers longer than {MAX_HEADERS} bytes")
    return binascii.b2a_base64(text.encode("ascii"), newline=False).decode("ascii")


# A line break: kept when it folds (followed by TAB or space), else replaced.
_FOLD_OR_BREAK = re.compile(r"\r?\n([ \t])?|\r")
_HEADER_UNSAFE = re.compile(r"[^\x20-\x7e\t\n]|\n(?![ \t])")


def render_error(error: ProtocolError) -> bytes:
    """A bad request: defer, naming the problem."""
    text = _printable(f"bad policy request: {error}")
    return f"DEFER {TEMP_PROTOCOL.code} {TEMP_PROTOCOL.enhanced} {text}\n".encode("ascii")


def render_found(data: str) -> bytes:
    """Lookup data. UTF-8, so that an internationalised alias destination reaches Exim intact;
    never a control character, CR or LF. Data too long for a reply is the caller's error (it
    must defer rather than send a cut list)."""
    line = ("FOUND " + _UNPRINTABLE_UTF8.sub("?", data) + "\n").encode("utf-8")
    if len(line) > MAX_REPLY:
        raise ValueError(f"lookup data longer than {MAX_REPLY} bytes")
    return line


NOTFOUND = b"NOTFOUND\n"


def render_ok(user: str, home: str) -> bytes:
    """A login or lookup that found the user: canonical name and home directory."""
    return b"OK user=%s home=%s\n" % (_b64(user), _b64(home))


def render_fail(text: str) -> bytes:
    """A definite wrong password or unknown user (the hook exits 1)."""
    return f"FAIL {_printable(text) or '-'}\n".encode("ascii")


def _b64(value: str) -> bytes:
    return binascii.b2a_base64(value.encode("utf-8", "surrogateescape"), newline=False)


def render_pong(version: str) -> bytes:
    return f"PONG {_printable(version)}\n".encode("ascii")


def encode_request(verb: str, **fields: str) -> bytes:
    """Build a request line the way Exim's expansions do (for clients, tests and the CLI)."""
    parts = [verb]
    for name, value in fields.items():
        if FIELDS.get(name, True):
            value = binascii.b2a_base64(
                value.encode("utf-8", "surrogateescape"), newline=False
            ).decode("ascii")
        parts.append(f"{name}={value}")
    return (" ".join(parts) + "\n").encode("ascii")
