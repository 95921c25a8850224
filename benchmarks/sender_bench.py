"""Sender checks through the real daemon: cached sender-verify decisions against a plain relay
decision, and head-of-line blocking with 100 slow sender domains. Writes
benchmarks/report/SENDER.md and benchmarks/report/sender_results.json.

Usage: .venv/bin/python benchmarks/sender_bench.py [--quick] [--out DIR] [--repeats R]

Everything runs on loopback: NSD on a loopback port (tests/dns_server.py) serves the sender
domains, scripted aiosmtpd MX peers (tests/smtp_peers.py, in a child process of this one) on
127.x addresses answer the callouts, and four ``python -m policy serve`` daemons (callouts on,
``callout_allow_private``, ``callout_port`` = the peers' port, ``dns_servers`` = NSD) answer on
their Unix sockets:

* ``verify`` (SPF off) and ``verify+spf`` (SPF on): part 1. Their callout cache is warmed for
  100 senders, then the C load generator (benchmarks/loadgen.c, closed loop, 1 and 16 clients)
  sends MAIL requests for those senders (every answer a callout cache hit) and RCPT requests
  that are a plain relay decision (client in relay_from_hosts, remote recipient), same daemon,
  same run, interleaved, repeated; every reply must be the expected ACCEPT. The MX peers must
  see no connection while this is measured.
* ``hol-raised`` (callout_rate 1000/s, burst 200) and ``hol-default`` (the shipped etiquette
  caps: 10/s, burst 20): part 2. 100 distinct sender domains, fresh ones for every run (cold
  callout cache, cold DNS cache), each with its own MX peer that answers RCPT after 50 ms; 100
  MAIL requests sent at once (the load generator, 100 clients, one request each) and, as a
  second pattern, one every 10 ms (an open-loop client, a child process). Meanwhile a probe
  (another child process) sends a cheap request, a relay RCPT, every 2 ms and times it: that
  is the head-of-line question for an event-loop daemon. Reference: cold MAILs one at a time.

The load generators, NSD and the peers run on CPU 0, the daemons on CPU 1. Each run records
what other programs used meanwhile (machine busy time minus this process tree and kernel
threads); a run disturbed by more than 10% of a core is measured again, a bounded number of
times (a part-2 run on a spare set of fresh domains). Then the request paths are timed piece by
piece in this process, with the daemon's own classes, for the report's "where the time goes".

Internal roles (the child processes): ``--role peers``, ``--role probe``, ``--role arrivals``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import timeit
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(REPO))

# benchmarks/run.py's helpers (a script's own directory is first on sys.path).
from run import (  # noqa: E402
    Supervisor,
    ask,
    compile_c,
    cpu_accounts,
    cpu_availability,
    daemon_version,
    machine_info,
    tree_runtime_s,
    wait_ready,
)

from policy.protocol import encode_request  # noqa: E402

PRIMARY = "mail.example.org"
HELO = "client.example.net"
MX_DELAY = 0.050  # seconds each slow MX peer waits before answering RCPT
ZONE_TTL = 300  # the resolver caches answers this long (SPF is not cached by the daemon)
SENDERS = 100  # part 1: senders with a cached callout answer
CACHED_DOMAINS = 20
HOL_DOMAINS = 100  # part 2: distinct sender domains per run
ARRIVAL_WINDOW = 1.0  # part 2, second pattern: HOL_DOMAINS MAILs spread over this many seconds
PROBE_INTERVAL = 0.002
PROBE_IP = "192.0.2.200"
CONCURRENCY = (1, 16)
MAIL_OK = "ACCEPT 250 2.1.0"
RCPT_OK = "ACCEPT 250 2.1.5"
TARGET_RATIO = 0.80  # cached MAIL req/s over relay RCPT req/s
HOL_FACTOR = 2.0  # p99 of the 100 slow MAILs at most this times one cold MAIL alone
PROBE_P99_MS = 10.0  # a cheap request during the slow callouts: p99 and max
PROBE_MAX_MS = 1000 * MX_DELAY
DISTURBED = 0.10  # cores used by other programs during a run: measured again
RAISED = {"callout_rate": 1000.0, "callout_burst": 200}
DEFAULT_CAPS = {"callout_rate": 10.0, "callout_burst": 20}  # policy/settings.py's defaults
DAEMONS: dict[str, dict[str, Any]] = {
    "verify": {"spf_enabled": False, **RAISED},
    "verify+spf": {"spf_enabled": True, **RAISED},
    "hol-raised": {"spf_enabled": False, **RAISED},
    "hol-default": {"spf_enabled": False},
}
PART1 = ("verify", "verify+spf")
PART2 = ("hol-raised", "hol-default")
KINDS = {"relay RCPT": RCPT_OK, "cached MAIL": MAIL_OK}
PATTERNS = ("burst", "arrivals")


@dataclass(frozen=True)
class Profile:
    repeats: int  # part 1: each point this many times, interleaved
    run_s: float
    warmup_s: float
    hol_repeats: int  # part 2: each daemon x pattern this many times, interleaved
    singles: int  # cold MAILs one at a time per daemon and repeat (the reference)
    idle_probe_s: float
    retries: int
    quiet_budget: float  # seconds per part for waiting for quiet and measuring again


FULL = Profile(5, 1.5, 0.2, 3, 5, 0.5, 2, 60.0)
QUICK = Profile(1, 0.5, 0.1, 1, 3, 0.3, 0, 0.0)


# --- small helpers ----------------------------------------------------------------------------


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile (the rule loadgen.c uses)."""
    if not values:
        return float("nan")
    s = sorted(values)
    rank = min(len(s), max(1, int(p * len(s) + 0.999999)))
    return s[rank - 1]


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def dist(ms: list[float]) -> dict[str, float]:
    return {"n": len(ms), "min": min(ms, default=float("nan")), "p50": pct(ms, 0.5),
            "p90": pct(ms, 0.9), "p99": pct(ms, 0.99),
            "max": max(ms, default=float("nan"))}  # fmt: skip


def mail_line(sender: str, ip: str) -> bytes:
    """A MAIL request as exim/configure's acl_check_mail sends it."""
    return encode_request("MAIL", ip=ip, helo=HELO, sender=sender, auth="")


def relay_line(sender: str, ip: str, rcpt: str) -> bytes:
    """A RCPT request as acl_check_rcpt sends it: a relay_from_hosts client, a remote domain."""
    return encode_request("RCPT", ip=ip, helo=HELO, sender=sender, rcpt=rcpt, auth="")


def read_samples(path: Path) -> list[tuple[int, int, bool]]:
    """loadgen's (and the child clients') samples: start_ns latency_ns ok, one per line."""
    out = []
    for line in path.read_text().splitlines():
        t0, lat, ok = line.split()
        out.append((int(t0), int(lat), ok == "1"))
    return out


def write_samples(path: Path, samples: list[tuple[int, int, bool]]) -> None:
    path.write_text("".join(f"{t} {lat} {int(ok)}\n" for t, lat, ok in samples))


