"""hooks/checkpassword run as Dovecot runs it, against a scripted fake daemon.

The hook is spawned directly (its ``#!/usr/bin/python3 -IS`` line), with the request on fd 3
(a pipe), a small environment like the one Dovecot builds, and argv[1] a helper that records
its argv and environment the way checkpassword-reply would read them. The fake daemon is a
thread-served Unix socket that answers whatever the test scripts, so every kind of trouble
can be injected: the hook must exit 1 only for FAIL, 3 only for NOTFOUND, and 111 for
anything else (DESIGN.md guarantee 8).

fd 3 is set with ``os.posix_spawn`` file actions (dup2 of the pipe onto 3): subprocess's
``pass_fds`` keeps an fd's number, and ``preexec_fn`` is unsafe with the fake daemon's threads.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent
HOOK = REPO / "hooks" / "checkpassword"
HANG = b"<hang>"  # a FakeDaemon reply that never comes
PASSWORD = "s3cret pw"  # must never show up on stderr

REPLY_HELPER = """#!/usr/bin/python3 -IS
import json, os, sys
env = {k.decode("latin-1"): v.decode("latin-1") for k, v in os.environb.items()}
with open(os.environ["DUMP"], "w") as f:
    json.dump({"argv": sys.argv, "env": env}, f)
