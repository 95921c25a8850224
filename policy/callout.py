"""Sender-verify callouts. INTERFACE ONLY for now; the implementation is in progress.

``Callouts.verify(address)`` asks the address's domain's MX (RFC 5321 5.1: MX by preference,
else the implicit MX) whether it would accept mail for ``address``: connect, EHLO (HELO if
refused), ``MAIL FROM:<>``, ``RCPT TO:<address>``, QUIT.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import dns.asyncresolver

from policy.settings import Settings

Kind = Literal[
    "accepted",  # RCPT 2xx
    "refused",  # RCPT 5xx
    "no_domain",  # NXDOMAIN, or neither MX nor address records
    "null_mx",  # RFC 7505
    "temporary",  # 4xx, timeout, connection refused, rate or concurrency cap reached
    "dns_trouble",  # DNS timeout / SERVFAIL
    "unverifiable",  # nobody we may ask (private/loopback/own targets), or 5xx before RCPT
]


@dataclass(frozen=True, slots=True)
class Outcome:
    kind: Kind
    why: str  # for the log: which host said what
    cached: bool = False


class Callouts:
    def __init__(self, settings: Settings, resolver: dns.asyncresolver.Resolver) -> None:
        self.settings = settings
        self.resolver = resolver

    async def verify(self, address: str) -> Outcome:
        raise NotImplementedError
