"""The policy daemon: transport only. One request line per Unix-socket connection, answered
with one reply line; the decisions are made by ``pipeline`` on the current ``Snapshot``.

Life cycle:

* start: take ``<socket>.lock`` (flock) so a second instance refuses to start; if a socket file
  exists and someone answers PING on it, refuse too; a stale socket file (nobody listening) is
  removed; a non-socket file at that path is never removed. The socket is created with
  ``socket_mode`` (default 0660) and ``socket_group``, listen backlog ``backlog`` (1024).
* run: asyncio on uvloop with a raw ``asyncio.Protocol`` (no streams: the issue measured streams
  on the default loop at 8x the CPU of a C server per request, a raw Protocol on uvloop at 2x).
  At most ``max_connections`` open connections; the next one gets ``DEFER 451 4.3.2`` at once.
  A request not answered within ``request_deadline`` seconds of its connection gets
  ``DEFER 451 4.3.0`` (checked by a sweep every ``request_deadline / 8`` s, capped at 0.25 s).
  The list files are checked for edits every ``reload_interval`` seconds in a worker thread;
  while the data root itself is missing (unmounted, moved) the last good snapshot stays in force.
* SIGHUP: re-read every file now and reopen the log file. SIGTERM/SIGINT: stop accepting,
  let connections in progress finish (at most ``drain_timeout`` s; a request still unfinished
  then gets ``DEFER 451 4.3.2``, never an empty reply), remove the socket, exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import gc
import grp
import os
import signal
import socket
import stat
import sys
import time

from policy import __version__, protocol
from policy.aliases import Limits, ResolveError, resolve
from policy.auth import Authenticator, Outcome, ThrottleSettings
from policy.checks import Context
from policy.logbook import Decision, Logbook
from policy.mailtree import Snapshot, TreeLoader
from policy.pipeline import ASYNC_STAGES, evaluate, evaluate_async, evaluate_quick
from policy.services import Services
from policy.settings import Settings
from policy.verdict import TEMP_LOCAL, TEMP_OVERLOAD, TEMP_ROUTING_LOOP, Verdict, defer

_OVERLOAD = (
    f"DEFER {TEMP_OVERLOAD.code} {TEMP_OVERLOAD.enhanced} policy daemon overloaded\n".encode()
)
_TIMEOUT = f"DEFER {TEMP_LOCAL.code} {TEMP_LOCAL.enhanced} policy request timed out\n".encode()
_SHUTDOWN = (
    f"DEFER {TEMP_OVERLOAD.code} {TEMP_OVERLOAD.enhanced} policy daemon shutting down\n".encode()
)
_INTERNAL = f"DEFER {TEMP_LOCAL.code} {TEMP_LOCAL.enhanced} policy daemon internal error\n".encode()


class DaemonError(Exception):
    """The daemon cannot start (another instance, a bad socket path ...)."""


class Pending:
    """A request whose stage has async checks (MAIL, DATA): ``Policy.finish`` answers it."""

    __slots__ = ("ctx",)

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx


class Policy:
    """The decisions: request line in, reply line (and log record) out. Stages of list lookups
    are answered at once; stages that wait on the network or the message (``ASYNC_STAGES``)
    come back as ``Pending`` and are finished by ``finish`` in a task."""

    def __init__(
        self, settings: Settings, loader: TreeLoader, services: Services | None = None
    ) -> None:
        self.loader = loader
        self.limits = Limits(settings.alias_max_depth, settings.alias_max_targets)
        self.snapshot: Snapshot = loader.refresh()[0]
        self.services = services

    def answer(self, line: bytes, started_ns: int) -> tuple[bytes, Decision | None] | Pending:
        """The reply to one request line, and its decision-log record (None: not logged); or
        Pending for a stage with async checks."""
        try:
            request = protocol.parse(line)
        except protocol.ProtocolError as e:
            reply = protocol.render_error(e)
            return reply, ("-", "", "", "", reply[:-1].decode(), "protocol", str(e), "",
                           time.monotonic_ns() - started_ns)  # fmt: skip
        verb = request.verb
        f = request.fields
        if verb not in protocol.POLICY_VERBS:
            return self._wrong_socket(verb, started_ns)
        if verb == "RCPT" or verb == "MAIL" or verb == "CONNECT":
            g = f.get
            ctx = Context(verb, f["ip"], g("sender", ""), g("rcpt", ""), g("helo", ""),
                          g("auth", ""), self.snapshot, self.limits,
                          services=self.services)  # fmt: skip
            if verb in ASYNC_STAGES:
                quick = evaluate_quick(ctx)  # from the caches, without a task, when it can
                return Pending(ctx) if quick is None else self.record(ctx, quick, started_ns)
            return self.record(ctx, evaluate(ctx), started_ns)
        if verb == "DATA":
            ctx = Context("DATA", f["ip"], f["sender"], "", f.get("helo", ""), f.get("auth", ""),
                          self.snapshot, self.limits, message_id=f.get("id", ""),
                          size=int(f.get("size") or 0), rcpt_count=int(f["rcpts"]),
                          services=self.services)  # fmt: skip
            if "DATA" in ASYNC_STAGES:
                return Pending(ctx)
            return self.record(ctx, evaluate(ctx), started_ns)
        if verb == "ALIAS":
            return self._alias(f["addr"], started_ns)
        return protocol.render_pong(f"mailpolicy {__version__}"), None

    @staticmethod
    def _wrong_socket(verb: str, started_ns: int) -> tuple[bytes, Decision]:
        error = protocol.ProtocolError(f"verb {verb} is not served on this socket")
        reply = protocol.render_error(error)
        return reply, ("-", "", "", "", reply[:-1].decode(), "protocol", str(error), "",
                       time.monotonic_ns() - started_ns)  # fmt: skip

    @staticmethod
    def record(ctx: Context, v: Verdict, started_ns: int) -> tuple[bytes, Decision]:
        """The reply line and the decision-log record of a stage's verdict."""
        reason = v.reason
        if ctx.stage == "DATA":
            # The log line names the message, so a refusal can be found by Exim's message id.
            what = f"id={ctx.message_id or '-'} size={ctx.size} rcpts={ctx.rcpt_count}"
            reason = f"{what}; {reason}" if reason else what
        try:
            reply = protocol.render_verdict(v)
        except ValueError as e:  # a header we made is malformed: our bug, never fail open
            v = defer(v.check, f"cannot render the answer: {e}")
            reason, reply = v.reason, protocol.render_verdict(v)
        return reply, (ctx.stage, ctx.ip, ctx.sender, ctx.rcpt, v.status.prefix[:-1], v.check,
                       reason, v.source, time.monotonic_ns() - started_ns)  # fmt: skip

    async def finish(self, pending: Pending, started_ns: int) -> tuple[bytes, Decision]:
        ctx = pending.ctx
        try:
            v = await evaluate_async(ctx)
        except Exception as e:  # never fail open
            v = defer("daemon", f"internal error: {type(e).__name__}: {e}")
        return self.record(ctx, v, started_ns)

    def _alias(self, addr: str, started_ns: int) -> tuple[bytes, Decision]:
        reason = ""
        try:
            found = resolve(self.snapshot, addr, self.limits)
            reply = protocol.NOTFOUND if found is None else protocol.render_found(",".join(found))
        except ResolveError as e:
            reason = str(e)
            status = TEMP_ROUTING_LOOP if e.loop else TEMP_LOCAL
            reply = protocol.render_verdict(
                defer("alias", reason, "cannot expand alias now", status)
            )
        except ValueError as e:  # more destinations than one reply holds: never send a cut list
            reason = str(e)
            reply = protocol.render_verdict(defer("alias", reason, "alias expansion too long"))
        shown = reply[:-1].decode("utf-8", "replace")
        return reply, ("ALIAS", "", "", addr, shown[:200], "alias", reason, "",
                       time.monotonic_ns() - started_ns)  # fmt: skip


