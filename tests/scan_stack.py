"""Real clamd (ClamAV 1.4) and spamd (SpamAssassin 4.0) for the tests, started from a short
temporary directory on Unix sockets (RECIPES.md sections 6 and 7); nothing on the network. The
configuration files and command lines are policy/scanservers.py's, the same `mailpolicy up`
runs.

API contract::

    with Clamd() as clamd:            # started: answers PING; stopped and removed on exit
        clamd.socket                  # its Unix socket (mode 0666)
        clamd.stop(); clamd.start()   # same socket and database again
        clamd.log()

    with Spamd() as spamd:            # the same for spamd (1-2 s to start: Debian's rules)
        spamd.socket

* clamd's database is tiny and local: EICAR as an MD5 (``test.hdb``) and as a body signature
  (``test.ndb``, which also finds EICAR inside a text body), so no freshclam and no download.
  Signatures come out with ClamAV's ``.UNOFFICIAL`` suffix, e.g. ``Test.EICAR-NDB.UNOFFICIAL``.
  ``StreamMaxLength`` is ``stream_max`` (default 1 MB here) so a test can pass it.
* spamd runs Debian's shipped rules (/usr/share/spamassassin) with ``-L`` and a local.cf that
  turns every network test off (``dns_available no``, ``skip_rbl_checks 1``; RECIPES.md:
  without both SA queries the system resolver), no Bayes, no auto-learning.
* Both are run as root by the tests; clamd stays root (no ``User``), spamd's children run as
  ``debian-spamd``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from policy import scanservers

EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
EICAR_NDB = "Test.EICAR-NDB.UNOFFICIAL"
# GTUBE: SpamAssassin's test string (20_body_tests.cf), scores 1000.
GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


def write_clamav_db(directory: Path) -> Path:
    """The two-signature EICAR database (RECIPES.md section 6) in ``directory``."""
    import hashlib

    directory.mkdir(parents=True, exist_ok=True)
    md5 = hashlib.md5(EICAR).hexdigest()
    (directory / "test.hdb").write_text(f"{md5}:{len(EICAR)}:Test.EICAR-HDB\n")
    body = EICAR[:-2].hex()  # the string up to "!$": also found inside longer text
    (directory / "test.ndb").write_text(f"Test.EICAR-NDB:0:*:{body}\n")
    return directory


class _Server:
    name = "server"

    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix=f"{self.name[:2]}.", dir="/tmp"))
        os.chmod(self.base, 0o755)
        self.proc: subprocess.Popen[bytes] | None = None
        self.socket = self.base / f"{self.name}.sock"

    def command(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    def start(self, timeout: float = 60.0) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()
        with (self.base / "stderr").open("ab") as err:
            self.proc = subprocess.Popen(self.command(), stdout=err, stderr=err,
                                         start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.log()}")
            if self.socket.exists() and self.ready():
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.name} did not start in {timeout} s: {self.log()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)

    def log(self) -> str:
        texts = []
        for name in ("stderr", f"{self.name}.log"):
            path = self.base / name
            if path.exists():
                texts.append(path.read_text(errors="replace")[-3000:])
        return "\n".join(texts)

    def __enter__(self) -> _Server:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class Clamd(_Server):
    name = "clamd"

    def __init__(self, stream_max: str = "1M", db: Path | None = None) -> None:
        super().__init__()
        self.db = db or write_clamav_db(self.base / "db")
        self.conf = scanservers.clamd_conf(self.base, self.socket, self.db, stream_max,
                                           socket_mode="666")  # fmt: skip

    def command(self) -> list[str]:
        return scanservers.clamd_command(self.conf)

    def ready(self) -> bool:
        return scanservers.ping_clamd(self.socket)


class Spamd(_Server):
    name = "spamd"

    def __init__(self) -> None:
        super().__init__()
        scanservers.spamd_dirs(self.base)

    def command(self) -> list[str]:
        return scanservers.spamd_command(self.base, self.socket, socket_mode="0666")

    def ready(self) -> bool:
        return scanservers.ping_spamd(self.socket)
