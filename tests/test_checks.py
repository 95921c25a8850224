"""The checks, one section each: restricted_characters, relay, recipient, sender_verify."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from policy.aliases import Kind, Limits
from policy.checks import Context, Result, recipient, relay, restricted_characters, sender_verify
from policy.mailtree import Snapshot, TreeLoader
from policy.verdict import Action

PRIMARY = "mail.example.org"
MakeTree = Callable[[dict[str, str]], Path]
STRANGER = "203.0.113.5"


def load(root: Path) -> Snapshot:
    return TreeLoader(str(root), PRIMARY).refresh()[0]


@pytest.fixture
def snap(tree: Path) -> Snapshot:
    s = load(tree)
    assert s.problems == []
    return s


def ctx(
    snapshot: Snapshot,
    rcpt: str = "",
    ip: str = STRANGER,
    auth: str = "",
    sender: str = "someone@remote.example",
    stage: str = "RCPT",
    limits: Limits | None = None,
) -> Context:
    return Context(stage, ip, sender, rcpt, "helo.example", auth, snapshot, limits or Limits())


def assert_status(result: Result, action: Action, code: int, enhanced: str, check: str) -> None:
    v = result.verdict
    assert v is not None, result
    assert (v.action, v.status.code, v.status.enhanced, v.check) == (action, code, enhanced, check)


def break_file(root: Path, rel: str, text: str = '"unterminated\n') -> None:
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_text(text)


# --- restricted_characters ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "rcpt",
    [
        "a%b@example.org",  # percent hack
        '"a@b"@example.org',  # quoted local part holding an @
        "b!a@example.org",  # bang path
        "|cmd@example.org",
        "/etc/passwd@example.org",
        "a/b@example.org",
        ".bob@example.org",
        "a|b@example.com",
        "a%remote.example@mail.example.org",
        "a%b@example.info",  # rewrite domain: local rules
        "a/b@EXAMPLE.INFO",
        # other domains
        "a/../b@remote.example",
        "/path@remote.example",
        "|cmd@remote.example",
        ".x@remote.example",
        "a%b@remote.example",
        "a!b@remote.example",
        '"a@b"@remote.example',
    ],
)
def test_restricted_characters_deny(snap: Snapshot, rcpt: str) -> None:
    result = restricted_characters.check(ctx(snap, rcpt, auth="alice@example.org"))
    assert_status(result, Action.DENY, 550, "5.1.3", "restricted_characters")
    assert result.verdict is not None
    assert result.verdict.text == "restricted characters in address"


@pytest.mark.parametrize(
    "rcpt",
    ["bob", "bob@", "@example.org", "bob@exa mple.org", "bob@.example.org", "bob@example..org", ""],
)
def test_restricted_characters_malformed(snap: Snapshot, rcpt: str) -> None:
    result = restricted_characters.check(ctx(snap, rcpt))
    assert_status(result, Action.DENY, 550, "5.1.3", "restricted_characters")
    assert result.verdict is not None
    assert result.verdict.text == "malformed recipient address"


@pytest.mark.parametrize(
    "rcpt",
    [
        "bob@example.org",
        "bob+tag@example.org",
        "first.last@example.org",
        "a/b@remote.example",  # a slash is only refused for local domains
        "a|b@remote.example",
        "a/..b@remote.example",
        "jörg@例え.jp",
        "bob@[192.0.2.1]",
    ],
)
def test_restricted_characters_pass(snap: Snapshot, rcpt: str) -> None:
    assert restricted_characters.check(ctx(snap, rcpt)) == Result()


# --- relay -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rcpt", ["bob@example.org", "x@EXAMPLE.COM", "nobody@example.net", "x@mail.example.org"]
)
def test_relay_local_domains_from_anyone(snap: Snapshot, rcpt: str) -> None:
    c = ctx(snap, rcpt)
    result = relay.check(c)
    assert result.verdict is None
    assert "is a local domain" in result.note
    assert c.relayed is False  # the recipient check still verifies it


def test_relay_rewrite_domain_from_anyone(snap: Snapshot) -> None:
    c = ctx(snap, "bob@Example.Info")
    result = relay.check(c)
    assert result.verdict is None
    assert result.source == "exim/conf/rewrite_domains:12"
    assert c.relayed is False


@pytest.mark.parametrize(("rcpt", "line"), [("x@backup.example", 15), ("x@MX.Backup.Example", 16)])
def test_relay_to_domains_from_anyone(snap: Snapshot, rcpt: str, line: int) -> None:
    c = ctx(snap, rcpt)
    result = relay.check(c)
    assert result.verdict is None
    assert result.source == f"exim/conf/relay_to_domains:{line}"
    assert c.relayed is True


def test_relay_for_local_submission_without_ip(snap: Snapshot) -> None:
    """No client IP: `exim -bs` by a local user, accepted like Exim's `accept hosts = :`."""
    c = ctx(snap, "x@remote.example", ip="")
    result = relay.check(c)
    assert result.verdict is None and c.relayed is True
    assert "local submission" in result.note


