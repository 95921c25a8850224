"""Benchmark harness: mailpolicy against a C and a plain-asyncio do-nothing server, in one run.

    .venv/bin/python benchmarks/run.py [--quick] [--out benchmarks/report]

What it does, in order (see benchmarks/README.md for the why):

1. compiles ``loadgen.c`` and ``baseline_server.c`` with ``gcc -O2`` into a temp dir;
2. writes synthetic mail data trees with 100, 10 000 and 100 000 entries per list, and request
   files whose keys are spread over each whole list (first, middle, last and random entries);
3. for each server x request kind x list size x concurrency, runs the C load generator for a
   bounded time and reads the server's CPU time from /proc before and after: CPU per request
   is that delta over the requests served;
4. reads each daemon's RSS after loading each tree and after the load;
5. with the 100k tree loaded and load running, rewrites each 100k-line list file in turn
   (passwd, aliases, relay_from_hosts; atomic rename) and times how long until the daemon
   answers according to the new content, and what the latency was meanwhile;
6. writes REPORT.md, results.json and cpu_per_request.png to the output directory.

The load generator and the servers are pinned to different CPUs (0 and 1) when there are two,
so neither steals the other's core and "server CPU" is not diluted by the generator.
Everything started is killed at the end, on error too.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import importlib.metadata
import itertools
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
DOMAIN = "bench.example"
SENDER = "someone@remote.example"
# Not in any generated relay_from_hosts list: a recipient request must pass on the user alone.
REMOTE_IP = "192.0.2.7"
RELAY_RCPT = "x@far.example"
PROBE_USER = "benchprobe"
SIZES = (100, 10_000, 100_000)
CONCURRENCIES = (1, 16, 64)
REQUESTS_PER_FILE = 2000
BASELINE_EXPECT = "ACCEPT 250"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = 1024

# The targets the report checks, from the design issue.
TARGET_CPU_RATIO_C = 2.5
TARGET_P99_US_AT_64 = 2000.0
TARGET_FLATNESS = 1.20
TARGET_RELOAD_S = 1.0
TARGET_RSS_MIB = 80.0
# "Without stalling requests": no gap this long between two completed requests, and no error,
# while the new list is being read. Exim's readsocket would wait, but SMTP clients would see it.
STALL_GAP_MS = 50.0
# A run during which other programs used more than this share of a core (machine-wide)
# is measured again (see Bench.measure_undisturbed).
DISTURBED = 0.10


@dataclass(frozen=True)
class Kind:
    name: str
    daemon_expect: str  # what a good mailpolicy reply starts with
    what: str


KINDS = (
    Kind("recipient", "ACCEPT 250", "RCPT for an existing user (passwd lookup)"),
    Kind("alias", "FOUND ", "ALIAS expansion (aliases lookup)"),
    Kind("relay", "ACCEPT 250", "RCPT to a far domain from a relay_from_hosts IP (CIDR match)"),
)


SERVER_LABEL = {"c": "C baseline", "asyncio": "asyncio baseline", "mailpolicy": "mailpolicy"}


@dataclass(frozen=True)
class Profile:
    run_s: float
    warmup_s: float
    # Each point is measured this many times, interleaved with the other servers, and the
    # median is reported: on a shared VM one core's speed drifts by 10-20% over a minute,
    # and interleaving makes that drift hit every server alike instead of one list size.
    repeats: int
    retries: int  # how often a disturbed run is measured again
    # Seconds in all that may go to waiting for other programs to stop and to measuring
    # disturbed points again: bounds the run time on a busy machine.
    quiet_budget: float
    idle_s: float  # how long each server's idle CPU is measured
    reload_load_s: float
    reload_after_s: float  # load time before the rename
    max_count: int = 2_000_000


FULL = Profile(
    run_s=1.5,
    warmup_s=0.2,
    repeats=5,
    retries=2,
    quiet_budget=90.0,
    idle_s=2.0,
    reload_load_s=6.0,
    reload_after_s=2.0,
)
QUICK = Profile(
    run_s=0.8,
    warmup_s=0.15,
    repeats=1,
    retries=0,
    quiet_budget=5.0,
    idle_s=0.3,
    reload_load_s=3.0,
    reload_after_s=1.0,
)


@dataclass
class Tree:
    root: Path
    size: int
    requests: dict[str, Path]  # kind name -> request file
    reload_requests: Path  # recipients that exist before and after the reload rewrite


@dataclass
class RunResult:
    """One loadgen run, or (in Results.points) the median of a point's repeats."""

    server: str
    kind: str
    size: int | None
    concurrency: int
    repeat: int  # -1 for a median
    count: int
    errors: int
    bad_replies: int
    rps: float
    p50_us: float
    p99_us: float
    p999_us: float
    max_us: float
    max_gap_us: float  # longest time with no request completing
    elapsed_s: float
    server_cpu_s: float
    server_util: float  # server CPU seconds per wall second (1.0 = one core busy)
    cpu_us_per_req: float
    loadgen_cpu_fraction: float
    loadgen_cpu_us_per_req: float
    # CPU used by other programs on the machine during the run (cores, i.e. 0.5 = half a
    # core): another test suite, a compiler ... High values mark a disturbed run.
    other_cpu: float
    bad_reply_example: str = ""
    retries: int = 0  # runs thrown away as disturbed
    cpu_us_min: float = 0.0  # range over the repeats (medians only)
    cpu_us_max: float = 0.0


@dataclass
class Memory:
    server: str
    size: int | None
    when: str
    rss_mib: float
    hwm_mib: float


@dataclass
class ReloadResult:
    size: int
    file: str
    reply_before: str
    reply_after: str
    reload_s: float | None
    p99_before_us: float
    p99_during_us: float
    max_during_us: float
    longest_gap_ms: float
    longest_gap_before_ms: float
    requests_during: int
    errors_during: int
    window_s: float
    # What the daemon's own log says the re-read took ("reloaded in X s"), if it says so:
    # reload_s minus this is the time to notice the change.
    daemon_reload_s: float | None = None
    loadgen: dict[str, Any] = field(default_factory=dict)


@dataclass
class Results:
    machine: dict[str, Any]
    profile: dict[str, Any]
    pinning: str
    daemon_available: bool
    daemon_note: str = ""
    daemon_version: str = ""
    runs: list[RunResult] = field(default_factory=list)  # every repeat
    points: list[RunResult] = field(default_factory=list)  # medians: what the report shows
    memory: list[Memory] = field(default_factory=list)
    idle_cpu: dict[str, float] = field(default_factory=dict)
    cpu_available: dict[str, dict[str, float]] = field(default_factory=dict)
    reloads: list[ReloadResult] = field(default_factory=list)
    targets: list[dict[str, Any]] = field(default_factory=list)


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode("ascii")


# ---------------------------------------------------------------------------------------------
# Processes: every child goes through Supervisor, which kills them all on the way out.


