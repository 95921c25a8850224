"""The mail data tree (default ``/srv/mail``) as one immutable ``Snapshot`` of the admin's files.

Files read (the seed's contract; see docs/lists.md):

==================================  ===========================================================
``passwd/<domain>``                 ``user:hash[:...]`` (Dovecot passwd-file; fields after the
                                    hash are ignored). The domain is the file name.
``aliases/<domain>``                lsearch: ``local: dest, dest``; key ``*`` is the catch-all
``exim/conf/global_aliases``        lsearch, like a per-domain aliases file, in every local domain
``exim/conf/rewrite_domains``       lsearch: ``domain: newdomain``
``exim/conf/relay_from_hosts``      host list: one address or CIDR network per line
``exim/conf/relay_to_domains``      wildlsearch keys: domains we relay to (secondary MX)
``exim/conf/senderverify_exceptions``  wildlsearch keys: senders exempt from callouts
``exim/conf/dkim_required``         wildlsearch keys: sender domains that must be DKIM-signed
==================================  ===========================================================

A domain with a passwd or an aliases file is a local domain (the seed's ``dsearch``).

Loading rules (guarantee 7 of DESIGN.md):

* a missing list file is an empty list;
* a file that fails to parse keeps its last good version in force; the error (``path:line``) is
  kept in ``Snapshot.problems`` and logged once;
* a file that cannot be read (permissions, I/O error), or that is broken with no good version to
  fall back on, is *unavailable*: the decisions that need it defer (4xx) until it is fixed.

``TreeLoader.refresh()`` stats every file and re-parses only what changed (mtime, size, inode,
ctime); the daemon calls it every ``reload_interval`` seconds in a worker thread and on SIGHUP.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from policy.addresses import is_valid_domain, safe_destination
from policy.listfiles import (
    ListFileError,
    Text,
    iter_lsearch,
    lines_of,
    parse_items,
    parse_lsearch,
    read_lines,
)
from policy.matchers import HostList, WildMap

log = logging.getLogger("mailpolicy.tree")

T = TypeVar("T")

CONF_LISTS = (
    "global_aliases",
    "rewrite_domains",
    "relay_from_hosts",
    "relay_to_domains",
    "senderverify_exceptions",
    "dkim_required",
)


@dataclass(frozen=True, slots=True)
class User:
    hash: str
    line: int


@dataclass(frozen=True, slots=True)
class Alias:
    targets: tuple[str, ...]  # plain addresses, or bare local parts (qualified at resolution)
    line: int


V = TypeVar("V")


class Packed(Generic[V]):
    """A read-only ``name -> entry`` table that stores each entry as one string,
    ``"<line>\\0<data>"``, and builds the entry object only when it is looked up.

    Why: a ``User`` or ``Alias`` object, its line number and its target strings cost about
    150 bytes more per entry than one string; with 100 000 users that is 15 MB of the
    daemon's resident size. Lookups build one small object, only on a hit."""

    __slots__ = ("_decode", "_table")

    def __init__(self, decode: Callable[[str, int], V]) -> None:
        self._table: dict[str, str] = {}
        self._decode = decode

    def _add(self, key: str, line: int, data: str) -> None:
        self._table.setdefault(key, f"{line}\0{data}")  # the first entry for a key wins

    def get(self, key: str) -> V | None:
        packed = self._table.get(key)
        if packed is None:
            return None
        line, _, data = packed.partition("\0")
        return self._decode(data, int(line))

    def __getitem__(self, key: str) -> V:
        value = self.get(key)
        if value is None:
            raise KeyError(key)
        return value

    def __contains__(self, key: object) -> bool:
        return key in self._table

    def __iter__(self) -> Iterator[str]:
        return iter(self._table)

    def __len__(self) -> int:
        return len(self._table)

    def items(self) -> Iterator[tuple[str, V]]:
        for key in self._table:
            yield key, self[key]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Packed):
            return self._table == other._table
        if isinstance(other, dict):
            return dict(self.items()) == other
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable-looking container: unhashable


def _user(data: str, line: int) -> User:
    return User(data, line)


def _alias(data: str, line: int) -> Alias:
    return Alias(tuple(data.split(",")), line)


Users = Packed[User]
Aliases = Packed[Alias]


@dataclass(frozen=True, slots=True)
class Loaded(Generic[T]):
    """One file's parsed content. ``data`` is None when unavailable (see module docstring)."""

    path: str  # relative to the root, for messages: "aliases/example.org"
    data: T | None
    problem: str = ""  # the current error, "" when the file is fine

    @property
    def available(self) -> bool:
        return self.data is not None

    def source(self, line: int) -> str:
        return f"{self.path}:{line}"


