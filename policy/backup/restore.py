"""Reading the bucket back: ``backup list``, ``backup verify``, ``backup restore``.

Everything is authenticated before it is used: a manifest by its tag (a manifest written with
another key is named "wrong key"), an archive by its tag, its size and the tag its manifest
recorded. Only a run whose manifests 0..n are all present (layout.SetListing.runs) is read.

Restore of ``--date D`` (default: the newest run) picks the newest complete run made on or
before D and applies, for the admin data and each user home in that run's manifest (or only
those of ``--domain``/``--user``), the archives of runs base..n in order. In phases, so that a
refusal writes nothing into the target:

1. every object is downloaded into a private directory beside the target and authenticated;
2. each is decrypted there and its members checked (archive.check: paths contained, no
   escaping symlinks ...);
3. only then is the target made, and the archives extracted into it with GNU tar.

The target must not exist or be empty: restoring over a live tree would mix two states (copy
what you need from the restored tree instead). Files keep their owners (numeric ids) and modes.
"""

from __future__ import annotations

import datetime
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from policy.backup import BackupError, archive, layout
from policy.backup.crypto import AuthError, Keys, Place, authenticate, decrypt_file
from policy.backup.manifest import MAX_SIZE, Entry, Manifest, WrongKeyError, loads
from policy.backup.progress import Progress, human
from policy.backup.store import Store

Log = Callable[[str], None]


@contextmanager
def _scratch(parent: Path | None = None) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=".mailpolicy-restore.", dir=parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class _Reader:
    def __init__(self, store: Store, keys: Keys, scratch: Path) -> None:
        self.store, self.keys, self.scratch = store, keys, scratch

    def where(self, key: str) -> str:
        return f"{self.store.url.rstrip('/')}/{key}"

    def manifest(self, set_name: str, seq: int) -> Manifest:
        key = layout.manifest_key(set_name, seq)
        path = self.scratch / "manifest"
        self.store.get(key, path)
        if path.stat().st_size > MAX_SIZE:
            raise AuthError(f"{self.where(key)}: too large for a manifest")
        data = path.read_bytes()
        path.unlink()
        return loads(self.keys, data, set_name, seq, self.where(key))

    def manifests(self, listing: layout.SetListing) -> list[Manifest]:
        return [self.manifest(listing.name, seq) for seq in listing.runs()]

    def archive(self, set_name: str, entry: Entry, seq: int, path: Path) -> None:
        """Download the archive ``entry`` of run ``seq`` into ``path`` and authenticate it."""
        key = layout.archive_key(set_name, entry.name, seq)
        self.store.get(key, path)
        where = self.where(key)
        place = Place(entry.kind, set_name, entry.domain, entry.user, seq)
        tag = authenticate(self.keys, place, path, where)
        if tag != entry.tag or path.stat().st_size != entry.size:
            raise AuthError(f"{where}: authentic, but not the object the manifest names "
                            "(an older upload?)")  # fmt: skip


# --- list --------------------------------------------------------------------------------


def list_sets(store: Store, keys: Keys, out: TextIO) -> int:
    """Print the sets and their runs; returns the number of runs that failed to authenticate."""
    sets = layout.scan(store)
    out.write(f"{store.url}: {len(sets)} sets\n")
    bad = 0
    with _scratch() as scratch:
        reader = _Reader(store, keys, scratch)
        for name, listing in sorted(sets.items(), reverse=True):
            if not listing.complete:
                out.write(
                    f"set {name}: incomplete (no manifest for run 0: an interrupted "
                    f"full, deleted by the next run), {len(listing.objects)} objects\n"
                )
                continue
            runs = listing.runs()
            out.write(f"set {name}: {len(runs)} runs, {human(listing.size)}\n")
            for seq in runs:
                try:
                    m = reader.manifest(name, seq)
                except WrongKeyError:
                    raise
                except AuthError as e:
                    out.write(f"  run {seq}: NOT AUTHENTIC: {e}\n")
                    bad += 1
                    break
                kind = "full" if seq == 0 else "increment"
                size = sum(e.size for e in m.entries)
                out.write(f"  run {seq:<3} {m.date}  {kind:<9} {len(m.entries):>5} archives "
                          f"{human(size):>10}\n")  # fmt: skip
            leftovers = listing.leftovers()
            if leftovers:
                out.write(f"  and {len(leftovers)} objects of an interrupted run (removed by "
                          "the next run)\n")  # fmt: skip
    return bad


# --- verify ------------------------------------------------------------------------------


def verify(
    store: Store,
    keys: Keys,
    out: TextIO,
    only_set: str | None = None,
    progress: Progress | None = None,
) -> int:
    """Download every archive of every complete run (of ``only_set``) and check it; nothing is
    decrypted. Prints a line per run; returns the number of failures."""
    sets = layout.scan(store)
    if only_set is not None:
        if only_set not in sets:
            raise BackupError(f"no set {only_set} in {store.url}")
        sets = {only_set: sets[only_set]}
    progress = progress or Progress(enabled=False)
    failures = 0
    with _scratch() as scratch:
        reader = _Reader(store, keys, scratch)
        for name, listing in sets.items():
            if not listing.complete:
                out.write(f"set {name}: incomplete (no manifest for run 0), not verified\n")
                continue
            try:
                manifests = reader.manifests(listing)
            except WrongKeyError:
                raise
            except AuthError as e:
                out.write(f"set {name}: FAILED: {e}\n")
                failures += 1
                continue
            progress.start(f"verify {name}", sum(e.size for m in manifests for e in m.entries))
            for m in manifests:
                bad = []
                for entry in m.entries:
                    try:
                        reader.archive(name, entry, m.seq, scratch / "object")
                    except (AuthError, BackupError) as e:
                        bad.append(str(e))
                    finally:
                        (scratch / "object").unlink(missing_ok=True)
                    progress.advance(entry.size)
                if bad:
                    failures += len(bad)
                    out.write("".join(f"set {name} run {m.seq}: FAILED: {b}\n" for b in bad))
                else:
                    out.write(f"set {name} run {m.seq} ({m.date}): {len(m.entries)} archives "
                              "authentic\n")  # fmt: skip
            progress.end()
    return failures


