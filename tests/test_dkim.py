"""DKIM-required domains at DATA (policy/checks/dkim.py) against a real authoritative DNS server
(NSD on a loopback port, tests/dns_server.py) serving the keys: every branch of the check with
messages signed by dkimpy, a message signed by a second, independent signer (Exim 4.96's own
DKIM signing in an smtp transport, captured by an aiosmtpd sink), and accept / reject / defer
through the real Exim with the project's exim/configure and the real daemon.

The example tree's exim/conf/dkim_required lists ``paypal.example`` (line 15) and
``*.paypal.example`` (line 16). Zones: paypal.example holds the keys (selectors below);
``broken.paypal.example`` is a zone NSD cannot load (SERVFAIL: a temporary key-lookup failure);
other.example is a domain nobody requires.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import importlib.util
import os
import re
import shutil
import smtplib
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import dkim
import pytest
from aiosmtpd.controller import Controller

from policy import protocol
from policy import settings as settings_mod
from policy.aliases import Limits
from policy.checks import Context, Result
from policy.checks import dkim as check_dkim
from policy.mailtree import Loaded, Snapshot, TreeLoader
from policy.message import Message
from policy.pipeline import evaluate_async
from policy.services import Services
from tests.conftest import EXAMPLE, PRIMARY_HOSTNAME
from tests.dns_server import DnsServer, txt
from tests.exim_stack import EXIM, Sink, Stack, exim_stack, free_port

pytestmark = pytest.mark.integration

OUTSIDER = "198.51.100.9"  # not in the example relay_from_hosts
RELAY_CLIENT = "192.0.2.10"  # in it (192.0.2.0/24)
EXIM_ID = "1tGxYZ-000abc-12"
SOURCE = "exim/conf/dkim_required:15"  # paypal.example
WILD_SOURCE = "exim/conf/dkim_required:16"  # *.paypal.example


# --- keys, zones, messages ---------------------------------------------------------------


@dataclass(frozen=True)
class Key:
    private: bytes  # PEM
    path: Path
    record: str  # the DNS TXT value

    def txt(self) -> str:
        return txt(self.record)


def make_key(directory: Path, name: str, bits: int) -> Key:
    """An RSA key by the openssl CLI; its public half as a DKIM key record."""
    path = directory / f"{name}.pem"
    subprocess.run(["openssl", "genrsa", "-out", str(path), str(bits)], check=True,
                   capture_output=True)  # fmt: skip
    der = subprocess.run(["openssl", "rsa", "-in", str(path), "-pubout", "-outform", "DER"],
                         check=True, capture_output=True).stdout  # fmt: skip
    return Key(path.read_bytes(), path, "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode())


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Key]:
    d = tmp_path_factory.mktemp("keys")
    # 512 bits: RFC 8301 says too small; 1024: the smallest that counts.
    return {"main": make_key(d, "main", 2048), "k1024": make_key(d, "k1024", 1024),
            "k512": make_key(d, "k512", 512), "exim": make_key(d, "exim", 2048)}  # fmt: skip


# An Ed25519 public key record (RFC 8463): 32 bytes; no one signs with it here.
ED25519_RECORD = "v=DKIM1; k=ed25519; p=" + base64.b64encode(bytes(range(32))).decode()


@pytest.fixture(scope="module")
def dns_server(keys: dict[str, Key]) -> Iterator[DnsServer]:
    with DnsServer() as server:
        server.set_zone("paypal.example", [
            f"sel._domainkey TXT {keys['main'].txt()}",
            f"k1024._domainkey TXT {keys['k1024'].txt()}",
            f"small._domainkey TXT {keys['k512'].txt()}",
            f"exim._domainkey TXT {keys['exim'].txt()}",
            f"tls._domainkey TXT {txt(keys['main'].record + '; s=tlsrpt')}",
            'revoked._domainkey TXT "v=DKIM1; k=rsa; p="',
            f"ed._domainkey TXT {txt(ED25519_RECORD)}",
            "nodata._domainkey A 127.0.0.9",  # the name exists, no TXT
        ])  # fmt: skip
        server.set_zone("other.example", [f"sel._domainkey TXT {keys['main'].txt()}"])
        server.break_zone("broken.paypal.example")  # SERVFAIL for every name in it
        yield server


def services_for(port: int, **overrides: object) -> Services:
    """The daemon's services with its resolver asking 127.0.0.1:``port`` only, and no content
    scanners (the DATA stage's other checks; tests/test_content_checks.py tests those)."""
    s = settings_mod.load("/dev/null", {
        "dns_servers": "127.0.0.1", "dns_port": port, "dns_timeout": 2.0,
        "primary_hostname": PRIMARY_HOSTNAME, "root": "/nonexistent", "clamd_socket": "",
        "spamd_host": ""})  # fmt: skip
    return Services.create(replace(s, **overrides))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def services(dns_server: DnsServer) -> Iterator[Services]:
    s = services_for(dns_server.port)
    yield s
    s.close()


@pytest.fixture(scope="module")
def snapshot() -> Snapshot:
    return TreeLoader(str(EXAMPLE), PRIMARY_HOSTNAME).refresh()[0]


BODY = b"Your account needs nothing.\r\n.a line with a leading dot\r\n\r\n"


def mail(from_: str = "PayPal <service@paypal.example>") -> bytes:
    """A message with CRLF line endings, as policy/message.py hands it over (Exim's
    Received header on top)."""
    head = (
        "Received: from client.example.net ([198.51.100.9]) by mail.example.org with esmtp "
        f"(Exim 4.96)\r\n\tid {EXIM_ID}\r\n"
        f"From: {from_}\r\nTo: alice@example.org\r\nSubject: Statement\r\n"
        f"Date: Tue, 01 Dec 2026 10:00:00 +0000\r\nMessage-ID: <{uuid.uuid4().hex}@x>\r\n"
    )
    return head.encode() + b"\r\n" + BODY


def sign(message: bytes, key: Key, domain: str = "paypal.example", selector: str = "sel",
         **options: object) -> bytes:  # fmt: skip
    """``message`` with a dkimpy signature prepended (as a signer's MTA would)."""
    header = dkim.sign(message, selector.encode(), domain.encode(), key.private,
                       linesep=b"\r\n", **options)  # fmt: skip
    return bytes(header) + message


def sign_without_from(message: bytes, key: Key, domain: str = "paypal.example") -> bytes:
    """A signature whose h= leaves From out. dkim.sign refuses to make one (RFC 6376 5.4), so
    this does what it does after that test, with dkimpy's own pieces."""
    signer = dkim.DKIM(message, linesep=b"\r\n")
    canon = dkim.CanonicalizationPolicy.from_c_value(b"relaxed/simple")
    signer.hasher = hashlib.sha256
    include = (b"to", b"subject")
    body_hash = base64.b64encode(hashlib.sha256(canon.canonicalize_body(signer.body)).digest())
    fields = [(b"v", b"1"), (b"a", b"rsa-sha256"), (b"c", b"relaxed/simple"),
              (b"d", domain.encode()), (b"s", b"sel"), (b"h", b" : ".join(include)),
              (b"bh", body_hash), (b"b", b"0" * 60)]  # fmt: skip
    pk = dkim.crypto.parse_pem_private_key(key.private)
    value = signer.gen_header(fields, list(include), canon, b"DKIM-Signature", pk)
    return b"DKIM-Signature: " + bytes(value) + message


def run(services: Services | None, snapshot: Snapshot, message: bytes | None,
        sender: str = "service@paypal.example", ip: str = OUTSIDER, auth: str = "",
        message_id: str = EXIM_ID) -> Result:  # fmt: skip
    ctx = Context("DATA", ip, sender, "", "client.example.net", auth, snapshot, Limits(),
                  message_id=message_id, size=len(message or b""), rcpt_count=1,
                  services=services)  # fmt: skip
    if message is not None:
        ctx.message = Message(message_id, message)
    return asyncio.run(check_dkim.check(ctx))


def code(result: Result) -> str:
    if result.verdict is None:
        return "250"
    return f"{result.verdict.status.code} {result.verdict.status.enhanced}"


def header(result: Result) -> str:
    (value,) = result.headers
    assert value.startswith(f"Authentication-Results: {PRIMARY_HOSTNAME};\n\t")
    # Printable ASCII, folded with LF + TAB only, and acceptable to the protocol's renderer.
    assert all(" " <= c <= "~" or c in "\n\t" for c in value)
    protocol.render_headers([value])
    return value


def results(result: Result) -> list[str]:
    """The dkim= results of the Authentication-Results header, in order."""
    return re.findall(r"dkim=(\w+)", header(result))


# --- pure parts ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("signer", "domain", "expected"),
    [
        ("paypal.example", "paypal.example", True),
        ("paypal.example", "service.paypal.example", True),  # a parent (relaxed)
        ("service.paypal.example", "paypal.example", False),  # a child never
        ("example", "paypal.example", False),  # never a bare TLD
        ("pal.example", "paypal.example", False),  # a suffix, not a parent
        ("", "paypal.example", False),
    ],
)
def test_alignment(signer: str, domain: str, expected: bool) -> None:
    assert check_dkim.aligned(signer, domain) is expected


