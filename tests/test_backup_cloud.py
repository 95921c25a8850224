"""Backups (policy/backup/, docs/backups.md) against real servers on loopback: moto's S3 server
(``s3://`` with ``backup_s3_endpoint``) and gcp-storage-emulator (``gs://`` with
``backup_gcs_endpoint``), every test once per backend.

What runs is what cron runs: ``mailpolicy backup run|list|verify|restore`` (``policy.cli.main``,
in this process) with a settings file naming the bucket and the endpoint, so the store comes
from ``open_store`` as in production; restores of every day also go through
``policy.backup.restore`` directly (tests/backup_scenario.py's ``check_restores``).

* the five days of tests/backup_scenario.py (mail added, changed, deleted, a folder renamed,
  users removed and added, admin data edited, a new full set on the way), in a bucket with a
  prefix: the sets and runs in the server's own listing, every day restored equal to the tree
  of that day, list / verify / restore through the command line;
* an object downloaded from the server and decrypted (and authenticated) with the commands of
  docs/backups.md, by the real ``openssl``;
* a tampered, truncated or swapped object (or manifest) in a copy of the bucket: the restore
  refuses before writing anything, verify names it; a wrong key is refused as such;
* retention deleting old sets from the server, keeping the newest complete one;
* an upload cut off midway (a TCP proxy that stops forwarding after a budget of bytes, then
  resets every connection, while a large archive goes up as a multipart / resumable upload):
  the run fails, nothing incomplete looks complete, and the next run, with the network back,
  completes and restores exactly - for an interrupted increment and an interrupted full (on
  S3 the cut multipart upload stays on the server, invisible: policy/backup/backends.py).

Servers are module-scoped, on free ports, in this process (each xdist worker has its own);
every test makes its own buckets. The loopback guard of tests/test_backup_store.py is on for
the whole module (module scope: the scenario is built in a module fixture): any connection or
name lookup for anything but loopback fails, dummy AWS credentials are in the environment, and
no ~/.aws or gcloud files are read.
"""

from __future__ import annotations

import datetime
import io
import os
import re
import socket
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from policy import cli
from policy.backup import BackupError, layout, state
from policy.backup import restore as restore_mod
from policy.backup.backends import GCSStore, S3Store, open_store
from policy.backup.crypto import AuthError, decrypt_file
from policy.backup.progress import Progress
from policy.backup.store import Store
from policy.settings import Settings, load
from tests.backup_scenario import (
    DAYS,
    IV,
    KEY,
    OTHER_KEY,
    Day,
    Logged,
    check_restores,
    day1,
    day2,
    day3,
    diff,
    keys,
    tree_state,
    write,
)
from tests.conftest import copy_example
from tests.test_backup import doc_block, doc_variables, flip
from tests.test_backup_store import (
    FAST,
    Backend,
    CutProxy,
    MiB,
    _gcs_admin,
    _s3_admin,
    _start_gcs,
    _start_s3,
    guard_loopback,
)

pytestmark = pytest.mark.integration

D = datetime.date
PREFIX = "mail/host1"


# --- the loopback guard, servers, backends ------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def loopback_only(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """tests/test_backup_store.py's guard, for the whole module: only loopback is reachable,
    dummy AWS credentials, no credential or config files of the machine's."""
    with pytest.MonkeyPatch.context() as mp:
        guard_loopback(mp, tmp_path_factory.mktemp("no-cloud-config"))
        yield


def test_the_guard_is_on() -> None:
    with pytest.raises(OSError, match="test guard"):
        socket.create_connection(("192.0.2.1", 443), timeout=1)
    with pytest.raises(OSError, match="test guard"):
        socket.getaddrinfo("storage.googleapis.com", 443)
    assert os.environ["AWS_ACCESS_KEY_ID"] == "testing"


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    server, endpoint = _start_s3()
    yield endpoint
    server.stop()


@pytest.fixture(scope="module")
def gcs_endpoint() -> Iterator[str]:
    server, endpoint = _start_gcs()
    yield endpoint
    server.stop()


