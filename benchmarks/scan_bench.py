"""Messages per second through the real Exim 4.96 scanning content two ways, on the same clamd
and spamd, same run, interleaved: exim/configure (at DATA Exim asks the policy daemon, which
reads the spooled message and runs its attachment check, clamd INSTREAM and spamd REPORT)
against exim/configure with its DATA ACL swapped for benchmarks/exim_scan_native.conf (Exim's
built-in MIME ACL, `malware` and `spam` conditions, making the same decisions). Writes
benchmarks/report/SCAN.md and scan_results.json.

Usage: .venv/bin/python benchmarks/scan_bench.py [--messages N] [--repeats R] [--concurrency 1,4]
       .venv/bin/python benchmarks/scan_bench.py --quick      # smoke run, under a minute

One clamd (the EICAR-only database) and one spamd (Debian's rules, no network tests) from
tests/scan_stack.py serve both Exims; each Exim has its own spool, Maildir tree and policy
daemon (exim_stack). Both configurations ask their daemon at CONNECT, MAIL and RCPT and route
through it; they differ only at DATA, so the comparison is of the scanning alone.

The messages are a fixed mix (a cycle of 20: plain text and HTML of 3-10 KB, some with a PDF,
PNG or ZIP attachment, GTUBE, EICAR, a blocked .exe attachment), one message per connection
from 127.0.0.2 with the SMTP client of benchmarks/exim_bench.py, the same messages in the same
order to each configuration, at each concurrency, the configurations back to back and their
order swapped every repeat. A run ends when the queue is empty (deliveries are part of its
CPU). Every reply to the end of DATA and every delivered message's scan headers are checked:
both configurations must give the same verdicts (EICAR and the .exe refused with 550, GTUBE
delivered flagged, the rest delivered scanned and unflagged), or the figures compare unequal
work and the bench says so (exit 1).
"""

from __future__ import annotations

import argparse
import contextlib
import email.parser
import email.policy
import email.utils
import io
import json
import os
import platform
import random
import re
import statistics
import sys
import time
import zipfile
from collections import Counter, defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from exim_bench import (
    HELO,
    REPO,
    SENDER,
    CpuGroup,
    busy_jiffies,
    configure_version,
    one_transaction,
    proc_cpu,
    queue_size,
    settle,
)

from policy.settings import Settings
from tests.exim_stack import PRIMARY, Stack, exim_stack
from tests.scan_stack import EICAR, GTUBE, Clamd, Spamd

NATIVE = REPO / "benchmarks" / "exim_scan_native.conf"
SIDES = ("mailpolicy", "native")
RCPTS = ("alice@example.org", "bob@example.org", "carol@example.net")  # one Maildir each
# The mix, as a cycle of 20 (shuffled once, the same for every run and both configurations).
CYCLE = ["text"] * 9 + ["html"] * 4 + ["attachment"] * 3 + ["gtube"] * 2 + ["eicar", "blocked"]
REFUSED = {"eicar", "blocked"}  # 550 at the end of DATA; every other kind is delivered
_VOCABULARY = """the of and to in is that it for on with as was at by be this have from or one had
not but what all were when we there can an your which their said if do will each about how up
out them then she many some so these would other into has more her two like him see time could
no make than first been its who now people my made over did down only way find use may water
long little very after words called just where most know get through back much before go good
new write our used me man too any day same right look think also around another came come work
three word must because does part even place well such here take why things help put years
different away again off went old number great tell men say small every found still between
name should home big give air line set own under read last never us left end along while might
next sound below saw something thought both few those always looked show large often together
asked house world going want school important until form food keep children feet land side
without boy once animals life enough took sometimes four head above kind began almost live page
got earth need far hand high year mother light parts country father let night following picture
being study second eyes soon times story boys since white days ever paper hard near sentence
better best across during today others however sure means knew try told young miles sun ways
thing whole hear example heard several change answer room sea against top turned learn point
city play toward five using himself usually meeting invoice project budget report schedule
quarter review draft agenda minutes team office client order delivery"""
WORDS = _VOCABULARY.split()


