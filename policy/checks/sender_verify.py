"""Sender verification (MAIL stage): who is exempt from the callout.

``senderverify_exceptions`` lists senders (exact addresses, ``*@domain`` and other ``*``
suffix wildcards, ``^`` regexes; wildlsearch semantics, first match wins) that are accepted at
MAIL FROM without a verification callout. The null sender ``<>`` and ``postmaster@`` skip too.

This module decides the exemption; the callout itself (MX lookup, SMTP probe, caches) is built on
it by the sender-verify issue and runs only for senders this check does not exempt. Until then the
MAIL stage accepts every sender and the result says which rule would have applied.
"""

from __future__ import annotations

from policy.addresses import split
from policy.checks import Context, Result
from policy.mailtree import Snapshot

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


def check(ctx: Context) -> Result:
    exempt, why, source = exemption(ctx.snapshot, ctx.sender)
    if exempt is False:
        why += " (callout not built yet: accepted)"
    return Result(note=why, source=source)