def log_durations(log: Path, offset: int) -> tuple[list[float], list[float]]:
    """The daemon's own timings in its log after byte ``offset``: (MAIL decisions, the
    probe's RCPT decisions), in ms. The daemon times a request from ``connection_made`` (its
    accept) to its answer, so client latency minus this is the wait before the accept."""
    mails: list[float] = []
    probes: list[float] = []
    with log.open("rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    for line in text.splitlines():
        _, found, ms = line.rpartition(" duration_ms=")
        if not found:
            continue
        if " stage=MAIL " in line:
            mails.append(float(ms))
        elif " stage=RCPT " in line and f" ip={PROBE_IP} " in line:
            probes.append(float(ms))
    return mails, probes


def stdin_closed() -> threading.Event:
    """Set when standard input reaches EOF: how the harness tells a child role to stop."""
    closed = threading.Event()

    def wait() -> None:
        with contextlib.suppress(OSError, ValueError):
            while sys.stdin.readline():
                pass
        closed.set()

    threading.Thread(target=wait, daemon=True).start()
    return closed


# --- child roles ------------------------------------------------------------------------------


def role_peers(slow: int, fast: int, delay: float) -> int:
    """The MX peers: ``slow`` peers answering RCPT after ``delay`` s, ``fast`` ones at once, one
    port. Prints their addresses as JSON, then answers ``stats`` lines on stdin with the
    connection counts and the most connections open at once on the slow peers (sampled every
    millisecond) since the last ``stats``; exits at EOF."""
    from tests.smtp_peers import SmtpPeers

    with SmtpPeers() as peers:
        slow_peers = [peers.add(delay=delay) for _ in range(slow)]
        fast_peers = [peers.add() for _ in range(fast)]
        top = [0]

        def sample() -> None:
            top[0] = max(top[0], sum(p.active for p in slow_peers))
            peers._loop.call_later(0.001, sample)

        peers._loop.call_soon_threadsafe(sample)
        print(json.dumps({"port": peers.port, "slow": [p.address for p in slow_peers],
                          "fast": [p.address for p in fast_peers]}), flush=True)  # fmt: skip
        for line in sys.stdin:
            if line.strip() == "stats":
                stats = {"slow_connections": sum(p.connections for p in slow_peers),
                         "fast_connections": sum(p.connections for p in fast_peers),
                         "max_inflight": top[0]}  # fmt: skip
                top[0] = 0
                print(json.dumps(stats), flush=True)
    return 0


def role_probe(sock: str, line: bytes, expect: bytes, interval: float, max_s: float,
               out: Path) -> int:  # fmt: skip
    """One cheap request every ``interval`` s (each waits for its answer; a late one is not
    made up for) until stdin closes or ``max_s`` passes; samples to ``out``."""
    stop = stdin_closed()
    samples: list[tuple[int, int, bool]] = []
    began = time.monotonic()
    nxt = began
    ready = False
    while not stop.is_set() and time.monotonic() - began < max_s:
        t0 = time.monotonic_ns()
        try:
            reply = ask(Path(sock), line, timeout=10.0)
        except OSError:
            reply = b""
        samples.append((t0, time.monotonic_ns() - t0, reply.startswith(expect)))
        if not ready:
            print("ready", flush=True)
            ready = True
        nxt = max(nxt + interval, time.monotonic())
        time.sleep(max(0.0, nxt - time.monotonic()))
    write_samples(out, samples)
    return 0


def role_arrivals(sock: str, requests: Path, window: float, expect: bytes, timeout: float,
                  out: Path) -> int:  # fmt: skip
    """Open loop: the request lines of ``requests``, the i-th sent at t0 + i * window / n, each
    on its own connection (connect, send, shut down, read to EOF), whatever the others are
    doing. Latency from the actual send; samples to ``out``, plus how late the sends were."""
    lines = [x + b"\n" for x in requests.read_bytes().splitlines() if x]

    async def one(line: bytes) -> tuple[int, int, bool]:
        loop = asyncio.get_running_loop()
        t0 = time.monotonic_ns()
        ok = False
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.setblocking(False)
            try:
                async with asyncio.timeout(timeout):
                    await loop.sock_connect(s, sock)
                    await loop.sock_sendall(s, line)
                    s.shutdown(socket.SHUT_WR)
                    reply = b""
                    while chunk := await loop.sock_recv(s, 65536):
                        reply += chunk
                ok = reply.startswith(expect) and reply.endswith(b"\n")
            except (OSError, TimeoutError):
                ok = False
        return t0, time.monotonic_ns() - t0, ok

    async def main() -> tuple[list[tuple[int, int, bool]], float]:
        step = window / len(lines)
        start = time.monotonic() + 0.01
        tasks = []
        late = 0.0
        for i, line in enumerate(lines):
            at = start + i * step
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            late = max(late, time.monotonic() - at)
            tasks.append(asyncio.create_task(one(line)))
        return list(await asyncio.gather(*tasks)), late

    samples, late = asyncio.run(main())
    write_samples(out, samples)
    print(json.dumps({"late_ms": 1000 * late}), flush=True)
    return 0


# --- the set-up -------------------------------------------------------------------------------


class Peers:
    """The peers child process (``--role peers``) on CPU 0."""

    def __init__(self, sup: Supervisor, slow: int, fast: int) -> None:
        argv = [sys.executable, str(Path(__file__).resolve()), "--role", "peers", "--slow",
                str(slow), "--fast", str(fast), "--delay", str(MX_DELAY)]  # fmt: skip
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     cwd=REPO, start_new_session=True)  # fmt: skip
        sup.procs.append(self.proc)  # stopped with the others
        assert self.proc.stdout is not None and self.proc.stdin is not None
        self._in: IO[bytes] = self.proc.stdin
        self._out: IO[bytes] = self.proc.stdout
        first = self._out.readline()
        if not first:
            raise RuntimeError("the MX peers did not start")
        info = json.loads(first)
        self.port: int = info["port"]
        self.slow: list[str] = info["slow"]
        self.fast: list[str] = info["fast"]

    def stats(self) -> dict[str, int]:
        self._in.write(b"stats\n")
        self._in.flush()
        got: dict[str, int] = json.loads(self._out.readline())
        return got


@dataclass
class Daemon:
    name: str
    proc: subprocess.Popen[bytes]
    sock: Path
    log: Path
    config: dict[str, Any]
    last_callout: float = 0.0  # monotonic time its last callouts ended (rate bucket refill)
    idle_rates: list[float] = field(default_factory=list)  # its CPU (cores) with the probe alone

    def refill_wait(self) -> float:
        """Seconds until its callout rate bucket is full again."""
        rate = float(self.config.get("callout_rate", DEFAULT_CAPS["callout_rate"]))
        burst = float(self.config.get("callout_burst", DEFAULT_CAPS["callout_burst"]))
        return max(0.0, self.last_callout + burst / rate + 0.2 - time.monotonic())


