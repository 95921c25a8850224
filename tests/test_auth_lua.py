"""dovecot/mailpolicy-auth.lua with a real Dovecot 2.3 and the real daemon (docs/auth.md).

One Dovecot per module (its own minimal configuration in a temporary directory, RECIPES
section 5, IMAPS on a free loopback port), the passdb and userdb of dovecot/auth-lua.conf.ext,
and ``python -m policy serve --auth-socket ... --auth-socket-group dovecot`` on a copy of
examples/srv-mail.

* Every example user logs in over IMAPS (ARGON2ID, SHA512-CRYPT, BLF-CRYPT); the mailbox is
  usable (the mail processes run as mail_uid: Lua returns no uid/gid, so no override).
* A wrong password and an unknown user are AUTHENTICATIONFAILED.
* The daemon stopped: a temporary failure ([UNAVAILABLE]), never AUTHENTICATIONFAILED; the
  same for ``doveadm auth test`` (exit 75, not 77).
* ``doveadm user`` through the Lua userdb: the home; an unknown user "doesn't exist".
* No fork per login: strace on the auth and auth-worker processes during 20 logins shows no
  clone/fork/execve.

``AuthDovecot`` is also what benchmarks/auth_bench.py runs (Lua, checkpassword, passwd-file).
"""

from __future__ import annotations

import base64
import contextlib
import imaplib
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from policy.render import AUTH_FRAGMENTS, render
from tests.conftest import ask, copy_example

REPO = Path(__file__).resolve().parent.parent
LUA_SCRIPT = REPO / "dovecot" / "mailpolicy-auth.lua"
FRAGMENT = AUTH_FRAGMENTS["lua"]
HOOK = REPO / "hooks" / "checkpassword"
PRIMARY = "mail.example.org"
USERS = [
    ("alice@example.org", "alice-secret"),  # ARGON2ID
    ("bob@example.org", "bob-secret"),  # SHA512-CRYPT
    ("carol@example.net", "carol-secret"),  # BLF-CRYPT
]

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def lua_auth_blocks(script: Path = LUA_SCRIPT) -> str:
    """dovecot/auth-lua.conf.ext as render_dovecot inlines it, pointed at the repo's script."""
    return render(AUTH_FRAGMENTS["lua"].read_text(), {"LUA_SCRIPT": str(script)})


def checkpassword_blocks(sock: Path) -> str:
    """dovecot/auth-checkpassword.conf.ext as render_dovecot inlines it (the hook, prefetch for
    IMAP), for mail user ``mail``."""
    return render(AUTH_FRAGMENTS["checkpassword"].read_text(),
                  {"CHECKPASSWORD": f"{HOOK} --socket={sock}", "MAIL_USER": "mail",
                   "MAIL_GROUP": "mail"})  # fmt: skip


def passwd_file_blocks(path: Path) -> str:
    """Dovecot's own passwd-file on the same hashes: the baseline."""
    return (
        f"passdb {{\n  driver = passwd-file\n  args = username_format=%u {path}\n}}\n"
        f"userdb {{\n  driver = passwd-file\n  args = username_format=%u {path}\n}}\n"
    )


def passwd_file_from_tree(root: Path, dest: Path) -> Path:
    """user@domain:{SCHEME}hash::::home:: lines from <root>/passwd/<domain>."""
    lines = []
    for domain_file in sorted((root / "passwd").iterdir()):
        for line in domain_file.read_text().splitlines():
            if not line.strip() or line.startswith("#"):
                continue
            user, _, hashed = line.partition(":")
            home = root / "domains" / domain_file.name / user
            lines.append(f"{user}@{domain_file.name}:{hashed}::::{home}::\n")
    dest.write_text("".join(lines))
    os.chmod(dest, 0o644)
    return dest


