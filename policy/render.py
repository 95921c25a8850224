"""Rendering the configuration templates (``exim/configure``) with this installation's values.

A template marks each value as ``@@NAME@@``. ``render`` replaces every mark and refuses (raises
RenderError) when a value is missing or a mark is left, so a half-rendered configuration is
never written. Values are checked for characters that would change the meaning of an Exim
configuration line (newlines, and ``@@``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from policy.settings import Settings

REPO = Path(__file__).resolve().parent.parent
EXIM_TEMPLATE = REPO / "exim" / "configure"

_MARK = re.compile(r"@@([A-Z_]+)@@")


class RenderError(Exception):
    pass


def render(template: str, values: dict[str, str]) -> str:
    for name, value in values.items():
        if "\n" in value or "@@" in value:
            raise RenderError(f"value of {name} contains a newline or @@")
    missing = sorted({m for m in _MARK.findall(template) if m not in values})
    if missing:
        raise RenderError(f"no value for {', '.join(missing)}")
    return _MARK.sub(lambda m: values[m.group(1)], template)


@dataclass(frozen=True)
class EximSite:
    """What differs between installations (and between tests)."""

    root: str  # the mail data tree
    policy_socket: str
    primary_hostname: str
    qualify_domain: str
    log_dir: str
    smtp_port: int = 25
    submission_port: int = 587
    interfaces: tuple[str, ...] = ("0.0.0.0", "::")  # noqa: S104 (a mail server listens)
    # Port of a loopback SMTP sink that gets every non-local message instead of DNS routing
    # (`mailpolicy up` and the tests: nothing may leave the machine). None in production.
    sink_port: int | None = None
    # Dovecot's sockets for Exim (DovecotSite.lmtp_socket / auth_client_socket): local users are
    # delivered over LMTP and SMTP AUTH goes through Dovecot. None: Maildir appendfile, no AUTH.
    lmtp_socket: str | None = None
    dovecot_auth_socket: str | None = None
    # Seconds Exim waits for the daemon at MAIL and DATA: the daemon's mail_deadline and
    # data_deadline + 5 (exim_timeouts() computes them from its settings).
    mail_timeout: int = 85
    data_timeout: int = 125


def exim_timeouts(settings: Settings) -> dict[str, int]:
    """EximSite's readsocket timeouts for these daemon settings: each stage's deadline + 5 s,
    so the daemon's own DEFER (naming its timeout) reaches Exim first."""
    return {
        "mail_timeout": math.ceil(settings.mail_deadline) + 5,
        "data_timeout": math.ceil(settings.data_deadline) + 5,
    }


def render_exim(site: EximSite, template: str | None = None) -> str:
    text = template if template is not None else EXIM_TEMPLATE.read_text()
    sink = f"LOOPBACK_SINK_PORT = {site.sink_port}" if site.sink_port is not None else ""
    lmtp = f"DOVECOT_LMTP_SOCKET = {site.lmtp_socket}" if site.lmtp_socket else ""
    auth = f"DOVECOT_AUTH_SOCKET = {site.dovecot_auth_socket}" if site.dovecot_auth_socket else ""
    return render(
        text,
        {
            "POLICY_SOCKET": site.policy_socket,
            "ROOT": site.root,
            "SUBMISSION_PORT": str(site.submission_port),
            "REMOTE_DELIVERY_MACRO": sink,
            "LMTP_MACRO": lmtp,
            "DOVECOT_AUTH_MACRO": auth,
            "PRIMARY_HOSTNAME": site.primary_hostname,
            "QUALIFY_DOMAIN": site.qualify_domain,
            "SMTP_PORTS": f"{site.smtp_port} : {site.submission_port}",
            "LOCAL_INTERFACES": "<; " + " ; ".join(site.interfaces),
            "LOG_DIR": site.log_dir,
            "MAIL_TIMEOUT": str(site.mail_timeout),
            "DATA_TIMEOUT": str(site.data_timeout),
        },
    )


