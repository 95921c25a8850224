"""The daemon's log: one line per decision, plus events (start, reload, file problems).

Decision line (key=value; values with spaces, quotes or unprintable bytes are quoted and
escaped, so a hostile address cannot forge a log line)::

    2026-11-25T03:30:01.123Z decision stage=RCPT ip=192.0.2.7 sender=<a@remote.example>
      rcpt=<nobody@example.org> verdict="DENY 550 5.1.1" check=recipient
      reason="no user or alias 'nobody' in example.org" source=- duration_ms=0.084

(one line in the file). Decisions are appended to a list on the request path and written in one
batch every ``FLUSH_INTERVAL`` seconds by the event loop, so formatting and the write system call
stay off the hot path. Events are written at once.
"""

from __future__ import annotations

import re
import sys
import time
from typing import TextIO

FLUSH_INTERVAL = 0.2

_NEEDS_QUOTING = re.compile(r'[^\x21-\x7e]|["\\=]')
_ESCAPE = re.compile(r'[^\x20-\x7e]|["\\]')

Decision = tuple[str, str, str, str, str, str, str, str, int]
# stage, ip, sender, rcpt, verdict, check, reason, source, duration_ns


def quote(value: str) -> str:
    if value and not _NEEDS_QUOTING.search(value):
        return value
    return '"' + _ESCAPE.sub(_escape_char, value) + '"'


def _escape_char(m: re.Match[str]) -> str:
    c = m.group()
    if c in '"\\':
        return "\\" + c
    code = ord(c)
    if 0xDC80 <= code <= 0xDCFF:  # a raw byte kept by surrogateescape
        return f"\\x{code - 0xDC00:02x}"
    # Raw bytes are \xNN (above); characters are \u/\U, so the two never read alike.
    return (
        f"\\x{code:02x}"
        if code < 0x80
        else (f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    )


def _timestamp(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


def format_decision(d: Decision, t: float) -> str:
    stage, ip, sender, rcpt, verdict, check, reason, source, ns = d
    shown_sender = quote("<" + sender + ">") if stage in ("MAIL", "RCPT") else "-"
    return (
        f"{_timestamp(t)} decision stage={stage} ip={quote(ip) if ip else '-'} "
        f"sender={shown_sender} rcpt={quote('<' + rcpt + '>') if rcpt else '-'} "
        f"verdict={quote(verdict)} check={check or '-'} reason={quote(reason) if reason else '-'} "
        f"source={quote(source) if source else '-'} duration_ms={ns / 1e6:.3f}\n"
    )


class Logbook:
    def __init__(self, path: str = "") -> None:
        self.path = path
        self._stream: TextIO = open(path, "a", encoding="utf-8") if path else sys.stderr  # noqa: SIM115
        self.pending: list[tuple[Decision, float]] = []

    def decision(self, d: Decision) -> None:
        self.pending.append((d, time.time()))

    def event(self, message: str) -> None:
        self.flush()
        self._stream.write(f"{_timestamp(time.time())} event {message}\n")
        self._stream.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        batch, self.pending = self.pending, []
        self._stream.write("".join(format_decision(d, t) for d, t in batch))
        self._stream.flush()

    def reopen(self) -> None:
        """After log rotation (SIGHUP): write to a new file at the same path."""
        if self.path:
            self.flush()
            old = self._stream
            self._stream = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
            old.close()

    def close(self) -> None:
        self.flush()
        if self.path:
            self._stream.close()