@dataclass
class AuthDovecot:
    base: Path
    conf: Path
    imaps_port: int
    proc: subprocess.Popen[bytes] | None = None
    logs: list[Path] = field(default_factory=list)

    def start(self) -> None:
        self.proc = subprocess.Popen(["dovecot", "-F", "-c", str(self.conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"dovecot exited {self.proc.returncode}: {err}\n{self.log()}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.imaps_port), timeout=0.5),
            ):
                if (self.base / "run" / "auth-client").exists():
                    return
            time.sleep(0.05)
        raise RuntimeError("dovecot did not start in time\n" + self.log())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log(self) -> str:
        path = self.base / "log" / "dovecot.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def doveadm(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["doveadm", "-c", str(self.conf), *args], capture_output=True,
                              text=True, timeout=timeout)  # fmt: skip

    def imaps(self) -> imaplib.IMAP4_SSL:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return imaplib.IMAP4_SSL("127.0.0.1", self.imaps_port, ssl_context=ctx, timeout=30)

    def login(self, user: str, password: str) -> tuple[bool, str]:
        """(logged in, server text); the connection is closed again."""
        with self.imaps() as imap:
            try:
                typ, data = imap.login(user, password)
            except imaplib.IMAP4.error as e:
                return False, str(e)
            text = b" ".join(d for d in data if isinstance(d, bytes)).decode()
            return typ == "OK", text

    def service_pids(self, title: str) -> list[int]:
        """PIDs of this instance's processes whose title starts with ``title`` (auth, ...)."""
        assert self.proc is not None
        found = []
        instance = self.base.name
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                stat_fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            # Process titles: "dovecot-<instance>/auth", "dovecot-<instance>/auth -w" (worker)
            parent = int(stat_fields[1])
            if cmd.startswith(f"dovecot-{instance}/{title}") and parent == self.proc.pid:
                found.append(int(entry.name))
        return sorted(found)


def write_conf(base: Path, auth_blocks: str, *, env: dict[str, str] | None = None,
               extra: str = "") -> AuthDovecot:  # fmt: skip
    """A minimal Dovecot (IMAPS only) in ``base`` with the given passdb/userdb blocks."""
    for sub in ("run", "state", "log", "ssl"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    os.chmod(base, 0o755)
    cert, key = base / "ssl" / "cert.pem", base / "ssl" / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1"],
                   check=True, capture_output=True, timeout=60)  # fmt: skip
    imaps_port = free_port()
    imported = " ".join(f"{k}={v}" for k, v in (env or {}).items())
    conf = base / "dovecot.conf"
    conf.write_text(
        f"""base_dir = {base}/run
state_dir = {base}/state
instance_name = {base.name}
log_path = {base}/log/dovecot.log
info_log_path = {base}/log/dovecot.log
protocols = imap
listen = 127.0.0.1
ssl = required
ssl_cert = <{cert}
ssl_key = <{key}
disable_plaintext_auth = yes
auth_mechanisms = plain login
auth_failure_delay = 0
first_valid_uid = 8
mail_location = maildir:~/Maildir
mail_uid = mail
mail_gid = mail
import_environment = $import_environment {imported}
service imap-login {{
  inet_listener imap {{
    port = 0
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {imaps_port}
    ssl = yes
  }}
}}
# Dovecot's per-IP auth penalty off, as in dovecot/dovecot.conf: the daemon throttles. Left on,
# every failed login here would add up to 15 s to the next one (all from 127.0.0.1).
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
service auth {{
  unix_listener auth-client {{
    mode = 0666
  }}
  unix_listener auth-userdb {{
    mode = 0666
  }}
}}
{extra}
{auth_blocks}
"""
    )
    return AuthDovecot(base, conf, imaps_port)


@contextlib.contextmanager
def auth_dovecot(auth_blocks: str, **kw: object) -> Iterator[AuthDovecot]:
    base = Path(tempfile.mkdtemp(prefix="dl.", dir="/tmp"))
    try:
        d = write_conf(base, auth_blocks, **kw)  # type: ignore[arg-type]
        d.start()
        try:
            yield d
        finally:
            d.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)


# --- the daemon -------------------------------------------------------------------------------


@dataclass
class PolicyDaemon:
    proc: subprocess.Popen[bytes]
    auth_socket: Path
    log: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_policy(root: Path, run: Path, name: str = "p", config: str = "") -> PolicyDaemon:
    """``python -m policy serve`` with an auth socket of group dovecot, as the tests do."""
    sock, auth_sock, log = run / f"{name}.sock", run / f"{name}.auth", run / f"{name}.log"
    args = [sys.executable, "-m", "policy", "serve", "--root", str(root), "--socket", str(sock),
            "--log-file", str(log), "--primary-hostname", PRIMARY,
            "--auth-socket", str(auth_sock), "--auth-socket-group", "dovecot"]  # fmt: skip
    if config:
        cfg = run / f"{name}.toml"
        cfg.write_text(config)
        args += ["--config", str(cfg)]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
            s.settimeout(1)
            s.connect(str(auth_sock))
            s.sendall(b"PING\n")
            s.shutdown(socket.SHUT_WR)
            if s.recv(100).startswith(b"PONG"):
                return PolicyDaemon(proc, auth_sock, log)
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("daemon did not answer PING on its auth socket")


