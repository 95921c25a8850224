"""README command (1), scripts/run-example, as an admin runs it: it sets up, brings up the stack
(policy daemon, Dovecot, Exim, loopback sink) on the example tree; the first swaks command it
prints delivers a message to alice (Exim -> LMTP -> Dovecot), the second submits one as alice
with AUTH over TLS and it is relayed to the sink; alice reads her mail over IMAPS. Ctrl-C
(SIGINT) stops everything it started."""

from __future__ import annotations

import imaplib
import os
import shlex
import signal
import ssl
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
        assert len(swaks) == 2, lines
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
        # The submission command: AUTH over TLS on 587, relayed to the loopback sink.
        assert f"--server 127.0.0.1:{OFFSET + 587} " in swaks[1] and "--tls" in swaks[1]
        sent = subprocess.run([*shlex.split(swaks[1]), "--header", "Subject: submitted"],
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        assert sent.returncode == 0, sent.stdout + sent.stderr
        assert "235 Authentication succeeded" in sent.stdout
        sink = short_dir / "state" / "sink"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not list(sink.glob("*.eml")):
            time.sleep(0.05)
        (kept,) = sink.glob("*.eml")
        assert b"Subject: submitted" in kept.read_bytes()
        # alice reads her mail over IMAPS (Dovecot, logins through the daemon).
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        with imaplib.IMAP4_SSL("127.0.0.1", OFFSET + 993, ssl_context=context) as imap:
            imap.login("alice@example.org", "alice-secret")
            imap.select("INBOX")
            assert imap.search(None, "SUBJECT", "quickstart")[1][0]
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(30)
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    # Everything it started is gone.
    left = subprocess.run(["pgrep", "-f", str(short_dir / "state")], capture_output=True, text=True)
    assert left.stdout == ""
