"""GNU tar: make the archives, check what is in them, extract them.

Why GNU tar rather than incremental logic of our own: ``--listed-incremental`` keeps a snapshot
file per archive (every directory's inode and contents at the last run); an increment holds
the files changed since (by mtime or ctime) and, for every directory, the names it had then
(a "dumpdir"). Extracting with ``--listed-incremental=/dev/null`` removes what a dumpdir does
not name, so deletions and directory renames (IMAP RENAME) come back exactly. That logic is
subtle, decades old and in wide use (Amanda, countless backup scripts), and it leaves archives
an admin can restore with nothing but ``openssl`` and ``tar`` (docs/backups.md).

Create: ``tar --create --gzip --format=posix --listed-incremental=SNAPSHOT --no-check-device
--numeric-owner --directory=ROOT -- PATH...`` into a pipe that is encrypted as it is read
(crypto.Sealer), so no plaintext archive touches the disk.

* posix (pax) format: any name length and bytes, nanosecond times, dumpdirs as ``GNU.dumpdir``
  records, and headers Python's tarfile reads exactly as GNU tar does (in the old GNU format
  tar keeps times where tarfile reads a name prefix, so the two would disagree about names).
* ``--no-check-device``: a re-provisioned or re-mounted dataset gets another device number,
  which would make every directory look new and every increment a full.
* Exit status 1 ("file changed as we read it": Maildirs change under a live server) is a
  warning; 2 is a failure.

Check (``check``, before anything is extracted; restore refuses the whole restore on any
finding): every member must be a regular file, directory, symlink or hard link, POSIX-format,
without global or unknown pax records; its name relative, without empty, ``.`` or ``..``
components, and inside the archive's own paths (``domains/<domain>/<user>``, or the admin
paths); no set-uid/set-gid files; a hard link's target the same; a symlink's target relative
and, resolved through every symlink the restore has made so far, inside the restore directory
(absolute targets are refused: they would point into the live system); no member written
through a symlink that leads outside; dumpdir entries plain names (renames: paths inside the
archive's own paths).

Extract: ``tar --extract --gzip --listed-incremental=/dev/null --numeric-owner
--directory=DEST``, archives of a chain in order.
"""

from __future__ import annotations

import os
import subprocess
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from policy.backup import BackupError

CHUNK = 1 << 20
TAR_ENV = {**os.environ, "LC_ALL": "C"}
_POSIX_MAGIC = b"ustar\x0000"
_TYPES = {tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE}
_PAX_KEYS = {"path", "linkpath", "size", "uid", "gid", "uname", "gname", "mtime", "atime",
             "ctime", "GNU.dumpdir", "hdrcharset"}  # fmt: skip
_MAX_HOPS = 40


class UnsafeArchive(BackupError):
    pass


def create(root: Path, paths: Sequence[str], snapshot: Path, sink: Callable[[bytes], None]) -> str:
    """Archive ``paths`` (relative to ``root``) incrementally against ``snapshot`` (updated by
    tar; a missing or empty one makes a full archive), feeding the .tar.gz stream to ``sink``.
    Returns tar's warnings ("" if none); BackupError if tar failed."""
    cmd = ["tar", "--create", "--file=-", "--gzip", "--format=posix",
           f"--listed-incremental={snapshot}", "--no-check-device", "--numeric-owner",
           f"--directory={root}", "--", *paths]  # fmt: skip
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=TAR_ENV)
        assert proc.stdout is not None
        try:
            with proc.stdout:
                while chunk := proc.stdout.read(CHUNK):
                    sink(chunk)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        status = proc.wait()
        err.seek(0)
        said = err.read().decode("utf-8", "replace").strip()
    if status not in (0, 1):
        raise BackupError(f"tar of {' '.join(paths)} failed (exit {status}): {said}")
    return said


def extract(path: Path, dest: Path) -> None:
    """Apply one checked archive to ``dest`` (deletions recorded in its dumpdirs included)."""
    cmd = ["tar", "--extract", f"--file={path}", "--gzip", "--listed-incremental=/dev/null",
           "--numeric-owner", f"--directory={dest}"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, env=TAR_ENV, check=False)
    if proc.returncode != 0:
        said = proc.stderr.decode("utf-8", "replace").strip()
        raise BackupError(f"tar could not extract {path.name} (exit {proc.returncode}): {said}")


class _Header(tarfile.TarInfo):
    """A TarInfo that remembers its header's magic: only POSIX headers are accepted."""

    magic: bytes = b""

    @classmethod
    def frombuf(cls, buf: bytes | bytearray, encoding: str, errors: str) -> Any:
        obj = super().frombuf(buf, encoding, errors)
        obj.magic = bytes(buf[257:265])
        return obj


def check(path: Path, roots: Sequence[str], links: dict[str, str], what: str) -> None:
    """Check every member of the .tar.gz at ``path`` (named ``what`` in errors) against the
    rules above. ``roots``: the paths the archive may hold; ``links``: the symlinks made so far
    in this restore (name -> target), updated. Raises UnsafeArchive."""
    try:
        with tarfile.open(path, "r:gz", tarinfo=_Header) as tf:
            for member in tf:
                assert isinstance(member, _Header)
                _check_member(member, roots, links, what)
            if tf.pax_headers:
                raise UnsafeArchive(f"{what}: global pax header (not made by us)")
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise UnsafeArchive(f"{what}: not a readable .tar.gz: {e}") from None