def mail_tree(run: Path) -> Path:
    """A copy of examples/srv-mail whose domains/ the mail user (uid 8) can write."""
    root = copy_example(run / "srv-mail")
    for path in [run, root]:
        os.chmod(path, 0o755)
    for dirpath, _dirs, _files in os.walk(root / "domains"):
        shutil.chown(dirpath, "mail", "mail")
    return root


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


TAB_USER, NL_HOME = "t\tb@example.org", "/srv/n\nx"

# Scripted replies for these users (by base64 of the name in the request); every other request
# goes through to the real daemon. "slow" answers after the script's timeout (2 s here).
SCRIPTED: dict[str, bytes] = {
    "defer@example.org": b"DEFER 451 4.3.0 passwd file unreadable\n",
    "garbage@example.org": b"HELLO there\n",
    "empty@example.org": b"",
    "twolines@example.org": b"FAIL x\nFAIL y\n",
    "cr@example.org": b"FAIL x\r\n",
    "noeol@example.org": b"FAIL x",
    "long@example.org": b"FAIL " + b"x" * 5000 + b"\n",
    "notfound@example.org": b"NOTFOUND\n",  # not an answer to AUTH
    "nohome@example.org": f"OK user={b64('nohome@example.org')}\n".encode(),
    "relhome@example.org": f"OK user={b64('relhome@example.org')} home={b64('srv/x')}\n".encode(),
    "dotdot@example.org": (
        f"OK user={b64('dotdot@example.org')} home={b64('/srv/../etc')}\n".encode()
    ),
    "tab@example.org": f"OK user={b64(TAB_USER)} home={b64('/srv/t')}\n".encode(),
    "nl@example.org": f"OK user={b64('nl@example.org')} home={b64(NL_HOME)}\n".encode(),
    "badb64@example.org": f"OK user={b64('badb64@example.org')} home=/srv/x\n".encode(),
    "emptyuser@example.org": f"OK user= home={b64('/srv/x')}\n".encode(),
    "twice@example.org": f"OK user={b64('a@b')} user={b64('a@b')} home={b64('/x')}\n".encode(),
    "slow@example.org": b"FAIL too late\n",
    "fail@example.org": b"FAIL wrong\n",  # to a USER lookup: not an answer
    "extra@example.org": f"OK user={b64('extra@example.org')} home={b64('/srv/extra')} "
    f"quota={b64('1G')}\n".encode(),  # unknown fields are ignored
}


class Proxy:
    """The daemon's auth socket with scripted answers for the users of SCRIPTED."""

    def __init__(self, path: Path, upstream: Path) -> None:
        self.path, self.upstream = path, upstream
        self.seen: list[bytes] = []
        self.server = socket.socket(socket.AF_UNIX)
        self.server.bind(str(path))
        shutil.chown(path, "root", "dovecot")
        os.chmod(path, 0o660)
        self.server.listen(64)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.server.shutdown(socket.SHUT_RDWR)
        self.server.close()
        with contextlib.suppress(OSError):
            self.path.unlink()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            data = b""
            with contextlib.suppress(OSError):
                while chunk := conn.recv(65536):
                    data += chunk
            self.seen.append(data)
            fields = dict(w.split("=", 1) for w in data.decode().split()[1:] if "=" in w)
            user = base64.b64decode(fields.get("user", "")).decode(errors="replace")
            if user in SCRIPTED:
                if user == "slow@example.org":
                    time.sleep(3)
                with contextlib.suppress(OSError):
                    conn.sendall(SCRIPTED[user])
                return
            try:
                reply = ask(self.upstream, data)
            except OSError:
                return
            with contextlib.suppress(OSError):
                conn.sendall(reply)


# --- fixtures ---------------------------------------------------------------------------------


