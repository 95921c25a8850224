"""policy.addresses: split, domain syntax, restricted characters, +suffix, safe destinations."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policy.addresses import (
    is_valid_domain,
    restricted_local_part,
    safe_destination,
    split,
    strip_suffix,
)

# The seed's ACL lists, item by item, as Exim applies them (any item matching = restricted).
SEED_LOCAL = ["^[.]", "^.*[@%!/|]"]
SEED_REMOTE = ["^[./|]", "^.*[@%!]", "^.*/\\.\\./"]


def seed_restricted(local: str, local_domain: bool) -> bool:
    patterns = SEED_LOCAL if local_domain else SEED_REMOTE
    return any(re.match(p, local, re.DOTALL) for p in patterns)


@pytest.mark.parametrize(
    ("address", "parts"),
    [
        ("bob@example.org", ("bob", "example.org")),
        ('"a@b"@example.org', ('"a@b"', "example.org")),
        ("a@b@c", ("a@b", "c")),
        ("bob", ("bob", "")),
        ("bob@", ("bob", "")),
        ("@example.org", ("", "example.org")),
        ("", ("", "")),
    ],
)
def test_split_at_last_at(address: str, parts: tuple[str, str]) -> None:
    assert split(address) == parts


@pytest.mark.parametrize(
    ("local", "local_domain", "restricted"),
    [
        ("bob", True, False),
        ("bob.smith", True, False),
        ("bob+tag", True, False),
        (".bob", True, True),
        ("a%b", True, True),  # a%b@local: the percent hack
        ('"a@b"', True, True),  # "a@b"@local: a local part holding an @
        ("a@b", True, True),
        ("b!a", True, True),  # bang path
        ("|cmd", True, True),  # pipe
        ("/etc/passwd", True, True),  # file
        ("a/b", True, True),
        ("a|b", True, True),
        (".bob", False, True),
        ("/path", False, True),
        ("|cmd", False, True),
        ("a%b", False, True),
        ("a@b", False, True),
        ("b!a", False, True),
        ("a/../b", False, True),
        ("a/b", False, False),  # a slash is fine for other domains
        ("a|b", False, False),
        ("a/..b", False, False),
        ("bob.", False, False),
    ],
)
def test_restricted_local_part(local: str, local_domain: bool, restricted: bool) -> None:
    assert restricted_local_part(local, local_domain) is restricted


local_parts = st.text(st.sampled_from('ab.%!@/|+-_"\\ \n'), max_size=12) | st.text(max_size=12)


@settings(max_examples=400, deadline=None)
@given(local_parts)
def test_restricted_matches_seed_rules(local: str) -> None:
    assert restricted_local_part(local, True) == seed_restricted(local, True)
    assert restricted_local_part(local, False) == seed_restricted(local, False)
    # The local-domain rule is the stricter one.
    if restricted_local_part(local, False):
        assert restricted_local_part(local, True)


@pytest.mark.parametrize(
    ("local", "base"),
    [("bob+lists", "bob"), ("bob+a+b", "bob"), ("bob+", "bob"), ("bob", None), ("+x", None)],
)
def test_strip_suffix(local: str, base: str | None) -> None:
    assert strip_suffix(local) == base


@pytest.mark.parametrize(
    "domain",
    [
        "example.org",
        "EXAMPLE.ORG",
        "a",
        "mail-1.example.org",
        "_dmarc.example.org",
        "example.org.",
        "例え.jp",
        "[192.0.2.1]",
        "[IPv6:2001:db8::1]",
        "a" * 63 + ".org",
    ],
)
def test_valid_domains(domain: str) -> None:
    assert is_valid_domain(domain)


@pytest.mark.parametrize(
    "domain",
    [
        "",
        ".example.org",
        "example..org",
        "-example.org",
        "example-.org",
        "exa mple.org",
        "example.org/x",
        "a" * 64 + ".org",
        ("a" * 60 + ".") * 5,
        "[192.0.2.1",
        "[mail.example.org]",
        "example.org\n",
        "ex%ample.org",
    ],
)
def test_invalid_domains(domain: str) -> None:
    assert not is_valid_domain(domain)


@pytest.mark.parametrize(
    ("address", "safe"),
    [
        ("alice@example.org", True),
        ("alice+x@example.org", True),
        ("o'brien@example.org", True),
        ("jörg@example.org", True),
        ("alice", False),  # unqualified
        ("|/bin/sh@example.org", False),
        ("/var/mail/x@example.org", False),
        (":include:/etc/x@example.org", False),
        ('"a b"@example.org', False),
        ("a b@example.org", False),
        ("a,b@example.org", False),
        (".alice@example.org", False),
        ("alice@[192.0.2.1]", False),
        ("alice@exa mple.org", False),
        ("@example.org", False),
        ("a" * 65 + "@example.org", False),
    ],
)
def test_safe_destination(address: str, safe: bool) -> None:
    assert safe_destination(address) is safe
