"""SMTP transactions per second through the real Exim 4.96: the project's exim/configure (every
decision asked of the policy daemon) against benchmarks/exim_native.conf (the same decisions
made by Exim's own lsearch / wildlsearch / host-list lookups of the same files), same messages,
same run, interleaved. Writes benchmarks/report/EXIM.md.

Usage: .venv/bin/python benchmarks/exim_bench.py [--messages N] [--concurrency C] [--repeats R]

Each transaction is what a remote MTA does: connect from 127.0.0.2, EHLO, MAIL, RCPT, DATA,
QUIT, one message per connection (Exim forks a process per connection, so that is the cost
that matters). Recipients rotate over users, aliases and a rewritten domain of the example tree;
everything is delivered to Maildirs. Bounded: N messages per run, R runs per configuration.

The client is a plain socket, not smtplib: each command is one send() with TCP_NODELAY, and after
QUIT it shuts down its sending side (FIN) before reading the 221, as Exim's own smtp transport
does. This matters: on QUIT, Exim 4.96 corks the socket, buffers the 221 and poll()s up to
200 ms for the client's FIN ("so that the client gets the TIME_WAIT") before it writes the 221.
A client that waits for the 221 before closing (smtplib) therefore pays a fixed 200 ms per
connection, which hid every other cost (benchmarks/README.md, section "SMTP through Exim").
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.exim_stack import EXIM, Stack, exim_stack  # noqa: E402

RCPTS = ["alice@example.org", "bob@example.org", "info@example.org", "carol@example.net",
         "alice@example.info", "postmaster@example.com"]  # fmt: skip
BODY = b"From: someone@remote.example\r\nSubject: bench\r\n\r\n" + b"x" * 2000 + b"\r\n"


SENDER = "someone@remote.example"
HELO = "client.example.net"


def reply(sock: socket.socket, pending: bytearray) -> bytes:
    """The next complete SMTP reply (all its lines); ``pending`` keeps what was read beyond it."""
    while True:
        start = 0
        while (end := pending.find(b"\r\n", start)) >= 0:
            if pending[start + 3 : start + 4] != b"-":  # "250 ..." or a bare "250": last line
                text = bytes(pending[: end + 2])
                del pending[: end + 2]
                return text
            start = end + 2
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed after {bytes(pending)!r}")
        pending += chunk


def one_transaction(port: int, rcpt: str, body: bytes = BODY) -> bytes:
    """One message on one connection: ``body`` (CRLF line endings, dot-stuffed) after DATA.
    Returns the reply to its final dot; raises unless every other reply is the expected one."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind(("127.0.0.2", 0))  # not 127.0.0.1: that one is allowed to relay
        sock.connect(("127.0.0.1", port))
        pending = bytearray()
        steps = [
            (b"", b"220"),
            (f"EHLO {HELO}\r\n".encode(), b"250"),
            (f"MAIL FROM:<{SENDER}>\r\n".encode(), b"250"),
            (f"RCPT TO:<{rcpt}>\r\n".encode(), b"250"),
            (b"DATA\r\n", b"354"),
        ]  # fmt: skip
        for command, code in steps:
            if command:
                sock.sendall(command)
            text = reply(sock, pending)
            if not text.startswith(code):
                raise RuntimeError(f"{command[:30]!r} -> {text!r}")
        sock.sendall(body + b".\r\n")
        answer = reply(sock, pending)
        # QUIT, then FIN at once: Exim 4.96 holds the 221 back for up to 200 ms waiting for it.
        sock.sendall(b"QUIT\r\n")
        sock.shutdown(socket.SHUT_WR)
        if not reply(sock, pending).startswith(b"221"):
            raise RuntimeError("QUIT not answered with 221")
        # Then read to EOF, i.e. until Exim's process has gone: a connection slot is freed only
        # once the process that served it exits, so the count stays below smtp_accept_max.
        while sock.recv(4096):
            pass
        return answer


def transactions(port: int, count: int, concurrency: int) -> tuple[float, int]:
    """(seconds, failures) for ``count`` one-message connections, ``concurrency`` at a time."""

    def one(i: int) -> bool:
        try:
            answer = one_transaction(port, RCPTS[i % len(RCPTS)])
            if not answer.startswith(b"250"):
                raise RuntimeError(f"end of data -> {answer!r}")
        except (OSError, RuntimeError) as exc:
            print(f"  transaction {i} failed: {exc}", file=sys.stderr, flush=True)
            return False
        return True

    started = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(count)))
    return time.monotonic() - started, results.count(False)


