"""Backups (policy/backup/, docs/backups.md) against file:// stores: runs over several days,
list, verify, restore of every day, retention, the documented openssl commands, tampered /
truncated / swapped objects, a wrong key, interrupted uploads, the lock, an unconfigured run,
and hand-made malicious archives. tests/backup_scenario.py holds the multi-day scenario, which
the gs:// and s3:// emulator tests run against their stores too.
"""

from __future__ import annotations

import datetime
import fcntl
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from policy import cli
from policy.backup import BackupError, archive, layout, retention, state
from policy.backup import restore as restore_mod
from policy.backup import run as run_mod
from policy.backup.backends import open_url
from policy.backup.crypto import AuthError, Keys, Place, Sealer, authenticate, decrypt_file
from policy.backup.manifest import Entry, Manifest, WrongKeyError, dumps
from policy.backup.progress import Progress
from policy.backup.store import Store, StoreError
from policy.settings import Settings
from tests.backup_scenario import (
    IV,
    KEY,
    OTHER_KEY,
    Day,
    FailingStore,
    Logged,
    backup_settings,
    check_restores,
    day1,
    day2,
    day3,
    diff,
    keys,
    run_days,
    tree_state,
    write,
)
from tests.conftest import REPO, copy_example

D = datetime.date


def store_at(bucket: Path, settings: Settings) -> Store:
    return open_url(bucket.as_uri(), settings)


def quiet() -> Progress:
    return Progress(enabled=False)


@dataclass
class Built:
    root: Path
    bucket: Path
    settings: Settings
    days: list[Day]
    log: Logged

    def store(self) -> Store:
        return store_at(self.bucket, self.settings)

    def copy(self, dest: Path) -> Store:
        """A copy of the bucket to damage."""
        shutil.copytree(self.bucket, dest)
        return store_at(dest, self.settings)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """The five days of tests/backup_scenario.py, backed up once for the whole module."""
    base = tmp_path_factory.mktemp("scenario")
    root = copy_example(base / "srv-mail")
    bucket = base / "bucket"
    bucket.mkdir()
    settings = backup_settings(root, bucket.as_uri())
    log = Logged()
    days = run_days(store_at(bucket, settings), settings, log=log)
    return Built(root, bucket, settings, days, log)


def fresh(tmp_path: Path, **more: object) -> tuple[Settings, Store]:
    root = copy_example(tmp_path / "srv-mail")
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    settings = backup_settings(root, bucket.as_uri(), **more)
    return settings, store_at(bucket, settings)


def keys_in(bucket: Path) -> list[str]:
    return sorted(p.relative_to(bucket).as_posix() for p in bucket.rglob("*") if p.is_file()
                  and ".partial" not in p.parts)  # fmt: skip


# --- runs ------------------------------------------------------------------------------------


def test_runs_make_sets_of_a_full_and_increments(built: Built) -> None:
    sets = layout.scan(built.store())
    assert {n: s.runs() for n, s in sets.items()} == {"2026-03-01": [0, 1, 2], "2026-03-04": [0, 1]}
    assert all(not s.leftovers() for s in sets.values())
    names = keys_in(built.bucket)
    assert "2026-03-01/_admin.0.tar.gz.aes" in names
    assert "2026-03-01/example.org/alice.2.tar.gz.aes" in names
    assert "2026-03-01/example.org/dave.2.tar.gz.aes" in names  # appeared on day 3
    assert "2026-03-01/example.org/bob.2.tar.gz.aes" not in names  # deleted on day 3
    assert [line.split(":")[0] for line in built.log.lines if "run:" not in line] == []
    assert any("set 2026-03-04 run 0: full (2 increments made)" in x for x in built.log.lines)
    # The local state follows the last complete run; its objects are kept in backups/last.
    st = state.load(built.root / "backups")
    assert st is not None and (st.set, st.seq, st.date) == ("2026-03-04", 1, "2026-03-05")
    # bob came back on day 5 (a new chain from run 1), dkim/ appeared (the admin chain restarts).
    assert st.archives["example.org/bob"].base == 1
    assert st.archives["_admin"].base == 1 and "dkim" in st.archives["_admin"].members
    assert st.archives["example.org/alice"].base == 0
    last = built.root / "backups" / "last"
    assert keys_in(last) == sorted(k for k in names if re.match(r"2026-03-04/.*\.1\.", k))
    assert oct((built.root / "backups").stat().st_mode & 0o777) == "0o700"


def test_restore_gives_back_every_day(built: Built, tmp_path: Path) -> None:
    check_restores(built.store(), built.settings, built.days, tmp_path)