def test_from_domains_every_address_of_every_from_field() -> None:
    block = (b"Received: from x\r\nFrom: A <a@One.Example>, b@two.example\r\n"
             b"From: =?utf-8?q?PayPal?=\r\n <service@paypal.example.>\r\n"
             b"From: undisclosed\r\nTo: c@three.example\r\n")  # fmt: skip
    assert check_dkim.from_domains(block) == ["one.example", "two.example", "paypal.example"]
    assert check_dkim.from_domains(b"To: c@three.example\r\n") == []


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        (b"From : a@PayPal.example", ["paypal.example"]),  # RFC 5322 obsolete syntax
        (b"From: x <a@b@paypal.example>", ["b", "paypal.example"]),  # unparseable: all count
        (b"From: a@paypal.example\\", ["paypal.example"]),  # stray quoting
        ("From: Bär <a@bär.example>".encode(), ["xn--br-via.example"]),  # SMTPUTF8: A-labels
        (b"From: undisclosed-recipients:;", []),
    ],
)
def test_from_domains_fail_closed(field: bytes, expected: list[str]) -> None:
    assert check_dkim.from_domains(b"Received: by x\r\n" + field + b"\r\nTo: b@c\r\n") == expected


# --- the check, branch by branch ------------------------------------------------------------


def test_valid_signature_of_a_required_domain_accepts_with_a_header(
    services: Services, snapshot: Snapshot, keys: dict[str, Key]
) -> None:
    result = run(services, snapshot, sign(mail(), keys["main"]))
    assert code(result) == "250"
    assert result.source == SOURCE
    assert "paypal.example (envelope sender and From" in result.note
    assert header(result) == (
        f"Authentication-Results: {PRIMARY_HOSTNAME};\n\tdkim=pass "
        "header.d=paypal.example header.s=sel header.a=rsa-sha256"
    )