def write_config(path: Path, values: dict[str, Any]) -> None:
    def toml(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        return json.dumps(v)  # str, int, float: the same spelling in TOML

    path.write_text("".join(f"{k} = {toml(v)}\n" for k, v in values.items()))


def start_daemons(sup: Supervisor, work: Path, root: Path, peers: Peers, dns_port: int,
                  cpu: int | None) -> dict[str, Daemon]:  # fmt: skip
    common = {"primary_hostname": PRIMARY, "callout_enabled": True,
              "callout_allow_private": True, "callout_port": peers.port,
              "dns_servers": "127.0.0.1", "dns_port": dns_port, "dkim_enabled": False}  # fmt: skip
    daemons: dict[str, Daemon] = {}
    for i, (name, extra) in enumerate(DAEMONS.items()):
        config = {**common, **extra}
        cfg, sock, log = work / f"d{i}.toml", work / f"d{i}.sock", work / f"d{i}.log"
        write_config(cfg, config)
        argv = [sys.executable, "-m", "policy", "serve", "--root", str(root), "--socket",
                str(sock), "--log-file", str(log), "--config", str(cfg)]  # fmt: skip
        with (work / f"d{i}.out").open("ab") as fh:
            proc = sup.start(argv, cpu=cpu, stdout=fh, stderr=fh, cwd=REPO)
        daemons[name] = Daemon(name, proc, sock, log, config)
    for d in daemons.values():
        wait_ready(d.proc, d.sock, 60.0, d.log)
    return daemons


def zones(dns: Any, peers: Peers, hol_sets: dict[str, int]) -> None:
    """cached.test: the part-1 sender domains c0..c19 (MX on the fast peers, an SPF record
    that passes 203.0.113.0/24). hol.test: for every set S of part 2, domains dK-S with their
    own MX host mxK-S (so the DNS is as cold as the callout cache), the K-th slow peer."""
    records = []
    for k in range(CACHED_DOMAINS):
        records += [f"c{k} MX 10 mx.c{k}", f"mx.c{k} A {peers.fast[k % len(peers.fast)]}",
                    f'c{k} TXT "v=spf1 ip4:203.0.113.0/24 -all"']  # fmt: skip
    dns.set_zone("cached.test", records, ttl=ZONE_TTL)
    records = []
    for name, n in hol_sets.items():
        for k in range(n):
            records += [f"d{k}-{name} MX 10 mx{k}-{name}", f"mx{k}-{name} A {peers.slow[k]}"]
    dns.set_zone("hol.test", records, ttl=ZONE_TTL)


def cached_sender(k: int) -> str:
    return f"s{k}@c{k % CACHED_DOMAINS}.cached.test"


def hol_sender(k: int, name: str) -> str:
    return f"user{k}@d{k}-{name}.hol.test"


# --- measuring --------------------------------------------------------------------------------


@dataclass
class Bench:
    sup: Supervisor
    work: Path
    loadgen: Path
    prof: Profile
    peers: Peers
    daemons: dict[str, Daemon]
    gen_cpu: int | None
    quiet_budget: float
    files: dict[str, Path] = field(default_factory=dict)
    spares: list[str] = field(default_factory=list)  # unused part-2 domain sets

    def loadgen_run(self, sock: Path, requests: Path, expect: str, concurrency: int,
                    seconds: float, max_count: int = 10_000_000, timeout_ms: int = 3000,
                    samples: Path | None = None) -> dict[str, Any]:  # fmt: skip
        argv = [str(self.loadgen), "--socket", str(sock), "--requests", str(requests),
                "--expect", expect, "--concurrency", str(concurrency), "--max-seconds",
                f"{seconds:.3f}", "--max-count", str(max_count), "--timeout-ms",
                str(timeout_ms)]  # fmt: skip
        if samples is not None:
            argv += ["--samples", str(samples)]
        out = self.work / "loadgen.out"
        with out.open("wb") as fh:
            proc = self.sup.start(argv, cpu=self.gen_cpu, stdout=fh, stderr=subprocess.STDOUT)
            try:
                proc.wait(seconds + timeout_ms / 1000 + 30)
            finally:
                self.sup.stop(proc)
        text = out.read_text()
        if proc.returncode != 0:
            raise RuntimeError(f"loadgen failed ({proc.returncode}): {text}")
        result: dict[str, Any] = json.loads(text)
        return result

    def wait_quiet(self, at_most: float) -> None:
        t_end = time.monotonic() + min(at_most, self.quiet_budget)
        while time.monotonic() < t_end and self.quiet_budget > 0:
            t0, acc0 = time.monotonic(), cpu_accounts()
            time.sleep(0.5)
            t1, acc1 = time.monotonic(), cpu_accounts()
            self.quiet_budget -= t1 - t0
            if max(0.0, (acc1[0] - acc0[0]) - (acc1[1] - acc0[1])) / (t1 - t0) <= DISTURBED:
                return

    # --- part 1 -------------------------------------------------------------------------

    def point(self, daemon: str, kind: str, c: int, repeat: int) -> dict[str, Any]:
        d = self.daemons[daemon]
        requests, expect = self.files[kind], KINDS[kind]
        p = self.prof
        self.loadgen_run(d.sock, requests, expect, c, p.warmup_s)
        acc0, cpu0 = cpu_accounts(), tree_runtime_s(d.proc.pid)
        lg = self.loadgen_run(d.sock, requests, expect, c, p.run_s)
        cpu1, acc1 = tree_runtime_s(d.proc.pid), cpu_accounts()
        elapsed, count = float(lg["elapsed_s"]), int(lg["count"])
        other = max(0.0, (acc1[0] - acc0[0]) - (acc1[1] - acc0[1]))
        r = {"daemon": daemon, "kind": kind, "concurrency": c, "repeat": repeat,
             "count": count, "errors": int(lg["errors"]), "bad_replies": int(lg["bad_replies"]),
             "bad_reply_example": lg.get("bad_reply_example", ""), "rps": float(lg["rps"]),
             "p50_us": float(lg["p50_us"]), "p99_us": float(lg["p99_us"]),
             "max_us": float(lg["max_us"]), "elapsed_s": elapsed,
             "cpu_us_per_req": (cpu1 - cpu0) / max(1, count) * 1e6,
             "server_util": (cpu1 - cpu0) / elapsed, "gen_cpu": float(lg["cpu_fraction"]),
             "other_cpu": other / elapsed, "retries": 0}  # fmt: skip
        return r

    def point_undisturbed(self, daemon: str, kind: str, c: int, repeat: int) -> dict[str, Any]:
        best = self.point(daemon, kind, c, repeat)
        retries = 0
        while (best["other_cpu"] > DISTURBED and retries < self.prof.retries
               and self.quiet_budget > 0):  # fmt: skip
            retries += 1
            print(f"    disturbed ({best['other_cpu']:.0%} of a core by others): again",
                  flush=True)  # fmt: skip
            self.wait_quiet(10.0)
            t0 = time.monotonic()
            again = self.point(daemon, kind, c, repeat)
            self.quiet_budget -= time.monotonic() - t0
            best = again if again["other_cpu"] < best["other_cpu"] else best
        best["retries"] = retries
        return best

    # --- part 2 -------------------------------------------------------------------------

    @contextlib.contextmanager
    def probe(self, daemon: Daemon, out: Path, max_s: float) -> Iterator[None]:
        """The probe child (``--role probe``) running against ``daemon`` inside the block."""
        argv = [sys.executable, str(Path(__file__).resolve()), "--role", "probe", "--socket",
                str(daemon.sock), "--samples", str(out), "--max-seconds", str(max_s)]  # fmt: skip
        # CPU 0, as this process (inherited).
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                cwd=REPO, start_new_session=True)  # fmt: skip
        self.sup.procs.append(proc)
        try:
            assert proc.stdout is not None and proc.stdin is not None
            if proc.stdout.readline().strip() != b"ready":
                raise RuntimeError("the probe did not start")
            time.sleep(0.05)
            yield
            proc.stdin.close()
            proc.wait(max_s + 30)
        finally:
            self.sup.stop(proc)

    def single(self, d: Daemon, name: str, n: int) -> list[float]:
        """``n`` cold MAILs one after the other: one callout alone, DNS included (ms)."""
        out = []
        for k in range(n):
            line = mail_line(hol_sender(k, name), f"203.0.113.{k % 250 + 1}")
            t0 = time.perf_counter()
            reply = ask(d.sock, line, timeout=120.0).decode(errors="replace")
            out.append(1000 * (time.perf_counter() - t0))
            if not reply.startswith(MAIL_OK):
                raise RuntimeError(f"{d.name}: cold MAIL answered {reply.strip()!r}")
        d.last_callout = time.monotonic()
        return out

    def slow_run(self, d: Daemon, pattern: str, name: str, repeat: int) -> dict[str, Any]:
        """HOL_DOMAINS cold MAILs on fresh domains (set ``name``), all at once or spread over
        ARRIVAL_WINDOW, with the probe running; per-request latencies and what it cost."""
        wait = d.refill_wait()
        if wait > 0:
            time.sleep(wait)  # every run starts with a full rate bucket
        requests = self.work / f"hol-{name}.req"
        requests.write_bytes(b"".join(mail_line(hol_sender(k, name), f"203.0.113.{k % 250 + 1}")
                                      for k in range(HOL_DOMAINS)))  # fmt: skip
        samples = self.work / f"hol-{name}.samples"
        probe_out = self.work / f"probe-{name}.samples"
        before = self.peers.stats()
        offset = d.log.stat().st_size
        late_ms = 0.0
        slow = d.name == "hol-default"
        limit = 40.0 if slow else 10.0
        with self.probe(d, probe_out, limit + 20):
            acc0, cpu0 = cpu_accounts(), tree_runtime_s(d.proc.pid)
            peers0 = tree_runtime_s(self.peers.proc.pid)
            t0 = time.monotonic()
            if pattern == "burst":
                lg = self.loadgen_run(d.sock, requests, MAIL_OK, HOL_DOMAINS, 1.0,
                                      max_count=HOL_DOMAINS, timeout_ms=int(limit * 1000),
                                      samples=samples)  # fmt: skip
                if lg["count"] != HOL_DOMAINS:
                    raise RuntimeError(f"loadgen sent {lg['count']} requests, not {HOL_DOMAINS}")
            else:
                argv = [sys.executable, str(Path(__file__).resolve()), "--role", "arrivals",
                        "--socket", str(d.sock), "--requests", str(requests), "--window",
                        str(ARRIVAL_WINDOW), "--timeout", str(limit), "--samples",
                        str(samples)]  # fmt: skip
                with (self.work / "arrivals.out").open("w+b") as fh:
                    proc = self.sup.start(argv, cpu=self.gen_cpu, stdout=fh, cwd=REPO)
                    try:
                        proc.wait(limit + 30)
                    finally:
                        self.sup.stop(proc)
                    fh.seek(0)
                    late_ms = float(json.loads(fh.read().decode())["late_ms"])
            wall = time.monotonic() - t0
            cpu1, peers1 = tree_runtime_s(d.proc.pid), tree_runtime_s(self.peers.proc.pid)
            acc1 = cpu_accounts()
            time.sleep(0.02)
        d.last_callout = time.monotonic()
        after = self.peers.stats()
        time.sleep(0.3)  # the daemon writes its log every 0.2 s
        in_mail, in_probe = log_durations(d.log, offset)
        got = read_samples(samples)
        lat = [lat / 1e6 for _, lat, ok in got if ok]
        begin = min(t for t, _, _ in got)
        end = max(t + lat for t, lat, _ in got)
        probe_all = read_samples(probe_out)
        inside = [(lat / 1e6, ok) for t, lat, ok in probe_all if begin <= t and t + lat <= end]
        busy = self.callouts_in_flight(got)
        other = max(0.0, (acc1[0] - acc0[0]) - (acc1[1] - acc0[1]))
        # The probe's and the daemon's background CPU (measured with the probe alone) is not
        # the MAILs': take it out.
        background = med(d.idle_rates) * wall if d.idle_rates else 0.0
        mail_cpu = max(0.0, cpu1 - cpu0 - background)
        span = (end - begin) / 1e9
        r = {"daemon": d.name, "pattern": pattern, "repeat": repeat, "set": name,
             "requests": len(got), "failures": sum(not ok for _, _, ok in got),
             "latency_ms": sorted(round(x, 3) for x in lat), **dist(lat),
             "in_daemon": dist(in_mail), "span_ms": 1000 * span, "send_late_ms": late_ms,
             "daemon_cpu_ms": 1000 * (cpu1 - cpu0), "background_cpu_ms": 1000 * background,
             "daemon_cpu_ms_per_mail": 1000 * mail_cpu / max(1, len(got)),
             "daemon_util": mail_cpu / span if span > 0 else 0.0,
             "peers_cpu_ms": 1000 * (peers1 - peers0), "other_cpu": other / wall,
             "peer_connections": after["slow_connections"] - before["slow_connections"],
             "max_inflight": after["max_inflight"], "mails_open_at_once": busy,
             "probe": {**dist([x for x, ok in inside if ok]),
                       "failures": sum(not ok for _, ok in inside),
                       "in_daemon": dist(in_probe)}}  # fmt: skip
        return r

    @staticmethod
    def callouts_in_flight(got: list[tuple[int, int, bool]]) -> int:
        """How many of the MAILs were open at the busiest moment (from their samples)."""
        events = sorted([(t, 1) for t, _, _ in got] + [(t + lat, -1) for t, lat, _ in got])
        now = top = 0
        for _, step in events:
            now += step
            top = max(top, now)
        return top

    def idle_probe(self, d: Daemon, seconds: float, tag: str) -> dict[str, float]:
        """The probe alone for ``seconds``: its latency with nothing else going on, and the
        daemon's CPU meanwhile (the probe's share and background timers)."""
        out = self.work / f"probe-idle-{tag}.samples"
        with self.probe(d, out, seconds + 20):
            cpu0, t0 = tree_runtime_s(d.proc.pid), time.monotonic()
            time.sleep(seconds)
            rate = (tree_runtime_s(d.proc.pid) - cpu0) / (time.monotonic() - t0)
        d.idle_rates.append(rate)
        got = read_samples(out)
        return {**dist([lat / 1e6 for _, lat, ok in got if ok]),
                "failures": sum(not ok for _, _, ok in got), "daemon_cores": rate}  # fmt: skip


# --- where the time goes: in this process -----------------------------------------------------


