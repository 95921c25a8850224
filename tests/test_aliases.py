"""policy.aliases: classify (what is this address?) and resolve (where does an alias go?)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from policy import aliases as aliases_mod
from policy.aliases import Kind, Limits, ResolveError, classify, resolve, rewrite
from policy.mailtree import Snapshot, TreeLoader

PRIMARY = "mail.example.org"
MakeTree = Callable[[dict[str, str]], Path]

FILES = {
    "passwd/example.org": "alice:{PLAIN}a\nbob:{PLAIN}b\ndave:{PLAIN}d\nops:{PLAIN}o\n",
    "aliases/example.org": (
        "info: alice, bob\n"
        "sales: bob, carol@example.net\n"
        "bob+lists: alice\n"
        "team: info, dave, Alice\n"
        "dave: dave, dave@remote.example\n"
        "loop1: loop2\n"
        "loop2: loop1\n"
        "self: self\n"
        "far: loop1@example.com\n"
        "gone: ghost\n"
    ),
    "passwd/example.net": "carol:{PLAIN}c\n",
    "aliases/example.net": "*: carol\nhostmaster: carol\n",
    "aliases/example.com": "hello: alice@example.org\nloop1: loop2\nloop2: far@example.org\n",
    "passwd/example.de": "erin:{PLAIN}e\n",
    "exim/conf/global_aliases": (
        "abuse: alice@example.org\n"
        "info: global-info@remote.example\n"
        "noc: ops\n"
        "sales+eu: eu@remote.example\n"
        "carol: archive@remote.example\n"
    ),
    "exim/conf/rewrite_domains": (
        "example.info: example.org\nchain.example: example.info\nold.example: new.example\n"
    ),
}


@pytest.fixture
def snap(make_tree: MakeTree) -> Snapshot:
    snapshot, _ = TreeLoader(str(make_tree(FILES)), PRIMARY).refresh()
    assert snapshot.problems == []
    return snapshot


def snapshot_of(make_tree: MakeTree, files: dict[str, str]) -> Snapshot:
    return TreeLoader(str(make_tree(files)), PRIMARY).refresh()[0]


# --- classify: the lookup order ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "kind", "final", "source"),
    [
        # domain alias before global alias
        ("info@example.org", Kind.ALIAS, "info@example.org", "aliases/example.org:1"),
        # global alias where the domain has none, before the catch-all
        ("info@example.net", Kind.ALIAS, "info@example.net", "exim/conf/global_aliases:2"),
        ("abuse@example.com", Kind.ALIAS, "abuse@example.com", "exim/conf/global_aliases:1"),
        (
            "abuse@mail.example.org",
            Kind.ALIAS,
            "abuse@mail.example.org",
            "exim/conf/global_aliases:1",
        ),
        # global alias before the user
        ("carol@example.net", Kind.ALIAS, "carol@example.net", "exim/conf/global_aliases:5"),
        # user
        ("alice@example.org", Kind.USER, "alice@example.org", "passwd/example.org:1"),
        ("Alice@EXAMPLE.Org", Kind.USER, "Alice@example.org", "passwd/example.org:1"),
        ("erin@example.de", Kind.USER, "erin@example.de", "passwd/example.de:1"),
        # +suffix: the full local part first (all sources), then without the suffix
        ("bob+lists@example.org", Kind.ALIAS, "bob+lists@example.org", "aliases/example.org:3"),
        ("bob+other@example.org", Kind.USER, "bob+other@example.org", "passwd/example.org:2"),
        ("info+x@example.org", Kind.ALIAS, "info+x@example.org", "aliases/example.org:1"),
        ("sales+eu@example.org", Kind.ALIAS, "sales+eu@example.org", "exim/conf/global_aliases:4"),
        ("sales+us@example.org", Kind.ALIAS, "sales+us@example.org", "aliases/example.org:2"),
        ("+alice@example.org", Kind.UNKNOWN, "+alice@example.org", ""),
        # catch-all, after users and aliases, with or without suffix
        ("nobody@example.net", Kind.ALIAS, "nobody@example.net", "aliases/example.net:1"),
        ("nobody+x@example.net", Kind.ALIAS, "nobody+x@example.net", "aliases/example.net:1"),
        ("hostmaster@example.net", Kind.ALIAS, "hostmaster@example.net", "aliases/example.net:2"),
        # postmaster is always accepted; a catch-all still takes it first
        ("postmaster@example.org", Kind.POSTMASTER, "postmaster@example.org", ""),
        ("PostMaster@example.com", Kind.POSTMASTER, "PostMaster@example.com", ""),
        ("postmaster@mail.example.org", Kind.POSTMASTER, "postmaster@mail.example.org", ""),
        ("postmaster@example.net", Kind.ALIAS, "postmaster@example.net", "aliases/example.net:1"),
        ("postmaster+x@example.org", Kind.UNKNOWN, "postmaster+x@example.org", ""),
        # unknown in a local domain
        ("nobody@example.org", Kind.UNKNOWN, "nobody@example.org", ""),
        ("nobody@example.com", Kind.UNKNOWN, "nobody@example.com", ""),
        ("alice@mail.example.org", Kind.UNKNOWN, "alice@mail.example.org", ""),
        # remote
        ("alice@remote.example", Kind.REMOTE, "alice@remote.example", ""),
        ("alice@EXAMPLE.ORG.evil", Kind.REMOTE, "alice@example.org.evil", ""),
        # rewrite_domains, applied once
        ("alice@example.info", Kind.USER, "alice@example.org", "passwd/example.org:1"),
        ("info@Example.INFO", Kind.ALIAS, "info@example.org", "aliases/example.org:1"),
        ("nobody@example.info", Kind.UNKNOWN, "nobody@example.org", ""),
        ("alice@chain.example", Kind.REMOTE, "alice@example.info", "exim/conf/rewrite_domains:2"),
        ("x@old.example", Kind.REMOTE, "x@new.example", "exim/conf/rewrite_domains:3"),
    ],
)
def test_classify(snap: Snapshot, address: str, kind: Kind, final: str, source: str) -> None:
    t = classify(snap, address)
    assert (t.kind, t.address, t.source) == (kind, final, source)
    if kind is Kind.ALIAS:
        assert t.alias is not None
    if final.split("@")[1] != address.split("@")[1].lower():
        assert f"rewritten to {final}" in t.note
    if source == "aliases/example.net:1":
        assert "catch-all" in t.note


def test_rewrite(snap: Snapshot) -> None:
    assert rewrite(snap, "Bob@Example.INFO") == ("Bob@example.org", "exim/conf/rewrite_domains:1")
    assert rewrite(snap, "bob@Example.ORG") == ("bob@example.org", "")
    assert rewrite(snap, "bob") == ("bob", "")


def test_classify_unavailable_files(make_tree: MakeTree) -> None:
    files = dict(FILES)
    files["passwd/example.de"] = "no hash here\n"
    files["exim/conf/global_aliases"] = '"broken\n'
    s = snapshot_of(make_tree, files)
    for address in ("erin@example.de", "alice@example.org", "x@mail.example.org"):
        t = classify(s, address)
        assert t.kind is Kind.UNAVAILABLE, address
        assert "no good version" in t.note
    assert classify(s, "x@remote.example").kind is Kind.REMOTE


def test_classify_unavailable_rewrite_domains(make_tree: MakeTree) -> None:
    files = dict(FILES)
    files["exim/conf/rewrite_domains"] = "example.info: not a domain!\n"
    s = snapshot_of(make_tree, files)
    for address in ("alice@example.org", "x@example.info", "x@remote.example"):
        t = classify(s, address)
        assert t.kind is Kind.UNAVAILABLE
        assert t.note.startswith("exim/conf/rewrite_domains:1: ")


def test_classify_unavailable_domain_aliases(make_tree: MakeTree) -> None:
    files = dict(FILES)
    files["aliases/example.net"] = "x: |/bin/sh\n"
    s = snapshot_of(make_tree, files)
    assert classify(s, "carol@example.net").kind is Kind.UNAVAILABLE
    assert classify(s, "alice@example.org").kind is Kind.USER


# --- resolve -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "expansion"),
    [
        ("info@example.org", ["alice@example.org", "bob@example.org"]),
        ("INFO@example.org", ["alice@example.org", "bob@example.org"]),
        ("info+x@example.org", ["alice@example.org", "bob@example.org"]),
        ("sales@example.org", ["bob@example.org", "archive@remote.example"]),  # via global carol
        # nested, duplicates removed, order of first appearance
        (
            "team@example.org",
            [
                "alice@example.org",
                "bob@example.org",
                "dave@example.org",
                "dave@remote.example",
                "Alice@example.org",
            ],
        ),
        # unqualified target: the alias's domain (catch-all and domain alias)
        ("hostmaster@example.net", ["archive@remote.example"]),
        ("whoever@example.net", ["archive@remote.example"]),
        # a global alias's unqualified target: the looked-up domain
        ("noc@example.org", ["ops@example.org"]),
        ("noc@example.com", ["ops@example.com"]),
        ("abuse@example.de", ["alice@example.org"]),
        # rewritten domains, also inside an expansion
        ("info@example.info", ["alice@example.org", "bob@example.org"]),
        ("hello@example.com", ["alice@example.org"]),
        # the bob: bob, bob@elsewhere idiom when bob has a mailbox
        ("dave@example.org", ["dave@example.org", "dave@remote.example"]),
        ("dave+x@example.org", ["dave@example.org", "dave@remote.example"]),
        # an alias to a local part that does not exist: the router bounces it, not us
        ("gone@example.org", ["ghost@example.org"]),
    ],
)
def test_resolve(snap: Snapshot, address: str, expansion: list[str]) -> None:
    assert resolve(snap, address) == expansion


@pytest.mark.parametrize(
    "address",
    [
        "alice@example.org",
        "Alice@Example.ORG",
        "bob+x@example.org",
        "x@remote.example",
        "X@REMOTE.example",
        "nobody@example.org",
        "postmaster@example.org",
    ],
)
def test_resolve_not_an_alias(snap: Snapshot, address: str) -> None:
    assert resolve(snap, address) is None


@pytest.mark.parametrize(
    ("address", "expansion"),
    [
        ("alice@example.info", ["alice@example.org"]),
        ("Alice@EXAMPLE.INFO", ["Alice@example.org"]),
        ("x@old.example", ["x@new.example"]),
        ("x@chain.example", ["x@example.info"]),
    ],
)
def test_resolve_only_rewritten(snap: Snapshot, address: str, expansion: list[str]) -> None:
    assert resolve(snap, address) == expansion


@pytest.mark.parametrize(
    ("address", "path"),
    [
        ("loop1@example.org", "loop1@example.org -> loop2@example.org -> loop1@example.org"),
        ("loop2@example.org", "loop2@example.org -> loop1@example.org -> loop2@example.org"),
        ("self@example.org", "self@example.org -> self@example.org"),
        (
            "far@example.org",
            "far@example.org -> loop1@example.com -> loop2@example.com -> far@example.org",
        ),
    ],
)
def test_resolve_loop(snap: Snapshot, address: str, path: str) -> None:
    with pytest.raises(ResolveError) as info:
        resolve(snap, address)
    assert info.value.loop is True
    assert f"alias loop {path} (" in str(info.value)


def chain_files(n: int) -> dict[str, str]:
    lines = [f"d{i}: d{i + 1}" for i in range(n - 1)] + [f"d{n - 1}: alice"]
    return {"passwd/example.org": "alice:{PLAIN}a\n", "aliases/example.org": "\n".join(lines)}


def test_depth_limit(make_tree: MakeTree) -> None:
    s = snapshot_of(make_tree, chain_files(12))
    assert resolve(s, "d2@example.org", Limits(max_depth=10)) == ["alice@example.org"]
    with pytest.raises(ResolveError, match="deeper than 10") as info:
        resolve(s, "d1@example.org", Limits(max_depth=10))
    assert info.value.loop is True
    assert resolve(s, "d0@example.org", Limits(max_depth=12)) == ["alice@example.org"]
    with pytest.raises(ResolveError, match="deeper than 11"):
        resolve(s, "d0@example.org", Limits(max_depth=11))


def test_fan_out_limit(make_tree: MakeTree) -> None:
    s = snapshot_of(
        make_tree,
        {
            "aliases/example.org": "all: a@x.example, b@x.example, c@x.example, sub\n"
            "sub: d@x.example, a@x.example\n",
        },
    )
    assert len(resolve(s, "all@example.org", Limits(max_targets=4)) or []) == 4
    with pytest.raises(ResolveError, match="expands to more than 3 addresses") as info:
        resolve(s, "all@example.org", Limits(max_targets=3))
    assert info.value.loop is False


def test_repeated_targets_do_not_explode(
    make_tree: MakeTree, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each level lists the next one 8 times: 8**9 lookups without a bound on the work.
    lines = [f"a{i}: " + ", ".join([f"a{i + 1}"] * 8) for i in range(9)] + ["a9: alice"]
    s = snapshot_of(
        make_tree,
        {
            "passwd/example.org": "alice:{PLAIN}a\n",
            "aliases/example.org": "\n".join(lines) + "\n",
        },
    )
    calls = 0
    real = aliases_mod.classify

    def counting(snapshot: Snapshot, address: str) -> aliases_mod.Target:
        nonlocal calls
        calls += 1
        return real(snapshot, address)

    monkeypatch.setattr(aliases_mod, "classify", counting)
    assert resolve(s, "a7@example.org") == ["alice@example.org"]  # 8 + 64 + 8 lookups: fine
    with pytest.raises(ResolveError, match="lookups to expand") as info:
        resolve(s, "a0@example.org")
    assert info.value.loop is False
    assert calls <= 2 * Limits().max_targets * Limits().max_depth


def test_resolve_unavailable(make_tree: MakeTree) -> None:
    files = dict(FILES)
    files["passwd/example.net"] = "broken\n"
    s = snapshot_of(make_tree, files)
    # The alias itself is readable, a target's domain is not.
    with pytest.raises(ResolveError, match=r"passwd/example\.net:1") as info:
        resolve(s, "sales@example.org")
    assert info.value.loop is False
    with pytest.raises(ResolveError, match="no good version"):
        resolve(s, "hostmaster@example.net")
    assert resolve(s, "info@example.org") == ["alice@example.org", "bob@example.org"]


def test_resolve_unreadable_global_aliases(make_tree: MakeTree) -> None:
    root = make_tree(FILES)
    (root / "exim/conf/global_aliases").unlink()
    (root / "exim/conf/global_aliases").mkdir()
    s = TreeLoader(str(root), PRIMARY).refresh()[0]
    with pytest.raises(ResolveError, match="cannot read"):
        resolve(s, "info@example.org")
    with pytest.raises(ResolveError, match="cannot read"):
        resolve(s, "alice@example.org")
