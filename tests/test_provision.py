"""``mailpolicy provision`` (policy/provision.py) and the metadata it reads (policy/metadata.py).

The seed's example VM JSON (examples/metadata/vm.json) is provisioned into a temporary root and
etc, on loopback at an offset, offline (no DNS, spamd without network tests, no freshclam),
non-local mail to a loopback sink; then what it rendered runs for real under supervisord with
its rendered supervisord.conf (the OCI image's init): a user is added, a message goes in over
SMTP and is read back over IMAP. Re-provisioning keeps admin data and mail; bad metadata gets
clear errors and changes nothing; the rendered Exim and Dovecot configurations pass
``exim -bV`` and ``doveconf -n``.
"""

from __future__ import annotations

import imaplib
import json
import os
import shutil
import smtplib
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from policy import metadata as md_mod
from policy.metadata import MetadataError, env_name, read, validate
from policy.provision import BEGIN, END, SSH_MARK, Target, provision
from tests.conftest import REPO
from tests.scan_stack import EICAR

VM_JSON = REPO / "examples" / "metadata" / "vm.json"
FLAT_JSON = REPO / "examples" / "metadata" / "flat.json"
CLAMAV_DB = REPO / "examples" / "clamav-db"
KEY = "00112233445566778899aabbccddeeff"
IV = "ffeeddccbbaa99887766554433221100"


def mailpolicy(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "policy", *args], cwd=REPO, text=True,
                          capture_output=True, input=stdin, timeout=120)  # fmt: skip


def free_offset() -> int:
    """A port offset at which SMTP, submission, IMAP, IMAPS, ManageSieve and the sink are free."""
    for offset in range(31000, 60000, 97):
        ports = [offset + p for p in (25, 587, 143, 993, 4190, 2525)]
        try:
            for port in ports:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return offset
    raise RuntimeError("no free port offset")


def target_args(base: Path, offset: int = 0) -> list[str]:
    return [
        "--root",
        str(base / "srv-mail"),
        "--etc",
        str(base / "etc"),
        "--run-dir",
        str(base / "run"),
        "--log-dir",
        str(base / "log"),
        "--listen",
        "127.0.0.1",
        "--port-offset",
        str(offset),
        "--sink-port",
        str(offset + 2525),
        "--offline",
        "--clamav-db",
        str(CLAMAV_DB),
    ]


def snapshot(base: Path) -> dict[str, tuple[int, bytes | str]]:
    """Every path under ``base``: mode and content (or link target)."""
    out: dict[str, tuple[int, bytes | str]] = {}
    if not base.exists():
        return out
    for path in sorted(base.rglob("*")):
        st = path.lstat()
        if path.is_symlink():
            out[str(path)] = (st.st_mode, os.readlink(path))
        elif path.is_file():
            out[str(path)] = (st.st_mode, path.read_bytes())
        else:
            out[str(path)] = (st.st_mode, "")
    return out


# --- metadata ---------------------------------------------------------------------------------


def test_seed_vm_json_gives_the_seeds_defaults() -> None:
    md = read(str(VM_JSON))
    assert (md.hostname, md.dns_domain, md.fqdn) == ("poopmail", "poop.nl", "poopmail.poop.nl")
    assert md.primary_hostname == "mail.poop.nl"
    # The seed: exim:qualify_domain defaults to hostname.domain; the login realm has no default.
    assert md.exim_qualify_domain == "poopmail.poop.nl"
    assert md.dovecot_qualify_domain == "cyberhq.nl"
    assert md.ssh_disabled is True and md.timezone == "Europe/Amsterdam"
    assert md.backup == {} and md.warnings == ()


def test_flat_map_and_backup_keys(tmp_path: Path) -> None:
    data = json.loads(FLAT_JSON.read_text())
    data |= {
        "backup:openssl_key": KEY,
        "backup:openssl_iv": IV,
        "backup:increments": 7,
        "backup:bucket": "s3://mail-backup/host1",
        "boto:default_project_id": "proj",
    }
    path = tmp_path / "flat.json"
    path.write_text(json.dumps(data))
    md = read(str(path))
    assert md.primary_hostname == "mail.example.org" and md.exim_qualify_domain == "example.org"
    assert md.ssh_disabled is False
    assert md.backup == {
        "backup_openssl_key": KEY,
        "backup_openssl_iv": IV,
        "backup_increments": 7,
        "backup_retain": "8 weeks",
        "backup_bucket": "s3://mail-backup/host1",
        "boto_default_project_id": "proj",
    }


