"""``mailpolicy provision``: turn machine metadata (policy/metadata.py) into a configured mail
server. Run at first boot (SmartOS zoneinit, the OCI image's entrypoint) and again whenever
the metadata changes; docs/provisioning.md is the admin's page.

What it does, in this order, each step only if something differs:

1. **The data tree** under ``--root`` (default /srv/mail, the seed's delegated dataset):
   ``passwd/ aliases/ domains/ dkim/ ssl/ backups/ exim/spool exim/conf dovecot/conf
   dovecot/sieve/{before,after}``, and each list file that does not exist yet with a comment
   saying what goes in it (the same header as ``examples/srv-mail``'s). A list file that exists
   is the admin's and is never touched, nor is anything else under the root but a certificate
   for the primary hostname when it has none (self-signed, as ``mailpolicy up``'s).
2. **Rendered configuration** under ``--etc`` (default /etc), rewritten when it differs, as
   these files are ours: ``exim4/exim4.conf`` (Debian's Exim reads it before its own
   generated one), ``dovecot/dovecot.conf``, ``mailpolicy/clamd.conf``,
   ``mailpolicy/spamd/sa/etc/`` (spamd's site configuration), ``mailpolicy/supervisord.conf``
   (every service as a supervisord program: the OCI image's init, and the tests') and
   ``cron.d/mailpolicy`` (the nightly backup and Exim's hints-database housekeeping).
   ``mailpolicy/mailpolicy.toml``, the daemon's settings (0600: it holds the backup key), is
   shared: provision rewrites only the block between its ``# BEGIN``/``# END`` markers and
   keeps what the admin wrote after it.
3. **The system**: the time zone (``timezone`` and the ``localtime`` link on Linux, ``TZ`` in
   ``default/init`` on SmartOS), and ssh: ``ssh/sshd_not_to_be_run`` (Debian's sshd does not
   start while it exists) when ``system:ssh_disabled`` is true, removed again when it is
   false and provision made it; on the real /etc also ``systemctl disable --now ssh``
   (``svcadm disable ssh`` on SmartOS).

Nothing is changed unless the metadata is valid and every configuration renders and passes
its check (the daemon's settings load, ``exim -bV``): bad metadata leaves the machine as it
was. ``--dry-run`` prints what would change and changes nothing. Re-running with the same
metadata changes nothing and says so.

The options after ``--dry-run`` exist for tests and for running a provisioned server beside
another (they are in ``mailpolicy provision --help`` too): ``--listen``, ``--port-offset``,
``--run-dir``, ``--log-dir``, ``--sink-port`` (every non-local message to a loopback SMTP
sink), ``--offline`` (no sender checks that ask DNS, spamd without network tests, no
freshclam) and ``--clamav-db``.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from policy import scanservers
from policy.admin import replace_file
from policy.metadata import Metadata
from policy.render import (
    REPO,
    DovecotSite,
    EximSite,
    RenderError,
    exim_timeouts,
    render_dovecot,
    render_exim,
)
from policy.settings import SettingsError, load
from policy.up import (
    DOVECOT_GROUP,
    EXIM_USER,
    UP_SETTINGS,
    first_unsearchable,
    make_certificate,
)

EXAMPLE_TREE = REPO / "examples" / "srv-mail"
# Directories of the data tree; (owner) where Exim must write.
TREE_DIRS = {
    "passwd": None, "aliases": None, "domains": EXIM_USER, "dkim": None, "ssl": None,
    "backups": None, "exim": None, "exim/spool": EXIM_USER, "exim/conf": None,
    "dovecot": None, "dovecot/conf": None, "dovecot/sieve": None,
    "dovecot/sieve/before": None, "dovecot/sieve/after": None,
}  # fmt: skip
LIST_FILES = ("exim/conf/global_aliases", "exim/conf/rewrite_domains",
              "exim/conf/relay_from_hosts", "exim/conf/relay_to_domains",
              "exim/conf/senderverify_exceptions", "exim/conf/dkim_required",
              "dovecot/conf/local.conf")  # fmt: skip
BEGIN = "# BEGIN mailpolicy provision: rewritten from the metadata by every provision"
END = "# END mailpolicy provision: your own settings below this line are kept"
SSH_MARK = "# made by mailpolicy provision (system:ssh_disabled); it removes it again\n"
# spamd on a provisioned server: network tests on (DNS blocklists), Bayes on, headers only
# (the daemon adds its own X-Spam-* headers from spamd's score).
SA_SERVER_LOCAL_CF = "report_safe 0\nrequired_score 5.0\n"
DEFAULT_CLAMAV_DB = Path("/var/lib/clamav")  # freshclam's
CLAMAV_USER = "clamav"


class ProvisionError(Exception):
    pass


@dataclass(frozen=True)
class Target:
    """Where a provisioned server lives, and the test-only knobs (module docstring)."""

    root: Path = Path("/srv/mail")
    etc: Path = Path("/etc")
    run_dir: Path = Path("/run/mailpolicy")
    log_dir: Path = Path("/var/log/mailpolicy")
    listen: tuple[str, ...] = ("0.0.0.0", "::")  # noqa: S104 (a mail server listens)
    port_offset: int = 0
    sink_port: int | None = None
    offline: bool = False
    clamav_db: Path = DEFAULT_CLAMAV_DB
    system: str = os.uname().sysname  # "Linux", "SunOS"

    @property
    def real_etc(self) -> bool:
        return self.etc.resolve() == Path("/etc")

    @property
    def conf_dir(self) -> Path:
        return self.etc / "mailpolicy"

    def port(self, standard: int) -> int:
        return self.port_offset + standard


@dataclass
class Change:
    what: str  # "create", "update", "remove", "run", "make"
    path: str
    apply: Callable[[], None] = field(repr=False)

    def __str__(self) -> str:
        return f"{self.what:7} {self.path}"


# --- what to write ------------------------------------------------------------------------


def list_file_header(relative: str) -> str:
    """The explanatory comment of a default list file: the leading comment block of the example
    tree's file of that name (one text for both, so they cannot drift apart)."""
    lines = []
    for line in (EXAMPLE_TREE / relative).read_text().splitlines():
        if line and not line.startswith("#"):
            break
        lines.append(line)
    return "\n".join(lines).rstrip("\n") + "\n"


