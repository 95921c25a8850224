"""SPF and sender-verify callouts at MAIL through the real Exim 4.96 (exim/configure) and the
real daemon: accept, reject and defer for each check, over SMTP from an outside client.

The world is on loopback only: an authoritative NSD on a loopback port (tests/dns_server.py)
serves the sender domains, whose MX records point at scripted aiosmtpd peers
(tests/smtp_peers.py, one port for all); the daemon's resolver asks only that NSD and its
callouts go to the peers' port (policy_config below). The client is 127.0.0.2: an outside
client (127.0.0.1 is localhost, which the sender checks skip), not in relay_from_hosts.

Zones (TTL 0, so nothing is cached between a change and the next query):

| domain | SPF record | MX | used for |
|---|---|---|---|
| pass.test | ip4:127.0.0.2 -all | a peer answering 250 (RCPT scripted per test) | pass, 550, 451 |
| fail.test | ip4:127.0.0.9 -all | a peer that must never be asked | SPF fail |
| broken.test | (zone NSD cannot load: SERVFAIL) | | SPF temperror |
| exists.test | pass | - (nosuch.exists.test: NXDOMAIN; SPF none, then the callout) | 5.1.8 |
| nullmx.test | pass | ``MX 0 .`` (RFC 7505) | null MX |
| lists.example | pass | a peer answering 550 to everything | senderverify_exceptions |
| silent.test | pass | a peer that never greets | callout timeout |
| mxbroken.test | pass | mx.broken.test (SERVFAIL) | DNS trouble in the callout |
"""

from __future__ import annotations

import math
import re
import time
import uuid
from collections.abc import Iterator

import pytest

from policy import settings as settings_mod
from tests.dns_server import DnsServer, txt
from tests.exim_stack import PRIMARY, Stack, exim_stack, message
from tests.smtp_peers import Peer, SmtpPeers

pytestmark = pytest.mark.integration

OUTSIDER = "127.0.0.2"  # not localhost, not in relay_from_hosts
RCPT = "alice@example.org"
SPF_PASS = txt(f"v=spf1 ip4:{OUTSIDER} -all")
SPF_FAIL = txt("v=spf1 ip4:127.0.0.9 -all")  # does not list the client

# Small timeouts where a test waits on one (the DNS server stopped: dns_timeout). mail_deadline
# is the least the settings allow (spf_timeout + callout_timeout + 2).
MAIL_DEADLINE = 8.0
TIMEOUTS = {"spf_timeout": 3.0, "callout_timeout": 3.0, "callout_connect_timeout": 1.0,
            "dns_timeout": 1.0, "mail_deadline": MAIL_DEADLINE}  # fmt: skip


class World:
    """The peers the zones point at."""

    def __init__(self, peers: SmtpPeers) -> None:
        self.peers = peers
        self.mx = peers.add()  # pass.test
        self.fail_mx = peers.add()  # fail.test: SPF refuses first, never asked
        self.lists_mx = peers.add(default_rcpt="550 5.1.1 no such user")  # lists.example
        self.silent_mx = peers.add(silent=True)  # silent.test: connects, never greets


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with SmtpPeers() as peers:
        yield World(peers)


@pytest.fixture(scope="module")
def dns_server(world: World) -> Iterator[DnsServer]:
    with DnsServer() as server:
        for origin, mx in (("pass.test", world.mx), ("fail.test", world.fail_mx),
                           ("lists.example", world.lists_mx)):  # fmt: skip
            spf = SPF_FAIL if origin == "fail.test" else SPF_PASS
            server.set_zone(origin, [f"@ TXT {spf}", "@ MX 10 mx", f"mx A {mx.address}"])
        server.set_zone("exists.test", [f"@ TXT {SPF_PASS}"])
        server.set_zone("nullmx.test", [f"@ TXT {SPF_PASS}", "@ MX 0 ."])
        server.set_zone("silent.test", [f"@ TXT {SPF_PASS}", "@ MX 10 mx",
                                        f"mx A {world.silent_mx.address}"])  # fmt: skip
        # SPF passes, but the MX host's address is in a zone that answers SERVFAIL.
        server.set_zone("mxbroken.test", [f"@ TXT {SPF_PASS}", "@ MX 10 mx.broken.test."])
        server.break_zone("broken.test")
        yield server


