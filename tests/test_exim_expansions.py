"""The Exim expansions of docs/protocol.md, run in the real Exim 4.96 against the real daemon.

The ACL and router blocks are read from docs/protocol.md (the ```` ``` ```` blocks after the
``<!-- exim:acl -->`` / ``<!-- exim:router -->`` markers), put into a minimal configuration, and
exercised with ``exim -bh`` (a fake SMTP session: the ACLs run, readsocket really connects) and
``exim -bt`` (address routing through the alias router). Nothing listens on the network.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO

# scripts/setup.sh installs exim4-daemon-heavy: a missing exim fails these tests, never skips.
EXIM = shutil.which("exim") or shutil.which("exim4") or "exim"
pytestmark = pytest.mark.integration


def doc_blocks(marker: str) -> list[str]:
    text = (REPO / "docs" / "protocol.md").read_text()
    return re.findall(rf"<!-- exim:{marker} -->\n```\n(.*?)```", text, re.S)


CONFIG = """\
MAILPOLICY_SOCKET = {socket}
primary_hostname = mail.example.org
domainlist local_domains = example.org : example.net : example.com
spool_directory = {base}/spool
log_file_path = {base}/log/%slog
host_lookup =
rfc1413_hosts =
keep_environment =
acl_smtp_connect = acl_check_connect
acl_smtp_mail = acl_check_mail
acl_smtp_rcpt = acl_check_rcpt
acl_smtp_data = acl_check_data

begin acl
{acls}
begin routers
{router}
local_user:
  driver = accept
  domains = +local_domains
  transport = local_delivery

begin transports
local_delivery:
  driver = appendfile
  file = /dev/null
