"""The ``mailpolicy`` command, tested as transcripts: every test runs the real command
(``python -m policy ...``) in a subprocess and asserts on its standard output, standard error and
exit status. Each run is printed as a transcript (``$ mailpolicy ...``, output, ``[exit N]``), so
``pytest -s tests/test_cli.py`` reads like a session at the admin's terminal and a failure shows
exactly what the command said.

Exit statuses (policy/cli.py): 0 success, 1 the thing asked about is wrong, 2 bad usage or our own
trouble.
"""

from __future__ import annotations

import base64
import grp
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from policy import __version__, protocol
from tests.conftest import PRIMARY_HOSTNAME, REPO, Daemon

pytestmark = pytest.mark.integration

HOST = ["--primary-hostname", PRIMARY_HOSTNAME]
DOVEADM = shutil.which("doveadm")


@dataclass
class Run:
    args: list[str]
    rc: int
    out: str
    err: str
    stdin: str | None = None

    @property
    def lines(self) -> list[str]:
        return self.out.splitlines()

    def __str__(self) -> str:
        text = f"$ mailpolicy {' '.join(self.args)}"
        if self.stdin:  # the password: shown as its length only
            text += f"  < ({len(self.stdin)} bytes on standard input)"
        text += f"\n{self.out}"
        text += "".join(f"[stderr] {line}\n" for line in self.err.splitlines())
        return text + f"[exit {self.rc}]"