def test_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # no mdata-get
    env = {env_name("hostname"): "mx1", env_name("dns_domain"): "example.net",
           env_name("system:timezone"): "UTC", env_name("backup:openssl_key"): KEY}  # fmt: skip
    assert env_name("boto:gs_oauth2_refresh_token") == "MAILPOLICY_BOTO_GS_OAUTH2_REFRESH_TOKEN"
    md = read(None, env)
    assert md.source == "environment" and md.fqdn == "mx1.example.net"
    assert md.primary_hostname == "mx1.example.net" and md.timezone == "UTC"
    assert md.backup == {"backup_openssl_key": KEY}


def test_mdata_get_on_smartos(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SmartOS's mdata-list/mdata-get (which cannot exist on Linux: two scripts stand in for
    them, answering as mdata-get(1M) does, exit 1 for a missing key)."""
    store = {"sdc:hostname": "poopmail", "sdc:dns_domain": "poop.nl",
             "system:timezone": "Europe/Amsterdam", "root_authorized_keys": "ssh-ed25519 AAAA",
             "dovecot:primary_hostname": "mail.poop.nl", "system:time_zone": "typo"}  # fmt: skip
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (tmp_path / "store.json").write_text(json.dumps(store))
    listed = [k for k in store if not k.startswith("sdc:")]
    (bin_dir / "mdata-list").write_text("#!/bin/sh\nprintf '%s\\n' " + " ".join(listed) + "\n")
    (bin_dir / "mdata-get").write_text(
        f"#!{sys.executable}\nimport json, sys\n"
        f"store = json.load(open({str(tmp_path / 'store.json')!r}))\n"
        "if sys.argv[1] not in store:\n    print('No metadata for ' + sys.argv[1], "
        "file=sys.stderr); sys.exit(1)\nprint(store[sys.argv[1]])\n"
    )
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    md = read(None, {})
    assert md.source == "mdata-get" and md.fqdn == "poopmail.poop.nl"
    assert md.primary_hostname == "mail.poop.nl" and md.timezone == "Europe/Amsterdam"
    # A typo is a warning, SmartOS's own keys are not.
    assert md.warnings == ("system:time_zone: unknown key, ignored",)


def test_every_problem_named_at_once() -> None:
    raw = {"hostname": "bad_host!", "system:timezone": "Mars/Olympus_Mons",
           "system:ssh_disabled": "maybe", "backup:openssl_key": "abc",
           "backup:openssl_iv": KEY + "00", "backup:bucket": "ftp://x", "backup:retain": "soon",
           "backup:increments": "-1"}  # fmt: skip
    with pytest.raises(MetadataError) as e:
        validate("test", raw)
    text = "\n".join(e.value.problems)
    for fragment in (
        "hostname: 'bad_host!' is not a host or domain name",
        "system:timezone: unknown time zone 'Mars/Olympus_Mons'",
        "system:ssh_disabled: 'maybe' is not true or false",
        "backup:openssl_key: backup:openssl_key must be 32 hex digits",
        "backup:openssl_iv: backup:openssl_iv must be 32 hex digits",
        "backup:bucket: backup:bucket must be gs://bucket",
        "backup:retain:",
        "backup:increments: '-1' is not a whole number",
    ):
        assert fragment in text, text
    assert len(e.value.problems) == 8


@pytest.mark.parametrize(
    "zone", ["../../etc/passwd", "/etc/localtime", "Europe/../UTC", "zone.tab"]
)
def test_timezone_names_are_zone_files_only(zone: str) -> None:
    assert not md_mod.valid_timezone(zone)


def test_bad_json_is_an_error(tmp_path: Path) -> None:
    for text, fragment in [("{", "not JSON"), ("[1]", "must be a JSON object"),
                           ('{"customer_metadata": 3}', "customer_metadata must be"),
                           ('{"system:timezone": ["UTC"]}', "must be a string")]:  # fmt: skip
        (tmp_path / "m.json").write_text(text)
        with pytest.raises(MetadataError, match=fragment):
            read(str(tmp_path / "m.json"))


# --- provisioning without starting anything ------------------------------------------------


@pytest.fixture
def base() -> Iterator[Path]:
    """A directory Exim and Dovecot can reach (pytest's tmp_path is not searchable by others)."""
    path = Path(tempfile_short())
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_bad_metadata_changes_nothing(base: Path) -> None:
    first = mailpolicy("provision", "--metadata", str(VM_JSON), *target_args(base))
    assert first.returncode == 0, first.stderr
    bad = base / "bad.json"
    before = snapshot(base)
    bad.write_text(json.dumps({"customer_metadata": {
        "system:timezone": "Nowhere/Land", "backup:openssl_key": "xyz",
        "dovecot:primary_hostname": "mail.poop.nl"}}))  # fmt: skip
    done = mailpolicy("provision", "--metadata", str(bad), *target_args(base))
    assert done.returncode == 2 and done.stdout == ""
    assert "bad metadata" in done.stderr and "nothing changed" in done.stderr
    assert "unknown time zone 'Nowhere/Land'" in done.stderr
    assert "backup:openssl_key must be 32 hex digits" in done.stderr
    assert {k: v for k, v in snapshot(base).items() if k != str(bad)} == before
    # On a new machine too: not even the root is made.
    fresh = base / "fresh"
    done = mailpolicy("provision", "--metadata", str(bad), *target_args(fresh))
    assert done.returncode == 2 and not fresh.exists()


def test_dry_run_shows_and_changes_nothing(base: Path) -> None:
    done = mailpolicy("provision", "--dry-run", "--metadata", str(VM_JSON), *target_args(base))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert all(line.startswith("would ") for line in lines), lines
    assert f"would create  {base}/etc/exim4/exim4.conf" in lines
    assert f"would create  {base}/srv-mail/exim/conf/relay_from_hosts" in lines
    assert any("self-signed certificate" in line for line in lines)
    assert sorted(p.name for p in base.iterdir()) == []


def test_first_boot_tree_configs_and_system(base: Path) -> None:
    data = json.loads(VM_JSON.read_text())
    data["customer_metadata"] |= {"backup:openssl_key": KEY, "backup:openssl_iv": IV,
                                  "backup:bucket": "gs://my-mail-backup"}  # fmt: skip
    meta = base / "vm.json"
    meta.write_text(json.dumps(data))
    done = mailpolicy("provision", "--metadata", str(meta), *target_args(base))
    assert done.returncode == 0, done.stderr
    assert KEY not in done.stdout + done.stderr  # the key is never printed
    root, etc = base / "srv-mail", base / "etc"
    # The data tree, each list with its explanation and no entries.
    relay = (root / "exim" / "conf" / "relay_from_hosts").read_text()
    assert relay.startswith("# Hosts that may relay") and all(
        line.startswith("#") or not line for line in relay.splitlines()
    )
    for name in ("global_aliases", "rewrite_domains", "relay_to_domains",
                 "senderverify_exceptions", "dkim_required"):  # fmt: skip
        text = (root / "exim" / "conf" / name).read_text()
        assert text.startswith("#") and len(text.splitlines()) > 3, name
    assert (root / "dovecot" / "conf" / "local.conf").read_text().startswith("#")
    for sub in ("domains", "dkim", "backups", "exim/spool", "dovecot/sieve/before",
                "dovecot/sieve/after", "aliases"):  # fmt: skip
        assert (root / sub).is_dir(), sub
    assert (root / "passwd").stat().st_mode & 0o7777 == 0o2750
    assert (root / "backups").stat().st_mode & 0o777 == 0o700
    # The primary hostname's certificate.
    cert = subprocess.run(["openssl", "x509", "-noout", "-subject", "-in",
                           str(root / "ssl" / "mail.poop.nl" / "current" / "chained")],
                          capture_output=True, text=True, check=True)  # fmt: skip
    assert "CN = mail.poop.nl" in cert.stdout
    # The daemon's settings: 0600, the backup keys in them, a valid settings file.
    settings = etc / "mailpolicy" / "mailpolicy.toml"
    assert settings.stat().st_mode & 0o777 == 0o600
    text = settings.read_text()
    assert f'backup_openssl_key = "{KEY}"' in text and 'auth_default_realm = "cyberhq.nl"' in text
    check = mailpolicy("config", "show", "--config", str(settings))
    assert check.returncode == 0, check.stderr
    assert 'backup_bucket = "gs://my-mail-backup"' in check.stdout
    # Exim: the seed's qualify domain default; Dovecot: the login realm.
    exim_conf = (etc / "exim4" / "exim4.conf").read_text()
    assert "qualify_domain = poopmail.poop.nl" in exim_conf
    assert "primary_hostname = mail.poop.nl" in exim_conf
    assert "auth_default_realm = cyberhq.nl" in (etc / "dovecot" / "dovecot.conf").read_text()
    # Time zone and ssh.
    assert (etc / "timezone").read_text() == "Europe/Amsterdam\n"
    assert os.readlink(etc / "localtime") == "/usr/share/zoneinfo/Europe/Amsterdam"
    assert (etc / "ssh" / "sshd_not_to_be_run").read_text() == SSH_MARK
    # cron: the nightly backup and the housekeeping, programs that exist.
    cron = (etc / "cron.d" / "mailpolicy").read_text()
    jobs = [line.split() for line in cron.splitlines() if line[:1].isdigit()]
    assert len(jobs) == 2 and all(job[5] == "root" and os.access(job[6], os.X_OK) for job in jobs)
    assert jobs[0][6].endswith("hooks/backup") and str(settings) in jobs[0]


def test_rendered_configs_pass_exim_and_doveconf(base: Path) -> None:
    done = mailpolicy("provision", "--metadata", str(VM_JSON), *target_args(base))
    assert done.returncode == 0, done.stderr
    etc = base / "etc"
    exim = shutil.which("exim4") or "/usr/sbin/exim4"
    check = subprocess.run([exim, "-C", str(etc / "exim4" / "exim4.conf"), "-bV"],
                           capture_output=True, text=True)  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
    doveconf = subprocess.run(["doveconf", "-n", "-c", str(etc / "dovecot" / "dovecot.conf")],
                              capture_output=True, text=True)  # fmt: skip
    assert doveconf.returncode == 0, doveconf.stderr
    assert "auth_default_realm = cyberhq.nl" in doveconf.stdout
    assert "imap_port" not in doveconf.stderr


def test_reprovision_keeps_admin_data(base: Path) -> None:
    args = target_args(base)
    assert mailpolicy("provision", "--metadata", str(VM_JSON), *args).returncode == 0
    root, etc = base / "srv-mail", base / "etc"
    relay = root / "exim" / "conf" / "relay_from_hosts"
    relay.write_text("192.0.2.0/24\n")
    added = mailpolicy("user", "add", "--root", str(root), "bob@poop.nl", stdin="pw-1234\n")
    assert added.returncode == 0, added.stderr
    mail = root / "domains" / "poop.nl" / "bob" / "Maildir" / "cur" / "1.eml"
    mail.parent.mkdir(parents=True)
    mail.write_text("Subject: kept\n\nhello\n")
    settings = etc / "mailpolicy" / "mailpolicy.toml"
    settings.write_text(settings.read_text() + "spam_reject_score = 12.0\n")
    before = snapshot(root)
    again = mailpolicy("provision", "--metadata", str(VM_JSON), *args)
    assert again.returncode == 0, again.stderr
    assert again.stdout == "nothing to change: the machine already matches the metadata\n"
    assert snapshot(root) == before
    assert settings.read_text().endswith("spam_reject_score = 12.0\n")
    # New metadata: only what depends on it changes; the admin's setting stays.
    data = json.loads(VM_JSON.read_text())
    data["customer_metadata"] |= {"system:timezone": "UTC", "system:ssh_disabled": "false",
                                  "backup:increments": "14"}  # fmt: skip
    changed = base / "changed.json"
    changed.write_text(json.dumps(data))
    third = mailpolicy("provision", "--metadata", str(changed), *args)
    assert third.returncode == 0, third.stderr
    assert sorted(third.stdout.splitlines()) == sorted([
        f"update  {settings}", f"update  {etc}/timezone",
        f"update  {etc}/localtime -> /usr/share/zoneinfo/UTC",
        f"remove  {etc}/ssh/sshd_not_to_be_run"])  # fmt: skip
    text = settings.read_text()
    assert "backup_increments = 14" in text and text.endswith("spam_reject_score = 12.0\n")
    assert text.count(BEGIN) == 1 and text.count(END) == 1
    assert snapshot(root) == before
    # An ssh marker the admin made is theirs.
    (etc / "ssh" / "sshd_not_to_be_run").write_text("mine\n")
    assert mailpolicy("provision", "--metadata", str(changed), *args).returncode == 0
    assert (etc / "ssh" / "sshd_not_to_be_run").read_text() == "mine\n"


def test_admin_setting_that_clashes_is_refused_before_any_change(base: Path) -> None:
    args = target_args(base)
    assert mailpolicy("provision", "--metadata", str(VM_JSON), *args).returncode == 0
    settings = base / "etc" / "mailpolicy" / "mailpolicy.toml"
    settings.write_text(settings.read_text() + 'spam_reject_score = "high"\n')
    before = snapshot(base)
    done = mailpolicy("provision", "--metadata", str(VM_JSON), *args)
    assert done.returncode == 2 and "spam_reject_score" in done.stderr, done.stderr
    assert snapshot(base) == before


def test_unreachable_tree_is_refused(base: Path) -> None:
    private = base / "private"
    private.mkdir(mode=0o700)
    done = mailpolicy("provision", "--metadata", str(VM_JSON), *target_args(private))
    assert done.returncode == 2 and f"{private} is not searchable by others" in done.stderr
    assert list(private.iterdir()) == []


def test_smartos_time_zone_and_ssh(base: Path) -> None:
    t = Target(root=base / "srv-mail", etc=base / "etc", run_dir=base / "run",
               log_dir=base / "log", listen=("127.0.0.1",), offline=True,
               clamav_db=CLAMAV_DB, system="SunOS")  # fmt: skip
    (base / "etc" / "default").mkdir(parents=True)
    (base / "etc" / "default" / "init").write_text("CMASK=022\nTZ=UTC\nLANG=C\n")
    said: list[str] = []
    provision(read(str(VM_JSON)), t, say=said.append)
    assert (base / "etc" / "default" / "init").read_text() == (
        "CMASK=022\nLANG=C\nTZ=Europe/Amsterdam\n"
    )
    assert not (base / "etc" / "timezone").exists()
    # svcadm only on the real /etc: nothing run here.
    assert not any(line.startswith("run") for line in said), said


# --- provisioned, then running -------------------------------------------------------------


@pytest.fixture(scope="module")
def provisioned() -> Iterator[tuple[Path, int]]:
    """The seed's example metadata provisioned and its services running under supervisord,
    as the OCI image runs them."""
    base = Path(tempfile_short())
    offset = free_offset()
    done = mailpolicy("provision", "--metadata", str(VM_JSON), *target_args(base, offset))
    assert done.returncode == 0, done.stderr
    conf = base / "etc" / "mailpolicy" / "supervisord.conf"
    sink = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "aiosmtpd",
            "-n",
            "-l",
            f"127.0.0.1:{offset + 2525}",
            "-c",
            "aiosmtpd.handlers.Sink",
        ]
    )
    with (base / "supervisord.stdout").open("wb") as out:
        sup = subprocess.Popen(["supervisord", "-n", "-c", str(conf)], stdout=out, stderr=out)
    try:
        wait_listening(offset + 25, sup, base)
        wait_listening(offset + 143, sup, base)
        yield base, offset
    finally:
        sup.terminate()
        try:
            sup.wait(60)
        except subprocess.TimeoutExpired:
            sup.kill()
        sink.terminate()
        sink.wait(10)
        shutil.rmtree(base, ignore_errors=True)


