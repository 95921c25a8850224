"""A multi-day backup scenario that runs against any Store (file:// here; the gs:// and s3://
emulator tests reuse it): mail added, changed, deleted, a folder renamed, users removed and
added, admin data edited, a certificate symlink switched, one new full set on the way.

``run_days(store, root)`` applies each day's changes to ``root``, runs a backup dated that day
after each, and returns what the tree looked like at each run (``tree_state``);
``check_restores(store, settings, days, scratch)`` restores every day and compares.
"""

from __future__ import annotations

import datetime
import os
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from policy.backup import restore as restore_mod
from policy.backup import run as run_mod
from policy.backup.crypto import Keys
from policy.backup.progress import Progress
from policy.backup.store import Store, StoredObject
from policy.settings import Settings

KEY = "000102030405060708090a0b0c0d0e0f"
IV = "f0e0d0c0b0a090807060504030201000"
OTHER_KEY = "ffeeddccbbaa99887766554433221100"


def backup_settings(root: Path, bucket: str = "gs://test-bucket", **more: object) -> Settings:
    values: dict[str, object] = {
        "root": str(root),
        "backup_openssl_key": KEY,
        "backup_openssl_iv": IV,
        "backup_bucket": bucket,
        "backup_increments": 2,
        "backup_retain": "8 weeks",
        **more,
    }
    return Settings(**values)  # type: ignore[arg-type]


def keys(settings: Settings) -> Keys:
    return Keys.from_hex(settings.backup_openssl_key, settings.backup_openssl_iv)


