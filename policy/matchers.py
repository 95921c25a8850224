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


class HostList:
    """An Exim host list of IP addresses and networks (first match wins, ``!`` negates)."""

    __slots__ = ("_count", "_lines", "_negated", "_tables", "broad_lines")

    def __init__(self, entries: Iterable[Entry], path: str) -> None:
        # (version, prefix length) -> {network as int >> host bits: first item index}
        self._tables: dict[int, list[tuple[int, int, dict[int, int]]]] = {4: [], 6: []}
        by_prefix: dict[tuple[int, int], dict[int, int]] = {}
        self._lines: list[int] = []
        self._negated: list[bool] = []
        # Lines of items so wide that they amount to an open relay (for ``mailpolicy check``).
        self.broad_lines: list[int] = []
        for entry in entries:
            item = entry.key
            index = len(self._lines)
            negated = item.startswith("!")
            if negated:
                item = item[1:].strip()
            if item == "*":
                nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = [
                    ipaddress.ip_network("0.0.0.0/0"),
                    ipaddress.ip_network("::/0"),
                ]
            else:
                try:
                    nets = [ipaddress.ip_network(item, strict=False)]
                except ValueError:
                    raise ListFileError(
                        path,
                        entry.line,
                        f"{item!r} is not an IP address or network (host names and @ forms "
                        "are not supported: the daemon does no DNS lookups for host lists)",
                    ) from None
            for net in nets:
                wide = net.prefixlen < (8 if net.version == 4 else 16)
                if wide and not negated and entry.line not in self.broad_lines:
                    self.broad_lines.append(entry.line)
                table = by_prefix.setdefault((net.version, net.prefixlen), {})
                host_bits = _MAX_PREFIX[net.version] - net.prefixlen
                table.setdefault(int(net.network_address) >> host_bits, index)
            self._lines.append(entry.line)
            self._negated.append(negated)
        for (version, prefixlen), table in sorted(by_prefix.items()):
            shift = _MAX_PREFIX[version] - prefixlen
            self._tables[version].append((shift, prefixlen, table))
        self._count = len(self._lines)

    def __len__(self) -> int:
        return self._count

    def lookup(self, ip: str) -> tuple[bool, int] | None:
        """(matched, line) of the first item that matches ``ip``; matched is False for a ``!``
        item. None when no item matches or ``ip`` is not an address."""
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return None
        if addr.version == 6 and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        value = int(addr)
        best = -1
        for shift, _, table in self._tables[addr.version]:
            i = table.get(value >> shift, -1)
            if i >= 0 and (best < 0 or i < best):
                best = i
        if best < 0:
            return None
        return (not self._negated[best], self._lines[best])