def settings_block(md: Metadata, t: Target) -> str:
    """The daemon's settings that come from the metadata and the target."""
    run = t.run_dir
    values: dict[str, object] = {
        "root": str(t.root), "socket": str(run / "policy.sock"), "socket_group": EXIM_USER,
        "auth_socket": str(run / "auth.sock"), "auth_socket_group": DOVECOT_GROUP,
        "primary_hostname": md.primary_hostname, "log_file": str(t.log_dir / "policy.log"),
        "auth_default_realm": md.dovecot_qualify_domain,
        "clamd_socket": str(run / "clamd" / "clamd.sock"), "spamd_socket": str(run / "spamd.sock"),
        **md.backup,
    }  # fmt: skip
    lines = [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    offline = UP_SETTINGS.strip().splitlines() if t.offline else []
    return "\n".join([BEGIN, *lines, *offline, END]) + "\n"


def merge_settings(existing: str | None, block: str) -> str:
    """``block`` in place of the marked block of ``existing``; the admin's lines after it kept.
    A file without markers (written by hand) is kept whole below the new block."""
    if existing is None:
        return block + "# (your settings here; docs/operations.md lists them)\n"
    lines = existing.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.rstrip("\n") == BEGIN]
    ends = [i for i, line in enumerate(lines) if line.rstrip("\n") == END]
    if starts and ends and starts[0] < ends[0]:
        rest = lines[: starts[0]] + lines[ends[0] + 1 :]
    else:
        rest = lines
    return block + "".join(rest)