class Logged:
    """The log lines of one or more runs."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, line: str) -> None:
        self.lines.append(line)


# --- the tree as a restore must give it back -------------------------------------------------

# kind, mode, uid, gid, content or link target, mtime (ns; files only)
Node = tuple[str, int, int, int, bytes | str | None, int | None]


def tree_state(root: Path, only: tuple[str, ...] | None = None) -> dict[str, Node]:
    """Every path under the archived roots (admin paths, domains/<domain>/<user>), with its
    type, mode, owner, content or link target, and mtime (files; directories' mtimes change as
    later archives are applied, and are not compared)."""
    roots = list(only) if only is not None else _roots(root)
    found: dict[str, Node] = {}
    for rel in roots:
        path = root / rel
        if not os.path.lexists(path):
            continue
        found[rel] = _node(path)
        if path.is_dir() and not path.is_symlink():
            for top, dirs, files in os.walk(path):
                for name in dirs + files:
                    p = Path(top) / name
                    found[p.relative_to(root).as_posix()] = _node(p)
    return found


def _roots(root: Path) -> list[str]:
    roots = [p for p in run_mod.ADMIN_PATHS if os.path.lexists(root / p)]
    domains = root / "domains"
    if domains.is_dir():
        for d in sorted(domains.iterdir()):
            if d.is_dir():
                roots += [f"domains/{d.name}/{u.name}" for u in sorted(d.iterdir()) if u.is_dir()]
    return roots


def _node(path: Path) -> Node:
    st = path.lstat()
    if stat.S_ISLNK(st.st_mode):
        return ("link", st.st_mode, st.st_uid, st.st_gid, os.readlink(path), None)
    if stat.S_ISDIR(st.st_mode):
        return ("dir", st.st_mode, st.st_uid, st.st_gid, None, None)
    return ("file", st.st_mode, st.st_uid, st.st_gid, path.read_bytes(), st.st_mtime_ns)


def diff(expected: dict[str, Node], got: dict[str, Node]) -> list[str]:
    out = [f"missing {k}" for k in sorted(set(expected) - set(got))]
    out += [f"extra {k}" for k in sorted(set(got) - set(expected))]
    out += [f"differs {k}: {expected[k]!r} != {got[k]!r}"
            for k in sorted(set(expected) & set(got)) if expected[k] != got[k]]  # fmt: skip
    return out


# --- the days --------------------------------------------------------------------------------


def write(root: Path, rel: str, text: str, mode: int = 0o644) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    os.chmod(path, mode)


def home(domain: str, user: str) -> str:
    return f"domains/{domain}/{user}"


def day1(root: Path) -> None:
    a, b, c = home("example.org", "alice"), home("example.org", "bob"), home("example.net", "carol")
    write(root, f"{a}/Maildir/cur/1.m1:2,S", "Subject: one\n\nfirst\n")
    write(root, f"{a}/Maildir/cur/2.m2:2,", "Subject: two\n\nsecond\n")
    write(root, f"{a}/Maildir/new/3.m3", "Subject: three\n\nthird\n")
    write(root, f"{a}/Maildir/.Sent/cur/4.s1:2,S", "Subject: sent\n\nsent\n")
    write(root, f"{a}/sieve/main.sieve", 'require "fileinto";\n', 0o600)
    os.symlink("sieve/main.sieve", root / a / ".dovecot.sieve")
    write(root, f"{b}/Maildir/cur/5.b1:2,", "Subject: bob\n\nbob\n")
    write(root, f"{c}/Maildir/cur/6.c1:2,", "Subject: carol\n\ncarol\n")
    write(root, "ssl/example.org/2026-01/cert", "CERT 1\n")
    write(root, "ssl/example.org/2026-01/key", "KEY 1\n", 0o600)
    os.symlink("2026-01", root / "ssl/example.org/current")


def day2(root: Path) -> None:
    a = home("example.org", "alice")
    write(root, f"{a}/Maildir/new/7.m4", "Subject: four\n\nfourth\n")
    write(root, f"{a}/Maildir/cur/1.m1:2,S", "Subject: one\n\nfirst, edited\n")
    (root / a / "Maildir/cur/2.m2:2,").unlink()
    with (root / "passwd/example.org").open("a") as f:
        f.write("dave:{PLAIN}secret\n")


def day3(root: Path) -> None:
    a = home("example.org", "alice")
    (root / a / "Maildir/.Sent").rename(root / a / "Maildir/.Archive")
    shutil.rmtree(root / home("example.org", "bob"))
    write(root, f"{home('example.org', 'dave')}/Maildir/cur/8.d1:2,", "Subject: dave\n\ndave\n")
    write(root, "ssl/example.org/2026-03/cert", "CERT 2\n")
    write(root, "ssl/example.org/2026-03/key", "KEY 2\n", 0o600)
    (root / "ssl/example.org/current").unlink()
    os.symlink("2026-03", root / "ssl/example.org/current")


def day4(root: Path) -> None:  # a new full set (backup_increments = 2)
    a = home("example.org", "alice")
    (root / a / "Maildir/new/3.m3").rename(root / a / "Maildir/cur/3.m3:2,S")
    write(root, f"{home('example.net', 'carol')}/Maildir/cur/9.c2:2,", "Subject: c2\n\nc2\n")
    os.chmod(root / a / "Maildir/cur/1.m1:2,S", 0o640)


def day5(root: Path) -> None:
    (root / home("example.org", "alice") / "Maildir/new/7.m4").unlink()
    write(root, "dkim/example.org.key", "DKIM KEY\n", 0o600)  # the admin paths change
    write(root, f"{home('example.org', 'bob')}/Maildir/cur/10.b2:2,", "Subject: back\n\nb\n")


DAYS: list[tuple[datetime.date, Callable[[Path], None]]] = [
    (datetime.date(2026, 3, 1), day1),
    (datetime.date(2026, 3, 2), day2),
    (datetime.date(2026, 3, 3), day3),
    (datetime.date(2026, 3, 4), day4),
    (datetime.date(2026, 3, 5), day5),
]


@dataclass
class Day:
    date: datetime.date
    tree: dict[str, Node]


def run_days(
    store: Store,
    settings: Settings,
    days: list[tuple[datetime.date, Callable[[Path], None]]] = DAYS,
    log: Logged | None = None,
) -> list[Day]:
    root = Path(settings.root)
    done = []
    for date, change in days:
        change(root)
        done.append(Day(date, tree_state(root)))
        run_mod.run(settings, store, today=date, log=log or Logged())
    return done


def check_restores(store: Store, settings: Settings, days: list[Day], scratch: Path) -> None:
    """Restore every day into its own directory; each must equal the tree of that day."""
    for day in days:
        dest = scratch / f"restore-{day.date}"
        restore_mod.restore(store, keys(settings), dest, date=day.date, log=Logged(),
                            progress=Progress(enabled=False))  # fmt: skip
        problems = diff(day.tree, tree_state(dest))
        assert not problems, f"restore of {day.date}:\n" + "\n".join(problems)


# --- stores that fail --------------------------------------------------------------------------


class FailingStore:
    """Delegates to ``inner``; the put whose key ``fail(key)`` accepts raises StoreError
    (an upload cut off midway: the contract says nothing is left under the key)."""

    def __init__(self, inner: Store, fail: Callable[[str], bool]) -> None:
        self.inner, self.fail = inner, fail
        self.url = inner.url

    def put(self, key: str, path: Path) -> None:
        from policy.backup.store import StoreError

        if self.fail(key):
            raise StoreError(f"put {self.url} key {key!r}: connection reset (test)")
        self.inner.put(key, path)

    def get(self, key: str, path: Path) -> None:
        self.inner.get(key, path)

    def list(self, prefix: str = "") -> list[StoredObject]:
        return self.inner.list(prefix)

    def delete(self, key: str) -> None:
        self.inner.delete(key)
