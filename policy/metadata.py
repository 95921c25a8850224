"""Machine metadata: what the admin tells a new mail server at first boot (the seed's
customer_metadata), read and validated for ``mailpolicy provision`` (policy/provision.py).

Where it comes from, the first that applies:

1. ``--metadata FILE``: JSON, either the seed's example VM JSON (``hostname``, ``dns_domain``
   and a ``customer_metadata`` object of the keys below) or a flat object of the keys below
   (``hostname`` and ``dns_domain`` allowed in it too). Values are strings, as SmartOS metadata
   is; JSON numbers and booleans are taken as their text.
2. SmartOS: ``mdata-list`` / ``mdata-get`` when ``mdata-get`` is on PATH (hostname and DNS
   domain from ``sdc:hostname`` / ``sdc:dns_domain``).
3. Environment variables ``MAILPOLICY_<KEY>``: the key upper-cased with ``:`` and ``-`` as
   ``_`` (``MAILPOLICY_SYSTEM_TIMEZONE``, ``MAILPOLICY_BACKUP_OPENSSL_KEY``,
   ``MAILPOLICY_HOSTNAME``, ``MAILPOLICY_DNS_DOMAIN`` ...).

The keys (the seed's, docs/provisioning.md):

=============================  ==============================================================
dovecot:qualify_domain         login realm for a bare user name (auth_default_realm); no default
dovecot:primary_hostname       TLS name of IMAP and SMTP; default: hostname.dns_domain
exim:qualify_domain            domain for bare local parts; default: hostname.dns_domain
system:ssh_disabled            true/false (default false)
system:timezone                an IANA zone name, e.g. Europe/Amsterdam (default: left alone)
backup:increments              integer >= 0 (default 28)
backup:retain                  a ``date``-style duration (default "8 weeks")
backup:openssl_key             32 hex digits
backup:openssl_iv              32 hex digits
backup:bucket                  gs://bucket[/prefix] or s3://bucket[/prefix]
boto:gs_oauth2_refresh_token   GCS credentials (the seed's boto.cfg values)
boto:default_project_id
=============================  ==============================================================

``read`` returns a ``Metadata`` or raises MetadataError listing every problem at once (so an
admin fixes them in one go); unknown keys are not errors but come back as warnings (a typo like
``system:time_zone`` would otherwise be silently ignored). SmartOS's own keys (``sdc:*``,
``root_authorized_keys``, ``user-script``, ``user-data``) are neither.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from policy.settings import SettingsError, load

ZONEINFO = Path("/usr/share/zoneinfo")

# Seed key -> the daemon setting it becomes (validated by policy/settings.py's rules).
BACKUP_KEYS = {
    "backup:increments": "backup_increments",
    "backup:retain": "backup_retain",
    "backup:openssl_key": "backup_openssl_key",
    "backup:openssl_iv": "backup_openssl_iv",
    "backup:bucket": "backup_bucket",
    "boto:gs_oauth2_refresh_token": "boto_gs_oauth2_refresh_token",
    "boto:default_project_id": "boto_default_project_id",
}
KEYS = frozenset({
    "dovecot:qualify_domain", "dovecot:primary_hostname", "exim:qualify_domain",
    "system:ssh_disabled", "system:timezone", *BACKUP_KEYS,
})  # fmt: skip
HOST_KEYS = ("hostname", "dns_domain")
# SmartOS's own metadata: present on every zone, not ours to warn about.
_PLATFORM_KEY = re.compile(r"^(sdc:.*|root_authorized_keys|user-script|user-data)$")
_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                       r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")  # fmt: skip
_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off", ""}


class MetadataError(Exception):
    """Bad metadata; ``problems`` lists each (one line each)."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))


@dataclass(frozen=True)
class Metadata:
    source: str  # where it was read from, for messages
    hostname: str
    dns_domain: str
    primary_hostname: str  # dovecot:primary_hostname, or hostname.dns_domain
    exim_qualify_domain: str  # exim:qualify_domain, or hostname.dns_domain (the seed's default)
    dovecot_qualify_domain: str  # "" = no auth_default_realm
    ssh_disabled: bool
    timezone: str  # "" = leave the machine's zone alone
    backup: dict[str, str | int] = field(default_factory=dict)  # daemon settings (BACKUP_KEYS)
    warnings: tuple[str, ...] = ()

    @property
    def fqdn(self) -> str:
        return f"{self.hostname}.{self.dns_domain}" if self.dns_domain else self.hostname


def env_name(key: str) -> str:
    return "MAILPOLICY_" + re.sub(r"[:-]", "_", key).upper()


def from_file(path: str) -> tuple[str, dict[str, str]]:
    """(source, raw map) from a JSON file: the VM JSON or a flat map."""
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except OSError as e:
        raise MetadataError(path, [f"cannot read: {e.strerror}"]) from None
    except (ValueError, UnicodeDecodeError) as e:
        raise MetadataError(path, [f"not JSON: {e}"]) from None
    if not isinstance(data, dict):
        raise MetadataError(path, ["must be a JSON object"])
    if "customer_metadata" in data:  # the VM JSON: host names at the top, our keys inside
        inner = data["customer_metadata"]
        if not isinstance(inner, dict):
            raise MetadataError(path, ["customer_metadata must be a JSON object"])
        raw = {k: data[k] for k in HOST_KEYS if k in data}
        raw.update(inner)
    else:
        raw = dict(data)
    problems, out = [], {}
    for key, value in raw.items():
        if isinstance(value, bool):
            out[key] = "true" if value else "false"
        elif isinstance(value, (str, int)):
            out[key] = str(value)
        elif value is None:
            continue
        else:
            problems.append(f"{key}: must be a string, not {type(value).__name__}")
    if problems:
        raise MetadataError(path, problems)
    return path, out


