"""A real Dovecot 2.3 on loopback running the project's dovecot/dovecot.conf (rendered by
policy.render.render_dovecot), with dovecot/mailpolicy-auth.lua or hooks/checkpassword asking
the policy daemon over its auth socket, on a copy of examples/srv-mail. Started from a
temporary directory (RECIPES.md section 5); nothing listens beyond 127.0.0.1.

The policy daemon serves both its sockets: Exim's, and the auth socket the Lua script or the
hook asks (group dovecot). Neither is given the socket: both find it only through
``MAILPOLICY_AUTH_SOCKET`` from dovecot.conf's import_environment, so every login tests that.
"""

from __future__ import annotations

import contextlib
import imaplib
import os
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from policy import settings as settings_mod
from policy.render import DovecotSite, EximSite, exim_timeouts, render_dovecot, render_exim
from tests.conftest import OFFLINE, REPO, copy_example, offline_settings, wait_for_ping
from tests.exim_stack import PRIMARY, TLS_NAMES, Sink, Stack, free_port, make_cert, write_toml

DOVECOT = shutil.which("dovecot") or "/usr/sbin/dovecot"
DOVEADM = shutil.which("doveadm") or "/usr/bin/doveadm"
DOVECONF = shutil.which("doveconf") or "/usr/bin/doveconf"