class Connection(asyncio.Protocol):
    """One client: read one line (or up to EOF), answer, close."""

    __slots__ = ("auth", "buf", "daemon", "deadline_ns", "done", "started", "task", "transport")

    def __init__(self, daemon: Daemon, auth: bool = False) -> None:
        self.daemon = daemon
        self.auth = auth  # a connection to the auth socket (Dovecot)
        self.deadline_ns = daemon.auth_deadline_ns if auth else daemon.deadline_ns
        self.buf = b""
        self.done = False  # the reply is written (or no more input is taken)
        self.started = 0
        self.transport: asyncio.Transport | None = None
        self.task: asyncio.Task[None] | None = None  # a stage answered later (MAIL, DATA)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.started = time.monotonic_ns()
        d = self.daemon
        if len(d.connections) >= d.settings.max_connections:
            self.done = True
            d.overloads += 1
            transport.write(_OVERLOAD)  # type: ignore[attr-defined]
            transport.close()
            return
        d.connections.add(self)

    def data_received(self, data: bytes) -> None:
        if self.done:
            return
        buf = self.buf + data if self.buf else data
        end = buf.find(b"\n")
        if end >= 0:
            self.respond(buf[: end + 1])
        elif len(buf) > protocol.MAX_LINE:
            self.respond(buf)  # the parser names the problem: line too long
        else:
            self.buf = buf

    def eof_received(self) -> bool:
        # Exim shuts down its write side after the request: a line without LF is complete.
        if not self.done:
            self.respond(self.buf)
        return True  # keep the transport open until our reply is written

    def connection_lost(self, exc: Exception | None) -> None:
        self.done = True
        self.daemon.connections.discard(self)

    def respond(self, line: bytes) -> None:
        self.done = True
        d = self.daemon
        if self.auth:
            d.answer_auth(self, line)
            return
        try:
            answered = d.policy.answer(line, self.started)
            if isinstance(answered, Pending):
                d.start_pending(self, answered)
                return
            reply, record = answered
        except Exception as e:  # never fail open, never hang: our trouble is a 4xx
            reply, record = (
                _INTERNAL,
                (
                    "-",
                    "",
                    "",
                    "",
                    "DEFER",
                    "daemon",
                    f"internal error: {type(e).__name__}: {e}",
                    "",
                    0,
                ),
            )
        assert self.transport is not None
        self.transport.write(reply)
        self.transport.close()
        if record is not None:
            d.log.decision(record)

    def finish(self, reply: bytes, record: Decision | None) -> None:
        """The answer of a request answered later (a login): written unless the deadline or
        shutdown answered first (then the late result is only logged)."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(reply)
            self.transport.close()
        if record is not None:
            self.daemon.log.decision(record)

    def expire(self, reply: bytes = _TIMEOUT, reason: str = "request deadline passed") -> None:
        if self.task is not None:
            self.task.cancel()  # a callout shared with other requests goes on (shielded)
        if self.transport is not None and not self.transport.is_closing():
            self.done = True
            self.transport.write(reply)
            self.transport.close()
            self.daemon.log.decision(
                (
                    "-",
                    "",
                    "",
                    "",
                    "DEFER",
                    "daemon",
                    reason,
                    "",
                    time.monotonic_ns() - self.started,
                )
            )


class Daemon:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        try:
            self.log = Logbook(settings.log_file)
        except OSError as e:  # a start-up error: exit 2, as the CLI promises
            raise DaemonError(f"cannot open log file {settings.log_file}: {e.strerror}") from None
        self.loader = TreeLoader(settings.root, settings.hostname)
        self.services = Services.create(settings)
        self.policy = Policy(settings, self.loader, self.services)
        for problem in self.policy.snapshot.problems:
            self.log.event(f"problem {problem}")
        self.connections: set[Connection] = set()
        self.overloads = 0
        self._locks: list[int] = []
        self._bound: list[tuple[str, int, socket.socket]] = []
        self.auth_sock: socket.socket | None = None
        self.deadline_ns = int(settings.request_deadline * 1e9)
        # MAIL and DATA wait on the network and the message: their own, longer deadlines
        # (exim/configure's readsocket timeouts for them are rendered from these).
        self.stage_deadline_ns = {
            "MAIL": int(settings.mail_deadline * 1e9),
            "DATA": int(settings.data_deadline * 1e9),
        }
        self.auth_deadline_ns = int(settings.auth_deadline * 1e9)
        self.auth = Authenticator(
            lambda: self.policy.snapshot,
            realm=settings.auth_default_realm,
            workers=settings.auth_workers,
            cache_ttl=settings.auth_cache_ttl,
            throttle=ThrottleSettings(settings.auth_throttle_free, settings.auth_throttle_base,
                                      settings.auth_throttle_max, settings.auth_throttle_window),
        )  # fmt: skip
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping: asyncio.Event | None = None
        self._reload_lock: asyncio.Lock | None = None
        self._hup_tasks: set[asyncio.Task[None]] = set()
        self._root_missing = False

    # --- sockets ---------------------------------------------------------------------------

    def bind(self) -> socket.socket:
        """Exim's socket (and, when configured, the auth socket: ``self.auth_sock``)."""
        st = self.settings
        sock = self._bind(st.socket, st.socket_mode_int, st.socket_group, "socket_group")
        if st.auth_socket:
            try:
                self.auth_sock = self._bind(
                    st.auth_socket, int(st.auth_socket_mode, 8), st.auth_socket_group,
                    "auth_socket_group",
                )  # fmt: skip
            except BaseException:
                self.unbind()
                raise
        return sock

    def _bind(self, path: str, mode: int, group: str, group_setting: str) -> socket.socket:
        directory = os.path.dirname(path) or "."
        os.makedirs(directory, exist_ok=True)
        lock_fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            raise DaemonError(f"another mailpolicy instance holds {path}.lock") from None
        self._locks.append(lock_fd)
        if os.path.lexists(path):
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise DaemonError(f"{path} exists and is not a socket; not removing it")
            reply = ping(path)
            if reply is not None:
                raise DaemonError(f"another instance answers on {path}: {reply!r}")
            os.unlink(path)  # stale: nobody listening
            self.log.event(f"removed stale socket {path}")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # no window in which the socket is more open than asked
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        if group:
            try:
                gid = grp.getgrnam(group).gr_gid
            except KeyError:
                sock.close()
                os.unlink(path)
                raise DaemonError(f"{group_setting} {group!r}: no such group") from None
            os.chown(path, -1, gid)
        os.chmod(path, mode)
        sock.setblocking(False)
        self._bound.append((path, os.lstat(path).st_ino, sock))
        return sock

    def unbind(self) -> None:
        for path, ino, sock in self._bound:
            # Remove the socket file only if it is still ours (not replaced by someone else).
            with contextlib.suppress(OSError):
                if os.lstat(path).st_ino == ino:
                    os.unlink(path)
            sock.close()
        self._bound.clear()
        for fd in self._locks:
            os.close(fd)
        self._locks.clear()

    # --- stages answered later (MAIL, DATA) ---------------------------------------------

    def start_pending(self, conn: Connection, pending: Pending) -> None:
        conn.deadline_ns = self.stage_deadline_ns.get(pending.ctx.stage, self.deadline_ns)
        task = asyncio.get_running_loop().create_task(self._finish_pending(conn, pending))
        conn.task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _finish_pending(self, conn: Connection, pending: Pending) -> None:
        try:
            reply, record = await self.policy.finish(pending, conn.started)
        except asyncio.CancelledError:  # the deadline (or shutdown) answered for us
            return
        conn.finish(reply, record)

    # --- logins ----------------------------------------------------------------------------

    def answer_auth(self, conn: Connection, line: bytes) -> None:
        """A request on the auth socket. PING and USER are answered at once; AUTH (hashing,
        perhaps a throttle delay) is answered by a task, the connection's deadline still
        running."""
        started = conn.started
        try:
            request = protocol.parse(line)
            if request.verb not in protocol.AUTH_VERBS:
                raise protocol.ProtocolError(f"verb {request.verb} is not served on this socket")
        except protocol.ProtocolError as e:
            reply = protocol.render_error(e)
            conn.finish(reply, ("-", "", "", "", reply[:-1].decode(), "protocol", str(e), "",
                                time.monotonic_ns() - started))  # fmt: skip
            return
        f = request.fields
        if request.verb == "PING":
            conn.finish(protocol.render_pong(f"mailpolicy {__version__}"), None)
        elif request.verb == "USER":
            outcome = self.auth.lookup(f["user"])
            conn.finish(*self._auth_reply("USER", "", f["user"], outcome, started))
        else:
            task = asyncio.get_running_loop().create_task(self._login(conn, f, started))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _login(self, conn: Connection, f: dict[str, str], started: int) -> None:
        ip = f.get("ip", "")
        try:
            outcome = await self.auth.login(
                f["user"], f["pass"].encode("utf-8", "surrogateescape"), ip
            )
        except Exception as e:  # never a FAIL for our own trouble
            outcome = Outcome("DEFER", f["user"], reason=f"internal error: {type(e).__name__}: {e}")
        conn.finish(*self._auth_reply("AUTH", ip, f["user"], outcome, started))

    @staticmethod
    def _auth_reply(
        verb: str, ip: str, name: str, o: Outcome, started: int
    ) -> tuple[bytes, Decision]:
        if o.kind == "OK":
            reply = protocol.render_ok(o.user, o.home)
        elif o.kind == "FAIL":
            reply = protocol.render_fail("authentication failed")
        elif o.kind == "NOTFOUND":
            reply = protocol.NOTFOUND
        else:
            reply = protocol.render_verdict(
                defer("auth", o.reason, "temporary authentication failure")
            )
        shown = reply[:-1].decode() if o.kind == "DEFER" else o.kind
        return reply, (verb, ip, "", o.user or name, shown, "auth", o.reason, o.source,
                       time.monotonic_ns() - started)  # fmt: skip

    # --- running ---------------------------------------------------------------------------

    async def serve(self, ready: asyncio.Event | None = None) -> None:
        loop = asyncio.get_running_loop()
        sock = self.bind()
        self._stopping = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        servers = [
            await loop.create_unix_server(
                lambda: Connection(self), sock=sock, backlog=self.settings.backlog
            )
        ]
        if self.auth_sock is not None:
            servers.append(
                await loop.create_unix_server(
                    lambda: Connection(self, auth=True),
                    sock=self.auth_sock,
                    backlog=self.settings.backlog,
                )
            )
        # The reload thread holds the GIL for up to this long while the event loop waits:
        # 5 ms by default, which showed as 5-10 ms p99 spikes during a reload.
        sys.setswitchinterval(0.0005)
        self.log.start(loop)
        _freeze_heap()
        loop.add_signal_handler(signal.SIGHUP, self._on_hup)
        loop.add_signal_handler(signal.SIGTERM, self._stopping.set)
        loop.add_signal_handler(signal.SIGINT, self._stopping.set)
        tasks = [asyncio.create_task(t) for t in (self._reload_loop(), self._sweep_loop())]
        if self.auth_sock is not None:
            # The first login should not pay for the dummy hash or the process pool's start.
            loop.run_in_executor(self.auth.threads, self.auth.warm_up)
        self.log.event(
            f"listening socket={self.settings.socket} "
            f"auth_socket={self.settings.auth_socket or '-'} root={self.settings.root} "
            f"version={__version__} pid={os.getpid()}"
        )
        if ready is not None:
            ready.set()
        try:
            await self._stopping.wait()
        finally:
            for server in servers:
                server.close()
            self.log.event("stopping: draining connections")
            deadline = loop.time() + self.settings.drain_timeout
            while self.connections and loop.time() < deadline:
                await asyncio.sleep(0.02)
            # Requests still unfinished get a DEFER, never an empty reply: Exim does not treat
            # an empty reply as a failure (RECIPES.md section 3).
            unfinished = sum(not c.done for c in self.connections)
            for conn in list(self.connections):
                conn.expire(_SHUTDOWN, "shutting down: drain_timeout passed")
            deadline = loop.time() + 0.5
            while self.connections and loop.time() < deadline:
                await asyncio.sleep(0.01)
            for task in tasks:
                task.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await t
            for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            self.unbind()
            self.auth.close()
            self.services.close()
            self.log.event(f"stopped; {unfinished} unfinished requests deferred at shutdown")
            self.log.close()

    def stop(self) -> None:
        if self._stopping is not None:
            self._stopping.set()

    def _on_hup(self) -> None:
        # A failed reload or log reopen is logged like a failed periodic reload, not left to
        # stderr; the task is referenced until done (asyncio keeps only weak references).
        try:
            self.log.reopen()
        except OSError as e:  # keep writing to the old file
            self.log.event(f"cannot reopen the log file: {e}")
        task = asyncio.get_running_loop().create_task(self._reload_logged(force=True))
        self._hup_tasks.add(task)
        task.add_done_callback(self._hup_tasks.discard)

    async def _reload_logged(self, force: bool = False) -> None:
        try:
            await self.reload(force)
        except Exception as e:  # keep serving the last snapshot
            self.log.event(f"reload failed: {type(e).__name__}: {e}")

    async def reload(self, force: bool = False) -> None:
        assert self._reload_lock is not None
        async with self._reload_lock:
            loop = asyncio.get_running_loop()
            started = time.monotonic()
            snapshot, messages = await loop.run_in_executor(None, self.loader.refresh, force)
            # A vanished data root (unmounted, moved away) reads as an empty tree, in which every
            # local domain is remote and local mail would get 550 5.7.1. Keep the last good
            # snapshot instead, as for a broken file (DESIGN.md guarantees 2 and 7). The loader
            # has forgotten the files meanwhile, so it re-reads them all when the root is back.
            root_there = await loop.run_in_executor(None, os.path.isdir, self.loader.root)
            if not root_there:
                if not self._root_missing:
                    self._root_missing = True
                    self.log.event(
                        f"problem {self.loader.root}: data root missing "
                        "(keeping the last good version)"
                    )
                return
            if self._root_missing:
                self._root_missing = False
                self.log.event(f"data root {self.loader.root} is back")
            changed = snapshot is not self.policy.snapshot
            self.policy.snapshot = snapshot
            if changed:
                _freeze_heap()
            for m in messages:
                self.log.event(f"problem {m}")
            if changed or force:
                self.log.event(
                    f"reloaded{' (SIGHUP)' if force else ''} in "
                    f"{time.monotonic() - started:.3f}s; "
                    f"{len(snapshot.problems)} file problems in force"
                )

    async def _reload_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.reload_interval)
            await self._reload_logged()

    async def _sweep_loop(self) -> None:
        period = min(0.25, self.settings.request_deadline / 8)
        while True:
            await asyncio.sleep(period)
            now = time.monotonic_ns()
            for conn in [c for c in self.connections if now - c.started > c.deadline_ns]:
                conn.expire()
            if self.overloads:  # one event per sweep, not one line per refused connection
                self.log.event(f"overloaded: {self.overloads} connections deferred at once "
                               f"(max_connections={self.settings.max_connections})")  # fmt: skip
                self.overloads = 0


def _freeze_heap() -> None:
    """Move the objects alive now (a snapshot's hundreds of thousands of entries) out of the
    cyclic garbage collector's view. They hold no cycles and are freed by reference counting
    when a reload drops them; scanning them in every full collection stalled the loop for tens
    of milliseconds (benchmarks/report)."""
    gc.freeze()


def ping(path: str, timeout: float = 1.0) -> str | None:
    """The PING reply of whoever listens on ``path``; None when nobody does."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(path)
            s.sendall(b"PING\n")
            s.shutdown(socket.SHUT_WR)
            return s.recv(512).decode("ascii", "replace").strip()
    except (ConnectionRefusedError, FileNotFoundError):
        return None
    except OSError as e:
        return f"(no answer: {e})"


def run(settings: Settings) -> None:
    """Run the daemon until SIGTERM (blocking)."""
    import uvloop

    daemon = Daemon(settings)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(daemon.serve())