def busy_jiffies() -> tuple[int, int]:
    """(busy, total) clock ticks of the whole machine, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def proc_cpu(pid: int) -> float:
    """utime + stime of one process, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuGroup:
    """A cgroup-v1 cpuacct group holding one stack's Exim daemon and policy daemon: every
    process they fork (receivers, deliveries, queue runners) is counted, whatever else runs on
    the machine. Unavailable (no cpuacct, not root): usage() is None."""

    ROOT = Path("/sys/fs/cgroup/cpuacct")

    def __init__(self, name: str, pids: list[int]) -> None:
        self.path: Path | None = self.ROOT / f"mailpolicy-bench-{os.getpid()}-{name}"
        try:
            self.path.mkdir()
            for pid in pids:
                (self.path / "cgroup.procs").write_text(f"{pid}\n")
        except OSError:
            self.close()
            self.path = None

    def usage(self) -> float | None:
        """CPU seconds used by the group so far."""
        if self.path is None:
            return None
        return int((self.path / "cpuacct.usage").read_text()) / 1e9

    def close(self) -> None:
        if self.path is None or not self.path.exists():
            return
        with contextlib.suppress(OSError):
            for pid in (self.path / "cgroup.procs").read_text().split():
                with contextlib.suppress(OSError):
                    (self.ROOT / "cgroup.procs").write_text(f"{pid}\n")
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def configure_version(path: str = "exim/configure") -> str:
    """The last commit of ``path`` (a file or directory of the repository), and whether the
    measured files differ from it."""

    def git(*argv: str) -> str:
        done = subprocess.run(["git", "-C", str(REPO), *argv], capture_output=True, text=True)
        return done.stdout.strip()

    commit = git("log", "-1", "--format=%h", "--", path) or "unknown"
    dirty = git("status", "--porcelain", "--", path)
    return f"commit {commit}" + (" plus uncommitted changes" if dirty else "")


def delivered(stack: Stack) -> int:
    """Messages in every Maildir of the stack's tree plus those the sink kept."""
    return sum(1 for _ in (stack.root / "domains").glob("*/*/Maildir/new/*")) + len(
        stack.sink.messages
    )


def queue_size(stack: Stack) -> int:
    out = subprocess.run([EXIM, "-C", str(stack.conf), "-bpc"], capture_output=True, text=True)
    return int(out.stdout.strip() or "0")


def settle(stack: Stack, timeout: float = 60) -> None:
    """Wait until the stack's queue is empty (every delivery process has finished)."""
    deadline = time.monotonic() + timeout
    while queue_size(stack) and time.monotonic() < deadline:
        time.sleep(0.1)


