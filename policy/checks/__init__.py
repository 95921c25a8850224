"""The checks, one module each. Every check has the same shape::

    def check(ctx: Context) -> Result            # list lookups: answered at once
    async def check(ctx: Context) -> Result      # DNS, SMTP callouts, reading the message

A check only reports what it found: ``Result(verdict=None, note=...)`` lets the stage go on;
a ``Result`` with a verdict ends the stage with it (the first deny or defer wins). A result may
carry ``headers`` to add to the message when the stage accepts (Received-SPF ...). The pipeline
(``policy.pipeline``) lists which checks run at which stage, in order.

Async checks reach the daemon's long-lived services (resolver, callout cache, thread pool)
through ``ctx.services``; it is None where no network may be used (``mailpolicy explain``
without ``--network``), and such a check then passes with a note saying it did not run.

To add a check: write ``policy/checks/<name>.py`` with ``NAME`` and ``check``, add it to a stage in
``policy.pipeline.STAGES``, and add ``tests/test_check_<name>.py``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from policy.aliases import Limits, Target
from policy.mailtree import Snapshot
from policy.message import Message, read_message
from policy.verdict import Verdict

if TYPE_CHECKING:
    from policy.services import Services


@dataclass(slots=True)
class Context:
    """One request as the checks see it. ``target`` is filled by the first check that
    classifies the recipient, so later checks do not look it up again."""

    stage: str
    ip: str
    sender: str
    rcpt: str
    helo: str
    auth: str
    snapshot: Snapshot
    limits: Limits
    target: Target | None = None
    # DATA only: Exim's message id, the size in bytes and the number of recipients.
    message_id: str = ""
    size: int = 0
    rcpt_count: int = 0
    relayed: bool = False
    # The daemon's services for async checks (None: no network, see the module docstring).
    services: Services | None = None
    # DATA: the message, read once by the first check that needs it (load_message).
    message: Message | None = None
    # The recipient split once at the last "@", domain lower-cased (every check needs them).
    rcpt_local: str = field(init=False)
    rcpt_domain: str = field(init=False)

    def __post_init__(self) -> None:
        local, _, domain = self.rcpt.rpartition("@")
        self.rcpt_local = local
        self.rcpt_domain = domain.lower()


@dataclass(frozen=True, slots=True)
class Result:
    verdict: Verdict | None = None
    note: str = ""
    source: str = ""  # the file:line that decided, if a list entry did
    # Header lines ("Name: value", folded lines joined by "\n\t") to add when the stage accepts.
    headers: tuple[str, ...] = ()


PASS = Result()


async def load_message(ctx: Context) -> Message:
    """The DATA stage's message (policy/message.py), read in a worker thread on first use and
    shared by the checks that follow. Raises MessageError (the check defers)."""
    if ctx.message is None:
        assert ctx.services is not None
        loop = asyncio.get_running_loop()
        ctx.message = await loop.run_in_executor(
            ctx.services.threads, read_message, ctx.services.settings.root, ctx.message_id
        )
    return ctx.message
