"""The daemon's long-lived services for the checks that wait on the network or the disk:
the DNS resolvers (policy/dns.py), the sender-verify callout engine with its caches
(policy/callout.py), and a thread pool for libraries that block (pyspf, reading a message).

One ``Services`` per daemon, made when it starts and closed when it stops; the checks reach it
through ``Context.services``.
"""

from __future__ import annotations

import concurrent.futures
from dataclasses import dataclass, field

import dns.asyncresolver
import dns.resolver

from policy import dns as mpdns
from policy.callout import Callouts
from policy.settings import Settings


@dataclass
class Services:
    settings: Settings
    resolver: dns.asyncresolver.Resolver
    sync_resolver: dns.resolver.Resolver
    callouts: Callouts
    threads: concurrent.futures.ThreadPoolExecutor = field(
        default_factory=lambda: concurrent.futures.ThreadPoolExecutor(
            max_workers=8, thread_name_prefix="mailpolicy-io"
        )
    )

    @classmethod
    def create(cls, settings: Settings) -> Services:
        resolver = mpdns.make_async(settings)
        return cls(settings, resolver, mpdns.make_sync(settings), Callouts(settings, resolver))

    def close(self) -> None:
        self.callouts.close()  # callouts still running would go on for up to callout_timeout
        self.threads.shutdown(wait=False, cancel_futures=True)
