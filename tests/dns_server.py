"""A real authoritative DNS server for the tests: Debian's NSD 4.6 on 127.0.0.1 (UDP and TCP),
serving zones the tests write, so the policy's DNS code (policy/dns.py: sender verification,
SPF, DKIM) meets real answers, real NXDOMAIN/NODATA/SERVFAIL and a real dead server.

API contract::

    with DnsServer() as server:          # started; stopped and its directory removed on exit
        server.address, server.port       # "127.0.0.1", a port free for UDP and TCP
        server.set_zone("example.test", ["@ MX 10 mx1", "mx1 A 127.0.0.5",
                                         f"sel._domainkey TXT {txt(dkim_value)}"])
        server.break_zone("broken.test")  # every name in the zone answers SERVFAIL
        server.remove_zone("example.test")  # the zone is gone: REFUSED, as for any other name
        server.stop()                     # nothing listens: queries time out
        server.start()                    # the same port and zones again

* ``set_zone(origin, records, ttl=0) -> serial`` writes the zone file and makes NSD serve it;
  when it returns, every query sees the new data (see "How" below). ``records`` are zone-file lines
  (or one text) relative to ``origin`` or absolute, with parentheses for multi-line records.
  Unless the caller gives them, it adds the apex SOA (its serial grows with every change), an
  apex ``NS ns.<origin>`` and ``ns.<origin> A 127.0.0.1``. A caller's own SOA must carry a
  serial higher than the one served before. The default TTL is 0 so that no cache (the
  daemon's resolver caches by TTL) hides a later change; pass ``ttl=`` to test caching.
* A TXT string holds at most 255 bytes (RFC 1035); ``txt(value)`` splits a longer value (a
  DKIM key) into quoted strings, which DKIM and SPF readers join again.
* Records that do not parse raise ValueError from ``set_zone``, with dnspython's or NSD's own
  message (nsd-checkzone), rather than turning into a SERVFAIL found later.
* ``break_zone(origin)`` keeps the zone configured but gives it a file NSD cannot load: NSD
  then answers SERVFAIL for every name in it, which dnspython reports as NoNameservers
  (policy/dns.py: DnsTemporary). ``set_zone`` repairs it. ``remove_zone(origin)`` unconfigures
  it: REFUSED, like any name NSD has no zone for.
* ``stop()``/``start()`` keep the port, the directory and the zones; ``set_zone`` and friends
  also work while stopped (they only write the files; ``start()`` then serves them). The port
  is chosen in ``__init__`` (or given) and fixed from the first successful ``start()``: it
  changes only if another process takes it before NSD first binds it.
* ``close()`` (or leaving the ``with``) stops NSD and removes the directory; a finalizer kills
  the process if a test run dies without that. Not thread-safe: one test drives one server.

How: ``nsd -d`` (foreground) runs as the test's own user with everything in a short mkdtemp
directory: nsd.conf, the zone files, log, pid, xfrd state and a remote-control Unix socket.
Starting takes about 60 ms. ``nsd-control reconfig`` adds and removes the zones listed in
nsd.conf, ``nsd-control reload <zone>`` re-reads one zone file. NSD reloads in a forked process
after the command has returned, so set_zone polls the zone's SOA for the new serial (or the
SERVFAIL/REFUSED), then waits until NSD's old server process has exited: until then it shares
the UDP socket with the new one and still answers some queries with the old data. A set_zone
takes 10-40 ms in all (the SOA shows up after 5-10 ms).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

import dns.exception
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import dns.zone

NSD = shutil.which("nsd") or "/usr/sbin/nsd"
NSD_CONTROL = shutil.which("nsd-control") or "/usr/sbin/nsd-control"
NSD_CHECKZONE = shutil.which("nsd-checkzone") or "/usr/sbin/nsd-checkzone"

ADDRESS = "127.0.0.1"
START_TIMEOUT = 10.0  # measured: NSD answers about 60 ms after exec
CHANGE_TIMEOUT = 5.0  # measured: a reload is served 5-10 ms after nsd-control returns
POLL_INTERVAL = 0.003

# Zone files end in ".zone" after the absolute name ("example.test.zone"); names are limited to
# what may safely become a file name.
_ORIGIN_RE = re.compile(r"^(?:[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?\.)+$")

BROKEN_ZONE = (
    "; Written by tests/dns_server.py break_zone: NSD fails to load this file and answers\n"
    "; SERVFAIL for every name in the zone.\n"
    "this is not a zone file\n"
)


def txt(value: str | bytes) -> str:
    """``value`` as the RDATA of a TXT record: quoted strings of at most 255 bytes each, with
    ``"``, ``\\`` and non-printable bytes escaped, e.g. ``"v=DKIM1; k=rsa; p=MIIB..." "...``.
    Use as ``f"sel._domainkey TXT {txt(value)}"``."""
    raw = value.encode() if isinstance(value, str) else value
    chunks = [raw[i : i + 255] for i in range(0, len(raw), 255)] or [b""]
    return " ".join(f'"{_escape(chunk)}"' for chunk in chunks)


def _escape(chunk: bytes) -> str:
    out = []
    for byte in chunk:
        if byte in b'"\\':
            out.append("\\" + chr(byte))
        elif 0x20 <= byte < 0x7F:
            out.append(chr(byte))
        else:
            out.append(f"\\{byte:03d}")  # \DDD is RFC 1035's escape for any byte
    return "".join(out)


def canonical_origin(origin: str) -> str:
    """``"Example.Test"`` -> ``"example.test."``; ValueError for the root or odd names."""
    name = dns.name.from_text(origin).to_text().lower()
    if not _ORIGIN_RE.match(name):
        raise ValueError(f"zone origin {origin!r} is not a plain host name")
    return name


def _choose_port() -> int:
    """A port free for both UDP and TCP, picked below the kernel's ephemeral range: while the
    server is stopped (tests do that), a client socket elsewhere on the machine could be given
    an ephemeral port as its source port and so block the restart on the same port. Ports from
    bind(0) are ephemeral, so they are what other tests' free_port() helpers hand out."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    low = max(low, 12000)
    rng = random.SystemRandom()  # independent of the tests' seeding of ``random``
    for _ in range(200):
        port = rng.randrange(10000, low)
        if _port_free(port):
            return port
    raise RuntimeError(f"no free port for UDP and TCP between 10000 and {low}")


