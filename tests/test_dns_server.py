"""tests/dns_server.py: NSD on loopback answers what the tests' zones say - answers, NXDOMAIN,
NODATA, long DKIM TXT records, SERVFAIL for a broken zone, nothing at all when stopped - and a
change is visible as soon as set_zone returns. One server per module (per xdist worker)."""

from __future__ import annotations

import base64
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.resolver
import pytest

from tests.dns_server import DnsServer, txt

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server() -> Iterator[DnsServer]:
    with DnsServer() as s:
        yield s


@pytest.fixture
def resolver(server: DnsServer) -> dns.resolver.Resolver:
    return server.resolver(timeout=1.0)


def texts(answer: dns.resolver.Answer) -> list[str]:
    return sorted(rdata.to_text() for rdata in answer)


def rcode(server: DnsServer, name: str, rdtype: str = "A") -> str:
    query = dns.message.make_query(name, rdtype)
    reply = dns.query.udp(query, server.address, port=server.port, timeout=1.0)
    return dns.rcode.to_text(reply.rcode())


def dkim_value() -> str:
    """A DKIM key record for a fresh 2048-bit RSA key: 392 base64 characters of key, so the
    value is longer than one TXT string may be."""
    pem = subprocess.run(
        ["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
        capture_output=True,
        check=True,
    ).stdout
    der = subprocess.run(
        ["openssl", "pkey", "-pubout", "-outform", "DER"],
        input=pem,
        capture_output=True,
        check=True,
    ).stdout
    return "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode()


def test_a_mx_txt_answers(server: DnsServer, resolver: dns.resolver.Resolver) -> None:
    server.set_zone(
        "answers.test",
        [
            "@ MX 10 mx1",
            "@ MX 20 mx2.answers.test.",  # absolute names work too
            "mx1 A 127.0.0.5",
            "mx2.answers.test. 300 IN A 127.0.0.6",
            '@ TXT "v=spf1 ip4:127.0.0.0/8 -all"',
            'sel._domainkey TXT ( "v=DKIM1; k=rsa; "\n "p=MIIB" )',
        ],
    )
    assert texts(resolver.resolve("answers.test", "MX")) == [
        "10 mx1.answers.test.",
        "20 mx2.answers.test.",
    ]
    assert texts(resolver.resolve("mx1.answers.test", "A")) == ["127.0.0.5"]
    mx2 = resolver.resolve("mx2.answers.test", "A")
    assert texts(mx2) == ["127.0.0.6"]
    assert mx2.rrset is not None and mx2.rrset.ttl == 300
    assert texts(resolver.resolve("answers.test", "TXT")) == ['"v=spf1 ip4:127.0.0.0/8 -all"']
    dkim = resolver.resolve("sel._domainkey.answers.test", "TXT")
    assert [b"".join(rdata.strings) for rdata in dkim] == [b"v=DKIM1; k=rsa; p=MIIB"]
    # Added by set_zone, with the default TTL 0 (no cache keeps old data).
    soa = resolver.resolve("answers.test", "SOA")
    assert soa.rrset is not None and soa.rrset.ttl == 0
    assert texts(resolver.resolve("answers.test", "NS")) == ["ns.answers.test."]
    assert texts(resolver.resolve("ns.answers.test", "A")) == ["127.0.0.1"]


def test_missing_name_is_nxdomain(server: DnsServer, resolver: dns.resolver.Resolver) -> None:
    server.set_zone("nx.test", ["www A 127.0.0.5"])
    with pytest.raises(dns.resolver.NXDOMAIN):
        resolver.resolve("nothere.nx.test", "A")


def test_missing_type_is_nodata(server: DnsServer, resolver: dns.resolver.Resolver) -> None:
    server.set_zone("nodata.test", ["www A 127.0.0.5"])
    with pytest.raises(dns.resolver.NoAnswer):
        resolver.resolve("www.nodata.test", "MX")
    with pytest.raises(dns.resolver.NoAnswer):
        resolver.resolve("nodata.test", "MX")  # the apex has only SOA and NS


def test_change_is_seen_when_set_zone_returns(
    server: DnsServer, resolver: dns.resolver.Resolver
) -> None:
    serials = []
    for i in range(5):
        serials.append(server.set_zone("change.test", [f"www A 127.0.1.{i}"]))
        # Every query, not just the first: during a reload NSD's old server process still
        # answers from the shared socket (tests/dns_server.py waits until it has gone).
        for _ in range(20):
            assert texts(resolver.resolve("www.change.test", "A")) == [f"127.0.1.{i}"]
    assert serials == sorted(set(serials))
    assert server.timings["set_zone"] < 2.0  # 10-40 ms measured; loose for loaded CI


def test_long_txt_record_is_answered_intact(
    server: DnsServer, resolver: dns.resolver.Resolver
) -> None:
    value = dkim_value()
    assert len(value) > 255
    server.set_zone("dkim.test", [f"sel._domainkey TXT {txt(value)}"])
    answer = resolver.resolve("sel._domainkey.dkim.test", "TXT")
    (rdata,) = answer
    assert all(len(s) <= 255 for s in rdata.strings)
    assert b"".join(rdata.strings) == value.encode()
    # Over TCP as well (what a resolver falls back to when a UDP answer is truncated).
    query = dns.message.make_query("sel._domainkey.dkim.test", "TXT")
    reply = dns.query.tcp(query, server.address, port=server.port, timeout=1.0)
    assert b"".join(reply.answer[0][0].strings) == value.encode()


def test_txt_splits_and_escapes() -> None:
    assert txt("short") == '"short"'
    assert txt("") == '""'
    assert txt("a" * 255) == '"' + "a" * 255 + '"'
    assert txt("a" * 256) == '"' + "a" * 255 + '" "a"'
    assert txt('say "hi" \\ ok') == r'"say \"hi\" \\ ok"'
    assert txt("é\n") == r'"\195\169\010"'


def test_txt_special_characters_round_trip(
    server: DnsServer, resolver: dns.resolver.Resolver
) -> None:
    value = 'quote " backslash \\ semicolon ; paren ( ' + "x" * 300
    server.set_zone("escape.test", [f"t TXT {txt(value)}"])
    (rdata,) = resolver.resolve("t.escape.test", "TXT")
    assert b"".join(rdata.strings) == value.encode()


def test_callers_soa_and_ns_are_kept(server: DnsServer, resolver: dns.resolver.Resolver) -> None:
    serial = server.set_zone(
        "own.test",
        [
            "@ SOA ns1.elsewhere.test. admin.own.test. 7000 3600 600 86400 60",
            "@ NS ns1.elsewhere.test.",
            "www A 127.0.0.5",
        ],
    )
    assert serial == 7000
    assert texts(resolver.resolve("own.test", "NS")) == ["ns1.elsewhere.test."]
    with pytest.raises(dns.resolver.NXDOMAIN):
        resolver.resolve("ns.own.test", "A")
    # The next automatic serial is higher still, so it is seen as a change.
    assert server.set_zone("own.test", ["www A 127.0.0.6"]) > 7000
    with pytest.raises(ValueError, match="serial"):
        server.set_zone("own.test", ["@ SOA ns hostmaster 5 3600 600 86400 60"])


def test_bad_records_raise(server: DnsServer) -> None:
    with pytest.raises(ValueError, match="txt"):
        server.set_zone("bad.test", ['k TXT "' + "a" * 300 + '"'])
    with pytest.raises(ValueError, match="BOGUS"):
        server.set_zone("bad.test", ["k BOGUS 1"])
    with pytest.raises(ValueError):
        server.set_zone("bad.test", ["out.of.zone.test. A 127.0.0.1"])
    # dnspython knows WALLET (2024); NSD 4.6 does not, and says so.
    with pytest.raises(ValueError, match=r"nsd-checkzone.*unrecognized RR type 'WALLET'"):
        server.set_zone("bad.test", ['k WALLET "x"'])
    assert "bad.test." not in server.zones


def test_break_zone_answers_servfail(server: DnsServer, resolver: dns.resolver.Resolver) -> None:
    server.set_zone("broken.test", ["www A 127.0.0.5"])
    server.break_zone("broken.test")
    assert rcode(server, "www.broken.test") == "SERVFAIL"
    assert rcode(server, "nothere.broken.test", "MX") == "SERVFAIL"
    # dnspython's resolver calls SERVFAIL from every server NoNameservers (policy/dns.py: a
    # temporary failure).
    with pytest.raises(dns.resolver.NoNameservers, match="SERVFAIL"):
        resolver.resolve("www.broken.test", "A")
    server.set_zone("broken.test", ["www A 127.0.0.6"])
    assert texts(resolver.resolve("www.broken.test", "A")) == ["127.0.0.6"]
    # A zone that never had data can be broken too.
    server.break_zone("never.test")
    assert rcode(server, "never.test", "SOA") == "SERVFAIL"


def test_remove_zone(server: DnsServer) -> None:
    server.set_zone("gone.test", ["www A 127.0.0.5"])
    assert rcode(server, "www.gone.test") == "NOERROR"
    server.remove_zone("gone.test")
    assert rcode(server, "www.gone.test") == "REFUSED"
    assert not server.zone_file("gone.test").exists()
    with pytest.raises(KeyError):
        server.remove_zone("gone.test")


def test_stopped_server_times_out_then_answers_again(
    server: DnsServer, resolver: dns.resolver.Resolver
) -> None:
    server.set_zone("restart.test", ["www A 127.0.0.5"])
    query = dns.message.make_query("www.restart.test", "A")
    dns.query.tcp(query, server.address, port=server.port, timeout=1.0)  # a TCP connection too
    port = server.port
    server.stop()
    try:
        assert not server.running
        resolver.lifetime = resolver.timeout = 0.3
        with pytest.raises(dns.exception.Timeout):
            resolver.resolve("www.restart.test", "A")
        with pytest.raises(ConnectionRefusedError):
            dns.query.tcp(query, server.address, port=port, timeout=1.0)
        # Changes while stopped only write files; start() serves them.
        server.set_zone("restart.test", ["www A 127.0.0.6"])
    finally:
        server.start()
    assert server.port == port
    resolver.lifetime = resolver.timeout = 1.0
    assert texts(resolver.resolve("www.restart.test", "A")) == ["127.0.0.6"]
    reply = dns.query.tcp(query, server.address, port=port, timeout=1.0)
    assert dns.rcode.to_text(reply.rcode()) == "NOERROR"
    assert server.timings["start"] < 2.0 and server.timings["stop"] < 2.0


def test_close_leaves_nothing_behind() -> None:
    with DnsServer() as s:
        s.set_zone("close.test", ["www A 127.0.0.5"])
        directory, pid = s.directory, s.pid
        assert pid is not None and Path(f"/proc/{pid}").exists()
    assert not directory.exists()
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()
    # The port is free again.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind((s.address, s.port))


def test_taken_port_gives_a_clear_error() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", 0))
        port = udp.getsockname()[1]
        with pytest.raises(RuntimeError, match="Address already in use"), DnsServer(port=port):
            pass
