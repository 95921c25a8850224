"""Restricted characters in the recipient's local part (the seed's / Exim's default ACL rules).

For local domains (and rewrite domains) a local part may not start with ``.`` nor contain
``@ % ! / |``; for other domains it may not start with ``. / |`` nor contain ``@ % !`` or
``/../``. These refuse the classic relay tricks (``a%b@local``, ``"a@b"@local``, ``b!a@local``)
and pipe/file addresses before anything else looks at the address. A recipient without a valid
domain is refused here too: the address itself is the definite evidence.
"""

from __future__ import annotations

from policy.addresses import is_valid_domain, restricted_local_part
from policy.checks import PASS, Context, Result
from policy.verdict import BAD_ADDRESS_SYNTAX, Verdict

NAME = "restricted_characters"


def check(ctx: Context) -> Result:
    local, domain = ctx.rcpt_local, ctx.rcpt_domain
    if not local or not is_valid_domain(domain):
        return Result(
            Verdict(
                BAD_ADDRESS_SYNTAX,
                "malformed recipient address",
                NAME,
                "recipient has no local part or no valid domain",
            )
        )
    snapshot = ctx.snapshot
    handled = snapshot.is_local_domain(domain) or bool(
        snapshot.rewrite_domains.data and domain in snapshot.rewrite_domains.data
    )
    if restricted_local_part(local, handled):
        return Result(
            Verdict(
                BAD_ADDRESS_SYNTAX,
                "restricted characters in address",
                NAME,
                f"local part {local!r} matches the restricted-character rule",
            )
        )
    return PASS
