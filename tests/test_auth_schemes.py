"""Every password scheme, end to end: hashes made by the real `doveadm pw` log in through the real
Dovecot 2.3 and the real Exim 4.96 on both auth paths (DovecotSite.auth_path "lua" and
"checkpassword"), with the policy daemon checking them (docs/auth.md).

One data tree per module: a copy of examples/srv-mail plus the domain schemes.example with, for
each scheme, one user per protocol (``sha512-crypt-imaps@schemes.example``, ``...-starttls``,
``...-smtp``), each hash made at set-up by ``doveadm pw -s SCHEME -p PASSWORD`` with a password
full of awkward characters (space, quotes, ``=``, backslash, ``%``, ``$``). A user per protocol,
because the daemon caches a correct login (auth_cache_ttl): so every login below is checked
against its doveadm hash (the daemon's log says so), none is answered from the cache. One
Dovecot + Exim + daemon per auth path (tests/dovecot_stack.py). For each path:

* every scheme: IMAP LOGIN over IMAPS and after STARTTLS (INBOX selectable), SMTP AUTH PLAIN on
  the submission port after STARTTLS from 127.0.0.2 and the message relayed to the loopback sink
  (the AUTH permitted the relay, Exim logged the canonical user).
* every scheme, a wrong password: IMAP AUTHENTICATIONFAILED, SMTP 535 and no relay; the daemon
  logged "wrong password". Each attempt comes from its own 127.0.0.x and user, so the daemon's
  throttle (3 free failures per IP and per user) never delays them.
* auth_default_realm (qualify domain example.org): a bare ``alice`` logs in over IMAP as
  alice@example.org, a bare ``bob`` over SMTP as bob@example.org (Exim logs and relays as
  bob@example.org); the daemon runs without a realm of its own, so Dovecot qualified the names. A
  bare ``carol`` (an example.net user) does not log in.
* the daemon stopped (last test; it starts the daemon again): IMAP answers [UNAVAILABLE]
  "Temporary authentication failure" over IMAPS and STARTTLS, never AUTHENTICATIONFAILED;
  ``doveadm auth test`` says code=temp_fail, and so does Dovecot to Exim's authenticator
  (``FAIL <id> user=... code=temp_fail``; Exim 4.96 still answers 535 to the client:
  docs/exim.md, asserted by tests/test_exim_auth.py); Dovecot's log names the daemon's socket;
  once the daemon is back, the same connections log in.
"""

from __future__ import annotations

import base64
import contextlib
import imaplib
import os
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import copy_example
from tests.dovecot_stack import DOVEADM, DovecotStack, dovecot_stack, exim_for
from tests.exim_stack import PRIMARY, Stack, message

pytestmark = pytest.mark.integration

DOMAIN = "schemes.example"
# The schemes docs/auth.md names (tests/test_passwords.py checks the rest at the verify() level);
# test_doveadm_makes_every_scheme checks that this machine's `doveadm pw -l` lists them all.
SCHEMES = ["SHA512-CRYPT", "SHA256-CRYPT", "BLF-CRYPT", "ARGON2I", "ARGON2ID", "SSHA512",
           "SSHA256", "SSHA", "PBKDF2", "CRYPT", "PLAIN", "CLEARTEXT"]  # fmt: skip
# No colon (the passwd file's separator), no leading or trailing space (stripped there), ASCII
# (imaplib sends LOGIN arguments as ASCII).
PASSWORDS = ['pa ss"w=rd', 'it\'s \\ "q" = %u $HOME `id`']
PROTOCOLS = ("imaps", "starttls", "smtp")  # a user of each scheme for each
OUTSIDER = "127.0.0.2"  # not in relay_from_hosts, not 127.0.0.1 (localhost may relay)
REALM_USERS = {"alice@example.org": "alice-secret", "bob@example.org": "bob-secret"}


def user_of(scheme: str, protocol: str) -> str:
    return f"{scheme.lower()}-{protocol}@{DOMAIN}"


def password_of(scheme: str) -> str:
    return PASSWORDS[SCHEMES.index(scheme) % len(PASSWORDS)]


def wrong(password: str) -> str:
    return "Y" + password[1:]  # the first character: bcrypt reads only 72 bytes


def doveadm_pw(scheme: str, password: str) -> str:
    out = subprocess.run([DOVEADM, "pw", "-s", scheme, "-p", password], capture_output=True,
                         text=True, check=True, timeout=60).stdout  # fmt: skip
    stored = out.removesuffix("\n")
    assert stored.startswith(f"{{{scheme}}}"), stored
    return stored


