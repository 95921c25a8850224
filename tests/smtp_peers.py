"""Scripted SMTP peers for the tests: aiosmtpd servers on loopback addresses that answer what a
test tells them to and count what they see. The remote MX hosts of sender-verify callouts
(policy/callout.py), of the Exim end-to-end tests and of the benchmarks.

API contract::

    with SmtpPeers() as peers:              # one background thread serves every peer
        mx1 = peers.add("127.0.0.5")         # says 250 to everything
        mx2 = peers.add(rcpt={"nobody@example.test": "550 5.1.1 no such user"}, delay=0.2)
        peers.port                           # the one port all peers listen on (callout_port)
        mx2.address                          # add() without an address picks a free 127.x.y.z
        mx1.connections, mx1.max_active, mx1.sessions   # what it saw
        mx1.rcpt["bob@example.test"] = "451 4.3.0 later"  # scripts may change between calls
        mx1.reset()                          # counters and sessions back to zero
        peers.remove(mx1)                    # stops listening: connections are refused

* All peers of one ``SmtpPeers`` share one port (a callout has one ``callout_port``) on
  different loopback addresses, which zone data points MX records at. Without an address,
  ``add`` picks one at random in 127.100.0.0-127.254.255.255, so parallel test processes
  (xdist) do not meet. Linux answers on all of 127.0.0.0/8 without configuration.
* The port is chosen below the kernel's ephemeral range (ports from bind(0) are what other
  tests' free_port() helpers and client sockets get), or given: ``SmtpPeers(port=2525)``.
* Nothing but the given loopback addresses is bound; aiosmtpd is never asked for the host's
  name (``SMTP(hostname=None)`` would call getfqdn, a DNS query).

The script of a peer (keyword arguments of ``add``, attributes of ``Peer``):

* ``greeting``: None for aiosmtpd's ``220 <name> ...``, or a whole reply line instead
  (``"554 5.7.1 go away"``); after a non-220 greeting the peer answers QUIT with 221 and
  anything else with 503 (RFC 5321 section 3.1).
* ``greeting_delay``: seconds before the greeting (0).
* ``silent``: accept the connection, never say a word - a hung server (False).
* ``ehlo``, ``helo``: None to accept, or a reply line instead (``"502 5.5.1 no EHLO"``: a
  client falls back to HELO).
* ``mail``: None for ``250 OK``, or the reply to every MAIL FROM.
* ``rcpt``: lower-cased address -> reply line; ``default_rcpt`` for any other address
  (``250 2.1.5 OK``).
* ``delay``: seconds before answering each RCPT, to hold sessions open (0).
* ``smtputf8``: offer SMTPUTF8 in the EHLO reply (True).

What it saw (updated by the server thread; plain ints and lists, read them after the client
is done): ``connections`` (accepted TCP connections), ``active`` and ``max_active``
(connections open at once), ``sessions`` (one ``Session`` per connection: HELO/EHLO name,
MAIL FROM, RCPT TOs, whether QUIT came) and ``messages`` (DATA: sender, recipients, bytes).
``wait_idle()`` waits until no connection is open (a client's QUIT may still be on its way
when its answer already is).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope
from aiosmtpd.smtp import Session as SmtpSession

_rng = random.SystemRandom()  # independent of tests that seed ``random``


@dataclass
class Session:
    """One connection as a peer saw it."""

    helo: str = ""
    mail_from: str | None = None
    rcpts: list[str] = field(default_factory=list)
    quit: bool = False


@dataclass(eq=False)
class Peer:
    """One scripted SMTP server (see the module docstring for the script)."""

    address: str
    port: int
    name: str = ""
    greeting: str | None = None
    greeting_delay: float = 0.0
    silent: bool = False
    ehlo: str | None = None
    helo: str | None = None
    mail: str | None = None
    rcpt: dict[str, str] = field(default_factory=dict)
    default_rcpt: str = "250 2.1.5 OK"
    delay: float = 0.0
    smtputf8: bool = True
    # What it saw.
    connections: int = 0
    active: int = 0
    max_active: int = 0
    sessions: list[Session] = field(default_factory=list)
    messages: list[tuple[str, list[str], bytes]] = field(default_factory=list)
    _server: asyncio.AbstractServer | None = field(default=None, repr=False)
    _transports: set[asyncio.Transport] = field(default_factory=set, repr=False)

    def reset(self) -> None:
        self.connections = self.max_active = 0
        self.sessions.clear()
        self.messages.clear()

    @property
    def rcpts(self) -> list[str]:
        """Every RCPT TO address it was asked about, in order."""
        return [r for s in self.sessions for r in s.rcpts]

    def wait_idle(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while self.active and time.monotonic() < deadline:
            time.sleep(0.005)


def _is_ok(reply: str) -> bool:
    return reply[:1] == "2"


class _Handler:
    """aiosmtpd's handler hooks, answering from the peer's script."""

    def __init__(self, peer: Peer, session: Session) -> None:
        self.peer = peer
        self.session = session

    async def handle_EHLO(
        self, server: SMTP, session: SmtpSession, envelope: Envelope, hostname: str,
        responses: list[str],
    ) -> list[str]:  # fmt: skip
        self.session.helo = hostname
        if self.peer.ehlo is not None:
            if _is_ok(self.peer.ehlo):
                session.host_name = hostname
            return [self.peer.ehlo]
        session.host_name = hostname  # the "new" EHLO hook must set it (aiosmtpd 1.4)
        return responses

    async def handle_HELO(
        self, server: SMTP, session: SmtpSession, envelope: Envelope, hostname: str
    ) -> str:
        self.session.helo = hostname
        reply = self.peer.helo if self.peer.helo is not None else f"250 {self.peer.name}"
        if _is_ok(reply):
            session.host_name = hostname
        return reply

    async def handle_MAIL(
        self, server: SMTP, session: SmtpSession, envelope: Envelope, address: str,
        options: list[str],
    ) -> str:  # fmt: skip
        self.session.mail_from = address
        reply = self.peer.mail if self.peer.mail is not None else "250 OK"
        if _is_ok(reply):
            envelope.mail_from = address
            envelope.mail_options.extend(options)
        return reply

    async def handle_RCPT(
        self, server: SMTP, session: SmtpSession, envelope: Envelope, address: str,
        options: list[str],
    ) -> str:  # fmt: skip
        self.session.rcpts.append(address)
        if self.peer.delay:
            await asyncio.sleep(self.peer.delay)
        reply = self.peer.rcpt.get(address.lower(), self.peer.default_rcpt)
        if _is_ok(reply):
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(options)
        return reply

    async def handle_DATA(self, server: SMTP, session: SmtpSession, envelope: Envelope) -> str:
        content = envelope.content if isinstance(envelope.content, bytes) else b""
        self.peer.messages.append((str(envelope.mail_from), list(envelope.rcpt_tos), content))
        return "250 2.0.0 kept"

    async def handle_QUIT(self, server: SMTP, session: SmtpSession, envelope: Envelope) -> str:
        self.session.quit = True
        return "221 2.0.0 bye"


class _PeerSMTP(SMTP):
    """aiosmtpd's server with the peer's counters and its greeting script. The greeting is
    sent in aiosmtpd's ``_handle_client``; only a scripted greeting replaces it."""

    def __init__(self, peer: Peer, loop: asyncio.AbstractEventLoop) -> None:
        self.peer = peer
        self.record = Session()
        super().__init__(_Handler(peer, self.record), hostname=peer.name, loop=loop,
                         enable_SMTPUTF8=peer.smtputf8, ident="smtp_peers")  # fmt: skip

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = self.peer
        peer.connections += 1
        peer.active += 1
        peer.max_active = max(peer.max_active, peer.active)
        peer.sessions.append(self.record)
        assert isinstance(transport, asyncio.Transport)
        peer._transports.add(transport)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        self.peer.active -= 1
        if self.transport is not None:
            self.peer._transports.discard(self.transport)
        super().connection_lost(error)

    def eof_received(self) -> bool:
        # aiosmtpd keeps a half-closed connection open (its handler is gone by then), so a
        # client that hangs up without QUIT would count as active forever: close it.
        super().eof_received()
        return False

    async def _handle_client(self) -> None:
        peer = self.peer
        if peer.greeting_delay:
            await asyncio.sleep(peer.greeting_delay)
        if peer.silent:
            await asyncio.Event().wait()  # until the client gives up (connection_lost cancels)
        if peer.greeting is None:
            await super()._handle_client()
            return
        await self.push(peer.greeting)
        while self.transport is not None:
            try:
                line = await self._reader.readuntil()
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                break
            if line.strip().upper() == b"QUIT":
                self.record.quit = True
                await self.push("221 2.0.0 bye")
                break
            await self.push("503 5.5.1 bad sequence of commands")
        if self.transport is not None:
            self.transport.close()