def supervisord_conf(t: Target, exim: str, dovecot: str) -> str:
    """Every service as a supervisord program (the OCI image's init; the tests start it too).
    Priorities order the start: the daemon and the scanners before Dovecot and Exim."""
    conf, run, log = t.conf_dir, t.run_dir, t.log_dir
    settings = conf / "mailpolicy.toml"
    exim_c = [] if t.real_etc else ["-C", str(t.etc / "exim4" / "exim4.conf")]
    clamd = scanservers.clamd_command(conf / "clamd.conf")
    # clamd exits without a database; on a new server freshclam fetches the first one.
    clamd_wait = (f"until ls {t.clamav_db} | grep -q -E '[.](cvd|cld|hdb|ndb)$'; do sleep 10; "
                  f"done; exec {' '.join(clamd)}")  # fmt: skip
    spamd = scanservers.spamd_command(conf / "spamd", run / "spamd.sock", log=log / "spamd.log",
                                      local_only=t.offline, pid=run / "spamd.pid")  # fmt: skip
    programs = {
        "policy": ([sys.executable, "-m", "policy", "serve", "--config", str(settings)], 10),
        "clamd": (["/bin/sh", "-c", clamd_wait], 10),
        "spamd": (spamd, 10),
        "dovecot": ([dovecot, "-F", "-c", str(t.etc / "dovecot" / "dovecot.conf")], 20),
        "exim": ([exim, *exim_c, "-bdf", "-q30m"], 30),
    }
    if not t.offline:
        programs["freshclam"] = (["freshclam", "-d", "--foreground",
                                  f"--config-file={conf / 'freshclam.conf'}"], 5)  # fmt: skip
    if t.real_etc:
        programs["cron"] = (["cron", "-f"], 40)
    out = [
        "; Written by `mailpolicy provision` (rewritten by every provision): every service of the",
        "; mail server under supervisord. supervisorctl -c this-file status | restart <name>.",
        "[unix_http_server]", f"file={run / 'supervisor.sock'}", "chmod=0700", "",
        "[supervisord]", "nodaemon=true", f"logfile={log / 'supervisord.log'}",
        f"pidfile={run / 'supervisord.pid'}", f"childlogdir={log}", "user=root", "",
        "[rpcinterface:supervisor]",
        "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface", "",
        "[supervisorctl]", f"serverurl=unix://{run / 'supervisor.sock'}", "",
    ]  # fmt: skip
    for name, (argv, priority) in programs.items():
        command = " ".join(_supervisor_quote(a) for a in argv)
        out += [f"[program:{name}]", f"command={command}", f"directory={REPO}",
                f"priority={priority}", "autorestart=true", "startsecs=2",
                "startretries=100", "stopasgroup=true", "killasgroup=true",
                "stopwaitsecs=20", f"stdout_logfile={log / (name + '.out')}",
                "redirect_stderr=true", ""]  # fmt: skip
    return "\n".join(out)


def _supervisor_quote(arg: str) -> str:
    """supervisord splits ``command`` with shlex; '%' starts its own expansions."""
    import shlex

    return shlex.quote(arg.replace("%", "%%"))


def freshclam_conf(t: Target) -> str:
    """freshclam as a daemon (supervisord's program): the official mirror, every 2 hours,
    telling our clamd (not Debian's) to reload. It runs as clamav, the owner of the databases;
    its log goes to supervisord (freshclam.out)."""
    return (
        "# Written by `mailpolicy provision` (rewritten by every provision).\n"
        f"DatabaseDirectory {t.clamav_db}\nDatabaseOwner {CLAMAV_USER}\n"
        "DatabaseMirror database.clamav.net\nChecks 12\nForeground yes\nLogTime yes\n"
        f"NotifyClamd {t.conf_dir / 'clamd.conf'}\n"
    )


