"""Sender verification at MAIL: does the envelope sender's address exist?

Who is not verified: the null sender ``<>`` and ``postmaster@`` (RFC 5321 requires both to be
deliverable, and bounces must never be refused for it), senders in ``senderverify_exceptions``
(exact addresses, ``*@domain`` and other ``*`` wildcards, ``^`` regexes; wildlsearch semantics,
first match wins), and clients we relay for (authenticated, local, relay_from_hosts) or our
``secondary_mx_hosts``.

Everyone else gets a callout (policy/callout.py): the sender domain's MX is asked, as if we
were going to send a bounce, whether it would take mail for the sender. What its answer means:

| callout | verdict |
|---|---|
| RCPT 2xx | accept (remembered ``callout_positive_ttl``) |
| RCPT 5xx (not 5.7.x) | 550 5.1.7 (remembered ``callout_negative_ttl``) |
| no such domain: NXDOMAIN, neither MX nor address, no MX host with an address | 550 5.1.8 |
| the domain has a null MX (RFC 7505) | 550 5.7.27: it sends no mail, so nothing can come back |
| 4xx, timeout, refused connection, DNS trouble | 451 4.4.0 / 4.4.3: try later; never remembered |
| no host we may ask (every MX private or ours) | accept, unverified (logged) |
| 5xx before RCPT, or RCPT 5.7.x ("your host is blocked") | accept, unverified (remembered) |

A 5xx before RCPT, or a 5.7.x policy refusal at RCPT, says something about us (our address, our
bounces) and not about the sender's address, so it is not the definite evidence a 5xx needs
(DESIGN.md guarantee 2). Exim counts a refused ``MAIL FROM:<>`` as a failed verification; we
do not.
"""

from __future__ import annotations

from policy.addresses import split
from policy.callout import Outcome
from policy.checks import Context, Result
from policy.checks.relay import secondary_mx, trusted_client
from policy.mailtree import Snapshot
from policy.verdict import (
    SENDER_DOMAIN_UNKNOWN,
    SENDER_NULL_MX,
    SENDER_REFUSED,
    TEMP_CALLOUT,
    TEMP_DNS,
    Verdict,
    defer,
)

NAME = "sender_verify"


def exemption(snapshot: Snapshot, sender: str) -> tuple[bool | None, str, str]:
    """(exempt?, why, file:line). exempt is None when the exception list is unavailable."""
    if not sender:
        return True, "null sender <> is never verified", ""
    local, _ = split(sender)
    if local.lower() == "postmaster":
        return True, "postmaster is never verified", ""
    exceptions = snapshot.senderverify_exceptions
    if exceptions.data is None:
        return None, exceptions.problem, ""
    hit = exceptions.data.lookup(sender)
    if hit is not None:
        return (
            True,
            f"{sender} matches {hit.key!r} in senderverify_exceptions",
            exceptions.source(hit.line),
        )
    return False, f"{sender} is not exempt from sender verification", ""


def quick(ctx: Context) -> Result | None:
    """The result without waiting - an exempt or trusted sender, callouts off, or the answer
    in the callout caches - at once; None when a callout must run (the daemon then answers
    the stage from a task)."""
    exempt, why, source = exemption(ctx.snapshot, ctx.sender)
    if exempt is None:
        return Result(defer(NAME, why))
    if exempt:
        return Result(note=why, source=source)
    services = ctx.services
    if services is None:
        return Result(note=f"{why}; callout not run (no network)")
    settings = services.settings
    if not settings.callout_enabled:
        return Result(note=f"{why}; callouts are off (callout_enabled = false)")
    trusted, trust_why, trust_source = trusted_client(ctx)
    if trusted is None:
        return Result(defer(NAME, trust_why))
    if trusted:
        return Result(note=f"not verified: client is {trust_why}", source=trust_source)
    if secondary_mx(ctx.ip, settings.secondary_mx_hosts):
        return Result(note=f"not verified: {ctx.ip} is a secondary MX (secondary_mx_hosts)")
    hit = services.callouts.cached(ctx.sender)
    return judge(ctx.sender, hit) if hit is not None else None


async def check(ctx: Context) -> Result:
    answered = quick(ctx)
    if answered is not None:
        return answered
    assert ctx.services is not None  # quick() answered otherwise
    return judge(ctx.sender, await ctx.services.callouts.verify(ctx.sender))


def judge(sender: str, o: Outcome) -> Result:
    """What a callout's outcome means for the MAIL command (the table in the docstring)."""
    note = f"callout for {sender}: {o.why}{' (cached)' if o.cached else ''}"
    if o.kind == "accepted" or o.kind == "unverifiable":
        return Result(note=note)
    if o.kind == "refused":
        return Result(Verdict(SENDER_REFUSED, f"<{sender}>: sender verification failed "
                              "(the sender's mail server does not know this address)",
                              NAME, note))  # fmt: skip
    if o.kind == "no_domain":
        return Result(Verdict(SENDER_DOMAIN_UNKNOWN, f"<{sender}>: the sender's domain does "
                              "not exist or accepts no mail", NAME, note))  # fmt: skip
    if o.kind == "null_mx":
        return Result(Verdict(SENDER_NULL_MX, f"<{sender}>: the sender's domain has a null "
                              "MX and accepts no mail", NAME, note))  # fmt: skip
    status = TEMP_DNS if o.kind == "dns_trouble" else TEMP_CALLOUT
    return Result(defer(NAME, note, "sender verification could not be completed, try later",
                        status))  # fmt: skip
