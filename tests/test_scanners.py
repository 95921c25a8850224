"""The scanner clients of policy/scanners.py against the real servers (tests/scan_stack.py: clamd
with the two-signature EICAR database, spamd with Debian's rules and no network tests), and
against fake ones on loopback sockets that stay silent, answer garbage or hang up.

Both clients promise never to raise and never to call a message clean or scanned when the
server did not say so: every kind of trouble comes back as an ``"error"`` result naming it.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import select
import shutil
import socket
import ssl
import tempfile
import threading
import zipfile
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest

from policy import settings as settings_mod
from policy.scanners import SpamResult, VirusResult, clamd_scan, spamd_check
from policy.settings import Settings
from tests.conftest import OFFLINE, PRIMARY_HOSTNAME
from tests.scan_stack import EICAR, EICAR_NDB, GTUBE, Clamd, Spamd

pytestmark = pytest.mark.integration

EICAR_NAMES = {EICAR_NDB, "Test.EICAR-HDB.UNOFFICIAL"}
STREAM_MAX = 1024 * 1024  # Clamd(stream_max="1M")
RECEIVED = (
    "from client.example.net (client.example.net [203.0.113.5]) by mail.example.org with "
    "esmtps (TLS1.3) tls TLS_AES_256_GCM_SHA384 (Exim 4.96) (envelope-from <bob@example.net>) "
    "id 1tAbCd-000XyZ-12 for alice@example.org; Tue, 01 Dec 2026 10:00:00 +0000"
)


# --- messages ----------------------------------------------------------------------------------


def message(body: str = "Hi Alice,\n\nShall we have lunch on Friday at noon?\n\nBob\n",
            attachments: tuple[tuple[str, str, bytes], ...] = (),
            received: str = RECEIVED) -> bytes:  # fmt: skip
    """A realistic message (FQDN From, Date, Message-ID, Exim's Received on top) as the
    scanners get it: CRLF line endings. ``attachments``: (file name, MIME type, content),
    base64-encoded."""
    m = EmailMessage()
    m["Received"] = received
    m["From"] = "Bob Smith <bob@example.net>"
    m["To"] = "Alice Jones <alice@example.org>"
    m["Subject"] = "Lunch on Friday"
    m["Date"] = "Tue, 01 Dec 2026 09:59:58 +0000"
    m["Message-ID"] = "<20261201095958.4711@client.example.net>"
    m.set_content(body)
    for name, mime, content in attachments:
        maintype, subtype = mime.split("/")
        m.add_attachment(content, maintype=maintype, subtype=subtype, filename=name)
    return m.as_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def zipped(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return buffer.getvalue()


def sized(size: int, tail: bytes = b"") -> bytes:
    """A plain message of exactly ``size`` bytes, ``tail`` at its very end."""
    head = b"From: bob@example.net\r\nTo: alice@example.org\r\nSubject: big\r\n\r\n"
    filler = size - len(head) - len(tail) - 2
    line = b"x" * 76 + b"\r\n"
    body = (line * (filler // len(line) + 1))[:filler]
    data = head + body + b"\r\n" + tail
    assert len(data) == size
    return data


# --- fake servers ------------------------------------------------------------------------------


class FakeServer:
    """A stream server on a Unix socket (or a loopback TCP port) in a thread, running
    ``behaviour(connection, server)`` for each client. ``release`` is set at close, so a
    behaviour that waits forever gives up then."""

    def __init__(self, behaviour: Callable[[socket.socket, FakeServer], None],
                 tcp: bool = False) -> None:  # fmt: skip
        self.dir = tempfile.mkdtemp(prefix="fk.", dir="/tmp")
        self.path = os.path.join(self.dir, "fake.sock")
        self.port = 0
        if tcp:
            self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.listener.bind(("127.0.0.1", 0))
            self.port = self.listener.getsockname()[1]
        else:
            self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.listener.bind(self.path)
        self.listener.listen(8)
        self.listener.settimeout(0.1)
        self.behaviour = behaviour
        self.release = threading.Event()
        self.accepted = threading.Event()
        self.connections: list[socket.socket] = []
        self.received = bytearray()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.release.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(None)
            self.connections.append(conn)
            self.accepted.set()
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            self.behaviour(conn, self)
        with contextlib.suppress(OSError):
            conn.close()

    def close(self) -> None:
        self.release.set()
        self.thread.join(10)
        self.listener.close()
        for conn in self.connections:
            with contextlib.suppress(OSError):
                conn.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> FakeServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def silent(conn: socket.socket, server: FakeServer) -> None:
    """Accepts and never reads nor answers (a hung scanner)."""
    server.release.wait(60)


def read_instream(conn: socket.socket, server: FakeServer) -> None:
    """Reads a whole INSTREAM request (up to its zero-length terminator)."""
    buffer = b""

    def need(n: int) -> bytes:
        nonlocal buffer
        while len(buffer) < n:
            chunk = conn.recv(65536)
            if not chunk:
                raise ConnectionError("client hung up")
            buffer += chunk
        data, buffer = buffer[:n], buffer[n:]
        server.received += data
        return data

    assert need(10) == b"zINSTREAM\0"
    while length := int.from_bytes(need(4), "big"):
        need(length)


def answers(reply: bytes, read_first: bool = True) -> Callable[[socket.socket, FakeServer], None]:
    """A server that (reads the request, then) sends ``reply`` and hangs up."""

    def behaviour(conn: socket.socket, server: FakeServer) -> None:
        if read_first:
            read_instream(conn, server)
        conn.sendall(reply)

    return behaviour


def hangs_up(conn: socket.socket, server: FakeServer) -> None:
    conn.close()


# --- clamd -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clamd() -> Iterator[Clamd]:
    with Clamd(stream_max="1M") as server:
        assert isinstance(server, Clamd)
        yield server


def scan(path: str | Path, data: bytes, timeout: float = 20.0) -> VirusResult:
    return asyncio.run(clamd_scan(str(path), data, timeout))


def test_eicar_in_a_text_body(clamd: Clamd) -> None:
    body = "Please find the test string below.\n\n" + EICAR.decode() + "\n\nRegards\n"
    result = scan(clamd.socket, message(body))
    # Pasted into a text body only the NDB (body) signature can find it (RECIPES.md 6).
    assert result == VirusResult("virus", EICAR_NDB)


def test_eicar_as_a_base64_attachment(clamd: Clamd) -> None:
    data = message(attachments=(("eicar.com", "application/octet-stream", EICAR),))
    assert EICAR not in data  # only base64-encoded: clamd must decode the MIME part
    result = scan(clamd.socket, data)
    assert result.kind == "virus" and result.detail in EICAR_NAMES, result


def test_eicar_inside_a_zip_attachment(clamd: Clamd) -> None:
    archive = zipped({"readme.txt": b"nothing here\n", "docs/eicar.com": EICAR})
    data = message(attachments=(("files.zip", "application/zip", archive),))
    assert EICAR not in data and EICAR not in archive  # deflated, then base64
    result = scan(clamd.socket, data)
    assert result.kind == "virus" and result.detail in EICAR_NAMES, result


def test_clean_message(clamd: Clamd) -> None:
    assert scan(clamd.socket, message()) == VirusResult("clean")
    # A ZIP of harmless files is clean too (the archive alone is no finding).
    archive = zipped({"notes.txt": b"lunch at noon\n"})
    data = message(attachments=(("notes.zip", "application/zip", archive),))
    assert scan(clamd.socket, data) == VirusResult("clean")


def test_empty_message_is_clean(clamd: Clamd) -> None:
    # No chunk at all, only the terminator: still a complete INSTREAM.
    assert scan(clamd.socket, b"") == VirusResult("clean")


@pytest.mark.parametrize("size", [STREAM_MAX + 1, 3 * STREAM_MAX])
def test_over_stream_max_length_is_an_error_never_clean(clamd: Clamd, size: int) -> None:
    result = scan(clamd.socket, sized(size))
    assert result.kind == "error"
    # clamd's own answer, not lost to the failed send that follows it.
    assert result.detail == "clamd: INSTREAM size limit exceeded. ERROR", result


def test_virus_in_the_first_megabyte_of_an_oversized_message_is_not_clean(clamd: Clamd) -> None:
    data = b"Subject: big\r\n\r\n" + EICAR + b"\r\n" + sized(2 * STREAM_MAX)
    result = scan(clamd.socket, data)
    assert result.kind == "error" and "INSTREAM size limit exceeded" in result.detail


@pytest.mark.parametrize("size", [STREAM_MAX - 1, STREAM_MAX], ids=["just-under", "exactly"])
def test_eicar_at_the_end_of_a_message_just_under_the_limit_is_found(
    clamd: Clamd, size: int
) -> None:
    data = sized(size, tail=EICAR + b"\r\n")
    assert len(data) == size and data.endswith(EICAR + b"\r\n")
    assert scan(clamd.socket, data) == VirusResult("virus", EICAR_NDB)


def test_many_chunks_are_sent_whole(clamd: Clamd) -> None:
    # 900 KB: 14 INSTREAM chunks; EICAR split across a chunk boundary (65536) is still found.
    data = bytearray(sized(900_000))
    data[65536 - 30 : 65536 - 30 + len(EICAR)] = EICAR
    assert scan(clamd.socket, bytes(data)) == VirusResult("virus", EICAR_NDB)


def test_clamd_stopped_is_an_error(clamd: Clamd) -> None:
    clamd.stop()
    try:
        result = scan(clamd.socket, message())
    finally:
        clamd.start()
    assert result.kind == "error"
    assert result.detail.startswith(f"clamd socket {clamd.socket}: ")
    assert scan(clamd.socket, message()) == VirusResult("clean")  # back


def test_socket_nobody_listens_on_is_an_error(tmp_path: Path) -> None:
    # A stale socket file (the server died without removing it): connection refused.
    path = Path(tempfile.mkdtemp(prefix="st.", dir="/tmp")) / "stale.sock"
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(str(path))
        result = scan(path, message())
    finally:
        shutil.rmtree(path.parent)
    assert result.kind == "error" and "Connection refused" in result.detail, result
    missing = scan(tmp_path / "none.sock", message())
    assert missing.kind == "error" and "No such file or directory" in missing.detail


def test_server_that_never_answers_times_out() -> None:
    with FakeServer(silent) as fake:
        result = scan(fake.path, message(), timeout=0.5)
    assert result == VirusResult("error", "clamd did not answer within 0.5 s")


def test_timeout_while_sending_closes_the_connection() -> None:
    """A hung clamd that stops reading mid-message: after the timeout nothing of ours is left
    (no task, no open socket waiting to flush 4 MB into a server that never reads)."""

    async def run(fake: FakeServer) -> tuple[VirusResult, set[asyncio.Task[object]], int]:
        result = await clamd_scan(fake.path, sized(4 * STREAM_MAX), 0.5)
        for _ in range(5):  # let cancelled callbacks run
            await asyncio.sleep(0)
        left = {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}
        assert fake.accepted.wait(10)
        poller = select.poll()
        poller.register(fake.connections[0], select.POLLRDHUP)
        # The server end sees our hang-up (at once; 10 s is only a bound on a failure).
        events = await asyncio.to_thread(poller.poll, 10_000)
        return result, left, events[0][1] if events else 0

    with FakeServer(silent) as fake:
        result, left, event = asyncio.run(run(fake))
    assert result == VirusResult("error", "clamd did not answer within 0.5 s")
    assert left == set()
    assert event & select.POLLRDHUP


@pytest.mark.parametrize(
    ("behaviour", "detail"),
    [
        (hangs_up, "clamd closed the connection without an answer"),
        (answers(b"", read_first=True), "clamd closed the connection without an answer"),
        (answers(b"220 mail.example.org ESMTP\r\n", read_first=False),
         "clamd: 220 mail.example.org ESMTP?"),
        (answers(b"UNKNOWN COMMAND\0"), "clamd: UNKNOWN COMMAND"),
        (answers(b"stream: OK but not really\0"), "clamd: stream: OK but not really"),
        (answers(b"\x1b[31mstream\x07: \xff\xfe ERROR\0"), "clamd: ?[31mstream?: ?? ERROR"),
        (answers(b"stream: OK" + b"A" * 5000), "clamd: stream: OK" + "A" * 190),
    ],
    ids=["hangs-up", "reads-then-hangs-up", "smtp-banner", "unknown", "almost-ok", "control",
         "long"],
)  # fmt: skip
def test_garbage_or_no_answer_is_an_error_never_clean(
    behaviour: Callable[[socket.socket, FakeServer], None], detail: str
) -> None:
    with FakeServer(behaviour) as fake:
        result = scan(fake.path, message())
    assert result == VirusResult("error", detail)
    assert len(result.detail) <= 8 + 200 and result.detail.isprintable()


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (b"stream: OK\0", VirusResult("clean")),
        (b"stream: Win.Test.Foo-1 FOUND\0", VirusResult("virus", "Win.Test.Foo-1")),
        # A name that could be text in an SMTP reply or a log: never passed on as it is.
        (b"stream: evil\x1b[0m name FOUND\0", VirusResult("virus", "unnamed signature")),
        (
            b"stream: evil\r\n550 name FOUND\0",
            VirusResult("error", "clamd: stream: evil??550 name FOUND"),
        ),
        (b"stream: " + b"X" * 300 + b" FOUND\0", VirusResult("virus", "unnamed signature")),
    ],
    ids=["ok", "found", "hostile-name", "line-break", "long-name"],
)
def test_answers_are_parsed(reply: bytes, expected: VirusResult) -> None:
    with FakeServer(answers(reply)) as fake:
        data = message()
        assert scan(fake.path, data) == expected
        # What the server got was one INSTREAM of the whole message.
        assert bytes(fake.received) == b"zINSTREAM\0" + len(data).to_bytes(4, "big") + data + (
            b"\0" * 4
        )


def test_answer_in_pieces_is_read_whole() -> None:
    def slow(conn: socket.socket, server: FakeServer) -> None:
        read_instream(conn, server)
        conn.sendall(b"stream: Test.Slow")
        server.release.wait(0.2)  # two writes: the client must not take the first as all
        conn.sendall(b"-1 FOUND\0")

    with FakeServer(slow) as fake:
        assert scan(fake.path, message()) == VirusResult("virus", "Test.Slow-1")


# --- spamd -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def spamd() -> Iterator[Spamd]:
    with Spamd() as server:
        assert isinstance(server, Spamd)
        yield server


def spam_settings(**overrides: object) -> Settings:
    values: dict[str, object] = {"primary_hostname": PRIMARY_HOSTNAME, "spamd_timeout": 20.0}
    values.update(overrides)
    return settings_mod.load(str(OFFLINE), values)


def check(settings: Settings, data: bytes) -> SpamResult:
    return asyncio.run(spamd_check(settings, data))


def test_gtube_scores_as_spam(spamd: Spamd) -> None:
    result = check(spam_settings(spamd_socket=str(spamd.socket)), message(GTUBE.decode() + "\n"))
    assert result.kind == "scanned", result
    assert result.score >= 900  # 1000 for GTUBE, plus or minus what other rules give
    assert "GTUBE" in result.report and result.detail == ""


def test_ham_scores_low(spamd: Spamd) -> None:
    result = check(spam_settings(spamd_socket=str(spamd.socket)), message())
    assert result.kind == "scanned", result
    # Seen: 1.3 (RCVD_ILLEGAL_IP: 203.0.113.5 is a documentation address), never near 3.5.
    assert result.score < Settings.spam_flag_score == 3.5, result
    assert "GTUBE" not in result.report and "Content analysis details" in result.report


def test_spamd_stopped_is_an_error(spamd: Spamd) -> None:
    settings = spam_settings(spamd_socket=str(spamd.socket))
    spamd.stop()
    try:
        result = check(settings, message())
    finally:
        spamd.start()
    assert result.kind == "error" and result.score == 0.0
    assert result.detail.startswith(f"spamd {spamd.socket}: "), result
    assert check(settings, message()).kind == "scanned"  # back


def test_unused_tcp_port_is_an_error() -> None:
    with socket.socket() as s:  # a port that was free a moment ago, nothing listens on it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = check(spam_settings(spamd_socket="", spamd_host="127.0.0.1", spamd_port=port),
                   message())  # fmt: skip
    assert result.kind == "error" and result.detail.startswith(f"spamd 127.0.0.1:{port}: ")


def test_missing_socket_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "none.sock"
    result = check(spam_settings(spamd_socket=str(path)), message())
    assert result.kind == "error" and result.detail.startswith(f"spamd {path}: ")


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_spamd_that_never_answers_times_out(tcp: bool) -> None:
    with FakeServer(silent, tcp=tcp) as fake:
        where = {"spamd_socket": "", "spamd_host": "127.0.0.1", "spamd_port": fake.port} if tcp \
            else {"spamd_socket": fake.path}  # fmt: skip
        result = check(spam_settings(spamd_timeout=0.5, **where), message())
    expected = f"127.0.0.1:{fake.port}" if tcp else fake.path
    assert result == SpamResult("error", detail=f"spamd {expected} did not answer within 0.5 s")


def read_spamc(conn: socket.socket, server: FakeServer) -> None:
    """Reads one spamc request (headers, then Content-length bytes)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))  # fmt: skip
    while len(body) < length:
        body += conn.recv(65536)
    server.received += head + b"\r\n\r\n" + body


