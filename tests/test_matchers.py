"""policy.matchers: the indexed WildMap and HostList agree with plain linear scans."""

from __future__ import annotations

import ipaddress
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policy.listfiles import Entry, ListFileError, parse_items, parse_lsearch
from policy.matchers import HostList, Match, WildMap

SETTINGS = settings(max_examples=400, deadline=None)


# --- WildMap vs. Exim's nwildlsearch, as a linear scan -----------------------------------------


def reference_wild(keys: list[str], subject: str) -> int | None:
    """Index of the first key that matches, as Exim's nwildlsearch scans the file."""
    for i, key in enumerate(keys):
        if key.startswith("*"):
            hit = subject.lower().endswith(key[1:].lower())
        elif key.startswith("^"):
            hit = re.search(key.replace("\\N", ""), subject, re.IGNORECASE) is not None
        else:
            hit = subject.lower() == key.lower()
        if hit:
            return i
    return None


def wildmap(keys: list[str], path: str = "f") -> WildMap:
    return WildMap([Entry(k, f"v{i}", i + 1) for i, k in enumerate(keys)], path)


LABELS = ["example", "org", "EXAMPLE", "Org", "lists", "a", "b-c", "x1"]
REGEXES = [
    "^bounce-[0-9]+@",
    "^[a-c]",
    "^.*\\.org$",
    "^\\N^ab+\\N",
    "^(?:news|info)@",
    "^$",
    "^A",
]

domains = st.lists(st.sampled_from(LABELS), min_size=1, max_size=3).map(".".join)
addresses = st.one_of(
    domains,
    st.builds(
        lambda lp, d: f"{lp}@{d}", st.sampled_from(["bob", "Info", "bounce-12", "news"]), domains
    ),
)
exact_keys = addresses
suffix_keys = st.one_of(
    st.just("*"),
    addresses.map(lambda a: "*" + a),
    domains.map(lambda d: "*." + d),
    domains.map(lambda d: "*@" + d),
)
wild_keys = st.lists(
    st.one_of(exact_keys, suffix_keys, st.sampled_from(REGEXES)), min_size=0, max_size=12
)


@st.composite
def keys_and_subject(draw: st.DrawFn) -> tuple[list[str], str]:
    keys = draw(wild_keys)
    plain = [k.lstrip("*") for k in keys if not k.startswith("^")]
    candidates = [addresses, st.text(max_size=10)]
    if plain:
        from_keys = st.sampled_from(plain)
        candidates.append(from_keys)
        candidates.append(
            st.tuples(st.sampled_from(["", "x", "sub.", "Bob@"]), from_keys).map("".join)
        )
        candidates.append(from_keys.map(str.upper))
        candidates.append(from_keys.map(lambda s: s[1:]))
    return keys, draw(st.one_of(candidates))


@SETTINGS
@given(keys_and_subject())
def test_wildmap_agrees_with_linear_scan(case: tuple[list[str], str]) -> None:
    keys, subject = case
    m = wildmap(keys)
    assert len(m) == len(keys)
    expected = reference_wild(keys, subject)
    got = m.lookup(subject)
    if expected is None:
        assert got is None
    else:
        assert got == Match(keys[expected], f"v{expected}", expected + 1)


@pytest.mark.parametrize(
    ("subject", "line"),
    [
        ("backup.example", 1),
        ("BACKUP.Example", 1),
        ("mx.backup.example", 2),
        ("notbackup.example", None),
        ("bounce-7@shop.example", 3),
        ("Bounce-7@Shop.Example", 3),
        ("bounce-x@shop.example", None),
        ("anything@lists.example", 4),
        ("lists.example", None),
        ("xbackup.example.org", None),
    ],
)
def test_wildmap_examples(subject: str, line: int | None) -> None:
    entries = parse_lsearch(
        "backup.example\n*.backup.example\n^bounce-[0-9]+@shop[.]example$\n*@lists.example\n",
        "exim/conf/relay_to_domains",
    )
    hit = WildMap(entries, "exim/conf/relay_to_domains").lookup(subject)
    assert (hit.line if hit else None) == line


def test_wildmap_first_line_wins_across_kinds() -> None:
    m = wildmap(["^b", "*.org", "bob.org", "*"])
    assert m.lookup("bob.org").line == 1
    m = wildmap(["*", "^b", "bob.org"])
    assert m.lookup("bob.org").line == 1
    m = wildmap(["bob.org", "*.org", "bob.org", "^b"])
    assert m.lookup("BOB.ORG").line == 1
    assert m.lookup("x.org").line == 2
    assert m.lookup("b").line == 4
    assert m.lookup("") is None
    assert wildmap(["*"]).lookup("") is not None


def test_wildmap_regex_with_exim_n_wrapper() -> None:
    m = wildmap(["^\\N^[a-z]+\\d\\N"])
    assert m.lookup("abc1@x") is not None
    assert m.lookup("1abc") is None


def test_wildmap_bad_regex_names_the_line() -> None:
    entries = [Entry("ok", "", 3), Entry("^(unclosed", "", 5)]
    with pytest.raises(ListFileError) as info:
        WildMap(entries, "exim/conf/dkim_required")
    assert info.value.line == 5
    assert str(info.value).startswith("exim/conf/dkim_required:5: bad regular expression")


def test_wildmap_empty() -> None:
    assert wildmap([]).lookup("anything") is None
    assert len(wildmap([])) == 0


# --- HostList vs. a linear scan with ipaddress -------------------------------------------------


