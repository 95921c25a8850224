"""``mailpolicy up``: the whole local stack on loopback, for trying the project and for its
README command (1).

It renders the configurations into a state directory and starts, on 127.0.0.1 at the standard
ports plus ``--port-offset`` (default 10000: SMTP 10025, submission 10587, IMAP 10143, IMAPS
10993, ManageSieve 14190):

* the policy daemon on ``<state>/policy.sock`` (group Debian-exim, so Exim can ask it) and
  ``<state>/auth.sock`` (group dovecot: logins);
* a loopback SMTP sink (aiosmtpd) that keeps every message for a non-local domain in
  ``<state>/sink/``: nothing ever leaves the machine;
* Dovecot 2.3 with ``dovecot/dovecot.conf`` (IMAP, IMAPS, ManageSieve, LMTP; logins through
  the daemon, by ``dovecot/mailpolicy-auth.lua`` or, with ``--dovecot-auth checkpassword``,
  ``hooks/checkpassword``);
* Exim 4.96 with ``exim/configure``, delivering local mail over Dovecot's LMTP and
  authenticating SMTP AUTH through Dovecot;
* clamd (ClamAV) on ``<state>/clamd.sock``, with the databases of ``--clamav-db DIR`` (default
  /var/lib/clamav, where freshclam keeps them; without a database there clamd is not started
  and virus scanning is off: ``clamd_socket = ""``). ``examples/clamav-db`` is an EICAR-only
  test database (scripts/run-example uses it);
* spamd (SpamAssassin, Debian's shipped rules, no network tests: ``-L`` and ``dns_available
  no``) on ``<state>/spamd.sock`` when it is installed.

The daemon's settings file (``<state>/mailpolicy.toml``) points clamd_socket and spamd_socket
at them (policy/scanservers.py writes their configurations). A self-signed certificate is made
for each local domain and the primary hostname that has none under
``<root>/ssl/<name>/current/``. Ctrl-C or SIGTERM stops everything it started; clamd and spamd
(which forks children) run in process groups of their own and are stopped as groups.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from policy import scanservers
from policy.daemon import ping
from policy.mailtree import TreeLoader
from policy.render import (
    REPO,
    DovecotSite,
    EximSite,
    RenderError,
    render_dovecot,
    render_exim,
)

EXIM_USER = "Debian-exim"
DOVECOT_GROUP = "dovecot"
HOOK = REPO / "hooks" / "checkpassword"
LUA_SCRIPT = REPO / "dovecot" / "mailpolicy-auth.lua"
DEFAULT_CLAMAV_DB = Path("/var/lib/clamav")  # Debian's: freshclam keeps the databases there
TEST_CLAMAV_DB = REPO / "examples" / "clamav-db"  # EICAR only (its README.md)


# The daemon's settings for the local stack: the sender checks that ask DNS and other people's
# mail servers (SPF, sender-verify callouts, DKIM key lookups) are off, so nothing but loopback
# is ever contacted; the resolver points at a loopback port where nothing answers, should
# anything ask. The tests of those checks run them against a loopback DNS server and peers.
# The scanners' sockets are added by up(): the clamd and spamd it started, or "" (off).
UP_SETTINGS = """\
spf_enabled = false
callout_enabled = false
dkim_enabled = false
dns_servers = "127.0.0.1"
dns_port = 9
"""


class UpError(Exception):
    pass


def first_unsearchable(path: Path) -> Path | None:
    """The first directory on the way to ``path`` that Exim's user cannot enter, if any."""
    for parent in [*reversed(path.parents), path]:
        if not os.stat(parent).st_mode & stat.S_IXOTH:
            return parent
    return None