DOVECOT_TEMPLATE = REPO / "dovecot" / "dovecot.conf"
# The passdb/userdb fragment for each auth path (DovecotSite.auth_path), inlined at @@AUTH_BLOCKS@@.
AUTH_FRAGMENTS = {
    "lua": REPO / "dovecot" / "auth-lua.conf.ext",
    "checkpassword": REPO / "dovecot" / "auth-checkpassword.conf.ext",
}
# What the Lua path needs on the machine (Debian 12: dovecot-auth-lua, lua-socket for Lua 5.4,
# the Lua Dovecot 2.3.19 is linked with). Checked at render time: without them every login
# would fail with an internal error.
LUA_NEEDS = {
    "/usr/lib/dovecot/modules/auth/libauthdb_lua.so": "dovecot-auth-lua",
    "/usr/lib/x86_64-linux-gnu/lua/5.4/socket/unix.so": "lua-socket",
}
_CERT_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?$")


@dataclass(frozen=True)
class DovecotSite:
    """What differs between Dovecot installations (and between tests); docs/dovecot.md."""

    root: str  # the mail data tree
    primary_hostname: str  # its <root>/ssl/<name>/current is the certificate without SNI
    qualify_domain: str  # auth_default_realm (seed key dovecot:qualify_domain); "" for none
    base_dir: str = "/run/dovecot"
    state_dir: str = "/var/lib/dovecot"
    log_dir: str = "/var/log/dovecot"
    instance_name: str = "dovecot"
    # The policy daemon's auth socket, passed to the Lua script or the hook as
    # MAILPOLICY_AUTH_SOCKET.
    auth_socket: str = "/run/mailpolicy/auth.sock"
    # How Dovecot asks the daemon: "lua" (dovecot/mailpolicy-auth.lua in the auth workers: no
    # process per login, 2.4-ready) or "checkpassword" (hooks/checkpassword, a fork and exec per
    # login and per lookup). benchmarks/report/AUTH.md measures both.
    auth_path: str = "lua"
    checkpassword: str = str(REPO / "hooks" / "checkpassword")
    lua_script: str = str(REPO / "dovecot" / "mailpolicy-auth.lua")
    # Unix sockets for Exim: its lmtp transport and its `dovecot` authenticator (owner exim_user).
    lmtp_socket: str = "/run/dovecot/exim-lmtp"
    auth_client_socket: str = "/run/dovecot/exim-auth"
    exim_user: str = "Debian-exim"
    mail_user: str = "Debian-exim"  # storage owner: the user Exim's appendfile writes as
    interfaces: tuple[str, ...] = ("*", "::")
    imap_port: int = 143
    imaps_port: int = 993
    sieve_port: int = 4190
    auth_failure_delay: str = "2 secs"
    shipped_sieve_after: str = str(REPO / "dovecot" / "sieve" / "after")
    postmaster_address: str = ""  # "" = postmaster@<qualify domain or primary hostname>
    ssl_dh: str = "/usr/share/dovecot/dh.pem"  # left out when the file does not exist


def dovecot_local_names(root: str) -> str:
    """A ``local_name <name> { ssl_cert ssl_key }`` block for each ``<root>/ssl/<name>/current``
    that has both files now (Dovecot chooses among them by SNI). Names that are not plain host
    names are skipped: they would not match an SNI name and could break the file."""
    blocks = []
    ssl_dir = Path(root) / "ssl"
    names = sorted(p.name for p in ssl_dir.iterdir()) if ssl_dir.is_dir() else []
    for name in names:
        current = ssl_dir / name / "current"
        if not _CERT_NAME.match(name) or not (current / "chained").is_file():
            continue
        if not (current / "key").is_file():
            continue
        blocks.append(
            f"local_name {name} {{\n"
            f"  ssl_cert = <{ssl_dir}/{name}/current/chained\n"
            f"  ssl_key = <{ssl_dir}/{name}/current/key\n"
            "}\n"
        )
    return "".join(blocks) or "# (no <root>/ssl/*/current directories when rendered)\n"


