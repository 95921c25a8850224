"""A local clamd (ClamAV) and spamd (SpamAssassin) on Unix sockets: their configuration files
and command lines, for ``mailpolicy up`` (policy/up.py) and the tests' scanner stack
(tests/scan_stack.py). Nothing here listens on the network or asks it (RECIPES.md sections 6
and 7).

* clamd reads the databases of one directory (``clamav_databases`` tells whether it holds any:
  clamd refuses to start without one), stays root (no ``User`` line) and answers INSTREAM on
  its socket; ``StreamMaxLength`` bounds what one scan takes (a longer message is an error for
  the virus check, never a clean result).
* spamd runs Debian's shipped rules (``/usr/share/spamassassin``) with ``-L`` (local tests only)
  and a local.cf that turns every network test off (``dns_available no``, ``skip_rbl_checks``;
  without both SpamAssassin queries the system resolver), no Bayes, no auto-learning. Its parent
  runs as root, its children as ``debian-spamd``.
"""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

CLAMD = shutil.which("clamd") or "/usr/sbin/clamd"
SPAMD = shutil.which("spamd") or "/usr/sbin/spamd"
SPAMD_USER = "debian-spamd"
SA_RULES = "/usr/share/spamassassin"  # Debian's shipped rules: no sa-update needed
SA_PLUGINS = Path("/etc/spamassassin")  # its *.pre files load the plugins

# File name suffixes of ClamAV signature databases (signatures.md of ClamAV 1.4: the signed
# containers, hashes, body, logical, container-metadata, icon and YARA signatures). A directory
# holding none of these makes clamd exit: "cli_loaddbdir: No supported database files found".
CLAMAV_DB_SUFFIXES = frozenset({".cvd", ".cld", ".cud", ".hdb", ".hsb", ".hdu", ".hsu", ".mdb",
                                ".msb", ".mdu", ".msu", ".ndb", ".ndu", ".ldb", ".ldu", ".cdb",
                                ".idb", ".yar", ".yara"})  # fmt: skip

SA_LOCAL_CF = """\
dns_available no
skip_rbl_checks 1
use_bayes 0
bayes_auto_learn 0
use_razor2 0
use_pyzor 0
report_safe 0
required_score 5.0
"""


def clamav_databases(directory: Path) -> list[Path]:
    """The ClamAV signature databases in ``directory`` (sorted; none if it does not exist)."""
    if not directory.is_dir():
        return []
    return sorted(
        p for p in directory.iterdir() if p.suffix.lower() in CLAMAV_DB_SUFFIXES and p.is_file()
    )


def clamd_conf(
    base: Path,
    socket_path: Path,
    database: Path,
    stream_max: str = "25M",
    socket_mode: str = "660",
    log: Path | None = None,
) -> Path:
    """Write ``<base>/clamd.conf`` for a clamd answering on ``socket_path`` from the databases
    in ``database``; its temporary files and pid file in ``base``, its log there too unless
    ``log`` names it."""
    (base / "tmp").mkdir(parents=True, exist_ok=True)
    conf = base / "clamd.conf"
    log = log or base / "clamd.log"
    text = clamd_conf_text(socket_path, database, base / "tmp", base / "clamd.pid", log,
                           stream_max, socket_mode)  # fmt: skip
    conf.write_text(text)
    return conf


def clamd_conf_text(socket_path: Path, database: Path, tmp: Path, pid: Path, log: Path,
                    stream_max: str = "25M", socket_mode: str = "660",
                    user: str = "") -> str:  # fmt: skip
    """clamd.conf: INSTREAM on ``socket_path`` only (no TCP), in the foreground (a supervisor
    or the caller watches it), the databases of ``database``; as ``user`` after start-up when
    one is named (it then needs ``tmp``)."""
    return (
        (f"User {user}\n" if user else "")
        + f"LocalSocket {socket_path}\nLocalSocketMode {socket_mode}\nFixStaleSocket yes\n"
        f"DatabaseDirectory {database}\nTemporaryDirectory {tmp}\n"
        f"PidFile {pid}\nLogFile {log}\nLogTime yes\n"
        f"Foreground yes\nStreamMaxLength {stream_max}\nMaxThreads 4\nScanMail yes\n"
        "Bytecode no\n"
    )


def clamd_command(conf: Path) -> list[str]:
    return [CLAMD, "-c", str(conf)]


def spamd_dirs(base: Path, local_cf: str = SA_LOCAL_CF) -> Path:
    """``<base>/sa/{etc,home,log}``: the plugins' .pre files and ``local_cf`` (default
    SA_LOCAL_CF: no network tests) in etc/ (the site configuration), home/ and log/ owned by
    spamd's user. Returns ``<base>/sa``."""
    sa = base / "sa"
    for sub in ("etc", "home", "log"):
        (sa / sub).mkdir(parents=True, exist_ok=True)
    for pre in SA_PLUGINS.glob("*.pre"):
        shutil.copy(pre, sa / "etc")
    (sa / "etc" / "local.cf").write_text(local_cf)
    for sub in ("home", "log"):
        shutil.chown(sa / sub, SPAMD_USER, SPAMD_USER)
    return sa


def spamd_command(
    base: Path,
    socket_path: Path,
    socket_mode: str = "0660",
    log: Path | None = None,
    local_only: bool = True,
    pid: Path | None = None,
) -> list[str]:
    """spamd on ``socket_path`` with the site configuration spamd_dirs(base) wrote; its pid
    file in ``base`` unless ``pid`` names it, its log there too unless ``log`` names it.
    ``local_only``: ``-L``, no network tests (tests, ``mailpolicy up``); a provisioned server
    runs them (DNS blocklists, URIBL)."""
    sa = base / "sa"
    return [SPAMD, f"--siteconfigpath={sa / 'etc'}", f"--configpath={SA_RULES}",
            *(["-L"] if local_only else []), "-x", "-u", SPAMD_USER, "-H", str(sa / "home"),
            f"--socketpath={socket_path}", f"--socketmode={socket_mode}",
            f"--pidfile={pid or base / 'spamd.pid'}", "--max-children=2", "--min-children=1",
            f"--syslog={log or base / 'spamd.log'}"]  # fmt: skip


def ping_clamd(path: Path, timeout: float = 2.0) -> bool:
    """clamd answers PING on ``path``."""
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(timeout)
            s.connect(str(path))
            s.sendall(b"zPING\0")
            return s.recv(100).startswith(b"PONG")
    except OSError:
        return False


def ping_spamd(path: Path, timeout: float = 2.0) -> bool:
    """spamd answers PING on ``path``."""
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(timeout)
            s.connect(str(path))
            s.sendall(b"PING SPAMC/1.5\r\n\r\n")
            return b"PONG" in s.recv(100)
    except OSError:
        return False