def spamd_answers(reply: bytes) -> Callable[[socket.socket, FakeServer], None]:
    def behaviour(conn: socket.socket, server: FakeServer) -> None:
        read_spamc(conn, server)
        conn.sendall(reply)

    return behaviour


@pytest.mark.parametrize(
    "reply",
    [
        b"",  # hangs up after the request
        b"HTTP/1.1 200 OK\r\n\r\n",
        b"SPAMD/1.5 76 EX_PROTOCOL Bad header line\r\n\r\n",
        b"SPAMD/1.1 0 EX_OK\r\nContent-length: 4\r\n\r\nabcd",  # no Spam: header
        b"SPAMD/1.1 0 EX_OK\r\nSpam: True ; lots / 5.0\r\n\r\n",  # no number
    ],
    ids=["hangs-up", "http", "ex-protocol", "no-spam-header", "bad-score"],
)
def test_garbage_from_spamd_is_an_error(reply: bytes) -> None:
    with FakeServer(spamd_answers(reply)) as fake:
        result = check(spam_settings(spamd_socket=fake.path), message())
        assert fake.received.startswith(b"REPORT SPAMC/")
    assert result.kind == "error" and result.detail.startswith(f"spamd {fake.path}: "), result
    assert result.detail.isprintable() and len(result.detail) < 400


