"""Indexes for Exim's matching rules, built once per file load so a lookup never loops over the
list: its cost stays flat from 100 to 100 000 entries.

``WildMap`` implements ``nwildlsearch`` (Exim's ``wildlsearch`` without key expansion) over keys:

* a key starting with ``*`` matches any subject that ends with the rest (``*.example.org``,
  ``*@lists.example``; ``*`` alone matches everything);
* a key starting with ``^`` is a regular expression, matched case-insensitively from the start
  (a ``\\N...\\N`` wrapper, needed in Exim's expanding wildlsearch, is accepted and removed);
* any other key matches exactly, case-insensitively;
* the first matching line wins, as in Exim's linear search. The index keeps each key's line
  position and takes the smallest among the hits: a dict probe for exact keys, one probe per
  distinct wildcard-suffix length, and only the regexes that come before the best hit so far.

``HostList`` implements an Exim host list of addresses: IPv4 and IPv6 addresses, CIDR networks,
``*`` and ``!``-negated items, first match wins. Host names (which need DNS) and ``@[]`` are not
supported: they are a parse error, so that a relay rule never silently means something else.
Lookup probes one dict per distinct prefix length present.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass

from policy.listfiles import Entry, ListFileError


@dataclass(frozen=True, slots=True)
class Match:
    key: str
    value: str
    line: int


class WildMap:
    """A wildlsearch list: keys with ``*`` suffix wildcards and ``^`` regexes."""

    __slots__ = ("_entries", "_exact", "_lengths", "_regexes", "_suffixes")

    def __init__(self, entries: Iterable[Entry], path: str) -> None:
        self._entries: list[Entry] = []
        self._exact: dict[str, int] = {}
        self._suffixes: dict[str, int] = {}
        self._regexes: list[tuple[int, re.Pattern[str]]] = []
        for entry in entries:
            index = len(self._entries)
            key = entry.key
            if key.startswith("^"):
                pattern = key.replace("\\N", "")
                try:
                    self._regexes.append((index, re.compile(pattern, re.IGNORECASE)))
                except (re.error, OverflowError, RecursionError) as e:
                    # OverflowError: a{99999999999}; RecursionError: absurd nesting.
                    raise ListFileError(path, entry.line, f"bad regular expression: {e}") from None
            elif key.startswith("*"):
                self._suffixes.setdefault(key[1:].lower(), index)
            else:
                self._exact.setdefault(key.lower(), index)
            self._entries.append(entry)
        # Longest first does not matter for correctness (we take the smallest index); sorted
        # keeps the probe order stable.
        self._lengths = sorted({len(s) for s in self._suffixes})

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, subject: str) -> Match | None:
        s = subject.lower()
        best = self._exact.get(s, -1)
        if self._suffixes:
            n = len(s)
            suffixes = self._suffixes
            for length in self._lengths:
                if length > n:
                    break
                i = suffixes.get(s[n - length :], -1)
                if i >= 0 and (best < 0 or i < best):
                    best = i
        for i, rx in self._regexes:
            if best >= 0 and i > best:
                break
            if rx.search(subject):
                best = i
                break
        if best < 0:
            return None
        e = self._entries[best]
        return Match(e.key, e.value, e.line)


_MAX_PREFIX = {4: 32, 6: 128}
_FAMILY = {4: socket.AF_INET, 6: socket.AF_INET6}


def parse_address(text: str) -> tuple[int, int] | None:
    """(version, address as int) of an IPv4 or IPv6 address; an IPv4-mapped IPv6 address is
    IPv4. None when ``text`` is not an address. inet_pton: ipaddress is 10x slower."""
    version = 6 if ":" in text else 4
    try:
        value = int.from_bytes(socket.inet_pton(_FAMILY[version], text), "big")
    except OSError:
        return None
    if version == 6 and value >> 32 == 0xFFFF:
        return 4, value & 0xFFFFFFFF
    return version, value


def ip_object(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``text`` as an ipaddress object, an IPv4-mapped IPv6 address as the IPv4 address it
    maps (as clients are matched); None when ``text`` is not an address. For the checks that
    ask what kind of address it is (loopback, private ...); matching uses parse_address."""
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def parse_network(text: str) -> tuple[int, int, int] | None:
    """(version, prefix length, network as int) of ``addr`` or ``addr/len``; host bits are
    masked, as Exim does. An IPv4-mapped item (``::ffff:192.0.2.0/120``) is the IPv4 network it
    maps, as clients are matched. The netmask form ``addr/255.0.0.0`` goes through ipaddress."""
    addr, slash, length = text.partition("/")
    parsed = parse_address(addr)
    if parsed is None:
        return _slow_network(text)
    version, value = parsed
    bits = _MAX_PREFIX[version]
    if not slash:
        return version, bits, value
    if not length.isdigit():
        return _slow_network(text)
    prefix = int(length)
    if ":" in addr and version == 4:  # mapped: /96+n covers n bits of the IPv4 address
        prefix -= 96
        if prefix < 0:
            return _slow_network(text)
    if prefix > bits:
        return None
    return version, prefix, value >> (bits - prefix) << (bits - prefix)