@dataclass
class Stack:
    dovecot: AuthDovecot
    daemon: PolicyDaemon
    proxy: Proxy
    root: Path


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    run = Path(tempfile.mkdtemp(prefix="mpl.", dir="/tmp"))
    os.chmod(run, 0o755)
    daemon = proxy = None
    try:
        root = mail_tree(run)
        daemon = start_policy(root, run)
        proxy = Proxy(run / "proxy.sock", daemon.auth_socket)
        env = {"MAILPOLICY_AUTH_SOCKET": str(proxy.path), "MAILPOLICY_AUTH_TIMEOUT": "2"}
        with auth_dovecot(lua_auth_blocks(), env=env) as dovecot:
            yield Stack(dovecot, daemon, proxy, root)
    finally:
        if proxy is not None:
            proxy.close()
        if daemon is not None:
            daemon.stop()
        shutil.rmtree(run, ignore_errors=True)


# --- tests ------------------------------------------------------------------------------------


def test_fragment_runs_the_script_in_auth_workers() -> None:
    text = lua_auth_blocks()
    assert "driver = lua" in text and "blocking=yes" in text
    assert f"file={LUA_SCRIPT} " in text and "@@" not in text


@pytest.mark.parametrize(("user", "password"), USERS)
def test_every_example_user_logs_in_over_imaps(stack: Stack, user: str, password: str) -> None:
    dovecot, root = stack.dovecot, stack.root
    with dovecot.imaps() as imap:
        typ, _ = imap.login(user, password)
        assert typ == "OK"
        selected, data = imap.select("INBOX")
        assert selected == "OK", data
        imap.logout()
    local, domain = user.split("@")
    maildir = root / "domains" / domain / local / "Maildir"
    assert maildir.is_dir(), dovecot.log()[-2000:]
    assert maildir.stat().st_uid == 8  # mail_uid: the Lua userdb returns no uid/gid
    log = dovecot.log()
    assert password not in log


def test_canonical_name_comes_from_the_daemon(
    stack: Stack,
) -> None:
    dovecot = stack.dovecot
    res = dovecot.doveadm("auth", "test", "-x", "service=imap", "ALICE@Example.ORG",
                          "alice-secret")  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    assert "user=alice@example.org" in res.stdout


def test_wrong_password_and_unknown_user_fail(
    stack: Stack,
) -> None:
    dovecot = stack.dovecot
    for user, password in [("bob@example.org", "not-bob"), ("nobody@example.org", "x")]:
        ok, text = dovecot.login(user, password)
        assert not ok and "AUTHENTICATIONFAILED" in text, (user, text)
    res = dovecot.doveadm("auth", "test", "bob@example.org", "not-bob")
    assert res.returncode == 77, res.stdout + res.stderr
    assert "not-bob" not in dovecot.log()


def test_doveadm_user_goes_through_the_lua_userdb(
    stack: Stack,
) -> None:
    dovecot, root = stack.dovecot, stack.root
    res = dovecot.doveadm("user", "alice@example.org")
    assert res.returncode == 0, res.stdout + res.stderr
    assert re.search(rf"^home\s+{re.escape(str(root))}/domains/example.org/alice$", res.stdout,
                     re.M), res.stdout  # fmt: skip
    # Lua returns no uid/gid: mail_uid/mail_gid apply (checkpassword needed an override).
    assert re.search(r"^uid\s+mail$", res.stdout, re.M), res.stdout
    assert re.search(r"^gid\s+mail$", res.stdout, re.M), res.stdout
    res = dovecot.doveadm("user", "nobody@example.org")
    assert res.returncode == 67 and "doesn't exist" in res.stdout + res.stderr, res
    # No passdb lookup without a password (auth_passdb_lookup): the daemon never gives out
    # hashes, so `doveadm auth lookup` (a credentials lookup) is an internal failure.
    res = dovecot.doveadm("auth", "lookup", "carol@example.net")
    assert res.returncode == 75, res


