"""A real Exim 4.96 daemon on loopback running the project's exim/configure, with the policy
daemon, a Maildir tree and an aiosmtpd sink for everything non-local. Started by the tests from
a temporary directory (RECIPES.md sections 2-3); nothing listens beyond 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import Envelope, Session

from policy import settings as settings_mod
from policy.render import EximSite, exim_timeouts, render, render_exim
from policy.up import make_certificate
from tests.conftest import OFFLINE, REPO, copy_example, offline_settings, wait_for_ping

EXIM = shutil.which("exim") or shutil.which("exim4") or "exim"
PRIMARY = "mail.example.org"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_toml(path: Path, settings: dict[str, object]) -> Path:
    """``settings`` (str, bool, int and float values) as a daemon configuration file."""
    lines = []
    for key, value in settings.items():
        if isinstance(value, bool):
            text = str(value).lower()
        elif isinstance(value, str):
            text = json.dumps(value)  # a TOML basic string
        elif isinstance(value, int | float):
            text = repr(value)
        else:
            raise TypeError(f"{key}: cannot write a {type(value).__name__} as a setting")
        lines.append(f"{key} = {text}\n")
    path.write_text("".join(lines))
    return path


class Sink:
    """The remote world: an aiosmtpd server that keeps what it is given."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], bytes]] = []

    async def handle_DATA(self, server: object, session: Session, envelope: Envelope) -> str:
        content = envelope.content if isinstance(envelope.content, bytes) else b""
        self.messages.append((str(envelope.mail_from), list(envelope.rcpt_tos), content))
        return "250 2.0.0 kept"


@dataclass
class Stack:
    base: Path
    root: Path
    conf: Path
    smtp_port: int
    submission_port: int
    policy_socket: Path
    sink: Sink
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    log_dir: Path | None = None  # Exim's logs: <base>/log unless given
    # The daemon's configuration file (tests/offline.toml unless exim_stack got policy_config).
    policy_config: Path = OFFLINE

    @property
    def logs(self) -> Path:
        return self.log_dir or self.base / "log"

    # --- the policy daemon --------------------------------------------------------------

    def start_policy(self) -> None:
        """The daemon with ``policy_config``: a restart keeps the settings Exim's configuration
        was rendered for."""
        log = self.base / "policy.log"
        proc = subprocess.Popen(
            [sys.executable, "-m", "policy", "serve", "--root", str(self.root), "--socket",
             str(self.policy_socket), "--socket-group", "Debian-exim", "--log-file", str(log),
             "--primary-hostname", PRIMARY, "--config", str(self.policy_config)],
            cwd=REPO,
        )  # fmt: skip
        self.procs["policy"] = proc
        wait_for_ping(self.policy_socket, proc)

    def stop_policy(self) -> None:
        proc = self.procs.pop("policy", None)
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(15)

    # --- Exim ---------------------------------------------------------------------------

    def start_exim(self) -> None:
        # stderr to a file: Exim says "exim user lost privilege for using -C option" at every
        # queue run (expected: the transports run as Debian-exim, RECIPES.md section 2).
        with (self.logs / "exim.stderr").open("ab") as err:
            proc = subprocess.Popen([EXIM, "-C", str(self.conf), "-bdf", "-q2s"], stderr=err)
        self.procs["exim"] = proc
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.smtp_port), timeout=1) as s,
            ):
                if s.recv(512).startswith(b"220"):
                    return
            time.sleep(0.05)
        raise RuntimeError(f"Exim did not start: {self.mainlog()}{self.paniclog()}")

    def mainlog(self) -> str:
        path = self.logs / "mainlog"
        return path.read_text() if path.exists() else ""

    def paniclog(self) -> str:
        path = self.logs / "paniclog"
        return path.read_text() if path.exists() else ""

    def stop(self) -> None:
        for name in list(self.procs):
            proc = self.procs.pop(name)
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()

    # --- clients ------------------------------------------------------------------------

    def smtp(self, source: str = "127.0.0.2", port: int | None = None) -> smtplib.SMTP:
        """A client from ``source`` (not 127.0.0.1: that one is localhost, allowed to relay)."""
        client = smtplib.SMTP(timeout=30, local_hostname="client.example.net",
                              source_address=(source, 0))  # fmt: skip
        client.connect("127.0.0.1", port or self.smtp_port)
        client.ehlo("client.example.net")
        return client

    def greeting(self, source: str = "127.0.0.2", port: int | None = None) -> tuple[int, bytes]:
        """The server's greeting to a new connection (Exim's connect ACL answers it)."""
        client = smtplib.SMTP(timeout=30, source_address=(source, 0))
        try:
            return client.connect("127.0.0.1", port or self.smtp_port)
        except smtplib.SMTPConnectError as e:
            error = e.smtp_error
            return e.smtp_code, error if isinstance(error, bytes) else error.encode()
        finally:
            client.close()

    def maildir(self, domain: str, user: str) -> list[bytes]:
        new = self.root / "domains" / domain / user / "Maildir" / "new"
        return [p.read_bytes() for p in sorted(new.iterdir())] if new.is_dir() else []

    def wait_maildir(self, domain: str, user: str, marker: str, timeout: float = 20) -> bytes:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for message in self.maildir(domain, user):
                if marker.encode() in message:
                    return message
            time.sleep(0.05)
        raise AssertionError(f"{marker} not delivered to {user}@{domain}:\n{self.mainlog()}")

    def wait_sink(self, marker: str, timeout: float = 20) -> tuple[str, list[str], bytes]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for kept in self.sink.messages:
                if marker.encode() in kept[2]:
                    return kept
            time.sleep(0.05)
        raise AssertionError(f"{marker} never reached the sink:\n{self.mainlog()}")