@pytest.mark.parametrize(
    "ip",
    [
        "203.0.113.5",
        "2001:db9::1",
        "128.0.0.1",
        "::2",
        "127.evil",
        "::ffff:203.0.113.5",
        "127.0.0.2",
        "127.1.2.3",
        "::ffff:127.0.0.2",
    ],
)
def test_relay_denied(snap: Snapshot, ip: str) -> None:
    for rcpt in ("x@remote.example", "x@notbackup.example", "x@example.org.evil"):
        c = ctx(snap, rcpt, ip=ip)
        result = relay.check(c)
        assert_status(result, Action.DENY, 550, "5.7.1", "relay")
        assert result.verdict is not None
        assert result.verdict.text == "relay not permitted"
        assert "not authenticated and not in relay_from_hosts" in result.verdict.reason
        assert c.relayed is False


def test_relay_for_authenticated_sessions(snap: Snapshot) -> None:
    c = ctx(snap, "x@remote.example", auth="alice@example.org")
    result = relay.check(c)
    assert result.verdict is None
    assert "authenticated" in result.note
    assert c.relayed is True


@pytest.mark.parametrize("ip", ["127.0.0.1", "::1", "::ffff:127.0.0.1"])
def test_relay_from_loopback(snap: Snapshot, ip: str) -> None:
    c = ctx(snap, "x@remote.example", ip=ip)
    result = relay.check(c)
    assert result.verdict is None
    assert "localhost" in result.note
    assert c.relayed is True


@pytest.mark.parametrize(
    ("ip", "line"),
    [("192.0.2.1", 14), ("::ffff:192.0.2.200", 14), ("198.51.100.7", 15), ("2001:db8:5::1", 16)],
)
def test_relay_from_hosts(snap: Snapshot, ip: str, line: int) -> None:
    c = ctx(snap, "x@remote.example", ip=ip)
    result = relay.check(c)
    assert result.verdict is None
    assert result.source == f"exim/conf/relay_from_hosts:{line}"
    assert c.relayed is True


def test_relay_from_hosts_negated_entry_denies(make_tree: MakeTree) -> None:
    s = load(
        make_tree(
            {"exim/conf/relay_from_hosts": "!192.0.2.66\n192.0.2.0/24\n! 2001:db8::1\n::/0\n"}
        )
    )
    for ip, line in (("192.0.2.66", 1), ("2001:db8::1", 3)):
        result = relay.check(ctx(s, "x@remote.example", ip=ip))
        assert_status(result, Action.DENY, 550, "5.7.1", "relay")
        assert result.verdict is not None
        assert "excluded by relay_from_hosts" in result.verdict.reason
        assert result.verdict.source == f"exim/conf/relay_from_hosts:{line}"
    assert relay.check(ctx(s, "x@remote.example", ip="192.0.2.65")).verdict is None
    assert relay.check(ctx(s, "x@remote.example", ip="2001:db8::2")).verdict is None


