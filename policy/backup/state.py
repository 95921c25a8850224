"""The nightly run's local state, under ``<root>/backups/`` (mode 0700: the tar snapshots list
every file name of every mailbox)::

    .lock                         flock(2)ed by a run; holds the pid of the run that has it
    state/state.json              the last complete run (below)
    state/snapshots/_admin.snar   GNU tar snapshot of each archive after that run
    state/snapshots/<domain>/<user>.snar
    last/<object key>             the encrypted objects and manifest of that run, as in the bucket
    work/                         the run in progress (removed by the next run)

state.json::

    {"format": 1, "bucket": "gs://...", "key_id": "...", "set": "2026-05-01", "seq": 3,
     "date": "2026-05-04", "archives": {"_admin": {"base": 0, "members": [...]},
                                        "example.org/alice": {"base": 0, "members": []}}}

A run builds its new state in ``work/state`` (copies of the snapshots, updated by tar) and
commits it only after its manifest is uploaded: ``state`` -> ``state.old``, ``work/state`` ->
``state``, ``state.old`` removed. ``load`` finishes or undoes a commit a crash interrupted.
Losing the state costs a new full set, nothing else.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from policy.backup import BackupError

FORMAT = 1


class LockedError(BackupError):
    pass


@dataclass(frozen=True, slots=True)
class ArchiveState:
    base: int
    members: tuple[str, ...] = ()


@dataclass(frozen=True)
class State:
    bucket: str
    key_id: str
    set: str
    seq: int
    date: str
    archives: dict[str, ArchiveState] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(
            {"format": FORMAT, "bucket": self.bucket, "key_id": self.key_id, "set": self.set,
             "seq": self.seq, "date": self.date,
             "archives": {name: {"base": a.base, "members": list(a.members)}
                          for name, a in sorted(self.archives.items())}},
            indent=1,
        )  # fmt: skip


def snapshot_path(state_dir: Path, name: str) -> Path:
    return state_dir / "snapshots" / f"{name}.snar"


@contextlib.contextmanager
def lock(backups: Path) -> Iterator[None]:
    """Hold ``backups/.lock`` (flock, released by the kernel if we die) or raise LockedError."""
    path = backups / ".lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
            raise LockedError(
                f"another backup run (pid {holder}) holds {path}: this one does nothing"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def load(backups: Path) -> State | None:
    """The last committed state (None: none, or unreadable - a new full set follows)."""
    current, old = backups / "state", backups / "state.old"
    if old.exists():
        if current.exists():
            shutil.rmtree(old)  # the commit got as far as the new state
        else:
            old.rename(current)  # it stopped between the two renames: keep the old state
    try:
        data = json.loads((current / "state.json").read_text())
        if data.get("format") != FORMAT:
            return None
        archives = {
            str(name): ArchiveState(int(a["base"]), tuple(str(m) for m in a["members"]))
            for name, a in data["archives"].items()
        }
        return State(str(data["bucket"]), str(data["key_id"]), str(data["set"]),
                     int(data["seq"]), str(data["date"]), archives)  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def write(state_dir: Path, state: State) -> None:
    tmp = state_dir / "state.json.tmp"
    with tmp.open("w") as f:
        f.write(state.to_json() + "\n")
        f.flush()
        os.fsync(f.fileno())
    tmp.rename(state_dir / "state.json")


def commit(backups: Path, new_state_dir: Path) -> None:
    current, old = backups / "state", backups / "state.old"
    if current.exists():
        current.rename(old)
    new_state_dir.rename(current)
    shutil.rmtree(old, ignore_errors=True)