def where_the_time_goes(root: Path, dns_port: int, peers: Peers, quick: bool) -> dict[str, Any]:
    """The request paths timed piece by piece in this process (CPU 0, nothing else running):
    the daemon's own ``Policy`` with real services against the same NSD and MX peers.

    Cached MAIL vs relay RCPT: best of 5 timeit rounds per piece (µs). Cold callouts: 100 at
    once on a uvloop loop, fresh domains (sets m0, m1), this process's CPU over them (ms per
    domain): the DNS lookups alone (MX, A, AAAA via policy.dns), then whole
    ``Callouts.verify`` calls (DNS, the SMTP conversation with a slow peer, the task)."""
    import uvloop

    from policy import dns as mpdns
    from policy import settings as settings_mod
    from policy.callout import Callouts
    from policy.checks import Context, sender_verify
    from policy.checks.relay import secondary_mx, trusted_client
    from policy.daemon import Pending, Policy
    from policy.logbook import format_decision
    from policy.mailtree import TreeLoader
    from policy.pipeline import evaluate_quick
    from policy.services import Services

    settings = settings_mod.load("/dev/null", {
        "root": str(root), "primary_hostname": PRIMARY, "callout_enabled": True,
        "callout_allow_private": True, "callout_port": peers.port, "dns_servers": "127.0.0.1",
        "dns_port": dns_port, "spf_enabled": False, "dkim_enabled": False, **RAISED})  # fmt: skip
    services = Services.create(settings)
    policy = Policy(settings, TreeLoader(settings.root, settings.hostname), services)
    sender = cached_sender(0)
    number = 2000 if quick else 20000
    out: dict[str, Any] = {"number": number}

    async def cold(n: int, which: str) -> float:
        """CPU seconds of ``n`` cold callouts (or their DNS lookups alone) at once."""
        names = [f"d{k}-{which}.hol.test" for k in range(n)]

        async def dns_only(domain: str) -> None:
            mx = await mpdns.mail_exchangers(services.resolver, domain)
            await mpdns.addresses(services.resolver, mx.hosts[0])

        c0 = time.process_time()
        if which == "m0":
            await asyncio.gather(*(dns_only(name) for name in names))
        else:
            callouts = Callouts(settings, services.resolver)
            got = await asyncio.gather(*(callouts.verify(f"user{k}@{name}")
                                         for k, name in enumerate(names)))  # fmt: skip
            if any(o.kind != "accepted" for o in got):
                raise RuntimeError(f"cold callouts: {[o.why for o in got][:3]}")
        return time.process_time() - c0

    async def on_uvloop() -> dict[str, float]:
        # The cache hit, as the daemon will meet it: one real callout first.
        first = await services.callouts.verify(sender)
        if first.kind != "accepted":
            raise RuntimeError(f"callout for {sender}: {first.why}")
        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task[None]] = set()

        async def nothing() -> None:
            return None

        t0 = time.perf_counter()
        for _ in range(number):
            task = loop.create_task(nothing())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        while tasks:
            await asyncio.sleep(0)
        task_us = (time.perf_counter() - t0) / number * 1e6
        return {
            "task": task_us,
            "dns": await cold(HOL_DOMAINS, "m0"),
            "verify": await cold(HOL_DOMAINS, "m1"),
        }

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        loop_figures = runner.run(on_uvloop())
    mail = mail_line(sender, "203.0.113.5")
    rcpt = relay_line(sender, "192.0.2.5", "rcpt0@far0.example")
    # A MAIL whose sender's callout is cached is answered at once, like the RCPT
    # (pipeline.evaluate_quick): no Pending, no task.
    mail_answer = policy.answer(mail, 0)
    assert not isinstance(mail_answer, Pending), "a cached MAIL should be answered at once"
    mail_record = mail_answer[1]
    rcpt_answer = policy.answer(rcpt, 0)
    assert not isinstance(rcpt_answer, Pending)
    rcpt_record = rcpt_answer[1]
    assert rcpt_record is not None and mail_record is not None
    ctx = Context("MAIL", "203.0.113.5", sender, "", "client.example.net", "", policy.snapshot,
                  policy.limits, services=services)  # fmt: skip

    def best(fn: Any) -> float:
        return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6

    pieces = {
        "RCPT relay: Policy.answer (parse, 3 checks, render, log record)":
            lambda: policy.answer(rcpt, 0),
        "MAIL cached: Policy.answer (parse, checks from the caches, render, log record)":
            lambda: policy.answer(mail, 0),
        "  of which pipeline.evaluate_quick (SPF off)": lambda: evaluate_quick(ctx),
        "    of which sender_verify.quick": lambda: sender_verify.quick(ctx),
        "      of which Callouts.cached": lambda: services.callouts.cached(sender),
        "      of which trusted_client + secondary_mx":
            lambda: (trusted_client(ctx), secondary_mx(ctx.ip, settings.secondary_mx_hosts)),
        "log line, MAIL (format_decision)": lambda: format_decision(mail_record, 0.0),
        "log line, RCPT (format_decision)": lambda: format_decision(rcpt_record, 0.0),
    }  # fmt: skip
    out["us"] = {name: best(fn) for name, fn in pieces.items()}
    out["us"]["uvloop: create_task + done callback + its loop pass"] = loop_figures["task"]
    out["cold_ms"] = {
        "DNS lookups (MX, A, AAAA)": 1000 * loop_figures["dns"] / HOL_DOMAINS,
        "whole Callouts.verify": 1000 * loop_figures["verify"] / HOL_DOMAINS,
    }
    services.close()
    return out


# --- the run ----------------------------------------------------------------------------------


def log_counts(daemons: dict[str, Daemon]) -> dict[str, dict[str, int]]:
    """Decisions in each daemon's log: MAIL accepts (cached callout answers among them), RCPT
    accepts, anything else."""
    out = {}
    for name, d in daemons.items():
        c = {"MAIL accept": 0, "MAIL cached": 0, "RCPT accept": 0, "other": 0}
        text = d.log.read_text(errors="replace") if d.log.exists() else ""
        for line in text.splitlines():
            if " event " in line:
                continue
            if " stage=MAIL " in line and ' verdict="ACCEPT ' in line:
                c["MAIL accept"] += 1
                c["MAIL cached"] += "(cached)" in line
            elif " stage=RCPT " in line and ' verdict="ACCEPT ' in line:
                c["RCPT accept"] += 1
            else:
                c["other"] += 1
        out[name] = c
    return out


def run(args: argparse.Namespace, prof: Profile) -> dict[str, Any]:
    from tests.conftest import copy_example
    from tests.dns_server import DnsServer

    began = time.monotonic()
    load0 = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    pin = (os.cpu_count() or 1) >= 2
    if pin:  # this process, NSD, the peers and the clients on CPU 0; the daemons on CPU 1
        os.sched_setaffinity(0, {0})
    work = Path(tempfile.mkdtemp(prefix="sb.", dir="/tmp"))
    os.chmod(work, 0o755)
    sup = Supervisor()
    results: dict[str, Any] = {"args": vars(args), "profile": dataclasses.asdict(prof)}
    try:
        loadgen, _ = compile_c(work)
        machine = machine_info()
        machine["cpu_available_start"] = cpu_availability(sup, 1.0 if args.quick else 2.0)
        root = copy_example(work / "srv-mail")
        # Fresh sender domains for every part-2 run: (repeat, daemon, pattern) plus the
        # reference singles, warm-ups and spares for runs measured again.
        hol_sets: dict[str, int] = {}
        for r in range(prof.hol_repeats):
            for i, _ in enumerate(PART2):
                hol_sets[f"s{r}x{i}"] = prof.singles
                for j, _ in enumerate(PATTERNS):
                    hol_sets[f"r{r}x{i}y{j}"] = HOL_DOMAINS
        for i, _ in enumerate(PART2):
            hol_sets[f"w{i}"] = 2
        hol_sets["m0"] = hol_sets["m1"] = HOL_DOMAINS  # where_the_time_goes
        spares = [f"z{k}" for k in range(3 * prof.retries)]  # disturbed part-2 runs, again
        hol_sets.update(dict.fromkeys(spares, HOL_DOMAINS))
        with DnsServer() as dns:
            peers = Peers(sup, HOL_DOMAINS, 4)
            zones(dns, peers, hol_sets)
            print(f"NSD on port {dns.port}, {len(peers.slow)} slow and {len(peers.fast)} fast "
                  f"MX peers on port {peers.port}", flush=True)  # fmt: skip
            daemons = start_daemons(sup, work, root, peers, dns.port, 1 if pin else None)
            print(f"daemons up after {time.monotonic() - began:.1f} s", flush=True)
            bench = Bench(sup, work, loadgen, prof, peers, daemons, 0 if pin else None,
                          prof.quiet_budget, spares=spares)  # fmt: skip
            results.update(part1(bench))
            results.update(part2(bench))
            results["micro"] = where_the_time_goes(root, dns.port, peers, args.quick)
            results["peers_total"] = peers.stats()
            results["logs"] = log_counts(daemons)
        machine["cpu_available_end"] = cpu_availability(sup, 1.0 if args.quick else 2.0)
    finally:
        sup.close()
        if not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    results.update({"machine": machine, "daemon_version": daemon_version(),
                    "load": [load0, " ".join(Path("/proc/loadavg").read_text().split()[:3])],
                    "seconds": time.monotonic() - began})  # fmt: skip
    return results