@pytest.mark.parametrize(
    "rel", ["exim/conf/relay_from_hosts", "exim/conf/relay_to_domains", "exim/conf/rewrite_domains"]
)
def test_relay_defers_when_a_needed_list_is_unavailable(make_tree: MakeTree, rel: str) -> None:
    root = make_tree({"passwd/example.org": "bob:{PLAIN}x\n"})
    text = (
        "mail.example.com\n" if rel.endswith("hosts") else "^(\n" if "to_domains" in rel else "x\n"
    )
    break_file(root, rel, text)
    s = load(root)
    assert s.lists[rel.rsplit("/", 1)[1]].data is None
    result = relay.check(ctx(s, "x@remote.example"))
    assert_status(result, Action.DEFER, 451, "4.3.0", "relay")
    assert result.verdict is not None
    assert result.verdict.reason.startswith(f"{rel}:1: ")
    assert rel not in result.verdict.text  # file names stay in the log
    # A local domain needs none of them.
    assert relay.check(ctx(s, "bob@example.org")).verdict is None


def test_relay_unavailable_hosts_still_relays_for_auth_and_loopback(make_tree: MakeTree) -> None:
    root = make_tree({})
    break_file(root, "exim/conf/relay_from_hosts", "@[]\n")
    s = load(root)
    assert relay.check(ctx(s, "x@remote.example", auth="u")).verdict is None
    assert relay.check(ctx(s, "x@remote.example", ip="127.0.0.1")).verdict is None


# --- recipient ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rcpt", "kind", "source"),
    [
        ("bob@example.org", Kind.USER, "passwd/example.org:14"),
        ("Bob+Tag@Example.ORG", Kind.USER, "passwd/example.org:14"),
        ("bob@example.info", Kind.USER, "passwd/example.org:14"),
        ("info@example.org", Kind.ALIAS, "aliases/example.org:17"),
        ("whoever@example.net", Kind.ALIAS, "aliases/example.net:14"),
        ("hello@example.com", Kind.ALIAS, "aliases/example.com:12"),
        ("abuse@example.com", Kind.ALIAS, "exim/conf/global_aliases:14"),
        ("postmaster@mail.example.org", Kind.ALIAS, "exim/conf/global_aliases:13"),
    ],
)
def test_recipient_accepts(snap: Snapshot, rcpt: str, kind: Kind, source: str) -> None:
    c = ctx(snap, rcpt)
    result = recipient.check(c)
    assert result.verdict is None
    assert result.source == source
    assert c.target is not None and c.target.kind is kind
    if kind is Kind.ALIAS:
        assert result.note.startswith("alias of ")


def test_recipient_postmaster_always(make_tree: MakeTree) -> None:
    s = load(make_tree({"passwd/example.de": "erin:{PLAIN}x\n"}))
    c = ctx(s, "Postmaster@example.de")
    assert recipient.check(c).verdict is None
    assert c.target is not None and c.target.kind is Kind.POSTMASTER


@pytest.mark.parametrize(
    "rcpt",
    [
        "nobody@example.org",
        "nobody@example.com",
        "nobody@example.info",
        "alice@mail.example.org",
        "nobody+postmaster@example.org",
    ],
)
def test_recipient_unknown_user(snap: Snapshot, rcpt: str) -> None:
    result = recipient.check(ctx(snap, rcpt))
    assert_status(result, Action.DENY, 550, "5.1.1", "recipient")
    assert result.verdict is not None
    assert result.verdict.text == f"<{rcpt}>: no such user here"


def test_recipient_relayed_is_not_verified(snap: Snapshot) -> None:
    c = ctx(snap, "nobody@example.org")
    c.relayed = True
    assert recipient.check(c) == Result()
    assert c.target is None


def test_recipient_rewritten_to_remote_passes(make_tree: MakeTree) -> None:
    s = load(make_tree({"exim/conf/rewrite_domains": "old.example: new.example\n"}))
    c = ctx(s, "x@old.example")
    result = recipient.check(c)
    assert result.verdict is None
    assert c.target is not None and c.target.address == "x@new.example"


