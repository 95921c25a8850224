"""benchmarks/backup_bench.py still works: a --quick run generates a small mail tree, times
`mailpolicy backup run` (to file:// and to moto's S3 server on loopback), the baseline
`tar -cz | openssl enc` and an increment, measures the pieces, checks the backups (verify, a
restore equal to the tree, the baseline's file decrypts to the same files, gzip -6 on both
sides) and writes a complete report. It asserts that the report is complete and the checks
passed, never what the figures are (speed is judged by reading the report)."""

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

VARIANTS = ("ours", "baseline", "ours-s3", "increment")
PARTS = ("baseline pipeline, again", "tar", "tar per archive", "tar --gzip per archive",
         "gzip -6", "gzip -1", "openssl enc", "ours: AES-CBC + HMAC", "ours: AES-CBC alone",
         "ours: HMAC-SHA256 alone", "ours: store copy", "start-up: tar --gzip per archive",
         "start-up: python -m policy backup run")  # fmt: skip


def test_quick_backup_benchmark_writes_a_complete_report(tmp_path: Path) -> None:
    out = tmp_path / "report"
    bench = REPO / "benchmarks" / "backup_bench.py"
    run = subprocess.run([sys.executable, str(bench), "--quick", "--out", str(out)], cwd=REPO,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = (out / "BACKUP.md").read_text()
    for heading in ("## Target", "## The tree", "## Full backups", "## Increment",
                    "## Where the time goes", "## Checks", "## Method", "## Noise"):  # fmt: skip
        assert f"\n{heading}" in report, heading
    assert re.search(r"Target >= 0\.80: \*\*(met|NOT met)\*\*", report)
    assert "Checks (below): all passed" in report
    for label in ("a full set to file://", "tar -cz \\| openssl enc", "a full set to S3"):
        assert re.search(rf"^\| [^|]*{re.escape(label)}[^|]* \| [0-9.]+ \| [0-9.]+ \|", report,
                         re.M), label  # fmt: skip
    assert re.search(r"^\| 0 \| \d+ \(\d+ new, .*\| [0-9.]+ \| [0-9.]+ \|", report, re.M)
    for part in PARTS:
        assert re.search(rf"^\| {re.escape(part)} \| [0-9.]+ \| [0-9.]+ \|", report, re.M), part
    for phase in ("the whole run", "archive.create", "store puts", "the rest"):
        assert re.search(rf"^\| ours, in-process: {re.escape(phase)} \| [0-9.-]+ \| - \|", report,
                         re.M), phase  # fmt: skip
    assert "matches gzip -6" in report and "DIFFERENT" not in report
    assert "nan" not in report
    results = json.loads((out / "backup_results.json").read_text())
    for variant in VARIANTS:
        runs = results["runs"][variant]
        assert len(runs) == results["profile"]["repeats"], variant
        assert all(r["wall"] > 0 and r["source_bytes"] > 0 and r["out_bytes"] > 0 for r in runs)
    assert all(r["server_cpu"] >= 0 for r in results["runs"]["ours-s3"])
    checks = results["checks"]
    assert checks["verify_status"] == 0 and checks["restore_status"] == 0
    assert checks["restored_equal"] and checks["restored_files"] == checks["tree_files"]
    assert checks["baseline_files"] == checks["source_files"] > 0
    assert results["verdict"] in ("met", "NOT met")
    assert set(results["parts"]) >= set(PARTS)
