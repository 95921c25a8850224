"""Verdicts: what a check decided, with the SMTP reply that says so.

Every SMTP code and its enhanced status code come from one ``Status`` (maddy computed them
separately once and answered ``450`` with ``5.7.x``): the enhanced code's class digit is derived
from the basic code, so the two cannot disagree.

The action a reply line carries (ACCEPT / DEFER / DENY) is derived from the code class too:
2xx accept, 4xx defer (temporary: the sender retries, nothing is lost), 5xx deny.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field

_DETAIL = re.compile(r"(?:0|[1-9][0-9]{0,2})\.(?:0|[1-9][0-9]{0,2})", re.ASCII)


class Action(enum.Enum):
    ACCEPT = "ACCEPT"
    DEFER = "DEFER"
    DENY = "DENY"


@dataclass(frozen=True, slots=True)
class Status:
    """An SMTP reply code and the subject.detail of its RFC 3463 enhanced code."""

    code: int
    detail: str  # e.g. "1.1" for 5.1.1; the class digit comes from ``code``
    # Derived once here, not per reply (the hot path renders "<ACTION> <code> <enhanced> ").
    enhanced: str = field(init=False, compare=False, repr=False)
    action: Action = field(init=False, compare=False, repr=False)
    prefix: str = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if (
            type(self.code) is not int
            or self.code // 100 not in (2, 4, 5)
            or not 200 <= self.code <= 599
        ):
            raise ValueError(f"not an SMTP reply code: {self.code!r}")
        # RFC 3463: subject and detail are 1-3 digits each, without leading zeros.
        if not isinstance(self.detail, str) or not _DETAIL.fullmatch(self.detail):
            raise ValueError(f"not an enhanced status subject.detail: {self.detail!r}")
        enhanced = f"{self.code // 100}.{self.detail}"
        action = {2: Action.ACCEPT, 4: Action.DEFER, 5: Action.DENY}[self.code // 100]
        object.__setattr__(self, "enhanced", enhanced)
        object.__setattr__(self, "action", action)
        object.__setattr__(self, "prefix", f"{action.value} {self.code} {enhanced} ")


# The statuses the daemon uses, named for what they mean (RFC 3463 / RFC 5248 codes).
OK_CONNECT = Status(220, "0.0")  # service ready
OK_RCPT = Status(250, "1.5")  # destination address valid
OK_SENDER = Status(250, "1.0")  # originator ok
OK_DATA = Status(250, "0.0")  # message accepted
USER_UNKNOWN = Status(550, "1.1")  # bad destination mailbox address
BAD_ADDRESS_SYNTAX = Status(550, "1.3")  # bad destination mailbox address syntax
RELAY_DENIED = Status(550, "7.1")  # delivery not authorized
TEMP_LOCAL = Status(451, "3.0")  # other or undefined mail system status (our own trouble)
TEMP_OVERLOAD = Status(451, "3.2")  # system not accepting network messages
TEMP_ROUTING_LOOP = Status(451, "4.6")  # routing loop detected
TEMP_PROTOCOL = Status(451, "5.0")  # other or undefined protocol status (bad request)
# Sender checks (RFC 3463, RFC 7372 for the 7.2x codes, RFC 7505 for the null MX).
SENDER_REFUSED = Status(550, "1.7")  # bad sender's mailbox address syntax/verification
SENDER_DOMAIN_UNKNOWN = Status(550, "1.8")  # bad sender's system address
SENDER_NULL_MX = Status(550, "7.27")  # sender address has null MX
SPF_FAIL = Status(550, "7.23")  # SPF validation failed
SPF_ERROR = Status(550, "7.24")  # SPF validation error (permerror, when policy rejects)
DKIM_REQUIRED = Status(550, "7.20")  # no passing DKIM signature found
# Content (RFC 3463 5.7.x: security or policy status).
VIRUS_FOUND = Status(550, "7.0")  # the message carries a virus (named in the text)
BLOCKED_ATTACHMENT = Status(550, "7.1")  # an attachment type we do not accept
SPAM_REJECTED = Status(550, "7.1")  # a spam score at or over spam_reject_score
TEMP_DNS = Status(451, "4.3")  # directory server failure: SPF temperror, DNS timeouts
TEMP_CALLOUT = Status(451, "4.0")  # the sender's MX could not be asked now


@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome of a stage: what to answer the SMTP client and why.

    ``text`` is public (it reaches the client); ``reason`` is for the log only and may name files
    and lines; ``check`` names the check that decided; ``source`` is the file:line that decided,
    when a list entry did.
    """

    status: Status
    text: str
    check: str
    reason: str = ""
    source: str = ""
    # Accepts only: header lines for Exim to add to the message (protocol.render_verdict).
    headers: tuple[str, ...] = ()

    @property
    def action(self) -> Action:
        return self.status.action


def defer(
    check: str,
    reason: str,
    text: str = "temporary local problem, please try later",
    status: Status = TEMP_LOCAL,
) -> Verdict:
    """Our own trouble: a temporary failure, so the sender keeps the message and retries."""
    return Verdict(status, text, check, reason)
