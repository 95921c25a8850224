"""The policy daemon over its Unix socket: a real ``python -m policy serve`` subprocess.

What is tested here is the transport and the life cycle (policy/daemon.py, policy/logbook.py):
framing the way Exim's ``${readsocket}`` sends a request, concurrency, slow and vanishing
clients, the request deadline, overload, reloads, unreadable files, start-up checks on the
socket path, SIGTERM draining, the decision log and the shape of every reply.

Most tests share one daemon (module scope, ``request_deadline = 1.0``) whose tree has 64 extra
aliases ``fanN@example.org -> destN@remote.example``: an ALIAS answer is then exact and unique per
request, so a reply sent to the wrong client would be caught. Tests that edit the tree, signal the
daemon or need other settings start their own (``start_daemon`` from conftest).
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from policy import __version__
from policy.protocol import MAX_LINE, encode_request
from tests.conftest import EXAMPLE, OFFLINE, PRIMARY_HOSTNAME, REPO, Daemon, wait_for_ping

pytestmark = pytest.mark.integration

StartDaemon = Callable[..., Daemon]

FANS = 64  # extra aliases in the shared tree
DEADLINE = 1.0  # request_deadline of the shared daemon
PROMPT = 0.5  # "answered at once", generous for a shared 2-core machine

FOREIGN_IP = "203.0.113.5"  # not in relay_from_hosts
RELAY_IP = "192.0.2.5"  # in relay_from_hosts (192.0.2.0/24)

ACCEPT_RCPT = b"ACCEPT 250 2.1.5 "
ACCEPT_MAIL = b"ACCEPT 250 2.1.0 "
DENY_USER = b"DENY 550 5.1.1 "
DENY_RELAY = b"DENY 550 5.7.1 "
DEFER_LOCAL = b"DEFER 451 4.3.0 "
DEFER_PROTOCOL = b"DEFER 451 4.5.0 "
OVERLOADED = b"DEFER 451 4.3.2 policy daemon overloaded\n"
PONG = f"PONG mailpolicy {__version__}\n".encode()
NOTFOUND = b"NOTFOUND\n"
REPLY_WORDS = (b"ACCEPT ", b"DEFER ", b"DENY ", b"FOUND ", b"NOTFOUND\n", b"PONG ")

TIMESTAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"
VALUE = r'(?:"(?:[^"\\]|\\.)*"|[^\s"]+)'
DECISION = re.compile(
    rf"^{TIMESTAMP} decision stage=(?P<stage>\S+) ip=(?P<ip>{VALUE}) "
    rf"sender=(?P<sender>{VALUE}) rcpt=(?P<rcpt>{VALUE}) verdict=(?P<verdict>{VALUE}) "
    rf"check=(?P<check>\S+) reason=(?P<reason>{VALUE}) source=(?P<source>{VALUE}) "
    r"duration_ms=(?P<duration>\d+\.\d{3})$"
)
EVENT = re.compile(rf"^{TIMESTAMP} event \S.*$")


# --- clients -----------------------------------------------------------------------------


def read_all(s: socket.socket) -> bytes:
    """Read to EOF. ECONNRESET after the reply counts as EOF: Linux reports it on an AF_UNIX
    socket whose peer closed with our unread request bytes still queued (overload, long line)."""
    chunks = []
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def exchange(
    path: str | os.PathLike[str], data: bytes, shut: bool = True, timeout: float = 5.0
) -> bytes:
    """One request as ${readsocket} sends it (write, shut down the write side, read to EOF),
    tolerating a daemon that answered and closed before we finished writing."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(os.fspath(path))
        try:
            s.sendall(data)
            if shut:
                s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass
        return read_all(s)


def timed(path: str | os.PathLike[str], data: bytes) -> tuple[bytes, float]:
    t = time.monotonic()
    reply = exchange(path, data)
    return reply, time.monotonic() - t


def rcpt(addr: str, ip: str = FOREIGN_IP, sender: str = "someone@remote.example") -> bytes:
    return encode_request("RCPT", ip=ip, sender=sender, rcpt=addr)


def alias(addr: str) -> bytes:
    return encode_request("ALIAS", addr=addr)


def poll(
    probe: Callable[[], bytes],
    done: Callable[[bytes], bool],
    timeout: float,
    seen: list[bytes] | None = None,
) -> tuple[bytes, float]:
    """Call ``probe`` until ``done(result)``; returns (result, seconds). Fails after ``timeout``.
    Every distinct result is appended to ``seen`` (to check what answers came in between)."""
    start = time.monotonic()
    while True:
        result = probe()
        if seen is not None and (not seen or seen[-1] != result):
            seen.append(result)
        elapsed = time.monotonic() - start
        if done(result):
            return result, elapsed
        if elapsed > timeout:
            pytest.fail(f"still {result!r} after {elapsed:.2f}s")
        time.sleep(0.02)


def poll_changed(d: Daemon, request: bytes, before: bytes, timeout: float) -> list[bytes]:
    """Ask until the reply no longer starts with ``before``; every distinct reply seen."""
    seen: list[bytes] = []
    poll(lambda: exchange(d.socket, request), lambda r: not r.startswith(before), timeout, seen)
    return seen


def wait_lines(d: Daemon, token: str, n: int, timeout: float = 3.0) -> str:
    """The log text once ``n`` lines hold ``token``."""
    deadline = time.monotonic() + timeout
    while True:
        text = d.log_text()
        if sum(token in line for line in text.splitlines()) >= n:
            return text
        if time.monotonic() > deadline:
            pytest.fail(f"fewer than {n} lines with {token!r} after {timeout}s:\n{text[-3000:]}")
        time.sleep(0.05)