Hashes = dict[tuple[str, str], str]


@pytest.fixture(scope="module")
def hashes() -> Hashes:
    """{(scheme, protocol): a hash `doveadm pw` made of password_of(scheme)}, in parallel."""
    jobs = [(s, p) for s in SCHEMES for p in PROTOCOLS]
    with ThreadPoolExecutor(len(SCHEMES)) as pool:
        made = pool.map(lambda job: doveadm_pw(job[0], password_of(job[0])), jobs)
        return dict(zip(jobs, made, strict=True))


@pytest.fixture(scope="module")
def schemes_tree(hashes: Hashes) -> Iterator[Path]:
    """examples/srv-mail plus passwd/schemes.example (dovecot_stack copies it per path)."""
    base = Path(tempfile.mkdtemp(prefix="sch.", dir="/tmp"))
    try:
        root = copy_example(base / "srv")
        lines = "".join(
            f"{user_of(*job).split('@')[0]}:{stored}\n" for job, stored in hashes.items()
        )
        (root / "passwd" / DOMAIN).write_text(f"# hashes made by doveadm pw\n{lines}")
        yield root
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module", params=["lua", "checkpassword"])
def stacks(
    request: pytest.FixtureRequest, schemes_tree: Path
) -> Iterator[tuple[DovecotStack, Stack]]:
    with (
        dovecot_stack(
            qualify_domain="example.org", auth_path=request.param, root=schemes_tree
        ) as dv,
        exim_for(dv) as exim,
    ):
        yield dv, exim


# --- helpers --------------------------------------------------------------------------------


def marker() -> str:
    return f"s-{uuid.uuid4().hex[:12]}"


def plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def tls_client(exim: Stack, port: int, source: str = OUTSIDER) -> smtplib.SMTP:
    client = exim.smtp(source, port)
    client._host = PRIMARY  # type: ignore[attr-defined]  # smtplib sends it as SNI
    client.starttls(context=DovecotStack.client_context())
    client.ehlo("client.example.net")
    return client


class IMAPSFrom(imaplib.IMAP4_SSL):
    """IMAPS from a chosen loopback address (each its own client IP for the daemon's throttle)."""

    def __init__(self, source: str, port: int) -> None:
        self.source, self.context = source, DovecotStack.client_context()
        super().__init__("127.0.0.1", port, ssl_context=self.context, timeout=30)

    def _create_socket(self, timeout: float | None) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout,
                                        source_address=(self.source, 0))  # fmt: skip
        return self.context.wrap_socket(sock, server_hostname=self.host)


def auth_decisions(dv: DovecotStack, user: str, verdict: str = r"\S+") -> list[str]:
    """The daemon's AUTH decision lines for ``user`` (with ``verdict``, a regex)."""
    pattern = rf"decision stage=AUTH ip=\S+ user={re.escape(user)} verdict={verdict} .*"
    return re.findall(pattern, dv.policy_log())


def wait_decisions(
    dv: DovecotStack, user: str, count: int, verdict: str = r"\S+", timeout: float = 10
) -> list[str]:
    """At least ``count`` such lines, if they come (the daemon writes its log every 0.2 s)."""
    deadline = time.monotonic() + timeout
    while len(found := auth_decisions(dv, user, verdict)) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return found


