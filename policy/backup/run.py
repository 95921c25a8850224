"""The nightly run (``mailpolicy backup run``, which cron starts through ``hooks/backup``).

1. Nothing at all if backup_openssl_key, backup_openssl_iv or backup_bucket is unset (the CLI
   logs one line and exits 0); a bad backup_retain is refused before anything is done.
2. ``<root>/backups/.lock`` is taken; a second run exits with a message (state.py).
3. ``decide``: the next run of the current set (its number: one past the last run with a
   manifest, so a run interrupted before its manifest is redone under the same number), or a
   new full set dated today - after ``backup_increments`` increments, on the first run, when
   the bucket or key changed, or when the set in the bucket is gone or has a run missing.
   At most one full per day: a second run on the day of a full is an increment.
4. One archive for the admin data (``ADMIN_PATHS`` that exist) and one per user home
   (``domains/<domain>/<user>``), each incremental against its own tar snapshot: a user who
   appears (or whose snapshot is missing), or admin paths that changed, start a new chain with
   a full archive (manifest ``base``). Each is encrypted as tar writes it
   (``<root>/backups/work/objects/<key>``) and uploaded.
5. The manifest, uploaded last: only now is the run complete. A failure before this leaves
   the bucket's complete runs and the local state as they were; the next run cleans up and
   does the work again.
6. The new local state is committed; this run's objects become ``<root>/backups/last/``.
7. Retention (retention.py).
"""

from __future__ import annotations

import datetime
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from policy.backup import BackupError, archive, layout, retention, state
from policy.backup.crypto import Keys, Place, Sealer
from policy.backup.manifest import Entry, Manifest, dumps
from policy.backup.state import ArchiveState, State
from policy.backup.store import Store, StoreError
from policy.settings import Settings

# The admin's data (DESIGN.md's tree), each archived if it exists. exim/spool is left out:
# messages in transit are minutes old and re-created by the senders' retries.
ADMIN_PATHS = ("passwd", "aliases", "dkim", "ssl", "dovecot", "exim/conf")
Log = Callable[[str], None]


def missing_settings(settings: Settings) -> list[str]:
    """The settings a backup needs that are unset (the CLI then logs one line, does nothing)."""
    names = ("backup_openssl_key", "backup_openssl_iv", "backup_bucket")
    return [n for n in names if not getattr(settings, n)]


@dataclass(frozen=True)
class Plan:
    set: str
    seq: int
    previous: State | None  # whose snapshots the increments continue (None: a new full set)
    why_full: str = ""


def decide(
    previous: State | None,
    sets: dict[str, layout.SetListing],
    today: str,
    increments: int,
    key_id: str,
    bucket: str,
) -> Plan:
    if previous is None:
        why = "no previous set (first run, or the local state is gone)"
    elif previous.key_id != key_id or previous.bucket != bucket:
        why = "the bucket or the key changed"
    elif (listing := sets.get(previous.set)) is None or not listing.complete:
        why = f"set {previous.set} is gone from the bucket"
    elif previous.seq not in listing.runs() or max(listing.manifests) >= len(listing.runs()):
        why = f"set {previous.set} has a run missing in the bucket"
    else:
        seq = len(listing.runs())
        if seq <= increments or previous.set == today:
            return Plan(previous.set, seq, previous)
        why = f"{increments} increments made"
    existing = sets.get(today)
    if existing is not None and existing.complete:
        raise BackupError(
            f"the bucket already holds a complete set {today} that this run cannot continue "
            f"({why}); the next full set can start tomorrow: nothing done"
        )
    return Plan(today, 0, None, why)


@dataclass(frozen=True)
class Source:
    kind: str
    domain: str
    user: str
    paths: tuple[str, ...]

    @property
    def name(self) -> str:
        return layout.archive_name(self.kind, self.domain, self.user)


def sources(root: Path, log: Log) -> tuple[list[Source], int]:
    """What to archive, and how many homes had to be left out (named in the log)."""
    found = []
    admin = tuple(p for p in ADMIN_PATHS if os.path.lexists(root / p))
    if admin:
        found.append(Source("admin", "", "", admin))
    problems = 0
    domains = root / "domains"
    for domain in sorted(os.listdir(domains)) if domains.is_dir() else []:
        if not (domains / domain).is_dir() or (domains / domain).is_symlink():
            continue  # .gitkeep and the like: not a domain
        for user in sorted(os.listdir(domains / domain)):
            home = domains / domain / user
            if home.is_symlink() or not home.is_dir():
                continue
            if not (layout.valid_name(domain) and layout.valid_name(user)):
                log(f"backup run: warning: {str(home)!r}: a name that cannot be an object "
                    "key: not backed up")  # fmt: skip
                problems += 1
                continue
            found.append(Source("user", domain, user, (f"domains/{domain}/{user}",)))
    return found, problems