def mapped_to_v4(
    net: ipaddress.IPv4Network | ipaddress.IPv6Network,
) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """An item inside ::ffff:0:0/96 is the IPv4 network it maps (clients are mapped too)."""
    if isinstance(net, ipaddress.IPv6Network) and net.prefixlen >= 96:
        mapped = net.network_address.ipv4_mapped
        if mapped is not None:
            return ipaddress.ip_network(f"{mapped}/{net.prefixlen - 96}")
    return net


def reference_hosts(items: list[str], ip: str) -> tuple[bool, int] | None:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    for line, item in enumerate(items, 1):
        negated = item.startswith("!")
        body = item[1:].strip() if negated else item
        nets = (
            [ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")]
            if body == "*"
            else [mapped_to_v4(ipaddress.ip_network(body, strict=False))]
        )
        if any(addr.version == n.version and addr in n for n in nets):
            return (not negated, line)
    return None


def hostlist(items: list[str]) -> HostList:
    return HostList([Entry(item, "", n) for n, item in enumerate(items, 1)], "f")


# Addresses cluster in a few small ranges so that networks and subjects overlap often.
v4 = st.builds(
    lambda a, b, c, d: f"{a}.{b}.{c}.{d}",
    st.sampled_from([10, 127, 192, 198]),
    st.sampled_from([0, 51, 168]),
    st.integers(0, 3),
    st.integers(0, 255),
)
v6 = st.builds(
    lambda a, b, c: f"2001:db8:{a:x}::{b:x}:{c:x}",
    st.integers(0, 3),
    st.integers(0, 3),
    st.integers(0, 0xFFFF),
) | st.sampled_from(["::1", "::", "fe80::1"])
v4_net = st.one_of(v4, st.builds(lambda a, p: f"{a}/{p}", v4, st.integers(0, 32)))
v6_net = st.one_of(v6, st.builds(lambda a, p: f"{a}/{p}", v6, st.integers(0, 128)))
host_item = st.builds(
    lambda neg, space, item: ("!" + space if neg else "") + item,
    st.booleans(),
    st.sampled_from(["", " "]),
    st.one_of(v4_net, v6_net, st.just("*"), v4.map(lambda a: f"::ffff:{a}")),
)
subjects = st.one_of(
    v4,
    v6,
    v4.map(lambda a: f"::ffff:{a}"),
    st.sampled_from(["", "not-an-ip", "127.0.0.1.evil", "1.2.3", "::g"]),
)


@SETTINGS
@given(st.lists(host_item, max_size=12), subjects)
def test_hostlist_agrees_with_linear_scan(items: list[str], ip: str) -> None:
    assert hostlist(items).lookup(ip) == reference_hosts(items, ip)


@SETTINGS
@given(st.lists(host_item, min_size=1, max_size=12), st.data())
def test_hostlist_subjects_inside_listed_networks(items: list[str], data: st.DataObject) -> None:
    # Subjects drawn from inside one of the listed networks, so hits are the common case.
    item = data.draw(st.sampled_from(items)).lstrip("! ")
    if item == "*":
        item = "0.0.0.0/0"
    net = ipaddress.ip_network(item, strict=False)
    offset = data.draw(st.integers(0, net.num_addresses - 1))
    ip = str(net.network_address + offset)
    assert hostlist(items).lookup(ip) == reference_hosts(items, ip)


def test_hostlist_examples() -> None:
    entries = parse_items(
        "!192.0.2.66\n192.0.2.0/24\n198.51.100.7\n2001:db8::/32\n! 2001:db8:1::/48\n",
        "exim/conf/relay_from_hosts",
    )
    hosts = HostList(entries, "exim/conf/relay_from_hosts")
    assert len(hosts) == 5
    assert hosts.lookup("192.0.2.66") == (False, 1)
    assert hosts.lookup("192.0.2.65") == (True, 2)
    assert hosts.lookup("::ffff:192.0.2.65") == (True, 2)
    assert hosts.lookup("198.51.100.7") == (True, 3)
    assert hosts.lookup("198.51.100.8") is None
    assert hosts.lookup("2001:db8:1::5") == (True, 4)  # first match wins: line 4 before 5
    assert hosts.lookup("2001:db9::1") is None
    assert hosts.lookup("") is None
    assert hosts.lookup("garbage") is None
    assert hosts.broad_lines == []


def test_hostlist_negation_first() -> None:
    hosts = hostlist(["! 2001:db8:1::/48", "2001:db8::/32", "*"])
    assert hosts.lookup("2001:db8:1::5") == (False, 1)
    assert hosts.lookup("2001:db8:2::5") == (True, 2)
    assert hosts.lookup("203.0.113.1") == (True, 3)


def test_hostlist_broad_lines() -> None:
    hosts = hostlist(["10.0.0.0/8", "0.0.0.0/1", "!*", "*", "2001::/15", "2001::/16"])
    assert hosts.broad_lines == [2, 4, 5]


@pytest.mark.parametrize(
    "item",
    [
        "mail.example.org",
        "@[]",
        "@",
        "localhost",
        "192.0.2.0/33",
        "2001:db8::/129",
        "192.0.2",
        "192.0.2.1/24/8",
        "!",
        "!!192.0.2.1",
        "garbage",
        "*.example.org",
        "net24-lsearch;/etc/x",
        "192.0.2.1 192.0.2.2",
    ],
)
def test_hostlist_bad_item_names_the_line(item: str) -> None:
    entries = [Entry("192.0.2.1", "", 2), Entry(item, "", 7)]
    with pytest.raises(ListFileError) as info:
        HostList(entries, "exim/conf/relay_from_hosts")
    assert info.value.line == 7
    assert str(info.value).startswith("exim/conf/relay_from_hosts:7: ")
    assert "not an IP address or network" in info.value.message
