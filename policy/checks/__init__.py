"""The checks, one module each. Every check has the same shape::

    def check(ctx: Context) -> Result

A check only reports what it found: ``Result(verdict=None, note=...)`` lets the stage go on;
a ``Result`` with a verdict ends the stage with it (the first deny or defer wins). The pipeline
(``policy.pipeline``) lists which checks run at which stage, in order.

To add a check: write ``policy/checks/<name>.py`` with ``NAME`` and ``check``, add it to a stage in
``policy.pipeline.STAGES``, and add ``tests/test_check_<name>.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from policy.aliases import Limits, Target
from policy.mailtree import Snapshot
from policy.verdict import Verdict


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


PASS = Result()
