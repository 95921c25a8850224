"""SPF at MAIL (policy/checks/spf.py) against a real authoritative DNS server (NSD on a loopback
port, tests/dns_server.py): every result, what each becomes by default and when configured to
reject, the Received-SPF header, the clients that skip, DNS trouble as 451 (never 5xx), and the
same through the daemon's socket.

Client addresses are documentation addresses (203.0.113.0/24 is "permitted" in the zones,
198.51.100.9 is not): they are only ever compared with the records, never contacted.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from policy import settings as settings_mod
from policy.aliases import Limits
from policy.checks import Context, Result, spf
from policy.mailtree import Snapshot, TreeLoader
from policy.protocol import encode_request
from policy.services import Services
from tests.conftest import EXAMPLE, PRIMARY_HOSTNAME, Daemon
from tests.dns_server import DnsServer

pytestmark = pytest.mark.integration

GOOD_IP, BAD_IP = "203.0.113.5", "198.51.100.9"
ZONES = {
    "pass.test": ['@ TXT "v=spf1 ip4:203.0.113.0/24 -all"',
                  'helo TXT "v=spf1 ip4:203.0.113.0/24 -all"'],
    "soft.test": ['@ TXT "v=spf1 ip4:203.0.113.0/24 ~all"'],
    "neutral.test": ['@ TXT "v=spf1 ip4:203.0.113.0/24 ?all"'],
    "none.test": ["@ A 192.0.2.1"],  # exists, no SPF record
    "perm.test": ['@ TXT "v=spf1 ip4:203.0.113.0/24 bogus:x -all"'],  # unknown mechanism
    "inc.test": ['@ TXT "v=spf1 include:pass.test -all"'],
    "incbroken.test": ['@ TXT "v=spf1 include:broken.test -all"'],
}  # fmt: skip


@pytest.fixture(scope="module")
def dns_server() -> Iterator[DnsServer]:
    with DnsServer() as server:
        for origin, records in ZONES.items():
            server.set_zone(origin, records)
        server.break_zone("broken.test")  # SERVFAIL for everything in it
        yield server


def services_for(server: DnsServer, **overrides: object) -> Services:
    s = settings_mod.load(
        "/dev/null",
        {"dns_servers": server.address, "dns_port": server.port, "dns_timeout": 2.0,
         "primary_hostname": PRIMARY_HOSTNAME},
    )  # fmt: skip
    return Services.create(replace(s, **overrides))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def snapshot() -> Snapshot:
    return TreeLoader(str(EXAMPLE), PRIMARY_HOSTNAME).refresh()[0]


def run(services: Services, snapshot: Snapshot, sender: str, ip: str = GOOD_IP,
        helo: str = "client.test", auth: str = "") -> Result:  # fmt: skip
    ctx = Context("MAIL", ip, sender, "", helo, auth, snapshot, Limits(), services=services)
    return asyncio.run(spf.check(ctx))


def code(result: Result) -> int:
    return 250 if result.verdict is None else result.verdict.status.code


@pytest.mark.parametrize(
    ("sender", "ip", "expected", "word"),
    [
        ("a@pass.test", GOOD_IP, 250, "pass"),
        ("a@Pass.TEST", GOOD_IP, 250, "pass"),  # domains are case-insensitive
        ("a@pass.test", BAD_IP, 550, "fail"),
        ("a@inc.test", GOOD_IP, 250, "pass"),  # through include:
        ("a@inc.test", BAD_IP, 550, "fail"),
        ("a@soft.test", BAD_IP, 250, "softfail"),  # RFC 7208 8.5: not rejected by default
        ("a@neutral.test", BAD_IP, 250, "neutral"),
        ("a@none.test", BAD_IP, 250, "none"),
        ("a@nx.none.test", BAD_IP, 250, "none"),  # NXDOMAIN: no SPF record
        ("a@perm.test", BAD_IP, 250, "permerror"),  # a broken record: local policy, accept
        ("a@broken.test", GOOD_IP, 451, "temperror"),  # SERVFAIL
        ("a@incbroken.test", GOOD_IP, 451, "temperror"),  # SERVFAIL inside an include
    ],
)
def test_results_and_default_actions(
    dns_server: DnsServer, snapshot: Snapshot, sender: str, ip: str, expected: int, word: str
) -> None:  # fmt: skip
    services = services_for(dns_server)
    result = run(services, snapshot, sender, ip)
    assert code(result) == expected, result
    if expected == 550:
        assert result.verdict is not None
        assert result.verdict.status.enhanced == "5.7.23"
        assert "SPF check failed" in result.verdict.text
    elif expected == 451:
        assert result.verdict is not None and result.verdict.status.enhanced == "4.4.3"
        assert f"SPF {word}" in result.verdict.reason
    else:
        (header,) = result.headers
        assert header.startswith(f"Received-SPF: {word}") or header.lower().startswith(
            f"received-spf: {word}"
        ), header
        assert f"client-ip={ip};" in header
        assert f"SPF {word} " in result.note


@pytest.mark.parametrize(
    ("setting", "sender", "enhanced"),
    [
        ("spf_softfail", "a@soft.test", "5.7.23"),
        ("spf_neutral", "a@neutral.test", "5.7.23"),
        ("spf_none", "a@none.test", "5.7.23"),
        ("spf_permerror", "a@perm.test", "5.7.24"),
    ],
)
def test_reject_when_configured(
    dns_server: DnsServer, snapshot: Snapshot, setting: str, sender: str, enhanced: str
) -> None:  # fmt: skip
    services = services_for(dns_server, **{setting: "reject"})
    result = run(services, snapshot, sender, BAD_IP)
    assert result.verdict is not None
    assert (result.verdict.status.code, result.verdict.status.enhanced) == (550, enhanced)
    # ... and only that result: a pass is still a pass.
    assert code(run(services, snapshot, "a@pass.test", GOOD_IP)) == 250


def test_null_sender_is_checked_as_postmaster_at_helo(
    dns_server: DnsServer, snapshot: Snapshot
) -> None:
    services = services_for(dns_server)
    good = run(services, snapshot, "", GOOD_IP, helo="helo.pass.test")
    assert code(good) == 250
    assert "domain of helo.pass.test" in good.headers[0] and "identity=helo" in good.headers[0]
    bad = run(services, snapshot, "", BAD_IP, helo="helo.pass.test")
    assert code(bad) == 550


@pytest.mark.parametrize(
    ("ip", "auth", "why"),
    [
        ("127.0.0.1", "", "localhost"),
        ("", "", "local submission"),
        ("192.0.2.7", "", "relay_from_hosts"),  # in the example tree's relay_from_hosts
        (BAD_IP, "bob@example.org", "authenticated"),
    ],
)
def test_trusted_clients_skip(
    dns_server: DnsServer, snapshot: Snapshot, ip: str, auth: str, why: str
) -> None:
    result = run(services_for(dns_server), snapshot, "a@pass.test", ip, auth=auth)
    assert result.verdict is None and result.headers == ()
    assert result.note.startswith("not checked") and why in result.note


def test_secondary_mx_skips(dns_server: DnsServer, snapshot: Snapshot) -> None:
    services = services_for(dns_server, secondary_mx_hosts="198.51.100.8/29 2001:db8::25")
    result = run(services, snapshot, "a@pass.test", BAD_IP)
    assert result.verdict is None and "secondary MX" in result.note
    # Not in the list: checked (and fails).
    assert code(run(services, snapshot, "a@pass.test", "198.51.100.99")) == 550


def test_off(dns_server: DnsServer, snapshot: Snapshot) -> None:
    result = run(services_for(dns_server, spf_enabled=False), snapshot, "a@pass.test", BAD_IP)
    assert result.verdict is None and "off" in result.note


def test_dead_dns_is_a_temporary_failure(dns_server: DnsServer, snapshot: Snapshot) -> None:
    services = services_for(dns_server, dns_timeout=0.5)
    dns_server.stop()
    try:
        result = run(services, snapshot, "a@pass.test", BAD_IP)
    finally:
        dns_server.start()
    assert result.verdict is not None
    assert (result.verdict.status.code, result.verdict.status.enhanced) == (451, "4.4.3")


# --- through the daemon ---------------------------------------------------------------------


def test_through_the_daemon(
    dns_server: DnsServer, start_daemon: Callable[..., Daemon], tree: Path
) -> None:
    d = start_daemon(tree, config={"spf_enabled": True, "dns_servers": dns_server.address,
                                   "dns_port": dns_server.port})  # fmt: skip

    def mail(sender: str, ip: str) -> bytes:
        reply: bytes = d.ask(encode_request("MAIL", ip=ip, sender=sender, helo="client.test"))
        return reply

    ok = mail("a@pass.test", GOOD_IP)
    assert ok.startswith(b"ACCEPT 250 2.1.0 ok\t"), ok
    headers = base64.b64decode(ok.split(b"\t", 1)[1].strip()).decode()
    assert headers.startswith("Received-SPF: Pass ") or headers.startswith("Received-SPF: pass")
    assert "\r" not in headers and "\n" not in headers
    assert mail("a@pass.test", BAD_IP).startswith(b"DENY 550 5.7.23 SPF check failed")
    assert mail("a@broken.test", GOOD_IP).startswith(b"DEFER 451 4.4.3 ")
    # The callout is off in tests/offline.toml; the log names SPF's result.
    with contextlib.suppress(Exception):
        d.stop()
    log = d.log_text()
    assert "check=spf" in log and 'verdict="DENY 550 5.7.23"' in log