@pytest.fixture(scope="module")
def stack(world: World, dns_server: DnsServer) -> Iterator[Stack]:
    config: dict[str, object] = {
        "spf_enabled": True, "callout_enabled": True, "callout_allow_private": True,
        "callout_port": world.peers.port, "dns_servers": dns_server.address,
        "dns_port": dns_server.port, **TIMEOUTS,
    }  # fmt: skip
    with exim_stack(policy_config=config) as s:
        yield s


@pytest.fixture
def mx(world: World) -> Peer:
    """pass.test's MX, with its counters and RCPT script cleared for this test."""
    world.mx.wait_idle()
    world.mx.reset()
    world.mx.rcpt.clear()
    return world.mx


def address(domain: str, tag: str = "s") -> str:
    """A sender nobody asked about before (the daemon remembers callout answers)."""
    return f"{tag}-{uuid.uuid4().hex[:10]}@{domain}"


def mail_reply(stack: Stack, sender: str) -> tuple[int, bytes]:
    """Exim's answer to MAIL FROM:<sender> from the outside client."""
    with stack.smtp(OUTSIDER) as client:
        return client.mail(sender)


def deliver(stack: Stack, sender: str) -> bytes:
    """A whole transaction from the outside client; the message as delivered to alice."""
    mark = f"m-{uuid.uuid4().hex[:12]}"
    with stack.smtp(OUTSIDER) as client:
        code, text = client.mail(sender)
        assert code == 250, (code, text, policy_log(stack))
        assert client.rcpt(RCPT)[0] == 250
        assert client.data(message(sender, RCPT, mark))[0] == 250
    return stack.wait_maildir("example.org", "alice", mark)


def policy_log(stack: Stack) -> str:
    path = stack.base / "policy.log"
    return path.read_text()[-3000:] if path.exists() else ""


def header_fields(delivered: bytes) -> list[str]:
    """The names of the delivered message's header fields, in order."""
    head = delivered.split(b"\n\n", 1)[0].decode()
    return [m.group(1) for m in re.finditer(r"^([!-9;-~]+):", head, re.M)]


# --- SPF ---------------------------------------------------------------------------------------


def test_spf_pass_and_callout_250_deliver_with_received_spf_on_top(stack: Stack, mx: Peer) -> None:
    sender = address("pass.test")
    delivered = deliver(stack, sender)
    # The callout asked the MX about the sender, from the null sender.
    mx.wait_idle()
    assert mx.rcpts == [sender]
    assert [s.mail_from for s in mx.sessions] == ["<>"]
    # Received-SPF (RFC 7208 section 9.1) above every Received and every field of the message:
    # only the delivery's own Return-path / Envelope-to / Delivery-date come before it.
    names = header_fields(delivered)
    first = names.index("Received-SPF")
    assert set(names[:first]) <= {"Return-path", "Envelope-to", "Delivery-date"}, names
    assert names.count("Received-SPF") == 1
    assert first < names.index("Received") and "Received-SPF" not in names[first + 1 :]
    text = delivered.decode()
    (value,) = re.findall(r"^Received-SPF: .*(?:\n[ \t].*)*", text, re.M)
    # pyspf's wording; the result is case-insensitive (RFC 7208 section 9.1).
    assert value.startswith(f"Received-SPF: Pass ({PRIMARY}: domain of pass.test designates "
                            f"{OUTSIDER} as permitted sender) "), value  # fmt: skip
    assert f'client-ip={OUTSIDER}; envelope-from="{sender}";' in value, value


def test_spf_fail_refuses_before_any_callout(stack: Stack, world: World) -> None:
    world.fail_mx.reset()
    sender = address("fail.test")
    code, text = mail_reply(stack, sender)
    assert code == 550 and text.startswith(b"5.7.23 "), (code, text)
    assert b"fail.test does not permit 127.0.0.2" in text
    assert world.fail_mx.connections == 0  # SPF runs first: a forged sender's domain is not probed


def test_spf_temperror_defers(stack: Stack) -> None:
    code, text = mail_reply(stack, address("broken.test"))
    assert code == 451 and text.startswith(b"4.4.3 "), (code, text)


# --- sender-verify callouts --------------------------------------------------------------------