def auth_client(dv: DovecotStack, user: str, password: str) -> str:
    """One SASL PLAIN exchange on the auth-client socket, as Exim's dovecot authenticator."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(15)
        s.connect(dv.site.auth_client_socket)
        f = s.makefile("rb")
        s.sendall(f"VERSION\t1\t2\nCPID\t{os.getpid()}\n".encode())
        while f.readline() not in (b"DONE\n", b""):
            pass
        resp = plain(user, password)
        s.sendall(f"AUTH\t1\tPLAIN\tservice=smtp\tsecured\trip={OUTSIDER}\tresp={resp}\n".encode())
        return f.readline().decode().rstrip("\n")


# --- the schemes ----------------------------------------------------------------------------


def test_doveadm_makes_every_scheme(hashes: Hashes) -> None:
    listed = subprocess.run([DOVEADM, "pw", "-l"], capture_output=True, text=True, check=True)
    assert set(SCHEMES) <= set(listed.stdout.split()), listed.stdout
    # Debian's `doveadm pw -s CRYPT` writes bcrypt (tests/test_passwords.py), PLAIN the password.
    assert re.fullmatch(r"\{CRYPT\}\$2y\$05\$.{53}", hashes["CRYPT", "smtp"])
    assert hashes["PLAIN", "smtp"] == f"{{PLAIN}}{password_of('PLAIN')}"
    salted = [s for s in SCHEMES if s not in ("PLAIN", "CLEARTEXT")]
    assert all(len({hashes[s, p] for p in PROTOCOLS}) == len(PROTOCOLS) for s in salted)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_scheme_logs_in_over_imap_and_smtp(stacks: tuple[DovecotStack, Stack], scheme: str) -> None:
    dv, exim = stacks
    password = password_of(scheme)
    for protocol, connect in (("imaps", dv.imaps), ("starttls", dv.imap_starttls)):
        client = connect()
        try:
            assert client.login(user_of(scheme, protocol), password)[0] == "OK"
            assert client.select("INBOX")[0] == "OK"
        finally:
            client.logout()
    user, mark = user_of(scheme, "smtp"), marker()
    with tls_client(exim, exim.submission_port) as smtp:
        code, text = smtp.docmd("AUTH", "PLAIN " + plain(user, password))
        assert code == 235, (code, text)
        assert smtp.sendmail(user, ["friend@far.example"], message(user, "friend", mark)) == {}
    sender, rcpts, _ = exim.wait_sink(mark)
    assert (sender, rcpts) == (user, ["friend@far.example"])
    received = rf"<= {re.escape(user)} H=\S+ \[{OUTSIDER}\] .*A=dovecot_plain:{re.escape(user)} "
    assert re.search(received + rf".*id={mark}@client", exim.mainlog()), exim.mainlog()
    # The daemon decided each login by checking the hash (reason=-: not from its cache).
    for protocol, ip in (("imaps", "127.0.0.1"), ("starttls", "127.0.0.1"), ("smtp", OUTSIDER)):
        decisions = wait_decisions(dv, user_of(scheme, protocol), 1)
        assert len(decisions) == 1, decisions
        assert re.fullmatch(rf"decision stage=AUTH ip={re.escape(ip)} \S+ verdict=OK check=auth "
                            rf"reason=- source=passwd/{DOMAIN}:\d+ duration_ms=\S+",
                            decisions[0]), decisions  # fmt: skip


def wrong_password_attempt(dv: DovecotStack, exim: Stack, n: int, scheme: str) -> list[object]:
    """IMAPS LOGIN and SMTP AUTH with a wrong password, each from its own address; what the
    servers answered (and the submission port's answer to a relay attempt after it)."""
    bad = wrong(password_of(scheme))
    client = IMAPSFrom(f"127.0.0.{10 + n}", dv.imaps_port)
    try:
        client.login(user_of(scheme, "imaps"), bad)
        imap = "logged in"
    except imaplib.IMAP4.error as e:
        imap = e.args[0].decode() if isinstance(e.args[0], bytes) else str(e)
    finally:
        client.logout()
    user = user_of(scheme, "smtp")
    with tls_client(exim, exim.submission_port, source=f"127.0.0.{40 + n}") as smtp:
        auth = smtp.docmd("AUTH", "PLAIN " + plain(user, bad))
        mail = smtp.docmd(f"MAIL FROM:<{user}>")[0]
        code, text = smtp.docmd("RCPT TO:<friend@far.example>")
    return [imap, auth, mail, code, text[:5]]


def test_wrong_password_fails_for_every_scheme(stacks: tuple[DovecotStack, Stack]) -> None:
    """Both protocols, every scheme; each attempt from its own address (no throttle delay), all
    at once: Dovecot 2.3 answers a failure only at its next 0.5 s check even with
    auth_failure_delay = 0 (AUTH_FAILURE_DELAY_CHECK_MSECS), one by one this took 12 s."""
    dv, exim = stacks
    with ThreadPoolExecutor(len(SCHEMES)) as pool:
        answers = list(pool.map(lambda job: wrong_password_attempt(dv, exim, *job),
                                enumerate(SCHEMES)))  # fmt: skip
    refused = "[AUTHENTICATIONFAILED] Authentication failed."
    expected = [refused, (535, b"Incorrect authentication data"), 250, 550, b"5.7.0"]
    assert dict(zip(SCHEMES, answers, strict=True)) == {s: expected for s in SCHEMES}
    for scheme in SCHEMES:
        for protocol in ("imaps", "smtp"):
            failed = wait_decisions(dv, user_of(scheme, protocol), 1, verdict="FAIL")
            assert len(failed) == 1, (scheme, protocol, failed)
            assert 'reason="wrong password"' in failed[0], failed


# --- auth_default_realm -----------------------------------------------------------------------


def test_default_realm(stacks: tuple[DovecotStack, Stack]) -> None:
    """Dovecot's auth_default_realm = example.org (the qualify domain): a bare name is qualified
    before the daemon sees it (the daemon here has no realm of its own)."""
    dv, exim = stacks
    assert "\nauth_default_realm = example.org\n" in dv.conf.read_text()
    client = dv.imaps()
    try:
        with pytest.raises(imaplib.IMAP4.error, match=r"\[AUTHENTICATIONFAILED\]"):
            client.login("carol", "carol-secret")  # carol@example.net: not in the realm
        assert client.login("alice", REALM_USERS["alice@example.org"])[0] == "OK"
    finally:
        client.logout()
    assert "Login: user=<alice@example.org>" in dv.log()
    mark = marker()
    with tls_client(exim, exim.submission_port) as smtp:
        code, text = smtp.docmd("AUTH", "PLAIN " + plain("bob", REALM_USERS["bob@example.org"]))
        assert code == 235, (code, text)
        smtp.sendmail("bob@example.org", ["friend@far.example"], message("bob", "friend", mark))
    assert exim.wait_sink(mark)[1] == ["friend@far.example"]
    # Exim's $authenticated_id is Dovecot's canonical name, not what the client typed.
    assert "A=dovecot_plain:bob@example.org " in exim.mainlog()
    assert wait_decisions(dv, "alice@example.org", 1)[0].split()[2:4] == [
        "ip=127.0.0.1", "user=alice@example.org"]  # fmt: skip
    assert wait_decisions(dv, "bob@example.org", 1, verdict="OK")
    assert 'reason="unknown user"' in wait_decisions(dv, "carol@example.org", 1, "FAIL")[0]
    assert not re.search(r"stage=AUTH \S+ user=(alice|bob|carol) ", dv.policy_log())


# --- the daemon down (last: it stops the daemon, then starts it again) ------------------------


def stop_policy(dv: DovecotStack) -> None:
    proc = dv.procs.pop("policy")
    proc.send_signal(signal.SIGTERM)
    proc.wait(15)


def test_daemon_down_is_a_temporary_failure(stacks: tuple[DovecotStack, Stack]) -> None:
    dv, exim = stacks
    user, password = user_of("ARGON2ID", "starttls"), password_of("ARGON2ID")
    imaps, starttls = dv.imaps(), dv.imap_starttls()
    smtp = tls_client(exim, exim.submission_port)  # now: Exim's connect ACL asks the daemon too
    try:
        stop_policy(dv)
        try:
            for client in (imaps, starttls):
                with pytest.raises(imaplib.IMAP4.error) as failed:
                    client.login(user, password)
                text = str(failed.value)
                assert "AUTHENTICATIONFAILED" not in text, text
                assert "[UNAVAILABLE] Temporary authentication failure" in text, text
            res = dv.doveadm("auth", "test", user, password)
            assert res.returncode != 0 and "code=temp_fail" in res.stdout, res.stdout + res.stderr
            # What Dovecot tells Exim's authenticator: a temporary failure, too ...
            reply = auth_client(dv, user, password)
            assert reply.startswith("FAIL\t1\t") and "code=temp_fail" in reply.split("\t"), reply
            # ... which Exim 4.96 answers with 535, not 454 (docs/exim.md; test_exim_auth.py).
            code, _ = smtp.docmd("AUTH", "PLAIN " + plain(user, password))
            assert code in (454, 535)
        finally:
            dv.start_policy()
        # The Lua script or the hook said why (Dovecot's log), never with the password.
        assert f"daemon socket {dv.site.auth_socket}: " in dv.log()
        assert password not in dv.log()
        # Back: the same connections log in, no Dovecot or Exim restart.
        for client in (imaps, starttls):
            assert client.login(user, password)[0] == "OK"
        assert smtp.docmd("AUTH", "PLAIN " + plain(user, password))[0] == 235
    finally:
        for client in (imaps, starttls):
            with contextlib.suppress(OSError, imaplib.IMAP4.error):
                client.logout()
        with contextlib.suppress(smtplib.SMTPException, OSError):
            smtp.quit()