@dataclass(frozen=True)
class Mail:
    kind: str
    rcpt: str
    message_id: str
    wire: bytes  # CRLF line endings, dot-stuffed: what goes after DATA


def prose(rng: random.Random, size: int) -> str:
    """Plain paragraphs of common words, about ``size`` characters, lines under 78."""
    paragraphs, total = [], 0
    while total < size:
        sentences = []
        for _ in range(rng.randint(3, 7)):
            words = rng.choices(WORDS, k=rng.randint(6, 18))
            sentences.append(" ".join(words).capitalize() + rng.choice(".....?!"))
        lines, line = [], ""
        for word in " ".join(sentences).split():
            if len(line) + len(word) >= 76:
                lines.append(line)
                line = word
            else:
                line = f"{line} {word}" if line else word
        lines.append(line)
        paragraphs.append("\n".join(lines))
        total += len(paragraphs[-1]) + 2
    return "Hello,\n\n" + "\n\n".join(paragraphs) + "\n\nRegards,\nSomeone\n"


def html_of(text: str) -> str:
    body = "".join(f"<p>{p.replace(chr(10), ' ')}</p>\n" for p in text.split("\n\n"))
    return f"<html><head><title>Notes</title></head><body>\n{body}</body></html>\n"


def make_mail(kind: str, n: int, rng: random.Random) -> Mail:
    rcpt = RCPTS[n % len(RCPTS)]
    message_id = f"<scan-{n:04d}-{kind}@client.example.net>"
    msg = EmailMessage()
    msg["From"] = f"Someone <{SENDER}>"
    msg["To"] = rcpt
    msg["Subject"] = f"{rng.choice(WORDS).capitalize()} {rng.choice(WORDS)} ({n})"
    # Now: a fixed date scores with SpamAssassin's DATE_IN_PAST/FUTURE rules (3.4 points for
    # 3-6 hours ahead), and clean mail would score differently at different times of day.
    msg["Date"] = email.utils.formatdate()
    msg["Message-ID"] = message_id
    msg["X-Bench-Kind"] = kind  # read back from the delivered copy
    text = prose(rng, rng.randint(3000, 9000))
    if kind == "gtube":
        text = text.replace("\n\n", f"\n\n{GTUBE.decode()}\n\n", 1)
    msg.set_content(text)
    if kind == "html":
        msg.add_alternative(html_of(text), subtype="html")
    elif kind == "attachment":
        blob = rng.randbytes(rng.randint(4000, 20000))
        which = n % 3
        if which == 0:
            msg.add_attachment(b"%PDF-1.4\n" + blob, maintype="application", subtype="pdf",
                               filename=f"report-{n}.pdf")  # fmt: skip
        elif which == 1:
            msg.add_attachment(b"\x89PNG\r\n\x1a\n" + blob, maintype="image", subtype="png",
                               filename=f"photo-{n}.png")  # fmt: skip
        else:
            buffer = io.BytesIO()
            with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
                archive.writestr("notes/minutes.txt", prose(rng, 6000))
                archive.writestr("notes/data.bin", blob)
            msg.add_attachment(buffer.getvalue(), maintype="application", subtype="zip",
                               filename=f"notes-{n}.zip")  # fmt: skip
    elif kind == "eicar":
        msg.add_attachment(EICAR, maintype="application", subtype="octet-stream",
                           filename="eicar.bin")  # fmt: skip
    elif kind == "blocked":
        msg.add_attachment(b"MZ\x90\x00" + rng.randbytes(3000), maintype="application",
                           subtype="octet-stream", filename=f"invoice-{n}.pdf.exe")  # fmt: skip
    data = msg.as_bytes(policy=email.policy.SMTP)
    return Mail(kind, rcpt, message_id, re.sub(rb"(?m)^\.", b"..", data))


def make_mails(count: int) -> list[Mail]:
    rng = random.Random(6)
    kinds = CYCLE[:]
    rng.shuffle(kinds)
    return [make_mail(kinds[n % len(kinds)], n, rng) for n in range(count)]


