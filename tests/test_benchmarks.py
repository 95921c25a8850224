"""The benchmark harness still works: a --quick run builds the C programs, measures all three
servers and writes a report. It asserts that the report is complete, not what the figures are
(speed is judged by reading the report, never by a timed test)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

# Run alone by scripts/run-tests, before the other tests: it measures, so it wants the machine.
pytestmark = [pytest.mark.integration, pytest.mark.benchmark]


def test_quick_benchmark_writes_a_complete_report(tmp_path: Path) -> None:
    out = tmp_path / "report"
    run = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "run.py"), "--quick", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    report = (out / "REPORT.md").read_text()
    for heading in ("## Targets", "## Throughput, latency and CPU per request", "## Memory",
                    "## Reload under load"):  # fmt: skip
        assert heading in report
    for server in ("C baseline", "asyncio baseline", "mailpolicy"):
        assert f"| {server} |" in report
    assert (out / "cpu_per_request.png").stat().st_size > 1000
    results = json.loads((out / "results.json").read_text())
    assert results, "results.json is empty"
    # Every measured mailpolicy run answered every request correctly.
    assert "| 0 |" in report and " errors" in report