def part1(bench: Bench) -> dict[str, Any]:
    """Warm the callout caches of the verify daemons, then measure cached MAIL and relay RCPT
    on each, interleaved."""
    files = {"cached MAIL": bench.work / "cached-mail.req",
             "relay RCPT": bench.work / "relay-rcpt.req"}  # fmt: skip
    files["cached MAIL"].write_bytes(
        b"".join(mail_line(cached_sender(k), f"203.0.113.{k % 250 + 1}") for k in range(SENDERS))
    )
    files["relay RCPT"].write_bytes(b"".join(
        relay_line(cached_sender(k), f"192.0.2.{k % 250 + 1}", f"rcpt{k}@far{k % 10}.example")
        for k in range(SENDERS)))  # fmt: skip
    bench.files.update(files)
    fast0 = bench.peers.stats()["fast_connections"]
    for name in PART1:
        d = bench.daemons[name]
        # Warm: every sender once (a real callout each), then check every request kind answers.
        lg = bench.loadgen_run(d.sock, files["cached MAIL"], MAIL_OK, 16, 30.0,
                               max_count=SENDERS, timeout_ms=20000)  # fmt: skip
        if lg["errors"]:
            raise RuntimeError(f"{name}: warming the callout cache: {lg}")
        for kind, expect in KINDS.items():
            line = files[kind].read_bytes().split(b"\n", 1)[0] + b"\n"
            reply = ask(d.sock, line).decode(errors="replace")
            if not reply.startswith(expect):
                raise RuntimeError(f"{name}: {kind} answered {reply.strip()!r}")
    warm = bench.peers.stats()["fast_connections"] - fast0
    print(f"callout caches warm: {warm} callouts for {len(PART1)} x {SENDERS} senders",
          flush=True)  # fmt: skip
    points = [(d, k) for d in PART1 for k in KINDS]
    runs: dict[str, list[dict[str, Any]]] = {}
    for repeat in range(bench.prof.repeats):
        for c in CONCURRENCY:
            turn = repeat % len(points)
            for daemon, kind in points[turn:] + points[:turn]:
                r = bench.point_undisturbed(daemon, kind, c, repeat)
                runs.setdefault(f"{daemon}|{kind}|{c}", []).append(r)
                print(f"  #{repeat} {daemon:<11} {kind:<12} c={c:<2} {r['rps']:7.0f} req/s "
                      f"p50 {r['p50_us']:6.0f}us p99 {r['p99_us']:6.0f}us cpu "
                      f"{r['cpu_us_per_req']:6.1f}us/req srv {r['server_util']:4.0%} gen "
                      f"{r['gen_cpu']:4.0%} other {r['other_cpu']:4.0%} err {r['errors']}",
                      flush=True)  # fmt: skip
                if r["bad_reply_example"]:
                    print(f"    bad reply e.g. {r['bad_reply_example']!r}", flush=True)
    during = bench.peers.stats()["fast_connections"] - fast0 - warm
    return {"part1": runs, "part1_warm_callouts": warm, "part1_callouts_during": during}


def part2(bench: Bench) -> dict[str, Any]:
    """Cold MAILs on 100 slow sender domains: singles (the reference), bursts and spread
    arrivals on both cap settings, the probe alongside; interleaved over the repeats."""
    prof = bench.prof
    bench.quiet_budget = prof.quiet_budget  # part 2 has its own budget for measuring again
    for i, name in enumerate(PART2):  # the callout path's first use (HELO name, imports)
        bench.single(bench.daemons[name], f"w{i}", 2)
    singles: dict[str, list[float]] = {n: [] for n in PART2}
    idle: dict[str, list[dict[str, float]]] = {n: [] for n in PART2}
    runs: list[dict[str, Any]] = []
    combos = [(i, n, j, p) for i, n in enumerate(PART2) for j, p in enumerate(PATTERNS)]
    for repeat in range(prof.hol_repeats):
        for i, name in enumerate(PART2):
            d = bench.daemons[name]
            idle[name].append(bench.idle_probe(d, prof.idle_probe_s, f"{repeat}-{i}"))
            singles[name] += bench.single(d, f"s{repeat}x{i}", prof.singles)
            print(f"  #{repeat} {name:<11} one cold MAIL at a time: "
                  f"{', '.join(f'{x:.1f}' for x in singles[name][-prof.singles:])} ms; probe "
                  f"idle p99 {idle[name][-1]['p99']:.2f} ms", flush=True)  # fmt: skip
        turn = repeat % len(combos)
        for i, name, j, pattern in combos[turn:] + combos[:turn]:
            d = bench.daemons[name]
            r = bench.slow_run(d, pattern, f"r{repeat}x{i}y{j}", repeat)
            r["retries"] = 0
            # Disturbed by other programs: again on fresh domains (a spare set), bounded.
            while (r["other_cpu"] > DISTURBED and r["retries"] < prof.retries and bench.spares
                   and bench.quiet_budget > 0):  # fmt: skip
                print(f"    disturbed ({r['other_cpu']:.0%} of a core by others): again",
                      flush=True)  # fmt: skip
                bench.wait_quiet(10.0)
                t0 = time.monotonic()
                again = bench.slow_run(d, pattern, bench.spares.pop(), repeat)
                bench.quiet_budget -= time.monotonic() - t0
                again["retries"] = r["retries"] + 1
                if again["other_cpu"] > r["other_cpu"]:
                    again = {**r, "retries": again["retries"]}
                r = again
            runs.append(r)
            pr = r["probe"]
            print(f"  #{repeat} {name:<11} {pattern:<8} p50 {r['p50']:7.1f} p90 {r['p90']:7.1f} "
                  f"p99 {r['p99']:7.1f} max {r['max']:7.1f} ms, failed {r['failures']}, "
                  f"{r['peer_connections']} callouts, at most {r['max_inflight']} at once; "
                  f"daemon {r['daemon_cpu_ms_per_mail']:.2f} ms CPU/MAIL; probe n={pr['n']} "
                  f"p99 {pr['p99']:.2f} max {pr['max']:.2f} ms; other "
                  f"{r['other_cpu']:.0%}", flush=True)  # fmt: skip
    return {"part2": runs, "singles_ms": singles, "idle_probe": idle}


# --- the report -------------------------------------------------------------------------------


def avail(shares: dict[str, float]) -> str:
    return ", ".join(f"{cpu} {share:.0%}" for cpu, share in shares.items())


def verdict(ok: bool, valid: bool) -> str:
    return "**met**" if ok and valid else "**NOT met**"


@dataclass
class Figures:
    """What the targets and the explanations are read from (medians over the repeats)."""

    res: dict[str, Any]

    @property
    def p1(self) -> dict[str, list[dict[str, Any]]]:
        runs: dict[str, list[dict[str, Any]]] = self.res["part1"]
        return runs

    def col(self, daemon: str, kind: str, c: int, name: str) -> float:
        return med([r[name] for r in self.p1[f"{daemon}|{kind}|{c}"]])

    def ratio(self, daemon: str, c: int) -> float:
        return self.col(daemon, "cached MAIL", c, "rps") / self.col(daemon, "relay RCPT", c, "rps")

    def paired(self, daemon: str, c: int) -> list[float]:
        a, b = self.p1[f"{daemon}|cached MAIL|{c}"], self.p1[f"{daemon}|relay RCPT|{c}"]
        return [x["rps"] / y["rps"] for x, y in zip(a, b, strict=True)]

    def runs(self, daemon: str, pattern: str) -> list[dict[str, Any]]:
        return [r for r in self.res["part2"] if r["daemon"] == daemon and r["pattern"] == pattern]

    def hol(self, daemon: str, pattern: str, name: str) -> float:
        return med([r[name] for r in self.runs(daemon, pattern)])

    def probe(self, daemon: str, pattern: str, name: str) -> float:
        return med([r["probe"][name] for r in self.runs(daemon, pattern)])

    def probe_max(self, daemon: str, pattern: str) -> float:
        return max(float(r["probe"]["max"]) for r in self.runs(daemon, pattern))

    def single(self, daemon: str) -> float:
        return med(self.res["singles_ms"][daemon])