def _parts(name: str, what: str) -> list[str]:
    parts = name.split("/")
    if name.startswith("/") or "\0" in name or any(p in ("", ".", "..") for p in parts):
        raise UnsafeArchive(f"{what}: member {name!r}: absolute, empty or '..' path")
    return parts


def _inside(name: str, roots: Sequence[str]) -> bool:
    return any(name == r or name.startswith(r + "/") for r in roots)


def _resolve(parts: list[str], links: dict[str, str]) -> list[str] | None:
    """``parts`` resolved through ``links`` inside the restore directory; None if the path
    leaves it (or loops)."""
    out: list[str] = []
    todo = list(parts)
    hops = 0
    while todo:
        part = todo.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            if not out:
                return None
            out.pop()
            continue
        out.append(part)
        target = links.get("/".join(out))
        if target is not None:
            hops += 1
            if hops > _MAX_HOPS or target.startswith("/"):
                return None
            out.pop()
            todo[:0] = target.split("/")
    return out


def _check_member(m: _Header, roots: Sequence[str], links: dict[str, str], what: str) -> None:
    name = m.name
    parts = _parts(name, what)
    if m.magic != _POSIX_MAGIC:
        raise UnsafeArchive(f"{what}: member {name!r}: not a POSIX header")
    if m.type not in _TYPES:
        raise UnsafeArchive(f"{what}: member {name!r}: type {m.type!r} not allowed")
    unknown = set(m.pax_headers) - _PAX_KEYS
    if unknown:
        raise UnsafeArchive(f"{what}: member {name!r}: unexpected pax records {sorted(unknown)}")
    if not _inside(name, roots):
        raise UnsafeArchive(f"{what}: member {name!r} outside {', '.join(roots)}")
    if not m.isdir() and m.mode & 0o6000:
        raise UnsafeArchive(f"{what}: member {name!r} is set-uid or set-gid")
    if _resolve(parts[:-1], links) is None:
        raise UnsafeArchive(f"{what}: member {name!r} would be written through a symlink "
                            "that leads outside")  # fmt: skip
    if m.issym():
        target = m.linkname
        if not target or target.startswith("/") or "\0" in target:
            raise UnsafeArchive(f"{what}: symlink {name!r} -> {target!r}: absolute target")
        if _resolve([*parts[:-1], *target.split("/")], links) is None:
            raise UnsafeArchive(f"{what}: symlink {name!r} -> {target!r} leads outside")
        links[name] = target
        return
    links.pop(name, None)  # a file or directory replaces a symlink of that name
    if m.islnk():
        target = m.linkname
        if not _inside(target, roots) or _resolve(_parts(target, what), links) is None:
            raise UnsafeArchive(f"{what}: hard link {name!r} -> {target!r} outside")
    dumpdir = m.pax_headers.get("GNU.dumpdir")
    if dumpdir is not None:
        _check_dumpdir(name, dumpdir, roots, what)


def _check_dumpdir(name: str, dumpdir: str, roots: Sequence[str], what: str) -> None:
    """A dumpdir: entries "<code><name>\\0" ending with an empty one. Y/N/D name a file or
    directory of this directory; R/T (a renamed directory: from, to) and X (tar's temporary
    name) are paths from the archive's root."""
    for entry in dumpdir.split("\0"):
        if not entry:
            continue
        code, value = entry[0], entry[1:]
        if code in "YND":
            if value in ("", ".", "..") or "/" in value:
                raise UnsafeArchive(f"{what}: {name!r}: bad directory entry {value!r}")
        elif code in "RTX":
            _parts(value, what)
            if not _inside(value, roots):
                raise UnsafeArchive(f"{what}: {name!r}: rename of {value!r} outside")
        else:
            raise UnsafeArchive(f"{what}: {name!r}: unknown directory record {code!r}")


def unsafe_symlinks(root: Path, paths: Sequence[str]) -> list[str]:
    """Symlinks under ``paths`` that a restore would refuse (absolute, or leading outside the
    tree): found at backup time, so the admin hears of them while they can still be fixed."""
    found = []
    stack = [p for p in paths if (root / p).exists() or (root / p).is_symlink()]
    while stack:
        rel = stack.pop()
        path = root / rel
        if path.is_symlink():
            target = os.readlink(path)
            resolved = os.path.normpath(os.path.join(os.path.dirname(rel), target))
            if target.startswith("/") or resolved == ".." or resolved.startswith("../"):
                found.append(f"{rel} -> {target}")
            continue
        try:
            with os.scandir(path) as entries:
                for entry in entries:
                    if entry.is_symlink() or entry.is_dir(follow_symlinks=False):
                        stack.append(f"{rel}/{entry.name}")
        except OSError:
            continue  # not a directory; or unreadable, which tar will report
    return sorted(found)
