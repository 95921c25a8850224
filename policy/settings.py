"""The daemon's settings: one TOML file (``--config``, default ``/etc/mailpolicy/mailpolicy.toml``).

Every setting has its default here, documented where it is defined; a missing file means all
defaults. Unknown keys and wrong types are errors naming the file and key. Command-line flags
(``--root``, ``--socket`` ...) override the file. ``mailpolicy config show`` prints the result.

Example::

    root = "/srv/mail"
    socket = "/run/mailpolicy/policy.sock"
    socket_mode = "0660"
    socket_group = "Debian-exim"
    primary_hostname = "mail.example.org"
    request_deadline = 3.0
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import os
import re
import socket as _socket
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

DEFAULT_CONFIG = "/etc/mailpolicy/mailpolicy.toml"


class SettingsError(Exception):
    pass


@dataclass(frozen=True)
class Settings:
    # The mail data tree (the seed's /srv/mail).
    root: str = "/srv/mail"
    # The Unix socket Exim's ${readsocket} and hooks/checkpassword connect to.
    socket: str = "/run/mailpolicy/policy.sock"
    # Mode of the socket file, octal. 0660: Exim (socket_group) and root only.
    socket_mode: str = "0660"
    # Group that owns the socket ("" = the daemon's own group). Debian's Exim runs as Debian-exim.
    socket_group: str = ""
    # Our own name: a local domain even without passwd/aliases files. "" = the machine's FQDN.
    primary_hostname: str = ""
    # Seconds the daemon gives one request, from connect to reply (CONNECT, RCPT, ALIAS; MAIL and
    # DATA have their own below). Must stay below the readsocket timeout in exim/configure (5 s
    # for these), so Exim always gets our answer (a DEFER naming the timeout) rather than its
    # own fail string.
    request_deadline: float = 3.0
    # Seconds for a MAIL request: SPF, then the sender-verify callout, one after the other.
    # At least spf_timeout + callout_timeout + 2; exim/configure's MAIL readsocket timeout is
    # rendered from it (+ 5 s), so the two cannot drift apart (docs/sender-checks.md).
    mail_deadline: float = 80.0
    # Seconds for a DATA request (DKIM, and content scanning): Exim's DATA readsocket timeout
    # is rendered as this + 5 s.
    data_deadline: float = 120.0
    # Open connections at most; one more gets an immediate DEFER (overload), never a hang.
    max_connections: int = 512
    # Listen backlog; the kernel caps it at net.core.somaxconn.
    backlog: int = 1024
    # Seconds between checks of the list files for edits (stat only; changed files re-parsed).
    reload_interval: float = 0.25
    # Seconds SIGTERM waits for requests in progress before exiting.
    drain_timeout: float = 5.0
    # Alias expansion: nesting depth and number of final addresses before it defers.
    alias_max_depth: int = 10
    alias_max_targets: int = 1000
    # Decision log: a file path, or "" for standard error.
    log_file: str = ""

    # --- logins (policy/auth.py): Dovecot's hooks/checkpassword and Lua passdb ask here ---
    # The auth socket, separate from Exim's: only it answers AUTH/USER, and only Dovecot's group
    # may connect (a password oracle for nobody else). "" = no logins served.
    auth_socket: str = ""
    auth_socket_mode: str = "0660"
    # Debian's Dovecot runs its auth processes (and the checkpassword hook) as "dovecot".
    auth_socket_group: str = ""
    # Seconds a login may take, throttle delay and hashing included. Below the hook's own
    # 10 s timeout, so the hook gets our DEFER rather than timing out itself.
    auth_deadline: float = 8.0
    # Domain appended to a login name without one (the seed's dovecot:qualify_domain); "" = none.
    auth_default_realm: str = ""
    # Threads (argon2, bcrypt, PBKDF2) and processes (crypt(3) schemes) hashing passwords.
    auth_workers: int = 2
    # Seconds a correct login is remembered (0 = no cache); a password change ends it at once.
    auth_cache_ttl: float = 300.0
    # Throttle: failures allowed per IP and per user before delays start, the first delay
    # (doubling per further failure), the longest delay, and how long failures are remembered.
    auth_throttle_free: int = 3
    auth_throttle_base: float = 0.5
    auth_throttle_max: float = 4.0
    auth_throttle_window: float = 900.0

    # --- DNS (policy/dns.py): one resolver configuration for callouts, SPF and DKIM ---
    # Name servers to ask, space-separated IP addresses; "" = those of /etc/resolv.conf.
    dns_servers: str = ""
    # Their port (tests run an authoritative server on a loopback port).
    dns_port: int = 53
    # Seconds one lookup may take, retries included; a timeout is a temporary failure (451).
    dns_timeout: float = 5.0

    # --- sender verification (policy/checks/sender_verify.py, policy/callout.py) ---
    # Verify a sender (not exempt by senderverify_exceptions) by asking its domain's MX whether
    # it would take mail for it: EHLO, MAIL FROM:<>, RCPT TO:<sender>, QUIT.
    callout_enabled: bool = True
    # TCP port of the callout (25; tests point it at their loopback peers).
    callout_port: int = 25
    # Seconds for the TCP connect to one MX host, and for the whole callout (all MX hosts tried,
    # DNS, greetings and commands included). The seed's commented rule: 15 s and 60 s.
    callout_connect_timeout: float = 15.0
    callout_timeout: float = 60.0
    # How long a callout's answer is remembered: "exists" (RCPT 2xx) and "does not exist" (RCPT
    # 5xx); Exim's callout cache uses 24 h and 2 h. Temporary failures are never remembered.
    callout_positive_ttl: float = 86400.0
    callout_negative_ttl: float = 7200.0
    # Addresses remembered at most (each cache).
    callout_cache_size: int = 100000
    # Callouts at once to one sender domain; more wait their turn (within the deadline).
    callout_domain_concurrency: int = 2
    # Callouts started per second over all domains, with bursts of up to callout_burst.
    callout_rate: float = 10.0
    callout_burst: int = 20
    # Allow callouts to loopback, private, link-local and other non-global addresses. Off: an
    # MX pointing there is never contacted (the sender counts as unverifiable, not false).
    # The tests turn it on for their loopback peers.
    callout_allow_private: bool = False
    # Name given in EHLO/HELO; "" = primary_hostname.
    callout_helo: str = ""

    # --- SPF (policy/checks/spf.py, RFC 7208) at MAIL ---
    spf_enabled: bool = True
    # Seconds for the whole SPF evaluation (every DNS lookup it makes).
    spf_timeout: float = 15.0
    # What to do with each result besides "pass" (always accepted), "fail" (always 550 5.7.23)
    # and "temperror" (always 451 4.4.3): "accept" (a Received-SPF header tells) or "reject".
    spf_softfail: str = "accept"
    spf_neutral: str = "accept"
    spf_none: str = "accept"
    spf_permerror: str = "accept"
    # Our secondary MX hosts (space-separated addresses/networks): mail they relay to us was
    # checked there and comes from their address, so SPF and callouts skip it.
    secondary_mx_hosts: str = ""

    # --- DKIM-required domains (policy/checks/dkim.py, RFC 6376 / 8301) at DATA ---
    dkim_enabled: bool = True
    # Seconds for verifying the signatures of one message (key lookups included).
    dkim_timeout: float = 15.0

    # --- content scanning at DATA (policy/scanners.py; checks attachments, virus, spam) ---
    # Attachments whose file name ends in one of these (case-insensitive, space-separated) are
    # refused, also as a member of a ZIP archive (docs/scanning.md); "" = none.
    blocked_extensions: str = ".exe .pif .bat .scr .lnk .com .js .docm"
    # ClamAV: clamd's Unix socket (Debian: LocalSocket /run/clamav/clamd.ctl), scanned with
    # INSTREAM. "" = no virus scanning.
    clamd_socket: str = "/run/clamav/clamd.ctl"
    # Seconds for one scan, connect to answer.
    clamd_timeout: float = 30.0
    # What clamd being down, slow or refusing the message (INSTREAM size limit exceeded) does:
    # "defer" (451, the seed's choice for its virus check) or "accept" (with an
    # X-Virus-Scanned: no ... header).
    clamav_on_failure: str = "defer"
    # SpamAssassin: spamd's Unix socket, or "" for spamd_host:spamd_port (Debian's spamd listens
    # on 127.0.0.1:783). spamd_host = "" = no spam scanning.
    spamd_socket: str = ""
    spamd_host: str = "127.0.0.1"
    spamd_port: int = 783
    spamd_timeout: float = 30.0
    # What spamd being down or slow does: "defer" (451) or "accept" (with an X-Spam-Scanned:
    # no ... header; the seed's spam check failed open this way).
    spam_on_failure: str = "defer"
    # Messages larger than this (bytes) are not spam-scanned (the seed: 400 KB).
    spam_max_size: int = 409600
    # X-Spam-Flag: YES (and X-Spam-Status: Yes) from this score on; Dovecot's shipped sieve
    # script files such mail into Spam. The seed's threshold: 3.5.
    spam_flag_score: float = 3.5
    # Refuse (550) from this score on; 0 = never (the seed's default).
    spam_reject_score: float = 0.0
    # The X-Spam-Report header holds at most this many characters of spamd's report.
    spam_report_max: int = 2000

    # --- nightly backups (policy/backup/, docs/backups.md): the seed's metadata keys ---
    # backup:increments - daily increments after a full set before the next full set.
    backup_increments: int = 28
    # backup:retain - how long sets are kept, as `date -d` reads a duration ("8 weeks",
    # "30 days", "3 months", "1 year"); sets whose full is older are deleted remotely.
    backup_retain: str = "8 weeks"
    # backup:openssl_key / backup:openssl_iv - 32 hex digits each (AES-128). Unset: backups do
    # nothing and say so. The key never appears in argv or a log; keep this file 0600.
    backup_openssl_key: str = ""
    backup_openssl_iv: str = ""
    # backup:bucket - gs://bucket[/prefix] (Google Cloud Storage), s3://bucket[/prefix], or
    # file:///directory (a mounted disk; the directory must exist).
    backup_bucket: str = ""
    # S3-compatible endpoint URL for s3:// (MinIO, Ceph ...); "" = AWS.
    backup_s3_endpoint: str = ""
    # Google Cloud Storage endpoint ("" = Google's); tests point it at an emulator.
    backup_gcs_endpoint: str = ""
    # boto:gs_oauth2_refresh_token / boto:default_project_id (the seed's boto.cfg values for
    # gs://); "" = Google's standard credentials (GOOGLE_APPLICATION_CREDENTIALS, metadata).
    boto_gs_oauth2_refresh_token: str = ""
    boto_default_project_id: str = ""

    @property
    def hostname(self) -> str:
        return (self.primary_hostname or _socket.getfqdn()).lower().rstrip(".")

    @property
    def socket_mode_int(self) -> int:
        return int(self.socket_mode, 8)


def load(path: str | None, overrides: dict[str, Any] | None = None) -> Settings:
    """Settings from ``path`` (None: the default path if it exists) plus ``overrides``."""
    values: dict[str, Any] = {}
    if path is None and os.path.exists(DEFAULT_CONFIG):
        path = DEFAULT_CONFIG
    if path is not None:
        try:
            with open(path, "rb") as f:
                values = tomllib.load(f)
        except OSError as e:
            raise SettingsError(f"{path}: cannot read: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise SettingsError(f"{path}: {e}") from None
    # Which source each value came from, so an error names the right one (a bad --socket-mode
    # is not the config file's fault).
    origin = dict.fromkeys(values, path or "command line")
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = value
            origin[key] = "command line"
    known = {f.name: f for f in fields(Settings)}
    for key, value in values.items():
        where = origin[key]
        if key not in known:
            raise SettingsError(f"{where}: unknown setting {key!r}")
        default = getattr(Settings, key)
        expected = type(default)
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            values[key] = float(value)
        elif not isinstance(value, expected) or isinstance(value, bool) != isinstance(
            default, bool
        ):
            raise SettingsError(
                f"{where}: setting {key!r} must be {expected.__name__}, not {type(value).__name__}"
            )
    settings = Settings(**values)
    _validate(settings, lambda key: origin.get(key, "default"))
    return settings


def _validate(s: Settings, where: Callable[[str], str]) -> None:
    try:
        mode = s.socket_mode_int
    except ValueError:
        raise SettingsError(
            f"{where('socket_mode')}: socket_mode {s.socket_mode!r} is not octal"
        ) from None
    if mode & ~0o777:
        raise SettingsError(f"{where('socket_mode')}: socket_mode {s.socket_mode!r} out of range")
    positive = ("request_deadline", "reload_interval", "drain_timeout", "auth_deadline",
                "mail_deadline", "data_deadline", "dns_timeout", "callout_connect_timeout",
                "callout_timeout", "callout_rate", "spf_timeout", "dkim_timeout")  # fmt: skip
    for name in positive:
        if getattr(s, name) <= 0:
            raise SettingsError(f"{where(name)}: {name} must be positive")
    for name in ("callout_positive_ttl", "callout_negative_ttl"):
        if getattr(s, name) < 0:
            raise SettingsError(f"{where(name)}: {name} must not be negative")
    for name in ("callout_cache_size", "callout_domain_concurrency", "callout_burst"):
        if getattr(s, name) < 1:
            raise SettingsError(f"{where(name)}: {name} must be at least 1")
    if not 1 <= s.dns_port <= 65535 or not 1 <= s.callout_port <= 65535:
        key = "dns_port" if not 1 <= s.dns_port <= 65535 else "callout_port"
        raise SettingsError(f"{where(key)}: {key} must be a port number (1-65535)")
    for server in s.dns_servers.split():
        try:
            ipaddress.ip_address(server)
        except ValueError:
            raise SettingsError(
                f"{where('dns_servers')}: dns_servers: {server!r} is not an IP address"
            ) from None
    for item in s.secondary_mx_hosts.split():
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise SettingsError(f"{where('secondary_mx_hosts')}: secondary_mx_hosts: "
                                f"{item!r} is not an address or network") from None  # fmt: skip
    for name in ("spf_softfail", "spf_neutral", "spf_none", "spf_permerror"):
        if getattr(s, name) not in ("accept", "reject"):
            raise SettingsError(f'{where(name)}: {name} must be "accept" or "reject"')
    # The MAIL stage runs SPF, then the callout: both must fit in its deadline, or a slow but
    # healthy peer would only ever see the daemon's own timeout.
    if s.spf_timeout + s.callout_timeout + 2 > s.mail_deadline:
        raise SettingsError(
            f"{where('mail_deadline')}: mail_deadline must be at least spf_timeout + "
            f"callout_timeout + 2 s ({s.spf_timeout + s.callout_timeout + 2:g})"
        )
    if s.callout_helo and not re.fullmatch(r"[A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f.:]{2,45}\]",
                                           s.callout_helo):  # fmt: skip
        raise SettingsError(f"{where('callout_helo')}: callout_helo must be a host name or an "
                            "[address] literal")  # fmt: skip
    if s.callout_connect_timeout > s.callout_timeout:
        raise SettingsError(f"{where('callout_connect_timeout')}: callout_connect_timeout must "
                            "not exceed callout_timeout")  # fmt: skip
    for name in ("clamav_on_failure", "spam_on_failure"):
        if getattr(s, name) not in ("defer", "accept"):
            raise SettingsError(f'{where(name)}: {name} must be "defer" or "accept"')
    for name in ("clamd_timeout", "spamd_timeout"):
        if getattr(s, name) <= 0:
            raise SettingsError(f"{where(name)}: {name} must be positive")
    for name in ("spam_max_size", "spam_report_max"):
        if getattr(s, name) < 0:
            raise SettingsError(f"{where(name)}: {name} must not be negative")
    # The headers of one accept are at most 8192 bytes (policy/protocol.py): the report must
    # leave room for the others, or every scanned message would defer.
    if s.spam_report_max > 6000:
        raise SettingsError(f"{where('spam_report_max')}: spam_report_max must be at most 6000")
    if s.spam_flag_score < 0 or s.spam_reject_score < 0:
        key = "spam_flag_score" if s.spam_flag_score < 0 else "spam_reject_score"
        raise SettingsError(f"{where(key)}: {key} must not be negative")
    if not 1 <= s.spamd_port <= 65535:
        raise SettingsError(f"{where('spamd_port')}: spamd_port must be a port number (1-65535)")
    for ext in s.blocked_extensions.split():
        if not re.fullmatch(r"\.[A-Za-z0-9_-]{1,16}", ext):
            raise SettingsError(f"{where('blocked_extensions')}: blocked_extensions: {ext!r} is "
                                "not an extension like .exe")  # fmt: skip
    for name in ("clamd_socket", "spamd_socket"):
        if len(getattr(s, name).encode()) > 107:
            raise SettingsError(f"{where(name)}: socket path longer than 107 bytes (AF_UNIX limit)")
    for name in ("backup_openssl_key", "backup_openssl_iv"):
        value = getattr(s, name)
        if value and not re.fullmatch(r"[0-9A-Fa-f]{32}", value):
            raise SettingsError(f"{where(name)}: {name} must be 32 hex digits (128 bits)")
    if s.backup_increments < 0:
        raise SettingsError(f"{where('backup_increments')}: backup_increments must be >= 0")
    # The same rules as policy/backup/backends.open_url, found at start rather than at 3 am.
    bucket_ok = re.fullmatch(r"(gs|s3)://[a-z0-9][a-z0-9._-]{1,221}[a-z0-9](/\S*)?|file:///\S*",
                             s.backup_bucket)  # fmt: skip
    if s.backup_bucket and not bucket_ok:
        raise SettingsError(f"{where('backup_bucket')}: backup_bucket must be gs://bucket, "
                            "s3://bucket (optionally /prefix) or file:///directory")  # fmt: skip
    from policy.backup import BackupError
    from policy.backup.retention import cutoff

    try:
        cutoff(datetime.date(2000, 1, 1), s.backup_retain)
    except BackupError as e:
        raise SettingsError(f"{where('backup_retain')}: {e}") from None
    # DATA runs DKIM, then the scanners, one after the other: all must fit its deadline.
    needed = s.dkim_timeout + s.clamd_timeout + s.spamd_timeout + 2
    if needed > s.data_deadline:
        raise SettingsError(
            f"{where('data_deadline')}: data_deadline must be at least dkim_timeout + "
            f"clamd_timeout + spamd_timeout + 2 s ({needed:g})"
        )
    for name in ("max_connections", "backlog", "alias_max_depth", "alias_max_targets"):
        if getattr(s, name) < 1:
            raise SettingsError(f"{where(name)}: {name} must be at least 1")
    for name in ("socket", "auth_socket"):
        if len(getattr(s, name).encode()) > 107:
            raise SettingsError(f"{where(name)}: socket path longer than 107 bytes (AF_UNIX limit)")
    try:
        auth_mode = int(s.auth_socket_mode, 8)
    except ValueError:
        auth_mode = -1
    if not 0 <= auth_mode <= 0o777:
        raise SettingsError(
            f"{where('auth_socket_mode')}: auth_socket_mode {s.auth_socket_mode!r} is not octal"
        )
    for name in ("auth_cache_ttl", "auth_throttle_base", "auth_throttle_max"):
        if getattr(s, name) < 0:
            raise SettingsError(f"{where(name)}: {name} must not be negative")
    for name in ("auth_workers", "auth_throttle_window"):
        if getattr(s, name) <= 0:
            raise SettingsError(f"{where(name)}: {name} must be positive")
    if s.auth_throttle_free < 0:
        raise SettingsError(f"{where('auth_throttle_free')}: auth_throttle_free must be >= 0")
    # The longest throttle delay plus a slow hash (an ARGON2ID login is ~0.3 s) must fit in the
    # deadline, or a throttled real user would only ever see DEFER.
    if s.auth_throttle_max + 1.0 > s.auth_deadline:
        raise SettingsError(
            f"{where('auth_throttle_max')}: auth_throttle_max must be at least 1 s below "
            f"auth_deadline ({s.auth_deadline})"
        )
    if s.auth_socket and s.auth_socket == s.socket:
        raise SettingsError(f"{where('auth_socket')}: auth_socket must differ from socket")


# Shown as "(set)" by `config show`: secrets do not belong on a terminal or in a bug report.
SECRETS = frozenset({"backup_openssl_key", "backup_openssl_iv", "boto_gs_oauth2_refresh_token"})


def show(s: Settings) -> str:
    lines = []
    for f in fields(s):
        value = getattr(s, f.name)
        if f.name in SECRETS and value:
            value = "(set)"
        if isinstance(value, str):
            lines.append(f'{f.name} = "{value}"')
        elif isinstance(value, bool):
            lines.append(f"{f.name} = {str(value).lower()}")
        else:
            lines.append(f"{f.name} = {value}")
    lines.append(f'# effective primary_hostname: "{s.hostname}"')
    return "\n".join(lines)


replace = dataclasses.replace