def test_tcp_spamd_answer_is_read() -> None:
    report = b"Content analysis details:   (7.5 points, 5.0 required)\r\n 7.5 FAKE_RULE  fake\r\n"
    reply = (b"SPAMD/1.1 0 EX_OK\r\nContent-length: %d\r\nSpam: True ; 7.5 / 5.0\r\n\r\n"
             % len(report)) + report  # fmt: skip
    with FakeServer(spamd_answers(reply), tcp=True) as fake:
        settings = spam_settings(spamd_socket="", spamd_host="127.0.0.1", spamd_port=fake.port)
        data = message()
        result = check(settings, data)
        # The whole message went over, as it is.
        assert bytes(fake.received).endswith(b"\r\n\r\n" + data)
    assert result == SpamResult("scanned", 7.5, report.decode())


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_a_spamd_check_builds_no_tls_context(
    spamd: Spamd, tcp: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """spamd speaks plain text here (a Unix socket or TCP): no TLS context per check.
    aiospamc's frontend functions (aiospamc.report) built two per call, each loading the CA
    certificates: 35 ms of CPU per message, the daemon's largest cost at DATA."""
    made: list[object] = []
    real = ssl.create_default_context

    def counting(*args: object, **kwargs: object) -> ssl.SSLContext:
        made.append(args)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(ssl, "create_default_context", counting)
    report = b" 7.5 FAKE_RULE  fake\r\n"
    reply = (b"SPAMD/1.1 0 EX_OK\r\nContent-length: %d\r\nSpam: True ; 7.5 / 5.0\r\n\r\n"
             % len(report)) + report  # fmt: skip
    with FakeServer(spamd_answers(reply), tcp=True) as fake:
        where = {"spamd_socket": "", "spamd_host": "127.0.0.1", "spamd_port": fake.port} if tcp \
            else {"spamd_socket": str(spamd.socket)}  # fmt: skip
        result = check(spam_settings(**where), message())
    assert result.kind == "scanned", result
    assert made == []