@dataclass
class DovecotStack:
    base: Path
    root: Path
    conf: Path
    site: DovecotSite
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    # The daemon's configuration file (tests/offline.toml unless dovecot_stack got
    # policy_config); restart_policy() can change it.
    policy_config: Path = OFFLINE

    @property
    def imap_port(self) -> int:
        return self.site.imap_port

    @property
    def imaps_port(self) -> int:
        return self.site.imaps_port

    @property
    def sieve_port(self) -> int:
        return self.site.sieve_port

    # --- processes ----------------------------------------------------------------------

    def start_policy(self) -> None:
        """The policy daemon with its Exim socket and (once it has one) its auth socket."""
        log = self.base / "policy.log"
        args = [sys.executable, "-m", "policy", "serve", "--root", str(self.root),
                "--socket", str(self.base / "policy.sock"), "--socket-group", "Debian-exim",
                "--log-file", str(log), "--primary-hostname", PRIMARY,
                "--config", str(self.policy_config)]  # fmt: skip
        args += ["--auth-socket", self.site.auth_socket, "--auth-socket-group", "dovecot"]
        proc = subprocess.Popen(args, cwd=REPO)
        self.procs["policy"] = proc
        wait_for_ping(self.base / "policy.sock", proc)

    def start_dovecot(self) -> None:
        check = subprocess.run([DOVECONF, "-c", str(self.conf), "-n"], capture_output=True,
                               text=True)  # fmt: skip
        if check.returncode != 0:
            raise RuntimeError(f"doveconf failed: {check.stderr}")
        started = time.monotonic()
        with (self.base / "log" / "dovecot.stderr").open("ab") as err:
            proc = subprocess.Popen([DOVECOT, "-F", "-c", str(self.conf)], stderr=err)
        self.procs["dovecot"] = proc
        deadline = started + 15
        lmtp = Path(self.site.lmtp_socket)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            if lmtp.exists() and Path(self.site.auth_client_socket).exists():
                with (
                    contextlib.suppress(OSError),
                    socket.create_connection(("127.0.0.1", self.imap_port), timeout=1) as s,
                ):
                    if s.recv(512).startswith(b"* OK"):
                        self.timings["dovecot_start"] = time.monotonic() - started
                        return
            time.sleep(0.02)
        raise RuntimeError(f"Dovecot did not start: {self.log()}")

    def stop_policy(self) -> None:
        proc = self.procs.pop("policy", None)
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(15)

    def restart_policy(self, policy_config: dict[str, object] | None = None) -> None:
        """The daemon again, with ``policy_config`` over tests/offline.toml's settings (None:
        offline.toml's alone), written to <base>/policy-<n>.toml. Exim's readsocket timeouts
        stay what exim_for rendered: keep mail_deadline and data_deadline as they were."""
        self.stop_policy()
        if policy_config is None:
            self.policy_config = OFFLINE
        else:
            n = len(list(self.base.glob("policy-*.toml")))
            self.policy_config = write_toml(self.base / f"policy-{n}.toml",
                                            {**offline_settings(), **policy_config})  # fmt: skip
        self.start_policy()

    def stop_dovecot(self) -> None:
        proc = self.procs.pop("dovecot", None)
        if proc is None or proc.poll() is not None:
            return
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)  # more than 1 s, up to 2.8 s measured (RECIPES.md)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        self.timings["dovecot_stop"] = time.monotonic() - started

    def stop(self) -> None:
        self.stop_dovecot()
        for name in list(self.procs):
            proc = self.procs.pop(name)
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()

    def policy_log(self) -> str:
        path = self.base / "policy.log"
        return path.read_text() if path.exists() else ""

    def log(self) -> str:
        path = self.base / "log" / "dovecot.log"
        return path.read_text() if path.exists() else ""

    def doveadm(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([DOVEADM, "-c", str(self.conf), *args], capture_output=True,
                              text=True)  # fmt: skip

    def rerender(self) -> None:
        self.conf.write_text(render_dovecot(self.site))

    # --- clients ------------------------------------------------------------------------

    @staticmethod
    def client_context() -> ssl.SSLContext:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context

    def imaps(self) -> imaplib.IMAP4_SSL:
        return imaplib.IMAP4_SSL("127.0.0.1", self.imaps_port, ssl_context=self.client_context(),
                                 timeout=30)  # fmt: skip

    def imap_starttls(self) -> imaplib.IMAP4:
        client = imaplib.IMAP4("127.0.0.1", self.imap_port, timeout=30)
        client.starttls(ssl_context=self.client_context())
        return client

    def lmtp(self, sender: str, rcpts: list[str], data: bytes) -> dict[str, tuple[int, bytes]]:
        """Deliver over the LMTP socket, as Exim's lmtp transport will."""
        client = smtplib.LMTP(self.site.lmtp_socket)
        try:
            client.ehlo("exim.test")
            return client.sendmail(sender, rcpts, data)
        finally:
            client.quit()


@contextlib.contextmanager
def dovecot_stack(
    qualify_domain: str = "example.org",
    auth_path: str = "lua",
    root: Path | None = None,
    policy_config: dict[str, object] | None = None,
) -> Iterator[DovecotStack]:
    """Dovecot (and the policy daemon) on a copy of examples/srv-mail, or on a copy of
    ``root``; logins by ``auth_path`` ("lua" or "checkpassword"). ``policy_config``: daemon
    settings over tests/offline.toml's (e.g. the scanners' sockets), written to
    <base>/policy.toml; exim_for renders Exim's readsocket timeouts from them."""
    base = Path(tempfile.mkdtemp(prefix="dv.", dir="/tmp"))
    os.chmod(base, 0o755)  # dovecot and Debian-exim must traverse it
    srv = base / "srv"
    root = copy_example(srv) if root is None else Path(shutil.copytree(root, srv))
    for name in TLS_NAMES:
        make_cert(root, name)
    (root / "domains").mkdir(parents=True, exist_ok=True)
    shutil.chown(root / "domains", "Debian-exim", "Debian-exim")
    for sub in ("run", "state", "log"):
        (base / sub).mkdir()
    site = DovecotSite(
        root=str(root), primary_hostname=PRIMARY, qualify_domain=qualify_domain,
        base_dir=str(base / "run"), state_dir=str(base / "state"), log_dir=str(base / "log"),
        instance_name=f"dovecot-{base.name}", auth_socket=str(base / "auth.sock"),
        lmtp_socket=str(base / "run" / "exim-lmtp"),
        auth_client_socket=str(base / "run" / "exim-auth"),
        interfaces=("127.0.0.1",), imap_port=free_port(), imaps_port=free_port(),
        sieve_port=free_port(), auth_failure_delay="0", auth_path=auth_path,
    )  # fmt: skip
    stack = DovecotStack(base, root, base / "dovecot.conf", site)
    stack.rerender()
    try:
        if policy_config is not None:
            stack.policy_config = write_toml(base / "policy.toml",
                                             {**offline_settings(), **policy_config})  # fmt: skip
        stack.start_policy()
        stack.start_dovecot()
        yield stack
    finally:
        stack.stop()
        shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def exim_for(dv: DovecotStack, relay_from: tuple[str, ...] = ()) -> Iterator[Stack]:
    """The real Exim with exim/configure in front of this Dovecot: local users delivered over
    its LMTP socket, SMTP AUTH through its auth-client socket, the same policy daemon, and a
    loopback sink for every other domain."""
    from aiosmtpd.controller import Controller

    logs = dv.base / "exim-log"
    logs.mkdir(exist_ok=True)
    spool = dv.root / "exim" / "spool"
    spool.mkdir(parents=True, exist_ok=True)
    for d in (logs, spool):
        shutil.chown(d, "Debian-exim", "Debian-exim")
    if relay_from:
        with (dv.root / "exim" / "conf" / "relay_from_hosts").open("a") as f:
            f.write("".join(f"{ip}\n" for ip in relay_from))
    sink = Sink()
    sink_port = free_port()
    controller = Controller(sink, hostname="127.0.0.1", port=sink_port)
    controller.start()
    exim = Stack(dv.base, dv.root, dv.base / "exim.conf", free_port(), free_port(),
                 dv.base / "policy.sock", sink, log_dir=logs)  # fmt: skip
    timeouts = exim_timeouts(settings_mod.load(str(dv.policy_config)))
    exim.conf.write_text(render_exim(EximSite(
        root=str(dv.root), policy_socket=str(exim.policy_socket), primary_hostname=PRIMARY,
        qualify_domain="example.org", log_dir=str(logs), smtp_port=exim.smtp_port,
        submission_port=exim.submission_port, interfaces=("127.0.0.1",), sink_port=sink_port,
        lmtp_socket=dv.site.lmtp_socket, dovecot_auth_socket=dv.site.auth_client_socket,
        mail_timeout=timeouts["mail_timeout"], data_timeout=timeouts["data_timeout"],
    )))  # fmt: skip
    try:
        exim.start_exim()
        yield exim
    finally:
        exim.stop()
        controller.stop()