def test_unsigned_mail_from_a_required_domain_is_refused(
    services: Services, snapshot: Snapshot
) -> None:
    result = run(services, snapshot, mail())
    assert code(result) == "550 5.7.20"
    assert result.verdict is not None
    assert result.verdict.text == "a valid DKIM signature of paypal.example is required"
    assert result.verdict.check == "dkim" and result.source == SOURCE
    assert "unsigned" in result.verdict.reason
    assert result.headers == ()  # a refusal adds nothing


def test_header_from_is_judged_whatever_the_envelope_says(
    services: Services, snapshot: Snapshot, keys: dict[str, Key]
) -> None:
    # A phisher's envelope sender is his own; the From the reader sees is PayPal's.
    forged = sign(mail(), keys["main"], domain="other.example")
    result = run(services, snapshot, forged, sender="bounce@other.example")
    assert code(result) == "550 5.7.20"
    assert result.verdict is not None
    assert "paypal.example (From, exim/conf/dkim_required:15)" in result.verdict.reason
    assert "d=other.example s=sel rsa-sha256 2048 bits: pass" in result.verdict.reason


def test_envelope_sender_is_judged_too(
    services: Services, snapshot: Snapshot, keys: dict[str, Key]
) -> None:
    # The seed's rule: the envelope sender's domain. From elsewhere does not excuse it.
    message = sign(mail(from_="news@other.example"), keys["main"], domain="other.example")
    result = run(services, snapshot, message, sender="service@paypal.example")
    assert code(result) == "550 5.7.20"
    assert result.verdict is not None and "envelope sender" in result.verdict.reason
    # ... and the same message with a signature of paypal.example besides passes.
    both = sign(message, keys["main"])
    assert code(run(services, snapshot, both)) == "250"


def test_every_from_domain_needs_its_signature(
    services: Services, snapshot: Snapshot, keys: dict[str, Key]
) -> None:
    message = sign(mail(from_="a@other.example, service@paypal.example"), keys["main"],
                   domain="other.example")  # fmt: skip
    result = run(services, snapshot, message, sender="a@other.example")
    assert code(result) == "550 5.7.20"