def make_certificate(ssl_dir: Path, name: str, version: str = "self-signed",
                     days: int = 365) -> Path:  # fmt: skip
    """A self-signed certificate for ``name`` (CN and subjectAltName, EC P-256) in
    ``<ssl_dir>/<name>/<version>/{ca,cert,key,chained,req}`` (the seed's layout), made the active
    one by switching the ``current`` symlink atomically (a new link renamed over the old one),
    as an admin rolls certificates over. The key is 0640 root:Debian-exim: Exim reads it."""
    site = ssl_dir / name
    new = site / version
    new.mkdir(parents=True)
    key, cert, req = new / "key", new / "cert", new / "req"
    subject = ["-subj", f"/CN={name}", "-addext", f"subjectAltName=DNS:{name}"]
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-days", str(days), "-keyout", str(key), "-out", str(cert), *subject],
        check=True, capture_output=True,
    )  # fmt: skip
    subprocess.run(
        ["openssl", "req", "-new", "-key", str(key), "-out", str(req), *subject],
        check=True, capture_output=True,
    )  # fmt: skip
    shutil.copyfile(cert, new / "ca")  # self-signed: the certificate is its own CA
    shutil.copyfile(cert, new / "chained")  # cert + chain; no intermediate here
    shutil.chown(key, "root", EXIM_USER)
    os.chmod(key, 0o640)
    link = site / f".current.{version}.tmp"
    link.symlink_to(version)
    link.rename(site / "current")  # rename(2) replaces the old link atomically
    return new


def ensure_certificate(ssl_dir: Path, name: str) -> bool:
    """Make a self-signed certificate for ``name`` unless it has one; True when made."""
    if (ssl_dir / name / "current" / "chained").exists():
        return False
    make_certificate(ssl_dir, name, version=f"self-signed-{int(time.time())}")
    return True


def daemon_settings(qualify_domain: str, clamd: Path | None, spamd: Path | None) -> str:
    """The daemon's settings file for the local stack: UP_SETTINGS, the sockets of the clamd
    and spamd up runs (None: not running, that scanner is off) and the login realm."""
    return (
        UP_SETTINGS
        + f"clamd_socket = {json.dumps(str(clamd) if clamd else '')}\n"
        + (f"spamd_socket = {json.dumps(str(spamd))}\n" if spamd else 'spamd_host = ""\n')
        + (f"auth_default_realm = {json.dumps(qualify_domain)}\n" if qualify_domain else "")
    )


@dataclass(frozen=True)
class ScanPlan:
    """Which scanners ``up`` runs, and what it says about each."""

    clamav_db: Path | None  # clamd's database directory; None: no clamd
    clamd_note: str
    spamd: bool
    spamd_note: str


def plan_scanners(clamav_db: str | None) -> ScanPlan:
    """clamd runs when it is installed and the database directory (``clamav_db``, else
    DEFAULT_CLAMAV_DB) holds a database; a directory given explicitly must hold one. spamd runs
    when it is installed."""
    explicit = clamav_db is not None
    db = Path(clamav_db).resolve() if clamav_db is not None else DEFAULT_CLAMAV_DB
    if not os.path.exists(scanservers.CLAMD):
        if explicit:
            raise UpError("--clamav-db: clamd is not installed (scripts/setup.sh installs "
                          "clamav-daemon)")  # fmt: skip
        clamd: tuple[Path | None, str] = (None, "not installed: virus scanning is off")
    elif found := scanservers.clamav_databases(db):
        test_db = " (the EICAR-only test database: not protection)" if db == TEST_CLAMAV_DB else ""
        clamd = (db, f"databases {', '.join(p.name for p in found)} in {db}{test_db}")
    elif explicit:
        raise UpError(f"--clamav-db {db}: no ClamAV database there (*.cvd, *.cld, *.hdb, *.ndb "
                      "...)")  # fmt: skip
    else:
        clamd = (None, f"not started: no ClamAV database in {db} (freshclam's; or --clamav-db "
                       "DIR, e.g. examples/clamav-db): virus scanning is off")  # fmt: skip
    if os.path.exists(scanservers.SPAMD):
        spamd = (True, "Debian's rules, no network tests (-L, dns_available no)")
    else:
        spamd = (False, "not installed: spam scanning is off")
    return ScanPlan(clamd[0], clamd[1], spamd[0], spamd[1])


def _start_group(command: list[str], stderr: Path) -> subprocess.Popen[bytes]:
    """``command`` as the leader of a process group of its own (stopped with _stop_group)."""
    with stderr.open("ab") as err:
        return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                start_new_session=True)  # fmt: skip