def message(sender: str, rcpt: str, marker: str) -> bytes:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = rcpt
    msg["Subject"] = marker
    msg["Message-ID"] = f"<{marker}@client.example.net>"
    msg.set_content(f"test {marker}\n")
    return msg.as_bytes()


TLS_NAMES = (PRIMARY, "example.org", "example.net")


def make_cert(root: Path, name: str, version: str = "v1") -> Path:
    """A 2-day self-signed certificate for ``name``, made current (policy.up.make_certificate)."""
    return make_certificate(root / "ssl", name, version, days=2)


@contextlib.contextmanager
def exim_stack(
    relay_from: tuple[str, ...] = (),
    certs: bool = False,
    native_template: str | None = None,
    policy_config: dict[str, object] | None = None,
    configure: str | None = None,
) -> Iterator[Stack]:
    """``certs``: make a certificate for each of TLS_NAMES (make_cert) before Exim starts.
    ``native_template``: run this configuration instead of exim/configure (the benchmark's
    native-lookup baseline), rendered with the same values. ``configure``: a variant of
    exim/configure to render in its place (render_exim; the scan benchmark's built-in scanning
    baseline). ``policy_config``: daemon settings over tests/offline.toml's (the sender-check
    tests turn the checks on and point the resolver and the callouts at their loopback
    servers), written to <base>/policy.toml. Exim's MAIL and DATA readsocket timeouts are
    rendered from the daemon's settings (render.exim_timeouts)."""
    base = Path(tempfile.mkdtemp(prefix="mx.", dir="/tmp"))
    os.chmod(base, 0o755)  # Debian-exim must traverse it
    root = base / "srv"
    copy_example(root)  # without what `mailpolicy up` may have left in the example tree
    if relay_from:
        with (root / "exim" / "conf" / "relay_from_hosts").open("a") as f:
            f.write("".join(f"{ip}\n" for ip in relay_from))
    if certs:
        for name in TLS_NAMES:
            make_cert(root, name)
    for sub in ("exim/spool", "domains"):
        (root / sub).mkdir(parents=True, exist_ok=True)
        shutil.chown(root / sub, "Debian-exim", "Debian-exim")
    (base / "log").mkdir()
    shutil.chown(base / "log", "Debian-exim", "Debian-exim")
    sink = Sink()
    sink_port = free_port()
    controller = Controller(sink, hostname="127.0.0.1", port=sink_port)
    controller.start()
    stack = Stack(base, root, base / "exim.conf", free_port(), free_port(), base / "policy.sock",
                  sink)  # fmt: skip
    try:
        if policy_config is not None:
            stack.policy_config = write_toml(base / "policy.toml",
                                             {**offline_settings(), **policy_config})  # fmt: skip
        timeouts = exim_timeouts(settings_mod.load(str(stack.policy_config)))
        site = EximSite(
            root=str(root), policy_socket=str(stack.policy_socket), primary_hostname=PRIMARY,
            qualify_domain="example.org", log_dir=str(base / "log"), smtp_port=stack.smtp_port,
            submission_port=stack.submission_port, interfaces=("127.0.0.1",),
            sink_port=sink_port, mail_timeout=timeouts["mail_timeout"],
            data_timeout=timeouts["data_timeout"],
        )  # fmt: skip
        if native_template is None:
            stack.conf.write_text(render_exim(site, configure))
        else:
            stack.conf.write_text(render(native_template, {
                "ROOT": site.root, "SUBMISSION_PORT": str(site.submission_port),
                "SINK_PORT": str(sink_port), "PRIMARY_HOSTNAME": PRIMARY,
                "QUALIFY_DOMAIN": site.qualify_domain, "LOG_DIR": site.log_dir,
                "SMTP_PORTS": f"{site.smtp_port} : {site.submission_port}",
            }))  # fmt: skip
        check = subprocess.run([EXIM, "-C", str(stack.conf), "-bV"], capture_output=True,
                               text=True)  # fmt: skip
        if check.returncode != 0:
            raise RuntimeError(f"exim -bV failed: {check.stdout}{check.stderr}")
        stack.start_policy()
        stack.start_exim()
        yield stack
    finally:
        stack.stop()
        controller.stop()
        shutil.rmtree(base, ignore_errors=True)
