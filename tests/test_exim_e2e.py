"""Mail through the real Exim 4.96 with the project's exim/configure and the real policy daemon:
delivered where the seed says, refused where it must be, never relayed for outsiders, and
never lost when the daemon is in trouble."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator

import pytest

from tests.exim_stack import Stack, exim_stack, message

pytestmark = pytest.mark.integration


RELAY_CLIENT = "127.0.0.5"  # listed in relay_from_hosts for these tests
OUTSIDER = "127.0.0.2"  # not listed, not authenticated: the outside world


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with exim_stack(relay_from=(RELAY_CLIENT,)) as s:
        yield s


def marker() -> str:
    return f"m-{uuid.uuid4().hex[:12]}"


def send(stack: Stack, sender: str, rcpts: list[str], mark: str,
         source: str = OUTSIDER) -> dict[str, tuple[int, bytes]]:  # fmt: skip
    with stack.smtp(source) as client:
        return client.sendmail(sender, rcpts, message(sender, rcpts[0], mark))


@pytest.mark.parametrize(
    ("rcpt", "domain", "user"),
    [
        ("alice@example.org", "example.org", "alice"),  # a user
        ("Alice+lists@Example.ORG", "example.org", "alice"),  # user+tag, any case
        ("alice@example.info", "example.org", "alice"),  # a rewritten domain
        ("postmaster@example.org", "example.org", "alice"),  # global alias, in each domain
        ("postmaster@example.net", "example.org", "alice"),
        ("postmaster@example.com", "example.org", "alice"),
        ("hello@example.com", "example.org", "alice"),  # alias in a domain without users
        ("anything@example.net", "example.net", "carol"),  # catch-all
    ],
)
def test_delivered(stack: Stack, rcpt: str, domain: str, user: str) -> None:
    mark = marker()
    assert send(stack, "someone@remote.example", [rcpt], mark) == {}
    delivered = stack.wait_maildir(domain, user, mark)
    assert b"Envelope-to: " in delivered


def test_multi_target_alias_reaches_everyone(stack: Stack) -> None:
    mark = marker()
    send(stack, "someone@remote.example", ["sales@example.org"], mark)
    stack.wait_maildir("example.org", "bob", mark)
    stack.wait_maildir("example.net", "carol", mark)


def test_every_stage_asks_the_daemon_and_data_names_the_message(stack: Stack) -> None:
    """One session = CONNECT, MAIL, RCPT (x2) and DATA requests; the DATA decision carries
    Exim's message id, size and recipient count, so Exim's log and ours can be joined."""
    mark = marker()
    sender = f"{mark}@remote.example"
    with stack.smtp() as client:
        client.mail(sender)
        assert client.rcpt("alice@example.org")[0] == 250
        assert client.rcpt("bob@example.org")[0] == 250
        assert client.data(message(sender, "alice@example.org", mark))[0] == 250
    stack.wait_maildir("example.org", "bob", mark)
    (exim_id,) = re.findall(rf"^\S+ \S+ (\S+) <= {re.escape(sender)} ", stack.mainlog(), re.M)
    log = (stack.base / "policy.log").read_text()
    (data,) = [line for line in log.splitlines() if f"id={exim_id} " in line]
    assert "stage=DATA ip=127.0.0.2 " in data and f"sender=<{sender}>" in data
    assert 'verdict="ACCEPT 250 2.0.0"' in data and "rcpts=2" in data
    assert re.search(r"size=[1-9][0-9]* ", data)
    stages = re.findall(rf"stage=(\w+) [^\n]*{re.escape(mark)}", log)
    assert stages.count("MAIL") == 1 and stages.count("RCPT") == 2
    assert "stage=CONNECT ip=127.0.0.2 " in log


def test_unknown_user_550(stack: Stack) -> None:
    with stack.smtp() as client:
        client.mail("someone@remote.example")
        code, text = client.rcpt("nobody@example.org")
    assert (code, text) == (550, b"5.1.1 <nobody@example.org>: no such user here")


def test_relay_denied_550(stack: Stack) -> None:
    with stack.smtp() as client:
        client.mail("someone@remote.example")
        code, text = client.rcpt("friend@far.example")
    assert (code, text) == (550, b"5.7.1 relay not permitted")
    assert not [m for m in stack.sink.messages if "friend@far.example" in m[1]]


def test_relay_from_relay_from_hosts_reaches_the_sink(stack: Stack) -> None:
    mark = marker()
    assert send(stack, "alice@example.org", ["friend@far.example"], mark, RELAY_CLIENT) == {}
    sender, rcpts, _ = stack.wait_sink(mark)
    assert (sender, rcpts) == ("alice@example.org", ["friend@far.example"])


def test_relay_to_domains_accepted_from_anyone(stack: Stack) -> None:
    mark = marker()
    assert send(stack, "someone@remote.example", ["x@backup.example"], mark) == {}
    assert stack.wait_sink(mark)[1] == ["x@backup.example"]


def test_submission_port_requires_auth(stack: Stack) -> None:
    with stack.smtp(port=stack.submission_port) as client:
        client.mail("alice@example.org")
        code, text = client.rcpt("bob@example.org")
    assert (code, text) == (550, b"5.7.0 authentication required on the submission port")


# The nmap smtp-open-relay forms (nselib smtp-open-relay.nse), with the null sender, a forged
# local sender and an outside one, from an unauthenticated outside address.
RELAY_FORMS = [
    "relaytest@far.example",
    "relaytest%far.example@example.org",
    "relaytest%far.example@[127.0.0.1]",
    '"relaytest@far.example"',
    '"relaytest%far.example"',
    "relaytest@far.example@example.org",
    '"relaytest@far.example"@example.org',
    "relaytest@far.example@[127.0.0.1]",
    "@example.org:relaytest@far.example",
    "@[127.0.0.1]:relaytest@far.example",
    "far.example!relaytest",
    "far.example!relaytest@example.org",
    "far.example!relaytest@[127.0.0.1]",
    "relaytest%far.example",
    "relaytest@far.example%example.org",
    "relaytest%far.example%example.org@example.org",
    "example.org!far.example!relaytest",
    '"far.example!relaytest"@example.org',
]
SENDERS = ["", "alice@example.org", "someone@remote.example"]


@pytest.mark.parametrize("sender", SENDERS)
def test_open_relay_battery_accepts_nothing(stack: Stack, sender: str) -> None:
    """One connection per form: Exim drops a client after three syntax errors, and several
    forms are (rightly) syntax errors. Every answer is a refusal; none is a 2xx."""
    answers = {}
    for form in RELAY_FORMS:
        with stack.smtp(OUTSIDER) as client:
            assert client.mail(sender)[0] == 250
            answers[form] = client.rcpt(form)
    accepted = {form: answer for form, answer in answers.items() if answer[0] // 100 == 2}
    assert not accepted
    assert all(code // 100 == 5 for code, _ in answers.values()), answers


def test_daemon_down_defers_then_the_retry_is_delivered(stack: Stack) -> None:
    mark = marker()
    stack.stop_policy()
    try:
        # Exim asks the daemon at connect: new sessions are turned away with a 4xx before
        # they send anything, relay clients too (tests/test_exim_failsafe.py covers the later
        # stages, with sessions opened while the daemon was up).
        for source in ("127.0.0.2", RELAY_CLIENT):
            assert stack.greeting(source) == (451, b"4.3.0 policy daemon unavailable")
    finally:
        stack.start_policy()
    # The sender's retry, with the daemon back: delivered, nothing lost.
    assert send(stack, "someone@remote.example", ["bob@example.org"], mark) == {}
    stack.wait_maildir("example.org", "bob", mark)