def test_restore_one_user_or_one_domain(built: Built, tmp_path: Path) -> None:
    store, k = built.store(), keys(built.settings)
    alice = "domains/example.org/alice"
    r = restore_mod.restore(store, k, tmp_path / "a", date=D(2026, 3, 2), domain="example.org",
                            user="alice", log=Logged(), progress=quiet())  # fmt: skip
    want = {p: n for p, n in built.days[1].tree.items() if p.startswith(alice)}
    assert not diff(want, tree_state(tmp_path / "a"))
    assert sorted(os.listdir(tmp_path / "a")) == ["domains"]
    assert (r.set, r.seq, r.date) == ("2026-03-01", 1, "2026-03-02")
    assert r.files == sum(1 for n in want.values() if n[0] != "dir")
    restore_mod.restore(store, k, tmp_path / "d", date=D(2026, 3, 3), domain="example.org",
                        log=Logged(), progress=quiet())  # fmt: skip
    assert sorted(os.listdir(tmp_path / "d" / "domains" / "example.org")) == ["alice", "dave"]
    assert not (tmp_path / "d" / "domains" / "example.net").exists()
    with pytest.raises(BackupError, match=r"no bob@example\.org in set 2026-03-01 run 2"):
        restore_mod.restore(store, k, tmp_path / "b", date=D(2026, 3, 3), domain="example.org",
                            user="bob", log=Logged(), progress=quiet())  # fmt: skip
    assert not (tmp_path / "b").exists()


def test_restore_admin_data(built: Built, tmp_path: Path) -> None:
    restore_mod.restore(built.store(), keys(built.settings), tmp_path / "r", log=Logged(),
                        progress=quiet())  # fmt: skip
    r = tmp_path / "r"
    assert "dave:{PLAIN}secret" in (r / "passwd/example.org").read_text()
    assert os.readlink(r / "ssl/example.org/current") == "2026-03"
    assert (r / "ssl/example.org/current/key").read_text() == "KEY 2\n"
    assert (r / "ssl/example.org/2026-03/key").stat().st_mode & 0o777 == 0o600
    assert (r / "dkim/example.org.key").read_text() == "DKIM KEY\n"
    assert (r / "exim/conf/global_aliases").read_bytes() == (
        built.root / "exim/conf/global_aliases"
    ).read_bytes()
    assert not (r / "exim/spool").exists()


def test_restore_before_any_run_and_into_a_used_directory(built: Built, tmp_path: Path) -> None:
    store, k = built.store(), keys(built.settings)
    with pytest.raises(BackupError, match="no complete backup run on or before 2026-02-28"):
        restore_mod.restore(store, k, tmp_path / "r", date=D(2026, 2, 28), log=Logged())
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "file").write_text("x")
    with pytest.raises(BackupError, match="exists and is not an empty directory"):
        restore_mod.restore(store, k, tmp_path / "used", log=Logged())
    # A date between runs: the newest run on or before it.
    r = restore_mod.restore(store, k, tmp_path / "later", date=D(2026, 12, 31), log=Logged(),
                            progress=quiet())  # fmt: skip
    assert (r.set, r.seq) == ("2026-03-04", 1)


def test_restore_logs_a_summary_and_draws_a_bar_on_a_terminal(built: Built, tmp_path: Path) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen, log = Terminal(), Logged()
    restore_mod.restore(built.store(), keys(built.settings), tmp_path / "r", log=log,
                        progress=Progress(screen))  # fmt: skip
    assert re.fullmatch(r"backup restore: done: \d+ files, \d+ bytes, [\d.]+ s \(set 2026-03-04 "
                        r"run 1, 2026-03-05\)", log.lines[-1])  # fmt: skip
    assert "\r" in screen.getvalue() and "100%" in screen.getvalue()
    assert "extract" in screen.getvalue()
    assert Progress(io.StringIO()).enabled is False  # not a terminal: no bar


def test_second_run_on_a_day_is_an_increment_and_the_clock_may_not_go_back(
    tmp_path: Path,
) -> None:
    settings, store = fresh(tmp_path, backup_increments=0)
    day1(Path(settings.root))
    for _ in range(2):
        run_mod.run(settings, store, today=D(2026, 3, 1), log=Logged())
    assert {n: s.runs() for n, s in layout.scan(store).items()} == {"2026-03-01": [0, 1]}
    run_mod.run(settings, store, today=D(2026, 3, 2), log=Logged())  # increments = 0: a full
    assert sorted(layout.scan(store)) == ["2026-03-01", "2026-03-02"]
    with pytest.raises(BackupError, match=r"before the last run \(2026-03-02\)"):
        run_mod.run(settings, store, today=D(2026, 3, 1), log=Logged())


# --- list and verify through the command line ------------------------------------------------


def cli_config(tmp_path: Path, settings: Settings, **more: str) -> Path:
    """A settings file for `mailpolicy backup ...`; the bucket named there is gs:// (what the
    settings accept), the command gets the file:// store of the test (``patched_store``)."""
    values = {"root": settings.root, "backup_openssl_key": settings.backup_openssl_key,
              "backup_openssl_iv": settings.backup_openssl_iv,
              "backup_bucket": "gs://test-bucket", **more}  # fmt: skip
    path = tmp_path / "mailpolicy.toml"
    path.write_text("".join(f'{k} = "{v}"\n' for k, v in values.items() if v != ""))
    return path


@pytest.fixture
def patched_store(monkeypatch: pytest.MonkeyPatch) -> list[Store]:
    """`mailpolicy backup` uses the first store in this list."""
    stores: list[Store] = []
    monkeypatch.setattr(cli, "_backup_store", lambda settings: stores[0])
    return stores


