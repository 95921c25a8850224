"""Logins (policy/auth.py) and the daemon's auth socket.

* Every scheme ``doveadm pw`` writes logs in through the daemon (hashes made by the real
  doveadm at test time), a wrong password is FAIL, our trouble is DEFER, never FAIL.
* Names are canonicalised once (case, realm) for lookup, cache and throttle alike.
* An unknown user is checked against a real hash of the domain (same cost as a wrong password).
* The positive cache never outlives a password change.
* The throttle slows failures per IP and per user and never locks the real user out.
* The auth socket answers only PING/AUTH/USER, Exim's socket never AUTH/USER; mode and group.
* hooks/checkpassword against the real daemon: exit 0 and exec, 1, 3, 111.
"""

from __future__ import annotations

import asyncio
import grp
import os
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from policy import auth, passwords
from policy.auth import Authenticator, Throttle, ThrottleSettings, canonical
from policy.mailtree import TreeLoader
from policy.protocol import encode_request
from tests.conftest import ask, copy_example

REPO = Path(__file__).resolve().parent.parent
HOOK = REPO / "hooks" / "checkpassword"
PRIMARY = "mail.example.org"

# Every scheme of issue 4's list, as `doveadm pw -s` writes it.
SCHEMES = ["SHA512-CRYPT", "SHA256-CRYPT", "BLF-CRYPT", "ARGON2I", "ARGON2ID", "SSHA512",
           "SSHA256", "SSHA", "PBKDF2", "CRYPT", "PLAIN", "CLEARTEXT"]  # fmt: skip
PASSWORD = 'pa ss"w=rd-é'