def _slow_network(text: str) -> tuple[int, int, int] | None:
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None
    return net.version, net.prefixlen, int(net.network_address)


class HostList:
    """An Exim host list of IP addresses and networks (first match wins, ``!`` negates).

    Index: per address family, one dict per prefix length present, from the network (address
    shifted right by the host bits) to the item's line number, negative for a ``!`` item. Line
    numbers grow with position, so the smallest absolute value among the hits is the first
    match. No per-item objects besides the dict entries: 100 000 items take a few MB."""

    __slots__ = ("_count", "_tables", "broad_lines")

    def __init__(self, entries: Iterable[Entry], path: str) -> None:
        by_prefix: dict[tuple[int, int], dict[int, int]] = {}
        # Lines of items so wide that they amount to an open relay (for ``mailpolicy check``).
        self.broad_lines: list[int] = []
        count = 0
        for entry in entries:
            item = entry.key
            negated = item.startswith("!")
            if negated:
                item = item[1:].strip()
            if item == "*":
                nets: list[tuple[int, int, int] | None] = [(4, 0, 0), (6, 0, 0)]
            else:
                nets = [parse_network(item)]
            if nets[0] is None:
                raise ListFileError(
                    path,
                    entry.line,
                    f"{item!r} is not an IP address or network (host names and @ forms "
                    "are not supported: the daemon does no DNS lookups for host lists)",
                )
            mark = -entry.line if negated else entry.line
            for net in nets:
                assert net is not None
                version, prefix, value = net
                wide = prefix < (8 if version == 4 else 16)
                if wide and not negated and entry.line not in self.broad_lines:
                    self.broad_lines.append(entry.line)
                table = by_prefix.setdefault((version, prefix), {})
                table.setdefault(value >> (_MAX_PREFIX[version] - prefix), mark)
            count += 1
        self._tables: dict[int, list[tuple[int, dict[int, int]]]] = {4: [], 6: []}
        for (version, prefix), table in sorted(by_prefix.items()):
            self._tables[version].append((_MAX_PREFIX[version] - prefix, table))
        self._count = count

    def __len__(self) -> int:
        return self._count

    def lookup(self, ip: str) -> tuple[bool, int] | None:
        """(matched, line) of the first item that matches ``ip``; matched is False for a ``!``
        item. None when no item matches or ``ip`` is not an address."""
        parsed = parse_address(ip)
        if parsed is None:
            return None
        version, value = parsed
        best = 0
        for shift, table in self._tables[version]:
            mark = table.get(value >> shift, 0)
            if mark and (not best or abs(mark) < abs(best)):
                best = mark
        if not best:
            return None
        return (best > 0, abs(best))
