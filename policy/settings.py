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
import os
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
    # Seconds the daemon gives one request, from connect to reply. Must stay below the
    # readsocket timeout in exim/configure (5 s for MAIL/RCPT/ALIAS), so Exim always gets our
    # answer (a DEFER naming the timeout) rather than its own fail string.
    request_deadline: float = 3.0
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
    for name in ("request_deadline", "reload_interval", "drain_timeout", "auth_deadline"):
        if getattr(s, name) <= 0:
            raise SettingsError(f"{where(name)}: {name} must be positive")
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


def show(s: Settings) -> str:
    lines = []
    for f in fields(s):
        value = getattr(s, f.name)
        if isinstance(value, str):
            lines.append(f'{f.name} = "{value}"')
        else:
            lines.append(f"{f.name} = {value}")
    lines.append(f'# effective primary_hostname: "{s.hostname}"')
    return "\n".join(lines)


replace = dataclasses.replace
