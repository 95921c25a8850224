"""Which checks run at which SMTP stage, and the interpreter that runs them.

The pipeline is data (``STAGES``), walked in order; the first check that returns a verdict ends
the stage. A check that raises is our own trouble: the stage defers (DESIGN.md guarantee 1),
never accepts. With ``trace`` the interpreter records every check's result, which is all
``mailpolicy explain`` needs. Headers the checks found (``Result.headers``) go with the stage's
accept, in check order; a deny or defer drops them.

A stage whose checks are all plain functions (CONNECT, RCPT: list lookups) is answered by
``evaluate`` at once, on the event loop. A stage with an ``async`` check (MAIL: SPF and the
callout; DATA: DKIM and content scanning) is answered by ``evaluate_async``, which the daemon
runs as a task.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable

from policy.checks import (
    Context,
    Result,
    attachments,
    dkim,
    recipient,
    relay,
    restricted_characters,
    sender_verify,
    spam,
    spf,
    virus,
)
from policy.verdict import OK_CONNECT, OK_DATA, OK_RCPT, OK_SENDER, Status, Verdict, defer

Check = tuple[str, Callable[[Context], Result | Awaitable[Result]]]

# CONNECT has no checks of its own: asking at that stage still makes the daemon's health part
# of every session, so a daemon that cannot answer turns a new connection away with a 4xx
# before the client sends anything. MAIL runs SPF before the callout: a sender SPF already
# refuses is forged, and its domain should not get a probe from us. DATA (the message is read
# once, by the first check that needs it): DKIM for the dkim_required domains, then the content,
# cheapest first - blocked attachments from the MIME structure, viruses (clamd, milliseconds),
# spam (spamd, a tenth of a second, and only what is left).
STAGES: dict[str, tuple[tuple[Check, ...], Status]] = {
    "CONNECT": ((), OK_CONNECT),
    "MAIL": (((spf.NAME, spf.check), (sender_verify.NAME, sender_verify.check)), OK_SENDER),
    "RCPT": (
        (
            (restricted_characters.NAME, restricted_characters.check),
            (relay.NAME, relay.check),
            (recipient.NAME, recipient.check),
        ),
        OK_RCPT,
    ),
    "DATA": (
        (
            (dkim.NAME, dkim.check),
            (attachments.NAME, attachments.check),
            (virus.NAME, virus.check),
            (spam.NAME, spam.check),
        ),
        OK_DATA,
    ),
}

# Stages that need evaluate_async (computed once).
ASYNC_STAGES = frozenset(
    stage
    for stage, (checks, _) in STAGES.items()
    if any(inspect.iscoroutinefunction(check) for _, check in checks)
)


def _crashed(name: str, e: Exception) -> Result:
    # A bug or an unexpected state: defer, never accept.
    return Result(defer(name, f"internal error in {name}: {type(e).__name__}: {e}"))


def _conclude(name: str, result: Result) -> Verdict:
    v = result.verdict
    assert v is not None
    if result.source and not v.source:
        v = Verdict(v.status, v.text, v.check, v.reason, result.source)
    return v


def evaluate(ctx: Context, trace: list[tuple[str, Result]] | None = None) -> Verdict:
    """A stage of plain checks (not in ASYNC_STAGES)."""
    checks, ok = STAGES[ctx.stage]
    decided_by, note, source = "", "", ""
    headers: list[str] = []
    for name, check in checks:
        try:
            result = check(ctx)
        except Exception as e:
            result = _crashed(name, e)
        if not isinstance(result, Result):  # an async check: the stage is in ASYNC_STAGES
            if inspect.iscoroutine(result):
                result.close()
            raise TypeError(f"check {name} is async: stage {ctx.stage} needs evaluate_async")
        if trace is not None:
            trace.append((name, result))
        if result.verdict is not None:
            return _conclude(name, result)
        headers.extend(result.headers)
        if result.note:  # the last check with something to say explains the accept
            decided_by, note, source = name, result.note, result.source
    return Verdict(ok, "ok", decided_by, note, source, tuple(headers))


class _Accept:
    """What the passing checks of an async stage said, for its accept: every note (several
    checks have something to say at MAIL: SPF and the callout), the headers in order."""

    def __init__(self) -> None:
        self.decided_by, self.source = "", ""
        self.notes: list[tuple[str, str]] = []  # (check, note)
        self.headers: list[str] = []

    def add(self, name: str, result: Result) -> None:
        self.headers.extend(result.headers)
        if result.note:
            self.decided_by, self.source = name, result.source or self.source
            self.notes.append((name, result.note))

    def verdict(self, ok: Status) -> Verdict:
        # One note stands alone; several are told apart by their check's name.
        if len(self.notes) == 1:
            note = self.notes[0][1]
        else:
            note = "; ".join(f"{name}: {text}" for name, text in self.notes)
        return Verdict(ok, "ok", self.decided_by, note, self.source, tuple(self.headers))


async def evaluate_async(ctx: Context, trace: list[tuple[str, Result]] | None = None) -> Verdict:
    """Any stage; async checks are awaited in order (the daemon bounds the whole by the
    stage's deadline, each check bounds its own network waits)."""
    checks, ok = STAGES[ctx.stage]
    accept = _Accept()
    for name, check in checks:
        try:
            outcome = check(ctx)
            result = await outcome if inspect.isawaitable(outcome) else outcome
        except Exception as e:
            result = _crashed(name, e)
        assert isinstance(result, Result)
        if trace is not None:
            trace.append((name, result))
        if result.verdict is not None:
            return _conclude(name, result)
        accept.add(name, result)
    return accept.verdict(ok)


# The async checks that can often answer without waiting (a cache hit, an exempt or trusted
# sender, a check turned off): ``quick(ctx) -> Result | None``, None meaning "must wait".
QUICK: dict[str, Callable[[Context], Result | None]] = {
    spf.NAME: spf.quick,
    sender_verify.NAME: sender_verify.quick,
}


def evaluate_quick(ctx: Context) -> Verdict | None:
    """An async stage answered at once when every check can answer without waiting; None as
    soon as one cannot (then evaluate_async answers it, from the start). The same verdict
    evaluate_async would give: each check's ``check`` calls its ``quick`` first. Why: a MAIL
    whose sender's callout is cached would otherwise pay for a task and a pass of the event
    loop (benchmarks/report/SENDER.md)."""
    checks, ok = STAGES[ctx.stage]
    accept = _Accept()
    for name, _check in checks:
        quick = QUICK.get(name)
        if quick is None:
            return None
        try:
            result = quick(ctx)
        except Exception as e:
            result = _crashed(name, e)
        if result is None:
            return None
        if result.verdict is not None:
            return _conclude(name, result)
        accept.add(name, result)
    return accept.verdict(ok)