def test_obsolete_from_syntax_is_still_a_from(services: Services, snapshot: Snapshot) -> None:
    """``From :`` is a From to a mail program (RFC 5322 section 4.5), though the stdlib
    parser would not see it and dkimpy skips the line (it takes it for an mbox separator)."""
    message = mail().replace(b"From: PayPal", b"From : PayPal")
    result = run(services, snapshot, message, sender="bounce@other.example")
    assert code(result) == "550 5.7.20"
    assert result.verdict is not None
    assert "paypal.example (From, exim/conf/dkim_required:15)" in result.verdict.reason


def test_header_dkimpy_cannot_read_makes_every_signature_neutral(
    services: Services, snapshot: Snapshot, keys: dict[str, Key]
) -> None:
    # A header line that is neither a field nor a continuation: dkimpy refuses the message.
    message = sign(mail(), keys["main"]).replace(b"To: alice", b"To alice")
    result = run(services, snapshot, message)
    assert code(result) == "550 5.7.20"
    assert result.verdict is not None
    assert "neutral (malformed message header" in result.verdict.reason
    result = run(services, snapshot, message.replace(b"paypal.example", b"other.example"),
                 sender="a@other.example")  # fmt: skip
    assert code(result) == "250"
    assert results(result) == ["neutral"]


def test_parent_domain_signature_is_aligned(
    services: Services, snapshot: Snapshot, keys: dict[str, Key]
) -> None:
    message = sign(mail(from_="service@mail.paypal.example"), keys["main"])
    result = run(services, snapshot, message, sender="bounce@mail.paypal.example")
    assert code(result) == "250"
    assert result.source == WILD_SOURCE  # *.paypal.example
    # Unsigned, the subdomain is refused under the wildcard line.
    result = run(services, snapshot, mail(from_="service@mail.paypal.example"),
                 sender="bounce@mail.paypal.example")  # fmt: skip
    assert code(result) == "550 5.7.20" and result.source == WILD_SOURCE


@pytest.mark.parametrize(
    ("make", "result_word", "why"),
    [
        # RFC 8301: keys under 1024 bits and rsa-sha1 do not count, though they verify.
        (lambda k: sign(mail(), k["k512"], selector="small"), "policy", "RSA key of 512 bits"),
        (lambda k: sign(mail(), k["main"], signature_algorithm=b"rsa-sha1"), "policy",
         "rsa-sha1"),
        # l= covering less than the body: what follows is unsigned.
        (lambda k: sign(mail(), k["main"], length=True) + b"Click here: http://evil/\r\n",
         "policy", "l= does not cover the whole body"),
        (lambda k: sign_without_from(mail(), k["main"]), "policy", "From is not signed"),
        # The body was changed after signing.
        (lambda k: sign(mail(), k["main"]).replace(b"nothing", b"your password"), "fail",
         "body hash mismatch"),
        # A signed header was changed.
        (lambda k: sign(mail(), k["main"]).replace(b"Subject: Statement", b"Subject: Pay"),
         "fail", "signature does not verify"),
        # Keys that are not there or cannot be used: definite, so 550 (not 451).
        (lambda k: sign(mail(), k["main"], selector="missing"), "permerror", "no key"),
        (lambda k: sign(mail(), k["main"], selector="nodata"), "permerror", "no key"),
        (lambda k: sign(mail(), k["main"], selector="revoked"), "permerror", "unusable key"),
        (lambda k: sign(mail(), k["main"], selector="tls"), "permerror", "key not for email"),
        (lambda k: sign(mail(), k["main"], selector="k1024"), "fail",
         "signature does not verify"),  # the wrong key for the signature
        (lambda k: sign(mail(), k["main"], selector="a..b"), "permerror", "no valid key name"),
        (lambda k: b"DKIM-Signature: v=1; a=rsa-sha256; d=paypal.example; garbage\r\n"
         + mail(), "neutral", "malformed signature"),
        (lambda k: b"DKIM-Signature: v=1; a=rsa-sha256; d=paypal.example; s=sel; t=1; x=2; "
         b"h=from; bh=AAAA; b=AAAA\r\n" + mail(), "permerror", "signature expired"),
    ],
    ids=["512-bit-key", "rsa-sha1", "l=-short", "from-unsigned", "body-tampered",
         "header-tampered", "nxdomain", "nodata", "revoked", "tlsrpt-key", "wrong-key",
         "bad-key-name", "malformed", "expired"],
)  # fmt: skip
def test_invalid_signatures_do_not_count(
    services: Services, snapshot: Snapshot, keys: dict[str, Key],
    make: object, result_word: str, why: str,
) -> None:  # fmt: skip
    message = make(keys)  # type: ignore[operator]
    refused = run(services, snapshot, message)
    assert code(refused) == "550 5.7.20"
    assert refused.verdict is not None
    assert f": {result_word} ({why}" in refused.verdict.reason
    # With a valid signature added on top, the same message passes, and the header reports
    # the other signature as it is.
    result = run(services, snapshot, sign(message, keys["main"]))
    assert code(result) == "250"
    assert results(result) == ["pass", result_word]
    assert f'dkim={result_word} reason="{why}' in header(result)