def expected_code(kind: str) -> str:
    return "550" if kind in REFUSED else "250"


def native_configure(clamd_socket: Path, spamd_socket: Path) -> str:
    """exim/configure with benchmarks/exim_scan_native.conf spliced in: its main options before
    ``begin acl``, its ACLs instead of acl_check_data (and the comment above it)."""
    configure = (REPO / "exim" / "configure").read_text()
    fragment = NATIVE.read_text().replace("@@CLAMD_SOCKET@@", str(clamd_socket))
    fragment = fragment.replace("@@SPAMD_SOCKET@@", str(spamd_socket))
    main, acls = fragment.split("\nbegin acl\n", 1)
    head, rest = configure.split("\nbegin acl\n", 1)
    before, after = rest.split("\nacl_check_data:\n", 1)
    lines = before.split("\n")
    while lines and lines[-1].startswith("#"):  # the comment that explains the daemon's DATA
        lines.pop()
    tail = after[after.index("\nbegin routers\n") :]
    return (f"{head}\n\n{main.strip()}\n\nbegin acl\n" + "\n".join(lines)
            + f"\n{acls.strip()}\n\n{tail}")  # fmt: skip


def session_pids(sid: int) -> list[int]:
    """Every process of session ``sid`` (clamd and spamd run in their own, with spamd's
    children)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[3]) == sid:
                pids.append(int(stat.parent.name))
    return pids


@dataclass
class Side:
    name: str
    stack: Stack
    cpu: CpuGroup


@contextlib.contextmanager
def sides() -> Iterator[tuple[dict[str, Side], CpuGroup]]:
    """Both Exims (each with its daemon) on one clamd and one spamd; a cpuacct group for each
    Exim + daemon, and one for the scanners."""
    groups: list[CpuGroup] = []
    try:
        with Clamd() as clamd, Spamd() as spamd:
            settings: dict[str, object] = {
                "clamd_socket": str(clamd.socket), "spamd_socket": str(spamd.socket),
                "blocked_extensions": Settings().blocked_extensions,
            }  # fmt: skip
            native = native_configure(clamd.socket, spamd.socket)
            with (
                exim_stack(policy_config=settings) as ours,
                exim_stack(policy_config=settings, configure=native) as theirs,
            ):
                scanner_pids = [
                    p for s in (clamd, spamd) if s.proc for p in session_pids(s.proc.pid)
                ]
                result = {}
                for name, stack in zip(SIDES, (ours, theirs), strict=True):
                    groups.append(CpuGroup(name, [p.pid for p in stack.procs.values()]))
                    result[name] = Side(name, stack, groups[-1])
                groups.append(CpuGroup("scanners", scanner_pids))
                yield result, groups[-1]
    finally:
        for group in groups:
            group.close()


def send(side: Side, mails: list[Mail], concurrency: int) -> tuple[float, list[str]]:
    """(seconds, the reply code to each message's final dot; "error" for a failed
    transaction)."""

    def one(mail: Mail) -> str:
        try:
            return one_transaction(side.stack.smtp_port, mail.rcpt, mail.wire)[:3].decode()
        except (OSError, RuntimeError) as exc:
            print(f"  {side.name}: {mail.message_id} failed: {exc}", file=sys.stderr, flush=True)
            return "error"

    started = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        codes = list(pool.map(one, mails))
    return time.monotonic() - started, codes


def measure(side: Side, scanners: CpuGroup, mails: list[Mail], concurrency: int,
            tick: int) -> tuple[dict[str, float], list[str]]:  # fmt: skip
    policy = side.stack.procs["policy"].pid
    machine0, client0 = busy_jiffies(), time.process_time()
    stack0, scan0, policy0 = side.cpu.usage(), scanners.usage(), proc_cpu(policy)
    seconds, codes = send(side, mails, concurrency)
    settle(side.stack)  # this run's deliveries are part of its cost, not the next run's
    machine1, client1 = busy_jiffies(), time.process_time()
    stack1, scan1, policy1 = side.cpu.usage(), scanners.usage(), proc_cpu(policy)
    ms = 1000 / len(mails)

    def group_ms(a: float | None, b: float | None) -> float:
        return -1.0 if a is None or b is None else (b - a) * ms

    run = {
        "seconds": seconds, "mps": len(mails) / seconds,
        "failures": float(sum(code != expected_code(m.kind)
                              for code, m in zip(codes, mails, strict=True))),
        "stack_cpu_ms": group_ms(stack0, stack1), "scanners_cpu_ms": group_ms(scan0, scan1),
        "policy_cpu_ms": (policy1 - policy0) * ms,
        "machine_cpu_ms": (machine1[0] - machine0[0]) / tick * ms,
        "machine_busy": (machine1[0] - machine0[0]) / max(1, machine1[1] - machine0[1]),
        "client_cpu_ms": (client1 - client0) * ms,
    }  # fmt: skip
    known = run["stack_cpu_ms"] + run["scanners_cpu_ms"] + run["client_cpu_ms"]
    # CPU of everything else on the machine during the run, in cores (-1: no cgroups).
    run["other_cores"] = (
        (run["machine_cpu_ms"] - known) * len(mails) / 1000 / seconds
        if min(run["stack_cpu_ms"], run["scanners_cpu_ms"]) >= 0 else -1.0
    )  # fmt: skip
    return run, codes


def delivered(stack: Stack) -> list[dict[str, Any]]:
    """The scan headers of every message in the stack's Maildirs."""
    parser = email.parser.BytesHeaderParser(policy=email.policy.compat32)
    found = []
    for path in sorted((stack.root / "domains").glob("*/*/Maildir/new/*")):
        with path.open("rb") as f:
            headers = parser.parse(f)
        score = headers.get("X-Spam-Score")
        found.append({
            "kind": str(headers.get("X-Bench-Kind", "?")),
            "message_id": str(headers.get("Message-ID", "")),
            "flagged": headers.get("X-Spam-Flag") == "YES",
            "virus_scanned": str(headers.get("X-Virus-Scanned", "")) == f"ClamAV on {PRIMARY}",
            "spam_scanned": str(headers.get("X-Spam-Scanned", ""))
                            == f"yes (SpamAssassin on {PRIMARY})",
            "report": bool(headers.get("X-Spam-Report")),
            "score": float(score) if score is not None else None,
        })  # fmt: skip
    return found


