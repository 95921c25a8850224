"""SMTP transactions per second through the real Exim 4.96: the project's exim/configure (every
decision asked of the policy daemon) against benchmarks/exim_native.conf (the same decisions
made by Exim's own lsearch / wildlsearch / host-list lookups of the same files), same messages,
same run, interleaved. Writes benchmarks/report/EXIM.md.

Usage: .venv/bin/python benchmarks/exim_bench.py [--messages N] [--concurrency C] [--repeats R]

Each transaction is what a remote MTA does: connect from 127.0.0.2, EHLO, MAIL, RCPT, DATA,
QUIT, one message per connection (Exim forks a process per connection, so that is the cost
that matters). Recipients rotate over users, aliases and a rewritten domain of the example tree;
everything is delivered to Maildirs. Bounded: N messages per run, R runs per configuration.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import smtplib
import statistics
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.exim_stack import Stack, exim_stack  # noqa: E402

RCPTS = ["alice@example.org", "bob@example.org", "info@example.org", "carol@example.net",
         "alice@example.info", "postmaster@example.com"]  # fmt: skip
BODY = b"From: someone@remote.example\r\nSubject: bench\r\n\r\n" + b"x" * 2000 + b"\r\n"


def transactions(port: int, count: int, concurrency: int) -> tuple[float, int]:
    """(seconds, failures) for ``count`` one-message connections, ``concurrency`` at a time."""

    def one(i: int) -> bool:
        try:
            with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example.net",
                              source_address=("127.0.0.2", 0), timeout=30) as client:  # fmt: skip
                return (
                    client.sendmail("someone@remote.example", [RCPTS[i % len(RCPTS)]], BODY) == {}
                )
        except (OSError, smtplib.SMTPException):
            return False

    started = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(count)))
    return time.monotonic() - started, results.count(False)


@contextlib.contextmanager
def stacks() -> Iterator[tuple[Stack, Stack]]:
    template = (REPO / "benchmarks" / "exim_native.conf").read_text()
    with exim_stack() as ours, exim_stack(native_template=template) as native:
        yield ours, native


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=16)  # Exim refuses beyond 20
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "report"))
    args = parser.parse_args()
    runs: dict[str, list[dict[str, float]]] = {"mailpolicy": [], "native": []}
    with stacks() as (ours, native):
        transactions(ours.smtp_port, 20, 4)  # warm up both
        transactions(native.smtp_port, 20, 4)
        for repeat in range(args.repeats):
            order = [("mailpolicy", ours), ("native", native)]
            for name, stack in order if repeat % 2 == 0 else reversed(order):
                seconds, failures = transactions(stack.smtp_port, args.messages, args.concurrency)
                runs[name].append({"seconds": seconds, "failures": failures,
                                   "tps": args.messages / seconds})  # fmt: skip
                print(f"{name:10} run {repeat}: {args.messages / seconds:7.1f} tx/s "
                      f"({failures} failed)", flush=True)  # fmt: skip
    tps = {name: statistics.median(r["tps"] for r in rs) for name, rs in runs.items()}
    ratio = tps["mailpolicy"] / tps["native"]
    failures = sum(int(r["failures"]) for rs in runs.values() for r in rs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "exim_results.json").write_text(json.dumps({"args": vars(args), "runs": runs,
                                                       "median_tps": tps}, indent=2))  # fmt: skip
    verdict = "met" if ratio >= 0.9 and failures == 0 else "NOT met"

    def row(label: str, name: str) -> str:
        each = ", ".join(f"{r['tps']:.1f}" for r in runs[name])
        failed = sum(int(r["failures"]) for r in runs[name])
        return f"| {label} | {tps[name]:.1f} | {each} | {failed} |"

    (out / "EXIM.md").write_text(f"""# SMTP throughput through Exim: daemon vs native lookups

Generated {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())} by `benchmarks/exim_bench.py`
on {platform.node() or 'this machine'} ({platform.machine()}, Python {platform.python_version()}).

{args.messages} messages per run, {args.concurrency} connections at a time, one message per
connection from 127.0.0.2, {args.repeats} runs per configuration, interleaved; both Exims run
side by side on their own copy of the example tree and deliver to Maildirs.

| configuration | median tx/s | runs (tx/s) | failed |
|---|---:|---|---:|
{row("exim/configure + policy daemon", "mailpolicy")}
{row("native lookups (benchmarks/exim_native.conf)", "native")}

Ratio: **{ratio:.2f}** of native (target >= 0.90: **{verdict}**).
""")  # fmt: skip
    print(f"ratio {ratio:.2f} ({verdict}); report in {out / 'EXIM.md'}")
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