def test_sig_results_in_the_header_for_mail_nobody_requires(
    services: Services, snapshot: Snapshot, keys: dict[str, Key]
) -> None:
    """Not required: the header reports each signature as it is (fail, policy ...)."""
    base = mail(from_="news@other.example")
    cases = {
        "pass": sign(base, keys["main"], domain="other.example"),
        "fail": sign(base, keys["main"], domain="other.example").replace(b"nothing", b"x"),
        "policy": sign(base, keys["main"], domain="other.example", length=True) + b"more\r\n",
        "none": base,
    }
    for word, message in cases.items():
        result = run(services, snapshot, message, sender="news@other.example")
        assert code(result) == "250", word
        assert results(result) == [word], word


def test_l_tag_covering_the_whole_body_counts(
    services: Services, snapshot: Snapshot, keys: dict[str, Key]
) -> None:
    result = run(services, snapshot, sign(mail(), keys["main"], length=True))
    assert code(result) == "250" and results(result) == ["pass"]


def test_1024_bit_key_counts(services: Services, snapshot: Snapshot, keys: dict[str, Key]) -> None:
    result = run(services, snapshot, sign(mail(), keys["k1024"], selector="k1024"))
    assert code(result) == "250"
    assert "1024 bits: pass" in result.note


def test_ed25519_without_support_is_neutral(services: Services, snapshot: Snapshot) -> None:
    """dkimpy verifies Ed25519 (RFC 8463) only with PyNaCl; without it the signature cannot
    be processed (neutral), with it this made-up signature fails. It never counts."""
    forged = (
        b"DKIM-Signature: v=1; a=ed25519-sha256; c=relaxed/simple; d=paypal.example; "
        b"s=ed; h=from:to:subject; bh=" + b"A" * 44 + b"; b=" + b"A" * 88 + b"\r\n"
    )
    result = run(services, snapshot, forged + mail())
    assert code(result) == "550 5.7.20"
    assert result.verdict is not None
    if importlib.util.find_spec("nacl") is None:
        assert "ed25519-sha256: neutral (ed25519 not supported here" in result.verdict.reason
    else:
        assert "ed25519-sha256 256 bits: fail" in result.verdict.reason


def test_one_valid_signature_among_bad_ones_is_enough(
    services: Services, snapshot: Snapshot, keys: dict[str, Key]
) -> None:
    good = sign(mail(), keys["main"])
    message = sign(sign(good, keys["main"], selector="missing"), keys["k512"], selector="small")
    result = run(services, snapshot, message)
    assert code(result) == "250"
    assert results(result) == ["policy", "permerror", "pass"]  # topmost first


def test_temporary_key_failure_defers_never_refuses(
    services: Services, snapshot: Snapshot, keys: dict[str, Key]
) -> None:
    """broken.paypal.example answers SERVFAIL: its signature may be the valid one."""
    from_ = "service@broken.paypal.example"
    message = sign(mail(from_=from_), keys["main"], domain="broken.paypal.example")
    result = run(services, snapshot, message, sender=from_)
    assert code(result) == "451 4.4.3"
    assert result.verdict is not None and "key lookup failed" in result.verdict.reason
    assert result.source == WILD_SOURCE
    # With a valid aligned signature besides (d=paypal.example, a parent): accepted, and the
    # header says which one could not be checked.
    both = sign(message, keys["main"])
    result = run(services, snapshot, both, sender=from_)
    assert code(result) == "250"
    assert results(result) == ["pass", "temperror"]
    # A definite failure besides the temporary one does not make it a 550 either.
    bad = sign(message, keys["main"], selector="missing")
    assert code(run(services, snapshot, bad, sender=from_)) == "451 4.4.3"
    # Not required: accepted, with temperror in the header.
    free = sign(mail(from_="a@other.example"), keys["main"], domain="broken.paypal.example")
    result = run(services, snapshot, free, sender="a@other.example")
    assert code(result) == "250" and results(result) == ["temperror"]


