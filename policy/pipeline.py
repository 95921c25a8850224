"""Which checks run at which SMTP stage, and the interpreter that runs them.

The pipeline is data (``STAGES``), walked in order; the first check that returns a verdict ends
the stage. A check that raises is our own trouble: the stage defers (DESIGN.md guarantee 1),
never accepts. With ``trace`` the interpreter records every check's result, which is all
``mailpolicy explain`` needs.
"""

from __future__ import annotations

from collections.abc import Callable

from policy.checks import Context, Result, recipient, relay, restricted_characters, sender_verify
from policy.verdict import OK_CONNECT, OK_DATA, OK_RCPT, OK_SENDER, Status, Verdict, defer

Check = tuple[str, Callable[[Context], Result]]

# CONNECT and DATA have no checks of their own yet (sender authentication and content scanning
# come to DATA): asking at those stages still makes the daemon's health part of every session,
# so a daemon that cannot answer turns a new connection away with a 4xx before the client sends
# anything, and a message is not taken unless the daemon saw it and logged its id.
STAGES: dict[str, tuple[tuple[Check, ...], Status]] = {
    "CONNECT": ((), OK_CONNECT),
    "MAIL": (((sender_verify.NAME, sender_verify.check),), OK_SENDER),
    "RCPT": (
        (
            (restricted_characters.NAME, restricted_characters.check),
            (relay.NAME, relay.check),
            (recipient.NAME, recipient.check),
        ),
        OK_RCPT,
    ),
    "DATA": ((), OK_DATA),
}


def evaluate(ctx: Context, trace: list[tuple[str, Result]] | None = None) -> Verdict:
    checks, ok = STAGES[ctx.stage]
    decided_by, note, source = "", "", ""
    for name, check in checks:
        try:
            result = check(ctx)
        except Exception as e:  # a bug or an unexpected file state: defer, never accept
            result = Result(defer(name, f"internal error in {name}: {type(e).__name__}: {e}"))
        if trace is not None:
            trace.append((name, result))
        if result.verdict is not None:
            v = result.verdict
            if result.source and not v.source:
                v = Verdict(v.status, v.text, v.check, v.reason, result.source)
            return v
        if result.note:  # the last check with something to say explains the accept
            decided_by, note, source = name, result.note, result.source
    return Verdict(ok, "ok", decided_by, note, source)
