"""The message at DATA time, as Exim hands it over (RECIPES.md section 4).

Exim's DATA ACL runs ``warn regex = ^``, which makes Exim write the whole message to
``<spool>/scan/<id>/<id>.eml`` before it asks the daemon; the file exists until the ACL ends, so
the daemon reads it while Exim waits for the answer. The request carries only Exim's message id:
the path is built here from the id (checked against Exim's id syntax) and the spool directory
``<root>/exim/spool`` that exim/configure uses, so no path from the request is ever opened.

File format (mbox-like, LF line endings, dot-unstuffed)::

    From MAILER-DAEMON Wed Nov 25 02:58:57 2026        <- Exim's separator line
    X-Envelope-From: <alice@remote.test>               <- Exim's, not the sender's
    X-Envelope-To: carol@example.test, ...             <- (may be folded)
    Received: from ... by ... (Exim's own)
    <the message's headers>

    <body>

``read_message`` drops the first three and returns the message as it was received plus Exim's
Received header, with CRLF line endings (what DKIM verifies and the scanners expect). The
daemon must be root or in Exim's group (the file is 0640 Debian-exim).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

# Exim 4.96: 6-6-2 base62 characters (1tGxYZ-000abc-12); 4.97 and later: 6-11-4.
EXIM_ID = re.compile(r"[0-9A-Za-z]{6}-[0-9A-Za-z]{6,11}-[0-9A-Za-z]{2,4}")


class MessageError(Exception):
    """The message cannot be read (no such file, bad id, unreadable): the caller defers."""


@dataclass(frozen=True, slots=True)
class Message:
    exim_id: str
    data: bytes  # CRLF line endings, without Exim's mbox separator and envelope headers

    def header_block(self) -> bytes:
        end = self.data.find(b"\r\n\r\n")
        return self.data if end < 0 else self.data[: end + 2]


def spool_file(root: str, exim_id: str) -> str:
    if not EXIM_ID.fullmatch(exim_id):
        raise MessageError(f"not an Exim message id: {exim_id[:40]!r}")
    return os.path.join(root, "exim", "spool", "scan", exim_id, f"{exim_id}.eml")


def read_message(root: str, exim_id: str) -> Message:
    """Blocking: call it from a worker thread."""
    path = spool_file(root, exim_id)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise MessageError(
            f"{path}: no such file (is `warn regex = ^` before the DATA request?)"
        ) from None
    except OSError as e:
        raise MessageError(f"{path}: cannot read: {e.strerror}") from None
    return Message(exim_id, strip_envelope(raw))


def strip_envelope(raw: bytes) -> bytes:
    """The spool .eml without Exim's ``From `` line and leading X-Envelope-From/-To headers
    (with their folded continuation lines), LF turned into CRLF."""
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    i = 0
    if i < len(lines) and lines[i].startswith(b"From "):
        i += 1
    while i < len(lines):
        lower = lines[i][:16].lower()
        if lower.startswith((b"x-envelope-from:", b"x-envelope-to:")):
            i += 1
            while i < len(lines) and lines[i][:1] in (b" ", b"\t"):
                i += 1
            continue
        break
    body = [line[:-1] if line.endswith(b"\r") else line for line in lines[i:]]
    return b"\r\n".join(body) + b"\r\n"
