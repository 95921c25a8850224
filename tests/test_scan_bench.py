"""benchmarks/scan_bench.py still works: a --quick run starts one clamd and one spamd, Exim with
exim/configure and the daemon, Exim with the built-in scanning of
benchmarks/exim_scan_native.conf, sends the same mix of messages through both and writes a
complete report. It asserts that both configurations gave the same, expected verdicts and that
the figures are there, never what they are (speed is judged by reading the report)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from policy import scanservers
from tests.conftest import REPO
from tests.exim_stack import EXIM

# Run alone by scripts/run-tests, before the other tests: it measures, so it wants the machine.
pytestmark = [
    pytest.mark.integration,
    pytest.mark.benchmark,
    pytest.mark.skipif(
        not all(shutil.which(p) for p in (EXIM, scanservers.CLAMD, scanservers.SPAMD)),
        reason="needs exim, clamd and spamd (scripts/debian-packages.txt)",
    ),
]

KINDS = {"text", "html", "attachment", "gtube", "eicar", "blocked"}


def test_quick_scan_benchmark_writes_a_complete_report(tmp_path: Path) -> None:
    out = tmp_path / "report"
    run = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "scan_bench.py"), "--quick", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = (out / "SCAN.md").read_text()
    for heading in ("## Target", "## Messages per second", "## CPU per message",
                    "## Where the time goes", "## Verdicts", "## Method"):  # fmt: skip
        assert heading in report, heading
    assert "Verdicts: **the same on both sides**" in report
    results = json.loads((out / "scan_results.json").read_text())
    checks = results["verdicts"]
    assert checks["agree"] and checks["problems"] == [], checks["problems"]
    for side in ("mailpolicy", "native"):
        by_kind = checks["by_kind"][side]
        assert set(by_kind) == KINDS
        for kind in ("eicar", "blocked"):  # refused at the end of DATA, never delivered
            assert set(by_kind[kind]["replies"]) == {"550"} and by_kind[kind]["delivered"] == 0
        gtube = by_kind["gtube"]
        assert gtube["delivered"] > 0 and gtube["flagged"] == gtube["delivered"]
        for kind in ("text", "html", "attachment"):
            row = by_kind[kind]
            assert set(row["replies"]) == {"250"}
            assert row["delivered"] == row["replies"]["250"] == row["fully_scanned"]
            assert row["flagged"] == 0
    for c in ("1", "4"):
        assert results["ratio"][c] > 0
        assert results["paired_ratios"][c] and all(x > 0 for x in results["paired_ratios"][c])
        for side in ("mailpolicy", "native"):
            assert results["median_mps"][c][side] > 0
            assert all(r["failures"] == 0 for r in results["runs"][c][side])