def verdict_summary(mails: list[Mail], replies: dict[str, Counter[tuple[str, str]]],
                    copies: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:  # fmt: skip
    """Per kind and configuration: the replies, the deliveries and their headers; whether the
    two configurations agree and both gave the expected verdicts."""
    kinds = sorted({m.kind for m in mails})
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for side in SIDES:
        table[side] = {}
        for kind in kinds:
            got = [c for c in copies[side] if c["kind"] == kind]
            scores = [c["score"] for c in got if c["score"] is not None]
            table[side][kind] = {
                "replies": {code: n for (k, code), n in sorted(replies[side].items()) if k == kind},
                "delivered": len(got),
                "flagged": sum(c["flagged"] for c in got),
                "fully_scanned": sum(c["virus_scanned"] and c["spam_scanned"] and c["report"]
                                     and c["score"] is not None for c in got),
                "score_min": min(scores) if scores else None,
                "score_max": max(scores) if scores else None,
            }  # fmt: skip
    problems = []
    for kind in kinds:
        a, b = table["mailpolicy"][kind], table["native"][kind]
        for key in ("replies", "delivered", "flagged", "fully_scanned"):
            if a[key] != b[key]:
                problems.append(f"{kind}: {key} differ ({a[key]} vs {b[key]})")
        for side in SIDES:
            row = table[side][kind]
            sent = sum(row["replies"].values())
            if row["replies"] != {expected_code(kind): sent}:
                problems.append(f"{side} {kind}: replies {row['replies']}")
            want = 0 if kind in REFUSED else sent
            if row["delivered"] != want or row["fully_scanned"] != want:
                problems.append(f"{side} {kind}: {row['delivered']} delivered, "
                                f"{row['fully_scanned']} fully scanned, of {want}")  # fmt: skip
            if row["flagged"] != (want if kind == "gtube" else 0):
                problems.append(f"{side} {kind}: {row['flagged']} flagged")
    # The same message's score on each side (spamd sees Exim's mbox file on one, the daemon's
    # CRLF copy without Exim's envelope lines on the other).
    by_id: dict[str, dict[str, set[float]]] = defaultdict(lambda: defaultdict(set))
    for side in SIDES:
        for c in copies[side]:
            if c["score"] is not None:
                by_id[c["message_id"]][side].add(c["score"])
    diffs = [max(s["native"]) - max(s["mailpolicy"]) for s in by_id.values() if len(s) == 2]
    return {"by_kind": table, "problems": problems, "agree": not problems,
            "score_diff_native_minus_ours": {
                "min": min(diffs, default=0.0), "max": max(diffs, default=0.0),
                "median": statistics.median(diffs) if diffs else 0.0}}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=40, help="messages per run")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--concurrency", default="1,4", help="comma-separated")
    parser.add_argument("--quick", action="store_true", help="20 messages, 1 repeat")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "report"))
    args = parser.parse_args()
    if args.quick:
        args.messages, args.repeats = 20, 1
    levels = [int(c) for c in args.concurrency.split(",")]
    mails = make_mails(args.messages)
    tick = os.sysconf("SC_CLK_TCK")
    runs: dict[str, dict[str, list[dict[str, float]]]] = {
        str(c): {side: [] for side in SIDES} for c in levels
    }
    replies: dict[str, Counter[tuple[str, str]]] = {side: Counter() for side in SIDES}
    started = time.monotonic()
    with sides() as (stacks, scanners):
        for side in stacks.values():  # warm up: spamd's children, caches, both Exims
            _, codes = send(side, mails[:20], 2)
            replies[side.name].update((m.kind, c) for m, c in zip(mails[:20], codes, strict=True))
            settle(side.stack)
        for repeat in range(args.repeats):
            for c in levels:
                order = list(SIDES) if repeat % 2 == 0 else list(reversed(SIDES))
                for name in order:
                    run, codes = measure(stacks[name], scanners, mails, c, tick)
                    replies[name].update(
                        (m.kind, code) for m, code in zip(mails, codes, strict=True)
                    )
                    runs[str(c)][name].append(run)
                    print(f"c={c} {name:10} run {repeat}: {run['mps']:6.2f} msg/s "
                          f"({run['failures']:.0f} unexpected); CPU/msg stack "
                          f"{run['stack_cpu_ms']:.1f} ms (daemon {run['policy_cpu_ms']:.1f}), "
                          f"scanners {run['scanners_cpu_ms']:.1f} ms, other load "
                          f"{run['other_cores']:.2f} cores", flush=True)  # fmt: skip
        copies = {name: delivered(side.stack) for name, side in stacks.items()}
        left = {name: queue_size(side.stack) for name, side in stacks.items()}
    elapsed = time.monotonic() - started
    checks = verdict_summary(mails, replies, copies)
    if any(left.values()):
        checks["problems"].append(f"left on the queues: {left}")
        checks["agree"] = False
    results = summarise(runs, levels)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    mix = Counter(m.kind for m in mails)
    sizes = [len(m.wire) for m in mails]
    (out / "scan_results.json").write_text(json.dumps({
        "args": vars(args), "mix": dict(mix), "sizes": [min(sizes), max(sizes)],
        "elapsed_s": elapsed, "runs": runs, **results, "verdicts": checks,
    }, indent=2))  # fmt: skip
    (out / "SCAN.md").write_text(report(args, levels, mails, runs, results, checks, elapsed))
    ok = checks["agree"] and all(r["failures"] == 0 for lv in runs.values()
                                 for rs in lv.values() for r in rs)  # fmt: skip
    summary = ", ".join(f"c={c}: {results['ratio'][str(c)]:.2f}" for c in levels)
    print(f"ratio daemon/native {summary} ({'met' if results['met'] else 'NOT met'}); verdicts "
          f"{'agree' if checks['agree'] else 'DIFFER: ' + '; '.join(checks['problems'])}; "
          f"{elapsed:.0f} s; report in {out / 'SCAN.md'}")  # fmt: skip
    return 0 if ok else 1