@pytest.fixture(scope="module", params=["s3", "gs"])
def backend(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Backend:
    fixture = "s3_endpoint" if request.param == "s3" else "gcs_endpoint"
    endpoint = request.getfixturevalue(fixture)
    return Backend(request.param, endpoint, tmp_path_factory.mktemp(request.param))


def write_config(path: Path, root: Path, backend: Backend, url: str, *,
                 endpoint: str | None = None, **more: object) -> Path:  # fmt: skip
    """A settings file as an admin writes it: the bucket, the endpoint of its kind, the key."""
    values: dict[str, object] = {
        "root": str(root),
        "backup_openssl_key": KEY,
        "backup_openssl_iv": IV,
        "backup_bucket": url,
        "backup_increments": 2,
        "backup_retain": "8 weeks",
        f"backup_{'s3' if backend.kind == 's3' else 'gcs'}_endpoint": endpoint or backend.endpoint,
        **more,
    }
    lines = [f"{k} = {v}" if isinstance(v, int) else f'{k} = "{v}"' for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def mailpolicy(*argv: str | Path) -> int:
    """``mailpolicy backup ...``, in this process (the guard applies)."""
    return cli.main(["backup", *(str(a) for a in argv)])


def server_keys(backend: Backend, url: str) -> dict[str, int]:
    """What the server itself lists in the bucket (full object names), with sizes."""
    bucket = url.split("://", 1)[1].split("/", 1)[0]
    if backend.kind == "s3":
        client = _s3_admin(backend.endpoint)
        found = {}
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            found.update({o["Key"]: int(o["Size"]) for o in page.get("Contents", ())})
        return found
    return {b.name: int(b.size) for b in _gcs_admin(backend.endpoint).list_blobs(bucket)}


def copy_bucket(backend: Backend, src: Store, url: str, tmp: Path) -> Store:
    """Every object of ``src`` into the (new) bucket ``url``, through the stores."""
    dst = backend.open(url)
    for obj in src.list():
        src.get(obj.key, tmp / "object")
        dst.put(obj.key, tmp / "object")
    (tmp / "object").unlink(missing_ok=True)
    return dst


def quiet() -> Progress:
    return Progress(enabled=False)


# --- the five days, once per backend ------------------------------------------------------------


@dataclass
class Built:
    backend: Backend
    url: str  # with its prefix
    root: Path
    config: Path
    settings: Settings
    days: list[Day]
    log: list[str]

    def store(self) -> Store:
        return open_store(self.settings, FAST)


@pytest.fixture(scope="module")
def built(backend: Backend, tmp_path_factory: pytest.TempPathFactory) -> Built:
    """tests/backup_scenario.py's five days, each backed up by ``mailpolicy backup run``
    into a bucket (with a prefix) on the server."""
    base = tmp_path_factory.mktemp(f"scenario-{backend.kind}")
    root = copy_example(base / "srv-mail")
    url = backend.within(backend.new_bucket(), PREFIX)
    config = write_config(base / "mailpolicy.toml", root, backend, url)
    log = base / "backup.log"
    days = []
    for date, change in DAYS:
        change(root)
        days.append(Day(date, tree_state(root)))
        status = mailpolicy("run", "--config", config, "--now", date.isoformat(), "--log-file", log)
        assert status == 0, log.read_text()
    return Built(backend, url, root, config, load(str(config)), days, log.read_text().splitlines())


def test_runs_make_sets_of_a_full_and_increments_on_the_server(built: Built) -> None:
    store = built.store()
    assert isinstance(store, S3Store if built.backend.kind == "s3" else GCSStore)
    sets = layout.scan(store)
    assert {n: s.runs() for n, s in sets.items()} == {"2026-03-01": [0, 1, 2], "2026-03-04": [0, 1]}
    assert all(not s.leftovers() for s in sets.values())
    # The server's own listing: every object under the prefix, with the sizes the store says.
    listed = {f"{PREFIX}/{o.key}": o.size for o in store.list()}
    assert server_keys(built.backend, built.url) == listed
    assert f"{PREFIX}/2026-03-01/example.org/dave.2.tar.gz.aes" in listed  # appeared on day 3
    assert f"{PREFIX}/2026-03-01/example.org/bob.2.tar.gz.aes" not in listed  # gone on day 3
    assert f"{PREFIX}/2026-03-04/_manifest.1.json" in listed
    # The log says where each run went, and nothing but the runs' own lines.
    runs = [line for line in built.log if " run " in line and ": done" not in line]
    assert len(runs) == 5 and all(f"to {built.url}" in line for line in runs), built.log
    assert any("set 2026-03-04 run 0: full (2 increments made)" in x for x in built.log)
    assert not [x for x in built.log if "warning" in x or "failed" in x]
    st = state.load(built.root / "backups")
    assert st is not None and (st.bucket, st.set, st.seq) == (built.url, "2026-03-04", 1)


def test_restore_gives_back_every_day(built: Built, tmp_path: Path) -> None:
    check_restores(built.store(), built.settings, built.days, tmp_path)


def test_list_verify_and_restore_through_the_command_line(
    built: Built, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert mailpolicy("list", "--config", built.config) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"{built.url}: 2 sets"
    assert re.search(r"^set 2026-03-04: 2 runs, ", out, re.M)
    assert re.search(r"^  run 0   2026-03-04  full +4 archives", out, re.M)
    assert re.search(r"^  run 2   2026-03-03  increment +4 archives", out, re.M)
    assert "interrupted" not in out
    assert mailpolicy("verify", "--config", built.config) == 0
    out = capsys.readouterr().out
    assert out.count("archives authentic") == 5 and "FAILED" not in out
    # Each day as of its date, through the command line.
    for day in (built.days[2], built.days[4]):
        to = tmp_path / f"r-{day.date}"
        assert mailpolicy("restore", "--config", built.config, "--date", day.date.isoformat(),
                          "--to", to) == 0  # fmt: skip
        assert not diff(day.tree, tree_state(to)), day.date
    err = capsys.readouterr().err
    assert "backup restore: set 2026-03-01 run 2 (2026-03-03)" in err
    assert re.search(r"backup restore: done: \d+ files, \d+ bytes, [\d.]+ s \(set 2026-03-04 run "
                     r"1, 2026-03-05\)", err)  # fmt: skip
    # One user, as the docs show it.
    to = tmp_path / "alice"
    assert mailpolicy("restore", "--config", built.config, "--date", "2026-03-02", "--domain",
                      "example.org", "--user", "alice", "--to", to) == 0  # fmt: skip
    alice = "domains/example.org/alice"
    want = {p: n for p, n in built.days[1].tree.items() if p.startswith(alice)}
    assert not diff(want, tree_state(to)) and os.listdir(to) == ["domains"]


def test_an_object_from_the_server_decrypts_with_the_documented_openssl_commands(
    built: Built, tmp_path: Path
) -> None:
    """docs/backups.md's decrypt block verbatim, on alice's run 1 as downloaded from the server;
    its authenticate block with the object's own place in the printf."""
    variables = doc_variables()
    assert (variables["KEY"], variables["IV"]) == (KEY, IV)
    key = "2026-03-01/example.org/alice.1.tar.gz.aes"
    obj = tmp_path / key
    obj.parent.mkdir(parents=True)
    built.store().get(key, obj)
    env = {**os.environ, "KEY": KEY, "IV": IV, "F": key}

    def sh(script: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["sh", "-e", "-c", script], cwd=tmp_path, env=env, text=True,
                              capture_output=True, check=False)  # fmt: skip

    done = sh(doc_block("decrypt"))
    assert done.returncode == 0, done.stderr
    ours = io.BytesIO()
    decrypt_file(keys(built.settings), obj, ours)
    assert (tmp_path / "plain.tar.gz").read_bytes() == ours.getvalue()
    listing = subprocess.run(["tar", "-tzf", "plain.tar.gz"], cwd=tmp_path, capture_output=True,
                             text=True, check=True).stdout.split()  # fmt: skip
    # Day 2's changes to alice: a new message, one edited (and the directories, as dumpdirs).
    assert "domains/example.org/alice/Maildir/new/7.m4" in listing
    assert "domains/example.org/alice/Maildir/cur/1.m1:2,S" in listing
    assert "domains/example.org/alice/Maildir/.Sent/cur/4.s1:2,S" not in listing  # unchanged
    documented = "user 2026-05-01 example.org alice 3"
    authenticate = doc_block("authenticate")
    assert documented in authenticate
    authenticate = authenticate.replace(documented, "user 2026-03-01 example.org alice 1")
    assert sh(authenticate).stdout == "authentic\n"
    flip(obj)
    assert sh(authenticate).stdout == ""


# --- damage and a wrong key ---------------------------------------------------------------------

A = "2026-03-01"
OBJ = f"{A}/example.org/alice.1.tar.gz.aes"


def _replace(key: str, change: Callable[[bytes, Callable[[str], bytes]], bytes]) -> Any:
    """A damage: the object at ``key`` becomes ``change(its bytes, read(other key))``."""

    def damage(store: Store, tmp: Path) -> None:
        def read(other: str) -> bytes:
            store.get(other, tmp / "other")
            return (tmp / "other").read_bytes()

        (tmp / "damaged").write_bytes(change(read(key), read))
        store.put(key, tmp / "damaged")

    return damage


def _flipped(data: bytes) -> bytes:
    out = bytearray(data)
    out[len(out) // 2] ^= 0x01
    return bytes(out)


FAILS = "authentication failed"
DAMAGE = {
    "tampered": (_replace(OBJ, lambda b, _: _flipped(b)), FAILS),
    "truncated": (_replace(OBJ, lambda b, _: b[:-40]), "not a whole object"),
    "cut to whole blocks": (_replace(OBJ, lambda b, _: b[:-48]), FAILS),
    "swapped with another user": (
        _replace(OBJ, lambda _, read: read(f"{A}/example.net/carol.1.tar.gz.aes")), FAILS),
    "swapped with another run": (
        _replace(OBJ, lambda _, read: read(f"{A}/example.org/alice.2.tar.gz.aes")), FAILS),
    "manifest swapped": (
        _replace(f"{A}/_manifest.1.json", lambda _, read: read(f"{A}/_manifest.2.json")), FAILS),
}  # fmt: skip


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_objects_on_the_server_are_refused(
    built: Built, tmp_path: Path, damage: str, capsys: pytest.CaptureFixture[str]
) -> None:
    url = built.backend.new_bucket()
    store = copy_bucket(built.backend, built.store(), url, tmp_path)
    change, says = DAMAGE[damage]
    change(store, tmp_path)
    target = tmp_path / "out" / "restore"
    target.parent.mkdir()
    with pytest.raises(AuthError) as refused:
        restore_mod.restore(store, keys(built.settings), target, date=D(2026, 3, 3),
                            log=Logged(), progress=quiet())  # fmt: skip
    assert f"{url}/{A}/" in str(refused.value) and says in str(refused.value), refused.value
    assert os.listdir(tmp_path / "out") == []  # no target, no scratch directory left
    config = write_config(tmp_path / "damaged.toml", built.root, built.backend, url)
    assert mailpolicy("verify", "--config", config) == 1
    out = capsys.readouterr().out
    assert re.search(rf"^set {A}\b.*FAILED: .*{says}", out, re.M), out
    assert "set 2026-03-04 run 1 (2026-03-05): 5 archives authentic" in out
    # The other set is untouched and restores, through the command line.
    assert mailpolicy("restore", "--config", config, "--to", tmp_path / "ok") == 0
    assert not diff(built.days[4].tree, tree_state(tmp_path / "ok"))


@pytest.mark.parametrize("which", ["key", "iv"])
def test_a_wrong_key_is_refused_as_such(
    built: Built, tmp_path: Path, which: str, capsys: pytest.CaptureFixture[str]
) -> None:
    wrong = {f"backup_openssl_{which}": OTHER_KEY}
    config = write_config(tmp_path / "wrong.toml", built.root, built.backend, built.url, **wrong)
    to = tmp_path / "r"
    for argv in (("restore", "--to", to), ("list",), ("verify",)):
        assert mailpolicy(*argv, "--config", config) == 1
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1, err
        assert re.search(r"written with another key \(key id [0-9a-f]+\).* wrong key", err), err
        assert KEY not in err and OTHER_KEY not in err  # the key is never logged
    assert not to.exists()
    settings = load(str(config))
    with pytest.raises(BackupError, match="wrong key"):
        restore_mod.restore(built.store(), keys(settings), to, log=Logged(), progress=quiet())


# --- retention ----------------------------------------------------------------------------------


def test_retention_deletes_old_sets_from_the_server(backend: Backend, tmp_path: Path) -> None:
    root = copy_example(tmp_path / "srv-mail")
    url = backend.new_bucket()
    config = write_config(tmp_path / "mailpolicy.toml", root, backend, url, backup_increments=0,
                          backup_retain="2 days")  # fmt: skip
    log = tmp_path / "backup.log"
    day1(root)
    for n in range(1, 6):
        write(root, f"domains/example.org/alice/Maildir/cur/{n}.r:2,", f"day {n}\n")
        assert mailpolicy("run", "--config", config, "--now", f"2026-03-0{n}", "--log-file",
                          log) == 0  # fmt: skip
    store = open_store(load(str(config)), FAST)
    assert sorted(layout.scan(store)) == ["2026-03-03", "2026-03-04", "2026-03-05"]
    on_server = server_keys(backend, url)
    assert not [k for k in on_server if k.startswith(("2026-03-01/", "2026-03-02/"))]
    assert "2026-03-05/_manifest.0.json" in on_server
    lines = log.read_text().splitlines()
    assert [re.sub(r".*retention: ", "", x).split(" (")[0] for x in lines if "retention:" in x] == [
        "deleted complete set 2026-03-01", "deleted complete set 2026-03-02"]  # fmt: skip
    # Long past retention, the newest complete set stays (an increment of it, increments 28).
    config = write_config(tmp_path / "later.toml", root, backend, url, backup_increments=28,
                          backup_retain="1 week")  # fmt: skip
    assert mailpolicy("run", "--config", config, "--now", "2026-03-30", "--log-file", log) == 0
    assert {n: s.runs() for n, s in layout.scan(store).items()} == {"2026-03-05": [0, 1]}
    check_restores(store, load(str(config)), [Day(D(2026, 3, 30), tree_state(root))], tmp_path)


# --- interrupted uploads ------------------------------------------------------------------------


def big_message(root: Path) -> None:
    """Mail with a large attachment in bob's home: his archive goes up as a multipart (S3) or
    resumable (GCS) upload of several 5 MiB parts, and the cut falls inside it."""
    path = root / "domains/example.org/bob/Maildir/cur/99.big:2,S"
    path.write_bytes(os.urandom(12 * MiB))


@pytest.mark.parametrize("which", ["increment", "full"])
def test_an_interrupted_upload_is_recovered_by_the_next_run(
    backend: Backend,
    which: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    root = copy_example(tmp_path / "srv-mail")
    url = backend.new_bucket()
    store = backend.open(url)
    proxy = CutProxy(backend.endpoint)
    try:
        # The settings point at the proxy: the network between the server and the bucket.
        config = write_config(tmp_path / "mailpolicy.toml", root, backend, url,
                              endpoint=proxy.endpoint)  # fmt: skip
        day1(root)
        tree1 = tree_state(root)
        first = D(2026, 3, 1)
        if which == "increment":
            assert mailpolicy("run", "--config", config, "--now", first.isoformat()) == 0
            day2(root)
        big_message(root)
        cut_day = D(2026, 3, 2) if which == "increment" else first
        seq = 1 if which == "increment" else 0
        # Short timeouts and few retries for the run that fails, so it fails in seconds.
        monkeypatch.setattr(cli, "_backup_store", lambda settings: open_store(settings, FAST))
        capsys.readouterr()
        proxy.cut_after(6 * MiB)  # the list, the admin data, alice, then half of bob
        assert mailpolicy("run", "--config", config, "--now", cut_day.isoformat()) == 1
        assert proxy.cut.is_set()
        err = capsys.readouterr().err
        bob = f"{A}/example.org/bob.{seq}.tar.gz.aes"
        assert re.search(rf"backup run: failed: put {re.escape(url)} key '{re.escape(bob)}'", err)
        # Nothing incomplete looks complete: no manifest for the run, no object for bob, the
        # archives that went up before are leftovers; the local state did not move.
        listing = layout.scan(store)[A]
        assert seq not in listing.manifests
        assert bob not in listing.objects
        assert f"{A}/_admin.{seq}.tar.gz.aes" in listing.objects
        assert f"{A}/example.org/alice.{seq}.tar.gz.aes" in listing.objects
        if backend.kind == "s3":
            # The cut fell inside bob's multipart upload; s3transfer's abort could not reach the
            # server either, so the upload is left there, invisible to list and get (a bucket
            # lifecycle rule removes such uploads: policy/backup/backends.py).
            uploads = _s3_admin(backend.endpoint).list_multipart_uploads(Bucket=url[5:])
            assert [u["Key"] for u in uploads.get("Uploads", [])] == [bob]
        st = state.load(root / "backups")
        if which == "increment":
            assert listing.runs() == [0] and listing.leftovers()
            assert st is not None and st.seq == 0
        else:
            assert not listing.complete and st is None
        monkeypatch.undo()
        # The network is back; a day later the next run completes.
        proxy.cut_after(1 << 40)
        day3(root)
        tree3 = tree_state(root)
        next_day = D(2026, 3, 3) if which == "increment" else D(2026, 3, 2)
        log = tmp_path / "backup.log"
        assert mailpolicy("run", "--config", config, "--now", next_day.isoformat(), "--log-file",
                          log) == 0  # fmt: skip
        assert mailpolicy("verify", "--config", config) == 0
    finally:
        proxy.close()
    lines = log.read_text()
    sets = layout.scan(store)
    if which == "increment":
        assert "set 2026-03-01 run 1: increment" in lines  # redone under the same number
        assert {n: s.runs() for n, s in sets.items()} == {A: [0, 1]}
        assert not sets[A].leftovers()
        check_restores(store, load(str(config)), [Day(next_day, tree3), Day(D(2026, 3, 2), tree1)],
                       tmp_path)  # fmt: skip
    else:
        assert "set 2026-03-02 run 0: full" in lines
        assert "retention: deleted incomplete set 2026-03-01" in lines
        assert {n: s.runs() for n, s in sets.items()} == {"2026-03-02": [0]}
        assert not [k for k in server_keys(backend, url) if k.startswith(f"{A}/")]
        check_restores(store, load(str(config)), [Day(next_day, tree3)], tmp_path)