def mailpolicy(
    *args: str | Path, stdin: str | None = None, config: bool = True, timeout: float = 60
) -> Run:
    """Run ``python -m policy ARGS`` and print the transcript.

    Unless the test gives its own ``--config``, ``--config /dev/null`` (all defaults) keeps a
    machine's /etc/mailpolicy/mailpolicy.toml out of the tests. Standard input is ``stdin``, or
    empty (never a terminal: the password prompt is not used).
    """
    argv = [str(a) for a in args]
    if config and "--config" not in argv:
        argv += ["--config", os.devnull]
    p = subprocess.run(
        [sys.executable, "-m", "policy", *argv],
        cwd=REPO,
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    run = Run(argv, p.returncode, p.stdout, p.stderr, stdin)
    print(run, end="\n\n")
    return run


def line_of(path: Path, prefix: str) -> int:
    """The 1-based number of the first line of ``path`` that starts with ``prefix``."""
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.startswith(prefix):
            return number
    raise AssertionError(f"no line starting with {prefix!r} in {path}")


def append(path: Path, text: str) -> int:
    """Append ``text`` to a list file; the number of its first new line."""
    old = path.read_text() if path.exists() else ""
    if old and not old.endswith("\n"):
        old += "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(old + text)
    return len(old.splitlines()) + 1


FileState = tuple[bytes, int, int]  # content, mode, inode


def files(root: Path) -> dict[str, FileState]:
    """Every file of the tree (content, mode, inode), without the editing locks ``.<name>.lock``
    that policy/admin.py keeps next to the files it edits."""
    state = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not re.fullmatch(r"\..+\.lock", path.name):
            st = path.stat()
            state[str(path.relative_to(root))] = (
                path.read_bytes(),
                stat.S_IMODE(st.st_mode),
                st.st_ino,
            )
    return state


def leftovers(directory: Path) -> list[str]:
    """Files an interrupted or careless atomic write would leave: anything hidden but our lock."""
    return sorted(
        p.name
        for p in directory.iterdir()
        if p.name.startswith(".") and not re.fullmatch(r"\..+\.lock", p.name)
    )


def doveadm_verifies(hash_: str, password: str) -> bool:
    """Does Dovecot itself accept ``password`` for ``hash_``? (``doveadm pw -t``)"""
    assert DOVEADM is not None
    p = subprocess.run(
        [DOVEADM, "pw", "-t", hash_, "-p", password], capture_output=True, text=True, timeout=30
    )
    print(f"$ doveadm pw -t {hash_} -p ***\n{p.stdout}{p.stderr}[exit {p.returncode}]\n")
    return p.returncode == 0 and "(verified)" in p.stdout


def dovecot_accepts(hash_: str, password: str) -> None:
    """Assert that Dovecot verifies ``password`` against ``hash_`` (and not a wrong one).
    scripts/setup.sh installs dovecot-core: without doveadm this fails, it does not skip."""
    assert DOVEADM is not None, "doveadm missing: run scripts/setup.sh"
    assert doveadm_verifies(hash_, password)
    assert not doveadm_verifies(hash_, password + "x")


def rcpt(ip: str, rcpt_: str, sender: str = "someone@remote.example") -> bytes:
    return protocol.encode_request("RCPT", ip=ip, sender=sender, rcpt=rcpt_)


# --- top level ----------------------------------------------------------------------------


def test_version() -> None:
    r = mailpolicy("--version", config=False)
    assert (r.rc, r.out, r.err) == (0, f"mailpolicy {__version__}\n", "")


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        ([], "the following arguments are required: command"),
        (["user"], "the following arguments are required: action"),
        (["alias"], "the following arguments are required: action"),
        (["config"], "the following arguments are required: action"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["explain", "--rcpt", "a@example.org"], "the following arguments are required: --ip"),
        (["check", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    ],
    ids=["none", "user", "alias", "config", "unknown", "explain-missing", "bad-flag"],
)
def test_usage_errors(args: list[str], complaint: str) -> None:
    r = mailpolicy(*args, config=False)
    assert r.rc == 2
    assert r.out == ""
    assert r.err.startswith("usage: mailpolicy")
    assert complaint in r.err


# --- serve / query ------------------------------------------------------------------------


def test_serve_and_query(tree: Path, start_daemon: Callable[..., Daemon]) -> None:
    d = start_daemon(tree)
    sock = ["--socket", d.socket]

    r = mailpolicy("query", *sock, "PING")
    assert (r.rc, r.out, r.err) == (0, f"PONG mailpolicy {__version__}\n", "")

    # A raw request line, given as words: the values are already base64, as Exim sends them.
    b64 = base64.b64encode(b"alice@example.org").decode()
    r = mailpolicy("query", *sock, "RCPT", "ip=203.0.113.5", "sender=", f"rcpt={b64}")
    assert (r.rc, r.out) == (0, "ACCEPT 250 2.1.5 ok\n")

    # --encode does the base64 for us.
    enc = ["query", *sock, "--encode"]
    r = mailpolicy(
        *enc, "RCPT", "ip=203.0.113.5", "sender=x@remote.example", "rcpt=bob@example.org"
    )
    assert (r.rc, r.out) == (0, "ACCEPT 250 2.1.5 ok\n")
    r = mailpolicy(*enc, "RCPT", "ip=203.0.113.5", "sender=", "rcpt=nobody@example.org")
    assert r.rc == 0
    assert r.out.startswith("DENY 550 5.1.1 <nobody@example.org>")
    r = mailpolicy(*enc, "RCPT", "ip=203.0.113.5", "sender=", "rcpt=x@elsewhere.example")
    assert r.out == "DENY 550 5.7.1 relay not permitted\n"
    r = mailpolicy(*enc, "MAIL", "ip=2001:db8::25", "sender=")
    assert r.out == "ACCEPT 250 2.1.0 ok\n"
    r = mailpolicy(*enc, "ALIAS", "addr=info@example.org")
    assert r.out == "FOUND alice@example.org,bob@example.org\n"
    r = mailpolicy(*enc, "ALIAS", "addr=alice@example.org")
    assert r.out == "NOTFOUND\n"

    # Bad requests are the daemon's to answer (DEFER 4.5.0, never a bounce) ...
    r = mailpolicy("query", *sock, "BOGUS", "x=1")
    assert (r.rc, r.out) == (0, "DEFER 451 4.5.0 bad policy request: unknown verb 'BOGUS'\n")
    r = mailpolicy("query", *sock, "RCPT", "ip=203.0.113.5", "sender=not-base64!", "rcpt=")
    assert r.out == "DEFER 451 4.5.0 bad policy request: field 'sender' is not valid base64\n"
    # ... except a word --encode cannot turn into a field: a usage error, nothing sent.
    r = mailpolicy(*enc, "RCPT", "ip=203.0.113.5", "rcpt")
    assert (r.rc, r.out) == (2, "")
    assert "mailpolicy query: 'rcpt' is not field=value" in r.err
    assert d.proc.poll() is None


def test_query_daemon_down(short_dir: Path) -> None:
    sock = short_dir / "nobody-listens.sock"
    r = mailpolicy("query", "--socket", sock, "PING")
    assert (r.rc, r.out) == (2, "")
    assert r.err.startswith(f"mailpolicy query: {sock}: ")
    assert "No such file or directory" in r.err

    # A stale socket file (nobody accepting) is refused the same way, still naming the socket.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(sock))
    r = mailpolicy("query", "--socket", sock, "--encode", "ALIAS", "addr=a@example.org")
    assert (r.rc, r.out) == (2, "")
    assert r.err.startswith(f"mailpolicy query: {sock}: ")
    assert "Connection refused" in r.err


def test_serve_refuses_bad_settings(tmp_path: Path, short_dir: Path) -> None:
    sock = short_dir / "s.sock"
    # (timeout: were it to start anyway, it would serve forever)
    r = mailpolicy("serve", "--root", tmp_path / "not-mounted", "--socket", sock, *HOST, timeout=10)
    assert (r.rc, r.out) == (2, "")
    assert r.err == f"mailpolicy serve: {tmp_path / 'not-mounted'}: no such directory\n"
    r = mailpolicy(
        "serve", "--root", tmp_path, "--socket", sock, "--socket-mode", "999", timeout=10
    )
    assert r.rc == 2
    assert r.err == "mailpolicy: command line: socket_mode '999' is not octal\n"
    assert not sock.exists()


# --- check --------------------------------------------------------------------------------


def test_check_example_tree(tree: Path) -> None:
    r = mailpolicy("check", "--root", tree, *HOST)
    assert r.rc == 0, r
    assert r.lines[-1] == f"{tree}: 0 errors, {len(r.lines) - 1} warnings"
    assert not [line for line in r.lines if line.startswith("error:")]
    for line in r.lines[:-1]:  # warnings are allowed; show them
        assert line.startswith("warning: ")
        print("example tree", line)
    assert r.err == ""
    r = mailpolicy("check", "--root", tree, *HOST, "--strict")
    assert r.rc == (1 if len(r.lines) > 1 else 0)


BROKEN = {
    "alias-pipe": (
        "aliases/example.com",
        "evil: |/bin/sh\n",
        "destination '|/bin/sh' is not a plain address",
    ),
    "alias-include": (
        "exim/conf/global_aliases",
        "everyone: :include:/etc/mail/everyone\n",
        "destination ':include:/etc/mail/everyone' is not a plain address",
    ),
    "passwd-no-hash": ("passwd/example.net", "dave\n", "expected user:hash"),
    "passwd-empty-hash": ("passwd/example.org", "dave:\n", "expected user:hash"),
    "relay-hostname": (
        "exim/conf/relay_from_hosts",
        "mail.example.org\n",
        "'mail.example.org' is not an IP address or network",
    ),
    "unterminated-quote": (
        "aliases/example.org",
        '"sales team: bob\n',
        "unterminated quoted key",
    ),
    "bad-regex": ("exim/conf/dkim_required", "^paypal[.example\n", "bad regular expression"),
    "rewrite-not-domain": (
        "exim/conf/rewrite_domains",
        "example.biz: not a domain!\n",
        "'not a domain!' is not a domain",
    ),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_check_broken_file(tree: Path, case: str) -> None:
    rel, text, message = BROKEN[case]
    line = append(tree / rel, text)
    r = mailpolicy("check", "--root", tree, *HOST)
    assert r.rc == 1
    errors = [x for x in r.lines if x.startswith("error: ")]
    assert len(errors) == 1, r
    assert errors[0].startswith(f"error: {rel}:{line}: {message}")
    assert re.fullmatch(rf"{re.escape(str(tree))}: 1 errors, \d+ warnings", r.lines[-1])


def test_check_reports_every_broken_file_and_bad_utf8(tree: Path) -> None:
    lines = {rel: append(tree / rel, text) for rel, text, _ in BROKEN.values()}
    with (tree / "passwd" / "example.com").open("wb") as f:
        f.write(b"# ok\nzo\xe9:{ARGON2ID}x\n")
    r = mailpolicy("check", "--root", tree, *HOST)
    assert r.rc == 1
    errors = [x for x in r.lines if x.startswith("error: ")]
    for rel, line in lines.items():
        assert any(e.startswith(f"error: {rel}:{line}: ") for e in errors), rel
    assert "error: passwd/example.com:2: not valid UTF-8" in r.out
    assert len(errors) == len(BROKEN) + 1
    assert r.lines[-1].startswith(f"{tree}: {len(errors)} errors, ")


def _loop(root: Path) -> str:
    n = append(root / "aliases/example.org", "loopa: loopb\nloopb: loopa\n")
    return (
        f"aliases/example.org:{n}: loopa@example.org: alias loop "
        "loopa@example.org -> loopb@example.org -> loopa@example.org"
    )


def _dangling(root: Path) -> str:
    n = append(root / "aliases/example.org", "team: alice, ghost\n")
    return (
        f"aliases/example.org:{n}: team@example.org -> ghost@example.org: "
        "no such user or alias (mail to it would bounce)"
    )


def _duplicate_alias(root: Path) -> str:
    first = line_of(root / "aliases/example.org", "info:")
    n = append(root / "aliases/example.org", "INFO: carol@example.net\n")
    return f"aliases/example.org:{n}: duplicate key 'INFO' (line {first} wins)"


def _duplicate_user(root: Path) -> str:
    first = line_of(root / "passwd/example.net", "carol:")
    n = append(root / "passwd/example.net", "carol:{SHA512-CRYPT}$6$x$y\n")
    return f"passwd/example.net:{n}: duplicate user 'carol' (line {first} wins)"


def _weak_hash(root: Path) -> str:
    n = append(root / "passwd/example.net", "dave:{PLAIN}secret\n")
    return (
        f"passwd/example.net:{n}: dave: PLAIN is a weak scheme; "
        "re-hash with `mailpolicy user passwd`"
    )


def _no_scheme(root: Path) -> str:
    n = append(root / "passwd/example.net", "erin:abLQDHzjOk0nM\n")
    return f"passwd/example.net:{n}: erin: no {{SCHEME}} prefix: Dovecot reads it as CRYPT"


def _open_relay(root: Path) -> str:
    n = append(root / "exim/conf/relay_from_hosts", "0.0.0.0/0\n")
    return f"exim/conf/relay_from_hosts:{n}: a network this wide"


def _unknown_conf(root: Path) -> str:
    (root / "exim/conf/relay_domains").write_text("example.org\n")
    return "exim/conf/relay_domains: unknown list file (not read); known: global_aliases, "


WARNINGS: dict[str, Callable[[Path], str]] = {
    "alias-loop": _loop,
    "dangling-alias": _dangling,
    "duplicate-alias-key": _duplicate_alias,
    "duplicate-user": _duplicate_user,
    "weak-hash-plain": _weak_hash,
    "hash-without-scheme": _no_scheme,
    "open-relay": _open_relay,
    "unknown-conf-file": _unknown_conf,
}


@pytest.mark.parametrize("case", list(WARNINGS))
def test_check_warning_and_strict(tree: Path, case: str) -> None:
    expected = WARNINGS[case](tree)
    r = mailpolicy("check", "--root", tree, *HOST)
    assert r.rc == 0
    assert any(x.startswith(f"warning: {expected}") for x in r.lines), r
    assert re.fullmatch(rf"{re.escape(str(tree))}: 0 errors, [1-9]\d* warnings", r.lines[-1])
    strict = mailpolicy("check", "--root", tree, *HOST, "--strict")
    assert strict.rc == 1
    assert strict.out == r.out


def test_check_missing_root(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-tree"
    r = mailpolicy("check", "--root", missing)
    assert (r.rc, r.out, r.err) == (2, "", f"mailpolicy check: {missing}: no such directory\n")


def test_check_root_and_hostname_from_config(tree: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "mailpolicy.toml"
    cfg.write_text(f'root = "{tree}"\nprimary_hostname = "{PRIMARY_HOSTNAME}"\n')
    r = mailpolicy("check", "--config", cfg)
    assert r.rc == 0
    assert r.lines[-1].startswith(f"{tree}: 0 errors, ")


# --- explain ------------------------------------------------------------------------------


def explain(root: Path, rcpt_: str, ip: str = "203.0.113.5", *extra: str) -> Run:
    return mailpolicy(
        "explain", "--root", root, *HOST, "--ip", ip, "--sender", "x@remote.example",
        "--rcpt", rcpt_, *extra,
    )  # fmt: skip


def test_explain_accepted_user(tree: Path) -> None:
    r = explain(tree, "alice@example.org")
    assert r.rc == 0
    n = line_of(tree / "passwd/example.org", "alice:")
    assert r.lines == [
        "connection from 203.0.113.5",
        "  no checks at this stage",
        "MAIL FROM:<x@remote.example>",
        "  spf: pass: not run (no network)",
        "  sender_verify: pass: x@remote.example is not exempt from sender verification; "
        "callout not run (no network)",
        "RCPT TO:<alice@example.org>",
        "  restricted_characters: pass",
        "  relay: pass: example.org is a local domain",
        f"  recipient: pass: alice@example.org: user [passwd/example.org:{n}]",
        "verdict: accept 250 2.1.5 ok",
    ]
    # The +suffix and the case of the local part do not matter.
    r = explain(tree, "Alice+lists@Example.ORG")
    assert r.rc == 0
    assert f"[passwd/example.org:{n}]" in r.out
    assert r.lines[-1] == "verdict: accept 250 2.1.5 ok"


def test_explain_unknown_user(tree: Path) -> None:
    r = explain(tree, "nobody@example.org")
    assert r.rc == 1
    assert "  recipient: deny 550 5.1.1 <nobody@example.org>: no such user here " in r.out
    assert "(no user or alias 'nobody' in example.org)" in r.out
    assert r.lines[-1] == "verdict: deny 550 5.1.1 <nobody@example.org>: no such user here"
    # example.com has aliases only, no catch-all
    r = explain(tree, "alice@example.com")
    assert r.rc == 1
    assert r.lines[-1].startswith("verdict: deny 550 5.1.1 ")


def test_explain_relay(tree: Path) -> None:
    r = explain(tree, "friend@elsewhere.example")
    assert r.rc == 1
    assert (
        "  relay: deny 550 5.7.1 relay not permitted (elsewhere.example: 203.0.113.5 is not "
        "authenticated and not in relay_from_hosts)"
    ) in r.lines
    assert r.lines[-1] == "verdict: deny 550 5.7.1 relay not permitted"
    assert not any(line.startswith("  recipient:") for line in r.lines)

    r = explain(tree, "friend@elsewhere.example", "203.0.113.5", "--auth", "alice@example.org")
    assert r.rc == 0
    assert "  relay: pass: relay for authenticated user 'alice@example.org'" in r.lines
    assert r.lines[-1] == "verdict: accept 250 2.1.5 ok"

    line4 = line_of(tree / "exim/conf/relay_from_hosts", "192.0.2.0/24")
    r = explain(tree, "friend@elsewhere.example", "192.0.2.77")
    assert r.rc == 0
    assert (
        f"  relay: pass: relay from 192.0.2.77 (relay_from_hosts) "
        f"[exim/conf/relay_from_hosts:{line4}]"
    ) in r.lines
    assert r.lines[-1] == "verdict: accept 250 2.1.5 ok"

    line6 = line_of(tree / "exim/conf/relay_from_hosts", "2001:db8::/32")
    r = explain(tree, "friend@elsewhere.example", "2001:db8:1::9")
    assert r.rc == 0
    assert f"[exim/conf/relay_from_hosts:{line6}]" in r.out

    r = explain(tree, "friend@elsewhere.example", "127.0.0.1")
    assert r.rc == 0
    assert "  relay: pass: relay from localhost 127.0.0.1" in r.lines

    # We are a secondary MX for relay_to_domains: accepted from anyone, without auth.
    n = line_of(tree / "exim/conf/relay_to_domains", "*.backup.example")
    r = explain(tree, "x@mx.backup.example")
    assert r.rc == 0
    assert (
        f"relay: pass: mx.backup.example is in relay_to_domains [exim/conf/relay_to_domains:{n}]"
        in r.out
    )


def test_explain_alias(tree: Path) -> None:
    n = line_of(tree / "aliases/example.org", "info:")
    r = explain(tree, "info@example.org")
    assert r.rc == 0
    assert (
        f"  recipient: pass: alias of alice@example.org, bob@example.org [aliases/example.org:{n}]"
    ) in r.lines
    assert r.lines[-1] == "verdict: accept 250 2.1.5 ok"

    n = line_of(tree / "aliases/example.org", "sales:")
    r = explain(tree, "sales@example.org")
    assert f"alias of bob@example.org, carol@example.net [aliases/example.org:{n}]" in r.out

    n = line_of(tree / "exim/conf/global_aliases", "postmaster:")
    r = explain(tree, "postmaster@example.com")
    assert f"alias of alice@example.org [exim/conf/global_aliases:{n}]" in r.out
    assert r.rc == 0

    n = line_of(tree / "aliases/example.net", "*:")
    r = explain(tree, "whoever@example.net")
    assert f"alias of carol@example.net [aliases/example.net:{n}]" in r.out
    assert r.rc == 0

    n = line_of(tree / "exim/conf/rewrite_domains", "example.info:")
    r = explain(tree, "info@example.info")
    assert r.rc == 0
    assert (
        f"  relay: pass: example.info is a rewrite domain [exim/conf/rewrite_domains:{n}]"
        in r.lines
    )


def test_explain_alias_loop_defers(tree: Path) -> None:
    append(tree / "aliases/example.org", "loopa: loopb\nloopb: loopa\n")
    r = explain(tree, "loopa@example.org")
    assert r.rc == 1
    assert "alias loop loopa@example.org -> loopb@example.org -> loopa@example.org" in r.out
    assert r.lines[-1] == "verdict: defer 451 4.4.6 alias loop detected, please try later"


@pytest.mark.parametrize(
    "address", ["a|b@example.org", "a%b@example.org", "b!a@example.org", ".hidden@example.org",
                "x/y@example.org", "|cmd@elsewhere.example", "a/../b@elsewhere.example"],
)  # fmt: skip
def test_explain_restricted_characters(tree: Path, address: str) -> None:
    r = explain(tree, address, "127.0.0.1")
    assert r.rc == 1
    local = address.rpartition("@")[0]
    assert (
        f"  restricted_characters: deny 550 5.1.3 restricted characters in address "
        f"(local part {local!r} matches the restricted-character rule)"
    ) in r.lines
    assert r.lines[-1] == "verdict: deny 550 5.1.3 restricted characters in address"


def test_explain_broken_file_defers(tree: Path) -> None:
    n = append(tree / "passwd/example.net", "dave\n")
    r = explain(tree, "carol@example.net")
    assert r.rc == 1
    assert r.lines[0].startswith(f"file problem: passwd/example.net:{n}: expected user:hash")
    assert r.lines[-1] == "verdict: defer 451 4.3.0 temporary local problem, please try later"


def test_explain_null_sender_and_missing_root(tree: Path, tmp_path: Path) -> None:
    r = mailpolicy(
        "explain", "--root", tree, *HOST, "--ip", "203.0.113.5", "--sender", "",
        "--rcpt", "bob@example.org",
    )  # fmt: skip
    assert r.rc == 0
    assert r.lines[2:5] == [
        "MAIL FROM:<>",
        "  spf: pass: not run (no network)",
        "  sender_verify: pass: null sender <> is never verified",
    ]
    r = mailpolicy(
        "explain", "--root", tmp_path / "gone", "--ip", "1.2.3.4", "--sender", "", "--rcpt", "a@b.c"
    )
    assert (r.rc, r.out) == (2, "")
    assert r.err == f"mailpolicy explain: {tmp_path / 'gone'}: no such directory\n"


# --- user ---------------------------------------------------------------------------------

ARGON2ID_LINE = re.compile(
    r"(?P<user>[^:]+):(?P<hash>\{ARGON2ID\}\$argon2id\$v=19\$m=65536,t=3,p=1\$[A-Za-z0-9+/]{22}"
    r"\$[A-Za-z0-9+/]{43})"
)


def test_user_add_dovecot_verifies(tree: Path) -> None:
    passwd = tree / "passwd" / "example.org"
    before = passwd.read_text().splitlines()
    st = passwd.stat()
    others = files(tree)
    password = "correct horse  battery:staple "  # spaces, a colon and a trailing blank are kept

    r = mailpolicy("user", "add", "--root", tree, "Dave@Example.ORG", stdin=password + "\n")
    assert (r.rc, r.err) == (0, "")
    assert r.out == f"added Dave@Example.ORG to {passwd} (ARGON2ID)\n"
    after = passwd.read_text().splitlines()
    assert after[:-1] == before  # comments and other users untouched, appended at the end
    m = ARGON2ID_LINE.fullmatch(after[-1])
    assert m and m["user"] == "dave", after[-1]
    assert password not in passwd.read_text()

    # Atomic: a new inode (rename over the old file), same mode, nothing left behind.
    new = passwd.stat()
    assert new.st_ino != st.st_ino
    assert stat.S_IMODE(new.st_mode) == stat.S_IMODE(st.st_mode)
    assert leftovers(tree / "passwd") == []
    del others["passwd/example.org"]
    assert {k: v for k, v in files(tree).items() if k != "passwd/example.org"} == others

    r = mailpolicy("user", "list", "--root", tree, "example.org")
    assert r.out.splitlines() == [
        "alice@example.org ARGON2ID",
        "bob@example.org SHA512-CRYPT",
        "dave@example.org ARGON2ID",
    ]
    r = explain(tree, "dave@example.org")
    assert r.lines[-1] == "verdict: accept 250 2.1.5 ok"
    assert f"[passwd/example.org:{len(after)}]" in r.out

    dovecot_accepts(m["hash"], password)
    assert not doveadm_verifies(m["hash"], password.strip())  # the blanks are part of it


def test_user_add_argon2i_and_new_domain(tree: Path) -> None:
    r = mailpolicy(
        "user", "add", "--root", tree, "--scheme", "ARGON2I", "x@new.example", stdin="pw1\n"
    )
    assert r.rc == 0
    passwd = tree / "passwd" / "new.example"
    text = passwd.read_text()
    assert text.startswith("# Users of new.example: ")
    hash_ = text.splitlines()[-1].partition(":")[2]
    assert hash_.startswith("{ARGON2I}$argon2i$v=19$m=65536,t=3,p=1$")
    assert stat.S_IMODE(passwd.stat().st_mode) == 0o640  # a new file of hashes is not public
    # ... but Exim's router reads its user names: group Debian-exim (root runs the tests).
    assert grp.getgrgid(passwd.stat().st_gid).gr_name == "Debian-exim"
    r = mailpolicy("check", "--root", tree, *HOST)
    assert r.rc == 0
    assert "new.example" not in r.out  # well-formed, strong hash: nothing to say

    r = mailpolicy("user", "add", "--root", tree, "--scheme", "PLAIN", "y@new.example", stdin="x\n")
    assert r.rc == 2
    assert "invalid choice: 'PLAIN'" in r.err
    dovecot_accepts(hash_, "pw1")


def test_user_passwd_changes_only_that_hash(tree: Path) -> None:
    passwd = tree / "passwd" / "example.net"
    lines = [
        "# users of example.net",
        "",
        "carol:{BLF-CRYPT}$2y$10$OjfzrYb.jIGzhhTcxbdcOek5WWrOcnmx4H8ZSQwWettHAoiGtOyEq",
        "  # an indented comment: with a colon",
        "Zed:{PLAIN}old:1000:1000::/home/zed::userdb_quota_rule=*:storage=1G",
        "yan:{SHA512-CRYPT}$6$abc$def",
        "# the end",
    ]
    passwd.write_text("\n".join(lines) + "\n")
    passwd.chmod(0o600)
    ino = passwd.stat().st_ino

    r = mailpolicy("user", "passwd", "--root", tree, "zed@example.net", stdin="n3w-secret\n")
    assert (r.rc, r.err) == (0, "")
    assert r.out == f"changed the password of zed@example.net in {passwd} (ARGON2ID)\n"
    after = passwd.read_text().splitlines()
    assert len(after) == len(lines)
    changed = [i for i, (a, b) in enumerate(zip(lines, after, strict=True)) if a != b]
    assert changed == [4]
    name, hash_, extra = after[4].split(":", 2)
    assert name == "Zed"  # the name as written
    assert extra == "1000:1000::/home/zed::userdb_quota_rule=*:storage=1G"  # passwd-file fields
    assert ARGON2ID_LINE.fullmatch(f"{name}:{hash_}")
    st = passwd.stat()
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_ino != ino
    assert leftovers(tree / "passwd") == []

    r = mailpolicy("user", "list", "--root", tree, "example.net")
    assert r.out.splitlines() == [
        "carol@example.net BLF-CRYPT",
        "yan@example.net SHA512-CRYPT",
        "zed@example.net ARGON2ID",
    ]
    dovecot_accepts(hash_, "n3w-secret")


def test_user_del_removes_only_that_line(tree: Path) -> None:
    passwd = tree / "passwd" / "example.org"
    before = passwd.read_text().splitlines()
    n = line_of(passwd, "bob:")
    others = {k: v for k, v in files(tree).items() if k != "passwd/example.org"}
    r = mailpolicy("user", "del", "--root", tree, "BOB@example.org")
    assert (r.rc, r.out, r.err) == (0, f"deleted BOB@example.org from {passwd}\n", "")
    assert passwd.read_text().splitlines() == before[: n - 1] + before[n:]
    assert {k: v for k, v in files(tree).items() if k != "passwd/example.org"} == others
    assert leftovers(tree / "passwd") == []
    r = explain(tree, "bob@example.org")
    assert r.lines[-1].startswith("verdict: deny 550 5.1.1 ")


def test_user_list(tree: Path) -> None:
    r = mailpolicy("user", "list", "--root", tree)
    assert (r.rc, r.err) == (0, "")
    assert r.out == (
        "carol@example.net BLF-CRYPT\nalice@example.org ARGON2ID\nbob@example.org SHA512-CRYPT\n"
    )
    r = mailpolicy("user", "list", "--root", tree, "EXAMPLE.NET")
    assert (r.rc, r.out) == (0, "carol@example.net BLF-CRYPT\n")
    append(tree / "passwd/example.net", "old:abLQDHzjOk0nM\n")
    r = mailpolicy("user", "list", "--root", tree, "example.net")
    assert r.out == "carol@example.net BLF-CRYPT\nold@example.net CRYPT?\n"

    r = mailpolicy("user", "list", "--root", tree, "example.com")  # aliases only, no passwd
    assert (r.rc, r.out, r.err) == (1, "", "mailpolicy user: no passwd/example.com\n")
    r = mailpolicy("user", "list", "--root", tree, "nowhere.example")
    assert (r.rc, r.out) == (1, "")

    n = append(tree / "passwd/example.net", "broken\n")
    r = mailpolicy("user", "list", "--root", tree, "example.net")
    assert r.err.startswith(f"error: passwd/example.net:{n}: expected user:hash")


USER_ERRORS = {
    # name: (argv after "user", stdin, exit status, message on stderr)
    "add-duplicate": (["add", "alice@example.org"], "pw\n", 1,
                      "mailpolicy user: alice@example.org exists (use `mailpolicy user passwd`)"),
    "add-duplicate-case": (["add", "ALICE@example.org"], "pw\n", 1,
                           "mailpolicy user: alice@example.org exists"),
    "passwd-unknown": (["passwd", "nobody@example.org"], "pw\n", 1,
                       "mailpolicy user: no user nobody@example.org"),
    # The address is checked before the password is read (at a terminal: asked for twice).
    "add-duplicate-before-password": (["add", "alice@example.org"], "", 1,
                                      "mailpolicy user: alice@example.org exists"),
    "passwd-unknown-before-password": (["passwd", "nobody@example.org"], "", 1,
                                       "mailpolicy user: no user nobody@example.org"),
    "add-bad-address-before-password": (["add", "a|b@example.org"], "", 1,
                                        "'a|b' is not allowed as a user name"),
    "passwd-unknown-domain": (["passwd", "alice@nowhere.example"], "pw\n", 1,
                              "mailpolicy user: no user alice@nowhere.example"),
    "del-unknown": (["del", "nobody@example.org"], None, 1,
                    "mailpolicy user: no user nobody@example.org"),
    "add-no-at": (["add", "dave"], "pw\n", 1, "mailpolicy user: 'dave' is not user@domain"),
    "add-no-local": (["add", "@example.org"], "pw\n", 1, "is not user@domain"),
    "add-bad-domain": (["add", "dave@exa mple.org"], "pw\n", 1, "is not user@domain"),
    "add-literal": (["add", "dave@[192.0.2.1]"], "pw\n", 1, "is not user@domain"),
    "add-pipe": (["add", "a|b@example.org"], "pw\n", 1,
                 "mailpolicy user: 'a|b' is not allowed as a user name"),
    "add-percent": (["add", "a%b@example.org"], "pw\n", 1, "is not allowed as a user name"),
    "add-slash": (["add", "a/b@example.org"], "pw\n", 1, "is not allowed as a user name"),
    "add-dot": (["add", ".x@example.org"], "pw\n", 1, "is not allowed as a user name"),
    "add-colon": (["add", "a:b@example.org"], "pw\n", 1, "is not allowed as a user name"),
    "add-space": (["add", "a b@example.org"], "pw\n", 1, "is not allowed as a user name"),
    "add-star": (["add", "*@example.org"], "pw\n", 1, "is not allowed as a user name"),
    "add-comment": (["add", "#x@example.org"], "pw\n", 1, "is not allowed as a user name"),
    "add-empty-password": (["add", "dave@example.org"], "\n", 1,
                           "mailpolicy user: empty password (give it on standard input or at "
                           "the prompt)"),
    "add-no-stdin": (["add", "dave@example.org"], "", 1, "empty password"),
    "passwd-empty-password": (["passwd", "alice@example.org"], "\r\n", 1, "empty password"),
    "password-in-argv": (["add", "dave@example.org", "s3cret"], "pw\n", 2,
                         "unrecognized arguments: s3cret"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(USER_ERRORS))
def test_user_errors_change_nothing(tree: Path, case: str) -> None:
    argv, stdin, rc, message = USER_ERRORS[case]
    before = files(tree)
    r = mailpolicy("user", *argv, "--root", tree, stdin=stdin)
    assert (r.rc, r.out) == (rc, "")
    assert message in r.err
    if rc == 1:
        assert len(r.err.splitlines()) == 1  # one message, no traceback
    assert files(tree) == before  # same content, mode and inode: not even rewritten
    assert leftovers(tree / "passwd") == []


def test_user_commands_need_an_existing_root(tmp_path: Path) -> None:
    root = tmp_path / "srv-mial"  # a typo must not start a new tree
    r = mailpolicy("user", "add", "--root", root, "dave@example.org", stdin="pw\n")
    assert (r.rc, r.out, r.err) == (2, "", f"mailpolicy: {root}: no such directory\n")
    r = mailpolicy("alias", "add", "--root", root, "info@example.org", "dave@example.org")
    assert r.rc == 2
    r = mailpolicy("user", "list", "--root", root)
    assert r.rc == 2
    assert not root.exists()


def test_user_add_refuses_to_write_into_a_broken_file(tree: Path) -> None:
    n = append(tree / "passwd/example.net", "broken\n")
    before = files(tree)
    r = mailpolicy("user", "add", "--root", tree, "dave@example.net", stdin="pw\n")
    assert r.rc == 1
    assert r.err.startswith(
        f"mailpolicy user: refusing to write an invalid file: passwd/example.net:{n}: "
        "expected user:hash"
    )
    assert files(tree) == before
    assert leftovers(tree / "passwd") == []


def test_user_changes_reach_the_daemon(tree: Path, start_daemon: Callable[..., Daemon]) -> None:
    d = start_daemon(tree)
    ask = rcpt("203.0.113.5", "dave@example.org")
    assert d.ask(ask).startswith(b"DENY 550 5.1.1 ")

    def wait_for(prefix: bytes) -> float:
        start = time.monotonic()
        while time.monotonic() - start < 3.0:
            if d.ask(ask).startswith(prefix):
                return time.monotonic() - start
            time.sleep(0.02)
        raise AssertionError(f"the daemon still answers {d.ask(ask)!r}")

    r = mailpolicy("user", "add", "--root", tree, "dave@example.org", stdin="pw\n")
    assert r.rc == 0
    took = wait_for(b"ACCEPT 250 2.1.5 ")
    print(f"the daemon accepted dave@example.org {took:.2f} s after `user add`")
    assert took < 1.5

    r = mailpolicy("user", "del", "--root", tree, "dave@example.org")
    assert r.rc == 0
    took = wait_for(b"DENY 550 5.1.1 ")
    assert took < 1.5
    assert d.proc.poll() is None


# --- alias --------------------------------------------------------------------------------


def test_alias_list(tree: Path) -> None:
    r = mailpolicy("alias", "list", "--root", tree)
    assert (r.rc, r.err) == (0, "")
    assert r.lines == [
        "postmaster@*: alice@example.org",
        "abuse@*: alice@example.org",
        "hello@example.com: alice@example.org",
        "*@example.net: carol",
        "hostmaster@example.net: carol",
        "info@example.org: alice, bob",
        "sales@example.org: bob, carol@example.net",
        "webmaster@example.org: alice",
    ]
    r = mailpolicy("alias", "list", "--root", tree, "Example.NET")
    assert r.lines == ["*@example.net: carol", "hostmaster@example.net: carol"]
    r = mailpolicy("alias", "list", "--root", tree, "*")
    assert r.lines == ["postmaster@*: alice@example.org", "abuse@*: alice@example.org"]
    r = mailpolicy("alias", "list", "--root", tree, "nowhere.example")
    assert (r.rc, r.out) == (1, "")
    assert r.err == "mailpolicy alias: nowhere.example is not a local domain\n"


def test_alias_add_merges_into_existing(tree: Path) -> None:
    path = tree / "aliases" / "example.org"
    path.chmod(0o640)
    before = path.read_text().splitlines()
    n = line_of(path, "info:")
    ino = path.stat().st_ino
    r = mailpolicy(
        "alias", "add", "--root", tree, "INFO@example.org", "Bob", "carol@example.net", "dave"
    )
    assert (r.rc, r.out, r.err) == (0, f"INFO@example.org: added to {path}\n", "")
    after = path.read_text().splitlines()
    # bob is there already (case-insensitively); the others are appended; nothing else moves
    assert after == [*before[: n - 1], "info: alice, bob, carol@example.net, dave", *before[n:]]
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert path.stat().st_ino != ino
    assert leftovers(tree / "aliases") == []

    r = explain(tree, "info@example.org")
    assert r.rc == 0  # dave@example.org does not exist: the RCPT is still accepted ...
    assert (
        "alias of alice@example.org, bob@example.org, carol@example.net, dave@example.org" in r.out
    )
    r = mailpolicy("check", "--root", tree, *HOST)  # ... but check says it would bounce
    assert (
        f"warning: aliases/example.org:{n}: info@example.org -> dave@example.org: no such" in r.out
    )


def test_alias_add_new_and_catch_all(tree: Path) -> None:
    path = tree / "aliases" / "example.org"
    before = path.read_text().splitlines()
    r = mailpolicy("alias", "add", "--root", tree, "team@example.org", "alice", "bob@example.org")
    assert r.rc == 0
    r = mailpolicy("alias", "add", "--root", tree, "*@example.org", "alice")
    assert (r.rc, r.out) == (0, f"*@example.org: added to {path}\n")
    assert path.read_text().splitlines() == [*before, "team: alice, bob@example.org", "*: alice"]
    r = explain(tree, "anyone@example.org")
    assert r.rc == 0
    assert f"alias of alice@example.org [aliases/example.org:{len(before) + 2}]" in r.out

    r = mailpolicy("alias", "del", "--root", tree, "*@example.org")
    assert r.rc == 0
    r = explain(tree, "anyone@example.org")
    assert r.lines[-1].startswith("verdict: deny 550 5.1.1 ")

    # A domain without an aliases file gets a new one (and so becomes a local domain).
    r = mailpolicy("alias", "add", "--root", tree, "*@fresh.example", "alice@example.org")
    new = tree / "aliases" / "fresh.example"
    assert r.rc == 0
    assert new.read_text().splitlines()[-1] == "*: alice@example.org"
    assert stat.S_IMODE(new.stat().st_mode) == 0o644


def test_alias_global(tree: Path) -> None:
    path = tree / "exim" / "conf" / "global_aliases"
    before = path.read_text().splitlines()
    r = mailpolicy("alias", "add", "--root", tree, "--global", "Hostmaster", "alice@example.org")
    assert (r.rc, r.out) == (0, f"Hostmaster: added to {path}\n")
    assert path.read_text().splitlines() == [*before, "hostmaster: alice@example.org"]
    r = explain(tree, "hostmaster@example.com")
    assert r.rc == 0
    assert f"alias of alice@example.org [exim/conf/global_aliases:{len(before) + 1}]" in r.out

    r = mailpolicy("alias", "add", "--root", tree, "--global", "abuse", "bob@example.org")
    assert r.rc == 0
    n = line_of(path, "abuse:")
    assert path.read_text().splitlines()[n - 1] == "abuse: alice@example.org, bob@example.org"

    r = mailpolicy("alias", "del", "--root", tree, "--global", "abuse", "alice@example.org")
    assert r.rc == 0
    assert path.read_text().splitlines()[n - 1] == "abuse: bob@example.org"
    r = mailpolicy("alias", "del", "--root", tree, "--global", "hostmaster")
    assert (r.rc, r.out) == (0, f"hostmaster: removed from {path}\n")
    assert "hostmaster" not in path.read_text()

    before = files(tree)
    for argv, message in [
        (["hostmaster@example.org", "alice@example.org"], "a global alias is a bare local part"),
        (["*", "alice@example.org"], "global_aliases has no catch-all"),
        (["a|b", "alice@example.org"], "'a|b' is not allowed as an alias name"),
    ]:
        r = mailpolicy("alias", "add", "--root", tree, "--global", *argv)
        assert (r.rc, r.out) == (1, "")
        assert r.err.startswith("mailpolicy alias: ") and message in r.err
    assert files(tree) == before


FOLDED = """\
# the team, folded over several lines
team: alice@example.org,
  bob@example.org,
# carol@example.net,   (commented out: she left)

\tdave@example.org
# after the team
other: x@example.org
"""


def test_alias_with_continuation_lines(make_tree: Callable[[dict[str, str]], Path]) -> None:
    root = make_tree(
        {"aliases/example.org": FOLDED, "passwd/example.org": "alice:{PLAIN}a\nbob:{PLAIN}b\n"}
    )
    path = root / "aliases" / "example.org"
    r = mailpolicy("alias", "add", "--root", root, "team@example.org", "erin@example.org")
    assert r.rc == 0
    assert path.read_text() == (
        "# the team, folded over several lines\n"
        "team: alice@example.org, bob@example.org, dave@example.org, erin@example.org\n"
        "# carol@example.net,   (commented out: she left)\n"
        "\n"
        "# after the team\n"
        "other: x@example.org\n"
    )

    path.write_text(FOLDED)
    r = mailpolicy("alias", "del", "--root", root, "team@example.org", "dave@example.org")
    assert r.rc == 0
    assert "team: alice@example.org, bob@example.org\n" in path.read_text()
    assert "dave" not in path.read_text()

    path.write_text(FOLDED)
    r = mailpolicy("alias", "del", "--root", root, "team@example.org")
    assert r.rc == 0
    assert path.read_text() == (
        "# the team, folded over several lines\n"
        "# carol@example.net,   (commented out: she left)\n"
        "\n"
        "# after the team\n"
        "other: x@example.org\n"
    )
    r = mailpolicy("alias", "list", "--root", root, "example.org")
    assert r.lines == ["other@example.org: x@example.org"]


def test_alias_del(tree: Path) -> None:
    path = tree / "aliases" / "example.org"
    before = path.read_text().splitlines()
    n = line_of(path, "sales:")
    r = mailpolicy("alias", "del", "--root", tree, "sales@example.org", "CAROL@example.net")
    assert (r.rc, r.out) == (0, f"sales@example.org: removed from {path}\n")
    assert path.read_text().splitlines() == [*before[: n - 1], "sales: bob", *before[n:]]
    # removing the last destination removes the alias
    r = mailpolicy("alias", "del", "--root", tree, "sales@example.org", "bob")
    assert r.rc == 0
    assert path.read_text().splitlines() == [*before[: n - 1], *before[n:]]
    m = line_of(path, "webmaster:")
    r = mailpolicy("alias", "del", "--root", tree, "webmaster@example.org")
    assert r.rc == 0
    assert path.read_text().splitlines() == [*before[: n - 1], *before[n:m], *before[m + 1 :]]
    assert leftovers(tree / "aliases") == []

    before = files(tree)
    r = mailpolicy("alias", "del", "--root", tree, "info@example.org", "carol@example.net")
    assert (r.rc, r.out) == (1, "")
    assert r.err == "mailpolicy alias: info@example.org has no destination 'carol@example.net'\n"
    r = mailpolicy("alias", "del", "--root", tree, "nobody@example.org")
    assert r.err == "mailpolicy alias: no alias nobody@example.org\n"
    assert r.rc == 1
    r = mailpolicy("alias", "del", "--root", tree, "nobody@nowhere.example")
    assert r.rc == 1
    assert files(tree) == before


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["info@example.org", "|/bin/sh"], "destination '|/bin/sh' is not a plain address"),
        (["info@example.org", "/var/mail/x"], "destination '/var/mail/x' is not a plain address"),
        (["info@example.org", ":include:/etc/x"], "':include:/etc/x' is not a plain address"),
        (["info@example.org", ":fail: no"], "':fail: no' is not a plain address"),
        (["info@example.org", '"a b"@example.org'], "is not a plain address"),
        (["info@example.org", "a,b@example.org"], "'a,b@example.org' is not a plain address"),
        (["info@example.org", "alice", "bob|x"], "destination 'bob|x' is not a plain address"),
        (["new@example.org"], "alias add needs at least one destination"),
        (["info", "alice@example.org"], "'info' is not user@domain"),
        (["a|b@example.org", "alice"], "'a|b' is not allowed as an alias name"),
        (["#x@example.org", "alice"], "'#x' is not allowed as an alias name"),
        (["a b@example.org", "alice"], "'a b' is not allowed as an alias name"),
    ],
    ids=["pipe", "file", "include", "fail", "quoted", "comma", "one-bad", "no-target", "no-at",
         "key-pipe", "key-comment", "key-space"],
)  # fmt: skip
def test_alias_add_refuses(tree: Path, argv: list[str], message: str) -> None:
    before = files(tree)
    r = mailpolicy("alias", "add", "--root", tree, *argv)
    assert (r.rc, r.out) == (1, "")
    assert r.err.startswith("mailpolicy alias: ")
    assert message in r.err
    assert files(tree) == before
    assert leftovers(tree / "aliases") == []


# --- config -------------------------------------------------------------------------------


def test_config_show(tmp_path: Path) -> None:
    cfg = tmp_path / "mailpolicy.toml"
    cfg.write_text(
        'root = "/srv/other"\nrequest_deadline = 2\nprimary_hostname = "MX.Example.ORG."\n'
        'socket_group = "Debian-exim"\n'
    )
    r = mailpolicy("config", "show", "--config", cfg, "--socket", "/tmp/x.sock")
    assert (r.rc, r.err) == (0, "")
    assert r.lines == [
        'root = "/srv/other"',
        'socket = "/tmp/x.sock"',  # the command line wins
        'socket_mode = "0660"',
        'socket_group = "Debian-exim"',
        'primary_hostname = "MX.Example.ORG."',
        "request_deadline = 2.0",  # an int where a float is expected is fine
        "mail_deadline = 80.0",
        "data_deadline = 120.0",
        "max_connections = 512",
        "backlog = 1024",
        "reload_interval = 0.25",
        "drain_timeout = 5.0",
        "alias_max_depth = 10",
        "alias_max_targets = 1000",
        'log_file = ""',
        'auth_socket = ""',
        'auth_socket_mode = "0660"',
        'auth_socket_group = ""',
        "auth_deadline = 8.0",
        'auth_default_realm = ""',
        "auth_workers = 2",
        "auth_cache_ttl = 300.0",
        "auth_throttle_free = 3",
        "auth_throttle_base = 0.5",
        "auth_throttle_max = 4.0",
        "auth_throttle_window = 900.0",
        'dns_servers = ""',
        "dns_port = 53",
        "dns_timeout = 5.0",
        "callout_enabled = true",  # TOML's spelling
        "callout_port = 25",
        "callout_connect_timeout = 15.0",
        "callout_timeout = 60.0",
        "callout_positive_ttl = 86400.0",
        "callout_negative_ttl = 7200.0",
        "callout_cache_size = 100000",
        "callout_domain_concurrency = 2",
        "callout_rate = 10.0",
        "callout_burst = 20",
        "callout_allow_private = false",
        'callout_helo = ""',
        "spf_enabled = true",
        "spf_timeout = 15.0",
        'spf_softfail = "accept"',
        'spf_neutral = "accept"',
        'spf_none = "accept"',
        'spf_permerror = "accept"',
        'secondary_mx_hosts = ""',
        "dkim_enabled = true",
        "dkim_timeout = 15.0",
        'blocked_extensions = ".exe .pif .bat .scr .lnk .com .js .docm"',
        'clamd_socket = "/run/clamav/clamd.ctl"',
        "clamd_timeout = 30.0",
        'clamav_on_failure = "defer"',
        'spamd_socket = ""',
        'spamd_host = "127.0.0.1"',
        "spamd_port = 783",
        "spamd_timeout = 30.0",
        'spam_on_failure = "defer"',
        "spam_max_size = 409600",
        "spam_flag_score = 3.5",
        "spam_reject_score = 0.0",
        "spam_report_max = 2000",
        "backup_increments = 28",
        'backup_retain = "8 weeks"',
        'backup_openssl_key = ""',
        'backup_openssl_iv = ""',
        'backup_bucket = ""',
        'backup_s3_endpoint = ""',
        'backup_gcs_endpoint = ""',
        'boto_gs_oauth2_refresh_token = ""',
        'boto_default_project_id = ""',
        '# effective primary_hostname: "mx.example.org"',
    ]
    r = mailpolicy("config", "show")  # /dev/null: every default
    assert r.rc == 0
    assert 'root = "/srv/mail"' in r.lines
    assert 'socket = "/run/mailpolicy/policy.sock"' in r.lines


BAD_CONFIGS = {
    "unknown-key": ("roots = '/srv/mail'\n", "unknown setting 'roots'"),
    "str-for-float": ("reload_interval = 'fast'\n",
                      "setting 'reload_interval' must be float, not str"),
    "bool-for-int": ("max_connections = true\n", "setting 'max_connections' must be int, not bool"),
    "int-for-str": ("socket_mode = 660\n", "setting 'socket_mode' must be str, not int"),
    "float-for-int": ("backlog = 1.5\n", "setting 'backlog' must be int, not float"),
    "not-octal": ("socket_mode = '0999'\n", "socket_mode '0999' is not octal"),
    "not-positive": ("request_deadline = 0\n", "request_deadline must be positive"),
    "too-small": ("alias_max_depth = 0\n", "alias_max_depth must be at least 1"),
    "bad-toml": ("root = [\n", ""),
    # the seed's backup metadata keys
    "short-key": ("backup_openssl_key = 'abc123'\n",
                  "backup_openssl_key must be 32 hex digits (128 bits)"),
    "bad-bucket": ("backup_bucket = 'ftp://x'\n", "backup_bucket must be gs://bucket"),
    "bucket-name": ("backup_bucket = 's3://Bad_Bucket-'\n", "backup_bucket must be gs://bucket"),
    "bad-retain": ("backup_retain = 'forever'\n",
                   "backup_retain 'forever' is not a duration like '8 weeks'"),
    "spf-action": ("spf_softfail = 'drop'\n", "spf_softfail must be \"accept\" or \"reject\""),
    "scan-failure": ("clamav_on_failure = 'ignore'\n",
                     "clamav_on_failure must be \"defer\" or \"accept\""),
    "mail-deadline": ("mail_deadline = 10\n", "mail_deadline must be at least spf_timeout"),
}  # fmt: skip


def test_config_backup_secrets_are_not_shown_and_file_buckets_are_fine(tmp_path: Path) -> None:
    cfg = tmp_path / "backup.toml"
    cfg.write_text('backup_openssl_key = "00112233445566778899aabbccddeeff"\n'
                   'backup_openssl_iv = "ffeeddccbbaa99887766554433221100"\n'
                   'backup_bucket = "file:///mnt/backup-disk/mail"\nbackup_retain = "3 months"\n'
                   'boto_gs_oauth2_refresh_token = "1//secret-token"\n')  # fmt: skip
    r = mailpolicy("config", "show", "--config", cfg)
    assert r.rc == 0, r.err
    assert 'backup_openssl_key = "(set)"' in r.lines
    assert 'backup_openssl_iv = "(set)"' in r.lines
    assert 'boto_gs_oauth2_refresh_token = "(set)"' in r.lines
    assert 'backup_bucket = "file:///mnt/backup-disk/mail"' in r.lines
    assert "00112233" not in r.out and "secret-token" not in r.out


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_config_errors(tmp_path: Path, tree: Path, case: str) -> None:
    text, message = BAD_CONFIGS[case]
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    for argv in (["config", "show"], ["check", "--root", tree]):
        r = mailpolicy(*argv, "--config", cfg)
        assert (r.rc, r.out) == (2, "")
        assert r.err.startswith(f"mailpolicy: {cfg}: {message}")
        assert len(r.err.splitlines()) == 1  # a message, not a traceback


def test_config_missing_file(tmp_path: Path) -> None:
    cfg = tmp_path / "nope.toml"
    r = mailpolicy("config", "show", "--config", cfg)
    assert (r.rc, r.out) == (2, "")
    assert r.err == f"mailpolicy: {cfg}: cannot read: No such file or directory\n"


def test_check_warns_about_entries_of_a_rewritten_domain(tree: Path) -> None:
    (tree / "passwd" / "example.info").write_text("zed:{PLAIN}x\n")
    r = mailpolicy("check", "--root", tree)
    assert r.rc == 0
    assert "warning: passwd/example.info: example.info is rewritten to example.org" in r.out
    assert "its entries are never used" in r.out
