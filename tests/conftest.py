"""Shared fixtures.

* ``tree``: a private copy of the bundled example tree (examples/srv-mail) to edit freely.
* ``make_tree``: build a tree from ``{relative path: text}``.
* ``short_dir``: a short directory under /tmp for Unix sockets (AF_UNIX paths max 107 bytes,
  and pytest's tmp_path is long).
* ``start_daemon``: start ``python -m policy serve`` as a real subprocess on a socket in
  ``short_dir``, wait until it answers PING, stop it (SIGTERM) at teardown.
* ``request``-free client helper ``ask(socket, line) -> reply``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Settings that keep a test daemon off the network (tests/offline.toml): the default for every
# daemon the tests start, unless a test gives its own configuration.
OFFLINE = REPO / "tests" / "offline.toml"
EXAMPLE = REPO / "examples" / "srv-mail"
PRIMARY_HOSTNAME = "mail.example.org"


def copy_example(dest: Path) -> Path:
    """A copy of the example tree without what `mailpolicy up` may have left in it (spool,
    Maildirs, certificates): the admin's files only, as a fresh checkout has them."""

    def state(directory: str, names: list[str]) -> list[str]:
        rel = Path(directory).relative_to(EXAMPLE).as_posix()
        if rel in ("exim/spool", "domains"):
            return [n for n in names if n != ".gitkeep"]
        if rel == "ssl":
            return [n for n in names if (Path(directory) / n).is_dir()]
        return []

    shutil.copytree(EXAMPLE, dest, ignore=state)
    return dest


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return copy_example(tmp_path / "srv-mail")


@pytest.fixture
def make_tree(tmp_path: Path) -> Callable[[dict[str, str]], Path]:
    def make(files: dict[str, str]) -> Path:
        root = tmp_path / "tree"
        for rel, text in files.items():
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        root.mkdir(exist_ok=True)
        return root

    return make


@pytest.fixture
def short_dir() -> Iterator[Path]:
    d = tempfile.mkdtemp(prefix="mp.", dir="/tmp")
    os.chmod(d, 0o755)
    try:
        yield Path(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def ask(sock_path: str | os.PathLike[str], line: bytes, timeout: float = 10.0) -> bytes:
    """One request the way Exim's ${readsocket} sends it: write, shut down, read to EOF."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(os.fspath(sock_path))
        s.sendall(line)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    socket: Path
    log: Path
    root: Path

    def ask(self, line: bytes, timeout: float = 10.0) -> bytes:
        return ask(self.socket, line, timeout)

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise
        return self.proc.returncode


def wait_for_ping(sock_path: Path, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {proc.returncode}")
        try:
            if ask(sock_path, b"PING\n", 1.0).startswith(b"PONG"):
                return
        except OSError:
            pass
        time.sleep(0.02)
    raise RuntimeError("daemon did not answer PING in time")


def offline_settings() -> dict[str, object]:
    import tomllib

    with OFFLINE.open("rb") as f:
        return dict(tomllib.load(f))


@pytest.fixture
def start_daemon(short_dir: Path) -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []

    def start(
        root: Path,
        *extra: str,
        config: dict[str, object] | None = None,
        name: str = "p.sock",
        **popen: object,
    ) -> Daemon:
        sock = short_dir / name
        log = short_dir / f"{name}.log"
        args = [
            sys.executable,
            "-m",
            "policy",
            "serve",
            "--root",
            str(root),
            "--socket",
            str(sock),
            "--log-file",
            str(log),
            "--primary-hostname",
            PRIMARY_HOSTNAME,
        ]
        if "--config" not in extra:
            # The offline settings, then the test's own (later keys win in the file).
            cfg = short_dir / f"{name}.toml"
            settings = {**offline_settings(), **(config or {})}
            cfg.write_text(
                "".join(
                    f"{k} = {str(v).lower() if isinstance(v, bool) else repr(v)}\n"
                    if not isinstance(v, str)
                    else f'{k} = "{v}"\n'
                    for k, v in settings.items()
                )
            )
            args += ["--config", str(cfg)]
        proc = subprocess.Popen([*args, *extra], cwd=REPO, **popen)  # type: ignore[call-overload]
        d = Daemon(proc, sock, log, root)
        started.append(d)
        wait_for_ping(sock, proc)
        return d

    yield start
    for d in started:
        with contextlib.suppress(Exception):
            d.stop(timeout=10)