def test_no_fork_per_login(stack: Stack) -> None:
    dovecot = stack.dovecot
    assert dovecot.login(*USERS[1])[0]  # the auth-worker exists now
    pids = dovecot.service_pids("auth")
    assert pids, "no auth processes found"
    out = dovecot.base / "strace.out"
    args = ["strace", "-f", "-qq", "-o", str(out), "-e", "trace=clone,clone3,fork,vfork,execve"]
    for pid in pids:
        args += ["-p", str(pid)]
    tracer = subprocess.Popen(args, stderr=subprocess.PIPE)
    try:
        time.sleep(0.5)  # attached
        for _ in range(20):
            assert dovecot.login(*USERS[1])[0]
    finally:
        tracer.send_signal(signal.SIGINT)
        tracer.wait(10)
    traced = out.read_text() if out.exists() else ""
    calls = re.findall(r"\b(clone3?|v?fork|execve)\(", traced)
    print(f"auth processes {pids}: {len(calls)} clone/fork/execve during 20 logins")
    assert calls == [], traced[:2000]
    assert dovecot.service_pids("auth") == pids  # the same workers served all of them


TROUBLE_LOGINS = ["defer", "garbage", "empty", "twolines", "cr", "noeol", "long", "notfound",
                  "nohome", "relhome", "dotdot", "tab", "nl", "badb64", "emptyuser", "twice",
                  "slow"]  # fmt: skip


@pytest.mark.parametrize("name", TROUBLE_LOGINS)
def test_trouble_is_a_temporary_failure_never_a_wrong_password(stack: Stack, name: str) -> None:
    user = f"{name}@example.org"
    res = stack.dovecot.doveadm("auth", "test", user, "some-password")
    assert res.returncode != 0, res.stdout
    assert "code=temp_fail" in res.stdout, (name, res.stdout + res.stderr)


def test_trouble_over_imaps_is_unavailable(stack: Stack) -> None:
    for name in ["defer", "relhome"]:
        ok, text = stack.dovecot.login(f"{name}@example.org", "some-password")
        assert not ok and "AUTHENTICATIONFAILED" not in text, text
        assert "UNAVAILABLE" in text or "Temporary authentication failure" in text, text
    log = stack.dovecot.log()
    assert "mailpolicy-auth: daemon deferred defer@example.org: 451 4.3.0 passwd file" in log
    assert "mailpolicy-auth: OK with a home that is not an absolute path" in log
    assert "some-password" not in log


def test_request_lines(stack: Stack) -> None:
    stack.proxy.seen.clear()
    assert stack.dovecot.login("Carol@Example.NET", "carol-secret")[0]
    res = stack.dovecot.doveadm("user", "carol@example.net")
    assert res.returncode == 0, res.stderr
    pw, svc = b64("carol-secret"), b64("imap")
    auth = f"AUTH user={b64('carol@example.net')} pass={pw} service={svc} ip=127.0.0.1\n"
    user = f"USER user={b64('carol@example.net')} service={b64('doveadm')}\n"
    # Dovecot lower-cases the name (auth_username_format = %Lu) before asking
    assert stack.proxy.seen == [auth.encode(), user.encode()]


def test_lookup_answers(stack: Stack) -> None:
    res = stack.dovecot.doveadm("user", "fail@example.org")  # FAIL is no answer to USER
    assert res.returncode == 75, res
    res = stack.dovecot.doveadm("user", "defer@example.org")
    assert res.returncode == 75, res
    res = stack.dovecot.doveadm("user", "extra@example.org")  # unknown fields are ignored
    assert res.returncode == 0 and "/srv/extra" in res.stdout, res
    assert "quota" not in res.stdout


def test_daemon_stopped_is_a_temporary_failure(
    stack: Stack,
) -> None:
    """Last in the module: stops the daemon."""
    dovecot = stack.dovecot
    stack.daemon.stop()
    stack.proxy.close()  # nothing listens on the socket any more
    ok, text = dovecot.login("alice@example.org", "alice-secret")
    assert not ok
    assert "AUTHENTICATIONFAILED" not in text, text
    assert "UNAVAILABLE" in text or "Temporary authentication failure" in text, text
    res = dovecot.doveadm("auth", "test", "alice@example.org", "alice-secret")
    # doveadm auth test exits 77 for any failed login; the reply code tells them apart.
    assert "code=temp_fail" in res.stdout, res.stdout + res.stderr
    res = dovecot.doveadm("user", "alice@example.org")
    assert res.returncode == 75, res.stdout + res.stderr
    assert "mailpolicy-auth: daemon socket" in dovecot.log()
    assert "alice-secret" not in dovecot.log()