def report(out: Path, args: argparse.Namespace, prof: Profile, res: dict[str, Any]) -> str:
    f = Figures(res)
    p1, p2, m = f.p1, res["part2"], res["machine"]
    p1_failed = sum(r["errors"] for rs in p1.values() for r in rs)
    p2_failed = sum(r["failures"] for r in p2)
    probe_failed = sum(r["probe"]["failures"] for r in p2) + sum(
        x["failures"] for xs in res["idle_probe"].values() for x in xs)  # fmt: skip
    requests = sum(r["count"] for rs in p1.values() for r in rs) + sum(r["requests"] for r in p2)
    valid = (p1_failed == 0 and p2_failed == 0 and probe_failed == 0
             and res["part1_callouts_during"] == 0)  # fmt: skip
    status = (f"Every one of the {requests} measured requests got the expected reply (0 failed), "
              "and so did every probe." if valid else
              f"**INVALID RUN: {p1_failed} part-1 and {p2_failed} part-2 requests, "
              f"{probe_failed} probe requests failed; {res['part1_callouts_during']} callouts "
              "were made while cached decisions were measured.**")  # fmt: skip
    quick = "`--quick` " if args.quick else ""
    ratios = {c: f.ratio("verify", c) for c in CONCURRENCY}
    ratio_ok = all(x >= TARGET_RATIO for x in ratios.values())
    alone = f.single("hol-raised")
    limit = HOL_FACTOR * alone
    rate, burst = DEFAULT_CAPS["callout_rate"], DEFAULT_CAPS["callout_burst"]
    last_start = (HOL_DOMAINS - burst) / rate  # the token bucket: when the last callout starts
    spf_ratio = ", ".join(f"c={c}: {f.ratio('verify+spf', c):.2f}" for c in CONCURRENCY)
    what = {"burst": f"all {HOL_DOMAINS} at once",
            "arrivals": f"{HOL_DOMAINS} over {ARRIVAL_WINDOW:g} s"}  # fmt: skip

    rows = [f"| cached sender-verify MAIL within 20% of a plain relay RCPT (req/s ratio >= "
            f"{TARGET_RATIO:.2f}), 1 and {CONCURRENCY[-1]} clients, SPF off | "
            f"{'; '.join(f'c={c}: {x:.2f}' for c, x in ratios.items())} | "
            f"{verdict(ratio_ok, valid)} |"]  # fmt: skip
    for pattern in PATTERNS:
        p99 = f.hol("hol-raised", pattern, "p99")
        rows.append(f"| no head-of-line blocking, 100 cold MAILs ({what[pattern]}) to 100 domains "
                    f"whose MX answers after {1000 * MX_DELAY:.0f} ms, caps raised: p99 <= "
                    f"{HOL_FACTOR:g} x one cold MAIL alone ({alone:.1f} ms, so {limit:.0f} ms) | "
                    f"p99 {p99:.1f} ms ({p99 / alone:.1f} x), max "
                    f"{f.hol('hol-raised', pattern, 'max'):.1f} ms | "
                    f"{verdict(p99 <= limit, valid)} |")  # fmt: skip
    for pattern in PATTERNS:
        p99 = max(f.probe(d, pattern, "p99") for d in PART2)
        mx = max(f.probe_max(d, pattern) for d in PART2)
        ok = p99 <= PROBE_P99_MS and mx < PROBE_MAX_MS
        rows.append(f"| a cheap request (relay RCPT) while those callouts run ({what[pattern]}, "
                    f"both cap settings): p99 <= {PROBE_P99_MS:g} ms, max < "
                    f"{PROBE_MAX_MS:.0f} ms | p99 {p99:.2f} ms, max {mx:.1f} ms | "
                    f"{verdict(ok, valid)} |")  # fmt: skip
    rows.append(f"| shipped etiquette caps ({rate:g} callouts/s, burst {burst:g}): no target, the "
                f"queueing they impose | p99 {f.hol('hol-default', 'burst', 'p99'):.0f} ms (at "
                f"once), {f.hol('hol-default', 'arrivals', 'p99'):.0f} ms (spread); the token "
                f"bucket starts the 100th callout {1000 * last_start:.0f} ms after the first | "
                "as designed |")  # fmt: skip
    rows.append(
        f"| MAIL with SPF on and a cached callout, vs relay RCPT: no target (SPF is "
        f"evaluated for every MAIL) | req/s ratio {spf_ratio} | measured |"
    )
    head = textwrap.fill(" ".join(f"""Generated {time.strftime("%Y-%m-%d %H:%M:%S UTC",
        time.gmtime())} by `benchmarks/sender_bench.py` {quick}on {m["nproc"]} CPUs
        ({m["cpu_model"]}), Linux {m["kernel"]}, Python {m["python"]}; daemon
        {res["daemon_version"]}. Load average at the start {res["load"][0]}, at the end
        {res["load"][1]}; share of each CPU a busy loop got (how much of its cores the VM is
        given): {avail(m["cpu_available_start"])} at the start,
        {avail(m["cpu_available_end"])} at the end. The whole run took
        {res["seconds"]:.0f} s.""".split()), 96, break_on_hyphens=False)  # fmt: skip
    lines = [f"""# Sender checks: cached sender-verify decisions, head-of-line blocking

{head}

{status}

## Targets

| target | measured | verdict |
|---|---|---|
""" + "\n".join(rows) + """

Why these criteria:

""" + "\n".join(bullet(x) for x in (
        """**Within 20%**: the issue's wording, read as cached-MAIL req/s over relay-RCPT req/s
        on the same daemon in the same run (closed loop); the daemon's CPU per request is given
        too.""",
        f"""**p99 <= {HOL_FACTOR:g} x one cold MAIL alone**: one cold MAIL alone is the MX's
        {1000 * MX_DELAY:.0f} ms plus the DNS lookups (MX, A, AAAA) and the SMTP round trips,
        measured in the same run on the same daemon ("DNS time" included, as the issue
        allows). If callouts queued behind one another, some MAIL would wait for at least one
        whole other callout, i.e. take at least twice that; fully serialised, the 100th would
        take 100 times that.""",
        f"""**The probe**: a relay RCPT is answered inline on the event loop, in well under a
        millisecond when idle. Waiting {PROBE_MAX_MS:.0f} ms or more means it waited as long
        as an MX takes to answer; a p99 of {PROBE_P99_MS:g} ms leaves room for the CPU that 100
        callouts take on the same core.""")) + "\n"]  # fmt: skip
    lines.append(why(f))
    lines.append(part1_tables(f, prof))
    lines.append(part2_tables(f, prof))
    lines.append(micro_table(res["micro"]))
    logs = "; ".join(f"{n}: " + ", ".join(f"{v} {k}" for k, v in c.items())
                     for n, c in res["logs"].items())  # fmt: skip
    disturbed = sum(1 for rs in p1.values() for r in rs if r["other_cpu"] > DISTURBED)
    retried = sum(1 for rs in p1.values() for r in rs if r["retries"])
    p2_disturbed = sum(1 for r in p2 if r["other_cpu"] > DISTURBED)
    p2_retried = sum(1 for r in p2 if r.get("retries"))
    lines.append(f"""## Checks

- Failed requests: part 1 {p1_failed}, part 2 {p2_failed}, probes {probe_failed}{
        "" if valid else " (**the run is invalid**)"}.
- Callouts made while part 1 measured cached decisions: {res["part1_callouts_during"]} (must be
  0: every measured MAIL was a cache hit); callouts made to warm the caches:
  {res["part1_warm_callouts"]} ({len(PART1)} daemons x {SENDERS} senders).
- Every part-2 run made exactly one callout per MAIL (connections the slow MX peers
  counted): {"yes" if all(r["peer_connections"] == r["requests"] for r in p2) else "**NO**"}.
- Decisions in the daemons' logs (warm-ups included; "other" is anything but an accept):
  {logs}.
- Noise: runs during which other programs used more than {DISTURBED:.0%} of a core are
  measured again (at most {prof.retries} more times, within {prof.quiet_budget:.0f} s per part;
  a part-2 run again on a spare set of fresh domains), keeping the least disturbed attempt.
  Part 1: {retried} of {sum(len(rs) for rs in p1.values())} runs measured again, {disturbed}
  stayed above {DISTURBED:.0%}; part 2: {p2_retried} of {len(p2)} measured again,
  {p2_disturbed} stayed above (see "other" in the tables).

## Method

- Daemons: `python -m policy serve` on a copy of examples/srv-mail (relay_from_hosts has
  192.0.2.0/24), `callout_enabled`, `callout_allow_private`, `callout_port` = the peers' port,
  `dns_servers = "127.0.0.1"`, `dns_port` = NSD's, `dkim_enabled = false`, everything else at
  its default except: `verify` (SPF off) and `verify+spf` (SPF on), both with `callout_rate =
  1000`, `callout_burst = 200` (only so that warming their caches is quick: a cached answer is
  returned before any cap is consulted, policy/callout.py `verify`); `hol-raised` (SPF off,
  the same raised caps); `hol-default` (SPF off, the shipped caps: 10/s, burst 20, 2 per
  domain).
- DNS: NSD (tests/dns_server.py) on a loopback port; every record has a TTL of {ZONE_TTL} s, so
  the daemon's resolvers (dnspython, a cache that honours TTLs) ask NSD once per name. The
  part-1 domains publish `v=spf1 ip4:203.0.113.0/24 -all`, so SPF passes for the MAIL clients:
  with SPF on, every MAIL runs pyspf in the daemon's thread pool, its lookups answered from
  the resolver's cache.
- MX peers: tests/smtp_peers.py (aiosmtpd) in a child process on CPU 0: {HOL_DOMAINS} slow peers
  (RCPT answered after {1000 * MX_DELAY:.0f} ms) and 4 fast ones, each on its own 127.x
  address, one port. Part 2 gives every sender domain its own slow peer and its own MX host
  name.
- Pinning: this process, NSD, the peers and the clients on CPU 0; the daemons on CPU 1.
- Order: part 1 interleaves (daemon x request kind) for each concurrency, rotated per repeat,
  after a {prof.warmup_s} s warm-up per run. Part 2, per repeat: the idle probe and
  {prof.singles} single cold MAILs on each daemon, then the four (daemon x pattern) runs,
  rotated per repeat; before a run, a daemon's rate bucket is left to refill (burst / rate
  seconds after its last callout), so every run starts with a full bucket.
- Part-2 clients: "at once" is the C load generator (`--concurrency {HOL_DOMAINS} --max-count
  {HOL_DOMAINS}`: all connections made within about a millisecond); "spread" an open-loop
  asyncio child process; the probe a blocking, paced child process. Latencies are
  CLOCK_MONOTONIC from connect to the reply's EOF. "in the daemon" is the daemon's own
  `duration_ms` in its log: from its accept (`connection_made`) to its answer.
- CPU: the daemons' from schedstat (all threads); in part 2 the daemon's CPU with the probe
  alone (per second, measured before each repeat) is subtracted, so "CPU per MAIL" is the
  MAILs' own. Other programs: machine busy time (/proc/stat) minus this process tree and
  kernel threads.
""")  # fmt: skip
    text = "\n".join(lines)
    (out / "SENDER.md").write_text(text)
    return text


def bullet(text: str) -> str:
    """One Markdown list item, re-wrapped at 96 columns (the figures make ragged lines)."""
    return textwrap.fill(" ".join(text.split()), 96, initial_indent="- ",
                         subsequent_indent="  ", break_on_hyphens=False)  # fmt: skip