def _stop_group(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """SIGTERM to the process group, then wait until it is empty (spamd's children outlive
    their parent by a moment); SIGKILL to what is left after ``timeout`` seconds."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while True:
        proc.poll()  # reap the leader
        try:
            os.killpg(proc.pid, 0)  # anyone left? (the group id stays taken while it has one)
        except ProcessLookupError:
            return
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return
        time.sleep(0.05)


def _wait_ready(
    proc: subprocess.Popen[bytes],
    sock: Path,
    ready: Callable[[Path], bool],
    what: str,
    log: Path,
    stopping: Callable[[], bool],
    timeout: float = 120.0,
) -> None:
    """Until ``proc`` answers on ``sock`` (or up is told to stop: returns)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not stopping():
        if proc.poll() is not None:
            raise UpError(f"{what} exited with {proc.returncode} (log {log})")
        if sock.exists() and ready(sock):
            return
        time.sleep(0.05)
    if not stopping():
        raise UpError(f"{what} did not answer on {sock} within {timeout:g} s (log {log})")


def _sink(state: Path, port: int) -> object:
    from aiosmtpd.controller import Controller  # only `up` needs it

    sink_dir = state / "sink"
    sink_dir.mkdir(exist_ok=True)

    class Keep:
        count = 0

        async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
            Keep.count += 1
            name = sink_dir / f"{time.time():.6f}-{Keep.count}.eml"
            mail_from = getattr(envelope, "mail_from", "")
            rcpts = ", ".join(getattr(envelope, "rcpt_tos", []))
            content = getattr(envelope, "content", b"") or b""
            assert isinstance(content, bytes)
            name.write_bytes(f"X-Sink-From: <{mail_from}>\nX-Sink-To: {rcpts}\n".encode()
                             + content)  # fmt: skip
            return "250 2.0.0 kept by the mailpolicy up sink"

    controller = Controller(Keep(), hostname="127.0.0.1", port=port)
    controller.start()
    return controller


def _wait_for(path: Path, proc: subprocess.Popen[bytes], what: str, log_dir: Path) -> None:
    for _ in range(500):
        if path.exists() or proc.poll() is not None:
            break
        time.sleep(0.02)
    if not path.exists():
        raise UpError(f"{what} did not start (logs: {log_dir})")


def up(
    root: str,
    state: str,
    offset: int,
    primary_hostname: str,
    qualify_domain: str,
    auth_path: str = "lua",
    clamav_db: str | None = None,
) -> int:
    root_path = Path(root).resolve()
    state_path = Path(state).resolve()
    if not root_path.is_dir():
        raise UpError(f"{root_path}: no such directory")
    blocked = first_unsearchable(root_path)
    if blocked is not None:
        raise UpError(f"{blocked} is not searchable by others: Exim ({EXIM_USER}) cannot reach "
                      f"{root_path}; chmod o+x it or use a tree elsewhere")  # fmt: skip
    exim = shutil.which("exim") or shutil.which("exim4")
    if exim is None:
        raise UpError("exim is not installed (scripts/setup.sh installs exim4-daemon-heavy)")
    dovecot = shutil.which("dovecot") or (
        "/usr/sbin/dovecot" if os.path.exists("/usr/sbin/dovecot") else None
    )
    if dovecot is None:
        raise UpError("dovecot is not installed (scripts/setup.sh installs the dovecot packages)")
    auth_program = HOOK if auth_path == "checkpassword" else LUA_SCRIPT
    blocked = first_unsearchable(auth_program.parent)
    if blocked is not None:
        raise UpError(f"{blocked} is not searchable by others: Dovecot's auth processes (user "
                      f"dovecot) cannot read {auth_program}; chmod o+x it")  # fmt: skip
    scan = plan_scanners(clamav_db)
    state_path.mkdir(parents=True, exist_ok=True)
    os.chmod(state_path, 0o755)  # noqa: S103 (Exim's user must reach the socket and the log)
    log_dir = state_path / "log"
    log_dir.mkdir(exist_ok=True)
    for d in (log_dir, root_path / "exim" / "spool", root_path / "domains"):
        d.mkdir(parents=True, exist_ok=True)
        shutil.chown(d, EXIM_USER, EXIM_USER)

    snapshot, _ = TreeLoader(str(root_path), primary_hostname).refresh()
    names = sorted({*snapshot.users, *snapshot.aliases, primary_hostname})
    made = [n for n in names if ensure_certificate(root_path / "ssl", n)]

    smtp, submission, sink_port = offset + 25, offset + 587, offset + 2525
    imap, imaps, sieve = offset + 143, offset + 993, offset + 4190
    sock, auth_sock = state_path / "policy.sock", state_path / "auth.sock"
    dovecot_dir = state_path / "dovecot"
    for sub in ("run", "state"):
        (dovecot_dir / sub).mkdir(parents=True, exist_ok=True)
    dovecot_site = DovecotSite(
        root=str(root_path), primary_hostname=primary_hostname, qualify_domain=qualify_domain,
        base_dir=str(dovecot_dir / "run"), state_dir=str(dovecot_dir / "state"),
        log_dir=str(log_dir), instance_name=f"mailpolicy-up-{offset}",
        auth_socket=str(auth_sock), auth_path=auth_path, checkpassword=str(HOOK),
        lua_script=str(LUA_SCRIPT),
        lmtp_socket=str(dovecot_dir / "run" / "exim-lmtp"),
        auth_client_socket=str(dovecot_dir / "run" / "exim-auth"),
        interfaces=("127.0.0.1",), imap_port=imap, imaps_port=imaps, sieve_port=sieve,
    )  # fmt: skip
    dovecot_conf = state_path / "dovecot.conf"
    try:
        dovecot_conf.write_text(render_dovecot(dovecot_site))
    except RenderError as e:
        raise UpError(f"dovecot.conf: {e}") from None
    site = EximSite(
        root=str(root_path), policy_socket=str(sock), primary_hostname=primary_hostname,
        qualify_domain=qualify_domain, log_dir=str(log_dir), smtp_port=smtp,
        submission_port=submission, interfaces=("127.0.0.1",), sink_port=sink_port,
        lmtp_socket=dovecot_site.lmtp_socket, dovecot_auth_socket=dovecot_site.auth_client_socket,
    )  # fmt: skip
    conf = state_path / "exim.conf"
    conf.write_text(render_exim(site))
    check = subprocess.run([exim, "-C", str(conf), "-bV"], capture_output=True, text=True)
    if check.returncode != 0:
        raise UpError(f"exim -bV {conf}: {check.stdout}{check.stderr}")

    procs: list[subprocess.Popen[bytes]] = []
    scanners: dict[str, subprocess.Popen[bytes]] = {}  # process-group leaders
    clamd_sock, spamd_sock = state_path / "clamd.sock", state_path / "spamd.sock"
    controller = None
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        # The scanners first: spamd takes a second or two to load its rules, meanwhile the rest
        # starts; Exim starts once both answer.
        if scan.clamav_db is not None:
            base = state_path / "clamd"
            base.mkdir(exist_ok=True)
            clamd_conf = scanservers.clamd_conf(base, clamd_sock, scan.clamav_db,
                                                log=log_dir / "clamd.log")  # fmt: skip
            clamd_sock.unlink(missing_ok=True)
            scanners["clamd"] = _start_group(scanservers.clamd_command(clamd_conf),
                                             log_dir / "clamd.stderr")  # fmt: skip
        if scan.spamd:
            base = state_path / "spamd"
            scanservers.spamd_dirs(base)
            spamd_sock.unlink(missing_ok=True)
            scanners["spamd"] = _start_group(
                scanservers.spamd_command(base, spamd_sock, log=log_dir / "spamd.log"),
                log_dir / "spamd.stderr",
            )  # fmt: skip
        controller = _sink(state_path, sink_port)
        settings = state_path / "mailpolicy.toml"
        settings.write_text(daemon_settings(
            qualify_domain, clamd_sock if "clamd" in scanners else None,
            spamd_sock if "spamd" in scanners else None,
        ))  # fmt: skip
        policy = subprocess.Popen(
            [sys.executable, "-m", "policy", "serve", "--root", str(root_path), "--socket",
             str(sock), "--socket-group", EXIM_USER, "--auth-socket", str(auth_sock),
             "--auth-socket-group", DOVECOT_GROUP, "--primary-hostname", primary_hostname,
             "--log-file", str(log_dir / "policy.log"), "--config", str(settings)],
        )  # fmt: skip
        procs.append(policy)
        for _ in range(300):
            if ping(str(sock)) is not None or policy.poll() is not None:
                break
            time.sleep(0.02)
        if ping(str(sock)) is None:
            raise UpError(f"the policy daemon did not start (see {log_dir / 'policy.log'})")
        with (log_dir / "dovecot.stderr").open("ab") as err:
            procs.append(subprocess.Popen([dovecot, "-F", "-c", str(dovecot_conf)], stderr=err))
        _wait_for(Path(dovecot_site.lmtp_socket), procs[-1], "Dovecot", log_dir)
        if "clamd" in scanners:
            _wait_ready(scanners["clamd"], clamd_sock, scanservers.ping_clamd, "clamd",
                        log_dir / "clamd.log", lambda: stopping)  # fmt: skip
        if "spamd" in scanners:
            _wait_ready(scanners["spamd"], spamd_sock, scanservers.ping_spamd, "spamd",
                        log_dir / "spamd.log", lambda: stopping)  # fmt: skip
        if stopping:  # Ctrl-C while the scanners were starting
            return 0
        with (log_dir / "exim.stderr").open("ab") as err:
            procs.append(subprocess.Popen([exim, "-C", str(conf), "-bdf", "-q30s"], stderr=err))
        swaks = (f"swaks --server 127.0.0.1:{smtp} --helo client.example.net "
                 "--from someone@remote.example --to alice@example.org")  # fmt: skip
        submit = (f"swaks --server 127.0.0.1:{submission} --tls --auth PLAIN "
                  "--auth-user alice@example.org --auth-password alice-secret "
                  "--from alice@example.org --to friend@far.example")  # fmt: skip
        print(f"""mailpolicy up: serving {root_path}
  policy daemon  {sock}, logins {auth_sock} (log {log_dir / 'policy.log'})
  Exim           SMTP 127.0.0.1:{smtp}, submission 127.0.0.1:{submission} (log {log_dir}/mainlog)
  Dovecot        IMAP 127.0.0.1:{imap}, IMAPS 127.0.0.1:{imaps}, ManageSieve 127.0.0.1:{sieve}
                 (logins by {auth_path}; log {log_dir}/dovecot.log)
  clamd          {f"{clamd_sock}, {scan.clamd_note} (log {log_dir / 'clamd.log'})"
                  if "clamd" in scanners else scan.clamd_note}
  spamd          {f"{spamd_sock}, {scan.spamd_note} (log {log_dir / 'spamd.log'})"
                  if "spamd" in scanners else scan.spamd_note}
  remote sink    127.0.0.1:{sink_port}: mail for other domains is kept in {state_path / 'sink'}
  sender checks  SPF, callouts and DKIM are off here: they would ask the internet
  certificates   {', '.join(made) + ' made (self-signed)' if made else 'all present'}
  local mail     {root_path / 'domains'}/<domain>/<user>/Maildir

Send a message:
  {swaks}
Submit one as alice (AUTH over TLS), relayed to the sink:
  {submit}

Ctrl-C stops everything.""", flush=True)  # fmt: skip
        running = [*zip(procs, ("the policy daemon", "Dovecot", "Exim"), strict=True),
                   *((p, name) for name, p in scanners.items())]  # fmt: skip
        while not stopping:
            for p, what in running:
                if p.poll() is not None:
                    raise UpError(f"{what} exited with {p.returncode} (logs: {log_dir})")
            time.sleep(0.2)
        return 0
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        for p in scanners.values():
            _stop_group(p)
        if controller is not None:
            controller.stop()  # type: ignore[attr-defined]