@dataclass
class Result:
    set: str
    seq: int
    archives: int
    bytes: int
    seconds: float
    problems: int  # homes left out, retention failures: the run counts, the exit status is 1


def run(settings: Settings, store: Store, *, today: datetime.date, log: Log) -> Result:
    started = time.monotonic()
    keys = Keys.from_hex(settings.backup_openssl_key, settings.backup_openssl_iv)
    before = retention.cutoff(today, settings.backup_retain)
    root = Path(settings.root)
    if not root.is_dir():
        raise BackupError(f"{root}: no such directory")
    backups = root / "backups"
    backups.mkdir(mode=0o700, exist_ok=True)
    os.chmod(backups, 0o700)
    with state.lock(backups):
        previous = state.load(backups)
        if previous is not None and today.isoformat() < previous.date:
            raise BackupError(f"today ({today}) is before the last run ({previous.date}): "
                              "is the clock wrong? nothing done")  # fmt: skip
        sets = layout.scan(store)
        plan = decide(previous, sets, today.isoformat(), settings.backup_increments,
                      keys.key_id, store.url)  # fmt: skip
        kind = "increment" if plan.previous else f"full ({plan.why_full})"
        log(f"backup run: set {plan.set} run {plan.seq}: {kind}, to {store.url}")
        # What an interrupted run left in this set: objects no manifest will ever name.
        if plan.set in sets:
            listing = sets[plan.set]
            for key in listing.objects if not listing.complete else listing.leftovers():
                store.delete(key)
        work = backups / "work"
        shutil.rmtree(work, ignore_errors=True)
        objects, new_state = work / "objects", work / "state"
        (new_state / "snapshots").mkdir(parents=True)
        found, problems = sources(root, log)
        entries, archived = [], {}
        for source in found:
            entry = _archive(root, source, plan, keys, backups, new_state, objects, store, log)
            entries.append(entry)
            archived[source.name] = ArchiveState(entry.base, entry.members)
        finished = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        manifest = Manifest(plan.set, plan.seq, today.isoformat(), finished, keys.key_id,
                            tuple(entries))  # fmt: skip
        key = layout.manifest_key(plan.set, plan.seq)
        (objects / key).parent.mkdir(parents=True, exist_ok=True)
        (objects / key).write_bytes(dumps(keys, manifest))
        store.put(key, objects / key)
        # Complete in the bucket: now the local state may move on.
        state.write(new_state, State(store.url, keys.key_id, plan.set, plan.seq,
                                     today.isoformat(), archived))  # fmt: skip
        state.commit(backups, new_state)
        _keep_last(backups, objects)
        shutil.rmtree(work, ignore_errors=True)
        try:
            retention.apply(store, layout.scan(store), before, log)
        except (StoreError, OSError) as e:
            log(f"backup run: retention failed (the backup itself is complete): {e}")
            problems += 1
    size = sum(e.size for e in entries)
    result = Result(plan.set, plan.seq, len(entries), size, time.monotonic() - started, problems)
    log(f"backup run: done: set {result.set} run {result.seq}, {result.archives} archives, "
        f"{result.bytes} bytes, {result.seconds:.1f} s")  # fmt: skip
    return result


def _archive(
    root: Path,
    source: Source,
    plan: Plan,
    keys: Keys,
    backups: Path,
    new_state: Path,
    objects: Path,
    store: Store,
    log: Log,
) -> Entry:
    name = source.name
    members = source.paths if source.kind == "admin" else ()
    snapshot = state.snapshot_path(new_state, name)
    snapshot.parent.mkdir(parents=True, exist_ok=True)
    old = plan.previous.archives.get(name) if plan.previous else None
    old_snapshot = state.snapshot_path(backups / "state", name)
    if old is not None and old.members == members and old_snapshot.is_file():
        shutil.copyfile(old_snapshot, snapshot)
        base = old.base
    else:
        base = plan.seq  # no snapshot: tar makes a full archive, the start of a new chain
    for link in archive.unsafe_symlinks(root, source.paths):
        log(f"backup run: warning: symlink {link} is absolute or leads outside {root}: "
            "restore will refuse it (make it relative and inside)")  # fmt: skip
    key = layout.archive_key(plan.set, name, plan.seq)
    path = objects / key
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        sealer = Sealer(keys, Place(source.kind, plan.set, source.domain, source.user, plan.seq), f)
        said = archive.create(root, source.paths, snapshot, sealer.write)
        tag = sealer.close()
    if said:
        log(f"backup run: tar warning for {name}: {' | '.join(said.splitlines())}")
    store.put(key, path)
    return Entry(source.kind, source.domain, source.user, base, sealer.size, tag, members)


def _keep_last(backups: Path, objects: Path) -> None:
    last, old = backups / "last", backups / "last.old"
    shutil.rmtree(old, ignore_errors=True)
    if last.exists():
        last.rename(old)
    objects.rename(last)
    shutil.rmtree(old, ignore_errors=True)