def why(f: Figures) -> str:
    """Where the time goes: the explanations, computed from this run's figures."""
    res = f.res
    micro = res["micro"]
    us: dict[str, float] = micro["us"]
    top = CONCURRENCY[-1]
    rcpt_cpu = f.col("verify", "relay RCPT", top, "cpu_us_per_req")
    mail_cpu = f.col("verify", "cached MAIL", top, "cpu_us_per_req")
    spf_cpu = f.col("verify+spf", "cached MAIL", top, "cpu_us_per_req")
    rcpt_path = us["RCPT relay: Policy.answer (parse, 3 checks, render, log record)"]
    mail_path = us["MAIL cached: Policy.answer (parse, checks from the caches, render, log record)"]
    quick = us["  of which pipeline.evaluate_quick (SPF off)"]
    task = us["uvloop: create_task + done callback + its loop pass"]
    burst = f.runs("hol-raised", "burst")
    cpu_mail = med([r["daemon_cpu_ms_per_mail"] for r in burst])
    util = med([r["daemon_util"] for r in burst])
    inflight = med([r["max_inflight"] for r in burst])
    alone = f.single("hol-raised")
    p99 = f.hol("hol-raised", "burst", "p99")
    budget = (HOL_FACTOR * alone - alone) / (HOL_DOMAINS - 1)
    in_p99 = med([r["in_daemon"]["p99"] for r in burst])
    probe_client = f.probe_max("hol-raised", "burst")
    probe_in = max(r["probe"]["in_daemon"]["max"] for r in burst)
    cold = micro["cold_ms"]
    dns_ms = cold["DNS lookups (MX, A, AAAA)"]
    verify_ms = cold["whole Callouts.verify"]
    rate, burst_cap = DEFAULT_CAPS["callout_rate"], DEFAULT_CAPS["callout_burst"]
    items = [
        f"""**Cached MAIL against relay RCPT.** At {top} clients the daemon spends
        {mail_cpu:.1f} µs of CPU on a cached MAIL and {rcpt_cpu:.1f} µs on a relay RCPT
        ({mail_cpu - rcpt_cpu:+.1f} µs; req/s ratios
        {", ".join(f"c={c} {f.ratio('verify', c):.2f}" for c in CONCURRENCY)}). Both pay the
        same transport (accept, read, write, close), the larger part of either, and both are
        answered inline in the protocol callback: a MAIL whose checks can all answer without
        waiting (a cached callout, SPF off) goes through `pipeline.evaluate_quick`, not a task.
        Timed piece by piece in this process (table "Request paths, piece by piece"): the RCPT
        decision is {rcpt_path:.1f} µs, the cached MAIL's {mail_path:.1f} µs
        ({mail_path - rcpt_path:+.1f} µs), of which the checks from the caches
        {quick:.1f} (`sender_verify.quick`
        {us["    of which sender_verify.quick"]:.1f}, the cache lookup
        {us["      of which Callouts.cached"]:.1f}); the log line costs about the same for both
        ({us["log line, MAIL (format_decision)"]:.1f} and
        {us["log line, RCPT (format_decision)"]:.1f}). A MAIL that must wait (a callout to
        make, SPF on) also pays an asyncio task and its pass of the event loop ({task:.1f} µs
        here, `Daemon.start_pending`). With SPF on, pyspf runs in the thread pool for every
        MAIL: {spf_cpu:.0f} µs per MAIL at {top} clients.""",
        f"""**100 cold MAILs at once, caps raised.** A cold MAIL costs the daemon
        {cpu_mail:.2f} ms of CPU (this run's median, the probe's share subtracted); in this
        process the DNS lookups alone (MX, A and AAAA through dnspython, 100 at once) took
        {dns_ms:.2f} ms of CPU per domain, and a whole cold `Callouts.verify` (DNS, the SMTP
        conversation through aiosmtplib, the tasks) {verify_ms:.2f} ms. {HOL_DOMAINS} cold
        MAILs are therefore {HOL_DOMAINS * cpu_mail:.0f} ms of work for the daemon's one core;
        during the burst it ran at {util:.0%} of that core with up to {inflight:.0f} callouts
        open at once (the peers' count): the callouts overlap, nothing waits for another's MX.
        p99 ({p99:.0f} ms) is about one cold MAIL alone ({alone:.0f} ms) plus the CPU of the
        other {HOL_DOMAINS - 1} (together {alone + (HOL_DOMAINS - 1) * cpu_mail:.0f} ms). To
        stay within {HOL_FACTOR:g} x alone with {HOL_DOMAINS} at once on one core, a cold
        MAIL could cost at most about {budget:.2f} ms of CPU, {cpu_mail / budget:.1f} times
        less than now. Spread over {ARRIVAL_WINDOW:g} s, the same {HOL_DOMAINS} MAILs need
        {HOL_DOMAINS * cpu_mail / (1000 * ARRIVAL_WINDOW):.0%} of the core and p99 is
        {f.hol("hol-raised", "arrivals", "p99"):.1f} ms.""",
        f"""**The accept queue.** Timed by the daemon itself (from its accept to its answer),
        the burst's MAILs took p99 {in_p99:.0f} ms against {p99:.0f} ms seen by the client,
        and the probe's RCPTs at most {probe_in:.2f} ms against {probe_client:.0f} ms: the
        rest is time in the listen queue, before the daemon accepted the connection. The daemon
        runs on uvloop, whose libuv accepts one connection per event-loop iteration (libuv PR
        #3696, "unix: don't accept() connections in a loop", 2022; one `accept4` per
        `epoll_pwait` under strace), and while 100 callouts are in flight each iteration
        carries their ready work (DNS answers to parse, SMTP replies, new tasks). A connection
        that arrives behind the burst waits one iteration per connection ahead of it, so the
        cheap RCPT waits about as long as the burst's last MAIL does to be accepted. That is
        head-of-line blocking, in the accept queue; it is what misses the probe target during
        the burst. With arrivals spread out the queue stays short and the probe is not held
        up.""",
        f"""**Shipped caps.** `callout_rate` = {rate:g}/s with `callout_burst` = {burst_cap:g}
        lets {burst_cap:g} callouts start at once and then one every {1000 / rate:.0f} ms: the
        {HOL_DOMAINS}th starts {1000 * (HOL_DOMAINS - burst_cap) / rate:.0f} ms after the first
        (measured: p99 {f.hol("hol-default", "burst", "p99"):.0f} ms, max
        {f.hol("hol-default", "burst", "max"):.0f} ms, at most
        {f.hol("hol-default", "burst", "max_inflight"):.0f} callouts open at once). That is
        the etiquette toward other people's mail servers (docs/sender-checks.md), not
        head-of-line blocking: the event loop keeps answering (the probe rows; the long probe
        in the burst is the same accept-queue wait at its start), and a sender whose answer is
        cached is not held up at all. `callout_domain_concurrency` (2) does not come into it:
        every sender has its own domain.""",
    ]  # fmt: skip
    return "## Where the time goes\n\n" + "\n".join(bullet(x) for x in items) + "\n"


