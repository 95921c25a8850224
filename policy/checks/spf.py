"""SPF (RFC 7208) at MAIL: may the client's address send for the envelope sender's domain?

pyspf evaluates the record (in a worker thread: it resolves synchronously) with its DNS
lookups going to the daemon's resolver (settings ``dns_*``, policy/dns.py), within
``spf_timeout`` seconds for all of them. The null sender ``<>`` is checked as
``postmaster@<HELO name>`` (RFC 7208 section 2.4).

| result | action |
|---|---|
| pass | accept |
| fail | 550 5.7.23: the domain's owner says this address may not send for it |
| temperror | 451 4.4.3: DNS trouble, the sender retries |
| softfail, neutral, none, permerror | ``spf_<result>``: "accept" (default) or "reject" |

A rejected permerror answers 550 5.7.24, the others 550 5.7.23.

Why those defaults: RFC 7208 section 8.5 says a softfail SHOULD NOT be rejected on that
alone, and neutral and none assert nothing. A permerror is a broken record (too many lookups,
a syntax error), common on domains that send legitimate mail; section 8.7 leaves it to local
policy, and rejecting would bounce their mail for their admin's typo. The seed's later Exim
configuration rejected fail, softfail and permerror: ``spf_softfail = "reject"`` and
``spf_permerror = "reject"`` restore that.

Every accepted message gets a ``Received-SPF`` header (RFC 7208 section 9.1) naming the result.
Skipped (no header): authenticated sessions, local submissions, localhost, relay_from_hosts,
and ``secondary_mx_hosts`` (our backup MX relays mail that was checked there, from its own
address, which the sender's record would not list).
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import dns.exception
import dns.resolver
import spf as pyspf

from policy.checks import Context, Result
from policy.checks.relay import secondary_mx, trusted_client
from policy.verdict import SPF_ERROR, SPF_FAIL, TEMP_DNS, Verdict, defer

NAME = "spf"

_installed: dns.resolver.Resolver | None = None
_install_lock = threading.Lock()


def _install_dns(resolver: dns.resolver.Resolver) -> None:
    """Send pyspf's lookups to our resolver. pyspf resolves through one module-level function
    (``spf.DNSLookup``); the daemon has one resolver configuration, so replacing it once is
    enough. Same answers as pyspf's own dnspython lookup: NXDOMAIN and NODATA are empty,
    anything temporary raises its TempError (-> temperror)."""
    global _installed
    with _install_lock:
        if _installed is resolver:
            return

        def lookup(
            name: str, qtype: str, strict: bool = True, timeout: float = 20
        ) -> list[tuple[tuple[str, str], Any]]:
            found: list[tuple[tuple[str, str], Any]] = []
            try:
                answer = resolver.resolve(
                    name, qtype, lifetime=min(timeout, resolver.lifetime), search=False
                )
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                return found
            except dns.exception.DNSException as e:  # timeout, SERVFAIL, no server ...
                raise pyspf.TempError(f"DNS {type(e).__name__}: {e}") from None
            for rdata in answer:
                key = (name, qtype)
                if qtype in ("A", "AAAA"):
                    found.append((key, rdata.address))
                elif qtype == "MX":
                    found.append((key, (rdata.preference, rdata.exchange)))
                elif qtype == "PTR":
                    found.append((key, rdata.target.to_text(True)))
                elif qtype in ("TXT", "SPF"):
                    found.append((key, rdata.strings))
            return found

        pyspf.DNSLookup = lookup
        _installed = resolver


def evaluate(
    ip: str, sender: str, helo: str, receiver: str, timeout: float
) -> tuple[str, str, str]:
    """(result, explanation, Received-SPF value); blocking."""
    q = pyspf.query(i=ip, s=sender, h=helo or "unknown", receiver=receiver, querytime=timeout)
    result, _code, explanation = q.check()
    return result, explanation, q.get_header(result, receiver=receiver)


def quick(ctx: Context) -> Result | None:
    """The result when SPF need not be evaluated (off, a client we relay for, a secondary
    MX), at once; None when it must be (the daemon then answers the stage from a task)."""
    services = ctx.services
    if services is None:
        return Result(note="not run (no network)")
    settings = services.settings
    if not settings.spf_enabled:
        return Result(note="SPF checks are off (spf_enabled = false)")
    trusted, why, source = trusted_client(ctx)
    if trusted is None:
        return Result(defer(NAME, why))
    if trusted:
        return Result(note=f"not checked: {why}", source=source)
    if secondary_mx(ctx.ip, settings.secondary_mx_hosts):
        return Result(note=f"not checked: {ctx.ip} is a secondary MX (secondary_mx_hosts)")
    return None


async def check(ctx: Context) -> Result:
    answered = quick(ctx)
    if answered is not None:
        return answered
    services = ctx.services
    assert services is not None  # quick() answered otherwise
    settings = services.settings
    _install_dns(services.sync_resolver)
    loop = asyncio.get_running_loop()
    try:
        result, explanation, header = await asyncio.wait_for(
            loop.run_in_executor(
                services.threads, evaluate, ctx.ip, ctx.sender, ctx.helo, settings.hostname,
                settings.spf_timeout,
            ),
            settings.spf_timeout + 1,
        )  # fmt: skip
    except TimeoutError:
        return Result(defer(NAME, "SPF evaluation timed out", "SPF check timed out, try later",
                            TEMP_DNS))  # fmt: skip
    domain = (ctx.sender or f"postmaster@{ctx.helo}").rpartition("@")[2]
    note = f"SPF {result} for {domain} from {ctx.ip}: {explanation}"
    received = (f"Received-SPF: {header}",)
    if result == "fail":
        return Result(Verdict(SPF_FAIL, f"SPF check failed: {domain} does not permit {ctx.ip} "
                              "to send its mail", NAME, note))  # fmt: skip
    if result == "temperror":
        return Result(defer(NAME, note, "SPF check could not be completed, try later", TEMP_DNS))
    action = getattr(settings, f"spf_{result}", "accept") if result != "pass" else "accept"
    if action == "reject":
        status = SPF_ERROR if result == "permerror" else SPF_FAIL
        return Result(Verdict(status, f"SPF check {result} for {domain} (rejected here by "
                              "policy)", NAME, note))  # fmt: skip
    return Result(note=note, headers=received)
