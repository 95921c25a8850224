"""What a recipient address is, and where an alias sends it.

``classify`` answers "what is this address?" for the recipient check; ``resolve`` expands an
alias for Exim's redirect router (the ALIAS verb). Both apply the same lookup order, so what
RCPT accepts is what the router delivers.

Lookup order for ``local@domain``:

1. rewrite_domains: if ``domain`` is listed, the address becomes ``local@newdomain`` (once; a
   target that is itself rewritten is not rewritten again, and ``mailpolicy check`` warns). Only
   envelope recipients are rewritten, at RCPT and in alias expansion; headers and the envelope
   sender are left alone.
2. A domain that is not local (no passwd or aliases file, not the primary hostname) is
   ``remote``: the relay check decides about it.
3. For the local part as given, then without its ``+suffix``: the domain's aliases file (exact
   key), then global_aliases, then the domain's passwd file.
4. The domain's catch-all (``*`` in its aliases file).
5. ``postmaster`` is always accepted (RFC 5321 4.5.1), even with none of the above.

Alias expansion follows aliases recursively. An alias that lists an address already on its own
expansion path is a loop and defers (never a bounce storm), except the ``bob: bob, bob@elsewhere``
idiom where ``bob`` also has a mailbox: that delivers to the mailbox. Depth and fan-out are
bounded (``Limits``); exceeding them defers with the reason.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from policy.addresses import safe_destination, split, strip_suffix
from policy.mailtree import Alias, Loaded, Snapshot


class Kind(enum.Enum):
    USER = "user"  # a mailbox in passwd/<domain>
    ALIAS = "alias"  # an alias (domain, global or catch-all)
    POSTMASTER = "postmaster"  # postmaster with no alias or user: accepted anyway
    UNKNOWN = "unknown"  # a local domain without such a user or alias
    REMOTE = "remote"  # not a local domain
    UNAVAILABLE = "unavailable"  # a file needed to decide cannot be read: defer


@dataclass(frozen=True, slots=True)
class Target:
    kind: Kind
    address: str  # after rewriting, lower-cased domain
    where: Loaded[Any] | None = None  # the file that decided ...
    line: int = 0  # ... and its line
    alias: Alias | None = None
    note: str = ""  # how it was decided (for explain and the log)

    @property
    def source(self) -> str:
        """``file:line`` that decided, or "" (built only when someone asks: not per request)."""
        return self.where.source(self.line) if self.where is not None else ""


@dataclass(frozen=True, slots=True)
class Limits:
    max_depth: int = 10
    max_targets: int = 1000


class ResolveError(Exception):
    """The expansion cannot be completed now (loop, limit, unavailable file): defer."""

    def __init__(self, reason: str, loop: bool = False) -> None:
        super().__init__(reason)
        self.loop = loop


def rewrite(snapshot: Snapshot, address: str) -> tuple[str, str]:
    """(address after rewrite_domains, source line or "")."""
    local, domain = split(address)
    domain = domain.lower()
    table = snapshot.rewrite_domains.data
    if table:
        hit = table.get(domain)
        if hit is not None:
            return f"{local}@{hit[0]}", snapshot.rewrite_domains.source(hit[1])
    return f"{local}@{domain}" if domain else local, ""


def classify(snapshot: Snapshot, address: str) -> Target:
    local, domain = split(address)
    return classify_parts(snapshot, local, domain.lower())


def classify_parts(snapshot: Snapshot, local: str, domain: str) -> Target:
    """``classify`` for an address already split, with its domain lower-cased (the hot path)."""
    rewrites = snapshot.rewrite_domains
    table = rewrites.data
    if table is None:
        return Target(Kind.UNAVAILABLE, f"{local}@{domain}", note=rewrites.problem)
    note = ""
    rewrite_line = 0
    if table:
        hit = table.get(domain)
        if hit is not None:
            domain, rewrite_line = hit
            note = f"rewritten to {local}@{domain}"
    address = f"{local}@{domain}"
    if not snapshot.is_local_domain(domain):
        if rewrite_line:
            return Target(Kind.REMOTE, address, rewrites, rewrite_line, note=note)
        return Target(Kind.REMOTE, address, note="not a local domain")
    passwd = snapshot.users.get(domain)
    aliases = snapshot.aliases.get(domain)
    global_aliases = snapshot.global_aliases
    for loaded in (passwd, aliases, global_aliases):
        if loaded is not None and loaded.data is None:
            return Target(Kind.UNAVAILABLE, address, note=loaded.problem)
    users = passwd.data if passwd is not None else None
    domain_aliases = aliases.data if aliases is not None else None
    globals_ = global_aliases.data
    lower = local.lower()
    base = strip_suffix(lower)
    for lp in (lower, base) if base else (lower,):
        if domain_aliases:
            alias = domain_aliases.get(lp)
            if alias is not None:
                return Target(Kind.ALIAS, address, aliases, alias.line, alias, note)
        if globals_:
            alias = globals_.get(lp)
            if alias is not None:
                return Target(Kind.ALIAS, address, global_aliases, alias.line, alias, note)
        if users:
            user = users.get(lp)
            if user is not None:
                return Target(Kind.USER, address, passwd, user.line, note=note)
    if domain_aliases:
        alias = domain_aliases.get("*")
        if alias is not None:
            return Target(
                Kind.ALIAS,
                address,
                aliases,
                alias.line,
                alias,
                (note + "; " if note else "") + "catch-all",
            )
    if lower == "postmaster":
        return Target(Kind.POSTMASTER, address, note="postmaster is always accepted")
    return Target(Kind.UNKNOWN, address, note=note or f"no user or alias {lower!r} in {domain}")


def has_mailbox(snapshot: Snapshot, address: str) -> bool:
    local, domain = split(address)
    passwd = snapshot.users.get(domain.lower())
    if passwd is None or not passwd.data:
        return False
    lower = local.lower()
    base = strip_suffix(lower)
    return lower in passwd.data or (base is not None and base in passwd.data)


def _qualify(target: str, domain: str) -> str:
    return target if "@" in target else f"{target}@{domain}"


def resolve(snapshot: Snapshot, address: str, limits: Limits = Limits()) -> list[str] | None:
    """Final destinations of ``address`` if it is an alias, else None (not an alias: the router
    declines and the next one delivers or relays). Raises ResolveError to defer."""
    first = classify(snapshot, address)
    if first.kind is Kind.UNAVAILABLE:
        raise ResolveError(first.note)
    if first.kind is not Kind.ALIAS:
        # Only rewritten (rewrite_domains): redirect to the new address. A mere change of case
        # in the domain is not a rewrite: the router declines.
        if rewrite(snapshot, address)[1] and first.address.lower() != address.lower():
            # The local part comes from the SMTP client and goes into Exim's redirect data
            # untainted: only a plain address may pass (no commas, pipes, quotes ...).
            if not safe_destination(first.address):
                raise ResolveError(f"rewritten address {first.address!r} is not a plain address")
            return [first.address]
        return None
    return expand(snapshot, first, limits)


def expand(snapshot: Snapshot, first: Target, limits: Limits) -> list[str]:
    """Final destinations of an alias ``Target`` (from ``classify``). Raises ResolveError."""
    out: dict[str, None] = {}  # ordered set
    # Every lookup counts against a budget: with repeated targets, the work (not the result)
    # grows exponentially with the depth.
    budget = [limits.max_targets * limits.max_depth]
    _expand(snapshot, first, (first.address.lower(),), 1, limits, out, budget)
    return list(out)


def _expand(
    snapshot: Snapshot,
    target: Target,
    chain: tuple[str, ...],
    depth: int,
    limits: Limits,
    out: dict[str, None],
    budget: list[int],
) -> None:
    assert target.alias is not None
    if depth > limits.max_depth:
        raise ResolveError(
            f"alias nesting deeper than {limits.max_depth} at {target.source}", loop=True
        )
    _, domain = split(target.address)
    for raw in target.alias.targets:
        budget[0] -= 1
        if budget[0] < 0:
            raise ResolveError(
                f"alias {chain[0]} needs more than {limits.max_targets * limits.max_depth} "
                "lookups to expand"
            )
        child = classify(snapshot, _qualify(raw, domain))
        key = child.address.lower()
        if child.kind is Kind.UNAVAILABLE:
            raise ResolveError(child.note)
        if key in chain:
            if has_mailbox(snapshot, child.address):
                out.setdefault(child.address, None)
                continue
            path = " -> ".join((*chain, key))
            raise ResolveError(f"alias loop {path} ({target.source})", loop=True)
        if child.kind is Kind.ALIAS:
            _expand(snapshot, child, (*chain, key), depth + 1, limits, out, budget)
        else:
            out.setdefault(child.address, None)
        if len(out) > limits.max_targets:
            raise ResolveError(
                f"alias {chain[0]} expands to more than {limits.max_targets} addresses"
            )
