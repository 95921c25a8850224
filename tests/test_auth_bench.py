"""benchmarks/auth_bench.py still works: a --quick run starts the five Dovecot instances (Lua,
checkpassword, passwd-file, and the two cached ones), logs in through every path with every
scheme and writes a complete report. It asserts that the report is complete and that every
login succeeded, never what the figures are (speed is judged by reading the report)."""

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

PATHS = ("lua", "checkpassword", "passwd-file")
SCHEMES = ("SHA512-CRYPT", "ARGON2ID", "PLAIN")


def test_quick_auth_benchmark_writes_a_complete_report(tmp_path: Path) -> None:
    out = tmp_path / "report"
    run = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "auth_bench.py"), "--quick", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = (out / "AUTH.md").read_text()
    for heading in ("## Targets", "## Logins per second", "## Single-client latency",
                    "## Where the time goes", "### Hash verification alone",
                    "### The daemon's round trip", "### Process start-up",
                    "### CPU per login, by process group", "## Cached logins", "## Checks",
                    "## Method"):  # fmt: skip
        assert heading in report, heading
    for scheme in SCHEMES:  # each scheme's table has a row for every path and client count
        assert f"### {scheme}\n" in report, scheme
        section = report.split(f"### {scheme}\n", 1)[1].split("\n#", 1)[0]
        for path in PATHS:
            for clients in (1, 8):
                assert re.search(rf"^\| {re.escape(path)} \| {clients} \| [0-9.]+ \|", section,
                                 re.M), (scheme, path, clients)  # fmt: skip
    for target in ("Lua passdb >= 80% of passwd-file", "checkpassword hook overhead",
                   "hook start-up"):  # fmt: skip
        assert target in report
    assert "INVALID" not in report
    assert "(0 failed)" in report
    results = json.loads((out / "auth_results.json").read_text())
    runs = results["runs"]
    for scheme in SCHEMES:
        for path in PATHS:
            for clients in (1, 8):
                measured = runs[f"{path}|{scheme}|{clients}"]
                assert measured and all(r["logins"] > 0 for r in measured)
    assert all(r["failures"] == 0 for rs in runs.values() for r in rs)
    for counts in results["daemon_logs"].values():
        assert counts["not OK"] == 0 and counts["throttled"] == 0, counts
    assert set(results["hook"]) >= {"python3 -I -S -c pass", "hook, failing at once"}
