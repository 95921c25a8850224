"""README command (1), scripts/run-example, as an admin runs it: it sets up, brings up the stack
(policy daemon, Dovecot, Exim, clamd with the EICAR-only examples/clamav-db, spamd, loopback
sink) on the example tree; the first swaks command it prints delivers a message to alice (Exim
-> LMTP -> Dovecot), the second submits one as alice with AUTH over TLS and it is relayed to the
sink; alice reads her mail over IMAPS. Through the printed SMTP port EICAR is refused (550,
naming the signature) and GTUBE lands in alice's Spam mailbox. Ctrl-C (SIGINT) stops everything
it started, clamd and spamd's children included."""

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

from policy import settings as settings_mod
from policy import up as up_mod
from tests.conftest import REPO
from tests.scan_stack import EICAR, GTUBE, write_clamav_db

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
        state = short_dir / "state"
        # The scanners it runs, and with what.
        (clamd_line,) = [ln for ln in lines if ln.strip().startswith("clamd ")]
        assert f"{state}/clamd.sock" in clamd_line
        assert f"test.hdb, test.ndb in {REPO}/examples/clamav-db" in clamd_line, clamd_line
        assert "EICAR-only test database: not protection" in clamd_line
        (spamd_line,) = [ln for ln in lines if ln.strip().startswith("spamd ")]
        assert f"{state}/spamd.sock" in spamd_line and "dns_available no" in spamd_line
        settings = (state / "mailpolicy.toml").read_text()
        assert f'clamd_socket = "{state}/clamd.sock"' in settings
        assert f'spamd_socket = "{state}/spamd.sock"' in settings
        scanner_pids = running_scanners(state)
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
        # A virus through the printed SMTP port: refused at the end of DATA, naming it.
        (short_dir / "eicar.txt").write_bytes(EICAR)
        sent = subprocess.run([*shlex.split(swaks[0]), "--attach-name", "eicar.txt", "--attach",
                               f"@{short_dir / 'eicar.txt'}"],
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        assert sent.returncode != 0
        assert "<** 550 5.7.0 virus found: Test.EICAR-NDB.UNOFFICIAL" in sent.stdout, sent.stdout
        # Spam: flagged and filed into alice's Spam mailbox by Dovecot's shipped sieve script.
        (short_dir / "gtube.txt").write_bytes(b"Buy now!\n" + GTUBE + b"\n")
        spam_before = set((inbox / ".Spam" / "new").glob("*"))
        sent = subprocess.run([*shlex.split(swaks[0]), "--header", "Subject: quickspam",
                               "--body", f"@{short_dir / 'gtube.txt'}"],
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        assert sent.returncode == 0, sent.stdout + sent.stderr
        spam = inbox / ".Spam" / "new"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not set(spam.glob("*")) - spam_before:
            time.sleep(0.05)
        (filed,) = [p.read_bytes() for p in set(spam.glob("*")) - spam_before]
        assert b"Subject: quickspam" in filed and b"\nX-Spam-Flag: YES\n" in filed
        # alice reads her mail over IMAPS (Dovecot, logins through the daemon).
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        with imaplib.IMAP4_SSL("127.0.0.1", OFFSET + 993, ssl_context=context) as imap:
            imap.login("alice@example.org", "alice-secret")
            imap.select("INBOX")
            assert imap.search(None, "SUBJECT", "quickstart")[1][0]
            imap.select("Spam")
            assert imap.search(None, "SUBJECT", "quickspam")[1][0]
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(30)
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    # Everything it started is gone: spamd's children too (their command line is "spamd child").
    left = subprocess.run(["pgrep", "-f", str(short_dir / "state")], capture_output=True, text=True)
    assert left.stdout == ""
    assert [pid for pid in scanner_pids if Path(f"/proc/{pid}").exists()] == []


def running_scanners(state: Path) -> list[int]:
    """clamd's and spamd's process ids (spamd's children included), from their pid files."""
    pids = []
    for name in ("clamd", "spamd"):
        pid = int((state / name / f"{name}.pid").read_text().split()[0])
        assert Path(f"/proc/{pid}").exists(), name
        pids.append(pid)
        children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
        pids += [int(p) for p in children.stdout.split()]
    assert len(pids) >= 3  # clamd, spamd and at least one spamd child (--min-children=1)
    return pids


def test_clamd_runs_only_with_a_database(short_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --clamav-db: /var/lib/clamav if it holds a database, else no clamd (said so, and
    clamd_socket = ""); a directory given explicitly must hold one."""
    empty = short_dir / "empty"
    empty.mkdir()
    monkeypatch.setattr(up_mod, "DEFAULT_CLAMAV_DB", empty)
    plan = up_mod.plan_scanners(None)
    assert plan.clamav_db is None
    assert plan.clamd_note.startswith(f"not started: no ClamAV database in {empty} ")
    assert "virus scanning is off" in plan.clamd_note
    assert plan.spamd  # installed here (scripts/debian-packages.txt)
    with pytest.raises(up_mod.UpError, match="no ClamAV database there"):
        up_mod.plan_scanners(str(empty))
    (empty / "notes.txt").write_text("not a database\n")
    assert up_mod.plan_scanners(None).clamav_db is None
    monkeypatch.setattr(up_mod, "DEFAULT_CLAMAV_DB", write_clamav_db(short_dir / "db"))
    assert up_mod.plan_scanners(None).clamav_db == short_dir / "db"
    assert up_mod.plan_scanners(str(REPO / "examples" / "clamav-db")).clamav_db == (
        REPO / "examples" / "clamav-db"
    )
    # The daemon's settings: the scanners up did not start are off.
    text = up_mod.daemon_settings("example.org", None, None)
    settings = load_settings_text(short_dir, text)
    assert settings.clamd_socket == "" and settings.spamd_socket == ""
    assert settings.spamd_host == ""
    text = up_mod.daemon_settings("example.org", short_dir / "c.sock", short_dir / "s.sock")
    settings = load_settings_text(short_dir, text)
    assert settings.clamd_socket == str(short_dir / "c.sock")
    assert settings.spamd_socket == str(short_dir / "s.sock")
    assert (settings.spf_enabled, settings.auth_default_realm) == (False, "example.org")


def load_settings_text(directory: Path, text: str) -> settings_mod.Settings:
    path = directory / "settings.toml"
    path.write_text(text)
    return settings_mod.load(str(path))


def test_shipped_clamav_db_is_the_test_database(short_dir: Path) -> None:
    """examples/clamav-db holds exactly what tests/scan_stack.py writes: EICAR only."""
    written = write_clamav_db(short_dir / "db")
    shipped = REPO / "examples" / "clamav-db"
    for name in ("test.hdb", "test.ndb"):
        assert (shipped / name).read_text() == (written / name).read_text()
    assert sorted(p.name for p in shipped.iterdir()) == ["README.md", "test.hdb", "test.ndb"]
    assert "not protection" in (shipped / "README.md").read_text()