def cron_file(t: Target) -> str:
    conf = t.conf_dir / "mailpolicy.toml"
    return (
        "# Written by `mailpolicy provision` (rewritten by every provision).\n"
        "SHELL=/bin/sh\nPATH=/usr/sbin:/usr/bin:/sbin:/bin\n"
        "# The nightly backup (docs/backups.md): does nothing, in one log line, until\n"
        "# backup:openssl_key, backup:openssl_iv and backup:bucket are set.\n"
        f"17 3 * * * root {REPO / 'hooks' / 'backup'} --config {conf} "
        f"--log-file {t.log_dir / 'backup.log'}\n"
        "# Exim's hints databases (retry, wait, callout ...) in our spool: expired entries out.\n"
        f"47 4 * * * root {REPO / 'hooks' / 'housekeeping'} {t.root / 'exim' / 'spool'}\n"
    )


# --- planning and applying ------------------------------------------------------------------


def _write(path: Path, content: str, mode: int, owner: str | None = None) -> None:
    """Atomically (admin.replace_file), the parent directories made first; ``owner`` names the
    user and group."""
    path.parent.mkdir(parents=True, exist_ok=True)
    uid = gid = -1
    if owner:
        uid, gid = pwd.getpwnam(owner).pw_uid, grp.getgrnam(owner).gr_gid
    replace_file(str(path), content, mode, uid, gid)


class Plan:
    def __init__(self) -> None:
        self.changes: list[Change] = []

    def file(self, path: Path, content: str, mode: int = 0o644, *, keep: bool = False,
             owner: str | None = None) -> None:  # fmt: skip
        """``path`` should hold ``content``; ``keep``: only create it (admin data)."""
        if path.exists() or path.is_symlink():
            if keep:
                return
            same = path.is_file() and path.read_text(errors="replace") == content
            if same and (path.stat().st_mode & 0o7777) == mode:
                return
            what = "update"
        else:
            what = "create"
        self.changes.append(Change(what, str(path), lambda: _write(path, content, mode, owner)))

    def directory(self, path: Path, mode: int = 0o755, owner: str | None = None,
                  group: str | None = None) -> None:  # fmt: skip
        if path.is_dir():
            return

        def make() -> None:
            path.mkdir(parents=True, exist_ok=True)
            if owner:
                shutil.chown(path, user=owner)
            if owner or group:
                shutil.chown(path, group=group or owner or "")
            os.chmod(path, mode)  # after chown, which clears the setgid bit

        self.changes.append(Change("create", f"{path}/", make))

    def symlink(self, path: Path, target: str) -> None:
        if path.is_symlink() and os.readlink(path) == target:
            return

        def link() -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.provision")
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(target)
            tmp.rename(path)

        self.changes.append(Change("update" if path.exists() else "create",
                                   f"{path} -> {target}", link))  # fmt: skip

    def remove(self, path: Path) -> None:
        self.changes.append(Change("remove", str(path), lambda: path.unlink(missing_ok=True)))

    def run(self, argv: list[str]) -> None:
        self.changes.append(Change("run", " ".join(argv), lambda: _run(argv)))