# --- restore -----------------------------------------------------------------------------


@dataclass
class Restored:
    set: str
    seq: int
    date: str
    archives: int  # objects applied
    files: int  # in the restored tree (not directories)
    bytes: int  # of its regular files
    seconds: float


@dataclass(frozen=True)
class _Step:
    entry: Entry
    seq: int
    roots: tuple[str, ...]


def _pick(reader: _Reader, sets: dict[str, layout.SetListing], date: str) -> list[Manifest]:
    """The manifests 0..n of the newest complete run made on or before ``date``."""
    for name in sorted(sets, reverse=True):
        listing = sets[name]
        if name > date or not listing.complete:
            continue
        manifests = reader.manifests(listing)
        chosen = [m for m in manifests if m.date <= date]
        if chosen:
            return manifests[: chosen[-1].seq + 1]
    raise BackupError(f"no complete backup run on or before {date} in {reader.store.url}")


def _steps(manifests: list[Manifest], domain: str | None, user: str | None) -> list[_Step]:
    target = manifests[-1]
    wanted = [
        e
        for e in target.entries
        if (domain is None and e.kind == "admin")
        or (e.kind == "user" and domain in (None, e.domain) and user in (None, e.user))
    ]
    if not wanted:
        who = f"{user}@{domain}" if user else f"domain {domain}"
        raise BackupError(f"no {who} in set {target.set} run {target.seq} ({target.date})")
    steps = []
    for e in sorted(wanted, key=lambda e: (e.kind != "admin", e.name)):
        roots = e.members if e.kind == "admin" else (f"domains/{e.domain}/{e.user}",)
        for seq in range(e.base, target.seq + 1):
            old = manifests[seq].entry(e.name)
            if old is None or old.base != e.base:
                raise BackupError(f"set {target.set}: run {seq} lacks {e.name}, which run "
                                  f"{target.seq} builds on: the set is broken")  # fmt: skip
            steps.append(_Step(old, seq, roots))
    return steps


def restore(
    store: Store,
    keys: Keys,
    dest: Path,
    *,
    date: datetime.date | None = None,
    domain: str | None = None,
    user: str | None = None,
    log: Log,
    progress: Progress | None = None,
) -> Restored:
    started = time.monotonic()
    progress = progress or Progress()
    dest = dest.absolute()
    if dest.is_symlink() or (dest.exists() and (not dest.is_dir() or any(dest.iterdir()))):
        raise BackupError(f"{dest}: exists and is not an empty directory")
    if not dest.parent.is_dir():
        raise BackupError(f"{dest.parent}: no such directory")
    sets = layout.scan(store)
    with _scratch(dest.parent) as scratch:
        reader = _Reader(store, keys, scratch)
        manifests = _pick(reader, sets, (date or datetime.date.max).isoformat())
        target = manifests[-1]
        steps = _steps(manifests, domain, user)
        total = sum(s.entry.size for s in steps)
        log(f"backup restore: set {target.set} run {target.seq} ({target.date}): "
            f"{len(steps)} archives, {human(total)} into {dest}")  # fmt: skip
        files = [scratch / f"{i:06d}" for i in range(len(steps))]
        progress.start("download and authenticate", total)
        for step, path in zip(steps, files, strict=True):
            reader.archive(target.set, step.entry, step.seq, path.with_suffix(".aes"))
            progress.advance(step.entry.size)
        progress.end()
        progress.start("decrypt and check", total)
        links: dict[str, str] = {}
        for step, path in zip(steps, files, strict=True):
            encrypted = path.with_suffix(".aes")
            with path.with_suffix(".tar.gz").open("wb") as f:
                decrypt_file(keys, encrypted, f)
            encrypted.unlink()
            what = reader.where(layout.archive_key(target.set, step.entry.name, step.seq))
            archive.check(path.with_suffix(".tar.gz"), step.roots, links, what)
            progress.advance(step.entry.size)
        progress.end()
        dest.mkdir(mode=0o700, exist_ok=True)
        progress.start("extract", total)
        for step, path in zip(steps, files, strict=True):
            try:
                archive.extract(path.with_suffix(".tar.gz"), dest)
            except BackupError as e:
                raise BackupError(f"{e}; {dest} is partly restored") from None
            path.with_suffix(".tar.gz").unlink()
            progress.advance(step.entry.size)
        progress.end()
    count, size = _tally(dest)
    result = Restored(target.set, target.seq, target.date, len(steps), count, size,
                      time.monotonic() - started)  # fmt: skip
    log(f"backup restore: done: {result.files} files, {result.bytes} bytes, "
        f"{result.seconds:.1f} s (set {result.set} run {result.seq}, {result.date})")  # fmt: skip
    return result


def _tally(dest: Path) -> tuple[int, int]:
    files = size = 0
    for top, dirs, names in os.walk(dest):
        for name in names + [d for d in dirs if os.path.islink(os.path.join(top, d))]:
            files += 1
            st = os.lstat(os.path.join(top, name))
            if not os.path.islink(os.path.join(top, name)):
                size += st.st_size
    return files, size