def wait_log(d: Daemon, pattern: str, timeout: float = 3.0) -> str:
    """The log text once ``pattern`` (a regex) is in it (decisions are flushed every 0.2 s)."""
    deadline = time.monotonic() + timeout
    while True:
        text = d.log_text()
        if re.search(pattern, text):
            return text
        if time.monotonic() > deadline:
            pytest.fail(f"{pattern!r} not in the log after {timeout}s:\n{text[-3000:]}")
        time.sleep(0.05)


def unquote(value: str) -> str:
    """Invert logbook.quote (for checking that a hostile value round-trips)."""
    if not value.startswith('"'):
        return value

    def one(m: re.Match[str]) -> str:
        e = m.group(1)
        if e[0] in "xu":
            code = int(e[1:], 16)
            return chr(0xDC00 + code) if e[0] == "x" and code >= 0x80 else chr(code)
        return e

    return re.sub(r"\\(x[0-9a-f]{2}|u[0-9a-f]{4}|.)", one, value[1:-1])


def serve_command(sock: Path, root: Path, log: Path, *extra: str) -> list[str]:
    offline = () if "--config" in extra else ("--config", str(OFFLINE))
    return [
        sys.executable, "-m", "policy", "serve", "--root", str(root), "--socket", str(sock),
        "--log-file", str(log), "--primary-hostname", PRIMARY_HOSTNAME, *offline, *extra,
    ]  # fmt: skip


