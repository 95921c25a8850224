"""The ``mailpolicy`` command: the daemon and the admin's tools.

Every subcommand takes ``--config FILE`` (default /etc/mailpolicy/mailpolicy.toml when it exists)
and ``--root DIR`` (default /srv/mail, or ``root`` from the config file). Exit status: 0 success,
1 the thing asked about is wrong (check found errors, explain denied/deferred, a user exists ...),
2 bad usage or our own trouble.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import getpass
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from policy import __version__, admin, passwords, protocol
from policy.aliases import Limits
from policy.checks import Context, Result
from policy.filecheck import check_tree
from policy.logbook import Logbook
from policy.mailtree import Snapshot, TreeLoader
from policy.pipeline import evaluate_async
from policy.services import Services
from policy.settings import Settings, SettingsError, load, show
from policy.verdict import Action

if TYPE_CHECKING:
    from policy.backup.store import Store


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {
        "root": getattr(args, "root", None),
        "socket": getattr(args, "socket", None),
        "socket_mode": getattr(args, "socket_mode", None),
        "socket_group": getattr(args, "socket_group", None),
        "auth_socket": getattr(args, "auth_socket", None),
        "auth_socket_group": getattr(args, "auth_socket_group", None),
        "log_file": getattr(args, "log_file", None),
        "primary_hostname": getattr(args, "primary_hostname", None),
    }
    return load(args.config, overrides)


# --- serve / query -----------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from policy.daemon import DaemonError, run

    settings = _settings(args)
    # A missing root (not mounted yet, a typo) would make every local domain remote, and the
    # daemon would answer 550 5.7.1 (a bounce) for all local mail: refuse to start instead.
    if not os.path.isdir(settings.root):
        print(f"mailpolicy serve: {settings.root}: no such directory", file=sys.stderr)
        return 2
    try:
        run(settings)
    except DaemonError as e:
        print(f"mailpolicy serve: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if args.encode:
        fields: dict[str, str] = {}
        for item in args.request[1:]:
            name, eq, value = item.partition("=")
            if not eq:
                print(f"mailpolicy query: {item!r} is not field=value", file=sys.stderr)
                return 2
            fields[name] = value
        line = protocol.encode_request(args.request[0], **fields)
    else:
        line = (" ".join(args.request) + "\n").encode("utf-8", "surrogateescape")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(args.timeout)
            s.connect(settings.socket)
            s.sendall(line)
            s.shutdown(socket.SHUT_WR)
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
    except OSError as e:
        print(f"mailpolicy query: {settings.socket}: {e}", file=sys.stderr)
        return 2
    reply = b"".join(chunks).decode("ascii", "replace")
    if not reply:
        print("mailpolicy query: empty reply", file=sys.stderr)
        return 2
    sys.stdout.write(reply if reply.endswith("\n") else reply + "\n")
    return 0


# --- check / explain ---------------------------------------------------------------------


def cmd_check(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if not os.path.isdir(settings.root):
        print(f"mailpolicy check: {settings.root}: no such directory", file=sys.stderr)
        return 2
    report = check_tree(
        settings.root,
        settings.hostname,
        Limits(settings.alias_max_depth, settings.alias_max_targets),
    )
    for e in report.errors:
        print(f"error: {e}")
    for w in report.warnings:
        print(f"warning: {w}")
    print(f"{settings.root}: {len(report.errors)} errors, {len(report.warnings)} warnings")
    if report.errors or (args.strict and report.warnings):
        return 1
    return 0


def _describe(name: str, result: Result) -> str:
    if result.verdict is None:
        text = f"  {name}: pass"
        if result.note:
            text += f": {result.note}"
    else:
        v = result.verdict
        text = f"  {name}: {v.action.value.lower()} {v.status.code} {v.status.enhanced} {v.text}"
        if v.reason:
            text += f" ({v.reason})"
    if result.source:
        text += f" [{result.source}]"
    return text


def cmd_explain(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if not os.path.isdir(settings.root):
        print(f"mailpolicy explain: {settings.root}: no such directory", file=sys.stderr)
        return 2
    snapshot, _ = TreeLoader(settings.root, settings.hostname).refresh()
    for problem in snapshot.problems:
        print(f"file problem: {problem}")
    limits = Limits(settings.alias_max_depth, settings.alias_max_targets)
    return asyncio.run(_explain(args, settings, snapshot, limits))


async def _explain(
    args: argparse.Namespace, settings: Settings, snapshot: Snapshot, limits: Limits
) -> int:
    # The checks that use the network (SPF, callouts) run only with --network: explaining a
    # decision must not probe other people's servers unless the admin asks for it.
    services = Services.create(settings) if args.network else None
    verdict = None
    for stage, header in (
        ("CONNECT", f"connection from {args.ip or 'local submission'}"),
        ("MAIL", f"MAIL FROM:<{args.sender}>"),
        ("RCPT", f"RCPT TO:<{args.rcpt}>"),
    ):
        print(header)
        trace: list[tuple[str, Result]] = []
        ctx = Context(
            stage, args.ip, args.sender, args.rcpt, args.helo, args.auth or "", snapshot, limits,
            services=services,
        )  # fmt: skip
        verdict = await evaluate_async(ctx, trace)
        for name, result in trace:
            print(_describe(name, result))
        if not trace:
            print("  no checks at this stage")
        if verdict.action is not Action.ACCEPT:
            break
    assert verdict is not None
    if services is not None:
        services.close()
    s = verdict.status
    print(f"verdict: {s.action.value.lower()} {s.code} {s.enhanced} {verdict.text}")
    for header in verdict.headers:
        print(f"header: {header}")
    return 0 if verdict.action is Action.ACCEPT else 1


# --- users and aliases -------------------------------------------------------------------


def _read_password(args: argparse.Namespace) -> str:
    if sys.stdin.isatty():
        first = getpass.getpass("New password: ")
        if getpass.getpass("Again: ") != first:
            raise admin.AdminError("the passwords differ")
        password = first
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise admin.AdminError("empty password (give it on standard input or at the prompt)")
    return password


def _tree_root(args: argparse.Namespace) -> str:
    """The root for the editing commands. It must exist: a mistyped --root must not quietly
    start a new tree."""
    root = _settings(args).root
    if not os.path.isdir(root):
        raise SettingsError(f"{root}: no such directory")
    return root


def cmd_user(args: argparse.Namespace) -> int:
    root = _tree_root(args)
    if args.action == "list":
        snapshot, _ = TreeLoader(root).refresh()
        wanted = args.domain.lower() if args.domain else None
        # An unknown domain is an error, not an empty list: the admin mistyped it.
        if wanted is not None and wanted not in snapshot.users:
            print(f"mailpolicy user: no passwd/{wanted}", file=sys.stderr)
            return 1
        for domain in sorted(snapshot.users):
            if wanted is not None and domain != wanted:
                continue
            loaded = snapshot.users[domain]
            if loaded.problem:
                print(f"error: {loaded.problem}", file=sys.stderr)
            for name, user in sorted((loaded.data or {}).items()):
                print(f"{name}@{domain} {passwords.scheme_of(user.hash) or 'CRYPT?'}")
        return 0
    if args.action == "del":
        path = admin.user_del(root, args.address)
        print(f"deleted {args.address} from {path}")
        return 0
    # Check the address (and whether the user exists) before asking for the password twice.
    admin.check_new_user(root, args.address, exists=args.action == "passwd")
    password = _read_password(args)
    hash_ = passwords.make_hash(password, args.scheme)
    if args.action == "add":
        path = admin.user_add(root, args.address, hash_)
        print(f"added {args.address} to {path} ({args.scheme})")
    else:
        path = admin.user_passwd(root, args.address, hash_)
        print(f"changed the password of {args.address} in {path} ({args.scheme})")
    return 0


def cmd_alias(args: argparse.Namespace) -> int:
    root = _tree_root(args)
    if args.action == "list":
        snapshot, _ = TreeLoader(root).refresh()
        wanted = args.domain.lower() if args.domain else None
        # Domains compare lower-cased; an unknown one is an error, not an empty list.
        if wanted not in (None, "*") and not snapshot.is_local_domain(wanted):
            print(f"mailpolicy alias: {wanted} is not a local domain", file=sys.stderr)
            return 1
        tables = [("*", snapshot.global_aliases)] if wanted in (None, "*") else []
        tables += [(d, a) for d, a in sorted(snapshot.aliases.items()) if wanted in (None, d)]
        for domain, loaded in tables:
            if loaded.problem:
                print(f"error: {loaded.problem}", file=sys.stderr)
            for key, alias in (loaded.data or {}).items():
                print(f"{key}@{domain}: {', '.join(alias.targets)}")
        return 0
    if args.action == "add":
        if not args.targets:
            raise admin.AdminError("alias add needs at least one destination")
        path = admin.alias_add(root, args.address, args.targets, args.global_)
        print(f"{args.address}: added to {path}")
    else:
        path = admin.alias_del(root, args.address, args.targets, args.global_)
        print(f"{args.address}: removed from {path}")
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from policy.up import UpError, up

    settings = _settings(args)
    try:
        return up(settings.root, args.state, args.port_offset, settings.hostname,
                  args.qualify_domain or settings.hostname, args.dovecot_auth,
                  args.clamav_db)  # fmt: skip
    except UpError as e:
        print(f"mailpolicy up: {e}", file=sys.stderr)
        return 2


def cmd_provision(args: argparse.Namespace) -> int:
    from policy.metadata import MetadataError, read
    from policy.provision import ProvisionError, Target, provision

    try:
        md = read(args.metadata)
    except MetadataError as e:
        print(f"mailpolicy provision: bad metadata in {e.source}, nothing changed:",
              file=sys.stderr)  # fmt: skip
        for problem in e.problems:
            print(f"  {problem}", file=sys.stderr)
        return 2
    target = Target(
        root=Path(args.root).resolve(), etc=Path(args.etc).resolve(),
        run_dir=Path(args.run_dir).resolve(), log_dir=Path(args.log_dir).resolve(),
        listen=tuple(args.listen or Target.listen), port_offset=args.port_offset,
        sink_port=args.sink_port, offline=args.offline,
        clamav_db=Path(args.clamav_db).resolve(),
    )  # fmt: skip
    try:
        provision(md, target, dry_run=args.dry_run)
    except ProvisionError as e:
        print(f"mailpolicy provision: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    print(show(_settings(args)))
    return 0


# --- backups (policy/backup/, docs/backups.md) ---------------------------------------------


def _backup_store(settings: Settings) -> Store:
    """The bucket of ``backup_bucket``; imported here, so the cloud libraries load only for a
    backup command."""
    from policy.backup.backends import open_store

    return open_store(settings)


def _date(text: str) -> datetime.date:
    try:
        return datetime.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date (YYYY-MM-DD)") from None


def _date_text(text: str) -> str:
    return _date(text).isoformat()


def cmd_backup(args: argparse.Namespace) -> int:
    from policy.backup import BackupError, retention
    from policy.backup.crypto import Keys
    from policy.backup.progress import Progress
    from policy.backup.restore import list_sets, restore, verify
    from policy.backup.run import missing_settings, run
    from policy.backup.state import LockedError
    from policy.backup.store import StoreError

    settings = _settings(args)
    missing = ", ".join(missing_settings(settings))
    if missing and args.action != "run":
        raise SettingsError(f"backups are not configured ({missing} unset)")
    if args.action == "restore" and args.user and not args.domain:
        raise SettingsError("backup restore: --user needs --domain")
    book = Logbook(args.backup_log or "")
    try:
        if args.action == "run":
            if missing:  # cron runs the hook nightly even where backups are not wanted
                book.event(f"backup run: not configured ({missing} unset): nothing done")
                return 0
            today = args.now or datetime.date.today()
            try:
                retention.cutoff(today, settings.backup_retain)
            except BackupError as e:
                raise SettingsError(str(e)) from None
        keys = Keys.from_hex(settings.backup_openssl_key, settings.backup_openssl_iv)
        try:
            store = _backup_store(settings)
            if args.action == "run":
                result = run(settings, store, today=today, log=book.event)
                return 1 if result.problems else 0
            if args.action == "list":
                return 1 if list_sets(store, keys, sys.stdout) else 0
            if args.action == "verify":
                return 1 if verify(store, keys, sys.stdout, args.set, Progress()) else 0
            restore(store, keys, Path(args.to), date=args.date, domain=args.domain,
                    user=args.user, log=book.event, progress=Progress())  # fmt: skip
            return 0
        except LockedError as e:
            book.event(f"backup run: {e}")
            return 1
        except (BackupError, StoreError, OSError) as e:
            book.event(f"backup {args.action}: failed: {e}")
            return 1
    finally:
        book.close()


# --- parser ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="settings file (TOML)")
    common.add_argument("--root", help="the mail data tree (default /srv/mail)")
    sock = argparse.ArgumentParser(add_help=False)
    sock.add_argument("--socket", help="the daemon's Unix socket")

    p = argparse.ArgumentParser(prog="mailpolicy", description=__doc__.split("\n")[0])
    p.add_argument("--version", action="version", version=f"mailpolicy {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", parents=[common, sock], help="run the policy daemon")
    s.add_argument("--socket-mode", help="octal mode of the socket (default 0660)")
    s.add_argument("--socket-group", help="group of the socket")
    s.add_argument("--auth-socket", help="serve logins (AUTH/USER) on this Unix socket")
    s.add_argument("--auth-socket-group", help="group of the auth socket (Debian: dovecot)")
    s.add_argument("--log-file", help="decision log (default: standard error)")
    s.add_argument("--primary-hostname", help="our own host name (a local domain)")
    s.set_defaults(func=cmd_serve)

    q = sub.add_parser("query", parents=[common, sock], help="send one request, print the reply")
    q.add_argument(
        "--encode",
        action="store_true",
        help="VERB field=value ...: base64-encode the values as Exim would",
    )
    q.add_argument("--timeout", type=float, default=10.0)
    q.add_argument("request", nargs="+", help="the request line (or its words)")
    q.set_defaults(func=cmd_query)

    c = sub.add_parser("check", parents=[common], help="validate every list file")
    c.add_argument("--strict", action="store_true", help="warnings fail too")
    c.add_argument("--primary-hostname")
    c.set_defaults(func=cmd_check)

    e = sub.add_parser("explain", parents=[common], help="show how a message would be judged")
    e.add_argument("--ip", required=True)
    e.add_argument("--sender", required=True, help="envelope sender ('' for <>)")
    e.add_argument("--rcpt", required=True)
    e.add_argument("--auth", default="", help="authenticated user name, if any")
    e.add_argument("--helo", default="")
    e.add_argument(
        "--network",
        action="store_true",
        help="also run the checks that use DNS and SMTP (SPF, sender-verify callouts)",
    )
    e.add_argument("--primary-hostname")
    e.set_defaults(func=cmd_explain)

    u = sub.add_parser("user", help="add, change, delete or list users (passwd/<domain>)")
    usub = u.add_subparsers(dest="action", required=True)
    for action in ("add", "passwd"):
        a = usub.add_parser(
            action, parents=[common], help="password from the prompt, or one line on standard input"
        )
        a.add_argument("address", help="user@domain")
        a.add_argument("--scheme", default=passwords.DEFAULT_SCHEME, choices=passwords.SCHEMES)
    d = usub.add_parser("del", parents=[common])
    d.add_argument("address")
    ls = usub.add_parser("list", parents=[common])
    ls.add_argument("domain", nargs="?")
    u.set_defaults(func=cmd_user)

    al = sub.add_parser("alias", help="add, delete or list aliases")
    asub = al.add_subparsers(dest="action", required=True)
    for action in ("add", "del"):
        a = asub.add_parser(action, parents=[common])
        a.add_argument(
            "address",
            help="alias@domain ('*@domain' is the catch-all), or a bare local part with --global",
        )
        a.add_argument("targets", nargs="*", help="destinations (del: only these)")
        a.add_argument(
            "--global",
            dest="global_",
            action="store_true",
            help="exim/conf/global_aliases (in every local domain)",
        )
    ls = asub.add_parser("list", parents=[common])
    ls.add_argument("domain", nargs="?")
    al.set_defaults(func=cmd_alias)

    up = sub.add_parser(
        "up",
        parents=[common],
        help="run the local stack (daemon, Dovecot, Exim, clamd, spamd) on loopback",
    )
    up.add_argument(
        "--port-offset",
        type=int,
        default=10000,
        help="added to the standard ports (default 10000: SMTP 10025)",
    )
    up.add_argument(
        "--state",
        default="/tmp/mailpolicy-up",
        help="where rendered configs, sockets, logs and the sink's mail go",
    )
    up.add_argument(
        "--dovecot-auth",
        choices=["lua", "checkpassword"],
        default="lua",
        help="how Dovecot asks the daemon about logins (default lua: no process per login)",
    )
    up.add_argument(
        "--clamav-db",
        metavar="DIR",
        help="ClamAV databases for clamd (default /var/lib/clamav if it holds any, else no "
        "clamd; examples/clamav-db is an EICAR-only test database)",
    )
    up.add_argument("--primary-hostname")
    up.add_argument("--qualify-domain", help="domain for bare local parts (default: hostname)")
    up.set_defaults(func=cmd_up)

    pv = sub.add_parser(
        "provision",
        help="configure this machine from its metadata (docs/provisioning.md)",
        description="Configure the mail server from its metadata: the data tree, the Exim, "
        "Dovecot, clamd, spamd and daemon configurations, time zone, ssh, cron. Idempotent; "
        "never overwrites admin data.",
    )
    pv.add_argument("--metadata", metavar="FILE",
                    help="JSON: the VM JSON (customer_metadata) or a flat map (default: "
                    "mdata-get on SmartOS, else MAILPOLICY_* environment variables)")  # fmt: skip
    pv.add_argument("--root", default="/srv/mail", help="the mail data tree (default /srv/mail)")
    pv.add_argument("--etc", default="/etc", help="where configurations go (default /etc)")
    pv.add_argument("--dry-run", action="store_true", help="show what would change, change nothing")
    pv.add_argument("--run-dir", default="/run/mailpolicy", help="sockets and pid files")
    pv.add_argument("--log-dir", default="/var/log/mailpolicy", help="logs of every service")
    pv.add_argument("--listen", action="append", metavar="ADDR",
                    help="address to listen on (repeatable; default every address)")  # fmt: skip
    pv.add_argument("--port-offset", type=int, default=0,
                    help="added to every standard port (tests; default 0)")  # fmt: skip
    pv.add_argument(
        "--sink-port",
        type=int,
        metavar="PORT",
        help="send every non-local message to a loopback SMTP sink on PORT (tests)",
    )
    pv.add_argument("--offline", action="store_true",
                    help="nothing that asks the internet: no SPF, callouts, DKIM lookups, spamd "
                    "network tests or freshclam (tests)")  # fmt: skip
    pv.add_argument("--clamav-db", default="/var/lib/clamav", metavar="DIR",
                    help="clamd's databases (default freshclam's /var/lib/clamav)")  # fmt: skip
    pv.set_defaults(func=cmd_provision)

    b = sub.add_parser("backup", help="encrypted incremental backups (docs/backups.md)")
    bsub = b.add_subparsers(dest="action", required=True)
    blog = argparse.ArgumentParser(add_help=False)
    blog.add_argument("--log-file", dest="backup_log", metavar="FILE",
                      help="append log lines here (default: standard error)")  # fmt: skip
    br = bsub.add_parser("run", parents=[common, blog], help="the nightly run (hooks/backup)")
    # Tests (and an admin replaying a missed night) give the day; tar's own change detection
    # still uses the files' real times.
    br.add_argument("--now", type=_date, help=argparse.SUPPRESS)
    bsub.add_parser("list", parents=[common, blog], help="the sets and runs in the bucket")
    bv = bsub.add_parser(
        "verify", parents=[common, blog], help="download and authenticate every object"
    )
    bv.add_argument("--set", type=_date_text, help="only the set of this date (YYYY-MM-DD)")
    bre = bsub.add_parser("restore", parents=[common, blog], help="restore into a new directory")
    bre.add_argument("--date", type=_date, metavar="YYYY-MM-DD",
                     help="as of this day (default: the newest run)")  # fmt: skip
    bre.add_argument("--domain", help="only the mail of this domain (no admin data)")
    bre.add_argument("--user", help="only this user's mail (with --domain)")
    bre.add_argument("--to", required=True, metavar="DIR", help="a new or empty directory")
    b.set_defaults(func=cmd_backup)

    cf = sub.add_parser("config", help="settings")
    csub = cf.add_subparsers(dest="action", required=True)
    csub.add_parser("show", parents=[common, sock], help="print the effective settings")
    cf.set_defaults(func=cmd_config)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except SettingsError as e:
        print(f"mailpolicy: {e}", file=sys.stderr)
        return 2
    except admin.AdminError as e:
        print(f"mailpolicy {args.command}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