def render_dovecot(site: DovecotSite, template: str | None = None) -> str:
    """The Dovecot configuration for ``site``. Looks at the data tree: the primary hostname's
    certificate must exist (Dovecot would not start without it), and every other
    ``<root>/ssl/*/current`` becomes an SNI block, so a new certificate directory needs a
    re-render and ``doveadm reload`` (a switched ``current`` symlink needs only the reload)."""
    import grp
    import pwd

    text = template if template is not None else DOVECOT_TEMPLATE.read_text()
    primary = Path(site.root) / "ssl" / site.primary_hostname / "current"
    for part in ("chained", "key"):
        if not (primary / part).is_file():
            raise RenderError(f"no certificate for the primary hostname: {primary / part}")
    try:
        mail = pwd.getpwnam(site.mail_user)
        mail_group = grp.getgrgid(mail.pw_gid).gr_name
    except KeyError:
        raise RenderError(f"no user {site.mail_user} (or its group) on this system") from None
    if site.auth_path not in AUTH_FRAGMENTS:
        raise RenderError(f"auth_path must be one of {', '.join(sorted(AUTH_FRAGMENTS))}, "
                          f"not {site.auth_path!r}")  # fmt: skip
    if site.auth_path == "lua":
        for path, package in LUA_NEEDS.items():
            if not Path(path).exists():
                raise RenderError(f"the Lua auth path needs {path} (Debian package {package})")
    paths = (("root", site.root), ("checkpassword", site.checkpassword),
             ("lua_script", site.lua_script))  # fmt: skip
    for name, value in paths:
        if not value.startswith("/") or any(c in value for c in " %\"'<>{}#"):
            raise RenderError(f"{name} must be an absolute path without spaces or % < > {{ }} #")
    text = text.replace("@@AUTH_BLOCKS@@", AUTH_FRAGMENTS[site.auth_path].read_text().rstrip())
    local_names = dovecot_local_names(site.root)
    if "@@" in local_names:
        raise RenderError("a certificate path contains @@")
    text = text.replace("@@LOCAL_NAMES@@\n", local_names)
    postmaster = site.postmaster_address or (
        f"postmaster@{site.qualify_domain or site.primary_hostname}"
    )
    realm = (
        f"auth_default_realm = {site.qualify_domain}"
        if site.qualify_domain
        else "# auth_default_realm: not set (no qualify domain)"
    )

    def listener(path: str) -> str:  # under base_dir: relative, as Dovecot asks
        prefix = site.base_dir.rstrip("/") + "/"
        return path[len(prefix) :] if path.startswith(prefix) else path

    dh = f"ssl_dh = <{site.ssl_dh}" if site.ssl_dh and Path(site.ssl_dh).is_file() else ""
    return render(
        text,
        {
            "BASE_DIR": site.base_dir,
            "STATE_DIR": site.state_dir,
            "INSTANCE_NAME": site.instance_name,
            "LOG_DIR": site.log_dir,
            "LISTEN": ", ".join(site.interfaces),
            "AUTH_SOCKET": site.auth_socket,
            "SSL_DH": dh,
            "ROOT": site.root,
            "PRIMARY_HOSTNAME": site.primary_hostname,
            "AUTH_FAILURE_DELAY": site.auth_failure_delay,
            "AUTH_DEFAULT_REALM": realm,
            "CHECKPASSWORD": site.checkpassword,
            "LUA_SCRIPT": site.lua_script,
            "MAIL_USER": site.mail_user,
            "MAIL_GROUP": mail_group,
            "MAIL_UID": str(mail.pw_uid),
            "MAIL_GID": str(mail.pw_gid),
            "EXIM_USER": site.exim_user,
            "AUTH_CLIENT_SOCKET": listener(site.auth_client_socket),
            "LMTP_SOCKET": listener(site.lmtp_socket),
            "IMAP_PORT": str(site.imap_port),
            "IMAPS_PORT": str(site.imaps_port),
            "SIEVE_PORT": str(site.sieve_port),
            "POSTMASTER": postmaster,
            "SHIPPED_SIEVE_AFTER": site.shipped_sieve_after,
        },
    )