def doveadm_pw(scheme: str, password: str) -> str:
    out = subprocess.run(["doveadm", "pw", "-s", scheme, "-p", password], check=True,
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    return out.stdout.strip()


@pytest.fixture(scope="module")
def scheme_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """examples/srv-mail plus a domain schemes.example with one user per scheme."""
    root = tmp_path_factory.mktemp("auth") / "tree"
    copy_example(root)
    lines = [f"{scheme.lower()}:{doveadm_pw(scheme, PASSWORD)}\n" for scheme in SCHEMES]
    (root / "passwd" / "schemes.example").write_text("".join(lines))
    return root


def authenticator(root: Path, **kw: object) -> tuple[Authenticator, TreeLoader]:
    loader = TreeLoader(str(root), PRIMARY)
    state = {"snapshot": loader.refresh()[0]}
    kw.setdefault("throttle", ThrottleSettings(3, 0.0, 0.0, 900.0))
    a = Authenticator(lambda: state["snapshot"], **kw)  # type: ignore[arg-type]
    a.refresh = lambda: state.__setitem__("snapshot", loader.refresh()[0])  # type: ignore[attr-defined]
    return a, loader


def login(a: Authenticator, user: str, password: str, ip: str = "192.0.2.7") -> auth.Outcome:
    return asyncio.run(a.login(user, password.encode(), ip))


# --- schemes ---------------------------------------------------------------------------------


@pytest.mark.integration  # doveadm makes the hashes
@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_doveadm_scheme_logs_in(scheme_tree: Path, scheme: str) -> None:
    a, _ = authenticator(scheme_tree, cache_ttl=0)
    try:
        user = f"{scheme.lower()}@schemes.example"
        ok = login(a, user, PASSWORD)
        assert (ok.kind, ok.user) == ("OK", user), ok
        assert ok.home == str(scheme_tree / "domains" / "schemes.example" / scheme.lower())
        bad = login(a, user, PASSWORD + "x")
        assert bad.kind == "FAIL" and bad.reason == "wrong password", bad
    finally:
        a.close()


def test_example_users_and_canonical_names(tree: Path) -> None:
    a, _ = authenticator(tree, realm="example.org")
    try:
        for name, password, user in [
            ("alice@example.org", "alice-secret", "alice@example.org"),  # ARGON2ID
            ("ALICE@Example.ORG", "alice-secret", "alice@example.org"),
            ("alice", "alice-secret", "alice@example.org"),  # the default realm
            ("bob@example.org", "bob-secret", "bob@example.org"),  # SHA512-CRYPT (processes)
            ("carol@example.net", "carol-secret", "carol@example.net"),  # BLF-CRYPT
        ]:
            got = login(a, name, password)
            assert (got.kind, got.user) == ("OK", user), (name, got)
        assert login(a, "carol", "carol-secret").kind == "FAIL"  # the realm is example.org
    finally:
        a.close()


@pytest.mark.parametrize(
    ("name", "realm", "expected"),
    [
        ("Alice@Example.ORG", "", ("alice", "example.org")),
        ("alice", "Example.ORG", ("alice", "example.org")),
        ("alice", "", None),  # no realm: cannot be a user of ours
        ("../etc@example.org", "", None),  # never a path
        (".hidden@example.org", "", None),
        ("a/b@example.org", "", None),
        ("a b@example.org", "", None),
        ("@example.org", "", None),
        ("alice@", "", None),
        ("x\x00y@example.org", "", None),
    ],
)
def test_canonical(name: str, realm: str, expected: tuple[str, str] | None) -> None:
    assert canonical(name, realm) == expected


# --- cost, cache, trouble ----------------------------------------------------------------


def test_unknown_user_is_checked_against_a_real_hash_of_its_domain(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[str] = []
    real = passwords.verify

    def recording(stored: str, password: bytes) -> bool:
        seen.append(stored)
        return real(stored, password)

    monkeypatch.setattr(auth.passwords, "verify", recording)
    a, loader = authenticator(tree, cache_ttl=0)
    try:
        users = loader.refresh()[0].users["example.org"].data
        assert users is not None
        first_hash = next(iter(users.items()))[1].hash  # alice: ARGON2ID
        got = login(a, "nobody@example.org", "alice-secret")
        assert (got.kind, got.reason) == ("FAIL", "unknown user")
        assert seen == [first_hash]  # the same scheme and cost as a real user's
        got = login(a, "nobody@nowhere.example", "x")  # not our domain: the default scheme
        assert got.kind == "FAIL"
        assert passwords.scheme_of(seen[-1]) == passwords.DEFAULT_SCHEME
    finally:
        a.close()


def test_cache_skips_the_hash_and_ends_with_a_password_change(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    real = passwords.verify
    monkeypatch.setattr(auth.passwords, "verify", lambda s, p: calls.append(s) or real(s, p))
    a, _ = authenticator(tree)
    try:
        assert login(a, "alice@example.org", "alice-secret").kind == "OK"
        again = login(a, "Alice@example.org", "alice-secret")
        assert (again.kind, again.reason, len(calls)) == ("OK", "cached", 1)
        assert login(a, "alice@example.org", "wrong").kind == "FAIL"  # not a cache hit
        # The admin changes alice's password: the cached login no longer counts.
        passwd = tree / "passwd" / "example.org"
        new_hash = passwords.make_hash("new-secret")
        lines = passwd.read_text().splitlines(keepends=True)
        passwd.write_text("".join(
            f"alice:{new_hash}\n" if ln.startswith("alice:") else ln for ln in lines
        ))  # fmt: skip
        a.refresh()  # type: ignore[attr-defined]
        assert login(a, "alice@example.org", "alice-secret").kind == "FAIL"
        assert login(a, "alice@example.org", "new-secret").kind == "OK"
    finally:
        a.close()


def test_our_trouble_is_defer_never_fail(tree: Path) -> None:
    passwd = tree / "passwd" / "example.org"
    text = passwd.read_text()
    passwd.write_text(text.replace("bob:{SHA512-CRYPT}", "bob:{NO-SUCH-SCHEME}"))
    a, _loader = authenticator(tree)
    try:
        got = login(a, "bob@example.org", "bob-secret")
        assert got.kind == "DEFER" and "unusable hash" in got.reason, got
        assert got.reason.startswith("passwd/example.org:")
        # A broken passwd file at start (never good): every login of that domain defers.
        passwd.write_text("this line has no colon\n")
        fresh, _ = authenticator(tree)
        try:
            assert login(fresh, "alice@example.org", "alice-secret").kind == "DEFER"
            assert fresh.lookup("alice@example.org").kind == "DEFER"
        finally:
            fresh.close()
    finally:
        a.close()


def test_lookup(tree: Path) -> None:
    a, _ = authenticator(tree)
    try:
        got = a.lookup("BOB@example.org")
        assert (got.kind, got.user) == ("OK", "bob@example.org")
        assert got.home == str(tree / "domains" / "example.org" / "bob")
        assert a.lookup("nobody@example.org").kind == "NOTFOUND"
        assert a.lookup("../x@example.org").kind == "NOTFOUND"
    finally:
        a.close()


# --- throttle ------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_throttle_grows_per_ip_and_per_user_and_forgets() -> None:
    clock = Clock()
    t = Throttle(ThrottleSettings(free=3, base=0.5, maximum=4.0, window=900.0), clock)
    delays = []
    for _ in range(9):
        delays.append(t.delay("alice@example.org", "192.0.2.66"))
        t.failed("alice@example.org", "192.0.2.66")
    assert delays == [0, 0, 0, 0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    # The same attacker trying other names is still slowed (per IP) ...
    assert t.delay("bob@example.org", "192.0.2.66") == 4.0
    # ... and alice's name is slowed from elsewhere too (per user), but never beyond maximum.
    assert t.delay("alice@example.org", "198.51.100.1") == 4.0
    clock.now += 901  # the window passes with no new failure
    assert t.delay("alice@example.org", "192.0.2.66") == 0


def test_real_user_gets_in_during_an_attack_on_their_name(tree: Path) -> None:
    """Failures for alice from an attacker: alice's own address, where she logged in before,
    gets no delay at all; a new address of hers gets in after at most the maximum delay."""
    a, _ = authenticator(tree, throttle=ThrottleSettings(1, 0.05, 0.2, 900.0))
    home, attacker, travel = "198.51.100.10", "192.0.2.66", "203.0.113.9"
    try:
        assert login(a, "alice@example.org", "alice-secret", home).kind == "OK"
        a.cache = None  # measure the hashing path, not the cache
        for _ in range(6):
            assert login(a, "alice@example.org", "guess", attacker).kind == "FAIL"
        assert a.throttle.delay("alice@example.org", attacker) == 0.2
        assert a.throttle.delay("alice@example.org", home) == 0  # known address: not slowed
        got = login(a, "alice@example.org", "alice-secret", home)
        assert (got.kind, got.reason) == ("OK", "")
        got = login(a, "alice@example.org", "alice-secret", travel)
        assert got.kind == "OK" and "throttle delay" in got.reason  # slowed, not locked out
        # A success does not clear the attacker's counter.
        assert a.throttle.delay("bob@example.org", attacker) == 0.2
    finally:
        a.close()


# --- the daemon's auth socket ---------------------------------------------------------------


@pytest.fixture
def auth_daemon(tree: Path, start_daemon, short_dir: Path) -> Iterator[object]:  # type: ignore[no-untyped-def]
    d = start_daemon(tree, "--auth-socket", str(short_dir / "a.sock"),
                     "--auth-socket-group", "dovecot")  # fmt: skip
    d.auth_socket = short_dir / "a.sock"
    yield d


def test_sockets_answer_their_own_verbs(auth_daemon) -> None:  # type: ignore[no-untyped-def]
    d = auth_daemon
    sock = d.auth_socket
    st = os.stat(sock)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
    assert st.st_gid == grp.getgrnam("dovecot").gr_gid
    ok = ask(sock, encode_request("AUTH", user="bob@example.org", service="imap", ip="::1",
                                  **{"pass": "bob-secret"}))  # fmt: skip
    assert ok == b"OK user=Ym9iQGV4YW1wbGUub3Jn home=%s\n" % __import__("base64").b64encode(
        str(d.root / "domains" / "example.org" / "bob").encode()
    )
    assert ask(sock, encode_request("AUTH", user="bob@example.org", **{"pass": "x"})) == (
        b"FAIL authentication failed\n"
    )
    assert ask(sock, encode_request("USER", user="nobody@example.org")) == b"NOTFOUND\n"
    assert ask(sock, b"PING\n").startswith(b"PONG ")
    refused = ask(sock, encode_request("RCPT", ip="192.0.2.1", sender="", rcpt="a@example.org"))
    assert refused.startswith(b"DEFER 451 4.5.0 ") and b"not served on this socket" in refused
    refused = ask(d.socket, encode_request("AUTH", user="bob@example.org", **{"pass": "x"}))
    assert refused.startswith(b"DEFER 451 4.5.0 ") and b"not served on this socket" in refused
    d.stop()
    log = d.log_text()
    assert "stage=AUTH ip=::1 user=bob@example.org verdict=OK check=auth" in log
    assert "bob-secret" not in log  # never the password
    assert not sock.exists()  # removed at stop


def test_slow_login_gets_defer_at_the_deadline(tree: Path, start_daemon, short_dir: Path) -> None:  # type: ignore[no-untyped-def]
    """A hash that takes longer than auth_deadline: the client gets a DEFER (the hook's 111),
    never a hang and never FAIL."""
    # A well-formed SHA512-CRYPT hash with 10 million rounds: some 3 s to check (it needs no
    # making: its digest is never right, and the check costs the same).
    slow = "$6$rounds=10000000$saltsaltsaltsalt$" + "A" * 86
    (tree / "passwd" / "slow.example").write_text(f"sam:{{SHA512-CRYPT}}{slow}\n")
    start_daemon(tree, "--auth-socket", str(short_dir / "a.sock"),
                     config={"auth_deadline": 1.0, "auth_throttle_max": 0.0})  # fmt: skip
    started = time.monotonic()
    reply = ask(short_dir / "a.sock", encode_request("AUTH", user="sam@slow.example",
                                                     **{"pass": "x"}))  # fmt: skip
    assert reply.startswith(b"DEFER 451 4.3.0 "), reply
    assert time.monotonic() - started < 5


def test_hook_against_the_real_daemon(auth_daemon, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """hooks/checkpassword as Dovecot runs it (fd 3, argv[1] = the reply program), against the
    real daemon: 0 + exec with USER/HOME, 1 for a wrong password, 3 for an unknown user in a
    lookup, 111 with the daemon gone."""
    d = auth_daemon
    dump = tmp_path / "env"
    reply_prog = tmp_path / "reply"
    reply_prog.write_text(f"#!/bin/sh\nenv > {dump}\n")
    reply_prog.chmod(0o755)

    def run(fd3: bytes, **env: str) -> int:
        r, w = os.pipe()
        os.write(w, fd3)
        os.close(w)
        environment = {"MAILPOLICY_AUTH_SOCKET": str(d.auth_socket), "SERVICE": "imap",
                       "TCPREMOTEIP": "127.0.0.2", **env}  # fmt: skip
        pid = os.posix_spawn(str(HOOK), [str(HOOK), str(reply_prog)], environment,
                             file_actions=[(os.POSIX_SPAWN_DUP2, r, 3)])  # fmt: skip
        os.close(r)
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

    assert run(b"Alice@Example.org\0alice-secret\0\0") == 0
    env = dict(line.split("=", 1) for line in dump.read_text().splitlines() if "=" in line)
    assert env["USER"] == "alice@example.org"
    assert env["HOME"] == str(d.root / "domains" / "example.org" / "alice")
    assert run(b"alice@example.org\0wrong\0\0") == 1
    assert run(b"bob@example.org\0\0\0", AUTHORIZED="1") == 0
    assert "AUTHORIZED=2" in dump.read_text()
    assert run(b"nobody@example.org\0\0\0", AUTHORIZED="1") == 3
    d.stop()
    assert run(b"alice@example.org\0alice-secret\0\0") == 111  # daemon down: never "wrong"


def test_settings_refuse_a_throttle_longer_than_the_deadline(tree: Path, short_dir: Path) -> None:
    from policy.settings import SettingsError, load

    with pytest.raises(SettingsError, match="auth_throttle_max"):
        load(None, {"auth_deadline": 3.0, "auth_throttle_max": 2.5})
    with pytest.raises(SettingsError, match="auth_socket must differ"):
        load(None, {"socket": "/tmp/x.sock", "auth_socket": "/tmp/x.sock"})
    assert shutil.which("doveadm")  # setup installs dovecot-core: the scheme tests need it
