"""SMTP AUTH in the real Exim 4.96 (exim/configure) through the real Dovecot 2.3 and the policy
daemon: offered only inside TLS, on 25 and 587; relaying after AUTH; a wrong password relays
nothing; the daemon's trouble is a temporary failure, never "wrong password"; users added or
changed with `mailpolicy user` are in force at once, for SMTP AUTH and for LMTP delivery.
"""

from __future__ import annotations

import base64
import imaplib
import os
import smtplib
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import OFFLINE, REPO
from tests.dovecot_stack import DovecotStack, dovecot_stack, exim_for
from tests.exim_stack import PRIMARY, Stack, message

pytestmark = pytest.mark.integration

OUTSIDER = "127.0.0.2"  # not in relay_from_hosts, not 127.0.0.1 (localhost may relay)
USERS = {
    "alice@example.org": "alice-secret",  # ARGON2ID
    "bob@example.org": "bob-secret",  # SHA512-CRYPT
    "carol@example.net": "carol-secret",  # BLF-CRYPT
}


# On both auth paths: Dovecot asks the daemon by its Lua passdb or by hooks/checkpassword.
@pytest.fixture(scope="module", params=["lua", "checkpassword"])
def stacks(request: pytest.FixtureRequest) -> Iterator[tuple[DovecotStack, Stack]]:
    with dovecot_stack(auth_path=request.param) as dv, exim_for(dv) as exim:
        yield dv, exim


def marker() -> str:
    return f"a-{uuid.uuid4().hex[:12]}"


def plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def tls_client(exim: Stack, port: int) -> smtplib.SMTP:
    client = exim.smtp(OUTSIDER, port)
    client._host = PRIMARY  # type: ignore[attr-defined]  # smtplib sends it as SNI
    client.starttls(context=DovecotStack.client_context())
    client.ehlo("client.example.net")
    return client


@pytest.mark.parametrize("which", ["smtp", "submission"])
def test_auth_offered_only_inside_tls(stacks: tuple[DovecotStack, Stack], which: str) -> None:
    _, exim = stacks
    port = exim.smtp_port if which == "smtp" else exim.submission_port
    with exim.smtp(OUTSIDER, port) as client:
        assert client.has_extn("starttls") and not client.has_extn("auth")
        code, _ = client.docmd("AUTH", "PLAIN " + plain("alice@example.org", "alice-secret"))
        assert code == 503  # not advertised: refused, the password never checked
    with tls_client(exim, port) as client:
        assert client.has_extn("auth")
        assert set(client.esmtp_features["auth"].split()) == {"PLAIN", "LOGIN"}


@pytest.mark.parametrize("user", sorted(USERS))
def test_relay_after_auth_on_submission(stacks: tuple[DovecotStack, Stack], user: str) -> None:
    dv, exim = stacks
    mark = marker()
    with tls_client(exim, exim.submission_port) as client:
        client.login(user, USERS[user])
        assert client.sendmail(user, ["friend@far.example"], message(user, "friend", mark)) == {}
    sender, rcpts, _ = exim.wait_sink(mark)
    assert (sender, rcpts) == (user, ["friend@far.example"])
    assert f"A=dovecot_plain:{user}" in exim.mainlog()
    time.sleep(0.3)  # the daemon writes its log every 0.2 s
    assert f"stage=AUTH ip={OUTSIDER} user={user} verdict=OK" in dv.policy_log()


def test_auth_on_port_25_relays_too(stacks: tuple[DovecotStack, Stack]) -> None:
    _, exim = stacks
    mark = marker()
    with tls_client(exim, exim.smtp_port) as client:
        client.login("bob@example.org", "bob-secret")  # LOGIN or PLAIN, smtplib's choice
        client.sendmail("bob@example.org", ["friend@far.example"], message("b", "f", mark))
    assert exim.wait_sink(mark)[1] == ["friend@far.example"]


