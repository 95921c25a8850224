"""Recipient verification for local domains: a user, an alias (domain, global or catch-all),
or postmaster; anything else is 550 5.1.1. See ``policy.aliases`` for the lookup order.

An alias is expanded here too, so that a loop or an over-long expansion defers at RCPT time
(451 4.4.6) instead of accepting mail that the router cannot deliver.
"""

from __future__ import annotations

from policy.aliases import Kind, ResolveError, classify, resolve
from policy.checks import PASS, Context, Result
from policy.verdict import TEMP_ROUTING_LOOP, USER_UNKNOWN, Verdict, defer

NAME = "recipient"


def check(ctx: Context) -> Result:
    if ctx.relayed:
        return PASS  # not ours to verify: a relayed domain
    target = classify(ctx.snapshot, ctx.rcpt)
    ctx.target = target
    kind = target.kind
    if kind is Kind.USER or kind is Kind.POSTMASTER or kind is Kind.REMOTE:
        # REMOTE here means a rewrite domain whose target is not local: the admin forwards it.
        return Result(
            note=f"{target.address}: {kind.value}" + (f" ({target.note})" if target.note else ""),
            source=target.source,
        )
    if kind is Kind.ALIAS:
        try:
            expansion = resolve(ctx.snapshot, ctx.rcpt, ctx.limits)
        except ResolveError as e:
            status = TEMP_ROUTING_LOOP if e.loop else None
            if status is not None:
                return Result(
                    defer(NAME, str(e), "alias loop detected, please try later", status),
                    source=target.source,
                )
            return Result(defer(NAME, str(e)), source=target.source)
        shown = ", ".join((expansion or [])[:5])
        return Result(
            note=f"alias of {shown}" + (" ..." if expansion and len(expansion) > 5 else ""),
            source=target.source,
        )
    if kind is Kind.UNAVAILABLE:
        return Result(defer(NAME, target.note))
    return Result(Verdict(USER_UNKNOWN, f"<{ctx.rcpt}>: no such user here", NAME, target.note))