def from_mdata(mdata_get: str) -> tuple[str, dict[str, str]]:
    """(source, raw map) from SmartOS's metadata service: every key mdata-list names."""
    tools = Path(mdata_get).parent
    mdata_list = shutil.which("mdata-list") or str(tools / "mdata-list")
    listed = subprocess.run([mdata_list], capture_output=True, text=True, timeout=30)
    if listed.returncode != 0:
        raise MetadataError("mdata-list", [listed.stderr.strip() or f"exit {listed.returncode}"])
    raw: dict[str, str] = {}
    wanted = [*listed.stdout.split(), "sdc:hostname", "sdc:dns_domain"]
    for key in dict.fromkeys(wanted):
        got = subprocess.run([mdata_get, key], capture_output=True, text=True, timeout=30)
        if got.returncode == 0:  # 1: no such key (mdata-get(1M))
            name = {"sdc:hostname": "hostname", "sdc:dns_domain": "dns_domain"}.get(key, key)
            raw[name] = got.stdout.rstrip("\n")
    return "mdata-get", raw


def from_environment(environ: Mapping[str, str]) -> tuple[str, dict[str, str]]:
    raw = {key: environ[env_name(key)] for key in [*KEYS, *HOST_KEYS] if env_name(key) in environ}
    return "environment", raw


def gather(
    path: str | None, environ: Mapping[str, str] | None = None
) -> tuple[str, dict[str, str]]:
    """The raw metadata from the first source that applies (module docstring)."""
    if path is not None:
        return from_file(path)
    if mdata_get := shutil.which("mdata-get"):
        return from_mdata(mdata_get)
    return from_environment(os.environ if environ is None else environ)


def valid_timezone(name: str) -> bool:
    """An IANA zone name with a zone file under ZONEINFO (no absolute paths, no ..)."""
    if not re.fullmatch(r"[A-Za-z0-9_+-]+(/[A-Za-z0-9_+-]+)*", name):
        return False
    zone = ZONEINFO / name
    return zone.is_file() and zone.read_bytes()[:4] == b"TZif"


def validate(source: str, raw: Mapping[str, str]) -> Metadata:
    problems: list[str] = []
    ours = KEYS | set(HOST_KEYS)
    warnings = [
        f"{key}: unknown key, ignored"
        for key in sorted(raw)
        if key not in ours and not _PLATFORM_KEY.match(key)
    ]

    def name(key: str, default: str) -> str:
        value = raw.get(key, "").strip().lower().rstrip(".")
        if not value:
            return default
        if not _HOSTNAME.match(value):
            problems.append(f"{key}: {value!r} is not a host or domain name")
        return value

    # The system's name as given: a full name (a container's --hostname) is split just below.
    hostname = name("hostname", socket.gethostname().lower())
    dns_domain = name("dns_domain", "")
    if "." in hostname and not dns_domain:  # a full name given as the hostname
        hostname, _, dns_domain = hostname.partition(".")
    fqdn = f"{hostname}.{dns_domain}" if dns_domain else hostname
    ssh = raw.get("system:ssh_disabled", "").strip().lower()
    if ssh not in _TRUE | _FALSE:
        problems.append(f"system:ssh_disabled: {ssh!r} is not true or false")
    timezone = raw.get("system:timezone", "").strip()
    if timezone and not valid_timezone(timezone):
        problems.append(f"system:timezone: unknown time zone {timezone!r} (a name under "
                        f"{ZONEINFO}, e.g. Europe/Amsterdam)")  # fmt: skip
    backup: dict[str, str | int] = {}
    for key, setting in BACKUP_KEYS.items():
        value = raw.get(key, "").strip()
        if not value:
            continue
        if setting == "backup_increments":
            if not value.isdigit():
                problems.append(f"{key}: {value!r} is not a whole number >= 0")
                continue
            backup[setting] = int(value)
        else:
            backup[setting] = value
    for setting, given in backup.items():  # the daemon's own rules, one setting at a time
        try:
            load(os.devnull, {setting: given})
        except SettingsError as e:
            key = next(k for k, s in BACKUP_KEYS.items() if s == setting)
            reason = str(e).split(": ", 1)[-1]
            problems.append(f"{key}: {reason.replace(setting, key)}")
    primary = name("dovecot:primary_hostname", fqdn)
    exim_qualify = name("exim:qualify_domain", fqdn)
    dovecot_qualify = name("dovecot:qualify_domain", "")
    if problems:
        raise MetadataError(source, problems)
    return Metadata(source=source, hostname=hostname, dns_domain=dns_domain,
                    primary_hostname=primary, exim_qualify_domain=exim_qualify,
                    dovecot_qualify_domain=dovecot_qualify, ssh_disabled=ssh in _TRUE,
                    timezone=timezone, backup=backup, warnings=tuple(warnings))  # fmt: skip


def read(path: str | None, environ: Mapping[str, str] | None = None) -> Metadata:
    return validate(*gather(path, environ))
