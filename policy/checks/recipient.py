"""Recipient verification for local domains: a user, an alias (domain, global or catch-all),
or postmaster; anything else is 550 5.1.1. See ``policy.aliases`` for the lookup order.

An alias is expanded here too, so that a loop or an over-long expansion defers at RCPT time
(451 4.4.6) instead of accepting mail that the router cannot deliver.
"""

from __future__ import annotations

from policy.aliases import Kind, ResolveError, classify_parts, expand
from policy.checks import PASS, Context, Result
from policy.verdict import TEMP_ROUTING_LOOP, USER_UNKNOWN, Verdict, defer

NAME = "recipient"

# Enum members bound once: attribute access on an Enum class is slow on the hot path.
_USER, _POSTMASTER, _REMOTE, _ALIAS, _UNAVAILABLE = (
    Kind.USER,
    Kind.POSTMASTER,
    Kind.REMOTE,
    Kind.ALIAS,
    Kind.UNAVAILABLE,
)


def check(ctx: Context) -> Result:
    if ctx.relayed:
        return PASS  # not ours to verify: a relayed domain
    target = classify_parts(ctx.snapshot, ctx.rcpt_local, ctx.rcpt_domain)
    ctx.target = target
    kind = target.kind
    if kind is _USER or kind is _POSTMASTER or kind is _REMOTE:
        # REMOTE here means a rewrite domain whose target is not local: the admin forwards it.
        return Result(
            note=f"{target.address}: {kind._value_}" + (f" ({target.note})" if target.note else ""),
            source=target.source,
        )
    if kind is _ALIAS:
        try:
            expansion = expand(ctx.snapshot, target, ctx.limits)
        except ResolveError as e:
            status = TEMP_ROUTING_LOOP if e.loop else None
            if status is not None:
                return Result(
                    defer(NAME, str(e), "alias loop detected, please try later", status),
                    source=target.source,
                )
            return Result(defer(NAME, str(e)), source=target.source)
        shown = ", ".join(expansion[:5])
        return Result(
            note=f"alias of {shown}" + (" ..." if len(expansion) > 5 else ""),
            source=target.source,
        )
    if kind is _UNAVAILABLE:
        return Result(defer(NAME, target.note))
    return Result(Verdict(USER_UNKNOWN, f"<{ctx.rcpt}>: no such user here", NAME, target.note))