class Supervisor:
    """Owns every process the harness starts; ``close`` kills whatever is still running.

    Each child gets its own session (process group) so that a server's own children (worker
    processes, if the daemon has any) go with it: we signal the group whose id is the pid of
    the process we started, never anything found by name.
    """

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(
        self,
        argv: Sequence[str],
        *,
        cpu: int | None,
        stdout: Any = subprocess.DEVNULL,
        stderr: Any = subprocess.DEVNULL,
        cwd: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        # Affinity set in the child before exec, so threads and children it starts inherit it.
        preexec: Callable[[], None] | None = None
        if cpu is not None:
            preexec = lambda: os.sched_setaffinity(0, {cpu})  # noqa: E731
        proc = subprocess.Popen(
            list(argv),
            stdout=stdout,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
            cwd=cwd,
            start_new_session=True,
            preexec_fn=preexec,
        )
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(grace)
        # The leader may be gone while a child it started lives on in the group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
        if proc in self.procs:
            self.procs.remove(proc)

    def close(self) -> None:
        for proc in list(self.procs):
            self.stop(proc, grace=3.0)


# ---------------------------------------------------------------------------------------------
# /proc readings


def _stat_fields(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    # comm (field 2) may hold spaces and parentheses: split after the last ')'.
    return text[text.rindex(")") + 2 :].split()


def descendants(pid: int) -> list[int]:
    """pid and every live process below it (by scanning ppids: no name matching)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = int(_stat_fields(int(entry))[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def tree_cpu_s(pid: int) -> float:
    """utime+stime of pid and its descendants, plus the reaped children's (cutime+cstime).

    Threads are included by the kernel in their process's figures."""
    ticks = 0
    for p in descendants(pid):
        try:
            f = _stat_fields(p)
        except OSError:
            continue  # exited between the scan and now
        ticks += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
    return ticks / CLK_TCK


def cpu_accounts() -> tuple[float, float]:
    """(machine-wide user+nice+system seconds so far, the part of it that is ours or the
    kernel's): the difference between two readings, minus the same for the second part, is
    what other programs used meanwhile (another test suite, a compiler ...), short-lived ones
    included. "Ours" is this harness and everything it started (servers, load generators,
    which are reaped into our cutime); kernel threads count as ours because the socket
    teardown work our own load causes runs there."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    machine = (int(fields[1]) + int(fields[2]) + int(fields[3])) / CLK_TCK
    kthreads = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            f = _stat_fields(int(entry))
        except (OSError, ValueError):
            continue
        if int(f[6]) & 0x00200000:  # PF_KTHREAD
            kthreads += int(f[11]) + int(f[12])
    return machine, tree_cpu_s(os.getpid()) + kthreads / CLK_TCK


def tree_runtime_s(pid: int) -> float:
    """On-CPU time of every thread of pid and its descendants, in ns precision
    (/proc/PID/task/TID/schedstat). Threads that ended meanwhile are not counted."""
    total = 0
    for p in descendants(pid):
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tids:
            with contextlib.suppress(OSError, ValueError, IndexError):
                total += int(Path(f"/proc/{p}/task/{tid}/schedstat").read_text().split()[0])
    return total / 1e9


def tree_memory_mib(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) summed over pid and its descendants, in MiB."""
    rss = hwm = 0
    for p in descendants(pid):
        try:
            status = Path(f"/proc/{p}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                rss += int(line.split()[1])
            elif line.startswith("VmHWM:"):
                hwm += int(line.split()[1])
    return rss / PAGE_KIB, hwm / PAGE_KIB


# ---------------------------------------------------------------------------------------------
# Client side


def ask(sock_path: Path, line: bytes, timeout: float = 2.0) -> bytes:
    """One request, the readsocket way: connect, send, shutdown(SHUT_WR), read to EOF."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(sock_path))
        s.sendall(line)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def wait_ready(
    proc: subprocess.Popen[bytes], sock_path: Path, timeout: float, log: Path | None
) -> float:
    """Poll with PING until a reply comes; returns the seconds it took (tree loading included)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} during start{_tail(log)}")
        with contextlib.suppress(OSError):
            if ask(sock_path, b"PING\n", timeout=1.0):
                return time.monotonic() - t0
        time.sleep(0.02)
    raise RuntimeError(f"server not answering on {sock_path} after {timeout:.0f}s{_tail(log)}")


def _tail(log: Path | None, lines: int = 20) -> str:
    if log is None or not log.exists():
        return ""
    text = log.read_text(errors="replace").splitlines()[-lines:]
    return "\n--- " + str(log) + " (tail) ---\n" + "\n".join(text)


# ---------------------------------------------------------------------------------------------
# Data: synthetic trees and request files


def relay_entry(i: int) -> tuple[str, str]:
    """(list line, an IP that the line matches) for relay_from_hosts entry i.

    Mostly 10.x.y.z/32 hosts; every 20th is a /28 network in 172.16.0.0/12, so the matcher has
    to handle both host entries and real CIDRs."""
    if i % 20 == 19:
        base = (172 << 24) | (16 << 16) | ((i // 20) * 16)
        ip = base + 1 + (i % 14)
        return f"{_ipv4(base)}/28", _ipv4(ip)
    n = i + 1  # skip 10.0.0.0
    return f"{_ipv4((10 << 24) | n)}/32", _ipv4((10 << 24) | n)


def _ipv4(n: int) -> str:
    return ".".join(str((n >> s) & 255) for s in (24, 16, 8, 0))


def spread_keys(n: int, count: int, rng: random.Random, last: int | None = None) -> list[int]:
    """count indices over 0..last (default n-1): first, middle and last always, the rest random,
    shuffled, so each size's requests touch the whole list (no cache-friendly prefix)."""
    hi = n - 1 if last is None else last
    keys = [0, hi // 2, hi] + [rng.randint(0, hi) for _ in range(count - 3)]
    rng.shuffle(keys)
    return keys


def recipient_line(user: str) -> str:
    return f"RCPT ip={REMOTE_IP} sender={b64(SENDER)} rcpt={b64(f'{user}@{DOMAIN}')}\n"


def make_tree(base: Path, size: int, seed: int) -> Tree:
    rng = random.Random(seed)
    root = base / f"tree-{size}"
    for d in ("passwd", "aliases", "exim/conf"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "passwd" / DOMAIN).write_text(
        "".join(f"user{i}:{{PLAIN}}secret{i}\n" for i in range(size))
    )
    (root / "aliases" / DOMAIN).write_text(
        "".join(f"alias{i}: user{rng.randrange(size)}@{DOMAIN}\n" for i in range(size))
    )
    relay_lines = ["# relay_from_hosts: synthetic benchmark list\n"]
    relay_ips = []
    for i in range(size):
        if i and i % 1000 == 0:
            relay_lines.append(f"# block {i // 1000}\n")  # comments are part of the format
        line, ip = relay_entry(i)
        relay_lines.append(line + "\n")
        relay_ips.append(ip)
    (root / "exim" / "conf" / "relay_from_hosts").write_text("".join(relay_lines))

    reqdir = base / f"requests-{size}"
    reqdir.mkdir(exist_ok=True)
    requests = {
        "recipient": [
            recipient_line(f"user{i}") for i in spread_keys(size, REQUESTS_PER_FILE, rng)
        ],
        "alias": [
            f"ALIAS addr={b64(f'alias{i}@{DOMAIN}')}\n"
            for i in spread_keys(size, REQUESTS_PER_FILE, rng)
        ],
        "relay": [
            f"RCPT ip={relay_ips[i]} sender={b64(SENDER)} rcpt={b64(RELAY_RCPT)}\n"
            for i in spread_keys(size, REQUESTS_PER_FILE, rng)
        ],
    }
    files = {}
    for kind, lines in requests.items():
        files[kind] = reqdir / f"{kind}.txt"
        files[kind].write_text("".join(lines))
    # The reload test replaces the last user with PROBE_USER: load only users that stay.
    reload_file = reqdir / "recipient-reload.txt"
    reload_file.write_text(
        "".join(
            recipient_line(f"user{i}")
            for i in spread_keys(size, REQUESTS_PER_FILE, rng, last=size - 2)
        )
    )
    return Tree(root, size, files, reload_file)


# ---------------------------------------------------------------------------------------------
# Running load


@dataclass
class Handle:
    """A running server under test."""

    server: str  # "c", "asyncio" or "mailpolicy"
    size: int | None  # entries per list (mailpolicy only)
    proc: subprocess.Popen[bytes]
    sock: Path
    requests: dict[str, Path]
    tree: Tree | None
    log: Path

    @property
    def label(self) -> str:
        return SERVER_LABEL[self.server] + ("" if self.size is None else f" n={self.size:,}")

    def expect(self, kind: Kind) -> str:
        return kind.daemon_expect if self.server == "mailpolicy" else BASELINE_EXPECT


def check_replies(h: Handle) -> None:
    """One request of each kind before measuring: a wrong answer shows up here by name, and a
    lazily loaded list is loaded before RSS is read."""
    for kind in KINDS:
        line = h.requests[kind.name].read_text().splitlines()[0]
        reply = ask(h.sock, (line + "\n").encode()).decode(errors="replace")
        if not reply.startswith(h.expect(kind)):
            print(f"  warning: {h.label}: {kind.name} request answered {reply.strip()!r}")


class Bench:
    def __init__(self, sup: Supervisor, work: Path, loadgen: Path, profile: Profile) -> None:
        self.sup = sup
        self.work = work
        self.loadgen = loadgen
        self.profile = profile
        self.pin = (os.cpu_count() or 1) >= 2
        self.server_cpu = 1 if self.pin else None
        self.quiet_budget = profile.quiet_budget

    def loadgen_argv(
        self,
        sock: Path,
        requests: Path,
        expect: str,
        concurrency: int,
        seconds: float,
        samples: Path | None = None,
    ) -> list[str]:
        argv = [
            str(self.loadgen),
            "--socket", str(sock),
            "--requests", str(requests),
            "--expect", expect,
            "--concurrency", str(concurrency),
            "--max-seconds", f"{seconds:.3f}",
            "--max-count", str(self.profile.max_count),
            "--timeout-ms", "3000",
        ]  # fmt: skip
        if samples is not None:
            argv += ["--samples", str(samples)]
        return argv

    def run_loadgen(self, argv: list[str], seconds: float) -> dict[str, Any]:
        # The generator inherits this process's CPU (0); it must finish on its own (bounded),
        # the timeout is only a backstop.
        out = self.work / "loadgen.out"
        with out.open("wb") as fh:
            proc = self.sup.start(argv, cpu=None, stdout=fh, stderr=subprocess.STDOUT)
            try:
                proc.wait(seconds + 30)
            finally:
                self.sup.stop(proc)
        text = out.read_text()
        if proc.returncode != 0:
            raise RuntimeError(f"loadgen failed ({proc.returncode}): {text}")
        result: dict[str, Any] = json.loads(text)
        return result

    def measure_undisturbed(self, *args: Any) -> RunResult:
        """``measure``, run again (up to ``profile.retries`` times) when other programs used CPU
        meanwhile: on a shared machine another program's burst would otherwise be read as
        the server's slowness. Keeps the least disturbed attempt."""
        best = self.measure(*args)
        retries = 0
        while (
            best.other_cpu > DISTURBED and retries < self.profile.retries and self.quiet_budget > 0
        ):
            print(f"    disturbed ({best.other_cpu:.0%} other CPU): again", flush=True)
            retries += 1
            self.wait_quiet(10.0)
            t0 = time.monotonic()
            again = self.measure(*args)
            self.quiet_budget -= time.monotonic() - t0  # retries share the waiting budget
            best = again if again.other_cpu < best.other_cpu else best
        best.retries = retries
        return best

    def measure(
        self,
        server: str,
        pid: int,
        sock: Path,
        kind: Kind,
        size: int | None,
        requests: Path,
        expect: str,
        concurrency: int,
        repeat: int,
    ) -> RunResult:
        p = self.profile
        # Warm-up (discarded): first connections, lazily built caches, allocator growth.
        self.run_loadgen(
            self.loadgen_argv(sock, requests, expect, concurrency, p.warmup_s), p.warmup_s
        )
        acc0, cpu0 = cpu_accounts(), tree_cpu_s(pid)
        lg = self.run_loadgen(
            self.loadgen_argv(sock, requests, expect, concurrency, p.run_s), p.run_s
        )
        cpu1, acc1 = tree_cpu_s(pid), cpu_accounts()
        other = max(0.0, (acc1[0] - acc0[0]) - (acc1[1] - acc0[1]))
        count = int(lg["count"])
        elapsed = float(lg["elapsed_s"])
        cpu = cpu1 - cpu0
        lg_cpu = float(lg["cpu_user_s"]) + float(lg["cpu_sys_s"])
        r = RunResult(
            server=server,
            kind=kind.name,
            size=size,
            concurrency=concurrency,
            repeat=repeat,
            count=count,
            errors=int(lg["errors"]),
            bad_replies=int(lg["bad_replies"]),
            rps=float(lg["rps"]),
            p50_us=float(lg["p50_us"]),
            p99_us=float(lg["p99_us"]),
            p999_us=float(lg["p999_us"]),
            max_us=float(lg["max_us"]),
            max_gap_us=float(lg["max_gap_us"]),
            elapsed_s=elapsed,
            server_cpu_s=cpu,
            server_util=cpu / elapsed if elapsed > 0 else 0.0,
            cpu_us_per_req=cpu / count * 1e6 if count else 0.0,
            loadgen_cpu_fraction=float(lg["cpu_fraction"]),
            loadgen_cpu_us_per_req=lg_cpu / count * 1e6 if count else 0.0,
            other_cpu=other / elapsed if elapsed > 0 else 0.0,
            bad_reply_example=str(lg.get("bad_reply_example", "")),
        )
        size_s = "-" if size is None else f"{size:,}"
        print(
            f"  #{repeat} {server:<10} {kind.name:<9} n={size_s:>7} c={concurrency:<2} "
            f"{r.rps:7.0f} req/s p50 {r.p50_us:6.0f}us p99 {r.p99_us:6.0f}us "
            f"gap {r.max_gap_us / 1000:5.1f}ms cpu {r.cpu_us_per_req:6.1f}us/req "
            f"srv {r.server_util:4.0%} gen {r.loadgen_cpu_fraction:4.0%} "
            f"other {r.other_cpu:4.0%} err {r.errors}",
            flush=True,
        )
        if r.bad_reply_example:
            print(f"    bad reply e.g. {r.bad_reply_example!r}", flush=True)
        return r

    @contextlib.contextmanager
    def server(
        self, name: str, argv: list[str], sock: Path, log: Path, ready_timeout: float
    ) -> Iterator[subprocess.Popen[bytes]]:
        with log.open("ab") as fh:
            proc = self.sup.start(argv, cpu=self.server_cpu, stdout=fh, stderr=fh, cwd=REPO)
        try:
            took = wait_ready(proc, sock, ready_timeout, log)
            print(f"  {name}: ready after {took:.2f}s (pid {proc.pid})", flush=True)
            yield proc
        finally:
            self.sup.stop(proc)

    def wait_quiet(self, at_most: float) -> float:
        """Wait (in 0.5 s steps, at most ``at_most`` s, and at most ``profile.quiet_budget`` s
        over the whole run) until other programs use under DISTURBED of a core. Returns the
        other programs' share in the last step."""
        other = 0.0
        t_end = time.monotonic() + min(at_most, self.quiet_budget)
        while True:
            t0, acc0 = time.monotonic(), cpu_accounts()
            time.sleep(0.5)
            t1, acc1 = time.monotonic(), cpu_accounts()
            self.quiet_budget -= t1 - t0
            other = max(0.0, (acc1[0] - acc0[0]) - (acc1[1] - acc0[1])) / (t1 - t0)
            if other <= DISTURBED or t1 >= t_end or self.quiet_budget <= 0:
                return other

    def idle_cpu(self, pid: int) -> float:
        """Server CPU while nobody asks: background work (file polling, timers), as % of a core."""
        # schedstat, not /proc/PID/stat: a few ms of timer work per second is below the
        # 10 ms tick resolution of utime/stime and would read as 0.
        c0, t0 = tree_runtime_s(pid), time.monotonic()
        time.sleep(self.profile.idle_s)
        return (tree_runtime_s(pid) - c0) / (time.monotonic() - t0) * 100


# ---------------------------------------------------------------------------------------------
# The reload test


@dataclass(frozen=True)
class ReloadCase:
    """One list file to rewrite: the entry the new version adds, and a request whose reply
    starts with ``new_reply`` only once the daemon serves the new version."""

    file: str  # relative to the tree root
    new_line: str
    probe: str
    new_reply: str


RELOAD_CASES = (
    # passwd: the lookup every RCPT for a local domain makes (the load itself uses it).
    ReloadCase(f"passwd/{DOMAIN}", f"{PROBE_USER}:{{PLAIN}}probe", recipient_line(PROBE_USER),
               "ACCEPT"),
    ReloadCase(f"aliases/{DOMAIN}", f"aliasprobe: user0@{DOMAIN}",
               f"ALIAS addr={b64(f'aliasprobe@{DOMAIN}')}\n", "FOUND"),
    # relay_from_hosts: the slowest to parse (every line is an address or network).
    ReloadCase("exim/conf/relay_from_hosts", "192.0.2.99/32",
               f"RCPT ip=192.0.2.99 sender={b64(SENDER)} rcpt={b64(RELAY_RCPT)}\n", "ACCEPT"),
)  # fmt: skip


def reload_test(bench: Bench, sock: Path, tree: Tree, case: ReloadCase, log: Path) -> ReloadResult:
    """Rewrite one 100k-line list file (atomic rename) under load; time the switch.

    The new file is the old one without its last entry plus ``case.new_line``, so it keeps its
    size and the probe's answer flips exactly when the daemon serves the new content. The load
    (recipients at c=16) asks only for users present in every version, so every reply should
    stay ACCEPT throughout."""
    p = bench.profile
    log_size = log.stat().st_size if log.exists() else 0
    target = tree.root / case.file
    lines = target.read_text().splitlines()
    last = max(i for i, line in enumerate(lines) if line.strip() and not line.startswith("#"))
    del lines[last]
    # Written outside the tree (same filesystem, so rename is atomic) so that no half-written
    # or temporary file is ever visible to the daemon.
    staged = bench.work / "reload.new"
    staged.write_text("\n".join([*lines, case.new_line]) + "\n")
    probe = case.probe.encode()
    before = ask(sock, probe).decode(errors="replace").strip()

    samples = bench.work / "reload-samples.txt"
    argv = bench.loadgen_argv(
        sock, tree.reload_requests, "ACCEPT 250", 16, p.reload_load_s, samples=samples
    )
    out = bench.work / "reload-loadgen.out"
    reload_s: float | None = None
    after = ""
    with out.open("wb") as fh:
        lg_proc = bench.sup.start(argv, cpu=None, stdout=fh, stderr=subprocess.STDOUT)
        try:
            time.sleep(p.reload_after_s)
            t_rename = time.monotonic()
            os.replace(staged, target)
            # Poll every 2 ms; time.monotonic() is CLOCK_MONOTONIC, as in loadgen's samples.
            deadline = t_rename + 15.0
            while time.monotonic() < deadline:
                try:
                    reply = ask(sock, probe).decode(errors="replace")
                except OSError as e:
                    reply = f"<{e}>"
                if reply.startswith(case.new_reply):
                    t_new = time.monotonic()
                    reload_s = t_new - t_rename
                    after = reply.strip()
                    break
                after = reply.strip()
                time.sleep(0.002)
            lg_proc.wait(p.reload_load_s + 30)
        finally:
            bench.sup.stop(lg_proc)
    lg: dict[str, Any] = json.loads(out.read_text())

    rows: list[tuple[float, float, bool]] = []
    for line in samples.read_text().splitlines():
        t0_ns, lat_ns, ok = line.split()
        rows.append((int(t0_ns) / 1e9, int(lat_ns) / 1e9, ok == "1"))
    # The window: rename -> first new answer, plus 250 ms for whatever follows the swap
    # (freeing the old table, a GC pass). Without a switch, the rest of the run.
    end = (t_rename + reload_s if reload_s is not None else float(lg["t_end_ns"]) / 1e9) + 0.25
    lg_start = float(lg["t_start_ns"]) / 1e9
    before_lat = [lat for t, lat, ok in rows if ok and lg_start + 0.3 <= t and t + lat < t_rename]
    # A request is "during" the reload if its lifetime overlaps the window.
    during = [(t, lat, ok) for t, lat, ok in rows if t < end and t + lat > t_rename]
    during_ok = sorted(lat for _, lat, ok in during if ok)
    completions = sorted(t + lat for t, lat, _ in rows)
    in_window = [c for c in completions if t_rename <= c <= end]
    prev = [c for c in completions if c < t_rename]
    points = ([prev[-1]] if prev else [t_rename]) + in_window + [end]
    gaps = [b - a for a, b in itertools.pairwise(points)]
    # The same measure before the rename, for comparison: a periodic stall that has nothing
    # to do with reloading shows up in both.
    settled = [c for c in prev if c >= lg_start + 0.3]
    gaps_before = [b - a for a, b in itertools.pairwise(settled)]
    return ReloadResult(
        size=tree.size,
        file=case.file,
        reply_before=before,
        reply_after=after,
        reload_s=reload_s,
        p99_before_us=_pct(sorted(before_lat), 0.99) * 1e6,
        p99_during_us=_pct(during_ok, 0.99) * 1e6,
        max_during_us=(during_ok[-1] * 1e6) if during_ok else 0.0,
        longest_gap_ms=max(gaps) * 1e3 if gaps else 0.0,
        longest_gap_before_ms=max(gaps_before) * 1e3 if gaps_before else 0.0,
        requests_during=len(during),
        errors_during=sum(1 for _, _, ok in during if not ok),
        window_s=end - t_rename,
        daemon_reload_s=_logged_reload_s(log, log_size),
        loadgen=lg,
    )


def _logged_reload_s(log: Path, offset: int) -> float | None:
    """The daemon's "reloaded ... in X s" log event written after ``offset``, if any. Only a
    diagnostic: if the daemon's log format changes this is None and nothing else depends on it."""
    # The daemon writes its log in batches: give it a moment to flush.
    time.sleep(0.5)
    with contextlib.suppress(OSError), log.open("rb") as fh:
        fh.seek(offset)
        found = re.findall(rb"event reloaded[^\n]* in ([0-9.]+)s", fh.read())
        if found:
            return float(found[-1])
    return None


def _pct(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile (the same rule as loadgen.c)."""
    if not sorted_values:
        return 0.0
    rank = min(len(sorted_values), max(1, int(p * len(sorted_values) + 0.999999)))
    return sorted_values[rank - 1]


# ---------------------------------------------------------------------------------------------
# Machine, build


def machine_info() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    gcc = subprocess.run(["gcc", "--version"], capture_output=True, text=True, check=False)
    versions = {}
    for dist in ("uvloop", "matplotlib", "mailpolicy"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "gcc": gcc.stdout.splitlines()[0] if gcc.stdout else "",
        "mem_gib": round(mem_kib / 1024 / 1024, 1),
        "packages": versions,
        "clk_tck": CLK_TCK,
    }


SPIN = """
import sys, time
end = time.monotonic() + float(sys.argv[1])
c0 = time.process_time()
while time.monotonic() < end:
    pass
print(time.process_time() - c0)
"""


def cpu_availability(sup: Supervisor, seconds: float) -> dict[str, float]:
    """How much of each CPU this VM actually gets: one busy loop pinned per CPU, all at once,
    CPU time over wall time. A hypervisor that takes cores away shows up as < 100% here (and
    not as steal time in /proc/stat on every host), which bounds what any server can reach."""
    ncpu = os.cpu_count() or 1
    procs = []
    for cpu in range(min(ncpu, 2)):
        procs.append(
            sup.start([sys.executable, "-c", SPIN, str(seconds)], cpu=cpu, stdout=subprocess.PIPE)
        )
    out = {}
    for cpu, proc in enumerate(procs):
        stdout, _ = proc.communicate(timeout=seconds + 30)
        sup.stop(proc)
        out[f"cpu{cpu}"] = round(float(stdout.decode().strip() or 0) / seconds, 3)
    return out


def daemon_version() -> str:
    """The commit of the daemon under test, and the policy/ files that differ from it: the
    daemon changes while benchmarks are run, so a report must say what it measured."""
    head = subprocess.run(
        ["git", "-C", str(REPO), "log", "-1", "--format=%h %s"],
        capture_output=True,
        text=True,
        check=False,
    )
    dirty = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--", "policy"],
        capture_output=True,
        text=True,
        check=False,
    )
    if head.returncode != 0:
        return "unknown (not a git checkout)"
    changed = [line[3:] for line in dirty.stdout.splitlines()]
    return head.stdout.strip() + (
        f" + uncommitted changes in {', '.join(changed)}" if changed else " (clean)"
    )


def compile_c(work: Path) -> tuple[Path, Path]:
    out = []
    for name in ("loadgen", "baseline_server"):
        exe = work / name
        cmd = ["gcc", "-O2", "-Wall", "-Wextra", "-o", str(exe), str(BENCH_DIR / f"{name}.c")]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"compiling {name}.c failed:\n{proc.stderr}")
        if proc.stderr.strip():
            print(f"warning: {name}.c compiled with warnings:\n{proc.stderr}", file=sys.stderr)
        out.append(exe)
    return out[0], out[1]


def daemon_available() -> tuple[bool, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "policy", "serve", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if proc.returncode == 0:
        return True, ""
    lines = (proc.stderr or proc.stdout).strip().splitlines()
    return False, lines[-1] if lines else f"exit {proc.returncode}"


# ---------------------------------------------------------------------------------------------
# Targets and report


def _get(runs: list[RunResult], server: str, kind: str, size: int | None, c: int) -> RunResult:
    for r in runs:
        if (r.server, r.kind, r.size, r.concurrency) == (server, kind, size, c):
            return r
    raise KeyError((server, kind, size, c))


def _find(
    runs: list[RunResult], server: str, kind: str, size: int | None, c: int
) -> RunResult | None:
    try:
        return _get(runs, server, kind, size, c)
    except KeyError:
        return None


def aggregate(runs: list[RunResult]) -> list[RunResult]:
    """The median of each point's repeats, metric by metric, plus the CPU/request range."""
    groups: dict[tuple[str, str, int | None, int], list[RunResult]] = {}
    for r in runs:
        groups.setdefault((r.server, r.kind, r.size, r.concurrency), []).append(r)
    out = []
    for (server, kind, size, c), rs in groups.items():

        def med(name: str, rs: list[RunResult] = rs) -> float:
            return float(statistics.median(float(getattr(r, name)) for r in rs))

        cpus = [r.cpu_us_per_req for r in rs]
        out.append(
            RunResult(
                server=server,
                kind=kind,
                size=size,
                concurrency=c,
                repeat=-1,
                count=int(med("count")),
                errors=sum(r.errors for r in rs),
                bad_replies=sum(r.bad_replies for r in rs),
                rps=med("rps"),
                p50_us=med("p50_us"),
                p99_us=med("p99_us"),
                p999_us=med("p999_us"),
                max_us=max(r.max_us for r in rs),
                # Median too: a stall the server causes shows in every run, while a pause of
                # the VM hits one run now and then.
                max_gap_us=med("max_gap_us"),
                elapsed_s=med("elapsed_s"),
                server_cpu_s=med("server_cpu_s"),
                server_util=med("server_util"),
                cpu_us_per_req=med("cpu_us_per_req"),
                loadgen_cpu_fraction=med("loadgen_cpu_fraction"),
                loadgen_cpu_us_per_req=med("loadgen_cpu_us_per_req"),
                other_cpu=med("other_cpu"),
                retries=sum(r.retries for r in rs),
                bad_reply_example=next(
                    (r.bad_reply_example for r in rs if r.bad_reply_example), ""
                ),
                cpu_us_min=min(cpus),
                cpu_us_max=max(cpus),
            )
        )
    return out


def ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


def evaluate(res: Results) -> list[dict[str, Any]]:
    """One row per target: what was measured, the worst case, and met / not met."""
    targets: list[dict[str, Any]] = []
    mp = [r for r in res.points if r.server == "mailpolicy"]

    def add(name: str, measured: str, met: bool | None, detail: str = "") -> None:
        verdict = "not measured" if met is None else ("met" if met else "NOT met")
        targets.append({"target": name, "measured": measured, "verdict": verdict, "detail": detail})

    if not mp:
        for name in (
            f"CPU/request <= {TARGET_CPU_RATIO_C}x C baseline",
            "p99 <= 2 ms at concurrency 64",
            "lookup cost flat within 20% (100 -> 100k)",
            "100k-line reload <= 1 s without stalling requests",
            f"RSS <= {TARGET_RSS_MIB:.0f} MiB with 100k entries",
        ):
            add(name, "-", None, "daemon not available")
        return targets

    worst: tuple[float, RunResult] | None = None
    for r in mp:
        base = _find(res.points, "c", r.kind, None, r.concurrency)
        if base is None or r.errors:
            continue
        q = ratio(r.cpu_us_per_req, base.cpu_us_per_req)
        if worst is None or q > worst[0]:
            worst = (q, r)
    if worst is not None:
        q, r = worst
        ok_all = all(
            ratio(
                x.cpu_us_per_req, _get(res.points, "c", x.kind, None, x.concurrency).cpu_us_per_req
            )
            <= TARGET_CPU_RATIO_C
            for x in mp
        )
        add(
            f"CPU/request <= {TARGET_CPU_RATIO_C}x C baseline",
            f"worst {q:.2f}x ({r.kind}, n={r.size:,}, c={r.concurrency})",
            ok_all,
            "every kind x size x concurrency, against the C baseline at the same kind and c",
        )

    at64 = [r for r in mp if r.concurrency == 64]
    if at64:
        w = max(at64, key=lambda r: r.p99_us)
        add(
            "p99 <= 2 ms at concurrency 64",
            f"worst {w.p99_us / 1000:.2f} ms ({w.kind}, n={w.size:,})",
            all(r.p99_us <= TARGET_P99_US_AT_64 and not r.errors for r in at64),
            "closed loop: p50 ~ 64 / throughput (Little's law)",
        )

    flat: list[tuple[float, str]] = []
    for kind in KINDS:
        for c in CONCURRENCIES:
            small = _find(mp, "mailpolicy", kind.name, SIZES[0], c)
            big = _find(mp, "mailpolicy", kind.name, SIZES[-1], c)
            if small and big:
                flat.append(
                    (ratio(big.cpu_us_per_req, small.cpu_us_per_req), f"{kind.name}, c={c}")
                )
    if flat:
        q, where = max(flat)
        add(
            "lookup cost flat within 20% (100 -> 100k)",
            f"worst CPU/request ratio 100k/100 = {q:.2f} ({where})",
            all(x <= TARGET_FLATNESS for x, _ in flat),
            "ratio of server CPU per request, 100k-entry tree over 100-entry tree",
        )

    if res.reloads:

        def ok(rl: ReloadResult) -> bool:
            return (
                rl.reload_s is not None
                and rl.reload_s <= TARGET_RELOAD_S
                and rl.errors_during == 0
                and rl.longest_gap_ms <= STALL_GAP_MS
            )

        parts = []
        for rl in res.reloads:
            took = "never switched" if rl.reload_s is None else f"{rl.reload_s * 1000:.0f} ms"
            parts.append(
                f"{rl.file.rsplit('/', 1)[-1] if 'conf' in rl.file else rl.file}: {took}, "
                f"gap {rl.longest_gap_ms:.0f} ms, p99 {rl.p99_during_us / 1000:.1f} ms, "
                f"{rl.errors_during} errors"
            )
        add(
            "100k-line reload <= 1 s without stalling requests",
            "; ".join(parts),
            all(ok(rl) for rl in res.reloads),
            f"each file; stall = a gap > {STALL_GAP_MS:.0f} ms between completions, or any error",
        )
    else:
        add("100k-line reload <= 1 s without stalling requests", "-", None, "not run")

    big_mem = [
        m
        for m in res.memory
        if m.server == "mailpolicy" and m.size == SIZES[-1] and m.when == "after load"
    ]
    if big_mem:
        m = big_mem[0]
        add(
            f"RSS <= {TARGET_RSS_MIB:.0f} MiB with 100k entries",
            f"VmRSS {m.rss_mib:.1f} MiB, VmHWM {m.hwm_mib:.1f} MiB",
            m.hwm_mib <= TARGET_RSS_MIB,
            "peak (VmHWM) after loading the 100k tree and serving every load run",
        )
    return targets


def _fmt_size(size: int | None) -> str:
    return "-" if size is None else f"{size:,}"


def write_report(res: Results, out: Path) -> None:
    lines: list[str] = []
    w = lines.append
    m = res.machine
    w("# mailpolicy benchmark report\n")
    w(
        f"Generated {time.strftime('%Y-%m-%d %H:%M:%S %Z')} by `benchmarks/run.py"
        f"{' --quick' if res.profile.get('quick') else ''}`. "
        "All figures come from one run on one machine; the baselines ran in the same run.\n"
    )
    if not res.daemon_available:
        w(
            f"**mailpolicy was not measured**: `python -m policy serve` is not available "
            f"({res.daemon_note}). Only the baselines below.\n"
        )

    w("## Targets\n")
    w("| target | measured | verdict | how |")
    w("|---|---|---|---|")
    for t in res.targets:
        w(f"| {t['target']} | {t['measured']} | **{t['verdict']}** | {t['detail']} |")
    w("")

    w("## Machine and method\n")
    w(
        f"- CPU: {m['cpu_model']} x {m['nproc']} (nproc), {m['mem_gib']} GiB RAM; "
        f"kernel {m['kernel']}"
    )
    w(
        f"- Python {m['python']} ({m['python_executable']}); {m['gcc']}; "
        + ", ".join(f"{k} {v}" for k, v in m["packages"].items())
    )
    if res.daemon_version:
        w(f"- mailpolicy measured: commit {res.daemon_version}")
    w(f"- Pinning: {res.pinning}")
    if res.cpu_available:
        w(
            "- CPU actually available (a busy loop pinned to each CPU, both at once, CPU time / "
            "wall time): "
            + "; ".join(
                f"{when}: " + ", ".join(f"{k} {v:.0%}" for k, v in d.items())
                for when, d in res.cpu_available.items()
            )
            + ". Below 100% means the hypervisor gave the cores to someone else for a while: "
            "wall-clock figures (req/s, latency) are noisier than CPU per request."
        )
    p = res.profile
    w(
        f"- Each point: {p['warmup_s']} s warm-up (discarded), then {p['run_s']} s of closed-loop "
        "load (bounded also by a request count), repeated "
        f"{p['repeats']} times; the median is reported. All servers run side by side (idle "
        "unless measured) and the points are interleaved (kind x concurrency x server, server "
        "order rotated per repeat), so machine drift hits all servers alike. Concurrency = "
        "clients, each doing connect / send one line / shutdown(SHUT_WR) / read to EOF / "
        "close, back to back."
    )
    w(
        "- Latency: CLOCK_MONOTONIC from before socket() to EOF, good replies only. A reply is "
        "good when it starts with the expected token (`ACCEPT 250` for RCPT, `FOUND ` for ALIAS; "
        "baselines always answer `ACCEPT 250 2.1.5 ok`) and ends with LF; others count as errors."
    )
    w(
        "- Server CPU: utime+stime (+ reaped children, + live descendants) from /proc/PID/stat "
        f"before and after the run, at {m['clk_tck']} ticks/s; CPU/request = delta / requests. "
        "`srv` = server CPU seconds per wall second (100% = the server's core is saturated)."
    )
    w(
        "- Requests use keys spread over the whole list (first, middle, last, and random), "
        f"{REQUESTS_PER_FILE} per file, sent round-robin. Lists: passwd "
        "(`userN:{PLAIN}secretN`), "
        "aliases (`aliasN: userM@bench.example`), relay_from_hosts (10.x.y.z/32 hosts, every 20th "
        "a 172.16.x.y/28 network, `#` comments), each with N entries."
    )
    w("")

    w("### Is the load generator the bottleneck?\n")
    lg_rows = [r for r in res.points if r.concurrency > 1]
    if lg_rows:
        mx = max(lg_rows, key=lambda r: r.loadgen_cpu_fraction)
        w(
            f"The generator is one C thread on its own CPU. Its CPU use is in the `gen` column. "
            f"Highest: {mx.loadgen_cpu_fraction:.0%} of a core ({SERVER_LABEL[mx.server]}, "
            f"{mx.kind}, c={mx.concurrency}). It costs "
            f"{statistics.median(r.loadgen_cpu_us_per_req for r in lg_rows):.1f} µs of CPU per "
            "request (median; mostly kernel time for socket/connect/close)."
        )
        mpr = [r for r in lg_rows if r.server != "c"]
        if mpr:
            w(
                f"Against the Python servers it used at most "
                f"{max(r.loadgen_cpu_fraction for r in mpr):.0%} of its core while the server "
                f"used up to {max(r.server_util for r in mpr):.0%} of its own: the server is the "
                "bottleneck there."
            )
        w(
            "Against the C baseline, the generator and the server do about the same syscalls per "
            "request, so the C baseline's req/s is limited by the generator (a lower bound for "
            "what the C server can do). Its CPU per request is still its own, read from /proc, "
            "and that is what the ratios use.\n"
        )

    w("## Throughput, latency and CPU per request\n")
    w(
        f"Each row is the median of {p['repeats']} interleaved runs (range = CPU/request over "
        "them). Ratios compare CPU per request with the baseline at the same request kind and "
        "concurrency, measured in this run. `stall` = the longest time in any of the runs with "
        "no request completing (a stop-the-world pause shows here even when p99 hides it). "
        "`other` = CPU used by other programs on the machine during the run, in % of one core "
        f"(a run with more than {DISTURBED:.0%} is measured again, up to {p['retries']} times, "
        "keeping the least disturbed; `retries` counts those).\n"
    )
    w(
        "| server | kind | entries | c | req/s | p50 µs | p99 µs | p99.9 µs | stall ms | errors "
        "| srv CPU | CPU µs/req | (range) | x C | x asyncio | gen CPU | other | retries |"
    )
    w("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|")
    for r in res.points:
        cb = _find(res.points, "c", r.kind, None, r.concurrency)
        ab = _find(res.points, "asyncio", r.kind, None, r.concurrency)
        xc = f"{ratio(r.cpu_us_per_req, cb.cpu_us_per_req):.2f}" if cb else "-"
        xa = f"{ratio(r.cpu_us_per_req, ab.cpu_us_per_req):.2f}" if ab else "-"
        w(
            f"| {SERVER_LABEL[r.server]} | {r.kind} | {_fmt_size(r.size)} | {r.concurrency} | "
            f"{r.rps:,.0f} | {r.p50_us:,.0f} | {r.p99_us:,.0f} | {r.p999_us:,.0f} | "
            f"{r.max_gap_us / 1000:.1f} | {r.errors} | "
            f"{r.server_util:.0%} | {r.cpu_us_per_req:.1f} | "
            f"{r.cpu_us_min:.0f}-{r.cpu_us_max:.0f} | {xc} | {xa} | "
            f"{r.loadgen_cpu_fraction:.0%} | {r.other_cpu:.0%} | {r.retries} |"
        )
    w("")
    bad = [r for r in res.points if r.bad_reply_example]
    for r in bad:
        w(
            f"- {SERVER_LABEL[r.server]} {r.kind} n={_fmt_size(r.size)} c={r.concurrency}: "
            f"{r.bad_replies} bad replies, e.g. `{r.bad_reply_example}`"
        )
    if bad:
        w("")
    w("![CPU per request](cpu_per_request.png)\n")

    mp = [r for r in res.points if r.server == "mailpolicy"]
    if mp:
        w("## Lookup cost across list sizes\n")
        w(
            "CPU µs/request of mailpolicy per list size; flatness = 100k / 100 (target <= "
            f"{TARGET_FLATNESS:.2f}). p50 is shown as a second view (at c=1 it is the service "
            "time).\n"
        )
        w(
            "| kind | c | CPU 100 | CPU 10k | CPU 100k | flatness (CPU) | p50 100 µs | "
            "p50 100k µs | flatness (p50) |"
        )
        w("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for kind in KINDS:
            for c in CONCURRENCIES:
                rs = [_find(mp, "mailpolicy", kind.name, s, c) for s in SIZES]
                if rs[0] is None or rs[-1] is None:
                    continue
                cells = " | ".join("-" if x is None else f"{x.cpu_us_per_req:.1f}" for x in rs)
                w(
                    f"| {kind.name} | {c} | {cells} | "
                    f"{ratio(rs[-1].cpu_us_per_req, rs[0].cpu_us_per_req):.2f} | "
                    f"{rs[0].p50_us:.0f} | {rs[-1].p50_us:.0f} | "
                    f"{ratio(rs[-1].p50_us, rs[0].p50_us):.2f} |"
                )
        w("")

    w("## Memory\n")
    w(
        "VmRSS/VmHWM from /proc/PID/status (summed over the server's processes). `loaded` = "
        "after start and one request of each kind; `after load` = after every measured run.\n"
    )
    w("| server | entries per list | when | VmRSS MiB | VmHWM MiB |")
    w("|---|---:|---|---:|---:|")
    for mem in sorted(res.memory, key=lambda x: (x.server != "c", x.server, x.size or 0)):
        w(
            f"| {SERVER_LABEL[mem.server]} | {_fmt_size(mem.size)} | {mem.when} | "
            f"{mem.rss_mib:.1f} | {mem.hwm_mib:.1f} |"
        )
    w("")
    if res.idle_cpu:
        w(
            "Idle CPU (no requests, background work only): "
            + ", ".join(f"{k} {v:.2f}% of a core" for k, v in res.idle_cpu.items())
            + "\n"
        )

    if res.reloads:
        size = res.reloads[0].size
        w("## Reload under load\n")
        w(
            f"With the {size:,}-entry tree loaded and recipient load at c=16, each list file "
            f"({size:,} entries) in turn was replaced by a rewritten copy (written elsewhere, "
            "then renamed over it) that drops its last entry and adds a new one. A probe request "
            "that only the new entry answers positively was sent every 2 ms until it was. The "
            "window is rename -> first new answer + 250 ms; a request is in it if its lifetime "
            "overlaps it. `gap` = longest time with no request completing. `re-read` is what "
            "the daemon's log says the re-read itself took; the rest of the switch time is "
            "noticing the change.\n"
        )
        w(
            "| file | rename -> new answer | re-read (daemon log) | probe before -> after | "
            "p99 before µs | "
            "p99 in window µs | max in window µs | gap in window ms | gap before ms | "
            "requests / errors in window | run req/s |"
        )
        w("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
        for rl in res.reloads:
            took = "never (15 s)" if rl.reload_s is None else f"{rl.reload_s * 1000:.0f} ms"
            w(
                f"| `{rl.file}` | {took} | "
                + ("-" if rl.daemon_reload_s is None else f"{rl.daemon_reload_s * 1000:.0f} ms")
                + f" | `{rl.reply_before}` -> `{rl.reply_after}` | "
                f"{rl.p99_before_us:,.0f} | {rl.p99_during_us:,.0f} | {rl.max_during_us:,.0f} | "
                f"{rl.longest_gap_ms:.1f} | {rl.longest_gap_before_ms:.1f} | "
                f"{rl.requests_during} / {rl.errors_during} | "
                f"{float(rl.loadgen.get('rps', 0)):,.0f} |"
            )
        w("")

    w("## Notes\n")
    w(
        "- Closed loop: with C clients and no think time, latency is C / throughput (Little's "
        "law), so p99 <= 2 ms at c=64 needs well over 32 000 req/s from one core. At c=64 the p99 "
        "mostly reflects throughput, at c=1 it is the per-request service time."
    )
    w(
        "- CPU/request at c=1 is higher for every server: each request wakes the event loop "
        "alone; at c=16/64 one epoll_wait returns many events."
    )
    w(
        f"- {res.profile['repeats']} run(s) per point. Tick resolution (1/CLK_TCK s) is about "
        "1% of a run's CPU at saturation; run-to-run noise on this shared VM is larger, "
        "10-20% (see the range column, and compare a baseline's three request kinds, which "
        "do identical work): differences smaller than that are not significant."
    )
    w("")
    (out / "REPORT.md").write_text("\n".join(lines))


def plot(res: Results, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: list[tuple[str, str, int | None]] = [
        ("c", "C baseline", None),
        ("asyncio", "asyncio baseline", None),
    ]
    series += [("mailpolicy", f"mailpolicy n={s:,}", s) for s in SIZES]
    fig, axes = plt.subplots(1, len(CONCURRENCIES), figsize=(15, 5), sharey=True)
    width = 0.8 / len(series)
    for ax, c in zip(axes, CONCURRENCIES, strict=True):
        for si, (server, label, size) in enumerate(series):
            xs, ys, lo, hi = [], [], [], []
            for ki, kind in enumerate(KINDS):
                r = _find(res.points, server, kind.name, size, c)
                if r is not None:
                    xs.append(ki + (si - (len(series) - 1) / 2) * width)
                    ys.append(r.cpu_us_per_req)
                    lo.append(r.cpu_us_per_req - r.cpu_us_min)
                    hi.append(r.cpu_us_max - r.cpu_us_per_req)
            if xs:
                # Bar = median of the repeats, whisker = their range.
                ax.bar(xs, ys, width, label=label, yerr=[lo, hi], capsize=2)
        # The target: 2.5 x the C baseline of the same kind and concurrency.
        for ki, kind in enumerate(KINDS):
            base = _find(res.points, "c", kind.name, None, c)
            if base is not None:
                y = base.cpu_us_per_req * TARGET_CPU_RATIO_C
                ax.hlines(
                    y,
                    ki - 0.45,
                    ki + 0.45,
                    colors="black",
                    linestyles="dashed",
                    label=f"target {TARGET_CPU_RATIO_C}x C" if ki == 0 else None,
                )
        ax.set_xticks(range(len(KINDS)), [k.name for k in KINDS])
        ax.set_title(f"concurrency {c}")
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("server CPU µs per request (median, range; lower is better)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(series) + 1, fontsize="small")
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    fig.savefig(out / "cpu_per_request.png", dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="short runs (about 90 s in all)")
    ap.add_argument("--out", type=Path, default=BENCH_DIR / "report", help="report directory")
    ap.add_argument(
        "--servers",
        default="c,asyncio,mailpolicy",
        help="comma-separated subset of c,asyncio,mailpolicy",
    )
    ap.add_argument("--keep-work", action="store_true", help="keep the temp dir (trees, logs)")
    args = ap.parse_args(argv)
    profile = QUICK if args.quick else FULL
    # SIGTERM would end Python without running finally blocks: turn it into SystemExit so the
    # servers and load generators started below are still killed.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    servers = {s.strip() for s in args.servers.split(",") if s.strip()}
    t_begin = time.monotonic()

    ncpu = os.cpu_count() or 1
    if ncpu >= 2:
        # This process (and the load generator it starts) on CPU 0, servers on CPU 1.
        os.sched_setaffinity(0, {0})
        pinning = (
            "load generator and harness on CPU 0, servers (with all their threads and "
            "children) on CPU 1, via sched_setaffinity"
        )
    else:
        pinning = "not pinned: only one CPU"

    have_daemon, note = (False, "not requested")
    if "mailpolicy" in servers:
        have_daemon, note = daemon_available()
    res = Results(
        machine=machine_info(),
        profile={**dataclasses.asdict(profile), "quick": args.quick},
        pinning=pinning,
        daemon_available=have_daemon,
        daemon_note=note,
        daemon_version=daemon_version() if have_daemon else "",
    )
    print(f"pinning: {pinning}", flush=True)
    if not have_daemon:
        print(f"mailpolicy: not measured ({note})", flush=True)

    # Short path: Unix socket paths are limited to 107 bytes.
    work = Path(tempfile.mkdtemp(prefix="mpbench-", dir="/tmp"))
    sup = Supervisor()
    try:
        loadgen, c_server = compile_c(work)
        bench = Bench(sup, work, loadgen, profile)
        other = bench.wait_quiet(60.0)
        print(f"other programs use {other:.0%} of a core", flush=True)
        res.cpu_available["start"] = cpu_availability(sup, 1.0)
        print(f"CPU available to this VM: {res.cpu_available['start']}", flush=True)
        t0 = time.monotonic()
        trees = {s: make_tree(work, s, seed=s) for s in SIZES}
        print(f"trees written in {time.monotonic() - t0:.1f}s", flush=True)
        # Baselines do no lookup; they get the longest request lines (the 100k keys).
        base_reqs = trees[SIZES[-1]].requests

        with contextlib.ExitStack() as stack:
            # Every server runs for the whole measurement (idle ones cost ~nothing, see the
            # idle CPU figures) so that the points can be interleaved.
            handles: list[Handle] = []
            if "c" in servers:
                sock = work / "c.sock"
                proc = stack.enter_context(
                    bench.server("c", [str(c_server), str(sock)], sock, work / "c.log", 10)
                )
                handles.append(Handle("c", None, proc, sock, base_reqs, None, work / "c.log"))
            if "asyncio" in servers:
                sock = work / "asyncio.sock"
                argv_a = [sys.executable, str(BENCH_DIR / "baseline_asyncio.py"), str(sock)]
                proc = stack.enter_context(
                    bench.server("asyncio", argv_a, sock, work / "asyncio.log", 10)
                )
                handles.append(
                    Handle("asyncio", None, proc, sock, base_reqs, None, work / "asyncio.log")
                )
            if have_daemon:
                for size in SIZES:
                    tree = trees[size]
                    sock = work / f"mp-{size}.sock"
                    log = work / f"mp-{size}.log"
                    argv_d = [
                        sys.executable, "-m", "policy", "serve", "--root", str(tree.root),
                        "--socket", str(sock), "--log-file", str(log),
                    ]  # fmt: skip
                    proc = stack.enter_context(
                        bench.server(f"mailpolicy n={size:,}", argv_d, sock, log, 120)
                    )
                    handles.append(Handle("mailpolicy", size, proc, sock, tree.requests, tree, log))
                    check_replies(handles[-1])

            for h in handles:
                rss, hwm = tree_memory_mib(h.proc.pid)
                res.memory.append(Memory(h.server, h.size, "loaded", rss, hwm))
                res.idle_cpu[h.label] = bench.idle_cpu(h.proc.pid)

            total = profile.repeats * len(KINDS) * len(CONCURRENCIES) * len(handles)
            print(f"{total} measured runs of {profile.run_s}s", flush=True)
            for rep in range(profile.repeats):
                # Rotate the server order each repeat so none is always measured first.
                order = handles[rep % len(handles) :] + handles[: rep % len(handles)]
                for kind in KINDS:
                    for c in CONCURRENCIES:
                        for h in order:
                            res.runs.append(
                                bench.measure_undisturbed(
                                    h.server,
                                    h.proc.pid,
                                    h.sock,
                                    kind,
                                    h.size,
                                    h.requests[kind.name],
                                    h.expect(kind),
                                    c,
                                    rep,
                                )
                            )

            for h in handles:
                rss, hwm = tree_memory_mib(h.proc.pid)
                res.memory.append(Memory(h.server, h.size, "after load", rss, hwm))

            big = next((h for h in handles if h.size == SIZES[-1]), None)
            if big is not None and big.tree is not None:
                print("reload tests", flush=True)
                for case in RELOAD_CASES:
                    bench.wait_quiet(10.0)
                    rl = reload_test(bench, big.sock, big.tree, case, big.log)
                    res.reloads.append(rl)
                    took = "-" if rl.reload_s is None else f"{rl.reload_s:.3f}s"
                    print(
                        f"  reload {case.file}: {took}, p99 during {rl.p99_during_us:.0f}us, "
                        f"gap {rl.longest_gap_ms:.1f}ms (before "
                        f"{rl.longest_gap_before_ms:.1f}ms), errors {rl.errors_during}",
                        flush=True,
                    )
                rss, hwm = tree_memory_mib(big.proc.pid)
                res.memory.append(Memory("mailpolicy", big.size, "after reload", rss, hwm))

        res.cpu_available["end"] = cpu_availability(sup, 1.0)
        print(f"CPU available to this VM: {res.cpu_available['end']}", flush=True)
        res.points = aggregate(res.runs)
        res.targets = evaluate(res)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(
            json.dumps(dataclasses.asdict(res), indent=2, default=str) + "\n"
        )
        plot(res, args.out)
        write_report(res, args.out)
        print(f"done in {time.monotonic() - t_begin:.0f}s: {args.out / 'REPORT.md'}", flush=True)
        for t in res.targets:
            print(f"  {t['verdict']:>12}  {t['target']}: {t['measured']}", flush=True)
        return 0
    finally:
        sup.close()
        if args.keep_work:
            print(f"work dir kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