def _run(argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise ProvisionError(f"{' '.join(argv)}: {(done.stderr or done.stdout).strip()}")


def _program(*names: str) -> str:
    for name in names:
        found = shutil.which(name) or next(
            (p for d in ("/usr/sbin", "/usr/bin") if os.path.exists(p := f"{d}/{name}")), None
        )
        if found:
            return found
    raise ProvisionError(f"{names[0]} is not installed (scripts/setup.sh installs it)")


def plan_tree(plan: Plan, t: Target) -> None:
    plan.directory(t.root, 0o755)
    for sub, owner in TREE_DIRS.items():
        if sub == "passwd":
            # Password hashes: not for everyone, but Exim's router reads the user names (the
            # seed's lsearch), so the files are group Debian-exim: set-group-ID directory, the
            # group passes to every file made in it, by `mailpolicy user add` (0640) or an editor.
            plan.directory(t.root / sub, 0o2750, group=EXIM_USER)
        else:
            plan.directory(t.root / sub, 0o700 if sub == "backups" else 0o755, owner)
    for relative in LIST_FILES:
        plan.file(t.root / relative, list_file_header(relative), keep=True)


def render_all(md: Metadata, t: Target, plan: Plan) -> None:
    """Render and check every configuration, adding each file that differs to ``plan``.
    Raises ProvisionError before anything is written when one does not render or check."""
    exim, dovecot = _program("exim4", "exim"), _program("dovecot")
    settings_path = t.conf_dir / "mailpolicy.toml"
    existing = settings_path.read_text() if settings_path.exists() else None
    settings_text = merge_settings(existing, settings_block(md, t))
    with tempfile.NamedTemporaryFile("w", suffix=".toml") as f:
        f.write(settings_text)
        f.flush()
        try:
            settings = load(f.name)
        except SettingsError as e:
            raise ProvisionError(f"{settings_path}: {str(e).split(': ', 1)[-1]}") from None
    plan.directory(t.conf_dir, 0o755)
    plan.file(settings_path, settings_text, 0o600)

    exim_conf = t.etc / "exim4" / "exim4.conf"
    site = EximSite(
        root=str(t.root), policy_socket=settings.socket, primary_hostname=md.primary_hostname,
        qualify_domain=md.exim_qualify_domain, log_dir=str(t.log_dir),
        smtp_port=t.port(25), submission_port=t.port(587), interfaces=t.listen,
        sink_port=t.sink_port, lmtp_socket=str(t.run_dir / "dovecot" / "exim-lmtp"),
        dovecot_auth_socket=str(t.run_dir / "dovecot" / "exim-auth"), **exim_timeouts(settings),
    )  # fmt: skip
    exim_text = render_exim(site)
    with tempfile.NamedTemporaryFile("w", suffix=".conf") as f:
        f.write(exim_text)
        f.flush()
        check = subprocess.run([exim, "-C", f.name, "-bV"], capture_output=True, text=True)
    if check.returncode != 0:
        raise ProvisionError(f"{exim_conf} would not pass exim -bV: {check.stdout}{check.stderr}")
    plan.file(exim_conf, exim_text, 0o644)

    dovecot_site = DovecotSite(
        root=str(t.root), primary_hostname=md.primary_hostname,
        qualify_domain=md.dovecot_qualify_domain, base_dir=str(t.run_dir / "dovecot"),
        state_dir="/var/lib/dovecot" if t.real_etc else str(t.run_dir / "dovecot-state"),
        log_dir=str(t.log_dir),
        instance_name="dovecot" if t.real_etc else f"mailpolicy-{t.port(0)}",
        auth_socket=settings.auth_socket, lmtp_socket=site.lmtp_socket or "",
        auth_client_socket=site.dovecot_auth_socket or "", interfaces=t.listen,
        imap_port=t.port(143), imaps_port=t.port(993), sieve_port=t.port(4190),
    )  # fmt: skip
    if (t.root / "ssl" / md.primary_hostname / "current" / "chained").exists():
        plan.file(t.etc / "dovecot" / "dovecot.conf", render_dovecot(dovecot_site), 0o644)
    else:  # rendered once the certificate is made (apply)
        plan.changes.append(Change(
            "make", f"{t.root / 'ssl' / md.primary_hostname}/ (self-signed certificate)",
            lambda: _certificate(t.root / "ssl", md.primary_hostname)))  # fmt: skip
        plan.changes.append(Change(
            "create", str(t.etc / "dovecot" / "dovecot.conf"),
            lambda: _write(t.etc / "dovecot" / "dovecot.conf", render_dovecot(dovecot_site),
                           0o644)))  # fmt: skip
    plan.directory(Path(dovecot_site.state_dir))

    # clamd parses hostile input: it runs as clamav once it has read its configuration
    # (Debian's choice too), so its socket, pid and temporary files are in a directory of
    # that user's; the daemon (root) connects to it there.
    plan.file(t.conf_dir / "clamd.conf", scanservers.clamd_conf_text(
        t.run_dir / "clamd" / "clamd.sock", t.clamav_db, t.run_dir / "clamd",
        t.run_dir / "clamd" / "clamd.pid",
        t.log_dir / "clamd.log", user=CLAMAV_USER))  # fmt: skip
    if not t.offline:
        plan.file(t.conf_dir / "freshclam.conf", freshclam_conf(t))
    sa = t.conf_dir / "spamd" / "sa"
    local_cf = scanservers.SA_LOCAL_CF if t.offline else SA_SERVER_LOCAL_CF
    for pre in sorted(scanservers.SA_PLUGINS.glob("*.pre")):
        plan.file(sa / "etc" / pre.name, pre.read_text())
    plan.file(sa / "etc" / "local.cf", local_cf)
    for sub in ("home", "log"):
        plan.directory(sa / sub, 0o755, scanservers.SPAMD_USER)
    plan.file(t.conf_dir / "supervisord.conf", supervisord_conf(t, exim, dovecot))
    plan.file(t.etc / "cron.d" / "mailpolicy", cron_file(t))


def _certificate(ssl_dir: Path, name: str) -> None:
    make_certificate(ssl_dir, name, version=f"self-signed-{int(time.time())}")


def plan_runtime(plan: Plan, t: Target) -> None:
    plan.directory(t.run_dir, 0o755)
    plan.directory(t.run_dir / "clamd", 0o700, CLAMAV_USER)
    plan.directory(t.log_dir, 0o755, EXIM_USER)


def plan_system(plan: Plan, md: Metadata, t: Target) -> None:
    if md.timezone:
        if t.system == "SunOS":  # illumos: TZ in /etc/default/init, read at boot
            init = t.etc / "default" / "init"
            old = init.read_text() if init.exists() else ""
            kept = [line for line in old.splitlines() if not line.startswith("TZ=")]
            plan.file(init, "\n".join([*kept, f"TZ={md.timezone}"]) + "\n", 0o644)
        else:
            plan.file(t.etc / "timezone", md.timezone + "\n")
            plan.symlink(t.etc / "localtime", f"/usr/share/zoneinfo/{md.timezone}")
    marker = t.etc / "ssh" / "sshd_not_to_be_run"
    if md.ssh_disabled:
        if t.system == "SunOS":
            if t.real_etc:
                plan.run(["svcadm", "disable", "ssh"])
        else:
            plan.file(marker, SSH_MARK, keep=True)
            if t.real_etc and shutil.which("systemctl") and _ssh_enabled():
                plan.run(["systemctl", "disable", "--now", "ssh"])
    elif marker.is_file() and marker.read_text() == SSH_MARK:
        plan.remove(marker)  # ours, from an earlier provision with ssh disabled


def _ssh_enabled() -> bool:
    state = subprocess.run(["systemctl", "is-enabled", "ssh"], capture_output=True, text=True)
    return state.stdout.strip() == "enabled"


def provision(md: Metadata, t: Target, dry_run: bool = False,
              say: Callable[[str], None] = print) -> list[Change]:  # fmt: skip
    """Plan everything (rendering and checking every file), then apply unless ``dry_run``."""
    for name in (EXIM_USER, scanservers.SPAMD_USER, CLAMAV_USER):
        try:
            pwd.getpwnam(name)
        except KeyError:
            raise ProvisionError(f"no user {name}: install the packages first "
                                 "(scripts/setup.sh)") from None  # fmt: skip
    for path in (t.root, t.run_dir, t.log_dir):
        existing = next(p for p in [path, *path.parents] if p.exists())
        if (blocked := first_unsearchable(existing)) is not None:
            raise ProvisionError(f"{blocked} is not searchable by others: Exim ({EXIM_USER}) "
                                 f"and Dovecot could not reach {path}; chmod o+x it")  # fmt: skip
    plan = Plan()
    plan_tree(plan, t)
    plan_runtime(plan, t)
    try:
        render_all(md, t, plan)
    except RenderError as e:
        raise ProvisionError(str(e)) from None
    plan_system(plan, md, t)
    for warning in md.warnings:
        say(f"warning: {md.source}: {warning}")
    verb = "would " if dry_run else ""
    for change in plan.changes:
        say(f"{verb}{change}")
        if not dry_run:
            change.apply()
    if not plan.changes:
        say("nothing to change: the machine already matches the metadata")
    return plan.changes