def test_callout_550_refuses(stack: Stack, mx: Peer) -> None:
    sender = address("pass.test", "gone")
    mx.rcpt[sender] = "550 5.1.1 no such user"
    code, text = mail_reply(stack, sender)
    assert code == 550 and text.startswith(b"5.1.7 "), (code, text)
    # Exim splits the daemon's long text over continuation lines, each with the code.
    assert b"sender verification failed" in text and sender.encode() in text
    assert mx.rcpts == [sender]


def test_callout_451_defers(stack: Stack, mx: Peer) -> None:
    sender = address("pass.test", "busy")
    mx.rcpt[sender] = "451 4.3.0 try later"
    code, text = mail_reply(stack, sender)
    assert code == 451 and text.startswith(b"4.4.0 "), (code, text)
    assert mx.rcpts == [sender]
    # A temporary answer is not remembered: once the MX knows the address, it is accepted.
    mx.rcpt.clear()
    assert mail_reply(stack, sender)[0] == 250
    assert mx.rcpts == [sender, sender]


def test_callout_dns_trouble_defers(stack: Stack) -> None:
    code, text = mail_reply(stack, address("mxbroken.test"))
    assert code == 451 and text.startswith(b"4.4.3 "), (code, text)


def test_silent_mx_defers_with_the_daemons_answer(stack: Stack, world: World) -> None:
    """The callout gives up after callout_timeout; Exim, which waits mail_deadline + 5 s, gets
    the daemon's 4.4.0, not its own fail string (451 4.3.0 policy daemon unavailable)."""
    started = time.monotonic()
    code, text = mail_reply(stack, address("silent.test"))
    elapsed = time.monotonic() - started
    assert code == 451 and text.startswith(b"4.4.0 "), (code, text)
    assert TIMEOUTS["callout_timeout"] <= elapsed < MAIL_DEADLINE, elapsed
    world.silent_mx.wait_idle()
    assert world.silent_mx.connections == 1


def test_nxdomain_sender_domain_refuses(stack: Stack, mx: Peer) -> None:
    code, text = mail_reply(stack, address("nosuch.exists.test"))
    assert code == 550 and text.startswith(b"5.1.8 "), (code, text)
    assert mx.connections == 0


def test_null_mx_refuses(stack: Stack) -> None:
    code, text = mail_reply(stack, address("nullmx.test"))
    assert code == 550 and text.startswith(b"5.7.27 "), (code, text)


def test_senderverify_exception_is_accepted_without_a_callout(stack: Stack, world: World) -> None:
    """*@lists.example (the example tree's senderverify_exceptions): its MX would refuse the
    address, but it is never asked. SPF still runs: the Received-SPF header says pass."""
    world.lists_mx.reset()
    delivered = deliver(stack, address("lists.example", "news"))
    assert world.lists_mx.connections == 0
    assert b"\nReceived-SPF: Pass " in delivered


# --- DNS trouble ---------------------------------------------------------------------------


def test_dns_server_stopped_defers_and_the_retry_is_accepted(
    stack: Stack, dns_server: DnsServer, mx: Peer
) -> None:
    sender = address("pass.test", "retry")
    dns_server.stop()
    try:
        code, text = mail_reply(stack, sender)
    finally:
        dns_server.start()
    # SPF's TXT lookup times out (dns_timeout): temperror, never a 5xx.
    assert code == 451 and text.startswith(b"4.4.3 "), (code, text)
    assert mx.connections == 0
    # The client retries (RFC 5321 section 4.5.4.1) with the DNS back: nothing is lost.
    delivered = deliver(stack, sender)
    assert b"\nReceived-SPF: Pass " in delivered
    assert mx.rcpts == [sender]


# --- Exim waits as long as the daemon may take ------------------------------------------------


def test_mail_readsocket_timeout_is_the_daemon_deadline_plus_5(stack: Stack) -> None:
    daemon = settings_mod.load(str(stack.policy_config))
    assert daemon.mail_deadline == MAIL_DEADLINE
    (wait,) = re.findall(r"^POLICY_WAIT_MAIL = \{(\d+)s\}", stack.conf.read_text(), re.M)
    assert int(wait) == math.ceil(MAIL_DEADLINE) + 5
    # ... and it is the MAIL ACL's readsocket that uses it.
    mail_acl = stack.conf.read_text().split("acl_check_mail:", 1)[1].split("\n\n", 1)[0]
    assert "POLICY_WAIT_MAIL" in mail_acl
