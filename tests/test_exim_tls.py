"""TLS through the real Exim 4.96 with the project's exim/configure: STARTTLS on both ports,
the certificate chosen by the client's SNI from <root>/ssl/<name>/current/ (the primary
hostname's without SNI or for an unknown name), a rollover by switching the `current` symlink
seen by the next connection without a restart, and no AUTH before STARTTLS."""

from __future__ import annotations

import os
import re
import smtplib
import ssl
import subprocess
import uuid
from collections.abc import Iterator

import pytest

from tests.exim_stack import PRIMARY, Stack, exim_stack, make_cert, message

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with exim_stack(certs=True) as s:
        # Traps for the SNI lookup: a file where a directory is expected, and a name with a
        # directory but no certificate yet. Both must fall back to the primary hostname's.
        (s.root / "ssl" / "notes.example").write_text("not a certificate directory\n")
        (s.root / "ssl" / "example.com").mkdir()
        yield s


def ports(stack: Stack) -> dict[str, int]:
    return {"smtp": stack.smtp_port, "submission": stack.submission_port}


def starttls(stack: Stack, sni: str | None, port: int | None = None) -> smtplib.SMTP:
    """An SMTP client after EHLO, STARTTLS (sending ``sni``, or no SNI at all) and EHLO again.
    The certificate is not verified here: the tests compare it with the files."""
    client = stack.smtp(port=port)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    client._host = sni  # type: ignore[assignment]  # smtplib sends its _host as SNI; None: none
    code, text = client.starttls(context=context)
    assert code == 220, text
    client.ehlo("client.example.net")
    return client


def served(stack: Stack, sni: str | None, port: int | None = None) -> bytes:
    """The DER certificate Exim presents to a client sending ``sni``."""
    with starttls(stack, sni, port) as client:
        assert isinstance(client.sock, ssl.SSLSocket)
        der = client.sock.getpeercert(binary_form=True)
        client.noop()
    assert der
    return der


def on_disk(stack: Stack, name: str, version: str = "current") -> bytes:
    pem = (stack.root / "ssl" / name / version / "cert").read_text()
    return ssl.PEM_cert_to_DER_cert(pem)


def subject(der: bytes) -> str:
    out = subprocess.run(["openssl", "x509", "-inform", "DER", "-noout", "-subject"], input=der,
                         capture_output=True, check=True)  # fmt: skip
    return out.stdout.decode().strip()


# --- STARTTLS -----------------------------------------------------------------------------


@pytest.mark.parametrize("port_name", ["smtp", "submission"])
def test_starttls_offered_and_the_session_continues(stack: Stack, port_name: str) -> None:
    port = ports(stack)[port_name]
    with stack.smtp(port=port) as client:
        assert client.has_extn("starttls")
    with starttls(stack, PRIMARY, port) as client:
        assert isinstance(client.sock, ssl.SSLSocket)
        assert client.sock.version() in {"TLSv1.2", "TLSv1.3"}
        assert client.ehlo_resp is not None
        assert not client.has_extn("starttls")  # offered once, not again inside TLS
        assert client.noop()[0] == 250


def test_mail_over_starttls_on_port_25_is_delivered(stack: Stack) -> None:
    mark = f"tls-{uuid.uuid4().hex[:12]}"
    sender, rcpt = "someone@remote.example", "alice@example.org"
    with starttls(stack, "example.org") as client:
        assert client.sendmail(sender, [rcpt], message(sender, rcpt, mark)) == {}
    delivered = stack.wait_maildir("example.org", "alice", mark)
    # Exim's Received: header says it came over TLS ("with esmtps  (TLS1.3) tls ...")
    assert re.search(rb"with esmtps +\(TLS1\.[23]\) tls ", delivered), delivered.decode()
    assert re.search(rf" P=esmtps X=TLS1\.[23]:\S+ .*id={mark}@", stack.mainlog())


# --- the certificate by SNI ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("sni", "expected"),
    [
        ("example.org", "example.org"),
        ("example.net", "example.net"),
        ("EXAMPLE.Net", "example.net"),  # SNI is case-insensitive
        (PRIMARY, PRIMARY),
        (None, PRIMARY),  # no SNI
        ("other.example", PRIMARY),  # unknown name
        ("notes.example", PRIMARY),  # a file in ssl/, not a certificate directory
        ("example.com", PRIMARY),  # a directory without current/
    ],
)
def test_certificate_chosen_by_sni(stack: Stack, sni: str | None, expected: str) -> None:
    seen = len(stack.mainlog())
    der = served(stack, sni)
    assert subject(der) == f"subject=CN = {expected}"
    assert der == on_disk(stack, expected)
    assert "TLS error" not in stack.mainlog()[seen:]


def test_submission_port_chooses_by_sni_too(stack: Stack) -> None:
    assert served(stack, "example.net", stack.submission_port) == on_disk(stack, "example.net")
    assert served(stack, None, stack.submission_port) == on_disk(stack, PRIMARY)


# --- rollover -----------------------------------------------------------------------------


def test_rollover_by_symlink_switch_is_seen_by_the_next_connection(stack: Stack) -> None:
    exim = stack.procs["exim"]
    seen = len(stack.mainlog())
    site = stack.root / "ssl" / "example.org"
    old_version = os.readlink(site / "current")
    old = served(stack, "example.org")
    assert old == on_disk(stack, "example.org", old_version)

    new_version = f"v-{uuid.uuid4().hex[:8]}"
    make_cert(stack.root, "example.org", new_version)  # ln -s + rename over `current`
    assert os.readlink(site / "current") == new_version
    new = served(stack, "example.org")
    assert new == on_disk(stack, "example.org", new_version)
    assert new != old
    assert served(stack, None) == on_disk(stack, PRIMARY)  # the others are untouched

    # ... and back, atomically again: Exim keeps nothing from the earlier connections.
    link = site / ".current.back"
    link.symlink_to(old_version)
    link.rename(site / "current")
    assert served(stack, "example.org") == old
    assert exim.poll() is None  # the same daemon all along: no restart, no SIGHUP
    assert "TLS error" not in stack.mainlog()[seen:]


def test_starttls_not_advertised_without_a_primary_certificate(stack: Stack) -> None:
    current = stack.root / "ssl" / PRIMARY / "current"
    aside = current.with_name("current.aside")
    current.rename(aside)
    try:
        for port in ports(stack).values():
            with stack.smtp(port=port) as client:
                assert not client.has_extn("starttls")
    finally:
        aside.rename(current)
    with stack.smtp() as client:
        assert client.has_extn("starttls")


# --- AUTH -----------------------------------------------------------------------------------


@pytest.mark.parametrize("port_name", ["smtp", "submission"])
def test_no_auth_before_starttls(stack: Stack, port_name: str) -> None:
    with stack.smtp(port=ports(stack)[port_name]) as client:
        assert client.has_extn("starttls")  # the EHLO answer is a full one
        assert not client.has_extn("auth")


def test_primary_key_is_readable_by_exim_only(stack: Stack) -> None:
    key = stack.root / "ssl" / PRIMARY / "current" / "key"
    st = key.stat()
    assert st.st_mode & 0o777 == 0o640
    assert st.st_uid == 0
    assert key.group() == "Debian-exim"