def test_dns_server_down_defers(keys: dict[str, Key], snapshot: Snapshot) -> None:
    with DnsServer() as dead:
        dead.stop()  # nothing listens on its port any more
        services = services_for(dead.port, dns_timeout=0.5)
        try:
            result = run(services, snapshot, sign(mail(), keys["main"]))
            assert code(result) == "451 4.4.3"
            # Unsigned needs no lookup: a definite 550 even with DNS down.
            assert code(run(services, snapshot, mail())) == "550 5.7.20"
        finally:
            services.close()


def test_dkim_timeout_bounds_the_check(keys: dict[str, Key], snapshot: Snapshot) -> None:
    # A DNS server that takes the queries and never answers: only dkim_timeout ends the wait.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        services = services_for(silent.getsockname()[1], dns_timeout=10.0, dkim_timeout=0.3)
        try:
            started = time.monotonic()
            result = run(services, snapshot, sign(mail(), keys["main"]))
            assert time.monotonic() - started < 2.0
            assert code(result) == "451 4.4.3"
            assert result.verdict is not None and "timed out" in result.verdict.reason
            other = sign(mail(from_="a@other.example"), keys["main"], domain="other.example")
            result = run(services, snapshot, other, sender="a@other.example")
            assert code(result) == "250"
            assert 'dkim=temperror reason="timed out"' in header(result)
        finally:
            services.close()


def test_many_signatures_aligned_ones_first(
    services: Services, snapshot: Snapshot, keys: dict[str, Key]
) -> None:
    """At most MAX_SIGNATURES are evaluated; a flood of others cannot hide the one that
    counts (it is evaluated first) nor blow up the header."""
    message = sign(mail(), keys["main"])  # the valid one ends up at the bottom
    for n in range(check_dkim.MAX_SIGNATURES + 2):
        message = sign(message, keys["main"], domain="other.example", selector=f"s{n}")
    result = run(services, snapshot, message)
    assert code(result) == "250"
    assert len(results(result)) == check_dkim.MAX_SIGNATURES
    assert "3 more signatures not evaluated" in result.note
    assert "pass" in results(result)


def test_hostile_signature_values_stay_out_of_the_header(
    services: Services, snapshot: Snapshot
) -> None:
    forged = (
        b'DKIM-Signature: v=1; a=rsa-sha256; d=pay"pal.example; s=x y\x01z; '
        b"h=from; bh=AAAA; b=AAAA\r\n"
    )
    result = run(services, snapshot, forged + mail(from_="a@other.example"),
                 sender="a@other.example")  # fmt: skip
    assert code(result) == "250"
    value = header(result)
    assert "header.d" not in value and "header.s" not in value and '"pal' not in value


# --- when the check does not run, or cannot --------------------------------------------------


def test_skips(services: Services, snapshot: Snapshot, dns_server: DnsServer) -> None:
    unsigned = mail()
    # mailpolicy explain without --network
    assert run(None, snapshot, unsigned).note == "not run (no network)"
    off = services_for(dns_server.port, dkim_enabled=False)
    try:
        result = run(off, snapshot, unsigned)
        assert (code(result), result.headers) == ("250", ())
        assert result.note == "DKIM checks are off (dkim_enabled = false)"
    finally:
        off.close()
    # Our own users' and hosts' outgoing mail: not checked, no header.
    result = run(services, snapshot, unsigned, auth="alice@example.org")
    assert (code(result), result.headers) == ("250", ())
    assert result.note == "not checked: authenticated user 'alice@example.org'"
    result = run(services, snapshot, unsigned, ip=RELAY_CLIENT)
    assert (code(result), result.headers) == ("250", ())
    assert result.source == "exim/conf/relay_from_hosts:14"