def test_list_and_verify(
    built: Built, tmp_path: Path, patched_store: list[Store], capsys: pytest.CaptureFixture[str]
) -> None:
    patched_store.append(built.store())
    config = cli_config(tmp_path, built.settings)
    assert cli.main(["backup", "list", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    print(out)
    assert out.splitlines()[0] == f"{built.bucket.as_uri()}: 2 sets"
    assert re.search(r"^set 2026-03-04: 2 runs, ", out, re.M)
    assert re.search(r"^  run 0   2026-03-04  full +4 archives", out, re.M)
    assert re.search(r"^  run 1   2026-03-05  increment +5 archives", out, re.M)
    assert re.search(r"^  run 2   2026-03-03  increment +4 archives", out, re.M)
    assert out.index("set 2026-03-04") < out.index("set 2026-03-01")  # newest first
    assert cli.main(["backup", "verify", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert out.count("authentic") == 5
    assert "set 2026-03-01 run 2 (2026-03-03): 4 archives authentic" in out
    assert cli.main(["backup", "verify", "--set", "2026-03-04", "--config", str(config)]) == 0
    assert capsys.readouterr().out.count("authentic") == 2
    to = tmp_path / "r"
    argv = ["backup", "restore", "--config", str(config), "--date", "2026-03-02", "--to", str(to)]
    assert cli.main([*argv, "--domain", "example.org", "--user", "alice"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert "backup restore: set 2026-03-01 run 1 (2026-03-02): 2 archives" in err[0]
    assert re.search(r"backup restore: done: 6 files, \d+ bytes, [\d.]+ s", err[-1])
    assert sorted(os.listdir(to / "domains" / "example.org")) == ["alice"]


def test_cli_refuses_bad_usage(
    tmp_path: Path, patched_store: list[Store], capsys: pytest.CaptureFixture[str]
) -> None:
    settings, _ = fresh(tmp_path)
    config = str(cli_config(tmp_path, settings, backup_bucket=""))
    assert cli.main(["backup", "list", "--config", config]) == 2
    assert "backups are not configured (backup_bucket unset)" in capsys.readouterr().err
    config = str(cli_config(tmp_path, settings))
    assert cli.main(["backup", "restore", "--config", config, "--user", "a", "--to", "x"]) == 2
    assert "--user needs --domain" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["backup", "restore", "--config", config, "--date", "May 3", "--to", "x"])
    assert "'May 3' is not a date (YYYY-MM-DD)" in capsys.readouterr().err
    assert patched_store == []


# --- damage ---------------------------------------------------------------------------------

A = "2026-03-01"


def flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


OBJ = f"{A}/example.org/alice.1.tar.gz.aes"
FAILS = "authentication failed"


def resealed(bucket: Path) -> None:
    """Another object for the same place, sealed with the right key: authentic, but not the
    one the manifest names (what an older upload, replayed, would be)."""
    path = bucket / OBJ
    with path.open("wb") as f:
        sealer = Sealer(Keys.from_hex(KEY, IV), Place("user", A, "example.org", "alice", 1), f)
        sealer.write(b"something else")
        sealer.close()


# What is done to the bucket, and what the refusal says.
DAMAGE = {
    "tampered": (lambda b: flip(b / OBJ), FAILS),
    "truncated": (lambda b: (b / OBJ).write_bytes((b / OBJ).read_bytes()[:-40]),
                  "not a whole object"),
    "cut to whole blocks": (lambda b: (b / OBJ).write_bytes((b / OBJ).read_bytes()[:-48]), FAILS),
    "swapped with another user": (
        lambda b: shutil.copy(b / A / "example.net/carol.1.tar.gz.aes", b / OBJ), FAILS),
    "swapped with another run": (
        lambda b: shutil.copy(b / A / "example.org/alice.2.tar.gz.aes", b / OBJ), FAILS),
    "swapped with another set": (
        lambda b: shutil.copy(b / "2026-03-04/example.org/alice.1.tar.gz.aes", b / OBJ), FAILS),
    "tag replaced": (lambda b: (b / OBJ).write_bytes((b / OBJ).read_bytes()[:-32] + bytes(32)),
                     FAILS),
    "replaced by another authentic object": (resealed, "not the object the manifest names"),
    "manifest edited": (lambda b: (b / A / "_manifest.1.json").write_bytes(
        (b / A / "_manifest.1.json").read_bytes().replace(b'"date":"2026-03-02"',
                                                          b'"date":"2026-03-09"')), FAILS),
    "manifest swapped": (
        lambda b: shutil.copy(b / A / "_manifest.2.json", b / A / "_manifest.1.json"), FAILS),
}  # fmt: skip


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_objects_are_refused_before_anything_is_written(
    built: Built, tmp_path: Path, damage: str, capsys: pytest.CaptureFixture[str]
) -> None:
    bucket = tmp_path / "bucket"
    store = built.copy(bucket)
    change, says = DAMAGE[damage]
    change(bucket)
    target = tmp_path / "out" / "restore"
    target.parent.mkdir()
    with pytest.raises(AuthError) as refused:
        restore_mod.restore(store, keys(built.settings), target, date=D(2026, 3, 3),
                            log=Logged(), progress=quiet())  # fmt: skip
    print(refused.value)
    assert "2026-03-01/" in str(refused.value) and says in str(refused.value)
    assert os.listdir(tmp_path / "out") == []  # no target, no scratch directory left
    assert restore_mod.verify(store, keys(built.settings), sys.stdout) > 0
    assert "FAILED" in capsys.readouterr().out
    # The other set is untouched and restores.
    restore_mod.restore(store, keys(built.settings), tmp_path / "ok", date=D(2026, 3, 5),
                        log=Logged(), progress=quiet())  # fmt: skip


@pytest.mark.parametrize("which", ["key", "iv"])
def test_a_wrong_key_is_refused_as_such(
    built: Built,
    tmp_path: Path,
    which: str,
    patched_store: list[Store],
    capsys: pytest.CaptureFixture[str],
) -> None:
    wrong = (
        backup_settings(built.root, backup_openssl_key=OTHER_KEY)
        if which == "key"
        else backup_settings(built.root, backup_openssl_iv=OTHER_KEY)
    )
    store = built.store()
    for call in (
        lambda: restore_mod.restore(store, keys(wrong), tmp_path / "r", log=Logged()),
        lambda: restore_mod.list_sets(store, keys(wrong), io.StringIO()),
        lambda: restore_mod.verify(store, keys(wrong), io.StringIO()),
    ):
        with pytest.raises(WrongKeyError, match=r"written with another key .* wrong key"):
            call()
    assert not (tmp_path / "r").exists()
    patched_store.append(store)
    config = cli_config(tmp_path, wrong)
    argv = ["backup", "restore", "--config", str(config), "--to", str(tmp_path / "r")]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "wrong key" in err
    assert KEY not in err and OTHER_KEY not in err  # the key is never logged


# --- the documented openssl commands ---------------------------------------------------------


def doc_block(name: str) -> str:
    text = (REPO / "docs" / "backups.md").read_text()
    m = re.search(rf"<!-- tests/test_backup.py runs this block: {name} -->\n```sh\n(.*?)```", text,
                  re.S)  # fmt: skip
    assert m, f"no block {name} in docs/backups.md"
    return m.group(1)


def doc_variables() -> dict[str, str]:
    text = (REPO / "docs" / "backups.md").read_text()
    return dict(re.findall(r"^(KEY|IV|F)=(\S+)", text, re.M))


def test_the_documented_openssl_commands_decrypt_and_authenticate(tmp_path: Path) -> None:
    """The docs' commands, verbatim, on an object a real run made (alice's run 3 of the set of
    2026-05-01, the object the docs name), with the docs' key and IV."""
    variables = doc_variables()
    assert (variables["KEY"], variables["IV"]) == (KEY, IV)
    settings, store = fresh(tmp_path, backup_increments=28)
    root = Path(settings.root)
    for n in range(4):
        write(root, f"domains/example.org/alice/Maildir/cur/{n}.x:2,", f"Subject: {n}\n\n{n}\n")
        run_mod.run(settings, store, today=D(2026, 5, 1 + n), log=Logged())
    bucket = tmp_path / "bucket"
    obj = bucket / variables["F"]
    assert obj.is_file()
    env = {**os.environ, **variables}

    def sh(script: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["sh", "-e", "-c", script], cwd=bucket, env=env, text=True,
                              capture_output=True, check=False)  # fmt: skip

    done = sh(doc_block("decrypt"))
    assert done.returncode == 0, done.stderr
    ours = io.BytesIO()
    decrypt_file(keys(settings), obj, ours)
    assert (bucket / "plain.tar.gz").read_bytes() == ours.getvalue()
    listing = subprocess.run(["tar", "-tzf", "plain.tar.gz"], cwd=bucket, capture_output=True,
                             text=True, check=True).stdout.split()  # fmt: skip
    assert listing == ["domains/example.org/alice/", "domains/example.org/alice/Maildir/",
                       "domains/example.org/alice/Maildir/cur/",
                       "domains/example.org/alice/Maildir/cur/3.x:2,"]  # fmt: skip
    done = sh(doc_block("authenticate"))
    assert done.stdout == "authentic\n", done.stderr
    flip(obj)
    assert sh(doc_block("authenticate")).stdout == ""
    # Every object has its own IV.
    ivs = {p.read_bytes()[:16] for p in bucket.rglob("*.aes")}
    assert len(ivs) == len(list(bucket.rglob("*.aes")))


# --- interrupted runs -------------------------------------------------------------------------


def test_an_interrupted_increment_is_redone_by_the_next_run(tmp_path: Path) -> None:
    settings, store = fresh(tmp_path)
    root, backups = Path(settings.root), Path(settings.root) / "backups"
    day1(root)
    tree1 = tree_state(root)
    run_mod.run(settings, store, today=D(2026, 3, 1), log=Logged())
    day2(root)
    broken = FailingStore(store, lambda key: key.endswith("example.org/bob.1.tar.gz.aes"))
    with pytest.raises(StoreError, match="connection reset"):
        run_mod.run(settings, broken, today=D(2026, 3, 2), log=Logged())
    listing = layout.scan(store)["2026-03-01"]
    assert listing.runs() == [0] and listing.leftovers()  # alice.1 and _admin.1 went up
    st = state.load(backups)
    assert st is not None and st.seq == 0
    out = io.StringIO()
    restore_mod.list_sets(store, keys(settings), out)
    assert "objects of an interrupted run" in out.getvalue()
    day3(root)
    tree3 = tree_state(root)
    log = Logged()
    run_mod.run(settings, store, today=D(2026, 3, 3), log=log)
    assert "set 2026-03-01 run 1: increment" in log.lines[0]
    listing = layout.scan(store)["2026-03-01"]
    assert listing.runs() == [0, 1] and not listing.leftovers()
    assert not (tmp_path / "bucket" / "2026-03-01/example.org/bob.1.tar.gz.aes").exists()
    check_restores(store, settings, [Day(D(2026, 3, 3), tree3), Day(D(2026, 3, 2), tree1)],
                   tmp_path)  # fmt: skip


def test_an_interrupted_full_is_redone_or_removed(tmp_path: Path) -> None:
    settings, store = fresh(tmp_path)
    root = Path(settings.root)
    day1(root)
    no_manifest = FailingStore(store, lambda key: "_manifest" in key)
    with pytest.raises(StoreError):
        run_mod.run(settings, no_manifest, today=D(2026, 3, 1), log=Logged())
    assert not layout.scan(store)["2026-03-01"].complete
    assert state.load(root / "backups") is None
    with pytest.raises(StoreError):  # the next day fails too: its set is incomplete as well
        run_mod.run(settings, no_manifest, today=D(2026, 3, 2), log=Logged())
    log = Logged()
    run_mod.run(settings, store, today=D(2026, 3, 2), log=log)  # redone the same day
    sets = layout.scan(store)
    assert list(sets) == ["2026-03-02"] and sets["2026-03-02"].runs() == [0]
    assert any("deleted incomplete set 2026-03-01" in line for line in log.lines)
    check_restores(store, settings, [Day(D(2026, 3, 2), tree_state(root))], tmp_path)


def test_a_crash_between_manifest_and_local_state_is_harmless(tmp_path: Path) -> None:
    settings, store = fresh(tmp_path)
    root, backups = Path(settings.root), Path(settings.root) / "backups"
    days = []
    for n, change in enumerate((day1, day2, day3)):
        if n == 2:  # the run of day 2 made it to the bucket, but its state was lost
            shutil.rmtree(backups / "state")
            shutil.copytree(tmp_path / "state-after-day1", backups / "state")
        change(root)
        days.append(Day(D(2026, 3, 1 + n), tree_state(root)))
        run_mod.run(settings, store, today=days[-1].date, log=Logged())
        if n == 0:
            shutil.copytree(backups / "state", tmp_path / "state-after-day1")
    # Run 2 builds on run 0's snapshots, but comes after run 1: every day restores exactly.
    assert layout.scan(store)["2026-03-01"].runs() == [0, 1, 2]
    check_restores(store, settings, days, tmp_path)


def test_an_interrupted_commit_is_finished_or_undone(tmp_path: Path) -> None:
    backups = tmp_path
    (backups / "state.old").mkdir()
    state.write(backups / "state.old", state.State("b", "k", "2026-03-01", 4, "2026-03-05"))
    assert state.load(backups) == state.State("b", "k", "2026-03-01", 4, "2026-03-05")
    assert (backups / "state").is_dir() and not (backups / "state.old").exists()
    (backups / "state.old").mkdir()  # left over after a commit that got through
    assert state.load(backups) is not None and not (backups / "state.old").exists()


# --- the lock and an unconfigured run ------------------------------------------------------


def test_two_runs_never_overlap(
    tmp_path: Path, patched_store: list[Store], capsys: pytest.CaptureFixture[str]
) -> None:
    settings, store = fresh(tmp_path)
    backups = Path(settings.root) / "backups"
    with open(backups / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("4242\n")
        held.flush()
        with pytest.raises(state.LockedError, match=r"another backup run \(pid 4242\) holds"):
            run_mod.run(settings, store, today=D(2026, 3, 1), log=Logged())
        patched_store.append(store)
        config = cli_config(tmp_path, settings)
        assert cli.main(["backup", "run", "--config", str(config), "--now", "2026-03-01"]) == 1
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and "another backup run (pid 4242) holds" in err[0]
    assert keys_in(tmp_path / "bucket") == []
    run_mod.run(settings, store, today=D(2026, 3, 1), log=Logged())  # released: runs
    assert layout.scan(store)["2026-03-01"].complete


@pytest.mark.parametrize("unset", ["backup_openssl_key", "backup_openssl_iv", "backup_bucket"])
def test_unconfigured_run_says_so_in_one_line_and_does_nothing(
    tmp_path: Path, unset: str, patched_store: list[Store], capsys: pytest.CaptureFixture[str]
) -> None:
    settings, _ = fresh(tmp_path)
    config = cli_config(tmp_path, settings, **{unset: ""})
    before = sorted(os.listdir(Path(settings.root) / "backups"))
    assert cli.main(["backup", "run", "--config", str(config)]) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1, err
    assert re.search(rf"event backup run: not configured \({unset} unset\): nothing done$", err[0])
    assert sorted(os.listdir(Path(settings.root) / "backups")) == before  # no lock, no state
    assert patched_store == []  # no store was even opened


def test_the_cron_hook_runs_mailpolicy_backup_run(tmp_path: Path) -> None:
    settings, _ = fresh(tmp_path)
    config = cli_config(tmp_path, settings, backup_openssl_key="")
    env = {**os.environ, "MAILPOLICY": f"{sys.executable} -m policy"}
    hook = [str(REPO / "hooks" / "backup"), "--config", str(config)]
    p = subprocess.run(hook, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout == ""
    assert p.stderr.count("\n") == 1
    assert "backup run: not configured (backup_openssl_key unset): nothing done" in p.stderr


# --- retention ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("retain", "cutoff"),
    [
        ("8 weeks", D(2026, 3, 6)),
        ("30 days", D(2026, 4, 1)),
        ("1 day", D(2026, 4, 30)),
        ("3 months", D(2026, 2, 1)),
        ("2 Fortnights", D(2026, 4, 3)),
        ("1 year", D(2025, 5, 1)),
        ("  12 MONTHS ", D(2025, 5, 1)),
        ("0 days", D(2026, 5, 1)),
    ],
)
def test_retain_durations(retain: str, cutoff: D) -> None:
    assert retention.cutoff(D(2026, 5, 1), retain) == cutoff


def test_retain_months_keep_to_the_calendar() -> None:
    assert retention.cutoff(D(2026, 5, 31), "3 months") == D(2026, 2, 28)
    assert retention.cutoff(D(2028, 2, 29), "1 year") == D(2027, 2, 28)


@pytest.mark.parametrize(
    "retain", ["8 wekes", "", "8", "weeks", "-1 days", "1.5 weeks", "1 week 2 days", "8 weeks ago"]
)
def test_retain_other_text_is_refused(
    retain: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(BackupError, match="is not a duration like '8 weeks'"):
        retention.cutoff(D(2026, 5, 1), retain)
    if retain == "8 wekes":
        settings, _ = fresh(tmp_path)
        config = cli_config(tmp_path, settings, backup_retain=retain)
        assert cli.main(["backup", "run", "--config", str(config)]) == 2
        assert "backup_retain '8 wekes' is not a duration" in capsys.readouterr().err


def listing(name: str, runs: list[int], extra: list[int] | None = None) -> layout.SetListing:
    s = layout.SetListing(name)
    for seq in runs + (extra or []):
        key = layout.archive_key(name, "_admin", seq)
        s.objects[key], s.seq_of[key] = 1, seq
    for seq in runs:
        key = layout.manifest_key(name, seq)
        s.objects[key], s.seq_of[key] = 1, seq
        s.manifests.add(seq)
    return s


def test_retention_plan() -> None:
    sets = {s.name: s for s in [
        listing("2026-01-01", [0, 1]),
        listing("2026-02-01", [], [0]),  # incomplete, older than the newest: goes
        listing("2026-03-01", [0, 1], [2]),  # an interrupted run 2: its objects go
        listing("2026-04-01", [0]),
        listing("2026-04-20", [], [0]),  # incomplete, even the newest: goes
    ]}  # fmt: skip
    doomed, leftovers = retention.plan(sets, before=D(2026, 3, 15))
    assert doomed == ["2026-01-01", "2026-02-01", "2026-03-01", "2026-04-20"]
    assert leftovers == []
    doomed, leftovers = retention.plan(sets, before=D(2026, 2, 15))
    assert doomed == ["2026-01-01", "2026-02-01", "2026-04-20"]
    assert leftovers == ["2026-03-01/_admin.2.tar.gz.aes"]
    # Everything past retention: the newest complete set is kept all the same.
    doomed, _ = retention.plan(sets, before=D(2027, 1, 1))
    assert "2026-04-01" not in doomed and "2026-03-01" in doomed


def test_retention_deletes_old_sets_and_keeps_the_newest_complete_one(tmp_path: Path) -> None:
    settings, store = fresh(tmp_path, backup_increments=0, backup_retain="2 days")
    root = Path(settings.root)
    day1(root)
    log = Logged()
    for n in range(1, 6):
        write(root, f"domains/example.org/alice/Maildir/cur/{n}.r:2,", "x\n")
        run_mod.run(settings, store, today=D(2026, 3, n), log=log)
    assert sorted(layout.scan(store)) == ["2026-03-03", "2026-03-04", "2026-03-05"]
    assert sum("deleted complete set" in line for line in log.lines) == 2
    # A long-lived set (increments 28) older than retention is the newest complete: it stays.
    settings = Settings(**{**settings.__dict__, "backup_increments": 28, "backup_retain": "1 week"})
    run_mod.run(settings, store, today=D(2026, 3, 30), log=Logged())  # an increment of 03-05
    assert sorted(layout.scan(store)) == ["2026-03-05"]
    assert layout.scan(store)["2026-03-05"].runs() == [0, 1]
    # Manifests go first: a set half deleted looks incomplete, never complete.
    order: list[str] = []
    recording = FailingStore(store, lambda key: False)
    recording.delete = lambda key: (order.append(key), store.delete(key))[1]  # type: ignore[method-assign]
    retention.apply(recording, {"2026-03-05": layout.scan(store)["2026-03-05"],
                                "2026-04-01": listing("2026-04-01", [0])}, D(2026, 4, 1),
                    Logged())  # fmt: skip
    assert order[:2] == ["2026-03-05/_manifest.1.json", "2026-03-05/_manifest.0.json"]


# --- malicious archives ---------------------------------------------------------------------

HOME = "domains/example.org/alice"


def member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"x\n", link: str = "",
           mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes]:  # fmt: skip
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, link, mode
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, data


def tar_gz(members: list[tuple[tarfile.TarInfo, bytes]], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=fmt) as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


def forge(store: Store, k: Keys, runs: list[bytes], work: Path) -> None:
    """Upload ``runs`` (tar.gz each) as alice's archives of set 2026-03-01, encrypted and
    authenticated with the right key, with their manifests: only the member check stands
    between them and the disk."""
    entries: list[Entry] = []
    for seq, data in enumerate(runs):
        path = work / f"forged.{seq}"
        with path.open("wb") as f:
            sealer = Sealer(k, Place("user", A, "example.org", "alice", seq), f)
            sealer.write(data)
            tag = sealer.close()
        store.put(layout.archive_key(A, "example.org/alice", seq), path)
        entries = [Entry("user", "example.org", "alice", 0, sealer.size, tag)]
        (work / "m").write_bytes(dumps(k, Manifest(A, seq, f"2026-03-0{seq + 1}", "-", k.key_id,
                                                  tuple(entries))))  # fmt: skip
        store.put(layout.manifest_key(A, seq), work / "m")


def evil_cases(tmp: Path) -> dict[str, list[list[tuple[tarfile.TarInfo, bytes]]]]:
    return {
        "dotdot": [[member(f"{HOME}/x"), member("../x")]],
        "dotdot inside": [[member(f"{HOME}/../../../../x")]],
        "absolute": [[member(str(tmp / "abs"))]],
        "symlink escape": [
            [member(f"{HOME}/evil", tarfile.SYMTYPE, link="../../../.."), member(f"{HOME}/evil/x")]
        ],
        "absolute symlink": [
            [member(f"{HOME}/evil", tarfile.SYMTYPE, link=str(tmp)), member(f"{HOME}/evil/x")]
        ],
        "symlink escape over two runs": [
            [member(f"{HOME}/up", tarfile.SYMTYPE, link="../../..")],  # the restore root: fine
            [member(f"{HOME}/up/esc", tarfile.SYMTYPE, link=".."), member(f"{HOME}/up/esc/x")],
        ],
        "hard link outside": [[member(f"{HOME}/h", tarfile.LNKTYPE, link="passwd/example.org")]],
        "another home": [[member("domains/example.org/bob/x")]],
        "device": [[member(f"{HOME}/null", tarfile.CHRTYPE)]],
        "set-uid": [[member(f"{HOME}/sh", mode=0o4755)]],
    }


@pytest.mark.parametrize("case", list(evil_cases(Path("/x"))))
def test_malicious_archives_are_refused_and_nothing_is_written(tmp_path: Path, case: str) -> None:
    settings, store = fresh(tmp_path)
    k = keys(settings)
    forge(store, k, [tar_gz(m) for m in evil_cases(tmp_path)[case]], tmp_path)
    target = tmp_path / "out" / "r"
    target.parent.mkdir()
    with pytest.raises(archive.UnsafeArchive) as refused:
        restore_mod.restore(store, k, target, log=Logged(), progress=quiet())
    print(refused.value)
    assert os.listdir(tmp_path / "out") == []
    assert not (tmp_path / "x").exists() and not (tmp_path / "abs").exists()
    assert restore_mod.verify(store, k, io.StringIO()) == 0  # authentic: we "wrote" them


def test_a_harmless_forged_archive_restores(tmp_path: Path) -> None:
    """The forging helper itself works: the refusals above are the member checks."""
    settings, store = fresh(tmp_path)
    forge(store, keys(settings), [tar_gz([member(f"{HOME}/ok", data=b"fine\n"),
                                          member(f"{HOME}/l", tarfile.SYMTYPE, link="ok")])],
          tmp_path)  # fmt: skip
    restore_mod.restore(store, keys(settings), tmp_path / "r", log=Logged(), progress=quiet())
    assert (tmp_path / "r" / HOME / "l").read_text() == "fine\n"


def check_members(members: list[tuple[tarfile.TarInfo, bytes]], fmt: int = tarfile.PAX_FORMAT,
                  tmp: Path = Path("/nonexistent")) -> None:  # fmt: skip
    path = tmp / "a.tar.gz"
    path.write_bytes(tar_gz(members, fmt))
    archive.check(path, [HOME], {}, "test")


def test_member_check_details(tmp_path: Path) -> None:
    ok = [member(HOME, tarfile.DIRTYPE), member(f"{HOME}/Maildir/cur/1:2,S"),
          member(f"{HOME}/.dovecot.sieve", tarfile.SYMTYPE, link="sieve/x"),
          member(f"{HOME}/hard", tarfile.LNKTYPE, link=f"{HOME}/Maildir/cur/1:2,S")]  # fmt: skip
    check_members(ok, tmp=tmp_path)
    dumpdir = member(f"{HOME}/Maildir", tarfile.DIRTYPE)
    dumpdir[0].pax_headers = {"GNU.dumpdir": "Ycur\0Nnew\0\0"}
    check_members([dumpdir], tmp=tmp_path)

    def directory(dumpdir: str) -> Member:
        return _with_pax(member(f"{HOME}/d", tarfile.DIRTYPE), {"GNU.dumpdir": dumpdir})

    pax = tarfile.PAX_FORMAT
    refused = {
        "old GNU header": ([member(f"{HOME}/x")], tarfile.GNU_FORMAT),
        "dumpdir entry with a path": ([directory("Y../x\0\0")], pax),
        "rename outside": (
            [directory("Rdomains/x\0Tdomains/y\0\0")],
            pax,
        ),
        "unknown pax record": ([_with_pax(member(f"{HOME}/x"), {"GNU.sparse.name": "../x"})], pax),
        "empty component": ([member(f"{HOME}//x")], pax),
        "fifo": ([member(f"{HOME}/p", tarfile.FIFOTYPE)], pax),
    }
    for why, (members, fmt) in refused.items():
        with pytest.raises(archive.UnsafeArchive):
            check_members(members, fmt, tmp_path)
            pytest.fail(f"accepted: {why}")
    (tmp_path / "junk.tar.gz").write_bytes(b"not gzip")
    with pytest.raises(archive.UnsafeArchive, match="not a readable"):
        archive.check(tmp_path / "junk.tar.gz", [HOME], {}, "junk")


Member = tuple[tarfile.TarInfo, bytes]


def _with_pax(m: Member, pax: dict[str, str]) -> Member:
    m[0].pax_headers = dict(pax)
    return m


def test_a_home_whose_name_cannot_be_a_key_is_named_and_the_run_goes_on(tmp_path: Path) -> None:
    settings, store = fresh(tmp_path)
    root = Path(settings.root)
    day1(root)
    write(root, "domains/example.org/two words/Maildir/cur/1", "x\n")
    log = Logged()
    result = run_mod.run(settings, store, today=D(2026, 3, 1), log=log)
    assert result.problems == 1 and result.archives == 4
    assert any("'" + str(root / "domains/example.org/two words") + "': a name that cannot be"
               in line for line in log.lines)  # fmt: skip
    assert layout.scan(store)["2026-03-01"].complete


def test_backup_warns_of_symlinks_restore_would_refuse(tmp_path: Path) -> None:
    settings, store = fresh(tmp_path)
    root = Path(settings.root)
    day1(root)
    os.symlink("/srv/mail/ssl/example.org/2026-01", root / "ssl/example.org/absolute")
    log = Logged()
    run_mod.run(settings, store, today=D(2026, 3, 1), log=log)
    assert any("symlink ssl/example.org/absolute -> /srv/mail" in x and "restore will refuse"
               in x for x in log.lines)  # fmt: skip
    with pytest.raises(archive.UnsafeArchive, match="absolute target"):
        restore_mod.restore(store, keys(settings), tmp_path / "r", log=Logged(), progress=quiet())


# --- the object format ----------------------------------------------------------------------


def test_objects_round_trip_with_their_own_iv(tmp_path: Path) -> None:
    k = Keys.from_hex(KEY, IV)
    place = Place("user", A, "example.org", "alice", 3)
    for n, data in enumerate([b"", b"x" * 15, b"y" * 16, os.urandom(100_000)]):
        objs = []
        for copy in range(2):
            path = tmp_path / f"{n}.{copy}"
            with path.open("wb") as f:
                s = Sealer(k, place, f)
                s.write(data)
                tag = s.close()
            assert authenticate(k, place, path, "t") == tag
            out = io.BytesIO()
            assert decrypt_file(k, path, out) == len(data) and out.getvalue() == data
            objs.append(path.read_bytes())
        assert objs[0][:16] != objs[1][:16]  # a fresh IV each time
        for other in (Place("user", A, "example.org", "bob", 3), Place("admin", A, "", "", 3),
                      Place("user", A, "example.org", "alice", 4)):  # fmt: skip
            with pytest.raises(AuthError):
                authenticate(k, other, tmp_path / f"{n}.0", "t")
    with pytest.raises(AuthError):
        authenticate(Keys.from_hex(OTHER_KEY, IV), place, tmp_path / "0.0", "t")
    with pytest.raises(BackupError, match="32 hex digits"):
        Keys.from_hex("00", IV)
    # The key id depends on the key and the IV, and is what manifests carry.
    ids = {Keys.from_hex(a, b).key_id for a in (KEY, OTHER_KEY) for b in (IV, OTHER_KEY)}
    assert len(ids) == 4
    m = Manifest(A, 0, A, "-", k.key_id, ())
    text = dumps(k, m)
    assert json.loads(text.split(b"\n")[0])["key_id"] == k.key_id