@pytest.mark.parametrize(
    ("rel", "rcpt"),
    [
        ("passwd/example.org", "bob@example.org"),
        ("passwd/example.org", "nobody@example.org"),  # never 550 without readable files
        ("aliases/example.org", "bob@example.org"),
        ("exim/conf/global_aliases", "nobody@example.com"),
        ("exim/conf/rewrite_domains", "bob@example.org"),
        ("passwd/example.net", "sales@example.org"),  # an alias target's file
    ],
)
def test_recipient_defers_when_a_file_is_unavailable(tree: Path, rel: str, rcpt: str) -> None:
    (tree / rel).unlink()
    (tree / rel).mkdir()  # unreadable, even for root
    s = load(tree)
    result = recipient.check(ctx(s, rcpt))
    assert_status(result, Action.DEFER, 451, "4.3.0", "recipient")
    assert result.verdict is not None
    assert "cannot read" in result.verdict.reason


def test_recipient_alias_loop_defers(make_tree: MakeTree) -> None:
    s = load(make_tree({"aliases/example.org": "a: b\nb: a\n"}))
    result = recipient.check(ctx(s, "a@example.org"))
    assert_status(result, Action.DEFER, 451, "4.4.6", "recipient")
    assert result.verdict is not None
    assert "alias loop a@example.org -> b@example.org -> a@example.org" in result.verdict.reason
    assert result.verdict.text == "alias loop detected, please try later"
    assert result.source == "aliases/example.org:1"


def test_recipient_fan_out_limit_defers(make_tree: MakeTree) -> None:
    s = load(make_tree({"aliases/example.org": "all: a@x.example, b@x.example, c@x.example\n"}))
    result = recipient.check(ctx(s, "all@example.org", limits=Limits(max_targets=2)))
    assert_status(result, Action.DEFER, 451, "4.3.0", "recipient")
    assert result.verdict is not None and "more than 2 addresses" in result.verdict.reason
    ok = recipient.check(ctx(s, "all@example.org", limits=Limits(max_targets=3)))
    assert ok.verdict is None
    assert ok.note == "alias of a@x.example, b@x.example, c@x.example"


# --- sender_verify -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sender", "exempt", "source"),
    [
        ("", True, ""),
        ("postmaster@anywhere.example", True, ""),
        ("PostMaster@anywhere.example", True, ""),
        ("newsletter@shop.example", True, "exim/conf/senderverify_exceptions:15"),
        ("NewsLetter@Shop.Example", True, "exim/conf/senderverify_exceptions:15"),
        ("anyone@lists.example", True, "exim/conf/senderverify_exceptions:16"),
        ("other@shop.example", False, ""),
        ("anyone@lists.example.org", False, ""),
    ],
)
def test_sender_verify_exemption(snap: Snapshot, sender: str, exempt: bool, source: str) -> None:
    got, why, src = sender_verify.exemption(snap, sender)
    assert (got, src) == (exempt, source)
    assert why
    result = asyncio.run(sender_verify.check(ctx(snap, sender=sender, stage="MAIL")))
    assert result.verdict is None  # exempt, or (without services) the callout is not run
    assert result.source == source
    assert ("callout not run (no network)" in result.note) is (not exempt)


def test_sender_verify_regex_exception(make_tree: MakeTree) -> None:
    s = load(make_tree({"exim/conf/senderverify_exceptions": "^bounce-[0-9]+@shop[.]example$\n"}))
    assert sender_verify.exemption(s, "bounce-42@shop.example")[0] is True
    assert sender_verify.exemption(s, "bounce-x@shop.example")[0] is False


def test_sender_verify_unavailable_list(make_tree: MakeTree) -> None:
    root = make_tree({})
    break_file(root, "exim/conf/senderverify_exceptions", "^(\n")
    s = load(root)
    exempt, why, _ = sender_verify.exemption(s, "x@remote.example")
    assert exempt is None
    assert why.startswith("exim/conf/senderverify_exceptions:1: ")
    # The null sender and postmaster need no list.
    assert sender_verify.exemption(s, "")[0] is True
    assert sender_verify.exemption(s, "postmaster@x.example")[0] is True
    # Without the list the daemon cannot know who is exempt: a callout could refuse a sender
    # the admin exempted, so it defers.
    result = asyncio.run(sender_verify.check(ctx(s, sender="x@remote.example", stage="MAIL")))
    assert result.verdict is not None and result.verdict.status.code == 451