def test_wrong_password_relays_nothing(stacks: tuple[DovecotStack, Stack]) -> None:
    dv, exim = stacks
    for port, refusal in ((exim.submission_port, b"5.7.0"), (exim.smtp_port, b"5.7.1")):
        with tls_client(exim, port) as client:
            with pytest.raises(smtplib.SMTPAuthenticationError) as failed:
                client.login("alice@example.org", "not-her-password")
            assert failed.value.smtp_code == 535
            assert client.docmd("MAIL FROM:<alice@example.org>")[0] == 250
            code, text = client.docmd("RCPT TO:<friend@far.example>")
            assert code == 550 and text.startswith(refusal), (code, text)
    time.sleep(0.3)  # the daemon writes its log every 0.2 s
    assert "user=alice@example.org verdict=FAIL" in dv.policy_log()


def test_auth_trouble_is_temporary_for_dovecot(stacks: tuple[DovecotStack, Stack]) -> None:
    """The auth socket unreachable (the Lua script returns an internal failure, the hook exits
    111): an IMAP login gets a temporary failure ([UNAVAILABLE]), never AUTHENTICATIONFAILED,
    and works once the socket is back.

    SMTP AUTH cannot say "temporary" here: Dovecot answers Exim's dovecot authenticator
    `FAIL <id> user=... code=temp_fail`, and Exim 4.96 (src/auths/dovecot.c, case 'F') ignores
    `code=temp_fail` and answers 535. Asserted below so that a change in Exim shows up;
    docs/exim.md explains it. The client keeps its message either way (nothing is accepted
    without AUTH)."""
    dv, exim = stacks
    sock = Path(dv.site.auth_socket)
    away = sock.with_name(sock.name + ".away")
    imap = dv.imaps()
    smtp = tls_client(exim, exim.submission_port)
    os.rename(sock, away)
    try:
        with pytest.raises(imaplib.IMAP4.error) as failed:
            imap.login("bob@example.org", "bob-secret")
        code, text = smtp.docmd("AUTH", "PLAIN " + plain("bob@example.org", "bob-secret"))
    finally:
        os.rename(away, sock)
    assert "UNAVAILABLE" in str(failed.value) and "AUTHENTICATIONFAILED" not in str(failed.value)
    assert (code, text) == (535, b"Incorrect authentication data")
    assert "temp" in dv.log() or "111" in dv.log()
    assert imap.login("bob@example.org", "bob-secret")[0] == "OK"
    imap.logout()
    code, _ = smtp.docmd("AUTH", "PLAIN " + plain("bob@example.org", "bob-secret"))
    assert code == 235
    smtp.close()


def mailpolicy(*args: str, stdin: str) -> None:
    subprocess.run([sys.executable, "-m", "policy", *args, "--config", str(OFFLINE)], input=stdin,
                   text=True, check=True, cwd=REPO, capture_output=True, timeout=60)  # fmt: skip


def wait_login(exim: Stack, user: str, password: str, timeout: float = 10) -> int:
    """The code of the first AUTH answer that is not a 535 (the daemon notices edits within
    its reload interval), or the last 535."""
    deadline = time.monotonic() + timeout
    while True:
        with tls_client(exim, exim.submission_port) as client:
            code, _ = client.docmd("AUTH", "PLAIN " + plain(user, password))
        if code != 535 or time.monotonic() > deadline:
            return code
        time.sleep(0.2)


def test_user_add_and_passwd_in_force_without_restart(stacks: tuple[DovecotStack, Stack]) -> None:
    dv, exim = stacks
    mailpolicy("user", "add", "--root", str(dv.root), "dave@example.org", stdin="dave-1\n")
    assert wait_login(exim, "dave@example.org", "dave-1") == 235
    # Exim delivers to the new user over LMTP (Dovecot looks dave up through the daemon).
    mark = marker()
    with exim.smtp(OUTSIDER) as client:
        client.sendmail("s@remote.example", ["dave@example.org"], message("s", "dave", mark))
    exim.wait_maildir("example.org", "dave", mark)
    assert "T=dovecot_lmtp" in exim.mainlog()
    mailpolicy("user", "passwd", "--root", str(dv.root), "dave@example.org", stdin="dave-2\n")
    assert wait_login(exim, "dave@example.org", "dave-2") == 235
    assert wait_login(exim, "dave@example.org", "dave-1", timeout=0) == 535  # the old one: gone