@dataclass(frozen=True)
class Snapshot:
    """Everything the checks read, consistent as of one refresh. Never mutated."""

    root: str
    primary_hostname: str
    users: dict[str, Loaded[Users]] = field(default_factory=dict)
    aliases: dict[str, Loaded[Aliases]] = field(default_factory=dict)
    lists: dict[str, Loaded[Any]] = field(default_factory=dict)

    def is_local_domain(self, domain: str) -> bool:
        if not domain:  # no domain is not "the primary hostname" when none is configured
            return False
        return domain in self.users or domain in self.aliases or domain == self.primary_hostname

    @property
    def problems(self) -> list[str]:
        files: list[Loaded[Any]] = [
            *self.users.values(),
            *self.aliases.values(),
            *self.lists.values(),
        ]
        return [f.problem for f in files if f.problem]

    # Typed accessors for the exim/conf lists.
    @property
    def global_aliases(self) -> Loaded[Aliases]:
        return self.lists["global_aliases"]

    @property
    def rewrite_domains(self) -> Loaded[dict[str, tuple[str, int]]]:
        return self.lists["rewrite_domains"]

    @property
    def relay_from_hosts(self) -> Loaded[HostList]:
        return self.lists["relay_from_hosts"]

    @property
    def relay_to_domains(self) -> Loaded[WildMap]:
        return self.lists["relay_to_domains"]

    @property
    def senderverify_exceptions(self) -> Loaded[WildMap]:
        return self.lists["senderverify_exceptions"]

    @property
    def dkim_required(self) -> Loaded[WildMap]:
        return self.lists["dkim_required"]


# --- parsers: text -> data, raising ListFileError -------------------------------------------


