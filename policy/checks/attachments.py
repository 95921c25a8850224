"""Blocked attachments at DATA: file types that carry executable code, refused from the MIME
structure before any scanner runs.

A part is an attachment with a name when its Content-Disposition has a ``filename`` or its
Content-Type a ``name`` (RFC 2231 encodings decoded, as a mail program would). The name is
refused when it ends in one of ``blocked_extensions`` (default ``.exe .pif .bat .scr .lnk .com
.js .docm``), case-insensitive and ignoring trailing dots and spaces (``invoice.pdf.exe``,
``x.EXE.``, ``a.exe `` are all refused). Inside archives: the member names of a ZIP attachment
(``.zip`` name or ``application/zip`` type) are checked the same way, one level deep; a ZIP
inside the ZIP, other archive types (rar, 7z, tar) and encrypted content are not opened here -
ClamAV (the next check) scans inside archives for what it can recognise. A ZIP that cannot be
read is not refused for that.

Verdict: ``550 5.7.1`` naming the attachment (printable, bounded); nothing found: pass.
Parsing runs in a worker thread (a large message is CPU work) and never raises: a malformed
MIME structure is parsed as leniently as mail programs do (``email`` with the default policy).
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import io
import re
import zipfile
from email.message import Message as MimeMessage

from policy.checks import Context, Result, load_message
from policy.message import MessageError
from policy.verdict import BLOCKED_ATTACHMENT, Verdict, defer

NAME = "attachments"

# ZIP members looked at, and the largest ZIP part opened (bytes, decoded).
MAX_MEMBERS = 10000
MAX_ZIP = 50 * 1024 * 1024
# Parts looked at per message (a flood of tiny parts costs time, not evidence).
MAX_PARTS = 1000


def blocked_name(name: str, extensions: tuple[str, ...]) -> bool:
    cleaned = name.strip().rstrip(". ").lower()
    return any(cleaned.endswith(ext) for ext in extensions)


def _is_zip(part: MimeMessage, filename: str) -> bool:
    ctype = part.get_content_type()
    return filename.lower().rstrip(". ").endswith(".zip") or ctype in (
        "application/zip",
        "application/x-zip-compressed",
    )


def find_blocked(data: bytes, extensions: tuple[str, ...]) -> tuple[str, str] | None:
    """(the attachment's name, where) of the first blocked one, or None. Blocking."""
    message = email.message_from_bytes(data, policy=email.policy.compat32)
    for count, part in enumerate(message.walk()):
        if count >= MAX_PARTS:
            break
        if part.is_multipart():
            continue
        try:
            filename = part.get_filename() or part.get_param("name") or ""
        except (ValueError, TypeError, LookupError):  # a header too broken to read a name from
            filename = ""
        if isinstance(filename, tuple):  # an undecodable RFC 2231 value: (charset, lang, text)
            filename = str(filename[2])
        filename = str(filename)
        if filename and blocked_name(filename, extensions):
            return filename, "attachment"
        if _is_zip(part, filename):
            payload = part.get_payload(decode=True)
            if not isinstance(payload, bytes) or len(payload) > MAX_ZIP:
                continue
            try:
                with zipfile.ZipFile(io.BytesIO(payload)) as archive:
                    for info in archive.infolist()[:MAX_MEMBERS]:
                        member = info.filename.rsplit("/", 1)[-1]
                        if member and blocked_name(member, extensions):
                            return member, f"inside {filename or 'a ZIP attachment'}"
            except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError):
                continue  # not readable as a ZIP: ClamAV still scans it
    return None


_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")


async def check(ctx: Context) -> Result:
    services = ctx.services
    if services is None:
        return Result(note="not run (no message)")
    extensions = tuple(e.lower() for e in services.settings.blocked_extensions.split())
    if not extensions:
        return Result(note="no blocked extensions")
    try:
        message = await load_message(ctx)
    except MessageError as e:
        return Result(defer(NAME, str(e)))
    loop = asyncio.get_running_loop()
    found = await loop.run_in_executor(services.threads, find_blocked, message.data, extensions)
    if found is None:
        return Result()
    name, where = found
    shown = _UNPRINTABLE.sub("?", name)[:80]
    return Result(Verdict(BLOCKED_ATTACHMENT, f"attachments of this type are not accepted: "
                          f"{shown}", NAME, f"blocked attachment {shown!r} ({where})"))  # fmt: skip
