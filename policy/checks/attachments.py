"""Blocked attachments at DATA: file types that carry executable code, refused from the MIME
structure before any scanner runs.

A part is an attachment with a name when its Content-Disposition has a ``filename`` or its
Content-Type a ``name``; both are checked when they differ (a mail program may show either).
RFC 2231 encodings are decoded, and RFC 2047 encoded words too (which RFC 2047 forbids there
but Outlook and Gmail send and every mail program decodes). The name is refused when it ends
in one of ``blocked_extensions`` (default ``.exe .pif .bat .scr .lnk .com .js .docm``),
case-insensitive and ignoring trailing dots and spaces (``invoice.pdf.exe``, ``x.EXE.``,
``a.exe `` are all refused). Inside archives: the member names of a ZIP attachment
(``.zip`` name or ``application/zip`` type) are checked the same way, one level deep; a ZIP
inside the ZIP, other archive types (rar, 7z, tar) and encrypted content are not opened here -
ClamAV (the next check) scans inside archives for what it can recognise. A ZIP that cannot be
read is not refused for that.

Verdict: ``550 5.7.1`` naming the attachment (printable, bounded); nothing found: pass. A
message with more than ``MAX_PARTS`` MIME parts is refused too (``550 5.7.1 message has too
many MIME parts to check``): no mail program makes that many, and one built to hide an
attachment beyond what we look at must not pass unchecked. Parsing runs in a worker thread (a
large message is CPU work): a malformed MIME structure is parsed as leniently as mail programs
do (``email`` with the compat32 policy).
"""

from __future__ import annotations

import asyncio
import email
import email.errors
import email.header
import email.policy
import io
import re
import zipfile
from collections.abc import Callable
from email.message import Message as MimeMessage

from policy.checks import Context, Result, load_message
from policy.message import MessageError
from policy.verdict import BLOCKED_ATTACHMENT, Verdict, defer

NAME = "attachments"

# ZIP members looked at, and the largest ZIP part opened (bytes, decoded).
MAX_MEMBERS = 10000
MAX_ZIP = 50 * 1024 * 1024
# MIME parts looked at per message; a message with more is refused (policy: no mail program
# makes a thousand parts, and one built to hide an attachment past our limit must not pass).
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


class TooManyParts(Exception):
    """More MIME parts than MAX_PARTS: not checked to the end."""


def _names(part: MimeMessage) -> list[str]:
    """Every name a mail program might show for the part: Content-Disposition's filename AND
    Content-Type's name (they may differ, and a program may show either), decoded."""
    names = []
    getters: tuple[Callable[[], object], ...] = (
        part.get_filename,
        lambda: part.get_param("name"),
    )
    for get in getters:
        try:
            value = get()
        except (ValueError, TypeError, LookupError):  # a header too broken to read a name from
            continue
        if isinstance(value, tuple):  # an undecodable RFC 2231 value: (charset, lang, text)
            value = value[2]
        if value:
            names.append(_decode_words(str(value)))
    return names


def find_blocked(data: bytes, extensions: tuple[str, ...]) -> tuple[str, str] | None:
    """(the attachment's name, where) of the first blocked one, or None. Raises TooManyParts
    rather than pass a message it could not check to the end. Blocking."""
    message = email.message_from_bytes(data, policy=email.policy.compat32)
    for count, part in enumerate(message.walk()):
        if count >= MAX_PARTS:
            raise TooManyParts(f"more than {MAX_PARTS} MIME parts")
        if part.is_multipart():
            continue
        names = _names(part)
        for name in names:
            if blocked_name(name, extensions):
                return name, "attachment"
        filename = names[0] if names else ""
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


def _decode_words(name: str) -> str:
    """``=?UTF-8?B?aW52b2ljZS5leGU=?=`` -> ``invoice.exe``; a name that is not valid
    encoded words stays as it is."""
    if "=?" not in name:
        return name
    try:
        return str(email.header.make_header(email.header.decode_header(name)))
    except (ValueError, LookupError, email.errors.HeaderParseError):
        return name


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
    try:
        found = await loop.run_in_executor(services.threads, find_blocked, message.data, extensions)
    except TooManyParts as e:
        # A structure no mail program needs, built to hide an attachment past what we check:
        # refused (on the evidence of the structure itself), not passed unchecked.
        return Result(Verdict(BLOCKED_ATTACHMENT, "message has too many MIME parts to check",
                              NAME, str(e)))  # fmt: skip
    if found is None:
        return Result()
    name, where = found
    shown = _UNPRINTABLE.sub("?", name)[:80]
    return Result(Verdict(BLOCKED_ATTACHMENT, f"attachments of this type are not accepted: "
                          f"{shown}", NAME, f"blocked attachment {shown!r} ({where})"))  # fmt: skip