@contextlib.contextmanager
def stacks() -> Iterator[tuple[tuple[Stack, CpuGroup], tuple[Stack, CpuGroup]]]:
    template = (REPO / "benchmarks" / "exim_native.conf").read_text()
    groups: list[CpuGroup] = []
    try:
        with exim_stack() as ours, exim_stack(native_template=template) as native:
            for name, stack in (("mailpolicy", ours), ("native", native)):
                groups.append(CpuGroup(name, [p.pid for p in stack.procs.values()]))
            yield (ours, groups[0]), (native, groups[1])
    finally:
        for group in groups:
            group.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=300)
    # 8 keep both CPUs of the CI-class machine busy; Exim refuses beyond smtp_accept_max (20).
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "report"))
    args = parser.parse_args()
    runs: dict[str, list[dict[str, float]]] = {"mailpolicy": [], "native": []}
    deliveries: dict[str, int] = {}
    tick = os.sysconf("SC_CLK_TCK")
    with stacks() as ((ours, ours_cpu), (native, native_cpu)):
        cpu = {"mailpolicy": ours_cpu, "native": native_cpu}
        transactions(ours.smtp_port, 20, 4)  # warm up both
        transactions(native.smtp_port, 20, 4)
        for stack in (ours, native):
            settle(stack)
        before = {"mailpolicy": delivered(ours), "native": delivered(native)}
        for repeat in range(args.repeats):
            order = [("mailpolicy", ours), ("native", native)]
            for name, stack in order if repeat % 2 == 0 else reversed(order):
                pid = stack.procs["policy"].pid
                machine0, policy0, client0 = busy_jiffies(), proc_cpu(pid), time.process_time()
                stack0 = cpu[name].usage()
                seconds, failures = transactions(stack.smtp_port, args.messages, args.concurrency)
                settle(stack)  # this run's deliveries are part of its cost, not the next run's
                machine1, policy1, client1 = busy_jiffies(), proc_cpu(pid), time.process_time()
                stack1 = cpu[name].usage()
                ms = 1000 / args.messages
                runs[name].append({
                    "seconds": seconds, "failures": failures, "tps": args.messages / seconds,
                    "machine_cpu_ms": (machine1[0] - machine0[0]) / tick * ms,
                    "machine_busy": (machine1[0] - machine0[0]) / max(1, machine1[1] - machine0[1]),
                    "client_cpu_ms": (client1 - client0) * ms,
                    "policy_cpu_ms": (policy1 - policy0) * ms,
                    "stack_cpu_ms": -1.0 if stack0 is None or stack1 is None
                                    else (stack1 - stack0) * ms,
                })  # fmt: skip
                r = runs[name][-1]
                print(f"{name:10} run {repeat}: {r['tps']:7.1f} tx/s ({failures} failed); CPU/tx "
                      f"stack {r['stack_cpu_ms']:.2f} ms, machine {r['machine_cpu_ms']:.2f} ms, "
                      f"client {r['client_cpu_ms']:.2f} ms, policy daemon "
                      f"{r['policy_cpu_ms']:.2f} ms",
                      flush=True)  # fmt: skip
        deliveries = {"mailpolicy": delivered(ours) - before["mailpolicy"],
                      "native": delivered(native) - before["native"]}  # fmt: skip
        left = {"mailpolicy": queue_size(ours), "native": queue_size(native)}
    tps = {name: statistics.median(r["tps"] for r in rs) for name, rs in runs.items()}
    ratio = tps["mailpolicy"] / tps["native"]
    # Each repeat runs both back to back, so its ratio cancels slow drifts in other load.
    paired = [a["tps"] / b["tps"] for a, b in zip(runs["mailpolicy"], runs["native"], strict=True)]
    failures = sum(int(r["failures"]) for rs in runs.values() for r in rs)
    same = deliveries["mailpolicy"] == deliveries["native"] and not any(left.values())
    has_stack_cpu = all(r["stack_cpu_ms"] >= 0 for rs in runs.values() for r in rs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"args": vars(args), "runs": runs, "median_tps": tps, "paired_ratios": paired,
               "deliveries": deliveries, "left_on_queue": left}  # fmt: skip
    (out / "exim_results.json").write_text(json.dumps(results, indent=2))
    verdict = "met" if ratio >= 0.9 and failures == 0 and same else "NOT met"

    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[name])

    def cpu_row(label: str, name: str) -> str:
        stack = f"{median(name, 'stack_cpu_ms'):.2f}" if has_stack_cpu else "n/a"
        return (f"| {label} | {stack} | {median(name, 'policy_cpu_ms'):.2f} | "
                f"{median(name, 'machine_cpu_ms'):.2f} | "
                f"{100 * median(name, 'machine_busy'):.0f}% | "
                f"{median(name, 'client_cpu_ms'):.2f} |")  # fmt: skip

    def row(label: str, name: str) -> str:
        each = ", ".join(f"{r['tps']:.1f}" for r in runs[name])
        failed = sum(int(r["failures"]) for r in runs[name])
        return f"| {label} | {tps[name]:.1f} | {each} | {failed} |"

    cpu_ratio = (
        f"{median('native', 'stack_cpu_ms') / median('mailpolicy', 'stack_cpu_ms'):.2f}"
        if has_stack_cpu else "n/a"
    )  # fmt: skip
    (out / "EXIM.md").write_text(f"""# SMTP throughput through Exim: daemon vs native lookups

Generated {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())} by `benchmarks/exim_bench.py`
on {platform.node() or 'this machine'} ({platform.machine()}, {os.cpu_count()} CPUs,
Python {platform.python_version()}), with exim/configure as of {configure_version()}.

{args.messages} messages per run, {args.concurrency} connections at a time, one message per
connection from 127.0.0.2, {args.repeats} runs per configuration, interleaved; both Exims run
side by side on their own copy of the example tree and deliver to Maildirs. A run ends when
its last delivery has finished (queue empty), so delivery is part of each run's time and CPU.
The client writes each command in one segment (TCP_NODELAY) and sends its FIN right after QUIT,
so Exim 4.96's 200 ms wait for the client's FIN at QUIT is not part of the figures.

| configuration | median tx/s | runs (tx/s) | failed |
|---|---:|---|---:|
{row("exim/configure + policy daemon", "mailpolicy")}
{row("native lookups (benchmarks/exim_native.conf)", "native")}

Ratio: **{ratio:.2f}** of native (target >= 0.90: **{verdict}**). Per repeat (the two
configurations back to back): {", ".join(f"{x:.2f}" for x in paired)}; median
{statistics.median(paired):.2f}.

Deliveries (Maildir files plus loopback-sink messages) over all measured runs: mailpolicy
{deliveries["mailpolicy"]}, native {deliveries["native"]} ({"the same" if same else "DIFFERENT"});
left on the queues: {left["mailpolicy"]} and {left["native"]}.

CPU per transaction, medians over the runs. "stack" is everything the configuration runs: a
cpuacct cgroup holds its Exim daemon and its policy daemon, so every receiving, delivery and
queue-runner process they fork is counted, and nothing else on the machine is. "policy
daemon" is that process alone (idle during native runs). "machine" is /proc/stat busy time
of the whole machine, including the bench client and anything else that ran meanwhile;
"client" is this Python process (client threads and both loopback sinks).

| configuration | stack ms/tx | policy daemon ms/tx | machine ms/tx | machine busy | client ms/tx |
|---|---:|---:|---:|---:|---:|
{cpu_row("exim/configure + policy daemon", "mailpolicy")}
{cpu_row("native lookups", "native")}

CPU cost ratio (native stack CPU / mailpolicy stack CPU per transaction): **{cpu_ratio}**. It
does not depend on what else the machine was doing; tx/s does.
""")  # fmt: skip
    print(f"ratio {ratio:.2f} ({verdict}), paired median {statistics.median(paired):.2f}, "
          f"CPU cost ratio {cpu_ratio}; deliveries {deliveries}, left {left}; "
          f"report in {out / 'EXIM.md'}")  # fmt: skip
    return 0 if failures == 0 and same else 1


if __name__ == "__main__":
    raise SystemExit(main())
