"""benchmarks/sender_bench.py still works: a --quick run starts NSD, the MX peers and the four
daemons, measures cached MAIL against relay RCPT and the 100 slow sender domains, and writes a
complete report. It asserts that the report is complete and that every request got the
expected reply, never what the figures are (speed is judged by reading the report)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

# Run alone by scripts/run-tests, before the other tests: it measures, so it wants the machine.
pytestmark = [pytest.mark.integration, pytest.mark.benchmark]

DAEMONS = ("verify", "verify+spf", "hol-raised", "hol-default")
KINDS = ("relay RCPT", "cached MAIL")
PATTERNS = ("burst", "arrivals")


def test_quick_sender_benchmark_writes_a_complete_report(tmp_path: Path) -> None:
    out = tmp_path / "report"
    run = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "sender_bench.py"), "--quick", "--out",
         str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = (out / "SENDER.md").read_text()
    for heading in ("## Targets", "## Where the time goes", "## Part 1: cached sender-verify",
                    "## Part 2: 100 slow sender domains", "### The probe",
                    "## Request paths, piece by piece", "## Checks", "## Method"):  # fmt: skip
        assert heading in report, heading
    for target in ("cached sender-verify MAIL within 20%", "no head-of-line blocking",
                   "a cheap request (relay RCPT)", "shipped etiquette caps"):  # fmt: skip
        assert target in report, target
    for daemon in ("verify", "verify+spf"):  # a row per request kind and client count
        section = report.split(f"### `{daemon}`", 1)[1].split("\n#", 1)[0]
        for kind in KINDS:
            for clients in (1, 16):
                assert re.search(rf"^\| {kind} \| {clients} \| [0-9]+ \|", section, re.M), (
                    daemon, kind, clients)  # fmt: skip
    for daemon in ("hol-raised", "hol-default"):
        for pattern in PATTERNS:
            assert re.search(rf"^\| {daemon} \| [^|]+ \| [0-9.]+ \| {pattern} \| [0-9.]+ \|",
                             report, re.M), (daemon, pattern)  # fmt: skip
    assert "INVALID" not in report
    assert "(0 failed)" in report

    results = json.loads((out / "sender_results.json").read_text())
    part1 = results["part1"]
    for daemon in ("verify", "verify+spf"):
        for kind in KINDS:
            for clients in (1, 16):
                runs = part1[f"{daemon}|{kind}|{clients}"]
                assert runs and all(r["count"] > 0 and r["errors"] == 0 for r in runs)
    assert results["part1_callouts_during"] == 0  # every measured MAIL was a cache hit
    part2 = results["part2"]
    assert {(r["daemon"], r["pattern"]) for r in part2} == {
        (d, p) for d in ("hol-raised", "hol-default") for p in PATTERNS}  # fmt: skip
    for r in part2:
        assert r["requests"] == 100 and r["failures"] == 0, r["daemon"]
        assert r["peer_connections"] == 100  # one cold callout per MAIL
        assert r["probe"]["failures"] == 0
    assert sum(r["probe"]["n"] for r in part2) > 0
    for name, counts in results["logs"].items():
        assert counts["other"] == 0, (name, counts)  # nothing but accepts
    assert set(DAEMONS) == set(results["logs"])