def tempfile_short() -> str:
    """A short directory: Unix socket paths under it stay below 107 bytes."""
    import tempfile

    path = tempfile.mkdtemp(prefix="pv", dir="/tmp")
    os.chmod(path, 0o755)  # Exim and Dovecot, not root, must reach the tree and the logs
    return path


def wait_listening(port: int, proc: subprocess.Popen[bytes], base: Path) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"supervisord exited: {(base / 'supervisord.stdout').read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                if s.recv(100):
                    return
        except OSError:
            time.sleep(0.2)
    logs = "\n".join(f"{p.name}: {p.read_text()[-800:]}" for p in (base / "log").glob("*.out"))
    pytest.fail(f"nothing answered on port {port} within 90 s\n{logs}")


def status(base: Path) -> str:
    conf = base / "etc" / "mailpolicy" / "supervisord.conf"
    return subprocess.run(["supervisorctl", "-c", str(conf), "status"], capture_output=True,
                          text=True).stdout  # fmt: skip


def test_provisioned_server_takes_mail_over_smtp_and_serves_it_over_imap(
    provisioned: tuple[Path, int],
) -> None:
    base, offset = provisioned
    root = base / "srv-mail"
    added = mailpolicy("user", "add", "--root", str(root), "bob@poop.nl", stdin="s3cret-pw\n")
    assert added.returncode == 0, added.stderr
    # Every service of an offline server (no freshclam, no cron), and only those, running.
    deadline = time.monotonic() + 30
    while True:
        states = dict(line.split()[:2] for line in status(base).splitlines())
        if set(states.values()) == {"RUNNING"} or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert states == dict.fromkeys(["clamd", "dovecot", "exim", "policy", "spamd"], "RUNNING")
    marker = f"provisioned-{time.time()}"
    with smtplib.SMTP("127.0.0.1", offset + 25, timeout=60, source_address=("127.0.0.2", 0)) as s:
        s.ehlo("client.example.net")
        refused = s.sendmail(
            "someone@remote.example",
            ["bob@poop.nl"],
            f"From: someone@remote.example\r\nSubject: {marker}\r\n\r\nhi\r\n",
        )
        assert refused == {}
        # clamd (running as clamav) scans: EICAR is refused, naming the signature.
        s.mail("someone@remote.example")
        s.rcpt("bob@poop.nl")
        code, reply = s.data(b"Subject: eicar\r\n\r\n" + EICAR + b"\r\n")
        assert code == 550 and b"EICAR" in reply, reply
        # Not an open relay once provisioned.
        code, _ = s.docmd("RSET")
        s.mail("someone@remote.example")
        code, reply = s.rcpt("victim@far.example")
        assert code == 550, reply
    ctx = ssl.create_default_context(cafile=str(root / "ssl" / "mail.poop.nl" / "current" / "ca"))
    ctx.check_hostname = False
    deadline = time.monotonic() + 30
    while True:
        imap = imaplib.IMAP4("127.0.0.1", offset + 143)
        imap.starttls(ssl_context=ctx)
        # The realm (dovecot:qualify_domain cyberhq.nl) applies to bare names; bob logs in fully.
        imap.login("bob@poop.nl", "s3cret-pw")
        imap.select("INBOX")
        _, found = imap.search(None, "SUBJECT", marker)
        if found[0] or time.monotonic() > deadline:
            break
        imap.logout()
        time.sleep(0.5)
    assert found[0], (base / "log" / "mainlog").read_text()[-2000:]
    _, data = imap.fetch(found[0].split()[0], "(BODY.PEEK[HEADER])")
    header = data[0][1].decode()  # type: ignore[index,union-attr]
    assert "X-Spam-Score:" in header and marker in header
    imap.logout()


def test_housekeeping_tidies_the_provisioned_spool(provisioned: tuple[Path, int]) -> None:
    base, _ = provisioned
    spool = base / "srv-mail" / "exim" / "spool"
    done = subprocess.run([str(REPO / "hooks" / "housekeeping"), str(spool)],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    missing = subprocess.run([str(REPO / "hooks" / "housekeeping")], capture_output=True, text=True)
    assert missing.returncode != 0 and "usage" in missing.stderr


def test_reprovision_while_running_changes_nothing(provisioned: tuple[Path, int]) -> None:
    base, offset = provisioned
    done = mailpolicy("provision", "--metadata", str(VM_JSON), *target_args(base, offset))
    assert done.returncode == 0, done.stderr
    assert done.stdout == "nothing to change: the machine already matches the metadata\n"