def test_unavailable_list_or_message_defers(services: Services, snapshot: Snapshot) -> None:
    broken = replace(snapshot, lists={**snapshot.lists, "dkim_required": Loaded(
        "exim/conf/dkim_required", None, "exim/conf/dkim_required: cannot read")})  # fmt: skip
    result = run(services, broken, mail())
    assert code(result) == "451 4.3.0"
    assert result.verdict is not None and "cannot read" in result.verdict.reason
    # The message file is not where Exim should have put it: our trouble, 451 4.3.0.
    result = run(services, snapshot, None)
    assert code(result) == "451 4.3.0"
    assert result.verdict is not None and "no such file" in result.verdict.reason


def test_through_the_pipeline(services: Services, snapshot: Snapshot, keys: dict[str, Key]) -> None:
    ctx = Context("DATA", OUTSIDER, "service@paypal.example", "", "client.example.net", "",
                  snapshot, Limits(), message_id=EXIM_ID, services=services)  # fmt: skip
    ctx.message = Message(EXIM_ID, sign(mail(), keys["main"]))
    verdict = asyncio.run(evaluate_async(ctx))
    assert verdict.status.prefix == "ACCEPT 250 2.0.0 " and "dkim: " in verdict.reason
    assert verdict.headers and "dkim=pass" in verdict.headers[0]
    assert protocol.render_verdict(verdict).startswith(b"ACCEPT 250 2.0.0 ok\t")


# --- a second, independent signer: Exim's own DKIM signing ----------------------------------

SIGNER_CONF = """\
# A signing Exim: a local submission is delivered at once by an smtp transport that signs it.
primary_hostname = signer.paypal.example
qualify_domain = paypal.example
spool_directory = {base}/spool
log_file_path = {base}/log/%slog
pid_file_path = {base}/log/exim.pid
host_lookup =
rfc1413_hosts =
keep_environment =
never_users = root
begin routers
sink:
  driver = manualroute
  route_list = * 127.0.0.1 byname
  self = send
  transport = signing_smtp
begin transports
signing_smtp:
  driver = smtp
  port = {port}
  hosts_avoid_tls = *
  dkim_domain = paypal.example
  dkim_selector = exim
  dkim_private_key = {base}/dkim.key
  dkim_canon = relaxed
begin retry
*  *  F,1m,1m
"""


