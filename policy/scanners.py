"""The content scanners the DATA checks ask: clamd (ClamAV) and spamd (SpamAssassin).

Both are asked with the whole message (policy/message.py: as received, plus Exim's Received
header, CRLF line endings). Neither call raises: trouble comes back as a result of kind
``"error"`` naming it, and the check decides (``clamav_on_failure``, ``spam_on_failure``).

**clamd**: ``INSTREAM`` over its Unix socket (``clamd_socket``), the protocol of clamd(8)::

    zINSTREAM\\0  then chunks: <4-byte big-endian length><data> ...  then <0000>
    reply:  "stream: OK\\0" | "stream: <signature> FOUND\\0" | "<text> ERROR\\0"

e.g. ``INSTREAM size limit exceeded. ERROR`` when the message is longer than clamd's
StreamMaxLength (clamd.conf): an error, never a clean result. Why our own client: the asyncio
one on PyPI (aioclamd) talks TCP only, and Debian's clamd listens on a Unix socket; the ``clamd``
package is synchronous and unmaintained since 2020. The protocol is the six lines above;
tests/test_scanners.py drives it against the real clamd.

**spamd**: aiospamc (the maintained asyncio spamc), ``REPORT`` over ``spamd_socket`` or
``spamd_host:spamd_port``: one request gives the score, spamd's own threshold and the
human-readable report. Spamd's threshold (``required_score``) is not ours: the check compares
the score with ``spam_flag_score`` and ``spam_reject_score``.
"""

from __future__ import annotations

import asyncio
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from policy.settings import Settings

# A chunk of INSTREAM data; clamd reads each into memory. 64 KiB is what clamdscan sends.
CHUNK = 65536
# clamd's reply is one short NUL-terminated line.
MAX_REPLY = 4096

_FOUND = re.compile(r"stream: (.+) FOUND")
_SIGNATURE = re.compile(r"[!-~]{1,200}")  # what a signature name may look like in our reply


@dataclass(frozen=True, slots=True)
class VirusResult:
    kind: Literal["clean", "virus", "error"]
    detail: str = ""  # the signature name, or what went wrong


async def clamd_scan(socket_path: str, data: bytes, timeout: float) -> VirusResult:
    """Scan ``data`` with clamd's INSTREAM within ``timeout`` seconds."""
    try:
        async with asyncio.timeout(timeout):
            return await _instream(socket_path, data)
    except TimeoutError:
        return VirusResult("error", f"clamd did not answer within {timeout:g} s")
    except OSError as e:
        return VirusResult("error", f"clamd socket {socket_path}: {e.strerror or e}")


async def _instream(socket_path: str, data: bytes) -> VirusResult:
    loop = asyncio.get_running_loop()
    # A plain non-blocking socket, not asyncio's streams: clamd answers and closes as soon as the
    # stream passes its StreamMaxLength, while we may still be sending, and a stream transport
    # that fails to write closes itself and throws away the answer it has not read yet (seen
    # under load: "closed the connection without an answer" instead of clamd's ERROR). A socket
    # keeps what clamd sent after a failed send; sending stops once an answer is there. The
    # ``with`` closes it on every way out, a timeout's cancellation too.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.setblocking(False)
        await loop.sock_connect(sock, socket_path)
        try:
            await loop.sock_sendall(sock, b"zINSTREAM\0")
            view = memoryview(data)
            for start in range(0, len(view), CHUNK):
                if _answered(sock):
                    break
                chunk = view[start : start + CHUNK]
                await loop.sock_sendall(sock, len(chunk).to_bytes(4, "big") + chunk)
            else:
                await loop.sock_sendall(sock, b"\0\0\0\0")
        except (ConnectionResetError, BrokenPipeError):
            pass  # clamd stopped reading: its answer says why
        reply = b""
        while b"\0" not in reply and len(reply) < MAX_REPLY:
            try:
                part = await loop.sock_recv(sock, MAX_REPLY - len(reply))
            except (ConnectionResetError, BrokenPipeError):
                break
            if not part:
                break
            reply += part
    text = reply.split(b"\0", 1)[0].rstrip(b"\n").decode("ascii", "replace")
    if text == "stream: OK":
        return VirusResult("clean")
    found = _FOUND.fullmatch(text)
    if found:
        name = found.group(1)
        return VirusResult("virus", name if _SIGNATURE.fullmatch(name) else "unnamed signature")
    if not text:
        return VirusResult("error", "clamd closed the connection without an answer")
    return VirusResult("error", f"clamd: {_printable(text)}")


def _answered(sock: socket.socket) -> bool:
    """Whether clamd has said something (or closed) while we are still sending."""
    try:
        sock.recv(1, socket.MSG_PEEK)  # data, or b"" at EOF
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:  # reset: clamd is gone
        pass
    return True


@dataclass(frozen=True, slots=True)
class SpamResult:
    kind: Literal["scanned", "error"]
    score: float = 0.0
    report: str = ""  # spamd's report (rule lines), as it sent it
    detail: str = ""  # what went wrong


async def spamd_check(settings: Settings, data: bytes) -> SpamResult:
    """Ask spamd (``REPORT``) within ``spamd_timeout`` seconds."""
    # Lazy: only a daemon that scans pays for the import. aiospamc's client and connection
    # managers, not its frontend functions (aiospamc.report): those build two TLS contexts per
    # call, even for a Unix socket or plain TCP, and each loads the system's CA certificates:
    # 35 ms of CPU per message, more than the rest of the DATA stage (benchmarks/README.md,
    # "Content scanning through Exim").
    from aiospamc.client import Client
    from aiospamc.connections import TcpConnectionManager, UnixConnectionManager
    from aiospamc.requests import Request

    where = settings.spamd_socket or f"{settings.spamd_host}:{settings.spamd_port}"
    try:
        async with asyncio.timeout(settings.spamd_timeout):
            if settings.spamd_socket:
                spamd = UnixConnectionManager(Path(settings.spamd_socket))
            else:
                spamd = TcpConnectionManager(settings.spamd_host, settings.spamd_port)
            response = await Client(spamd).request(Request("REPORT", body=data))
    except TimeoutError:
        return SpamResult("error", detail=f"spamd {where} did not answer within "
                                          f"{settings.spamd_timeout:g} s")  # fmt: skip
    except Exception as e:  # aiospamc's own errors (connection, protocol, spamd's EX_*)
        # aiospamc's connection errors carry no text: what went wrong is their cause.
        why = str(e) or str(e.__cause__ or "")
        return SpamResult("error", detail=f"spamd {where}: {type(e).__name__}: {_printable(why)}")
    try:
        header = response.headers["Spam"]
        score = float(header.score)
        body = bytes(response.body or b"").decode("utf-8", "replace")
    except (KeyError, AttributeError, TypeError, ValueError) as e:
        return SpamResult("error", detail=f"spamd {where}: unexpected answer ({e})")
    return SpamResult("scanned", score, body)


def _printable(text: str, limit: int = 200) -> str:
    return re.sub(r"[^\x20-\x7e]", "?", text[:limit])
