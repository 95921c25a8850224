"""README command (1), scripts/run-example, as an admin runs it: it sets up, prints how to query,
and serves the example tree; the printed commands work."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, ask

pytestmark = pytest.mark.integration


def test_run_example_serves_and_its_printed_commands_work(short_dir: Path) -> None:
    env = {**os.environ, "MAILPOLICY_EXAMPLE_DIR": str(short_dir)}
    proc = subprocess.Popen(
        [str(REPO / "scripts" / "run-example")],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    sock = short_dir / "policy.sock"
    try:
        deadline = time.monotonic() + 120  # a first run may install packages
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if ask(sock, b"PING\n", 1).startswith(b"PONG"):
                    break
            except OSError:
                time.sleep(0.1)
        else:
            pytest.fail(f"run-example did not serve: {proc.communicate(timeout=5)}")
        os.killpg(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=15)
        assert proc.returncode == 0, err
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    commands = [ln.strip() for ln in out.splitlines() if ln.strip().startswith(".venv/bin/")]
    assert len(commands) >= 5, out
    # Run the printed commands against a fresh daemon on the same socket.
    serve = subprocess.Popen(
        [
            str(REPO / ".venv/bin/mailpolicy"),
            "serve",
            "--root",
            "examples/srv-mail",
            "--socket",
            str(sock),
            "--primary-hostname",
            "mail.example.org",
        ],
        cwd=REPO,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            try:
                ask(sock, b"PING\n", 1)
                break
            except OSError:
                time.sleep(0.05)
        outputs = [
            subprocess.run(shlex.split(c), cwd=REPO, capture_output=True, text=True)
            for c in commands
        ]
    finally:
        serve.terminate()
        serve.wait(10)
    replies = "\n".join(o.stdout for o in outputs)
    assert "PONG mailpolicy" in replies
    assert "ACCEPT 250 2.1.5" in replies
    assert "DENY 550 5.1.1 <nobody@example.org>" in replies
    assert "DENY 550 5.7.1 relay not permitted" in replies
    assert "FOUND alice@example.org,bob@example.org" in replies
    assert "verdict: accept 250 2.1.5 ok" in replies
    assert "0 errors" in replies