def _choose_port(address: str) -> int:
    """A port free on ``address`` below the ephemeral range (see the module docstring)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    low = max(low, 12000)
    for _ in range(200):
        port = _rng.randrange(10000, low)
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((address, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free TCP port on {address} between 10000 and {low}")


def random_loopback() -> str:
    return f"127.{_rng.randrange(100, 255)}.{_rng.randrange(0, 256)}.{_rng.randrange(1, 255)}"


class SmtpPeers:
    """A group of scripted peers on one port; see the module docstring."""

    def __init__(self, port: int | None = None) -> None:
        # Checked on 127.0.0.1: a wildcard listener elsewhere on that port would show there.
        self.port = port if port is not None else _choose_port("127.0.0.1")
        self.peers: list[Peer] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="smtp-peers", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def _call(self, coro: Any, timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def add(self, address: str | None = None, **script: Any) -> Peer:
        """Start a peer on ``address`` (default: a random unused 127.x.y.z) and the group's
        port, scripted by ``script`` (Peer's attributes). Raises OSError if it cannot bind."""
        used = {p.address for p in self.peers}
        if address is None:
            address = random_loopback()
            while address in used:
                address = random_loopback()
        name = script.pop("name", None) or f"peer-{address.replace('.', '-')}.test"
        peer = Peer(address, self.port, name, **script)

        async def start() -> asyncio.AbstractServer:
            loop = asyncio.get_running_loop()
            return await loop.create_server(
                lambda: _PeerSMTP(peer, loop), host=address, port=self.port,
                reuse_address=True,
            )  # fmt: skip

        peer._server = self._call(start())
        self.peers.append(peer)
        return peer

    def remove(self, peer: Peer) -> None:
        """Stop ``peer``: it no longer listens, and its open connections are dropped."""

        async def stop() -> None:
            if peer._server is not None:
                peer._server.close()
                await peer._server.wait_closed()
                peer._server = None
            for transport in list(peer._transports):
                transport.abort()

        with contextlib.suppress(RuntimeError):  # the loop is closed already
            self._call(stop())
        if peer in self.peers:
            self.peers.remove(peer)

    def close(self) -> None:
        """Stop every peer, cancel what the server thread still runs, end the thread."""

        async def shutdown() -> None:
            for peer in self.peers:
                for transport in list(peer._transports):
                    transport.abort()
                if peer._server is not None:
                    peer._server.close()
                    peer._server = None
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        if self._loop.is_running():
            with contextlib.suppress(Exception):
                self._call(shutdown())
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self.peers.clear()
        if not self._loop.is_running() and not self._loop.is_closed():
            self._loop.close()

    def __enter__(self) -> SmtpPeers:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