def parse_passwd(text: Text, path: str) -> Users:
    users: Users = Packed(_user)
    for number, raw in enumerate(lines_of(text), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, colon, rest = line.partition(":")
        hash_ = rest.split(":", 1)[0].strip()
        name = name.strip()
        if not colon or not hash_:
            raise ListFileError(path, number, "expected user:hash")
        if not name or "@" in name or any(c.isspace() for c in name):
            raise ListFileError(path, number, f"bad user name {name!r} (local part only)")
        if "\0" in line:
            raise ListFileError(path, number, "NUL byte")
        users._add(name.lower(), number, hash_)
    return users


def parse_aliases(text: Text, path: str) -> Aliases:
    aliases: Aliases = Packed(_alias)
    for entry in iter_lsearch(text, path):
        targets = tuple(t.strip() for t in entry.value.split(",") if t.strip())
        if not targets:
            raise ListFileError(path, entry.line, f"alias {entry.key!r} has no destination")
        for target in targets:
            if not (safe_destination(target) or safe_destination(target + "@x.invalid")):
                raise ListFileError(
                    path,
                    entry.line,
                    f"destination {target!r} is not a plain address (pipes, files, :include: "
                    "and quoted local parts are not allowed)",
                )
        # Targets are validated plain addresses: no commas or NULs inside, so they pack.
        aliases._add(entry.key.lower(), entry.line, ",".join(targets))
    return aliases


def parse_rewrite_domains(text: Text, path: str) -> dict[str, tuple[str, int]]:
    table: dict[str, tuple[str, int]] = {}
    for entry in iter_lsearch(text, path):
        source, target = entry.key.lower(), entry.value.strip().lower()
        for d in (source, target):
            if not is_valid_domain(d) or d.startswith("["):
                raise ListFileError(path, entry.line, f"{d!r} is not a domain (domain: newdomain)")
        table.setdefault(source, (target, entry.line))
    return table


def _wild(text: Text, path: str) -> WildMap:
    return WildMap(parse_lsearch(text, path), path)


def _hosts(text: Text, path: str) -> HostList:
    return HostList(parse_items(text, path), path)


CONF_PARSERS: dict[str, Callable[[Text, str], Any]] = {
    "global_aliases": parse_aliases,
    "rewrite_domains": parse_rewrite_domains,
    "relay_from_hosts": _hosts,
    "relay_to_domains": _wild,
    "senderverify_exceptions": _wild,
    "dkim_required": _wild,
}

EMPTY: dict[str, Callable[[], Any]] = {
    "global_aliases": lambda: Packed(_alias),
    "rewrite_domains": dict,
    "relay_from_hosts": lambda: HostList([], ""),
    "relay_to_domains": lambda: WildMap([], ""),
    "senderverify_exceptions": lambda: WildMap([], ""),
    "dkim_required": lambda: WildMap([], ""),
}


def _ignored_name(name: str) -> bool:
    """Editor and tool leftovers in passwd/ and aliases/ are not domains."""
    return (
        name.startswith((".", "#"))
        or name.endswith(("~", ".swp", ".tmp", ".bak", ".orig", ".rej", ".dpkg-old", ".dpkg-new"))
        or not is_valid_domain(name)
    )


Stamp = tuple[int, int, int, int]


class TreeLoader:
    """Loads the tree into Snapshots, re-parsing only files whose stat changed."""

    def __init__(self, root: str, primary_hostname: str = "") -> None:
        self.root = os.path.abspath(root)
        self.primary_hostname = primary_hostname.lower().rstrip(".")
        self._cache: dict[str, tuple[Stamp | None, Loaded[Any]]] = {}
        self.snapshot: Snapshot | None = None

    def refresh(self, force: bool = False) -> tuple[Snapshot, list[str]]:
        """Re-read what changed (everything when ``force``); returns the snapshot in force and the
        messages about files that changed state (for the log). The snapshot object is replaced
        only when something changed."""
        changed = force or self.snapshot is None
        messages: list[str] = []
        users: dict[str, Loaded[Users]] = {}
        aliases: dict[str, Loaded[Aliases]] = {}
        for sub, target, parser in (
            ("passwd", users, parse_passwd),
            ("aliases", aliases, parse_aliases),
        ):
            directory = os.path.join(self.root, sub)
            prefix = f"{sub}/"
            try:
                names = sorted(os.listdir(directory))
            except FileNotFoundError:
                names = []
                # The directory held domains a moment ago: it vanished (unmounted, moved away)
                # more likely than every domain was removed. Their mail defers rather than
                # bounces; an admin who means it leaves an empty directory instead.
                last = self.snapshot
                before: dict[str, Loaded[Any]] = (
                    {} if last is None else dict(last.users if sub == "passwd" else last.aliases)
                )
                for rel in [r for r in self._cache if r.startswith(prefix)]:
                    name = rel[len(prefix) :]
                    gone: Loaded[Any] = Loaded(
                        rel, None, f"{sub}/ is missing: {rel} unavailable (dependent checks defer)"
                    )
                    target[name] = gone
                    if before.get(name) != gone:  # log and rebuild once, not every poll
                        changed = True
                        messages.append(gone.problem)
            except OSError as e:
                messages.append(f"{sub}/: cannot list directory: {e.strerror}")
                # Keep the domains known so far: their files are unreadable now (their checks
                # defer), not gone (which would turn local mail into a 5xx relay denial).
                names = sorted(r[len(prefix) :] for r in self._cache if r.startswith(prefix))
            for name in names:
                if _ignored_name(name):
                    continue
                rel = f"{sub}/{name}"
                loaded, did = self._load(rel, parser, None, force)
                if loaded is None:  # vanished between listdir and stat
                    continue
                target[name.lower()] = loaded
                changed |= did
                if did and loaded.problem:
                    messages.append(loaded.problem)
        lists: dict[str, Loaded[Any]] = {}
        for name in CONF_LISTS:
            rel = f"exim/conf/{name}"
            loaded, did = self._load(rel, CONF_PARSERS[name], EMPTY[name], force)
            assert loaded is not None
            lists[name] = loaded
            changed |= did
            if did and loaded.problem:
                messages.append(loaded.problem)
        # A file that disappeared from passwd/ or aliases/ is a change too.
        live = {f"passwd/{d}" for d in users} | {f"aliases/{d}" for d in aliases}
        for rel in [r for r in self._cache if r.startswith(("passwd/", "aliases/"))]:
            if rel not in live:
                del self._cache[rel]
                changed = True
        if changed or self.snapshot is None:
            self.snapshot = Snapshot(self.root, self.primary_hostname, users, aliases, lists)
        return self.snapshot, messages

    def _load(
        self,
        rel: str,
        parser: Callable[[Text, str], Any],
        empty: Callable[[], Any] | None,
        force: bool,
    ) -> tuple[Loaded[Any] | None, bool]:
        """(loaded file, whether it changed). A missing optional list is empty."""
        path = os.path.join(self.root, rel)
        try:
            st = os.stat(path)
            stamp: Stamp | None = (st.st_mtime_ns, st.st_size, st.st_ino, st.st_ctime_ns)
        except FileNotFoundError:
            stamp = None
        except OSError as e:
            stamp = (-1, -1, -1, e.errno or 0)
        cached = self._cache.get(rel)
        if cached is not None and cached[0] == stamp and not force:
            return cached[1], False
        previous = cached[1] if cached is not None else None
        if stamp is None:
            if empty is None:
                return None, False
            loaded: Loaded[Any] = Loaded(rel, empty())
        else:
            try:
                loaded = Loaded(rel, parser(read_lines(path, rel), rel))
            except ListFileError as e:
                if previous is not None and previous.data is not None:
                    loaded = Loaded(rel, previous.data, f"{e} (keeping the last good version)")
                else:
                    loaded = Loaded(rel, None, f"{e} (no good version: dependent checks defer)")
            except OSError as e:
                loaded = Loaded(
                    rel, None, f"{rel}: cannot read: {e.strerror} (dependent checks defer)"
                )
            except Exception as e:  # a parser bug must not stop every other file's reload
                why = f"{rel}: cannot parse: {type(e).__name__}: {e}"
                if previous is not None and previous.data is not None:
                    loaded = Loaded(rel, previous.data, f"{why} (keeping the last good version)")
                else:
                    loaded = Loaded(rel, None, f"{why} (no good version: dependent checks defer)")
        self._cache[rel] = (stamp, loaded)
        return loaded, True