def summarise(runs: dict[str, dict[str, list[dict[str, float]]]],
              levels: list[int]) -> dict[str, Any]:  # fmt: skip
    median_mps, ratio, paired, paired_median = {}, {}, {}, {}
    for c in levels:
        level = runs[str(c)]
        median_mps[str(c)] = {s: statistics.median(r["mps"] for r in level[s]) for s in SIDES}
        ratio[str(c)] = median_mps[str(c)]["mailpolicy"] / median_mps[str(c)]["native"]
        paired[str(c)] = [
            a["mps"] / b["mps"] for a, b in zip(level["mailpolicy"], level["native"], strict=True)
        ]
        paired_median[str(c)] = statistics.median(paired[str(c)])
    met = all(x >= 0.9 for x in ratio.values())
    return {"median_mps": median_mps, "ratio": ratio, "paired_ratios": paired,
            "paired_median": paired_median, "met": met}  # fmt: skip


def report(args: argparse.Namespace, levels: list[int], mails: list[Mail],
           runs: dict[str, dict[str, list[dict[str, float]]]], results: dict[str, Any],
           checks: dict[str, Any], elapsed: float) -> str:  # fmt: skip
    def med(c: int, side: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[str(c)][side])

    def cpu(c: int, side: str, key: str) -> str:
        value = med(c, side, key)
        return "n/a" if value < 0 else f"{value:.1f}"

    label = {"mailpolicy": "exim/configure + daemon", "native": "built-in (exim_scan_native.conf)"}
    rate_rows, cpu_rows = [], []
    for c in levels:
        for side in SIDES:
            each = ", ".join(f"{r['mps']:.2f}" for r in runs[str(c)][side])
            rate_rows.append(f"| {c} | {label[side]} | {results['median_mps'][str(c)][side]:.2f} "
                             f"| {each} |")  # fmt: skip
            total = med(c, side, "stack_cpu_ms") + med(c, side, "scanners_cpu_ms")
            cpu_rows.append(
                f"| {c} | {label[side]} | {cpu(c, side, 'stack_cpu_ms')} | "
                f"{cpu(c, side, 'policy_cpu_ms')} | {cpu(c, side, 'scanners_cpu_ms')} | "
                f"{total:.1f} | {cpu(c, side, 'machine_cpu_ms')} | "
                f"{100 * med(c, side, 'machine_busy'):.0f}% | {med(c, side, 'other_cores'):.2f} "
                f"({max(r['other_cores'] for r in runs[str(c)][side]):.2f}) |"
            )
    ratio_rows = [
        f"| {c} | **{results['ratio'][str(c)]:.2f}** | "
        f"{', '.join(f'{x:.2f}' for x in results['paired_ratios'][str(c)])} | "
        f"{results['paired_median'][str(c)]:.2f} | "
        f"{'met' if results['ratio'][str(c)] >= 0.9 else 'NOT met'} |"
        for c in levels
    ]
    kinds = sorted(checks["by_kind"]["mailpolicy"])
    verdict_rows = []
    for kind in kinds:
        cells = []
        for side in SIDES:
            row = checks["by_kind"][side][kind]
            replies = ", ".join(f"{n}x {code}" for code, n in row["replies"].items())
            scores = ("-" if row["score_min"] is None
                      else f"{row['score_min']:.1f} to {row['score_max']:.1f}")  # fmt: skip
            cells.append(f"{replies} | {row['delivered']} | {row['flagged']} | {scores}")
        verdict_rows.append(f"| {kind} | " + " | ".join(cells) + " |")
    mix = Counter(m.kind for m in mails)
    sizes = sorted(len(m.wire) for m in mails)
    diff = checks["score_diff_native_minus_ours"]
    same_scores = (
        "0 for every message" if diff["min"] == diff["max"] == 0
        else f"median {diff['median']:+.2f}, from {diff['min']:+.2f} to {diff['max']:+.2f}"
    )  # fmt: skip
    where_rows = []
    for c in levels:
        if med(c, "native", "stack_cpu_ms") < 0 or med(c, "native", "scanners_cpu_ms") < 0:
            continue  # no cgroups: no per-group CPU

        def parts(side: str, c: int = c) -> tuple[float, float, float]:
            daemon = med(c, side, "policy_cpu_ms")
            return (med(c, side, "stack_cpu_ms") - daemon, daemon,
                    med(c, side, "scanners_cpu_ms"))  # fmt: skip

        (exim_a, daemon_a, scan_a), (exim_b, daemon_b, scan_b) = parts(SIDES[0]), parts(SIDES[1])
        total_a, total_b = exim_a + daemon_a + scan_a, exim_b + daemon_b + scan_b
        where_rows.append(
            f"| {c} | {exim_a:.1f} / {exim_b:.1f} | {daemon_a:.1f} / {daemon_b:.1f} | "
            f"{scan_a:.1f} / {scan_b:.1f} | {total_a:.1f} / {total_b:.1f} | "
            f"{total_a - total_b:+.1f} | {total_b / total_a:.2f} | {100 * scan_b / total_b:.0f}% |"
        )
    where = "\n".join(where_rows) or "| - | no cpuacct cgroups: not measured | | | | | | |"
    problems = "".join(f"\n- {p}" for p in checks["problems"])
    return f"""# Content scanning through Exim: the daemon vs Exim's built-in conditions

Generated {time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())} by `benchmarks/scan_bench.py`
on {platform.node() or "this machine"} ({platform.machine()}, {os.cpu_count()} CPUs,
Python {platform.python_version()}), with exim/configure as of {configure_version()} and
the daemon (policy/) as of {configure_version("policy")}; {elapsed:.0f} s in all.

## Target

Messages/s through Exim scanning via the daemon >= 90% of Exim's built-in `malware`/`spam`
conditions on the same clamd and spamd: **{"met" if results["met"] else "NOT met"}**
(ratio of the median messages/s, at every concurrency measured).

| concurrency | ratio daemon / built-in | per repeat (back to back) | median of per repeat | |
|---:|---:|---|---:|---|
{chr(10).join(ratio_rows)}

Verdicts: **{"the same on both sides" if checks["agree"] else "DIFFERENT"}**{problems}

## Messages per second

{args.messages} messages per run, {args.repeats} runs per configuration and concurrency,
interleaved (the two configurations back to back, their order swapped every repeat).

| concurrency | configuration | median msg/s | runs (msg/s) |
|---:|---|---:|---|
{chr(10).join(rate_rows)}

## CPU per message

Medians over the runs, ms per message. "Exim + daemon" is a cpuacct cgroup holding that
configuration's Exim daemon and its policy daemon: every receiving and delivery process they
fork is counted. "daemon" is the policy daemon alone (the built-in side's daemon answers
CONNECT, MAIL, RCPT and the alias lookups, not DATA). "scanners" is clamd and spamd with
spamd's children (shared, but only one configuration runs at a time). "machine" is the whole
machine's busy time (/proc/stat), including the client; "other" is what the machine used
beyond these groups and the client, in cores (median, and the largest in brackets): load from
other programs, which slows the runs it falls in.

| c | configuration | Exim + daemon | daemon | scanners | sum | machine | busy | other |
|---:|---|---:|---:|---:|---:|---:|---:|---:|
{chr(10).join(cpu_rows)}

## Where the time goes

CPU per message (medians, ms), daemon side / built-in side: Exim's own processes (the stack
group minus the daemon: receiving, the DATA ACL, delivery), the policy daemon (on the built-in
side it answers only CONNECT, MAIL, RCPT and the alias lookups, so the difference is the
daemon's DATA work), clamd + spamd ("scanners share": of all, built-in side). "CPU ratio" is
built-in / daemon per message: the messages/s ratio a CPU-bound machine would give.

| c | Exim | daemon | scanners | all | extra (daemon side) | CPU ratio | scanners share |
|---:|---:|---:|---:|---:|---:|---:|---:|
{where}

SpamAssassin is nearly all of the work on both sides, so the two configurations can differ
only in the few milliseconds around it: the daemon's read of the spool file, its MIME parse
for the attachment names and its two socket round trips, against Exim's MIME ACL and its own
`malware` and `spam` calls. With one connection the machine is half idle and messages/s
follows each message's latency (spamd's 0.1 s and the hops around it); with four, both CPUs
are busy and messages/s follows CPU per message. benchmarks/README.md (section "Content
scanning through Exim") tells what an earlier version of the daemon spent here.

## Verdicts

Every message's reply to its final dot, over all runs (the warm-up too), and the delivered
copies: how many, how many flagged (`X-Spam-Flag: YES`), and their `X-Spam-Score` range. Every
delivered copy must carry `X-Virus-Scanned`, `X-Spam-Scanned: yes`, `X-Spam-Score`,
`X-Spam-Status` and `X-Spam-Report`.

| kind | daemon: replies | got | flagged | scores | built-in: replies | got | flagged | scores |
|---|---|---:|---:|---|---|---:|---:|---|
{chr(10).join(verdict_rows)}

The same message's score, built-in minus daemon: {same_scores}. spamd is not handed the same
bytes: Exim's `spam` condition sends its spool file (an mbox `From ` line,
`X-Envelope-From`/`-To`, LF line endings), the daemon the message as received plus Exim's
`Received:` (CRLF line endings).

## Method

- The mix (a cycle of 20, shuffled once), per {args.messages} messages:
  {", ".join(f"{n} {k}" for k, n in sorted(mix.items()))}; {sizes[0]} to {sizes[-1]} bytes,
  median {sizes[len(sizes) // 2]}. text: plain prose; html: the same as multipart/alternative;
  attachment: a PDF, PNG or ZIP (of a text and binary member) of 4-20 KB; gtube: GTUBE in the
  text; eicar: EICAR as a base64 attachment; blocked: an `invoice-N.pdf.exe` attachment.
- One connection per message from 127.0.0.2 (EHLO {HELO}, one recipient, rotating
  over three local users, delivered to Maildirs by appendfile), with exim_bench.py's client:
  each command in one segment, FIN right after QUIT (Exim 4.96 waits up to 200 ms for it
  otherwise). A run is timed from its first connection to its last reply; it ends when the
  queue is empty, so the deliveries are in its CPU figures.
- Both sides run exim/configure (CONNECT, MAIL, RCPT asked of their own policy daemon, aliases
  through it, the same routers and transports); only the DATA ACL differs:
  - daemon: `warn regex = ^` (Exim writes the .eml), then one `DATA` request; the daemon reads
    the file, checks attachment names (MIME parse), sends the message to clamd (INSTREAM) and
    spamd (REPORT, aiospamc), and returns the X-* headers.
  - built-in: benchmarks/exim_scan_native.conf: an `acl_smtp_mime` denying the same attachment
    extensions by `$mime_filename`, `deny malware = *` (av_scanner on clamd's Unix socket: Exim
    hands clamd the spool file's path and clamd reads the file itself), `spam = nobody:true`
    under 400 KB and unauthenticated (spamd's REPORT on its Unix socket), the same headers from
    `$spam_score`, `$spam_score_int` and `$spam_report`.
  Both defer (451) when clamd or spamd is unavailable, as the daemon's defaults do.
- clamd: tests/scan_stack.py's, the EICAR-only database (so clamd's own cost is small and the
  same for both); spamd: Debian's rules, no network tests, `--max-children=2` (what
  `mailpolicy up` runs). The daemon's settings: tests/offline.toml (no SPF, callouts, DKIM)
  plus the scanners' sockets and the default blocked extensions.
"""


if __name__ == "__main__":
    raise SystemExit(main())
