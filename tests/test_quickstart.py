"""README command (1), scripts/run-example, as an admin runs it: it sets up, brings up the stack
(policy daemon, Exim, loopback sink) on the example tree, and the swaks command it prints
delivers a message. Ctrl-C (SIGINT) stops everything it started."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.integration

OFFSET = 20000  # not the README's 10000: a developer's own `mailpolicy up` may hold those


def test_run_example_brings_up_the_stack_and_its_swaks_command_delivers(short_dir: Path) -> None:
    env = {**os.environ, "MAILPOLICY_STATE_DIR": str(short_dir / "state")}
    proc = subprocess.Popen(
        [str(REPO / "scripts" / "run-example"), "--port-offset", str(OFFSET)], cwd=REPO, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 180  # a first run may install packages
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                pytest.fail(f"run-example ended early: {''.join(lines)}{proc.stderr.read()}")  # type: ignore[union-attr]
            lines.append(line)
            if line.startswith("Ctrl-C stops everything"):
                break
        swaks = [ln.strip() for ln in lines if ln.strip().startswith("swaks ")]
        assert len(swaks) == 1, lines
        assert f"--server 127.0.0.1:{OFFSET + 25} " in swaks[0]
        inbox = REPO / "examples" / "srv-mail" / "domains" / "example.org" / "alice" / "Maildir"
        before = set((inbox / "new").iterdir()) if (inbox / "new").is_dir() else set()
        sent = subprocess.run([*shlex.split(swaks[0]), "--header", "Subject: quickstart"],
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        assert sent.returncode == 0, sent.stdout + sent.stderr
        assert "<-  250 OK id=" in sent.stdout
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not set((inbox / "new").iterdir()) - before:
            time.sleep(0.05)
        new = set((inbox / "new").iterdir()) - before
        assert len(new) == 1
        assert b"Subject: quickstart" in new.pop().read_bytes()
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(30)
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    # Everything it started is gone.
    left = subprocess.run(["pgrep", "-f", str(short_dir / "state")], capture_output=True, text=True)
    assert left.stdout == ""