sys.exit(2 if os.environ.get("AUTHORIZED") == "2" else 0)
"""


def b64(value: str | bytes) -> str:
    raw = value.encode() if isinstance(value, str) else value
    return base64.b64encode(raw).decode()


def ok(user: str | bytes = "bob@example.org", home: str | bytes = "/srv/mail/b") -> bytes:
    return f"OK user={b64(user)} home={b64(home)}\n".encode()


class FakeDaemon:
    """Answers ``reply(request)`` raw on a Unix socket, one thread per connection, after
    reading the request to EOF; ``HANG`` answers nothing until stopped; ``hold`` keeps the
    connection open after the answer."""

    def __init__(self, path: Path, reply: Callable[[bytes], bytes], hold: bool = False) -> None:
        self.path = path
        self.reply = reply
        self.hold = hold  # keep the connection open after answering
        self.requests: list[bytes] = []
        self.stopping = threading.Event()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(64)
        self.sock.settimeout(0.1)
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            chunks = []
            try:
                while chunk := conn.recv(65536):
                    chunks.append(chunk)
            except OSError:
                return
            request = b"".join(chunks)
            self.requests.append(request)
            answer = self.reply(request)
            if answer == HANG:
                self.stopping.wait(30)
                return
            with contextlib.suppress(OSError):
                conn.sendall(answer)
            if self.hold:
                self.stopping.wait(30)

    def request(self) -> tuple[str, dict[str, bytes | str]]:
        """The one request seen: verb and fields, base64 decoded (ip stays plain)."""
        assert len(self.requests) == 1, self.requests
        line = self.requests[0]
        assert line.endswith(b"\n") and line.count(b"\n") == 1
        verb, *words = line[:-1].decode("ascii").split(" ")
        fields: dict[str, bytes | str] = {}
        for word in words:
            key, value = word.split("=", 1)
            fields[key] = value if key == "ip" else base64.b64decode(value, validate=True)
        return verb, fields

    def stop(self) -> None:
        self.stopping.set()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes accept() at once on Linux
        self.sock.close()
        self.thread.join(5)
        self.path.unlink(missing_ok=True)


@dataclass
class Result:
    code: int
    stderr: str
    dump: dict[str, object] | None  # what the reply program saw, if it ran
    seconds: float


@dataclass
class Harness:
    dir: Path
    sock: Path
    helper: Path
    dump: Path
    fakes: list[FakeDaemon]

    def daemon(self, reply: Callable[[bytes], bytes] | bytes, hold: bool = False) -> FakeDaemon:
        answer = reply
        fake = FakeDaemon(self.sock, answer if callable(answer) else (lambda request: answer), hold)
        self.fakes.append(fake)
        return fake

    def run(
        self,
        fd3: bytes | None = b"bob@example.org\0" + PASSWORD.encode() + b"\0\0",
        env: dict[str, str] | None = None,
        argv: list[str] | None = None,
        base_env: bool = True,
    ) -> Result:
        full_env = {"DUMP": str(self.dump)}
        if base_env:
            full_env |= {
                "MAILPOLICY_AUTH_SOCKET": str(self.sock),
                "MAILPOLICY_AUTH_TIMEOUT": "5",
                "SERVICE": "imap",
                "PROTO": "TCP",
                "TCPREMOTEIP": "203.0.113.7",
                "REMOTE_IP": "203.0.113.7",
                "TCPLOCALIP": "127.0.0.1",
            }
        full_env |= env or {}
        self.dump.unlink(missing_ok=True)
        code, stderr, seconds = spawn(
            [str(HOOK), str(self.helper)] if argv is None else argv, full_env, fd3
        )
        dump = json.loads(self.dump.read_text()) if self.dump.exists() else None
        return Result(code, stderr, dump, seconds)


def spawn(argv: list[str], env: dict[str, str], fd3: bytes | None) -> tuple[int, str, float]:
    """Start the hook as Dovecot does (request on fd 3, stdout unused), wait, return the exit
    status, stderr and wall time."""
    err_r, err_w = os.pipe()
    actions: list[tuple[object, ...]] = [
        (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, "/dev/null", os.O_WRONLY, 0),
        (os.POSIX_SPAWN_DUP2, err_w, 2),
    ]
    in_r = in_w = -1
    if fd3 is not None:
        in_r, in_w = os.pipe()
        os.write(in_w, fd3)  # small enough for the pipe buffer
        os.close(in_w)
        actions.append((os.POSIX_SPAWN_DUP2, in_r, 3))
    started = time.perf_counter()
    try:
        pid = os.posix_spawn(argv[0], argv, env, file_actions=actions)
    finally:
        os.close(err_w)
        if in_r != -1:
            os.close(in_r)
    with os.fdopen(err_r, "rb") as err:
        stderr = err.read()
    _, status = os.waitpid(pid, 0)
    seconds = time.perf_counter() - started
    return os.waitstatus_to_exitcode(status), stderr.decode("utf-8", "replace"), seconds


@pytest.fixture
def hk(short_dir: Path) -> Iterator[Harness]:
    helper = short_dir / "reply"
    helper.write_text(REPLY_HELPER)
    helper.chmod(0o755)
    h = Harness(short_dir, short_dir / "auth.sock", helper, short_dir / "dump.json", [])
    yield h
    for fake in h.fakes:
        fake.stop()


def assert_trouble(result: Result, *words: str) -> None:
    assert result.code == 111, result
    assert result.dump is None  # the reply program never ran
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mailpolicy checkpassword: "), result.stderr
    assert PASSWORD not in result.stderr
    for word in words:
        assert word in result.stderr


# --- success --------------------------------------------------------------------------------


def test_ok_sets_user_and_home_and_execs_the_reply_program(hk: Harness) -> None:
    fake = hk.daemon(ok("bob@example.org", "/srv/mail/domains/example.org/bob"))
    r = hk.run(fd3=b"Bob@Example.ORG\0" + PASSWORD.encode() + b"\0\0")
    assert r.code == 0, r
    assert r.stderr == ""
    assert r.dump is not None
    env = r.dump["env"]
    assert isinstance(env, dict)
    assert env["USER"] == "bob@example.org"
    assert env["HOME"] == "/srv/mail/domains/example.org/bob"
    assert "AUTHORIZED" not in env
    assert env["SERVICE"] == "imap"  # the rest of Dovecot's environment passes through
    assert r.dump["argv"] == [str(hk.helper)]
    verb, fields = fake.request()
    assert verb == "AUTH"
    assert fields == {
        "user": b"Bob@Example.ORG",
        "pass": PASSWORD.encode(),
        "service": b"imap",
        "ip": "203.0.113.7",
    }


def test_ok_fields_in_any_order_unknown_ones_ignored_extra_argv_passed(hk: Harness) -> None:
    hk.daemon(f"OK quota={b64('1G')} home={b64('/h/ü')} x=y user={b64('bø@ex')}\n".encode())
    r = hk.run(argv=[str(HOOK), str(hk.helper), "extra", "args"])
    assert r.code == 0, r
    assert r.dump is not None
    env = r.dump["env"]
    assert isinstance(env, dict)
    assert env["USER"].encode("latin-1") == "bø@ex".encode()
    assert env["HOME"].encode("latin-1") == "/h/ü".encode()
    assert "QUOTA" not in env
    assert r.dump["argv"] == [str(hk.helper), "extra", "args"]


def test_socket_argument_wins_over_environment(hk: Harness) -> None:
    fake = hk.daemon(ok())
    r = hk.run(
        argv=[str(HOOK), f"--socket={hk.sock}", str(hk.helper)],
        env={"MAILPOLICY_AUTH_SOCKET": str(hk.dir / "nothing-here.sock")},
    )
    assert r.code == 0, r
    assert r.dump is not None and r.dump["argv"] == [str(hk.helper)]
    assert len(fake.requests) == 1


def test_authorized_lookup_sends_user_and_sets_authorized_2(hk: Harness) -> None:
    fake = hk.daemon(ok("alice@example.org", "/srv/mail/a"))
    r = hk.run(fd3=b"alice@example.org\0\0\0", env={"AUTHORIZED": "1", "SERVICE": "lmtp"})
    assert r.code == 2, r  # checkpassword-reply's (and the helper's) success for a lookup
    assert r.dump is not None
    env = r.dump["env"]
    assert isinstance(env, dict)
    assert env["AUTHORIZED"] == "2"
    assert env["USER"] == "alice@example.org"
    assert env["HOME"] == "/srv/mail/a"
    verb, fields = fake.request()
    assert verb == "USER"
    assert fields == {"user": b"alice@example.org", "service": b"lmtp"}


def test_lookup_notfound_exits_3(hk: Harness) -> None:
    hk.daemon(b"NOTFOUND\n")
    r = hk.run(fd3=b"carol@example.org\0\0\0", env={"AUTHORIZED": "1"})
    assert r.code == 3, r
    assert r.dump is None
    assert r.stderr == ""


@pytest.mark.parametrize(
    "fd3",
    [
        b"bob@example.org\0pw\0\0",  # what Dovecot 2.3 sends
        b"bob@example.org\0pw\0",  # no timestamp field at all
        b"bob@example.org\0pw\x00123456\0",  # a timestamp
        b"bob@example.org\0pw\x00123456",  # a timestamp without its NUL
    ],
)
def test_fd3_variants_accepted(hk: Harness, fd3: bytes) -> None:
    fake = hk.daemon(ok())
    r = hk.run(fd3=fd3)
    assert r.code == 0, r
    assert fake.request()[1]["pass"] == b"pw"


# --- FAIL and what reaches the daemon ----------------------------------------------------------


@pytest.mark.parametrize(
    "password",
    [
        'pa ss"w=rd',
        "a'b\"c d=e== f",
        "=",
        " ",
        "ünïcødé 密码 🔑",
        "\\n\\r\t\x01\x7f",
        b"\xff\xfe raw \x80 bytes",
        "",
        "x" * 400,
    ],
)
def test_fail_exits_1_and_the_daemon_sees_the_exact_values(
    hk: Harness, password: str | bytes
) -> None:
    raw = password.encode() if isinstance(password, str) else password
    fake = hk.daemon(b"FAIL wrong password\n")
    r = hk.run(
        fd3=b"bob+x y@example.org\0" + raw + b"\0\0",
        env={"SERVICE": "smtp", "TCPREMOTEIP": "2001:db8::7"},
    )
    assert r.code == 1, r
    assert r.dump is None
    assert r.stderr == ""
    verb, fields = fake.request()
    assert verb == "AUTH"
    assert fields == {
        "user": b"bob+x y@example.org",
        "pass": raw,
        "service": b"smtp",
        "ip": "2001:db8::7",
    }


@pytest.mark.parametrize(
    ("env", "ip"),
    [
        ({"TCPREMOTEIP": "", "REMOTE_IP": "198.51.100.1"}, "198.51.100.1"),
        ({"TCPREMOTEIP": "", "REMOTE_IP": ""}, ""),  # doveadm auth test: no address
    ],
)
def test_ip_fallback_and_absence(hk: Harness, env: dict[str, str], ip: str) -> None:
    fake = hk.daemon(b"FAIL no\n")
    assert hk.run(env=env).code == 1
    assert fake.request()[1]["ip"] == ip


def test_no_service_sends_empty(hk: Harness) -> None:
    fake = hk.daemon(b"FAIL\n")
    r = hk.run(base_env=False, env={"MAILPOLICY_AUTH_SOCKET": str(hk.sock)})
    assert r.code == 1, r
    assert fake.request()[1] == {"user": b"bob@example.org", "pass": PASSWORD.encode(),
                                 "service": b"", "ip": ""}  # fmt: skip


# --- trouble: always 111 -----------------------------------------------------------------------


def test_socket_missing(hk: Harness) -> None:
    assert_trouble(hk.run(), "No such file")


def test_connection_refused_on_a_stale_socket(hk: Harness) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(hk.sock))  # bound, never listening: what a crashed daemon leaves behind
    try:
        assert_trouble(hk.run(), "refused")
    finally:
        s.close()


def test_daemon_hangs(hk: Harness) -> None:
    hk.daemon(HANG)
    r = hk.run(env={"MAILPOLICY_AUTH_TIMEOUT": "0.5"})
    assert_trouble(r, "in time")
    assert r.seconds < 3


def test_daemon_answers_but_never_closes(hk: Harness) -> None:
    hk.daemon(ok(), hold=True)
    r = hk.run(env={"MAILPOLICY_AUTH_TIMEOUT": "0.5"})
    assert_trouble(r, "in time")
    assert r.seconds < 3


USER_OK = ok()
TROUBLE_REPLIES = {
    "empty": b"",
    "garbage": b"garbage\n",
    "lower-case ok": USER_OK.lower(),
    "defer": b"DEFER 451 4.3.0 policy daemon overloaded\n",
    "no LF": USER_OK[:-1],
    "two lines": USER_OK + b"FAIL x\n",
    "CR": USER_OK[:-1] + b"\r\n",
    "over-long": USER_OK[:-1] + b" pad=" + b"A" * 4100 + b"\n",
    "OK alone": b"OK\n",
    "OK without home": f"OK user={b64('bob')}\n".encode(),
    "OK without user": f"OK home={b64('/h')}\n".encode(),
    "OK empty user": ok(""),
    "OK empty home": ok(home=""),
    "OK relative home": ok(home="srv/mail/bob"),
    "OK dotdot home": ok(home="/srv/mail/../../etc"),
    "OK trailing dotdot": ok(home="/srv/mail/.."),
    "OK tab in user": ok(user="bob\t@example.org"),
    "OK newline in home": ok(home="/srv/mail\n/bob"),
    "OK NUL in home": ok(home=b"/srv/mail\0/bob"),
    "OK DEL in user": ok(user="bob\x7f"),
    "OK ESC in user": ok(user="bob\x1b[31m"),
    "OK bad base64": b"OK user=Ym9i! home=L2g=\n",
    "OK unpadded base64": b"OK user=Ym9iQQ home=L2g=\n",
    "OK field without =": USER_OK[:-1] + b" junk\n",
    "OK double space": USER_OK.replace(b" ", b"  ", 1),
    "OK user twice": USER_OK[:-1] + f" user={b64('eve')}\n".encode(),
    "NOTFOUND to AUTH": b"NOTFOUND\n",
    "FAILED": b"FAILED\n",
    "leading space": b" " + USER_OK,
}


@pytest.mark.parametrize("reply", TROUBLE_REPLIES.values(), ids=TROUBLE_REPLIES.keys())
def test_bad_replies_are_trouble(hk: Harness, reply: bytes) -> None:
    hk.daemon(reply)
    assert_trouble(hk.run())


def test_defer_text_is_logged(hk: Harness) -> None:
    hk.daemon(b"DEFER 451 4.3.0 policy daemon overloaded\n")
    assert_trouble(hk.run(), "4.3.0 policy daemon overloaded", "bob@example.org")


@pytest.mark.parametrize("reply", [b"FAIL wrong\n", b"NOTFOUND extra\n", b"DEFER 451 4.3.0 x\n"])
def test_lookup_trouble(hk: Harness, reply: bytes) -> None:
    """FAIL is not an answer to USER (exit 1 would be an internal failure to Dovecot anyway)."""
    hk.daemon(reply)
    assert_trouble(hk.run(fd3=b"alice@example.org\0\0\0", env={"AUTHORIZED": "1"}))


FD3_TROUBLE = {
    "over 512 bytes": b"u" * 300 + b"\0" + b"p" * 300 + b"\0\0",
    "no NUL": b"bob@example.org",
    "one NUL": b"bob@example.org\0password",
    "empty user": b"\0password\0\0",
    "empty": b"",
    "extra field": b"bob@example.org\0pw\0ts\0more\0",
}


@pytest.mark.parametrize("fd3", FD3_TROUBLE.values(), ids=FD3_TROUBLE.keys())
def test_malformed_fd3(hk: Harness, fd3: bytes) -> None:
    fake = hk.daemon(ok())
    assert_trouble(hk.run(fd3=fd3), "fd 3")
    assert fake.requests == []


def test_fd3_not_open(hk: Harness) -> None:
    fake = hk.daemon(ok())
    assert_trouble(hk.run(fd3=None), "fd 3")
    assert fake.requests == []


def test_exactly_512_bytes_is_fine(hk: Harness) -> None:
    hk.daemon(b"FAIL\n")
    fd3 = b"u" * 200 + b"\0" + b"p" * 309 + b"\0\0"
    assert len(fd3) == 512
    assert hk.run(fd3=fd3).code == 1


@pytest.mark.parametrize("case", ["missing", "empty", "socket only", "not executable",
                                  "nonexistent", "directory"])  # fmt: skip
def test_unusable_reply_program(hk: Harness, case: str) -> None:
    fake = hk.daemon(ok())
    plain = hk.dir / "plain"
    plain.write_text("#!/bin/sh\nexit 0\n")
    plain.chmod(0o644)
    argv = {
        "missing": [str(HOOK)],
        "empty": [str(HOOK), ""],
        "socket only": [str(HOOK), f"--socket={hk.sock}"],
        "not executable": [str(HOOK), str(plain)],
        "nonexistent": [str(HOOK), str(hk.dir / "nope")],
        "directory": [str(HOOK), str(hk.dir)],
    }[case]
    assert_trouble(hk.run(argv=argv))
    if case != "directory":  # a directory passes the access check and fails at exec
        assert fake.requests == []


@pytest.mark.parametrize(
    "env",
    [
        {"AUTHORIZED": "2"},
        {"TCPREMOTEIP": "1.2.3.4 pass=eve"},
        {"TCPREMOTEIP": "1.2.3.4\n"},
        {"MAILPOLICY_AUTH_TIMEOUT": "soon"},
        {"MAILPOLICY_AUTH_TIMEOUT": "0"},
    ],
)
def test_unexpected_environment(hk: Harness, env: dict[str, str]) -> None:
    fake = hk.daemon(ok())
    assert_trouble(hk.run(env=env))
    assert fake.requests == []


# --- the hook itself -------------------------------------------------------------------------


def test_hook_is_an_isolated_system_python_script_with_builtin_imports_only() -> None:
    assert os.access(HOOK, os.X_OK)
    assert HOOK.read_text().splitlines()[0] == "#!/usr/bin/python3 -IS"
    # -X importtime lists every module imported; fd 3 is closed, so the hook stops early,
    # after all its imports
    code, stderr, _ = spawn(
        ["/usr/bin/python3", "-IS", "-X", "importtime", str(HOOK), "/bin/true"], {}, None
    )
    assert code == 111
    imported = {
        line.rsplit("|", 1)[1].strip()
        for line in stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    assert {"_socket", "binascii"} <= imported
    assert not imported & {"socket", "base64", "enum", "selectors", "re", "contextlib"}


# Start-up time is measured by benchmarks/auth_bench.py (never by a timed assertion here).