def part1_tables(f: Figures, prof: Profile) -> str:
    res = f.res
    lines = [f"""## Part 1: cached sender-verify MAIL vs relay RCPT

Median over {prof.repeats} interleaved repeat(s) of closed-loop runs of {prof.run_s} s, the C
load generator (benchmarks/loadgen.c: per request connect, one line, shutdown, read to EOF)
on CPU 0, the daemon on CPU 1. {SENDERS} senders on {CACHED_DOMAINS} domains, each verified once
before (a real callout), so every measured MAIL is answered from the callout cache: the MX
peers saw {res["part1_callouts_during"]} connections meanwhile. MAIL: `MAIL ip=203.0.113.x
helo=<b64> sender=<b64> auth=` (an outside client: SPF and the callout apply). RCPT: `RCPT
ip=192.0.2.x helo=<b64> sender=<b64> rcpt=<b64 rcptN@farN.example> auth=` (a relay_from_hosts
client, a remote recipient: a plain relay decision). "CPU" is the daemon's CPU per request,
"srv" its CPU over wall time, "gen" the load generator's, "other" what other programs used
meanwhile, in cores.
"""]  # fmt: skip
    for daemon in PART1:
        spf = "on" if daemon == "verify+spf" else "off"
        lines += [
            f"### `{daemon}` (SPF {spf})\n",
            "| request | clients | req/s | runs | p50 µs | p99 µs | CPU µs/req | srv | gen "
            "| other | errors |",
            "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for c in CONCURRENCY:
            for kind in KINDS:
                rs = f.p1[f"{daemon}|{kind}|{c}"]
                each = ", ".join(f"{r['rps']:.0f}" for r in rs)

                def col(name: str, daemon: str = daemon, kind: str = kind, c: int = c) -> float:
                    return f.col(daemon, kind, c, name)

                lines.append(
                    f"| {kind} | {c} | {col('rps'):.0f} | {each} | {col('p50_us'):.0f} "
                    f"| {col('p99_us'):.0f} | {col('cpu_us_per_req'):.1f} | "
                    f"{col('server_util'):.0%} | {col('gen_cpu'):.0%} | "
                    f"{col('other_cpu'):.2f} | {sum(r['errors'] for r in rs)} |"
                )
        lines += ["", "| clients | req/s ratio MAIL / RCPT | per repeat | CPU per request, MAIL / "
                  "RCPT | p50, MAIL − RCPT |", "|---:|---:|---|---:|---:|"]  # fmt: skip
        for c in CONCURRENCY:
            cpu = (f.col(daemon, "cached MAIL", c, "cpu_us_per_req")
                   / f.col(daemon, "relay RCPT", c, "cpu_us_per_req"))  # fmt: skip
            p50 = f.col(daemon, "cached MAIL", c, "p50_us") - f.col(daemon, "relay RCPT", c,
                                                                   "p50_us")  # fmt: skip
            lines.append(f"| {c} | {f.ratio(daemon, c):.2f} | "
                         f"{', '.join(f'{x:.2f}' for x in f.paired(daemon, c))} | {cpu:.2f} | "
                         f"{p50:+.0f} µs |")  # fmt: skip
        lines.append("")
    return "\n".join(lines)


def part2_tables(f: Figures, prof: Profile) -> str:
    res = f.res
    lines = [f"""## Part 2: 100 slow sender domains, cold

Each run: {HOL_DOMAINS} MAIL requests from {HOL_DOMAINS} distinct sender domains never asked about
before (fresh names every run: the callout cache and the resolver's cache are cold), each with
its own MX host name and its own MX peer on a 127.x address that answers RCPT after
{1000 * MX_DELAY:.0f} ms. **burst**: all {HOL_DOMAINS} at once (the load generator, {HOL_DOMAINS}
clients, one request each). **arrivals**: one every {1000 * ARRIVAL_WINDOW / HOL_DOMAINS:.0f} ms
(open loop: each sent on time whatever the others are doing). Latency per MAIL from connect to
the reply, ms; medians over {prof.hol_repeats} repeat(s) of each run's figure. "alone": a cold
MAIL with nothing else going on ({prof.singles} per repeat, one at a time). "in the daemon": the
same MAILs timed by the daemon from its accept. "CPU per MAIL": the daemon's, the probe's
share subtracted; "at once": the most connections open at once on the slow MX peers.

| daemon | caps | alone | pattern | p50 | p90 | p99 | max | p99 / alone | in the daemon: \
p50, p99 | at once | CPU per MAIL | failed |
|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"""]  # fmt: skip
    for name in PART2:
        caps = "1000/s, burst 200" if name == "hol-raised" else "10/s, burst 20 (shipped)"
        for pattern in PATTERNS:
            rs = f.runs(name, pattern)

            def h(col: str, name: str = name, pattern: str = pattern) -> float:
                return f.hol(name, pattern, col)

            inside = (f"{med([r['in_daemon']['p50'] for r in rs]):.1f}, "
                      f"{med([r['in_daemon']['p99'] for r in rs]):.1f}")  # fmt: skip
            lines.append(f"| {name} | {caps} | {f.single(name):.1f} | {pattern} | "
                         f"{h('p50'):.1f} | {h('p90'):.1f} | {h('p99'):.1f} | {h('max'):.1f} | "
                         f"{h('p99') / f.single(name):.1f} | {inside} | {h('max_inflight'):.0f} "
                         f"| {h('daemon_cpu_ms_per_mail'):.2f} ms | "
                         f"{sum(r['failures'] for r in rs)} |")  # fmt: skip
    lines.append("""
Every run ("span": first send to last reply; "util": the MAILs' CPU over the span, in cores
of the daemon's one; "peers CPU": the MX peers' process, on the other core; "other": other
programs, in cores):

| daemon | pattern | # | p50 | p90 | p99 | max | span ms | callouts | at once | util | \
peers CPU ms | other | failed |
|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|""")  # fmt: skip
    for r in res["part2"]:
        lines.append(f"| {r['daemon']} | {r['pattern']} | {r['repeat']} | {r['p50']:.1f} | "
                     f"{r['p90']:.1f} | {r['p99']:.1f} | {r['max']:.1f} | {r['span_ms']:.0f} | "
                     f"{r['peer_connections']} | {r['max_inflight']} | {r['daemon_util']:.0%} | "
                     f"{r['peers_cpu_ms']:.0f} | {r['other_cpu']:.2f} | "
                     f"{r['failures']} |")  # fmt: skip
    singles = "; ".join(f"{n}: {', '.join(f'{x:.1f}' for x in res['singles_ms'][n])}"
                        for n in PART2)  # fmt: skip
    lines.append(f"""
One cold MAIL alone, every measurement (ms): {singles}.

### The probe: a relay RCPT every {1000 * PROBE_INTERVAL:.0f} ms

A child process sends `RCPT ip={PROBE_IP} ... rcpt=<remote>` (answered inline, no network)
every {1000 * PROBE_INTERVAL:.0f} ms, each after the previous one's answer, and times it from
connect to EOF; only probes sent and answered between the first MAIL's send and the last
MAIL's reply count. "idle": the same probe with nothing else going on. Medians over the
repeats, max over all; "in the daemon, max": the longest the daemon itself took (its log, from
its accept to its answer) for any probe while the run's probe process ran, which is a little
longer than the window.

| daemon | pattern | probes | p50 ms | p90 ms | p99 ms | max ms | in the daemon, max ms | \
failed |
|---|---|---:|---:|---:|---:|---:|---:|---:|""")  # fmt: skip
    for name in PART2:
        ids = res["idle_probe"][name]
        lines.append(f"| {name} | idle | {med([x['n'] for x in ids]):.0f} | "
                     f"{med([x['p50'] for x in ids]):.2f} | {med([x['p90'] for x in ids]):.2f} | "
                     f"{med([x['p99'] for x in ids]):.2f} | {max(x['max'] for x in ids):.2f} | | "
                     f"{sum(x['failures'] for x in ids)} |")  # fmt: skip
        for pattern in PATTERNS:
            ps = [r["probe"] for r in f.runs(name, pattern)]
            lines.append(f"| {name} | {pattern} | {med([x['n'] for x in ps]):.0f} | "
                         f"{med([x['p50'] for x in ps]):.2f} | {med([x['p90'] for x in ps]):.2f} "
                         f"| {med([x['p99'] for x in ps]):.2f} | {max(x['max'] for x in ps):.2f} "
                         f"| {max(x['in_daemon']['max'] for x in ps):.2f} | "
                         f"{sum(x['failures'] for x in ps)} |")  # fmt: skip
    lines.append("")
    return "\n".join(lines)


def micro_table(micro: dict[str, Any]) -> str:
    lines = [f"""## Request paths, piece by piece

Timed in this process on CPU 0 with the daemon's own classes (`policy.daemon.Policy` with real
`Services`: the same NSD and MX peers), best of 5 rounds of {micro["number"]} calls, µs per
call. A cache-hit MAIL finishes without waiting, so its coroutine is driven here without an
event loop; the task line is uvloop's cost of the task the daemon makes for every MAIL.

| piece | µs |
|---|---:|"""]  # fmt: skip
    for name, value in micro["us"].items():
        shown = name.replace("  ", "&nbsp;&nbsp;")
        lines.append(f"| {shown} | {value:.2f} |")
    lines.append(f"""
Cold callouts, 100 at once on a uvloop loop in this process (fresh domains, the slow MX peers),
CPU per domain: {"; ".join(f"{k} {v:.2f} ms" for k, v in micro["cold_ms"].items())}.
""")  # fmt: skip
    return "\n".join(lines)


# --- main -------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of under a minute")
    parser.add_argument("--out", default=str(BENCH_DIR / "report"))
    parser.add_argument("--repeats", type=int, help="part-1 repeats (part 2: hol-repeats)")
    parser.add_argument("--hol-repeats", type=int, help="part-2 repeats")
    parser.add_argument("--keep-work", action="store_true", help="keep the temp directory")
    # Internal: the child roles.
    parser.add_argument("--role", choices=("peers", "probe", "arrivals"), help=argparse.SUPPRESS)
    parser.add_argument("--slow", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--fast", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--delay", type=float, default=MX_DELAY, help=argparse.SUPPRESS)
    parser.add_argument("--socket", help=argparse.SUPPRESS)
    parser.add_argument("--samples", help=argparse.SUPPRESS)
    parser.add_argument("--requests", help=argparse.SUPPRESS)
    parser.add_argument("--window", type=float, default=ARRIVAL_WINDOW, help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=float, default=30.0, help=argparse.SUPPRESS)
    parser.add_argument("--max-seconds", type=float, default=60.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "peers":
        return role_peers(args.slow, args.fast, args.delay)
    if args.role == "probe":
        line = relay_line("probe@c0.cached.test", PROBE_IP, "probe@far.example")
        return role_probe(args.socket, line, RCPT_OK.encode(), PROBE_INTERVAL,
                          args.max_seconds, Path(args.samples))  # fmt: skip
    if args.role == "arrivals":
        return role_arrivals(args.socket, Path(args.requests), args.window, MAIL_OK.encode(),
                             args.timeout, Path(args.samples))  # fmt: skip
    prof = QUICK if args.quick else FULL
    prof = dataclasses.replace(prof, repeats=args.repeats or prof.repeats,
                               hol_repeats=args.hol_repeats or prof.hol_repeats)  # fmt: skip
    res = run(args, prof)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report(out, args, prof, res)
    (out / "sender_results.json").write_text(json.dumps(res, indent=1, default=str))
    failed = (sum(r["errors"] for rs in res["part1"].values() for r in rs)
              + sum(r["failures"] for r in res["part2"])
              + sum(r["probe"]["failures"] for r in res["part2"]))  # fmt: skip
    print(f"done in {res['seconds']:.0f} s, {failed} failed requests; report in "
          f"{out / 'SENDER.md'}", flush=True)  # fmt: skip
    return 0 if failed == 0 and res["part1_callouts_during"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