def serve_fails(sock: Path, root: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """Run a daemon that is expected to refuse to start."""
    return subprocess.run(
        serve_command(sock, root, sock.parent / "refused.log", *extra),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=20,
    )


# --- the shared daemon -------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared() -> Iterator[Daemon]:
    base = Path(tempfile.mkdtemp(prefix="mpd.", dir="/tmp"))
    os.chmod(base, 0o755)
    root = base / "tree"
    shutil.copytree(EXAMPLE, root)
    with (root / "aliases" / "example.org").open("a") as f:
        f.writelines(f"fan{i}: dest{i}@remote.example\n" for i in range(FANS))
    cfg = base / "cfg.toml"
    cfg.write_text(OFFLINE.read_text() + f"request_deadline = {DEADLINE}\n")
    sock, log = base / "p.sock", base / "p.log"
    with (base / "stderr").open("wb") as err:
        proc = subprocess.Popen(serve_command(sock, root, log, "--config", str(cfg)), cwd=REPO,
                                stderr=err)  # fmt: skip
    d = Daemon(proc, sock, log, root)
    try:
        wait_for_ping(sock, proc)
        yield d
    finally:
        d.stop()
        shutil.rmtree(base, ignore_errors=True)


def stderr_of(d: Daemon) -> str:
    return (d.socket.parent / "stderr").read_text(errors="replace")


# --- 1. concurrency ----------------------------------------------------------------------


def test_concurrent_clients_each_get_their_own_answer(shared: Daemon) -> None:
    cases: list[tuple[bytes, bytes, bool]] = []  # request, expected, exact (else prefix)
    for i in range(200):
        kind = i % 7
        if kind in (0, 1):
            n = i % FANS
            cases.append(
                (alias(f"fan{n}@example.org"), f"FOUND dest{n}@remote.example\n".encode(), True)
            )
        elif kind == 2:
            cases.append((rcpt(f"alice+t{i}@example.org"), ACCEPT_RCPT, False))
        elif kind == 3:
            cases.append((rcpt(f"nobody{i}@example.org"), DENY_USER, False))
        elif kind == 4:
            cases.append((rcpt(f"x{i}@elsewhere.example"), DENY_RELAY, False))
        elif kind == 5:
            cases.append((b"PING\n", PONG, True))
        else:
            cases.append((alias(f"none{i}@example.org"), NOTFOUND, True))
    gate = threading.Barrier(32)

    def one(case: tuple[bytes, bytes, bool], index: int) -> bytes:
        if index < 32:
            gate.wait(10)  # the first 32 requests start together
        return exchange(shared.socket, case[0])

    start = time.monotonic()
    with ThreadPoolExecutor(32) as pool:
        replies = list(pool.map(one, cases, range(len(cases))))
    elapsed = time.monotonic() - start
    for (request, expected, exact), reply in zip(cases, replies, strict=True):
        if exact:
            assert reply == expected, request
        else:
            assert reply.startswith(expected), (request, reply)
            assert reply.endswith(b"\n") and reply.count(b"\n") == 1, reply
    assert elapsed < 10, f"200 requests took {elapsed:.1f}s"
    assert shared.proc.poll() is None


# --- 2. slow clients and the request deadline --------------------------------------------


def test_slow_client_does_not_block_others_and_times_out(shared: Daemon) -> None:
    slow = []
    started = time.monotonic()
    for _ in range(10):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        s.connect(os.fspath(shared.socket))
        s.sendall(b"RCPT ip=203.0.113.5 sender=")  # half a line, then nothing
        slow.append(s)
    try:
        # While they stall, everybody else is served at once.
        worst = 0.0
        n = 0
        while time.monotonic() - started < DEADLINE * 0.7:
            reply, took = timed(shared.socket, alias(f"fan{n % FANS}@example.org"))
            assert reply == f"FOUND dest{n % FANS}@remote.example\n".encode()
            reply, took2 = timed(shared.socket, rcpt("bob@example.org"))
            assert reply.startswith(ACCEPT_RCPT), reply
            worst = max(worst, took, took2)
            n += 1
        assert n >= 3
        assert worst < PROMPT, f"a request took {worst:.3f}s while slow clients stalled"
        # The slow ones get a DEFER naming the timeout after request_deadline (sweep <= 0.125 s).
        for s in slow:
            reply = read_all(s)
            waited = time.monotonic() - started
            assert reply.startswith(DEFER_LOCAL), reply
            assert b"timed out" in reply
            assert reply.endswith(b"\n") and reply.count(b"\n") == 1
        assert DEADLINE * 0.9 <= waited < DEADLINE + 1.5, waited
    finally:
        for s in slow:
            s.close()
    assert exchange(shared.socket, b"PING\n") == PONG
    wait_log(shared, r'check=daemon reason="request deadline passed"')


def test_idle_connection_times_out_too(shared: Daemon) -> None:
    """A client that connects and sends nothing at all is also answered at the deadline."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(os.fspath(shared.socket))
        start = time.monotonic()
        reply = read_all(s)
        waited = time.monotonic() - start
    assert reply.startswith(DEFER_LOCAL) and b"timed out" in reply, reply
    assert DEADLINE * 0.9 <= waited < DEADLINE + 1.5, waited


# --- 3. clients that go away -------------------------------------------------------------


def test_client_disconnects_do_not_hurt(shared: Daemon) -> None:
    path = os.fspath(shared.socket)
    for i in range(30):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(path)
            if i % 3 == 0:
                s.sendall(b"RCPT ip=203.0.113.5 sen")  # partial line, then close
            elif i % 3 == 1:
                pass  # connect and close at once
            else:
                s.sendall(rcpt("alice@example.org"))  # full request, never read the reply
        if i % 10 == 9:
            assert exchange(path, b"PING\n") == PONG
    # Still serving, and correctly.
    assert exchange(path, alias("fan7@example.org")) == b"FOUND dest7@remote.example\n"
    assert exchange(path, rcpt("alice@example.org")).startswith(ACCEPT_RCPT)
    assert shared.proc.poll() is None
    time.sleep(0.1)
    err = stderr_of(shared)
    assert "Traceback" not in err and "Exception" not in err, err


# --- 4. framing --------------------------------------------------------------------------


def test_line_without_lf_then_eof_is_answered(shared: Daemon) -> None:
    assert exchange(shared.socket, b"PING") == PONG
    reply = exchange(shared.socket, rcpt("alice@example.org").rstrip(b"\n"))
    assert reply.startswith(ACCEPT_RCPT), reply
    # CRLF is fine too.
    assert exchange(shared.socket, alias("fan3@example.org").replace(b"\n", b"\r\n")) == (
        b"FOUND dest3@remote.example\n"
    )


def test_empty_request_gets_defer(shared: Daemon) -> None:
    for data in (b"", b"\n", b"   \r\n"):
        reply = exchange(shared.socket, data)
        assert reply.startswith(DEFER_PROTOCOL), (data, reply)
        assert b"empty request" in reply


def test_request_in_tiny_pieces(shared: Daemon) -> None:
    line = alias("fan11@example.org")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(os.fspath(shared.socket))
        for i in range(len(line)):
            s.sendall(line[i : i + 1])
            time.sleep(0.002)
        reply = read_all(s)  # no shutdown: the LF ends the request
    assert reply == b"FOUND dest11@remote.example\n"


def test_only_the_first_line_is_answered(shared: Daemon) -> None:
    reply = exchange(shared.socket, b"PING\n" + alias("fan1@example.org"))
    assert reply == PONG


def test_overlong_line_answered_without_waiting_for_eof(shared: Daemon) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(os.fspath(shared.socket))
        start = time.monotonic()
        with contextlib.suppress(BrokenPipeError):
            s.sendall(b"RCPT " + b"A" * (MAX_LINE + 100))  # no LF, no shutdown
        reply = read_all(s)
        took = time.monotonic() - start
    assert reply.startswith(DEFER_PROTOCOL), reply
    assert f"longer than {MAX_LINE} bytes".encode() in reply
    assert took < PROMPT, took  # not the request deadline (1 s): it did not wait for EOF


def test_line_length_boundary(shared: Daemon) -> None:
    longest = b"PING" + b" " * (MAX_LINE - 5) + b"\n"
    assert len(longest) == MAX_LINE
    assert exchange(shared.socket, longest) == PONG
    one_more = b"PING" + b" " * (MAX_LINE - 4) + b"\n"
    reply = exchange(shared.socket, one_more)
    assert reply.startswith(DEFER_PROTOCOL) and b"longer than" in reply, reply
    # A huge request is cut off, not buffered: the daemon answers and closes.
    reply = exchange(shared.socket, b"PING " + b"x" * 1_000_000 + b"\n")
    assert reply.startswith(DEFER_PROTOCOL) and b"longer than" in reply, reply


# --- 10. the decision log ----------------------------------------------------------------


def decisions_with(text: str, token: str) -> list[re.Match[str]]:
    lines = [line for line in text.splitlines() if token in line]
    matches = [DECISION.match(line) for line in lines]
    assert all(matches), lines
    return [m for m in matches if m is not None]


def test_one_log_line_per_decision(shared: Daemon) -> None:
    tok = f"t{os.getpid()}x{time.monotonic_ns()}"
    requests = {
        "accept": rcpt(f"alice+{tok}@example.org"),
        "deny": rcpt(f"nobody-{tok}@example.org"),
        "relay": rcpt(f"{tok}@elsewhere.example", ip=RELAY_IP),
        "mail": encode_request("MAIL", ip=FOREIGN_IP, sender=f"{tok}@remote.example"),
        "alias": alias(f"{tok}@example.org"),
        "bad": f"BOGUS{tok} x=y\n".encode(),
    }
    replies = {k: exchange(shared.socket, v) for k, v in requests.items()}
    assert exchange(shared.socket, b"PING\n") == PONG  # not a decision: no line
    assert replies["accept"].startswith(ACCEPT_RCPT)
    assert replies["deny"].startswith(DENY_USER)
    assert replies["relay"].startswith(ACCEPT_RCPT)
    assert replies["mail"].startswith(ACCEPT_MAIL)
    assert replies["alias"] == NOTFOUND
    assert replies["bad"].startswith(DEFER_PROTOCOL)
    found = decisions_with(wait_lines(shared, tok, 6), tok)
    assert len(found) == 6, [m.group(0) for m in found]
    by_stage: dict[str, list[re.Match[str]]] = {}
    for m in found:
        by_stage.setdefault(m["stage"], []).append(m)
        assert 0 <= float(m["duration"]) < 1000
    assert len(by_stage["RCPT"]) == 3 and len(by_stage["MAIL"]) == 1
    assert len(by_stage["ALIAS"]) == 1 and len(by_stage["-"]) == 1
    accept = next(m for m in by_stage["RCPT"] if f"alice+{tok}" in m["rcpt"])
    assert accept["ip"] == FOREIGN_IP
    assert unquote(accept["sender"]) == "<someone@remote.example>"
    assert unquote(accept["rcpt"]) == f"<alice+{tok}@example.org>"
    assert unquote(accept["verdict"]) == "ACCEPT 250 2.1.5"
    assert accept["check"] == "recipient"
    assert unquote(accept["source"]) == "passwd/example.org:13"
    deny = next(m for m in by_stage["RCPT"] if f"nobody-{tok}" in m["rcpt"])
    assert unquote(deny["verdict"]) == "DENY 550 5.1.1"
    assert deny["check"] == "recipient"
    assert f"nobody-{tok}" in unquote(deny["reason"])
    relay = next(m for m in by_stage["RCPT"] if m["ip"] == RELAY_IP)
    assert relay["check"] == "relay" and unquote(relay["verdict"]) == "ACCEPT 250 2.1.5"
    assert unquote(relay["source"]) == "exim/conf/relay_from_hosts:14"
    mail = by_stage["MAIL"][0]
    assert unquote(mail["sender"]) == f"<{tok}@remote.example>" and mail["rcpt"] == "-"
    assert unquote(by_stage["ALIAS"][0]["verdict"]) == "NOTFOUND"
    bad = by_stage["-"][0]
    assert bad["check"] == "protocol" and "unknown verb" in unquote(bad["reason"])


def test_connect_and_data_stages(shared: Daemon) -> None:
    """CONNECT and DATA are answered (Exim asks at every stage) and DATA's log line names the
    message by Exim's id, so an admin can follow a message from Exim's log to ours."""
    tok = f"1{os.getpid()}x{time.monotonic_ns()}"
    assert exchange(shared.socket, encode_request("CONNECT", ip=FOREIGN_IP)).startswith(
        b"ACCEPT 220 2.0.0 "
    )
    assert exchange(shared.socket, encode_request("CONNECT", ip="")).startswith(b"ACCEPT 220 ")
    data = encode_request(
        "DATA", ip=FOREIGN_IP, sender="x@remote.example", rcpts="2", id=tok, size="1234"
    )
    assert exchange(shared.socket, data).startswith(b"ACCEPT 250 2.0.0 ")
    # Required fields and numbers are enforced like everywhere else.
    bad = exchange(shared.socket, b"DATA ip= sender= size=12\n")
    assert bad.startswith(DEFER_PROTOCOL) and b"missing field 'rcpts'" in bad
    (line,) = decisions_with(wait_lines(shared, tok, 1), tok)
    assert line["stage"] == "DATA" and line["ip"] == FOREIGN_IP
    assert unquote(line["verdict"]) == "ACCEPT 250 2.0.0"
    # The message's id first, then what each check said (all off in tests/offline.toml).
    assert unquote(line["reason"]) == (
        f"id={tok} size=1234 rcpts=2; dkim: DKIM checks are off (dkim_enabled = false); "
        'attachments: no blocked extensions; virus: virus scanning is off (clamd_socket = ""); '
        "spam: spam scanning is off (no spamd_socket or spamd_host)"
    )


def test_hostile_values_cannot_forge_log_lines(shared: Daemon) -> None:
    tok = f"h{os.getpid()}x{time.monotonic_ns()}"
    forged = (
        "2026-01-01T00:00:00.000Z decision stage=RCPT ip=6.6.6.6 sender=<> rcpt=<a@b> "
        'verdict="ACCEPT 250 2.1.5" check=relay reason=- source=- duration_ms=0.001'
    )
    sender = f'ev"il\n{forged}\r\n\\"@remote.example'
    rcpt_addr = f'{tok}"\n{forged}\n\x7f\x1b[2J\u2028\udcffx@example.org'
    reply = exchange(shared.socket, rcpt(rcpt_addr, sender=sender))
    assert reply.startswith(b"DENY 550 5.1."), reply
    text = wait_log(shared, tok)
    assert "2026-01-01T00:00:00.000Z" not in [line[:24] for line in text.splitlines()]
    found = decisions_with(text, tok)
    assert len(found) == 1
    assert unquote(found[0]["rcpt"]) == f"<{rcpt_addr}>"
    assert unquote(found[0]["sender"]) == f"<{sender}>"
    for line in text.splitlines():  # every line of the log is a well-formed record
        assert DECISION.match(line) or EVENT.match(line), line


# --- 11. replies are one clean line, whatever comes in -----------------------------------


def check_reply(reply: bytes) -> None:
    assert reply.endswith(b"\n"), reply
    assert reply.count(b"\n") == 1 and b"\r" not in reply, reply
    assert reply.startswith(REPLY_WORDS), reply
    assert all(0x20 <= b <= 0x7E for b in reply[:-1]), reply


SPECIALS = '\r\n\x00\x7f\t"\\ <>@%!|'
# Half the texts pure ASCII: a non-ASCII character in an echoed address makes the reply fail to
# encode (an internal-error DEFER), which would hide a CR or LF echoed next to it.
hostile_text = st.text(st.characters(max_codepoint=0x7F) | st.sampled_from(SPECIALS)) | st.text(
    st.characters(codec="utf-8", exclude_categories=["Cs"]) | st.sampled_from(SPECIALS)
)
structured = st.builds(
    lambda verb, local, domain, ip, sender: (
        encode_request("ALIAS", addr=f"{local}@{domain}")
        if verb == "ALIAS"
        else encode_request("MAIL", ip=ip, sender=sender)
        if verb == "MAIL"
        else encode_request("RCPT", ip=ip, sender=sender, rcpt=f"{local}@{domain}")
    ),
    st.sampled_from(["RCPT", "MAIL", "ALIAS"]),
    hostile_text,
    st.sampled_from(["example.org", "example.net", "example.com", "elsewhere.example", ""])
    | hostile_text,
    st.sampled_from([FOREIGN_IP, RELAY_IP, "127.0.0.1", "", "::1"]),
    hostile_text,
)
raw_bytes = st.binary(max_size=300) | st.builds(
    lambda head, n, tail: head + b"x" * n + tail,
    st.binary(max_size=40),
    st.integers(MAX_LINE - 50, MAX_LINE + 50),
    st.binary(max_size=40),
)
verbish = st.builds(
    lambda verb, rest: verb + rest,
    st.sampled_from([b"PING", b"RCPT ", b"MAIL ", b"ALIAS ", b"ALIAS addr=", b"RCPT ip="]),
    st.binary(max_size=200),
)


@settings(max_examples=200, deadline=None, database=None)
@example(data=rcpt("a\r\nb@example.org"), shut=True)  # an echoed address (DENY 5.1.1 <...>)
@example(data=rcpt("a\rb@example.com", ip=RELAY_IP), shut=False)
@example(data=alias("x\ny@example.org"), shut=True)
@example(data=encode_request("MAIL", ip=FOREIGN_IP, sender="a\r\nb@remote.example"), shut=True)
@given(data=structured | raw_bytes | verbish, shut=st.booleans())
def test_every_reply_is_one_clean_line(shared: Daemon, data: bytes, shut: bool) -> None:
    if not shut and b"\n" not in data[:MAX_LINE] and len(data) <= MAX_LINE:
        data += b"\n"  # without EOF the LF must end it (else we would wait for the deadline)
    check_reply(exchange(shared.socket, data, shut=shut))


def test_log_stays_well_formed(shared: Daemon) -> None:
    """After everything above (fuzzing included), every log line is a record; no stray output."""
    assert exchange(shared.socket, b"PING\n") == PONG
    time.sleep(0.3)
    for line in shared.log_text().splitlines():
        assert DECISION.match(line) or EVENT.match(line), line
    assert "Traceback" not in stderr_of(shared)


# --- 5. reloading ------------------------------------------------------------------------


HASH = "{SHA512-CRYPT}$6$jbX0T09M/W/H8Ckl$wfTxoa6hk5e9GUdYnPSalXWuTvlnoCmu48LsC1z3xnr0aKnuEJPF"


def test_edits_apply_without_restart(tree: Path, start_daemon: StartDaemon) -> None:
    d = start_daemon(tree)  # reload_interval 0.5 (the default)
    passwd = tree / "passwd" / "example.org"
    original = passwd.read_text()
    assert exchange(d.socket, rcpt("dave@example.org")).startswith(DENY_USER)
    with passwd.open("a") as f:
        f.write(f"dave:{HASH}\n")
    _, took = poll(lambda: exchange(d.socket, rcpt("dave@example.org")),
                   lambda r: r.startswith(ACCEPT_RCPT), 1.0)  # fmt: skip

    aliases = tree / "aliases" / "example.org"
    assert exchange(d.socket, alias("team@example.org")) == NOTFOUND
    with aliases.open("a") as f:
        f.write("team: alice, dave\n")
    expected = b"FOUND alice@example.org,dave@example.org\n"
    _, took2 = poll(lambda: exchange(d.socket, alias("team@example.org")),
                    lambda r: r == expected, 1.0)  # fmt: skip
    assert took < 1.0 and took2 < 1.0
    assert exchange(d.socket, rcpt("team@example.org")).startswith(ACCEPT_RCPT)

    # Broken after start: bob removed and a bad line added. The last good version (with bob
    # and dave) stays in force, and the log names file:line.
    good = [line for line in passwd.read_text().splitlines() if not line.startswith("bob:")]
    broken = [*good, "this line has no colon"]
    passwd.write_text("\n".join(broken) + "\n")
    wait_log(d, rf"problem passwd/example\.org:{len(broken)}: .*keeping the last good version")
    for user in ("bob", "dave", "alice"):
        assert exchange(d.socket, rcpt(f"{user}@example.org")).startswith(ACCEPT_RCPT), user
    # A broken aliases file too.
    aliases.write_text(aliases.read_text() + "brokenalias:\n")
    n = aliases.read_text().count("\n")
    wait_log(d, rf"problem aliases/example\.org:{n}: ")
    assert exchange(d.socket, alias("team@example.org")) == expected

    # Fixed again (without bob): picked up.
    passwd.write_text("\n".join(good) + "\n")
    poll(lambda: exchange(d.socket, rcpt("bob@example.org")),
         lambda r: r.startswith(DENY_USER), 1.5)  # fmt: skip
    aliases.write_text(aliases.read_text().replace("brokenalias:\n", "brokenalias: bob\n"))
    poll(lambda: exchange(d.socket, alias("brokenalias@example.org")),
         lambda r: r == b"FOUND bob@example.org\n", 1.5)  # fmt: skip
    assert exchange(d.socket, rcpt("dave@example.org")).startswith(ACCEPT_RCPT)
    passwd.write_text(original)
    poll(lambda: exchange(d.socket, rcpt("dave@example.org")),
         lambda r: r.startswith(DENY_USER), 1.5)  # fmt: skip


def test_sighup_forces_reload_and_reopens_log(tree: Path, start_daemon: StartDaemon) -> None:
    d = start_daemon(tree, config={"reload_interval": 3600.0})
    passwd = tree / "passwd" / "example.org"
    assert exchange(d.socket, rcpt("erin@example.org")).startswith(DENY_USER)
    with passwd.open("a") as f:
        f.write(f"erin:{HASH}\n")
    time.sleep(0.7)  # longer than the default interval: no polling with 3600
    assert exchange(d.socket, rcpt("erin@example.org")).startswith(DENY_USER)
    rotated = d.log.with_name(d.log.name + ".1")
    wait_log(d, "decision stage=RCPT")
    d.log.rename(rotated)  # logrotate, then SIGHUP
    d.proc.send_signal(signal.SIGHUP)
    poll(lambda: exchange(d.socket, rcpt("erin@example.org")),
         lambda r: r.startswith(ACCEPT_RCPT), 2.0)  # fmt: skip
    text = wait_log(d, r"rcpt=<erin@example\.org> verdict=\"ACCEPT")
    assert "reloaded (SIGHUP)" in text
    assert "listening" not in text and "listening" in rotated.read_text()


def test_vanished_root_keeps_the_last_good_version(tree: Path, start_daemon: StartDaemon) -> None:
    """An unmounted or moved data tree is our trouble, never evidence: no 5xx for local mail."""
    d = start_daemon(tree)
    away = tree.with_name("srv-mail.away")
    tree.rename(away)
    try:
        wait_log(d, rf"problem {re.escape(str(tree))}: data root missing")
        for _ in range(3):  # over several reload intervals
            assert exchange(d.socket, rcpt("alice@example.org")).startswith(ACCEPT_RCPT)
            assert exchange(d.socket, alias("info@example.org")).startswith(b"FOUND ")
            time.sleep(0.3)
        # Edited while away: picked up once it is back.
        with (away / "passwd" / "example.org").open("a") as f:
            f.write(f"dave:{HASH}\n")
    finally:
        away.rename(tree)
    poll(lambda: exchange(d.socket, rcpt("dave@example.org")),
         lambda r: r.startswith(ACCEPT_RCPT), 1.5)  # fmt: skip
    assert "is back" in d.log_text()
    assert exchange(d.socket, rcpt("alice@example.org")).startswith(ACCEPT_RCPT)


# A regex Python's re rejects with OverflowError (not re.error): policy/matchers.py lets it escape.
HUGE_REPEAT = "^a{99999999999}\n"


def test_sighup_reload_trouble_is_logged(
    tree: Path, short_dir: Path, start_daemon: StartDaemon
) -> None:
    with (short_dir / "stderr").open("wb") as err:
        d = start_daemon(tree, config={"reload_interval": 3600.0}, stderr=err)
    relay_to = tree / "exim" / "conf" / "relay_to_domains"
    relay_to.write_text(relay_to.read_text() + HUGE_REPEAT)
    d.proc.send_signal(signal.SIGHUP)
    line = relay_to.read_text().count("\n")
    wait_log(d, rf"reload failed: OverflowError|problem exim/conf/relay_to_domains:{line}: ")
    # Still serving, on the last good version.
    assert exchange(d.socket, rcpt("x@backup.example")).startswith(ACCEPT_RCPT)
    assert "Task exception" not in (short_dir / "stderr").read_text()


def test_unparseable_regex_after_start_is_a_file_problem(
    tree: Path, start_daemon: StartDaemon
) -> None:
    d = start_daemon(tree)
    relay_to = tree / "exim" / "conf" / "relay_to_domains"
    relay_to.write_text(relay_to.read_text() + HUGE_REPEAT)
    line = relay_to.read_text().count("\n")
    with (tree / "passwd" / "example.org").open("a") as f:
        f.write(f"dave:{HASH}\n")
    poll(lambda: exchange(d.socket, rcpt("dave@example.org")),
         lambda r: r.startswith(ACCEPT_RCPT), 1.5)  # fmt: skip
    wait_log(d, rf"problem exim/conf/relay_to_domains:{line}: ", timeout=1.0)


def test_daemon_starts_with_unparseable_regex(tree: Path, start_daemon: StartDaemon) -> None:
    relay_to = tree / "exim" / "conf" / "relay_to_domains"
    relay_to.write_text(relay_to.read_text() + HUGE_REPEAT)
    d = start_daemon(tree)
    assert exchange(d.socket, rcpt("x@backup.example")).startswith(b"DEFER 451 ")
    assert exchange(d.socket, rcpt("alice@example.org")).startswith(ACCEPT_RCPT)


def test_missing_optional_list_is_empty(tree: Path, start_daemon: StartDaemon) -> None:
    d = start_daemon(tree)
    assert exchange(d.socket, rcpt("x@backup.example")).startswith(ACCEPT_RCPT)
    (tree / "exim" / "conf" / "relay_to_domains").unlink()
    seen = poll_changed(d, rcpt("x@backup.example"), ACCEPT_RCPT, 1.5)
    assert seen[-1].startswith(DENY_RELAY), seen  # an empty list, not a defer
    assert exchange(d.socket, rcpt("x@backup.example", ip=RELAY_IP)).startswith(ACCEPT_RCPT)
    assert exchange(d.socket, rcpt("alice@example.org")).startswith(ACCEPT_RCPT)
    assert " event problem " not in d.log_text()


# --- 6. unreadable files (as nobody) -----------------------------------------------------


NOBODY_LAUNCHERS: list[tuple[list[str], dict[str, object]]] = [
    ([], {"user": "nobody", "group": "nogroup", "extra_groups": []}),
    # setpriv keeps root's capabilities up to the execve: this also works where the venv's
    # python sits under a 0700 /root (pyenv), which Popen(user=) cannot exec.
    (["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"], {}),
]


def nobody_launcher() -> tuple[list[str], dict[str, object]]:
    problems = []
    for prefix, kwargs in NOBODY_LAUNCHERS:
        try:
            probe = subprocess.run(
                [*prefix, sys.executable, "-c", "import policy.daemon, uvloop"],
                cwd=REPO, capture_output=True, timeout=30, **kwargs,  # type: ignore[call-overload]
            )  # fmt: skip
        except OSError as e:
            problems.append(f"{prefix or 'Popen(user=)'}: {e}")
            continue
        if probe.returncode == 0:
            return prefix, kwargs
        problems.append(f"{prefix or 'Popen(user=)'}: {probe.stderr[-200:]!r}")
    pytest.skip(f"cannot run the venv's python as nobody: {problems}")


@pytest.fixture
def nobody_daemon(short_dir: Path) -> Iterator[Daemon]:
    """A daemon running as nobody on a tree nobody can read (short_dir is 0755)."""
    prefix, kwargs = nobody_launcher()
    root = short_dir / "tree"
    shutil.copytree(EXAMPLE, root)
    run = short_dir / "nb"  # nobody creates its socket, lock and log here
    run.mkdir()
    shutil.chown(run, "nobody", "nogroup")
    sock = run / "p.sock"
    proc = subprocess.Popen(
        [*prefix, *serve_command(sock, root, run / "p.log")], cwd=REPO, **kwargs  # type: ignore[call-overload]
    )  # fmt: skip
    d = Daemon(proc, sock, run / "p.log", root)
    try:
        wait_for_ping(sock, proc)
        yield d
    finally:
        d.stop()


def test_unreadable_passwd_defers(nobody_daemon: Daemon) -> None:
    d = nobody_daemon
    assert os.stat(d.socket).st_uid == pwd.getpwnam("nobody").pw_uid
    passwd = d.root / "passwd" / "example.org"
    assert exchange(d.socket, rcpt("alice@example.org")).startswith(ACCEPT_RCPT)
    assert exchange(d.socket, rcpt("nobody@example.org")).startswith(DENY_USER)
    passwd.chmod(0)
    try:
        for addr, before in (("nobody@example.org", DENY_USER), ("alice@example.org", ACCEPT_RCPT)):
            seen = poll_changed(d, rcpt(addr), before, 1.5)
            # Until the reload the old answer, then a defer: never a 550, never an accept.
            assert all(r.startswith((before, DEFER_LOCAL)) for r in seen), seen
            assert seen[-1].startswith(DEFER_LOCAL), seen
        # Other domains are unaffected; an alias that needs the file defers too.
        assert exchange(d.socket, rcpt("carol@example.net")).startswith(ACCEPT_RCPT)
        reply = exchange(d.socket, alias("info@example.org"))
        assert reply.startswith(b"DEFER 451 "), reply
        wait_log(d, r"passwd/example\.org: cannot read: Permission denied")
    finally:
        passwd.chmod(0o644)
    poll(lambda: exchange(d.socket, rcpt("alice@example.org")),
         lambda r: r.startswith(ACCEPT_RCPT), 1.5)  # fmt: skip
    assert exchange(d.socket, rcpt("nobody@example.org")).startswith(DENY_USER)


# --- 7. overload -------------------------------------------------------------------------


def test_overload_defers_at_once(tree: Path, start_daemon: StartDaemon) -> None:
    d = start_daemon(tree, config={"max_connections": 4, "request_deadline": 10.0})
    idle = []
    try:
        for _ in range(4):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(os.fspath(d.socket))
            idle.append(s)
        time.sleep(0.2)  # let the daemon accept them
        for request in (b"PING\n", rcpt("alice@example.org"), b""):
            reply, took = timed(d.socket, request)
            assert reply == OVERLOADED, reply
            assert took < PROMPT, took
        # The admin learns of it: an event line per sweep with the count (the three refusals
        # may straddle two sweeps).
        pattern = r" event overloaded: (\d+) connections deferred at once \(max_connections=4\)"

        def refused() -> int:
            return sum(int(n) for n in re.findall(pattern, d.log_text()))

        deadline = time.monotonic() + 3
        while refused() < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert refused() == 3, d.log_text()
    finally:
        for s in idle:
            s.close()
    poll(lambda: exchange(d.socket, b"PING\n"), lambda r: r == PONG, 2.0)
    # Back to full capacity: four at once are all served.
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda i: exchange(d.socket, alias("info@example.org")), range(4)))
    assert replies == [b"FOUND alice@example.org,bob@example.org\n"] * 4


# --- 8. start-up -------------------------------------------------------------------------


def test_stale_socket_is_removed(tree: Path, short_dir: Path, start_daemon: StartDaemon) -> None:
    path = short_dir / "p.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(os.fspath(path))  # bound, then closed: nobody listens
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    d = start_daemon(tree)
    assert exchange(d.socket, b"PING\n") == PONG
    assert f"removed stale socket {path}" in d.log_text()


def test_regular_file_at_socket_path_is_kept(tree: Path, short_dir: Path) -> None:
    path = short_dir / "p.sock"
    path.write_text("precious\n")
    before = os.lstat(path)
    result = serve_fails(path, tree)
    assert result.returncode == 2, result
    assert "not a socket" in result.stderr and str(path) in result.stderr, result.stderr
    after = os.lstat(path)
    assert path.read_text() == "precious\n"
    assert (after.st_ino, after.st_mtime_ns, after.st_mode) == (
        before.st_ino,
        before.st_mtime_ns,
        before.st_mode,
    )


def test_second_instance_refused(tree: Path, start_daemon: StartDaemon) -> None:
    d = start_daemon(tree)
    ino = os.lstat(d.socket).st_ino
    result = serve_fails(d.socket, tree)
    assert result.returncode == 2, result
    assert "another mailpolicy instance" in result.stderr, result.stderr
    assert os.lstat(d.socket).st_ino == ino
    assert exchange(d.socket, b"PING\n") == PONG
    assert d.proc.poll() is None


def test_live_foreign_socket_is_not_taken_over(tree: Path, short_dir: Path) -> None:
    """Someone else listens on the path (no lock file of ours): refuse, leave it alone."""
    path = short_dir / "p.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(os.fspath(path))
        server.listen(8)
        ino = os.lstat(path).st_ino
        result = serve_fails(path, tree)  # its PING is never answered: times out after 1 s
        assert result.returncode == 2, result
        assert "another instance answers" in result.stderr, result.stderr
        assert os.lstat(path).st_ino == ino


@pytest.mark.parametrize(
    ("extra", "mode", "group"),
    [
        ((), 0o660, None),
        (("--socket-mode", "0600"), 0o600, None),
        (("--socket-group", "daemon"), 0o660, "daemon"),
        (("--socket-mode", "0666", "--socket-group", "nogroup"), 0o666, "nogroup"),
    ],
)
def test_socket_mode_and_group(
    tree: Path, start_daemon: StartDaemon, extra: tuple[str, ...], mode: int, group: str | None
) -> None:
    d = start_daemon(tree, *extra)
    st_ = os.lstat(d.socket)
    assert stat.S_ISSOCK(st_.st_mode)
    assert stat.S_IMODE(st_.st_mode) == mode, oct(st_.st_mode)
    assert st_.st_gid == (grp.getgrnam(group).gr_gid if group else os.getgid())


def test_unknown_group_refused(tree: Path, short_dir: Path) -> None:
    path = short_dir / "p.sock"
    result = serve_fails(path, tree, "--socket-group", "no-such-group-xyz")
    assert result.returncode == 2, result
    assert "no such group" in result.stderr, result.stderr
    assert not os.path.lexists(path)


def test_unwritable_log_file_refused(tree: Path, short_dir: Path) -> None:
    sock, log = short_dir / "p.sock", short_dir / "no-such-dir" / "p.log"
    result = subprocess.run(
        serve_command(sock, tree, log), cwd=REPO, capture_output=True, text=True, timeout=20
    )
    assert result.returncode == 2, result
    assert f"cannot open log file {log}" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not os.path.lexists(sock)


# --- 9. SIGTERM --------------------------------------------------------------------------


def test_sigterm_drains_requests_in_progress(tree: Path, start_daemon: StartDaemon) -> None:
    d = start_daemon(tree, config={"drain_timeout": 3.0, "request_deadline": 5.0})
    line = rcpt("alice@example.org")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(os.fspath(d.socket))
        s.sendall(line[:20])
        time.sleep(0.2)  # accepted by the daemon
        d.proc.send_signal(signal.SIGTERM)
        wait_log(d, "stopping: draining")
        with pytest.raises(ConnectionRefusedError):  # no new connections while draining
            exchange(d.socket, b"PING\n")
        assert d.proc.poll() is None
        s.sendall(line[20:])
        s.shutdown(socket.SHUT_WR)
        reply = read_all(s)
    assert reply.startswith(ACCEPT_RCPT), reply
    assert d.proc.wait(5) == 0
    assert not os.path.lexists(d.socket)
    assert "stopped; 0 unfinished requests deferred" in d.log_text()


def test_sigterm_idle_exits_at_once(tree: Path, start_daemon: StartDaemon) -> None:
    d = start_daemon(tree)
    assert exchange(d.socket, rcpt("alice@example.org")).startswith(ACCEPT_RCPT)
    start = time.monotonic()
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(5) == 0
    assert time.monotonic() - start < 1.5
    assert not os.path.lexists(d.socket)
    text = d.log_text()
    assert 'rcpt=<alice@example.org> verdict="ACCEPT 250 2.1.5"' in text  # flushed at exit


def test_drain_timeout_still_answers_leftovers(tree: Path, start_daemon: StartDaemon) -> None:
    """A request still unfinished when drain_timeout ends gets a DEFER, not an empty reply."""
    d = start_daemon(tree, config={"drain_timeout": 0.5, "request_deadline": 10.0})
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(os.fspath(d.socket))
        s.sendall(b"RCPT ip=203.0.113.5 ")
        time.sleep(0.2)
        start = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        reply = read_all(s)
        took = time.monotonic() - start
    assert reply == b"DEFER 451 4.3.2 policy daemon shutting down\n"
    assert 0.4 <= took < 3.0, took
    wait_log(d, "stopped; 1 unfinished requests deferred")
    assert d.proc.wait(5) == 0
    assert not os.path.lexists(d.socket)


# --- the answer function without a socket ----------------------------------------------------


def test_alias_too_long_for_one_reply_defers_not_cut(make_tree: Callable[..., Path]) -> None:
    from policy.daemon import Policy
    from policy.mailtree import TreeLoader
    from policy.protocol import encode_request
    from policy.settings import Settings

    targets = ", ".join(f"recipient-number-{i:05d}@far-away-domain.example" for i in range(2000))
    root = make_tree({"aliases/example.org": f"everyone: {targets}\n"})
    settings = Settings(root=str(root), alias_max_targets=5000)
    policy = Policy(settings, TreeLoader(str(root), "mail.example.org"))
    reply, record = policy.answer(encode_request("ALIAS", addr="everyone@example.org"), 0)
    assert reply == b"DEFER 451 4.3.0 alias expansion too long\n"
    assert record is not None and "longer than 65536 bytes" in record[6]
