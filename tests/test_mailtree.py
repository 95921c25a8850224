"""policy.mailtree: loading the data tree, reloading on change, keeping the last good version."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from policy.listfiles import ListFileError
from policy.mailtree import (
    CONF_LISTS,
    Loaded,
    Snapshot,
    TreeLoader,
    parse_aliases,
    parse_passwd,
    parse_rewrite_domains,
)
from policy.matchers import HostList, WildMap

PRIMARY = "mail.example.org"
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "srv-mail"
MakeTree = Callable[[dict[str, str]], Path]


def pick(snap: Snapshot, rel: str) -> Loaded[Any]:
    sub, name = rel.rsplit("/", 1)
    if sub == "passwd":
        return snap.users[name]
    if sub == "aliases":
        return snap.aliases[name]
    return snap.lists[name]


def load(root: Path, primary: str = PRIMARY) -> tuple[TreeLoader, Snapshot]:
    loader = TreeLoader(str(root), primary)
    snapshot, _ = loader.refresh()
    return loader, snapshot


def edit(path: Path, text: str) -> None:
    """Rewrite a file so that its stat changes even within one clock tick."""
    before = path.stat() if path.exists() else None
    path.write_text(text)
    if before is not None:
        st = path.stat()
        if (st.st_mtime_ns, st.st_size) == (before.st_mtime_ns, before.st_size):
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


# --- the example tree --------------------------------------------------------------------------


def test_example_tree_loads_clean(tree: Path) -> None:
    _, snap = load(tree)
    assert snap.problems == []
    assert sorted(snap.users) == ["example.net", "example.org"]
    assert sorted(snap.aliases) == ["example.com", "example.net", "example.org"]
    for domain in ("example.org", "example.net", "example.com", PRIMARY):
        assert snap.is_local_domain(domain)
    for domain in ("example.info", "backup.example", "example.edu", ""):
        assert not snap.is_local_domain(domain)
    assert set(snap.lists) == set(CONF_LISTS)
    assert sorted(snap.users["example.org"].data or {}) == ["alice", "bob"]
    assert snap.users["example.org"].data["bob"].hash.startswith("{SHA512-CRYPT}$6$")
    info = snap.aliases["example.org"].data["info"]
    assert (info.targets, info.line) == (("alice", "bob"), 17)
    assert snap.rewrite_domains.data == {"example.info": ("example.org", 12)}
    assert snap.relay_from_hosts.data.lookup("192.0.2.9") == (True, 14)
    assert snap.relay_to_domains.data.lookup("mx.backup.example").line == 16
    assert snap.senderverify_exceptions.data.lookup("x@lists.example") is not None
    assert snap.dkim_required.data.lookup("paypal.example") is not None
    assert snap.global_aliases.data["postmaster"].targets == ("alice@example.org",)
    assert snap.aliases["example.org"].source(17) == "aliases/example.org:17"
    assert snap.root == str(tree)


def test_primary_hostname_is_local_and_normalised(make_tree: MakeTree) -> None:
    root = make_tree({})
    _, snap = load(root, "Mail.Example.ORG.")
    assert snap.primary_hostname == "mail.example.org"
    assert snap.is_local_domain("mail.example.org")
    _, snap = load(root, "")
    assert not snap.is_local_domain("")


def test_empty_tree_all_lists_empty(make_tree: MakeTree) -> None:
    _, snap = load(make_tree({}))
    assert snap.users == {} and snap.aliases == {}
    assert snap.problems == []
    for name in CONF_LISTS:
        assert snap.lists[name].available, name
    assert snap.global_aliases.data == {}
    assert snap.rewrite_domains.data == {}
    assert isinstance(snap.relay_from_hosts.data, HostList)
    assert len(snap.relay_from_hosts.data) == 0
    assert isinstance(snap.relay_to_domains.data, WildMap)
    assert snap.relay_to_domains.data.lookup("x") is None


def test_missing_optional_list_is_empty(tree: Path) -> None:
    (tree / "exim/conf/relay_from_hosts").unlink()
    (tree / "exim/conf/global_aliases").unlink()
    _, snap = load(tree)
    assert snap.relay_from_hosts.available
    assert snap.relay_from_hosts.data.lookup("192.0.2.9") is None
    assert snap.global_aliases.data == {}
    assert snap.problems == []


@pytest.mark.parametrize(
    "name",
    [
        "example.de~",
        ".example.de.swp",
        "example.de.swp",
        ".hidden",
        "#example.de#",
        "example.de.bak",
        "example.de.dpkg-old",
        "example.de.tmp",
        "not a domain",
    ],
)
def test_editor_leftovers_are_not_domains(make_tree: MakeTree, name: str) -> None:
    root = make_tree({f"passwd/{name}": "x:{PLAIN}y\n", f"aliases/{name}": "a: b@c.example\n"})
    _, snap = load(root)
    assert snap.users == {} and snap.aliases == {}
    assert not snap.is_local_domain(name)
    assert not snap.is_local_domain("example.de")


def test_domain_file_names_case_insensitive(make_tree: MakeTree) -> None:
    _, snap = load(make_tree({"passwd/Example.DE": "Alice:{PLAIN}x\n"}))
    assert snap.is_local_domain("example.de")
    assert "alice" in snap.users["example.de"].data
    assert snap.users["example.de"].path == "passwd/Example.DE"


# --- reloading ---------------------------------------------------------------------------------


def test_refresh_same_object_when_nothing_changed(tree: Path) -> None:
    loader, snap = load(tree)
    again, messages = loader.refresh()
    assert again is snap
    assert messages == []
    forced, _ = loader.refresh(force=True)
    assert forced is not snap
    assert forced.users["example.org"].data == snap.users["example.org"].data


def test_edited_file_is_picked_up(tree: Path) -> None:
    loader, snap = load(tree)
    path = tree / "passwd/example.org"
    edit(path, path.read_text() + "dave:{PLAIN}x\n")
    new, messages = loader.refresh()
    assert new is not snap
    assert messages == []
    assert "dave" in new.users["example.org"].data
    assert "dave" not in snap.users["example.org"].data  # the old snapshot is never mutated
    # Unchanged files are reused as they were, not re-parsed.
    assert new.aliases["example.org"] is snap.aliases["example.org"]
    assert new.relay_from_hosts is snap.relay_from_hosts


def test_edited_conf_list_is_picked_up(tree: Path) -> None:
    loader, snap = load(tree)
    assert snap.relay_from_hosts.data.lookup("203.0.113.5") is None
    edit(tree / "exim/conf/relay_from_hosts", "203.0.113.0/24\n")
    new, _ = loader.refresh()
    assert new.relay_from_hosts.data.lookup("203.0.113.5") == (True, 1)
    assert new.relay_from_hosts.data.lookup("192.0.2.9") is None


def test_new_domain_file_appears(tree: Path) -> None:
    loader, snap = load(tree)
    (tree / "aliases/example.de").write_text("info: alice@example.org\n")
    new, _ = loader.refresh()
    assert new is not snap
    assert new.is_local_domain("example.de") and not snap.is_local_domain("example.de")


def test_deleting_passwd_file_removes_domain(make_tree: MakeTree) -> None:
    root = make_tree({"passwd/example.de": "a:{PLAIN}x\n", "passwd/example.at": "b:{PLAIN}x\n"})
    loader, snap = load(root)
    assert snap.is_local_domain("example.de")
    (root / "passwd/example.de").unlink()
    new, _ = loader.refresh()
    assert new is not snap
    assert not new.is_local_domain("example.de")
    assert new.is_local_domain("example.at")
    assert "example.de" not in new.users


@pytest.mark.parametrize(
    ("rel", "broken", "line"),
    [
        ("passwd/example.org", "alice:{PLAIN}x\nbroken line\n", 2),
        ("aliases/example.org", "info: alice\n\n\nbad: |/bin/sh\n", 4),
        ("exim/conf/global_aliases", 'postmaster: alice@example.org\n"open\n', 2),
        ("exim/conf/rewrite_domains", "example.info: not a domain\n", 1),
        ("exim/conf/relay_from_hosts", "192.0.2.0/24\nmail.example.org\n", 2),
        ("exim/conf/relay_to_domains", "ok.example\n^(bad\n", 2),
        ("exim/conf/senderverify_exceptions", "# c\n^[\n", 2),
        ("exim/conf/dkim_required", "  continuation\n", 1),
    ],
)
def test_broken_file_keeps_last_good_version(tree: Path, rel: str, broken: str, line: int) -> None:
    loader, snap = load(tree)
    good = pick(snap, rel)
    edit(tree / rel, broken)
    new, messages = loader.refresh()
    now = pick(new, rel)
    assert now.available
    assert now.data is good.data
    assert now.problem.startswith(f"{rel}:{line}: ")
    assert "keeping the last good version" in now.problem
    assert new.problems == [now.problem]
    assert messages == [now.problem]
    # Logged once: nothing new on the next refresh.
    again, messages = loader.refresh()
    assert again is new and messages == []
    # Broken again differently: still the first good version.
    edit(tree / rel, broken + "\n" + broken)
    newer, _ = loader.refresh()
    assert pick(newer, rel).data is good.data
    # Fixed: the problem goes away.
    (tree / rel).unlink()
    shutil.copy(EXAMPLE / rel, tree / rel)
    fixed, _ = loader.refresh()
    assert fixed.problems == []
    restored = pick(fixed, rel)
    assert restored.available and restored.data is not good.data  # parsed anew
    if isinstance(good.data, dict):
        assert restored.data == good.data


def test_broken_with_no_good_version_is_unavailable(make_tree: MakeTree) -> None:
    root = make_tree(
        {
            "passwd/example.de": "alice\n",
            "exim/conf/relay_from_hosts": "192.0.2.0/24\n@[]\n",
        }
    )
    loader, snap = load(root)
    users = snap.users["example.de"]
    assert users.data is None and not users.available
    assert users.problem.startswith("passwd/example.de:1: expected user:hash")
    assert "no good version" in users.problem
    assert snap.is_local_domain("example.de")  # still ours: its checks defer
    hosts = snap.relay_from_hosts
    assert not hosts.available
    assert hosts.problem.startswith("exim/conf/relay_from_hosts:2: ")
    assert sorted(snap.problems) == sorted([users.problem, hosts.problem])
    edit(root / "passwd/example.de", "alice:{PLAIN}x\n")
    new, _ = loader.refresh()
    assert new.users["example.de"].available
    assert new.problems == [hosts.problem]


def test_invalid_utf8_is_broken_with_line(make_tree: MakeTree) -> None:
    root = make_tree({})
    (root / "aliases").mkdir()
    (root / "aliases/example.de").write_bytes(b"a: b@example.org\nc: d\xff@example.org\n")
    _, snap = load(root)
    assert snap.aliases["example.de"].data is None
    assert snap.aliases["example.de"].problem.startswith("aliases/example.de:2: not valid UTF-8")


def test_unreadable_file_is_unavailable(tree: Path) -> None:
    loader, snap = load(tree)
    assert snap.users["example.org"].available
    # Tests run as root, for whom chmod 000 changes nothing: a directory cannot be read().
    (tree / "passwd/example.org").unlink()
    (tree / "passwd/example.org").mkdir()
    (tree / "exim/conf/relay_to_domains").unlink()
    (tree / "exim/conf/relay_to_domains").mkdir()
    new, messages = loader.refresh()
    users = new.users["example.org"]
    assert users.data is None
    assert "passwd/example.org: cannot read" in users.problem
    assert new.is_local_domain("example.org")
    assert new.relay_to_domains.data is None
    assert "exim/conf/relay_to_domains: cannot read" in new.relay_to_domains.problem
    assert sorted(messages) == sorted(new.problems)


def test_unlistable_passwd_directory_keeps_domains_unavailable(tree: Path) -> None:
    loader, snap = load(tree)
    assert snap.users["example.org"].available
    shutil.rmtree(tree / "passwd")
    (tree / "passwd").write_text("not a directory\n")
    new, messages = loader.refresh()
    assert any(m.startswith("passwd/: cannot list directory") for m in messages)
    # Still local domains, whose user files cannot be read: checks defer, never 550.
    assert new.is_local_domain("example.org") and new.is_local_domain("example.net")
    assert new.users["example.org"].data is None
    assert new.users["example.net"].data is None


# --- parsers -----------------------------------------------------------------------------------


def test_parse_passwd() -> None:
    text = (
        "# c\n\nAlice:{ARGON2ID}$x:1000:1000::/home:/bin/sh\n  bob : {PLAIN}pw \nalice:{PLAIN}2\n"
    )
    users = parse_passwd(text, "passwd/x")
    assert sorted(users) == ["alice", "bob"]
    assert users["alice"].hash == "{ARGON2ID}$x"
    assert users["alice"].line == 3  # first wins
    assert users["bob"].hash == "{PLAIN}pw"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("alice\n", "expected user:hash"),
        ("alice:\n", "expected user:hash"),
        (":hash\n", "bad user name"),
        ("a@b:hash\n", "bad user name"),
        ("a b:hash\n", "bad user name"),
    ],
)
def test_parse_passwd_errors(text: str, message: str) -> None:
    with pytest.raises(ListFileError, match=f"^passwd/x:2: {message}"):
        parse_passwd("ok:{PLAIN}x\n" + text, "passwd/x")


def test_parse_aliases_targets() -> None:
    aliases = parse_aliases("Info: alice, bob@example.net,,  carol\n*: dave\n", "a")
    assert aliases["info"].targets == ("alice", "bob@example.net", "carol")
    assert aliases["*"].targets == ("dave",)


@pytest.mark.parametrize(
    "dest",
    [
        "|/bin/sh",
        "/var/mail/x",
        ":include:/etc/x",
        ":fail:",
        '"a b"@x.example',
        "@x.example",
        ".a",
        "a@[192.0.2.1]",
        "a@b@c",
    ],
)
def test_parse_aliases_refuses_unsafe_destinations(dest: str) -> None:
    with pytest.raises(ListFileError, match=r"^a:2: .*not a plain address"):
        parse_aliases(f"ok: alice\nbad: bob, {dest}\n", "a")


def test_parse_aliases_needs_a_destination() -> None:
    with pytest.raises(ListFileError, match=r"^a:1: alias 'x' has no destination"):
        parse_aliases("x:\n", "a")


def test_parse_rewrite_domains() -> None:
    assert parse_rewrite_domains("Example.INFO: Example.ORG\n", "r") == {
        "example.info": ("example.org", 1)
    }
    for bad in ("example.info:\n", "example.info: a b\n", "[1.2.3.4]: x.org\n", "x: [1.2.3.4]\n"):
        with pytest.raises(ListFileError, match=r"^r:1: .*is not a domain"):
            parse_rewrite_domains(bad, "r")


def test_vanished_passwd_directory_defers_not_bounces(tree: Path) -> None:
    """passwd/ gone after a good load (an unmount, a move): its domains stay known, their
    users unavailable (451), instead of unknown users (550) or remote domains (relay 550)."""
    from policy.aliases import Kind, classify

    loader = TreeLoader(str(tree), "mail.example.org")
    first, _ = loader.refresh()
    shutil.rmtree(tree / "passwd")
    snap, messages = loader.refresh()
    assert snap is not first
    assert messages == [
        "passwd/ is missing: passwd/example.net unavailable (dependent checks defer)",
        "passwd/ is missing: passwd/example.org unavailable (dependent checks defer)",
    ]
    assert snap.is_local_domain("example.org")
    assert classify(snap, "alice@example.org").kind is Kind.UNAVAILABLE
    again, messages = loader.refresh()  # logged once, not on every poll
    assert again is snap and messages == []
    shutil.copytree(EXAMPLE / "passwd", tree / "passwd")
    back, _ = loader.refresh()
    assert classify(back, "alice@example.org").kind is Kind.USER
