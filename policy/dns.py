"""DNS for the sender checks: one resolver configuration (settings ``dns_servers``,
``dns_port``, ``dns_timeout``) shared by sender-verify callouts, SPF and DKIM, so a test (or an
admin) points all of them at one server.

Answers are sorted into three kinds, because the checks act on the difference:

* an answer (records, possibly none: ``NODATA``);
* ``NXDOMAIN``: the name does not exist - definite evidence from the domain's own servers;
* ``DnsTemporary``: timeout, SERVFAIL, no server answering, a truncated or malformed answer -
  nothing is known, so the caller defers (451), never rejects.

``mail_exchangers`` applies RFC 5321 section 5.1 (MX records by preference, else the domain's
own A/AAAA as an implicit MX) and RFC 7505 (a single ``MX 0 .`` means the domain accepts no
mail at all).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver

from policy.matchers import ip_object
from policy.settings import Settings


class DnsTemporary(Exception):
    """The DNS could not answer now (timeout, SERVFAIL, unreachable): try again later."""


def configure(resolver: dns.resolver.BaseResolver, settings: Settings) -> None:
    """Point ``resolver`` (sync or async) at the configured servers, or /etc/resolv.conf's."""
    if settings.dns_servers.split():
        resolver.nameservers = settings.dns_servers.split()
    else:
        resolver.read_resolv_conf("/etc/resolv.conf")
    resolver.port = settings.dns_port
    resolver.timeout = settings.dns_timeout  # per server try
    resolver.lifetime = settings.dns_timeout  # the whole query
    resolver.cache = dns.resolver.LRUCache(10000)  # honours the records' TTLs


def make_async(settings: Settings) -> dns.asyncresolver.Resolver:
    r = dns.asyncresolver.Resolver(configure=False)
    configure(r, settings)
    return r


def make_sync(settings: Settings) -> dns.resolver.Resolver:
    """For libraries that call DNS synchronously from a worker thread (pyspf)."""
    r = dns.resolver.Resolver(configure=False)
    configure(r, settings)
    return r


class Kind(enum.Enum):
    ANSWER = "answer"
    NODATA = "nodata"  # the name exists, no records of this type
    NXDOMAIN = "nxdomain"


@dataclass(frozen=True, slots=True)
class Answer:
    kind: Kind
    records: tuple[str, ...] = ()  # text form (addresses, names, TXT strings joined)


async def lookup(resolver: dns.asyncresolver.Resolver, name: str, rdtype: str) -> Answer:
    """One query. Raises DnsTemporary for anything that is not an answer."""
    try:
        answer = await resolver.resolve(name, rdtype, search=False)
    except dns.resolver.NXDOMAIN:
        return Answer(Kind.NXDOMAIN)
    except dns.resolver.NoAnswer:
        return Answer(Kind.NODATA)
    except dns.exception.Timeout as e:
        raise DnsTemporary(f"DNS timeout for {name} {rdtype}") from e
    except dns.resolver.NoNameservers as e:
        raise DnsTemporary(f"no DNS server answered for {name} {rdtype} (SERVFAIL?)") from e
    except (dns.resolver.YXDOMAIN, dns.name.NameTooLong, dns.name.EmptyLabel) as e:
        # Not a name DNS can hold: the caller judged the syntax already; treat as unknown.
        raise DnsTemporary(f"cannot look up {name!r}: {e}") from e
    except dns.exception.DNSException as e:
        raise DnsTemporary(f"DNS error for {name} {rdtype}: {type(e).__name__}") from e
    if answer.rrset is None:
        return Answer(Kind.NODATA)
    if rdtype == "TXT":
        records = tuple(b"".join(r.strings).decode("utf-8", "replace") for r in answer.rrset)
    else:
        records = tuple(r.to_text() for r in answer.rrset)
    return Answer(Kind.ANSWER, records)


@dataclass(frozen=True, slots=True)
class Exchangers:
    """Where mail for a domain goes. ``hosts``: names in preference order (ties in DNS order),
    the domain itself when it has no MX but an address (implicit MX). ``null_mx``: RFC 7505.
    ``exists``: False when the domain is NXDOMAIN or has neither MX nor address records."""

    hosts: tuple[str, ...]
    null_mx: bool = False
    exists: bool = True
    why: str = ""


async def mail_exchangers(resolver: dns.asyncresolver.Resolver, domain: str) -> Exchangers:
    """RFC 5321 section 5.1 and RFC 7505. Raises DnsTemporary."""
    mx = await lookup(resolver, domain, "MX")
    if mx.kind is Kind.NXDOMAIN:
        return Exchangers((), exists=False, why=f"{domain}: no such domain (NXDOMAIN)")
    if mx.kind is Kind.ANSWER:
        parsed: list[tuple[int, str]] = []
        for text in mx.records:
            pref, _, host = text.partition(" ")
            parsed.append((int(pref), host.rstrip(".").lower()))
        if len(parsed) == 1 and parsed[0][1] == "":
            return Exchangers((), null_mx=True, why=f"{domain} has a null MX (RFC 7505)")
        # A null MX among others is a misconfiguration: ignore the empty target.
        hosts = tuple(h for _, h in sorted(parsed, key=lambda p: p[0]) if h)
        return Exchangers(hosts, why=f"MX of {domain}: {', '.join(hosts)}")
    # No MX: the domain's own address records make it an implicit MX.
    for rdtype in ("A", "AAAA"):
        addr = await lookup(resolver, domain, rdtype)
        if addr.kind is Kind.ANSWER:
            return Exchangers((domain,), why=f"{domain} has no MX; implicit MX on its {rdtype}")
    return Exchangers((), exists=False, why=f"{domain} has no MX and no address records")


async def addresses(resolver: dns.asyncresolver.Resolver, host: str) -> list[str]:
    """A and AAAA of ``host`` (IPv4 first). Empty when it has none. Raises DnsTemporary only
    when neither query answered."""
    found: list[str] = []
    trouble: DnsTemporary | None = None
    for rdtype in ("A", "AAAA"):
        try:
            answer = await lookup(resolver, host, rdtype)
        except DnsTemporary as e:
            trouble = e
            continue
        found.extend(answer.records)
    if not found and trouble is not None:
        raise trouble
    return found


def is_public(address: str) -> bool:
    """A globally routable unicast address (not loopback, private, link-local, multicast,
    reserved, documentation or shared address space)."""
    ip = ip_object(address)
    return ip is not None and ip.is_global and not ip.is_multicast