@pytest.fixture(scope="module")
def exim_signed(keys: dict[str, Key]) -> bytes:
    """A message signed by Exim 4.96 (its transport's dkim_* options), as a remote MTA
    receives it: captured by an aiosmtpd sink on loopback."""
    base = Path(tempfile.mkdtemp(prefix="sig.", dir="/tmp"))
    os.chmod(base, 0o755)  # Debian-exim must traverse it
    sink = Sink()
    port = free_port()
    controller = Controller(sink, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        for sub in ("spool", "log"):
            (base / sub).mkdir()
            shutil.chown(base / sub, "Debian-exim", "Debian-exim")
        # The transport runs as Debian-exim (the -C config costs root, RECIPES.md 2).
        shutil.copy(keys["exim"].path, base / "dkim.key")
        shutil.chown(base / "dkim.key", "Debian-exim", "Debian-exim")
        os.chmod(base / "dkim.key", 0o600)
        conf = base / "exim.conf"
        conf.write_text(SIGNER_CONF.format(base=base, port=port))
        message = mail().split(b"\r\n", 2)[2]  # without our made-up Received header
        submitted = subprocess.run(
            [EXIM, "-C", str(conf), "-odi", "-oi", "-f", "service@paypal.example",
             "alice@example.org"], input=message.replace(b"\r\n", b"\n"), capture_output=True,
            timeout=30)  # fmt: skip
        assert submitted.returncode == 0, submitted.stderr
        deadline = time.monotonic() + 20
        while not sink.messages and time.monotonic() < deadline:
            time.sleep(0.02)
        log = (base / "log" / "mainlog").read_text() if (base / "log" / "mainlog").exists() else ""
        assert sink.messages, f"Exim delivered nothing: {log}"
        content = sink.messages[0][2]
    finally:
        controller.stop()
        shutil.rmtree(base, ignore_errors=True)
    content = content.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    assert content.startswith(b"DKIM-Signature: ") and b"s=exim" in content[:400]
    return content


def test_exim_signed_message_passes_and_fails_tampered(
    services: Services, snapshot: Snapshot, exim_signed: bytes
) -> None:
    result = run(services, snapshot, exim_signed)
    assert code(result) == "250"
    assert "header.d=paypal.example header.s=exim header.a=rsa-sha256" in header(result)
    tampered = exim_signed.replace(b"nothing", b"a transfer")
    result = run(services, snapshot, tampered)
    assert code(result) == "550 5.7.20"
    assert result.verdict is not None and "body hash mismatch" in result.verdict.reason


# --- through the real Exim and the real daemon ------------------------------------------------


@pytest.fixture(scope="module")
def stack(dns_server: DnsServer) -> Iterator[Stack]:
    """The daemon with DKIM on and the test DNS server (tests/offline.toml has it off)."""
    config = {"dkim_enabled": True, "dns_servers": dns_server.address,
              "dns_port": dns_server.port, "dns_timeout": 2.0}  # fmt: skip
    with exim_stack(policy_config=config) as s:
        yield s


def send(stack: Stack, sender: str, message: bytes) -> tuple[int, bytes]:
    """DATA's answer for ``message`` from an outside client (127.0.0.2) to alice."""
    with stack.smtp() as client:
        assert client.mail(sender)[0] == 250
        assert client.rcpt("alice@example.org")[0] == 250
        try:
            return client.data(message)
        except smtplib.SMTPDataError as e:
            error = e.smtp_error
            return e.smtp_code, error if isinstance(error, bytes) else error.encode()


def marked(message: bytes) -> tuple[bytes, str]:
    mark = f"m-{uuid.uuid4().hex[:12]}"
    return message.replace(b"Subject: Statement", f"Subject: {mark}".encode()), mark


def delivered_header(stack: Stack, mark: str) -> str:
    text = stack.wait_maildir("example.org", "alice", mark).decode()
    (value,) = re.findall(r"^Authentication-Results: .*(?:\n[ \t].*)*", text, re.M)
    return str(value)


def test_exim_accepts_a_valid_signature_and_delivers_the_header(
    stack: Stack, keys: dict[str, Key]
) -> None:
    message, mark = marked(mail())
    code_, text = send(stack, "service@paypal.example", sign(message, keys["main"]))
    assert code_ == 250, text
    value = delivered_header(stack, mark)
    assert value.startswith(f"Authentication-Results: {PRIMARY_HOSTNAME};")
    assert "dkim=pass header.d=paypal.example header.s=sel" in value


def test_exim_refuses_unsigned_mail_from_a_required_domain(stack: Stack) -> None:
    message, mark = marked(mail())
    code_, text = send(stack, "service@paypal.example", message)
    assert (code_, text) == (550, b"5.7.20 a valid DKIM signature of paypal.example is required")
    assert not [m for m in stack.maildir("example.org", "alice") if mark.encode() in m]


def test_exim_defers_on_a_key_lookup_servfail(stack: Stack, keys: dict[str, Key]) -> None:
    from_ = "service@broken.paypal.example"
    message, _ = marked(mail(from_=from_))
    code_, text = send(stack, from_, sign(message, keys["main"], domain="broken.paypal.example"))
    assert code_ == 451 and text.startswith(b"4.4.3 "), text


def test_exim_accepts_unsigned_mail_from_elsewhere_with_dkim_none(stack: Stack) -> None:
    message, mark = marked(mail(from_="friend@other.example"))
    code_, text = send(stack, "friend@other.example", message)
    assert code_ == 250, text
    assert delivered_header(stack, mark) == (
        f"Authentication-Results: {PRIMARY_HOSTNAME};\n\tdkim=none"
    )


def test_exim_signed_message_through_exim(stack: Stack, exim_signed: bytes) -> None:
    """The independent signer's message, relayed on to us: accepted; tampered: refused."""
    mark = f"m-{uuid.uuid4().hex[:12]}"
    # An unsigned header of ours to find it by (Exim's signature does not cover X- fields).
    message = exim_signed.replace(b"\r\n\r\n", f"\r\nX-Mark: {mark}\r\n\r\n".encode(), 1)
    code_, text = send(stack, "service@paypal.example", message)
    assert code_ == 250, text
    assert "dkim=pass header.d=paypal.example header.s=exim" in delivered_header(stack, mark)
    tampered = message.replace(b"nothing", b"a transfer")
    code_, text = send(stack, "service@paypal.example", tampered)
    assert code_ == 550 and text.startswith(b"5.7.20 "), text
