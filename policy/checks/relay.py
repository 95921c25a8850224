"""Relay control: never an open relay (DESIGN.md guarantee 3).

A recipient in a local domain, a rewrite domain, or a relay_to_domains domain (we are its
secondary MX) is accepted from anyone. Any other domain only from an authenticated session,
from localhost (127.0.0.1, ::1) or a local submission without a client IP (the machine's own
mail), or from a relay_from_hosts address; everyone else gets 550 5.7.1. When a list needed for
the decision is unavailable, defer.
"""

from __future__ import annotations

import functools
import ipaddress

from policy.checks import Context, Result
from policy.listfiles import Entry
from policy.matchers import HostList, ip_object
from policy.verdict import RELAY_DENIED, Verdict, defer

NAME = "relay"


_LOCALHOST = (ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"))


def _localhost(ip: str) -> bool:
    """127.0.0.1 or ::1 (IPv4-mapped too), as Debian's Exim `relay_from_hosts = 127.0.0.1 :
    ::::1`. Not all of 127.0.0.0/8: other loopback addresses are what the tests (and a local
    proxy) use to stand for outside clients. Parsed, not prefix-matched."""
    return ip_object(ip) in _LOCALHOST


def trusted_client(ctx: Context) -> tuple[bool | None, str, str]:
    """Is the client one we relay for whatever the recipient - an authenticated user, a local
    submission, localhost or a relay_from_hosts address? (trusted?, why, file:line); trusted
    is None when relay_from_hosts is unavailable. The sender checks (SPF, callouts) skip such
    clients: their mail is ours to send, not a stranger's claim to check."""
    if ctx.auth:
        return True, f"authenticated user {ctx.auth!r}", ""
    if not ctx.ip:
        return True, "a local submission (no client IP)", ""
    if _localhost(ctx.ip):
        return True, f"localhost {ctx.ip}", ""
    hosts = ctx.snapshot.relay_from_hosts
    if hosts.data is None:
        return None, hosts.problem, ""
    found = hosts.data.lookup(ctx.ip)
    if found is not None and found[0]:
        return True, f"{ctx.ip} (relay_from_hosts)", hosts.source(found[1])
    return False, f"{ctx.ip} is an outside client", ""


def secondary_mx(ip: str, networks: str) -> bool:
    """Is ``ip`` in ``networks`` (settings ``secondary_mx_hosts``: space-separated addresses
    and networks, validated at start)? IPv4-mapped addresses count as IPv4."""
    if not networks:
        return False
    found = _host_list(networks).lookup(ip)
    return found is not None and found[0]


@functools.lru_cache(maxsize=8)
def _host_list(networks: str) -> HostList:
    """A setting's addresses and networks as a host list: indexed once per value, not parsed
    again for every MAIL."""
    items = [Entry(item, "", n) for n, item in enumerate(networks.split(), 1)]
    return HostList(items, "secondary_mx_hosts")


def check(ctx: Context) -> Result:
    domain = ctx.rcpt_domain
    snapshot = ctx.snapshot
    if snapshot.is_local_domain(domain):
        return Result(note=f"{domain} is a local domain")
    rewrite = snapshot.rewrite_domains
    if rewrite.data is None:
        return Result(defer(NAME, rewrite.problem))
    if domain in rewrite.data:
        return Result(
            note=f"{domain} is a rewrite domain", source=rewrite.source(rewrite.data[domain][1])
        )
    # Who may relay anywhere comes first: their mail needs no list to be readable.
    if ctx.auth:
        ctx.relayed = True
        return Result(note=f"relay for authenticated user {ctx.auth!r}")
    if not ctx.ip:
        # No client IP: submitted on this machine (exim -bs by a local user), which Exim's
        # default configuration accepts too ("accept hosts = :").
        ctx.relayed = True
        return Result(note="relay for a local submission (no client IP)")
    if _localhost(ctx.ip):
        ctx.relayed = True
        return Result(note=f"relay from localhost {ctx.ip}")
    relay_to = snapshot.relay_to_domains
    if relay_to.data is None:
        return Result(defer(NAME, relay_to.problem))
    hit = relay_to.data.lookup(domain)
    if hit is not None:
        ctx.relayed = True
        return Result(note=f"{domain} is in relay_to_domains", source=relay_to.source(hit.line))
    hosts = snapshot.relay_from_hosts
    if hosts.data is None:
        return Result(defer(NAME, hosts.problem))
    found = hosts.data.lookup(ctx.ip)
    if found is not None and found[0]:
        ctx.relayed = True
        return Result(note=f"relay from {ctx.ip} (relay_from_hosts)", source=hosts.source(found[1]))
    why = (
        f"{ctx.ip} is excluded by relay_from_hosts"
        if found is not None
        else f"{ctx.ip} is not authenticated and not in relay_from_hosts"
    )
    return Result(
        Verdict(
            RELAY_DENIED,
            "relay not permitted",
            NAME,
            f"{domain}: {why}",
            hosts.source(found[1]) if found else "",
        )
    )