def _port_free(port: int) -> bool:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((ADDRESS, port))
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as NSD binds it
                tcp.bind((ADDRESS, port))
    except OSError:
        return False
    return True


def _group(pgid: int) -> dict[int, int]:
    """Live processes of process group ``pgid`` (from /proc), as pid -> parent pid. Zombies
    are left out: they hold no sockets any more."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue  # exited meanwhile
        # The fields after the ")" that closes the command name: state, ppid, pgrp, ...
        state, ppid, pgrp = stat.rsplit(")", 1)[1].split()[:3]
        if int(pgrp) == pgid and state != "Z":
            found[int(entry)] = int(ppid)
    return found


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """Stop NSD, the first process of its own process group, and return once none of the
    group is left to hold the port: SIGTERM (NSD's processes shut each other down), SIGKILL
    for whatever is still there after 2 s."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
    started = time.monotonic()
    killed = False
    while True:
        if proc.poll() is not None and not _group(proc.pid):
            return
        if not killed and time.monotonic() - started > 2.0:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            killed = True
        if time.monotonic() - started > 10.0:
            raise RuntimeError(f"NSD (process group {proc.pid}) did not exit")
        time.sleep(0.002)


def _die_with_parent() -> None:
    """Run in the child before exec: the kernel sends NSD SIGTERM when the process that
    started it dies, even by SIGKILL (an xdist worker killed hard runs no finalizer), so no
    NSD outlives its test run. The kernel means the starting *thread*: start() belongs in the
    main thread or one that lives as long as the server."""
    pr_set_pdeathsig = 1
    ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _cleanup(state: dict[str, subprocess.Popen[bytes] | None], directory: Path) -> None:
    proc = state.get("proc")
    if proc is not None:
        _kill(proc)
    shutil.rmtree(directory, ignore_errors=True)


class DnsServer:
    """NSD serving test zones on ``address``:``port``; see the module docstring."""

    def __init__(self, port: int | None = None) -> None:
        # mkdtemp under /tmp keeps the control socket's path well inside AF_UNIX's 107 bytes
        # (pytest's tmp_path can be too long); 755 so NSD could read it even as another user.
        self.directory = Path(tempfile.mkdtemp(prefix="nsd-", dir="/tmp"))
        self.directory.chmod(0o755)
        self.address = ADDRESS
        self._port_given = port is not None
        self._started_once = False
        self.port = port if port is not None else _choose_port()
        self.conf = self.directory / "nsd.conf"
        self.logfile = self.directory / "nsd.log"
        self._stderr = self.directory / "nsd.stderr"
        self._control = self.directory / "control.sock"
        # origin -> the serial set_zone wrote, or None for a zone break_zone made unloadable.
        self._zones: dict[str, int | None] = {}
        self._serial = 0
        self._state: dict[str, subprocess.Popen[bytes] | None] = {"proc": None}
        self._finalizer = weakref.finalize(self, _cleanup, self._state, self.directory)
        self.timings: dict[str, float] = {}  # last start, set_zone and so on, in seconds
        self._write_conf()

    # --- lifecycle ----------------------------------------------------------------------

    @property
    def running(self) -> bool:
        proc = self._state["proc"]
        return proc is not None and proc.poll() is None

    @property
    def pid(self) -> int | None:
        """NSD's first process (its xfrd; main and the server processes are its children, all
        in its process group), None while stopped."""
        proc = self._state["proc"]
        return proc.pid if proc is not None and proc.poll() is None else None

    def start(self) -> None:
        """Start NSD (no-op if running) and return once it answers and serves every zone."""
        if self.running:
            return
        started = time.monotonic()
        for attempt in range(3):
            try:
                self._start_once()
                break
            except _PortTaken:
                # Another test process took the port between the check and NSD's bind. Only
                # a port we chose may change, and only before anyone was told it.
                if self._port_given or self._started_once or attempt == 2:
                    raise RuntimeError(
                        f"NSD could not bind {self.address}:{self.port}: {self.log()}"
                    ) from None
                self.port = _choose_port()
                self._write_conf()
        self._started_once = True
        for origin, serial in self._zones.items():
            self._wait_for(origin, serial)
        self.timings["start"] = time.monotonic() - started

    def _start_once(self) -> None:
        # Left behind by a killed NSD: NSD refuses to start while the pid in its pidfile
        # runs (which, reused, could be anything), and the control socket would be in the way.
        for leftover in (self.directory / "nsd.pid", self._control):
            leftover.unlink(missing_ok=True)
        with self._stderr.open("ab") as err:
            proc = subprocess.Popen(
                [NSD, "-d", "-c", str(self.conf)],
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                cwd=self.directory,
                # Its own process group: _kill can reach the forked children, and a ^C in the
                # terminal goes to pytest, whose teardown stops NSD in order.
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        self._state["proc"] = proc
        deadline = time.monotonic() + START_TIMEOUT
        probe = dns.message.make_query("probe.", "SOA")
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                self._state["proc"] = None
                if f"{self.address}@{self.port}: Address already in use" in self.log():
                    raise _PortTaken
                raise RuntimeError(f"NSD exited with {proc.returncode}: {self.log()}")
            try:
                # Any answer (REFUSED: no such zone) means the server processes are up; NSD
                # reads the zone files before it forks them, so the zones are loaded too.
                dns.query.udp(probe, self.address, port=self.port, timeout=0.05)
                return
            except (dns.exception.Timeout, OSError):
                continue
        _kill(proc)
        self._state["proc"] = None
        raise RuntimeError(f"NSD did not answer within {START_TIMEOUT} s: {self.log()}")

    def stop(self) -> None:
        """Stop NSD (no-op if stopped); the port is free again when this returns."""
        proc = self._state["proc"]
        if proc is None:
            return
        started = time.monotonic()
        _kill(proc)
        self._state["proc"] = None
        self.timings["stop"] = time.monotonic() - started

    def close(self) -> None:
        """Stop NSD and remove its directory."""
        self._finalizer()

    def __enter__(self) -> DnsServer:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def log(self) -> str:
        """NSD's log file and its stderr (the part before the log file is open)."""
        parts = []
        for path in (self._stderr, self.logfile):
            with contextlib.suppress(FileNotFoundError):
                text = path.read_text(errors="replace").strip()
                if text:
                    parts.append(f"--- {path.name}:\n{text}")
        return "\n".join(parts) or "(NSD wrote no log)"

    # --- zones ----------------------------------------------------------------------------

    @property
    def zones(self) -> list[str]:
        return sorted(self._zones)

    def zone_file(self, origin: str) -> Path:
        return self.directory / f"{canonical_origin(origin)}zone"

    def set_zone(self, origin: str, records: Iterable[str] | str = (), *, ttl: int = 0) -> int:
        """Serve ``records`` as the zone ``origin`` (replacing what it had); returns the SOA
        serial, which queries see once this returns."""
        origin = canonical_origin(origin)
        body = records if isinstance(records, str) else "\n".join(records)
        text = self._zone_text(origin, body, ttl)
        path = self.zone_file(origin)
        self._write(path.with_suffix(".check"), text)
        check = subprocess.run(
            [NSD_CHECKZONE, origin, str(path.with_suffix(".check"))],
            capture_output=True,
            text=True,
        )
        path.with_suffix(".check").unlink()
        if check.returncode != 0:
            raise ValueError(f"zone {origin} rejected by nsd-checkzone: {check.stderr.strip()}")
        started = time.monotonic()
        self._write(path, text)
        self._apply(origin, self._serial)
        self.timings["set_zone"] = time.monotonic() - started
        return self._serial

    def break_zone(self, origin: str) -> None:
        """Make every name in ``origin`` answer SERVFAIL (a temporary DNS failure): the zone
        stays configured, but its file does not parse, so NSD has no data for it. set_zone
        repairs it."""
        origin = canonical_origin(origin)
        self._write(self.zone_file(origin), BROKEN_ZONE)
        self._apply(origin, None)

    def remove_zone(self, origin: str) -> None:
        """Stop serving ``origin``: NSD answers REFUSED for its names, as for any name outside
        its zones (a resolver would call that a server failure, not NXDOMAIN). KeyError if the
        zone was never set."""
        origin = canonical_origin(origin)
        del self._zones[origin]
        self._write_conf()
        self.zone_file(origin).unlink(missing_ok=True)
        if self.running:
            self._change(origin, "refused", ["reconfig"])

    def _zone_text(self, origin: str, body: str, ttl: int) -> str:
        """The zone file: our SOA/NS/A (absolute names, explicit TTLs) unless ``body`` has
        them, then ``body`` under $ORIGIN and $TTL. dnspython parses ``body`` to find which of
        them it has, whatever its spelling (relative or absolute names, TTLs, parentheses)."""
        head = f"$ORIGIN {origin}\n$TTL {ttl}\n"
        try:
            parsed = dns.zone.from_text(head + body, origin, relativize=False, check_origin=False)
        except dns.exception.DNSException as e:
            hint = " (split long TXT values with txt())" if "too long" in str(e) else ""
            raise ValueError(f"zone {origin}: {e}{hint}") from e
        apex = dns.name.from_text(origin)
        ns_name = dns.name.from_text("ns", apex)
        own_soa = parsed.get_rdataset(apex, "SOA")
        served = self._zones.get(origin)
        if own_soa is not None:
            serial = int(own_soa[0].serial)
            if served is not None and serial <= served:
                raise ValueError(
                    f"zone {origin}: the SOA serial {serial} must be higher than the one "
                    f"served ({served}), or queries could not tell the new data from the old"
                )
            self._serial = max(self._serial, serial)
        else:
            self._serial += 1
        lines = []
        if own_soa is None:
            # refresh/retry/expire matter only to secondaries; minimum is the negative-answer
            # TTL (RFC 2308), kept equal to ``ttl`` so NXDOMAIN is not cached longer either.
            lines.append(
                f"{origin} {ttl} IN SOA ns.{origin} hostmaster.{origin} "
                f"{self._serial} 3600 600 86400 {ttl}"
            )
        if parsed.get_rdataset(apex, "NS") is None:
            lines.append(f"{origin} {ttl} IN NS ns.{origin}")
            if parsed.get_rdataset(ns_name, "A") is None:
                lines.append(f"ns.{origin} {ttl} IN A 127.0.0.1")
        return "\n".join([*lines, head + body, ""])

    def _apply(self, origin: str, serial: int | None) -> None:
        """Record the zone's new state and, if NSD runs, have it load the file and wait until
        the answers show it."""
        new = origin not in self._zones
        self._zones[origin] = serial
        if new:
            self._write_conf()
        if self.running:
            # reconfig adds a zone that is new in nsd.conf and reads its file; reload <zone>
            # re-reads the file of a known zone whatever its mtime (SIGHUP compares mtimes,
            # which two writes within a clock tick can leave unchanged).
            self._change(origin, serial, ["reconfig"] if new else ["reload", origin])

    def _change(self, origin: str, expect: int | str | None, command: list[str]) -> None:
        """Run ``command`` and return once every answer for ``origin`` is ``expect``.

        NSD reloads in a forked process that starts new server processes with the new data
        and then tells the old ones to quit. Until they have, the old and the new share the
        UDP socket, and a query may get either answer (seen in testing right after the SOA
        showed the new serial). So: first the new answer, then the old servers gone."""
        old = self._servers()
        self._control_command(*command)
        self._wait_for(origin, expect, retry=command)
        started = time.monotonic()
        while time.monotonic() - started < CHANGE_TIMEOUT:
            servers = self._servers()
            if len(servers) == 1 and not servers & old:  # server-count: 1
                return
            time.sleep(POLL_INTERVAL)
        raise RuntimeError(
            f"NSD's old server processes {sorted(old)} did not exit after {command}: "
            f"now {sorted(self._servers())}: {self.log()}"
        )

    def _servers(self) -> set[int]:
        """NSD's server processes (and a reload in progress): the members of its process
        group other than the first process (xfrd) and its child (main)."""
        proc = self._state["proc"]
        if proc is None:
            return set()
        top = proc.pid
        return {pid for pid, ppid in _group(top).items() if top not in (pid, ppid)}

    def _wait_for(
        self, origin: str, expect: int | str | None, retry: list[str] | None = None
    ) -> None:
        """Poll ``origin``'s SOA until the answer is ``expect``: a serial, "servfail" (also
        for None, a broken zone) or "refused". If that takes long, ``retry`` (the control
        command) is sent again, in case NSD dropped a reload asked for during another."""
        if expect is None:
            expect = "servfail"
        name = dns.name.from_text(origin)
        query = dns.message.make_query(name, "SOA")
        started = time.monotonic()
        last_retry = started
        seen = "nothing"
        while time.monotonic() - started < CHANGE_TIMEOUT:
            try:
                reply = dns.query.udp(query, self.address, port=self.port, timeout=0.2)
            except (dns.exception.Timeout, OSError) as e:
                seen = repr(e)
                if not self.running:
                    break
            else:
                seen = dns.rcode.to_text(reply.rcode())
                if isinstance(expect, int):
                    soa = reply.get_rrset(reply.answer, name, dns.rdataclass.IN, dns.rdatatype.SOA)
                    if soa is not None:
                        seen = f"serial {soa[0].serial}"
                        if soa[0].serial == expect:
                            return
                elif seen.lower() == expect:
                    return
            if retry and time.monotonic() - last_retry > 1.0:
                self._control_command(*retry)
                last_retry = time.monotonic()
            time.sleep(POLL_INTERVAL)
        raise RuntimeError(
            f"NSD did not serve zone {origin} as {expect} within {CHANGE_TIMEOUT} s "
            f"(last answer: {seen}): {self.log()}"
        )

    # --- files and control -----------------------------------------------------------------

    def _write(self, path: Path, text: str) -> None:
        """Write through a rename so NSD never reads half a file."""
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.chmod(0o644)
        tmp.replace(path)

    def _write_conf(self) -> None:
        d = self.directory
        conf = f"""# Written by tests/dns_server.py; everything NSD touches is in {d}.
server:
    ip-address: {self.address}@{self.port}
    port: {self.port}
    do-ip6: no
    # Stay the user who runs the tests (root or not): it can read the files it wrote, and a
    # port above 1024 on loopback needs no privilege.
    username: ""
    chroot: ""
    zonesdir: "{d}"
    database: ""
    zonelistfile: "{d}/zone.list"
    xfrdfile: "{d}/xfrd.state"
    xfrdir: "{d}"
    pidfile: "{d}/nsd.pid"
    logfile: "{d}/nsd.log"
    verbosity: 2
    hide-version: yes
    hide-identity: yes
    server-count: 1
    # Response rate limiting is on by default (200 qps per /24); polling for a change and a
    # busy test would have answers dropped or truncated.
    rrl-ratelimit: 0
    rrl-whitelist-ratelimit: 0

remote-control:
    # A Unix socket (mode set by NSD, in our 755 directory): no TLS keys to generate, no port.
    control-enable: yes
    control-interface: {self._control}
"""
        for origin in sorted(self._zones):
            conf += f'\nzone:\n    name: "{origin}"\n    zonefile: "{origin}zone"\n'
        self._write(self.conf, conf)

    def _control_command(self, *args: str) -> None:
        """nsd-control, retried briefly: right after start the control socket may lag the DNS
        sockets by a few milliseconds."""
        deadline = time.monotonic() + 2.0
        while True:
            result = subprocess.run(
                [NSD_CONTROL, "-c", str(self.conf), *args], capture_output=True, text=True
            )
            if result.returncode == 0 and "error" not in result.stdout:
                return
            if time.monotonic() > deadline or not self.running:
                raise RuntimeError(
                    f"nsd-control {' '.join(args)} failed: {result.stdout}{result.stderr}\n"
                    f"{self.log()}"
                )
            time.sleep(0.01)

    # --- clients ----------------------------------------------------------------------------

    def resolver(self, timeout: float = 1.0) -> dns.resolver.Resolver:
        """A dnspython resolver asking only this server, without a cache."""
        r = dns.resolver.Resolver(configure=False)
        r.nameservers = [self.address]
        r.port = self.port
        r.timeout = timeout
        r.lifetime = timeout
        return r


class _PortTaken(Exception):
    pass