"""


@pytest.fixture
def exim_conf(short_dir: Path, tree: Path, start_daemon):  # type: ignore[no-untyped-def]
    for sub in ("spool", "log"):
        (short_dir / sub).mkdir()
        shutil.chown(short_dir / sub, "Debian-exim", "Debian-exim")
    acls = doc_blocks("acl")
    router = doc_blocks("router")
    assert len(acls) == 5 and len(router) == 1, "docs/protocol.md lost its Exim blocks"
    daemon = start_daemon(tree, "--socket-group", "Debian-exim")
    conf = short_dir / "exim.conf"
    conf.write_text(
        CONFIG.format(socket=daemon.socket, base=short_dir, acls="\n".join(acls), router=router[0])
    )
    subprocess.run([EXIM, "-C", str(conf), "-bV"], check=True, capture_output=True)
    return conf, daemon


def all_replies(conf: Path, ip: str, *commands: str) -> list[str]:
    """The final reply lines ("250 ...", not "250-...") of an `exim -bh` session, banner first."""
    script = "EHLO client.example\r\n" + "".join(c + "\r\n" for c in commands) + "QUIT\r\n"
    out = subprocess.run(
        [EXIM, "-C", str(conf), "-bh", ip], input=script.encode(), capture_output=True, timeout=60
    ).stdout.decode()
    return [ln for ln in out.splitlines() if re.match(r"^\d{3} ", ln)]


def smtp_session(conf: Path, ip: str, *commands: str) -> list[str]:
    """The replies to ``commands`` (minus the banner, EHLO and QUIT)."""
    replies = all_replies(conf, ip, *commands)
    assert replies[0].startswith("220 "), replies
    return replies[2:-1]


def test_acls_take_the_daemons_answers(exim_conf) -> None:  # type: ignore[no-untyped-def]
    conf, daemon = exim_conf
    replies = smtp_session(
        conf,
        "203.0.113.5",
        "MAIL FROM:<someone@remote.example>",
        "RCPT TO:<alice@example.org>",
        "RCPT TO:<nobody@example.org>",
        "RCPT TO:<friend@far.example>",
        "RCPT TO:<a%b@example.org>",
        "RCPT TO:<info+x@example.org>",
        "DATA",
        "Subject: test",
        "",
        "hello",
        ".",
    )
    assert replies[0].startswith("250")  # MAIL
    assert replies[1].startswith("250 Accepted")
    assert replies[2] == "550 5.1.1 <nobody@example.org>: no such user here"
    assert replies[3] == "550 5.7.1 relay not permitted"
    assert replies[4] == "550 5.1.3 restricted characters in address"
    assert replies[5].startswith("250 Accepted")
    assert replies[6].startswith("354 ")
    assert replies[7].startswith("250 OK id=")  # the DATA ACL accepted
    daemon.stop()
    log = daemon.log_text()
    assert "stage=CONNECT ip=203.0.113.5 " in log
    # The message's id first, then what the checks said (all off in tests/offline.toml).
    assert re.search(r"stage=DATA ip=203\.0\.113\.5 .* reason=\"id=\S+ size=\d+ rcpts=2; "
                     r"dkim: DKIM checks are off \(dkim_enabled = false\);", log)  # fmt: skip


def test_relay_from_hosts_relays(exim_conf) -> None:  # type: ignore[no-untyped-def]
    conf, _ = exim_conf
    replies = smtp_session(
        conf, "192.0.2.44", "MAIL FROM:<a@example.org>", "RCPT TO:<friend@far.example>"
    )
    assert replies[1].startswith("250 Accepted")


def test_hostile_local_part_reaches_the_daemon_intact(exim_conf) -> None:  # type: ignore[no-untyped-def]
    conf, daemon = exim_conf
    replies = smtp_session(
        conf, "203.0.113.5", "MAIL FROM:<a@remote.example>", 'RCPT TO:<"x y=z"@example.org>'
    )
    assert replies[1].startswith("550 5.1.1")  # judged as a user name, not a protocol error
    daemon.stop()
    # Exim hands the local part over without its quotes; base64 carries the space and "=".
    assert 'rcpt="<x y=z@example.org>"' in daemon.log_text()


def test_daemon_down_defers_and_never_accepts(exim_conf) -> None:  # type: ignore[no-untyped-def]
    conf, daemon = exim_conf
    daemon.stop()
    # The connect ACL answers the greeting with the defer and Exim closes the connection.
    replies = all_replies(conf, "203.0.113.5", "MAIL FROM:<someone@remote.example>")
    assert replies == ["451 4.3.0 policy daemon unavailable"]


def test_empty_or_garbage_reply_defers(exim_conf, short_dir: Path) -> None:  # type: ignore[no-untyped-def]
    """A server that answers nothing (empty reply is not a readsocket failure) or garbage."""
    import socket
    import threading

    conf, daemon = exim_conf
    daemon.stop()
    for answer in (b"", b"OK whatever\n"):
        path = daemon.socket
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(str(path))
        path.chmod(0o666)
        srv.listen(8)

        def serve(srv: socket.socket = srv, answer: bytes = answer) -> None:
            while True:
                try:
                    conn, _ = srv.accept()
                except OSError:
                    return
                conn.recv(4096)
                conn.sendall(answer)
                conn.close()

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        try:
            replies = all_replies(conf, "203.0.113.5", "MAIL FROM:<someone@remote.example>")
        finally:
            srv.close()
            path.unlink()
        assert replies == ["451 4.3.0 policy daemon gave no valid answer"], answer


def route(conf: Path, *addresses: str) -> str:
    return subprocess.run(
        [EXIM, "-C", str(conf), "-bt", *addresses], capture_output=True, timeout=60
    ).stdout.decode()


def test_alias_router_expands_through_the_daemon(exim_conf) -> None:  # type: ignore[no-untyped-def]
    conf, _ = exim_conf
    out = route(conf, "info@example.org")
    assert "alice@example.org\n    <-- info@example.org" in out
    assert "bob@example.org\n    <-- info@example.org" in out
    out = route(conf, "zz@example.net")  # catch-all
    assert "carol@example.net\n    <-- zz@example.net" in out
    out = route(conf, "alice@example.info")  # rewrite domain
    assert "alice@example.org\n    <-- alice@example.info" in out
    out = route(conf, "bob@example.org")  # a user: the router declines, local_user takes it
    assert "bob@example.org\n  router = local_user" in out


def test_alias_router_defers_when_daemon_down(exim_conf) -> None:  # type: ignore[no-untyped-def]
    conf, daemon = exim_conf
    daemon.stop()
    out = route(conf, "info@example.org")
    assert "info@example.org cannot be resolved at this time: DEFER 451 4.3.0" in out
