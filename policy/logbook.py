"""The daemon's log: one line per decision, plus events (start, reload, file problems).

Decision line (key=value; values with spaces, quotes or unprintable bytes are quoted and
escaped, so a hostile address cannot forge a log line)::

    2026-11-25T03:30:01.123Z decision stage=RCPT ip=192.0.2.7 sender=<a@remote.example>
      rcpt=<nobody@example.org> verdict="DENY 550 5.1.1" check=recipient
      reason="no user or alias 'nobody' in example.org" source=- duration_ms=0.084

(one line in the file). Decisions are appended to a list on the request path; a writer thread
formats and writes them every ``FLUSH_INTERVAL`` seconds, so formatting and the write system call
stay off the hot path and never stall the event loop for a whole batch. Events are written at
once.
"""

from __future__ import annotations

import re
import sys
import threading
import time
from collections.abc import Callable
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


class _Clock:
    """Timestamps for a batch of log lines: strftime once per second, not once per line."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(self, t: float) -> str:
        second = int(t)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._prefix}.{int((t - second) * 1000):03d}Z"


def format_decision(d: Decision, t: float, clock: Callable[[float], str] = _timestamp) -> str:
    stage, ip, sender, rcpt, verdict, check, reason, source, ns = d
    # ip passed the protocol's [0-9A-Za-z.:_%-] check; verdict, check and source are ours.
    # Only what an SMTP client chose (sender, rcpt, and the reason quoting them) is escaped.
    shown_sender = quote("<" + sender + ">") if stage in ("MAIL", "RCPT") else "-"
    return (
        f"{clock(t)} decision stage={stage} ip={ip or '-'} "
        f"sender={shown_sender} rcpt={quote('<' + rcpt + '>') if rcpt else '-'} "
        f'verdict="{verdict}" check={check or "-"} reason={quote(reason) if reason else "-"} '
        f"source={source or '-'} duration_ms={ns / 1e6:.3f}\n"
    )


class Logbook:
    """Decision records are appended by the event loop and written by a thread every
    ``FLUSH_INTERVAL`` seconds, a chunk at a time, letting go of the GIL between chunks so the
    loop never waits long; events are written at once. One lock guards the stream."""

    CHUNK = 32  # lines formatted between two GIL releases (about 0.15 ms)

    def __init__(self, path: str = "") -> None:
        self.path = path
        self._stream: TextIO = open(path, "a", encoding="utf-8") if path else sys.stderr  # noqa: SIM115
        self.pending: list[tuple[Decision, float]] = []
        self._lock = threading.Lock()
        self._clock = _Clock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Write in the background from now on (the daemon; tools call flush themselves)."""
        self._thread = threading.Thread(target=self._run, name="decision-log", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(FLUSH_INTERVAL):
            self.flush(yield_gil=True)

    def decision(self, d: Decision) -> None:
        self.pending.append((d, time.time()))  # list.append is atomic: no lock on the hot path

    def event(self, message: str) -> None:
        self.flush()
        with self._lock:
            self._stream.write(f"{_timestamp(time.time())} event {message}\n")
            self._stream.flush()

    def flush(self, yield_gil: bool = False) -> None:
        if not self.pending:
            return
        # An append racing with this swap lands in ``batch`` before we read it, or in the new
        # list: none is lost.
        batch, self.pending = self.pending, []
        with self._lock:
            clock = self._clock
            for start in range(0, len(batch), self.CHUNK):
                chunk = batch[start : start + self.CHUNK]
                self._stream.write("".join(format_decision(d, t, clock) for d, t in chunk))
                if yield_gil:
                    time.sleep(0)
            self._stream.flush()

    def reopen(self) -> None:
        """After log rotation (SIGHUP): write to a new file at the same path."""
        if self.path:
            self.flush()
            with self._lock:
                old = self._stream
                self._stream = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
                old.close()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.flush()
        if self.path:
            self._stream.close()
