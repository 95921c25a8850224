"""Sender-verify callouts (policy/callout.py) against a real authoritative DNS server (NSD,
tests/dns_server.py) and scripted aiosmtpd peers on loopback addresses (tests/smtp_peers.py),
then through the daemon's socket (policy/checks/sender_verify.py decides the verdicts).

Every address in the zones is a loopback address: nothing else is ever contacted. The tests of
the default setting (``callout_allow_private`` off) put a listening peer behind the MX and
assert it saw no connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from policy import dns as mpdns
from policy import settings as settings_mod
from policy.callout import (
    MAX_ATTEMPTS,
    Callouts,
    Outcome,
    TokenBucket,
    interface_addresses,
    printable,
    skip_reason,
)
from policy.protocol import encode_request
from policy.settings import Settings
from tests.conftest import PRIMARY_HOSTNAME, Daemon
from tests.dns_server import DnsServer
from tests.smtp_peers import Peer, SmtpPeers, random_loopback

pytestmark = pytest.mark.integration

OUTSIDE_IP = "203.0.113.5"  # a documentation address: compared with lists, never contacted
RELAY_IP = "192.0.2.10"  # in the example tree's relay_from_hosts (192.0.2.0/24)


# --- fixtures and helpers ------------------------------------------------------------------


@pytest.fixture(scope="module")
def dns_server() -> Iterator[DnsServer]:
    with DnsServer() as server:
        yield server


@pytest.fixture(scope="module")
def peer_group() -> Iterator[SmtpPeers]:
    with SmtpPeers() as group:
        yield group


@pytest.fixture
def peers(peer_group: SmtpPeers) -> Iterator[SmtpPeers]:
    """The module's peer group; the peers a test adds are removed after it."""
    before = list(peer_group.peers)
    yield peer_group
    for peer in list(peer_group.peers):
        if peer not in before:
            peer_group.remove(peer)


def settings_for(dns_server: DnsServer, port: int, **overrides: Any) -> Settings:
    """Callouts to the test peers: loopback allowed, their port, short timeouts."""
    base = settings_mod.load("/dev/null", {
        "dns_servers": dns_server.address, "dns_port": dns_server.port, "dns_timeout": 1.0,
        "primary_hostname": PRIMARY_HOSTNAME, "callout_allow_private": True,
        "callout_port": port, "callout_connect_timeout": 1.0, "callout_timeout": 3.0,
    })  # fmt: skip
    return replace(base, **overrides)


def callouts_for(
    dns_server: DnsServer, peers: SmtpPeers, own: Callable[[], set[str]] | None = None,
    clock: Callable[[], float] = time.monotonic, **overrides: Any,
) -> Callouts:  # fmt: skip
    s = settings_for(dns_server, peers.port, **overrides)
    return Callouts(s, mpdns.make_async(s), own_addresses=own or interface_addresses,
                    clock=clock)  # fmt: skip


