"""Sender-verify callouts: ask the sender domain's mail server whether it knows the address.

``Callouts(settings, resolver)`` is made once per daemon (policy/services.py);
``await verify(address) -> Outcome`` answers for one envelope sender. It never raises (our own
trouble is a ``temporary`` outcome) and returns within ``callout_timeout`` seconds, DNS, waits
for a slot and every MX host included: the MAIL stage runs SPF and then this inside
``mail_deadline``, which exim/configure's readsocket timeout exceeds (policy/settings.py).

The conversation, as Exim's own callouts have it (RFC 5321 section 3.3 without DATA)::

    connect  -> 220 greeting
    EHLO <callout_helo or primary_hostname>   (HELO if EHLO gets a 5xx)
    MAIL FROM:<>          (SMTPUTF8 added when the address is not ASCII)
    RCPT TO:<address>     exactly as the sender gave it
    QUIT

No STARTTLS, although Exim's own callouts try it when offered (unless the transport's
``hosts_verify_avoid_tls`` matches): the question and the answer carry nothing secret,
unauthenticated opportunistic TLS would not stop an active attacker anyway, and a handshake per
callout costs time inside the MAIL deadline and needs a cleartext retry when it fails. A
server that insists on TLS (RFC 3207 forbids that for a public MX) answers MAIL with a 5xx,
which makes the sender unverifiable, never refused.

Where: MX hosts by preference (RFC 5321 section 5.1; the domain's own A/AAAA when it has no MX),
each host's addresses IPv4 first, at most ``MAX_ATTEMPTS`` connections (Exim's
``hosts_max_try``). A host that refuses the connection, times out or answers 4xx makes way for
the next. ``callout_connect_timeout`` bounds each TCP connect; the greeting and the commands are
bounded by what is left of ``callout_timeout`` (slow greeters are not broken, RFC 5321 section
4.5.3.2 allows minutes).

Addresses never connected to (the note in ``why`` names each one and the reason): loopback,
private, link-local and other non-global addresses unless ``callout_allow_private``;
unspecified, multicast and broadcast addresses always; and always this machine's own addresses
(read from its interfaces; loopback ones are left to ``callout_allow_private``, so the tests'
loopback peers can be asked, while an MX that points back at our public address never is).

| what happened | ``Outcome.kind`` | remembered |
|---|---|---|
| RCPT 2xx | accepted | ``callout_positive_ttl`` |
| RCPT 5xx | refused | ``callout_negative_ttl`` |
| RCPT 5xx with enhanced code 5.7.x (policy: "your IP is listed") | unverifiable | negative TTL |
| 5xx to greeting, EHLO+HELO or MAIL; UTF-8 address, no SMTPUTF8 | unverifiable | negative TTL |
| NXDOMAIN, no MX and no address, or every MX host without an address | no_domain | no |
| null MX (RFC 7505) | null_mx | no |
| DNS timeout or SERVFAIL | dns_trouble | never |
| 4xx, timeout, refused or lost connection, no slot or rate token in time | temporary | never |
| no address we may connect to; an address that cannot go on an SMTP line | unverifiable | no |

Why a 5xx before RCPT is not a refusal, although Exim counts a 5xx to ``MAIL FROM:<>`` as a
verification failure: such an answer is about us (our address is on their blocklist) or about
their policy (they refuse bounces, which RFC 5321 section 4.5.5 sends from <>), never whether the
address exists; DESIGN.md allows a 5xx only on definite evidence. The same goes for a RCPT
refusal whose enhanced code is in the 5.7 (security/policy, RFC 3463) class. The first host
that answers 5xx ends the callout: its siblings serve the same domain and policy.

Why DNS answers are not remembered here: the resolver (policy/dns.py) caches them for exactly
as long as the domain's own TTLs say; a second cache would keep a fixed typo for two hours.
What is remembered is what a mail server said, keyed by the address with its domain in lower
case and its local part as given (RFC 5321 section 2.4: only the domain is case-insensitive;
Exim keys its callout cache on the address too). A TTL of 0 turns that cache off.

Etiquette: concurrent ``verify`` calls for one address share one callout (a waiter whose own
deadline passes is cancelled alone, the callout goes on for the others and the cache); at
most ``callout_domain_concurrency`` callouts talk to one sender domain at once, the rest wait
in turn; and callouts start at most ``callout_rate`` per second over all domains, with bursts
of ``callout_burst`` (a token bucket). A callout that would have to wait for its rate token
beyond ``callout_timeout`` answers ``temporary`` at once instead of waiting; one still waiting
for its domain slot at the deadline answers ``temporary`` then. Neither ever rejects.

``stats`` counts what happened (verify calls, cache hits, shared waits, callouts, TCP
connections, rate refusals) for tests and benchmarks.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import ipaddress
import os
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import aiosmtplib
import dns.asyncresolver
from cachetools import TTLCache

from policy import dns as mpdns
from policy.addresses import is_valid_domain
from policy.matchers import ip_object
from policy.settings import Settings

Kind = Literal[
    "accepted",  # RCPT 2xx
    "refused",  # RCPT 5xx
    "no_domain",  # NXDOMAIN, or neither MX nor address records
    "null_mx",  # RFC 7505
    "temporary",  # 4xx, timeout, connection refused, rate or concurrency cap reached
    "dns_trouble",  # DNS timeout / SERVFAIL
    "unverifiable",  # nobody we may ask (private/loopback/own targets), 5xx before RCPT,
    # a 5.7.x policy refusal at RCPT, or an address that cannot be written on an SMTP line
]

# Connections one callout makes at most (Exim's hosts_max_try), and MX host names it looks up.
MAX_ATTEMPTS = 5
MAX_HOSTS = 10
# Characters of one peer reply kept for the log, and of a whole ``why``.
PEER_TEXT = 160
WHY_TEXT = 1000
# Seconds QUIT may take once the answer is known (never more than what is left).
QUIT_WAIT = 2.0
# Seconds between re-reads of this machine's interface addresses (DHCP, an added alias).
OWN_REFRESH = 60.0
# RFC 5321 section 4.5.3.1.3: a path is at most 256 octets with its angle brackets.
MAX_ADDRESS = 254


@dataclass(frozen=True, slots=True)
class Outcome:
    kind: Kind
    why: str  # for the log: which host said what, or what was skipped and why
    cached: bool = False


@dataclass(slots=True)
class Stats:
    """Counters since start (tests and benchmarks read them; the daemon does not)."""

    verifies: int = 0  # verify() calls
    cache_hits: int = 0  # answered from the positive or negative cache
    shared: int = 0  # joined a callout already running for the same address
    callouts: int = 0  # callouts started (each looks up DNS, perhaps connects)
    connections: int = 0  # TCP connections attempted
    rate_limited: int = 0  # answered temporary: no rate token in time


@dataclass(frozen=True, slots=True)
class _Address:
    text: str  # as the sender gave it: what RCPT TO carries
    key: str  # the cache key: domain lower-cased
    domain: str  # lower-cased, without a trailing dot: what DNS is asked
    wire: bytes  # UTF-8
    utf8: bool  # not ASCII: needs SMTPUTF8 (RFC 6531)


@dataclass(slots=True)
class _Slot:
    semaphore: asyncio.Semaphore
    users: int = 0


@dataclass(slots=True)
class _Progress:
    """Where a callout is, so a timeout can say what it interrupted."""

    phase: str = "starting"
    kind_on_timeout: Kind = "temporary"
    peer_answered: bool = False  # a mail server gave a definite answer: remember it
    notes: list[str] = field(default_factory=list)


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up. ``reserve(max_wait)`` takes
    one token and returns the seconds to wait for it (0: at once), or None - taking
    nothing - when that wait would exceed ``max_wait``. Waits queue: each reservation
    starts after the one before it."""

    def __init__(
        self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.clock = clock
        self.tokens = float(burst)
        self.stamp = clock()

    def reserve(self, max_wait: float) -> float | None:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        wait = 0.0 if self.tokens >= 1.0 else (1.0 - self.tokens) / self.rate
        if wait > max_wait:
            return None
        self.tokens -= 1.0  # may go below 0: the tokens owed to waiters already queued
        return wait


def interface_addresses() -> frozenset[str]:
    """This machine's own addresses, loopback left out, read from Linux's /proc/net
    (``fib_trie``: IPv4 "/32 host LOCAL" entries; ``if_inet6``). Empty where those files do
    not exist: the non-global filter still applies there. No DNS is asked (our host name's
    addresses would need a query that might leave the machine)."""
    found: set[str] = set()
    with contextlib.suppress(OSError):
        leaf = ""
        for line in Path("/proc/net/fib_trie").read_text().splitlines():
            text = line.strip()
            if text.startswith("|-- "):
                leaf = text[4:]
            elif text == "/32 host LOCAL" and leaf:
                found.add(leaf)
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/net/if_inet6").read_text().splitlines():
            found.add(str(ipaddress.IPv6Address(bytes.fromhex(line.split()[0]))))
    own: set[str] = set()
    for text in found:
        try:
            ip = ipaddress.ip_address(text)
        except ValueError:
            continue
        if not ip.is_loopback:
            own.add(str(ip))
    return frozenset(own)


def skip_reason(address: str, allow_private: bool, own: frozenset[str]) -> str:
    """Why a callout must not connect to ``address``; "" when it may."""
    ip = ip_object(address)
    if ip is None:
        return "not an IP address"
    if ip.is_unspecified or ip.is_multicast or ip == ipaddress.IPv4Address("255.255.255.255"):
        return "not a unicast address"
    if str(ip) in own:
        return "one of this machine's own addresses"
    if not allow_private and not mpdns.is_public(str(ip)):
        what = ("loopback" if ip.is_loopback else "link-local" if ip.is_link_local
                else "private" if ip.is_private else "not globally routable")  # fmt: skip
        return f"{what} address (callout_allow_private is off)"
    return ""


def printable(text: str, limit: int = PEER_TEXT) -> str:
    """A peer's text made safe and short for the log: lines joined with " / ", anything but
    printable ASCII as "?", at most ``limit`` characters."""
    joined = " / ".join(part.strip() for part in text.splitlines() if part.strip())
    clean = "".join(c if " " <= c <= "~" else "?" for c in joined)
    return clean if len(clean) <= limit else clean[: limit - 3] + "..."


def _parse(address: str) -> _Address | str:
    """The address ready for DNS and the RCPT line, or why it cannot be asked about."""
    local, at, domain = address.rpartition("@")
    shown = printable(address, 100)
    if not at or not local or not domain:
        return f"<{shown}> has no local part or no domain: not verified"
    if domain.startswith("[") or not is_valid_domain(domain):
        return f"<{shown}>: {printable(domain, 80)!r} is not a domain name DNS can answer for"
    try:
        wire = address.encode("utf-8")
    except UnicodeEncodeError:
        return f"<{shown}> is not valid UTF-8: not verified"
    if len(wire) > MAX_ADDRESS:
        return f"<{shown}> is longer than RFC 5321 allows: not verified"
    quoted = len(local) >= 2 and local[0] == local[-1] == '"'
    bare = local[1:-1] if quoted else local
    if any(c < " " or c == "\x7f" for c in address) or (
        not quoted and any(c in ' <>"' for c in bare)
    ):
        return f"<{shown}> cannot be written on an SMTP command line: not verified"
    domain = domain.lower().rstrip(".")
    return _Address(address, f"{local}@{domain}", domain, wire, not address.isascii())


class Callouts:
    """The callout engine: caches, shared in-flight callouts, caps. See the module docstring.

    ``own_addresses`` says where this machine's addresses come from (default: its interfaces,
    ``interface_addresses``); it is called again every ``OWN_REFRESH`` seconds. ``clock`` is
    the time of the caches' TTLs and of the rate limit (tests pass one they can move on);
    timeouts always run on the event loop's clock.
    """

    def __init__(
        self,
        settings: Settings,
        resolver: dns.asyncresolver.Resolver,
        *,
        own_addresses: Callable[[], Iterable[str]] = interface_addresses,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.resolver = resolver
        self._helo = settings.callout_helo
        self.stats = Stats()
        s = settings
        self._positive: TTLCache[str, Outcome] | None = (
            TTLCache(s.callout_cache_size, s.callout_positive_ttl, clock)
            if s.callout_positive_ttl > 0 else None
        )  # fmt: skip
        self._negative: TTLCache[str, Outcome] | None = (
            TTLCache(s.callout_cache_size, s.callout_negative_ttl, clock)
            if s.callout_negative_ttl > 0 else None
        )  # fmt: skip
        self._running: dict[str, asyncio.Task[Outcome]] = {}
        self._slots: dict[str, _Slot] = {}
        self._bucket = TokenBucket(s.callout_rate, s.callout_burst, clock)
        self._own_source = own_addresses
        self._own: frozenset[str] = frozenset()
        self._own_read = -OWN_REFRESH

    async def _helo_name(self) -> str:
        """callout_helo, else primary_hostname, else the machine's FQDN: looked up on first
        use, in a thread (getfqdn may ask the DNS, which must not hold up the event loop)."""
        if not self._helo:
            settings = self.settings
            self._helo = await asyncio.to_thread(lambda: settings.hostname)
        return self._helo

    # --- the interface -------------------------------------------------------------------

    def cached(self, address: str) -> Outcome | None:
        """The remembered answer for ``address``, if there is one, at once (no await): the
        daemon answers a MAIL from the caches without starting a task (pipeline.quick)."""
        local, at, domain = address.rpartition("@")
        if not at:
            return None
        key = f"{local}@{domain.lower().rstrip('.')}"  # as _parse makes it
        for cache in (self._positive, self._negative):
            hit = cache.get(key) if cache is not None else None
            if hit is not None:
                self.stats.cache_hits += 1
                return dataclasses.replace(hit, cached=True)
        return None

    async def verify(self, address: str) -> Outcome:
        """Would the sender's mail server take mail for ``address``? See the module docstring
        for the outcomes; never raises but CancelledError (the caller's own deadline)."""
        self.stats.verifies += 1
        hit = self.cached(address)
        if hit is not None:
            return hit
        parsed = _parse(address)
        if isinstance(parsed, str):
            return Outcome("unverifiable", parsed)
        task = self._running.get(parsed.key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._callout(parsed))
            self._running[parsed.key] = task
            task.add_done_callback(functools.partial(self._finished, parsed.key))
        else:
            self.stats.shared += 1
        # shield: one waiter's cancellation must not end the callout the others wait for.
        return await asyncio.shield(task)

    def close(self) -> None:
        """Cancel the callouts still running (the daemon is stopping)."""
        for task in list(self._running.values()):
            task.cancel()

    # --- one callout ---------------------------------------------------------------------

    def _finished(self, key: str, task: asyncio.Task[Outcome]) -> None:
        if self._running.get(key) is task:
            del self._running[key]

    async def _callout(self, address: _Address) -> Outcome:
        self.stats.callouts += 1
        limit = self.settings.callout_timeout
        progress = _Progress()
        try:
            async with asyncio.timeout(limit):
                outcome = await self._ask_domain(address, progress, time.monotonic() + limit)
        except TimeoutError:
            why = f"no answer within callout_timeout ({limit:g} s) while {progress.phase}"
            outcome = Outcome(progress.kind_on_timeout, _join([*progress.notes, why]))
        except Exception as e:  # our own bug: defer, never accept or reject on it
            outcome = Outcome("temporary", f"internal error: {type(e).__name__}: {e}")
        if progress.peer_answered:
            self._remember(address.key, outcome)
        return outcome

    def _remember(self, key: str, outcome: Outcome) -> None:
        """Keep what a mail server said (see the table): 2xx positive, 5xx negative."""
        if outcome.kind == "accepted":
            keep, drop = self._positive, self._negative
        else:
            keep, drop = self._negative, self._positive
        if drop is not None:
            drop.pop(key, None)
        if keep is not None:
            keep[key] = outcome

    async def _ask_domain(self, address: _Address, progress: _Progress, deadline: float) -> Outcome:
        domain = address.domain
        progress.phase = f"looking up the MX of {domain}"
        progress.kind_on_timeout = "dns_trouble"
        try:
            mx = await mpdns.mail_exchangers(self.resolver, domain)
        except mpdns.DnsTemporary as e:
            return Outcome("dns_trouble", str(e))
        if mx.null_mx:
            return Outcome("null_mx", mx.why)
        if not mx.exists:
            return Outcome("no_domain", mx.why)

        progress.phase = f"looking up the addresses of {domain}'s MX hosts"
        hosts = mx.hosts[:MAX_HOSTS]
        found = await asyncio.gather(*(self._addresses(h) for h in hosts))
        notes = progress.notes
        targets: list[tuple[str, str]] = []
        dns_trouble = skipped = False
        own = self._own_addresses()
        for host, ips in zip(hosts, found, strict=True):
            if isinstance(ips, mpdns.DnsTemporary):
                dns_trouble = True
                notes.append(f"{host}: {ips}")
                continue
            if not ips:
                notes.append(f"{host} has no address")
            for ip in ips:
                reason = skip_reason(ip, self.settings.callout_allow_private, own)
                if reason:
                    skipped = True
                    notes.append(f"{host}[{ip}] skipped: {reason}")
                else:
                    targets.append((host, ip))
        if not targets:
            if dns_trouble:
                return Outcome("dns_trouble", _join(notes))
            if skipped:
                return Outcome("unverifiable", _join([f"no MX host of {domain} we may ask",
                                                      *notes]))  # fmt: skip
            # Exim too fails routing: "all relevant MX records point to non-existent hosts".
            return Outcome("no_domain", _join([f"no MX host of {domain} has an address",
                                               *notes]))  # fmt: skip
        progress.kind_on_timeout = "temporary"

        n = self.settings.callout_domain_concurrency
        progress.phase = f"waiting for a callout slot for {domain} (callout_domain_concurrency={n})"
        async with self._domain_slot(domain):
            progress.phase = "waiting for the callout rate (callout_rate)"
            wait = self._bucket.reserve(deadline - time.monotonic())
            if wait is None:
                self.stats.rate_limited += 1
                s = self.settings
                return Outcome("temporary", f"callout rate limit reached (callout_rate="
                               f"{s.callout_rate:g}/s, callout_burst={s.callout_burst}): "
                               f"{domain} not asked now")  # fmt: skip
            if wait > 0:
                await asyncio.sleep(wait)
            for host, ip in targets[:MAX_ATTEMPTS]:
                progress.phase = f"talking to {host}[{ip}]"
                kind, said = await self._ask_host(host, ip, address, deadline)
                notes.append(said)
                if kind != "temporary":
                    progress.peer_answered = True
                    return Outcome(kind, _join(notes))
            if len(targets) > MAX_ATTEMPTS:
                notes.append(f"{len(targets) - MAX_ATTEMPTS} more addresses not tried")
        return Outcome("temporary", _join(notes))

    async def _addresses(self, host: str) -> list[str] | mpdns.DnsTemporary:
        try:
            return await mpdns.addresses(self.resolver, host)
        except mpdns.DnsTemporary as e:
            return e

    @contextlib.asynccontextmanager
    async def _domain_slot(self, domain: str) -> AsyncIterator[None]:
        slot = self._slots.get(domain)
        if slot is None:
            slot = _Slot(asyncio.Semaphore(self.settings.callout_domain_concurrency))
            self._slots[domain] = slot
        slot.users += 1
        try:
            async with slot.semaphore:
                yield
        finally:
            slot.users -= 1
            if slot.users == 0:  # idle: forget it, or every domain ever seen stays here
                del self._slots[domain]

    def _own_addresses(self) -> frozenset[str]:
        now = time.monotonic()
        if now - self._own_read >= OWN_REFRESH:
            self._own = frozenset(self._own_source())
            self._own_read = now
        return self._own

    # --- one SMTP conversation -----------------------------------------------------------

    async def _ask_host(
        self, host: str, ip: str, address: _Address, deadline: float
    ) -> tuple[Kind, str]:
        """(accepted | refused | unverifiable | temporary, what the host said)."""
        where = f"{host}[{ip}]"
        helo = await self._helo_name()
        connect_timeout = min(self.settings.callout_connect_timeout, deadline - time.monotonic())
        self.stats.connections += 1
        try:
            sock = await _connect(ip, self.settings.callout_port, connect_timeout)
        except TimeoutError:
            return "temporary", f"{where} connect: no answer in {connect_timeout:.3g} s"
        except OSError as e:
            return "temporary", f"{where} connect: {_os_error(e)}"
        # From here the socket is the SMTP client's: it hands it to the event loop's transport,
        # which closes it (closing it here as well could close a reused descriptor).
        smtp = aiosmtplib.SMTP(sock=sock, local_hostname=helo, use_tls=False,
                               start_tls=False,
                               timeout=max(deadline - time.monotonic(), 0.001))  # fmt: skip
        step = "greeting"
        try:
            try:
                await smtp.connect()
            except aiosmtplib.SMTPConnectResponseError as e:
                return _early(where, step, e.code, e.message)
            step = "EHLO"
            try:
                await smtp.ehlo(hostname=helo)
            except aiosmtplib.SMTPHeloError as e:
                if e.code // 100 != 5:
                    return _early(where, step, e.code, e.message)
                step = "HELO"  # RFC 5321 section 3.2: an old server that knows no EHLO
                try:
                    await smtp.helo(hostname=helo)
                except aiosmtplib.SMTPHeloError as e2:
                    return _early(where, f"EHLO {e.code}, HELO", e2.code, e2.message)
            step = "MAIL FROM:<>"
            options: list[bytes] = []
            if address.utf8:
                if not smtp.supports_extension("smtputf8"):
                    return "unverifiable", f"{where} does not offer SMTPUTF8 (RFC 6531)"
                options.append(b"SMTPUTF8")
            r = await smtp.execute_command(b"MAIL", b"FROM:<>", *options)
            if r.code // 100 != 2:
                return _early(where, step, r.code, r.message)
            step = "RCPT"
            # The address exactly as given: aiosmtplib's rcpt() would reparse it with
            # email.utils (which drops "comments", so another address could be asked about).
            r = await smtp.execute_command(b"RCPT", b"TO:<" + address.wire + b">")
            said = f"{where} RCPT {r.code} {printable(r.message)}"
            if r.code // 100 == 2:
                return "accepted", said
            if r.code // 100 == 5:
                if r.message.startswith("5.7."):
                    return "unverifiable", f"{said} (a policy refusal, not about the address)"
                return "refused", said
            return "temporary", said
        except aiosmtplib.SMTPTimeoutError:
            return "temporary", f"{where} {step}: no answer in time"
        except aiosmtplib.SMTPServerDisconnected:
            return "temporary", f"{where} {step}: connection lost"
        except aiosmtplib.SMTPResponseException as e:  # malformed or oversized reply
            return "temporary", f"{where} {step}: {printable(e.message)}"
        except OSError as e:
            return "temporary", f"{where} {step}: {_os_error(e)}"
        finally:
            await self._quit(smtp, deadline)

    @staticmethod
    async def _quit(smtp: aiosmtplib.SMTP, deadline: float) -> None:
        """QUIT politely when the connection is still up and time is left; close anyway."""
        wait = min(QUIT_WAIT, deadline - time.monotonic() - 0.05)
        task = asyncio.current_task()
        stopping = task is not None and task.cancelling() > 0  # a timeout, or close()
        if smtp.is_connected and wait > 0 and not stopping:
            with contextlib.suppress(Exception):
                await smtp.quit(timeout=wait)
        smtp.close()


def _early(where: str, step: str, code: int, message: str) -> tuple[Kind, str]:
    """A refusal before RCPT: 5xx says nothing about the address (module docstring), 4xx
    (421 included) or anything else: try another host or later."""
    said = f"{where} {step} {code} {printable(message)}"
    if code // 100 == 5:
        return "unverifiable", f"{said} (refused before RCPT: not about the address)"
    return "temporary", said


def _os_error(e: OSError) -> str:
    # asyncio words a refused connection "Connect call failed (...)": the errno says it plainly.
    return os.strerror(e.errno) if e.errno else printable(str(e) or type(e).__name__)


def _join(notes: list[str]) -> str:
    text = "; ".join(notes)
    return text if len(text) <= WHY_TEXT else text[: WHY_TEXT - 3] + "..."


async def _connect(ip: str, port: int, timeout: float) -> socket.socket:
    """A TCP connection to ``ip``:``port`` within ``timeout`` seconds (the connect alone, not
    the greeting). Raises TimeoutError or OSError."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        async with asyncio.timeout(timeout):
            await asyncio.get_running_loop().sock_connect(sock, (ip, port))
    except BaseException:
        sock.close()
        raise
    return sock