class Clock:
    """A clock for the caches' TTLs that moves only when told (no sleeping, no flakiness)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def verify(callouts: Callouts, address: str) -> Outcome:
    return asyncio.run(callouts.verify(address))


def mx_zone(dns_server: DnsServer, origin: str, *hosts: Peer | str, extra: tuple[str, ...] = ()
            ) -> None:  # fmt: skip
    """``origin`` with MX records mx1, mx2 ... (preference 10, 20 ...) pointing at ``hosts``
    (peers, or bare loopback addresses where nothing listens)."""
    records = list(extra)
    for i, host in enumerate(hosts, 1):
        address = host.address if isinstance(host, Peer) else host
        records += [f"@ MX {10 * i} mx{i}", f"mx{i} A {address}"]
    dns_server.set_zone(origin, records)


@contextlib.contextmanager
def unanswered(address: str, port: int) -> Iterator[None]:
    """``address``:``port`` where a TCP connect hangs: a listener whose accept queue (backlog
    0) is already full, so the kernel drops further SYNs."""
    with socket.socket() as listener, socket.socket() as filler:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((address, port))
        listener.listen(0)
        filler.connect((address, port))
        yield


# --- what the peers answer -----------------------------------------------------------------


def test_accepted(dns_server: DnsServer, peers: SmtpPeers) -> None:
    mx = peers.add()
    mx_zone(dns_server, "ok.test", mx)
    c = callouts_for(dns_server, peers)
    o = verify(c, "Alice@OK.test")
    assert o == Outcome("accepted", f"mx1.ok.test[{mx.address}] RCPT 250 2.1.5 OK")
    mx.wait_idle()
    (session,) = mx.sessions
    # The conversation: our name, the null sender, the address as given, QUIT.
    assert session.helo == PRIMARY_HOSTNAME
    assert session.mail_from == "<>"
    assert session.rcpts == ["Alice@OK.test"]
    assert session.quit
    assert (c.stats.callouts, c.stats.connections) == (1, 1)


def test_ipv4_before_ipv6(dns_server: DnsServer, peers: SmtpPeers) -> None:
    mx = peers.add()
    # ::1 is loopback too; nothing of ours listens there, and IPv4 comes first anyway.
    mx_zone(dns_server, "dual.test", mx, extra=("mx1 AAAA ::1",))
    c = callouts_for(dns_server, peers)
    o = verify(c, "a@dual.test")
    assert o == Outcome("accepted", f"mx1.dual.test[{mx.address}] RCPT 250 2.1.5 OK")
    assert c.stats.connections == 1


def test_callout_helo_setting(dns_server: DnsServer, peers: SmtpPeers) -> None:
    mx = peers.add()
    mx_zone(dns_server, "helo.test", mx)
    c = callouts_for(dns_server, peers, callout_helo="verify.example.org")
    assert verify(c, "a@helo.test").kind == "accepted"
    assert mx.sessions[0].helo == "verify.example.org"


def test_refused(dns_server: DnsServer, peers: SmtpPeers) -> None:
    mx = peers.add(rcpt={"nobody@refused.test": "550 5.1.1 no such user"})
    mx_zone(dns_server, "refused.test", mx)
    o = verify(callouts_for(dns_server, peers), "nobody@refused.test")
    assert o == Outcome("refused", f"mx1.refused.test[{mx.address}] RCPT 550 5.1.1 no such user")


def test_policy_refusal_at_rcpt_is_not_about_the_address(
    dns_server: DnsServer, peers: SmtpPeers
) -> None:
    mx = peers.add(default_rcpt="550 5.7.1 client host blocked")
    mx_zone(dns_server, "blocked.test", mx)
    o = verify(callouts_for(dns_server, peers), "a@blocked.test")
    assert o.kind == "unverifiable"
    assert "RCPT 550 5.7.1 client host blocked (a policy refusal" in o.why


def test_4xx_is_temporary_and_never_cached(dns_server: DnsServer, peers: SmtpPeers) -> None:
    mx = peers.add(default_rcpt="451 4.3.0 try later")
    mx_zone(dns_server, "later.test", mx)
    c = callouts_for(dns_server, peers)
    for _ in range(2):
        o = verify(c, "a@later.test")
        assert o == Outcome("temporary", f"mx1.later.test[{mx.address}] RCPT 451 4.3.0 try later")
    assert mx.connections == 2 and c.stats.cache_hits == 0


def test_peer_text_is_printable_and_bounded(dns_server: DnsServer, peers: SmtpPeers) -> None:
    mx = peers.add(default_rcpt="550 5.1.1 \x1b[31mred\x07 " + "x" * 500)
    mx_zone(dns_server, "noisy.test", mx)
    o = verify(callouts_for(dns_server, peers), "a@noisy.test")
    assert o.kind == "refused"
    assert o.why.isascii() and o.why.isprintable()
    assert "?[31mred? xxx" in o.why and o.why.endswith("...") and len(o.why) < 300


def test_printable() -> None:
    assert printable("250-first\n250 second") == "250-first / 250 second"
    assert printable("a\tb\x00c\udcffd") == "a?b?c?d"
    assert printable("x" * 10, 8) == "xxxxx..."


# --- before RCPT: 5xx is not about the address, 4xx tries the next host ----------------------


@pytest.mark.parametrize(
    ("script", "said"),
    [
        ({"greeting": "554 5.7.1 go away"}, "greeting 554 5.7.1 go away"),
        ({"mail": "550 5.7.1 no bounces here"}, "MAIL FROM:<> 550 5.7.1 no bounces here"),
        ({"ehlo": "550 no", "helo": "550 5.7.1 not you"}, "EHLO 550, HELO 550 5.7.1 not you"),
    ],
)
def test_5xx_before_rcpt_is_unverifiable_and_remembered(
    dns_server: DnsServer, peers: SmtpPeers, script: dict[str, str], said: str
) -> None:
    mx = peers.add(**script)
    spare = peers.add()  # a second MX: a 5xx ends the callout, it is not asked
    mx_zone(dns_server, "early.test", mx, spare)
    c = callouts_for(dns_server, peers)
    o = verify(c, "a@early.test")
    assert o.kind == "unverifiable"
    assert o.why == f"mx1.early.test[{mx.address}] {said} (refused before RCPT: not about the " \
        "address)"  # fmt: skip
    assert mx.rcpts == [] and spare.connections == 0
    # What a mail server said is remembered (negative TTL): no second connection.
    again = verify(c, "a@early.test")
    assert again == replace(o, cached=True) and mx.connections == 1


def test_ehlo_refused_falls_back_to_helo(dns_server: DnsServer, peers: SmtpPeers) -> None:
    mx = peers.add(ehlo="502 5.5.2 command not recognized")
    mx_zone(dns_server, "oldserver.test", mx)
    assert verify(callouts_for(dns_server, peers), "a@oldserver.test").kind == "accepted"
    assert mx.sessions[0].helo == PRIMARY_HOSTNAME and mx.rcpts == ["a@oldserver.test"]


def test_4xx_greeting_and_refused_connection_try_the_next_host(
    dns_server: DnsServer, peers: SmtpPeers
) -> None:
    busy = peers.add(greeting="421 4.3.2 too busy")
    nobody = random_loopback()  # nothing listens there: connection refused
    good = peers.add()
    # Preference order, not zone order: mx1 (10) and mx2 (20) fail, mx3 (30) answers.
    dns_server.set_zone("fallback.test", [
        f"mx3 A {good.address}", "@ MX 30 mx3", f"mx1 A {busy.address}", "@ MX 10 mx1",
        f"mx2 A {nobody}", "@ MX 20 mx2",
    ])  # fmt: skip
    o = verify(callouts_for(dns_server, peers), "a@fallback.test")
    assert o.kind == "accepted"
    assert o.why == (
        f"mx1.fallback.test[{busy.address}] greeting 421 4.3.2 too busy; "
        f"mx2.fallback.test[{nobody}] connect: Connection refused; "
        f"mx3.fallback.test[{good.address}] RCPT 250 2.1.5 OK"
    )


def test_every_host_temporary_is_temporary(dns_server: DnsServer, peers: SmtpPeers) -> None:
    first = peers.add(default_rcpt="452 4.2.2 mailbox full")
    second = peers.add(mail="451 4.3.0 local problem")
    mx_zone(dns_server, "alltemp.test", first, second)
    o = verify(callouts_for(dns_server, peers), "a@alltemp.test")
    assert o.kind == "temporary"
    assert "RCPT 452 4.2.2 mailbox full" in o.why and "MAIL FROM:<> 451 4.3.0" in o.why


def test_at_most_max_attempts_connections(dns_server: DnsServer, peers: SmtpPeers) -> None:
    nobody = [random_loopback() for _ in range(MAX_ATTEMPTS + 2)]
    mx_zone(dns_server, "many.test", *nobody)
    c = callouts_for(dns_server, peers)
    o = verify(c, "a@many.test")
    assert o.kind == "temporary" and o.why.endswith("2 more addresses not tried")
    assert c.stats.connections == MAX_ATTEMPTS


# --- timeouts ---------------------------------------------------------------------------------


def test_connect_timeout_then_the_next_host(dns_server: DnsServer, peers: SmtpPeers) -> None:
    good = peers.add()
    hung = random_loopback()
    mx_zone(dns_server, "slowconnect.test", hung, good)
    c = callouts_for(dns_server, peers, callout_connect_timeout=0.3)
    with unanswered(hung, peers.port):
        started = time.monotonic()
        o = verify(c, "a@slowconnect.test")
        elapsed = time.monotonic() - started
    assert o.kind == "accepted"
    assert o.why.startswith(f"mx1.slowconnect.test[{hung}] connect: no answer in 0.3 s; ")
    assert 0.3 <= elapsed < 2.5


@pytest.mark.parametrize(
    "script",
    [{"silent": True}, {"greeting_delay": 5.0}, {"delay": 5.0}],
    ids=["silent", "slow-greeting", "slow-rcpt"],
)
def test_total_timeout_is_temporary_and_bounded(
    dns_server: DnsServer, peers: SmtpPeers, script: dict[str, Any]
) -> None:
    mx = peers.add(**script)
    mx_zone(dns_server, "hang.test", mx)
    c = callouts_for(dns_server, peers, callout_timeout=0.8, callout_connect_timeout=0.5)
    started = time.monotonic()
    o = verify(c, "a@hang.test")
    elapsed = time.monotonic() - started
    assert o.kind == "temporary", o
    assert f"hang.test[{mx.address}]" in o.why
    assert 0.7 <= elapsed < 1.8  # callout_timeout, plus a loaded machine's slack
    assert verify(c, "a@hang.test").cached is False  # never remembered


def test_slow_greeting_within_the_total_is_fine(dns_server: DnsServer, peers: SmtpPeers) -> None:
    # callout_connect_timeout bounds the TCP connect only: a greeting pause (postscreen's,
    # say) longer than it is still waited for, within callout_timeout.
    mx = peers.add(greeting_delay=0.6)
    mx_zone(dns_server, "greetpause.test", mx)
    c = callouts_for(dns_server, peers, callout_connect_timeout=0.3, callout_timeout=2.0)
    assert verify(c, "a@greetpause.test").kind == "accepted"


# --- DNS --------------------------------------------------------------------------------------


def test_implicit_mx(dns_server: DnsServer, peers: SmtpPeers) -> None:
    mx = peers.add()
    dns_server.set_zone("implicit.test", [f"@ A {mx.address}"])
    o = verify(callouts_for(dns_server, peers), "a@implicit.test")
    assert o == Outcome("accepted", f"implicit.test[{mx.address}] RCPT 250 2.1.5 OK")


def test_null_mx_never_connects(dns_server: DnsServer, peers: SmtpPeers) -> None:
    mx = peers.add()
    dns_server.set_zone("nullmx.test", ["@ MX 0 .", f"@ A {mx.address}"])
    c = callouts_for(dns_server, peers)
    assert verify(c, "a@nullmx.test") == Outcome("null_mx", "nullmx.test has a null MX (RFC 7505)")
    assert mx.connections == 0 and c.stats.connections == 0


def test_domains_that_do_not_exist(dns_server: DnsServer, peers: SmtpPeers) -> None:
    dns_server.set_zone("exists.test", ['txtonly TXT "no mail here"', "@ MX 10 gone"])
    c = callouts_for(dns_server, peers)
    o = verify(c, "a@nothere.exists.test")
    assert o == Outcome("no_domain", "nothere.exists.test: no such domain (NXDOMAIN)")
    o = verify(c, "a@txtonly.exists.test")
    assert o == Outcome("no_domain", "txtonly.exists.test has no MX and no address records")
    # Every MX host without an address: Exim fails routing the same way.
    o = verify(c, "a@exists.test")
    assert o.kind == "no_domain" and "gone.exists.test has no address" in o.why
    assert c.stats.connections == 0
    # DNS answers are the resolver's to cache (by their TTLs), not the callout cache's.
    assert not verify(c, "a@nothere.exists.test").cached


def test_servfail_is_dns_trouble(dns_server: DnsServer, peers: SmtpPeers) -> None:
    dns_server.break_zone("servfail.test")
    dns_server.set_zone("mxservfail.test", ["@ MX 10 mx.servfail.test."])
    c = callouts_for(dns_server, peers)
    o = verify(c, "a@servfail.test")
    assert o.kind == "dns_trouble" and "SERVFAIL" in o.why
    # The MX is known, its host's address is not: still nothing definite.
    o = verify(c, "a@mxservfail.test")
    assert o.kind == "dns_trouble" and "mx.servfail.test" in o.why
    assert c.stats.connections == 0


def test_dns_server_stopped_is_dns_trouble(dns_server: DnsServer, peers: SmtpPeers) -> None:
    mx = peers.add()
    mx_zone(dns_server, "dnsdown.test", mx)
    dns_server.stop()
    try:
        c = callouts_for(dns_server, peers, dns_timeout=0.3)
        started = time.monotonic()
        o = verify(c, "a@dnsdown.test")
        assert o.kind == "dns_trouble" and "DNS timeout" in o.why
        assert time.monotonic() - started < 2.0
        # A resolver slower than the whole callout: the callout's own limit says dns_trouble.
        c = callouts_for(dns_server, peers, dns_timeout=5.0, callout_timeout=0.4)
        o = verify(c, "a@dnsdown.test")
        assert o.kind == "dns_trouble"
        assert o.why == "no answer within callout_timeout (0.4 s) while looking up the MX of " \
            "dnsdown.test"  # fmt: skip
    finally:
        dns_server.start()
    assert mx.connections == 0


# --- where we never connect --------------------------------------------------------------------


def test_default_setting_never_connects_to_loopback(
    dns_server: DnsServer, peers: SmtpPeers
) -> None:
    mx = peers.add()
    mx_zone(dns_server, "private.test", mx)
    c = callouts_for(dns_server, peers, callout_allow_private=False)
    o = verify(c, "a@private.test")
    assert o == Outcome("unverifiable", (
        f"no MX host of private.test we may ask; mx1.private.test[{mx.address}] skipped: "
        "loopback address (callout_allow_private is off)"))  # fmt: skip
    assert mx.connections == 0 and c.stats.connections == 0


def test_own_addresses_are_never_asked(dns_server: DnsServer, peers: SmtpPeers) -> None:
    mine, other = peers.add(), peers.add()
    mx_zone(dns_server, "own.test", mine, other)
    c = callouts_for(dns_server, peers, own=lambda: {mine.address})
    o = verify(c, "a@own.test")
    assert o.kind == "accepted"
    assert o.why.startswith(
        f"mx1.own.test[{mine.address}] skipped: one of this machine's own addresses; "
    )
    assert mine.connections == 0 and other.connections == 1


@pytest.mark.parametrize(
    ("address", "allow_private", "reason"),
    [
        ("127.0.0.1", False, "loopback address (callout_allow_private is off)"),
        ("10.1.2.3", False, "private address (callout_allow_private is off)"),
        ("169.254.0.9", False, "link-local address (callout_allow_private is off)"),
        ("fe80::1", False, "link-local address (callout_allow_private is off)"),
        ("::ffff:192.168.1.1", False, "private address (callout_allow_private is off)"),
        ("100.64.0.1", False, "not globally routable address (callout_allow_private is off)"),
        ("0.0.0.0", True, "not a unicast address"),
        ("::", True, "not a unicast address"),
        ("224.0.0.1", True, "not a unicast address"),
        ("255.255.255.255", True, "not a unicast address"),
        ("198.18.0.7", True, "one of this machine's own addresses"),
        ("127.0.0.1", True, ""),
        ("10.1.2.3", True, ""),
        ("8.8.8.8", False, ""),
        ("nonsense", True, "not an IP address"),
    ],
)
def test_skip_reason(address: str, allow_private: bool, reason: str) -> None:
    # Pure: compares addresses, connects nowhere.
    assert skip_reason(address, allow_private, frozenset({"198.18.0.7"})) == reason


def test_interface_addresses_match_ip_addr() -> None:
    # iproute2 is in scripts/debian-packages.txt: a missing `ip` fails here, loudly.
    out = subprocess.run(["ip", "-o", "addr", "show"], capture_output=True, text=True, check=True)
    expected = set()
    for line in out.stdout.splitlines():
        words = line.split()
        address = ipaddress.ip_address(words[3].split("/")[0])
        if not address.is_loopback:
            expected.add(str(address))
    assert interface_addresses() == expected


@pytest.mark.parametrize(
    "address",
    ["nodomain", "@example.test", "a@", "a@[127.0.0.1]", "a b@x.test", "a<b@x.test",
     "a\r\nRSET@x.test", "a@bad_domain..test", "\udcff@x.test", "x" * 250 + "@x.test"],
)  # fmt: skip
def test_addresses_that_cannot_be_asked_about(
    dns_server: DnsServer, peers: SmtpPeers, address: str
) -> None:
    c = callouts_for(dns_server, peers)
    o = verify(c, address)
    assert o.kind == "unverifiable"
    assert o.why.isprintable() and "\r" not in o.why
    assert c.stats.callouts == 0  # not even DNS was asked


def test_quoted_local_part_goes_out_as_given(dns_server: DnsServer, peers: SmtpPeers) -> None:
    mx = peers.add()
    mx_zone(dns_server, "quoted.test", mx)
    assert verify(callouts_for(dns_server, peers), '"john doe"@quoted.test').kind == "accepted"
    assert mx.rcpts == ['"john doe"@quoted.test']


def test_smtputf8(dns_server: DnsServer, peers: SmtpPeers) -> None:
    able, unable = peers.add(), peers.add(smtputf8=False)
    mx_zone(dns_server, "utf8.test", able)
    mx_zone(dns_server, "ascii.test", unable)
    c = callouts_for(dns_server, peers)
    assert verify(c, "jörg@utf8.test").kind == "accepted"
    assert able.rcpts == ["jörg@utf8.test"]
    o = verify(c, "jörg@ascii.test")
    assert o.kind == "unverifiable" and "does not offer SMTPUTF8" in o.why
    assert unable.rcpts == []


# --- caches --------------------------------------------------------------------------------------


def test_caches_and_their_ttls(dns_server: DnsServer, peers: SmtpPeers) -> None:
    mx = peers.add(rcpt={"bad@cache.test": "550 5.1.1 unknown"})
    mx_zone(dns_server, "cache.test", mx)
    clock = Clock()
    c = callouts_for(dns_server, peers, clock=clock, callout_positive_ttl=60.0,
                     callout_negative_ttl=30.0)  # fmt: skip
    good, bad = verify(c, "good@cache.test"), verify(c, "bad@cache.test")
    assert (good.kind, bad.kind, good.cached, bad.cached) == ("accepted", "refused", False, False)
    assert verify(c, "good@CACHE.test") == replace(good, cached=True)  # the domain's case
    assert verify(c, "bad@cache.test") == replace(bad, cached=True)
    assert mx.connections == 2 and c.stats.cache_hits == 2
    # The local part's case is the remote's business: another key.
    assert not verify(c, "Good@cache.test").cached
    assert mx.connections == 3
    clock.now += 31  # the negative TTL has passed, the positive one has not
    assert not verify(c, "bad@cache.test").cached
    assert verify(c, "good@cache.test").cached
    clock.now += 30
    assert not verify(c, "good@cache.test").cached
    assert mx.connections == 5


def test_ttl_zero_turns_a_cache_off(dns_server: DnsServer, peers: SmtpPeers) -> None:
    mx = peers.add(rcpt={"bad@nocache.test": "550 5.1.1 unknown"})
    mx_zone(dns_server, "nocache.test", mx)
    c = callouts_for(dns_server, peers, callout_positive_ttl=0.0)
    for _ in range(2):
        assert not verify(c, "good@nocache.test").cached
    verify(c, "bad@nocache.test")
    assert verify(c, "bad@nocache.test").cached
    assert mx.connections == 3


def test_an_answer_replaces_the_other_caches_entry(dns_server: DnsServer, peers: SmtpPeers) -> None:
    mx = peers.add()
    mx_zone(dns_server, "flip.test", mx)
    clock = Clock()
    c = callouts_for(dns_server, peers, clock=clock, callout_positive_ttl=60.0,
                     callout_negative_ttl=600.0)  # fmt: skip
    assert verify(c, "a@flip.test").kind == "accepted"
    clock.now += 61
    mx.default_rcpt = "550 5.1.1 gone now"
    assert verify(c, "a@flip.test").kind == "refused"
    said = f"mx1.flip.test[{mx.address}] RCPT 550 5.1.1 gone now"
    assert verify(c, "a@flip.test") == Outcome("refused", said, cached=True)


# --- etiquette: sharing, per-domain cap, rate -------------------------------------------------


def test_100_concurrent_checks_make_one_callout(dns_server: DnsServer, peers: SmtpPeers) -> None:
    mx = peers.add(delay=0.3)
    mx_zone(dns_server, "crowd.test", mx)
    c = callouts_for(dns_server, peers)

    async def main() -> list[Outcome]:
        return await asyncio.gather(*(c.verify("news@crowd.test") for _ in range(100)))

    outcomes = asyncio.run(main())
    assert {o.kind for o in outcomes} == {"accepted"}
    assert mx.connections == 1 and mx.rcpts == ["news@crowd.test"]
    assert (c.stats.callouts, c.stats.shared, c.stats.connections) == (1, 99, 1)
    assert verify(c, "news@crowd.test").cached


def test_a_cancelled_waiter_leaves_the_shared_callout_running(
    dns_server: DnsServer, peers: SmtpPeers
) -> None:
    mx = peers.add(delay=0.4)
    mx_zone(dns_server, "cancel.test", mx)
    c = callouts_for(dns_server, peers)

    async def main() -> Outcome:
        impatient = asyncio.create_task(c.verify("a@cancel.test"))
        patient = asyncio.create_task(c.verify("a@cancel.test"))
        await asyncio.sleep(0.1)
        impatient.cancel()  # the daemon does this when a request's deadline passes
        with pytest.raises(asyncio.CancelledError):
            await impatient
        return await patient

    assert asyncio.run(main()).kind == "accepted"
    assert mx.connections == 1 and verify(c, "a@cancel.test").cached


def test_close_cancels_running_callouts(dns_server: DnsServer, peers: SmtpPeers) -> None:
    mx = peers.add(delay=5.0)
    mx_zone(dns_server, "closing.test", mx)
    c = callouts_for(dns_server, peers)

    async def main() -> None:
        waiter = asyncio.create_task(c.verify("a@closing.test"))
        while not mx.rcpts:
            await asyncio.sleep(0.01)
        c.close()  # the daemon is stopping
        with pytest.raises(asyncio.CancelledError):
            await waiter

    started = time.monotonic()
    asyncio.run(main())
    assert time.monotonic() - started < 2.0
    assert c._running == {} and mx.connections == 1


def test_per_domain_cap(dns_server: DnsServer, peers: SmtpPeers) -> None:
    mx = peers.add(delay=0.15)
    other = peers.add(delay=0.15)
    mx_zone(dns_server, "capped.test", mx)
    mx_zone(dns_server, "othercap.test", other)
    c = callouts_for(dns_server, peers, callout_domain_concurrency=2)

    async def main() -> list[Outcome]:
        addresses = [f"user{i}@capped.test" for i in range(8)]
        addresses += [f"user{i}@othercap.test" for i in range(2)]
        return await asyncio.gather(*(c.verify(a) for a in addresses))

    started = time.monotonic()
    outcomes = asyncio.run(main())
    assert {o.kind for o in outcomes} == {"accepted"}
    assert mx.connections == 8 and mx.max_active == 2  # the cap holds, and is used
    assert other.max_active == 2  # another domain has its own slots
    assert time.monotonic() - started >= 4 * 0.15
    assert c._slots == {}  # idle domains are forgotten


def test_waiting_for_a_slot_past_the_deadline_is_temporary(
    dns_server: DnsServer, peers: SmtpPeers
) -> None:
    mx = peers.add(delay=2.0)
    mx_zone(dns_server, "queue.test", mx)
    c = callouts_for(dns_server, peers, callout_domain_concurrency=1, callout_timeout=0.5,
                     callout_connect_timeout=0.5)  # fmt: skip

    async def main() -> tuple[Outcome, Outcome]:
        return await asyncio.gather(c.verify("first@queue.test"), c.verify("second@queue.test"))

    started = time.monotonic()
    first, second = asyncio.run(main())
    assert time.monotonic() - started < 1.5
    assert first.kind == second.kind == "temporary"
    assert "while talking to mx1.queue.test" in first.why
    assert second.why.endswith("while waiting for a callout slot for queue.test "
                               "(callout_domain_concurrency=1)")  # fmt: skip
    assert mx.connections == 1


def test_rate_cap(dns_server: DnsServer, peers: SmtpPeers) -> None:
    mx = peers.add()
    mx_zone(dns_server, "rate.test", mx)
    c = callouts_for(dns_server, peers, callout_rate=10.0, callout_burst=2,
                     callout_domain_concurrency=10)  # fmt: skip

    async def main() -> list[Outcome]:
        return await asyncio.gather(*(c.verify(f"u{i}@rate.test") for i in range(6)))

    started = time.monotonic()
    assert {o.kind for o in asyncio.run(main())} == {"accepted"}
    # Two at once (the burst), then one every 0.1 s.
    assert time.monotonic() - started >= 0.38
    assert mx.connections == 6


def test_rate_cap_past_the_deadline_answers_at_once(
    dns_server: DnsServer, peers: SmtpPeers
) -> None:
    mx = peers.add()
    mx_zone(dns_server, "ratelimit.test", mx)
    c = callouts_for(dns_server, peers, callout_rate=0.2, callout_burst=1, callout_timeout=1.0)
    assert verify(c, "a@ratelimit.test").kind == "accepted"
    started = time.monotonic()
    o = verify(c, "b@ratelimit.test")
    assert time.monotonic() - started < 1.0  # not the 5 s until the next token
    assert o == Outcome("temporary", "callout rate limit reached (callout_rate=0.2/s, "
                                     "callout_burst=1): ratelimit.test not asked now")  # fmt: skip
    assert c.stats.rate_limited == 1 and mx.connections == 1
    # Answers that need no connection need no token.
    dns_server.set_zone("nullrate.test", ["@ MX 0 ."])
    assert verify(c, "a@nullrate.test").kind == "null_mx"


def test_token_bucket() -> None:
    now = [0.0]
    bucket = TokenBucket(rate=2.0, burst=3, clock=lambda: now[0])
    assert [bucket.reserve(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.reserve(0.1) is None  # the next token comes in 0.5 s
    assert bucket.reserve(0.5) == 0.5
    assert bucket.reserve(0.9) is None  # queued behind the one above: 1.0 s
    assert bucket.reserve(1.0) == 1.0
    now[0] = 10.0  # refilled, never beyond the burst
    assert [bucket.reserve(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.reserve(0.0) is None


# --- through the daemon ------------------------------------------------------------------------


def daemon_config(dns_server: DnsServer, port: int, **extra: object) -> dict[str, object]:
    return {"callout_enabled": True, "callout_allow_private": True, "callout_port": port,
            "callout_connect_timeout": 1.0, "callout_timeout": 2.0,
            "dns_servers": dns_server.address, "dns_port": dns_server.port,
            "dns_timeout": 0.5, "spf_enabled": False, **extra}  # fmt: skip


def mail(d: Daemon, sender: str, ip: str = OUTSIDE_IP, **fields: str) -> str:
    return d.ask(encode_request("MAIL", ip=ip, sender=sender, helo="client.test",
                                **fields)).decode()  # fmt: skip


def test_through_the_daemon(
    dns_server: DnsServer, peers: SmtpPeers, start_daemon: Callable[..., Daemon], tree: Path
) -> None:
    mx = peers.add(rcpt={"nobody@remote.test": "550 5.1.1 no such user",
                         "busy@remote.test": "451 4.3.0 try later"})  # fmt: skip
    mx_zone(dns_server, "remote.test", mx)
    dns_server.set_zone("nullsender.test", ["@ MX 0 ."])
    # The exempt senders' domains and postmaster's have an MX too: asking would be seen.
    for origin in ("shop.example", "lists.example", "postmaster.test"):
        mx_zone(dns_server, origin, mx)
    d = start_daemon(tree, config=daemon_config(dns_server, peers.port))

    assert mail(d, "alice@remote.test").startswith("ACCEPT 250 2.1.0 ")
    assert mail(d, "nobody@remote.test").startswith("DENY 550 5.1.7 <nobody@remote.test>: ")
    assert mail(d, "busy@remote.test").startswith("DEFER 451 4.4.0 ")
    assert mail(d, "a@nothere.remote.test").startswith("DENY 550 5.1.8 ")
    assert mail(d, "a@nullsender.test").startswith("DENY 550 5.7.27 ")
    asked = mx.rcpts
    assert asked == ["alice@remote.test", "nobody@remote.test", "busy@remote.test"]

    # Never verified: exempt senders, <>, postmaster, clients we relay for.
    for sender, fields in [
        ("newsletter@shop.example", {}), ("anyone@lists.example", {}), ("", {}),
        ("postmaster@postmaster.test", {}), ("who@postmaster.test", {"auth": "alice"}),
    ]:  # fmt: skip
        assert mail(d, sender, **fields).startswith("ACCEPT 250 2.1.0 "), sender
    assert mail(d, "who@postmaster.test", ip=RELAY_IP).startswith("ACCEPT 250 2.1.0 ")
    assert mx.rcpts == asked

    dns_server.stop()
    try:
        reply = mail(d, "carol@remote.test")
    finally:
        dns_server.start()
    assert reply.startswith("DEFER 451 4.4.3 "), reply
    assert mx.rcpts == asked

    d.stop()
    log = d.log_text()
    assert f"mx1.remote.test[{mx.address}] RCPT 550 5.1.1 no such user" in log
    assert "newsletter@shop.example matches 'newsletter@shop.example'" in log
    assert "not verified: client is authenticated user" in log
    assert "DNS timeout for remote.test MX" in log


def test_daemon_100_concurrent_messages_one_callout(
    dns_server: DnsServer, peers: SmtpPeers, start_daemon: Callable[..., Daemon], tree: Path
) -> None:
    mx = peers.add(delay=0.5)
    mx_zone(dns_server, "busy.test", mx)
    d = start_daemon(tree, config=daemon_config(dns_server, peers.port))
    with ThreadPoolExecutor(100) as pool:
        replies = list(pool.map(lambda _: mail(d, "news@busy.test"), range(100)))
    assert all(r.startswith("ACCEPT 250 2.1.0 ") for r in replies), set(replies)
    assert mx.connections == 1 and mx.rcpts == ["news@busy.test"]


def test_daemon_default_setting_never_connects_to_a_loopback_mx(
    dns_server: DnsServer, peers: SmtpPeers, start_daemon: Callable[..., Daemon], tree: Path
) -> None:
    mx = peers.add()
    mx_zone(dns_server, "inside.test", mx)
    config = daemon_config(dns_server, peers.port)
    del config["callout_allow_private"]  # the default: off
    d = start_daemon(tree, config=config)
    assert mail(d, "a@inside.test").startswith("ACCEPT 250 2.1.0 ")
    d.stop()
    assert mx.connections == 0
    assert (f"mx1.inside.test[{mx.address}] skipped: loopback address "
            "(callout_allow_private is off)") in d.log_text()  # fmt: skip
