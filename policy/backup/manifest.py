"""The manifest of one run: the archives it wrote, authenticated, uploaded after all of them.

``<set>/_manifest.<seq>.json`` is two lines::

    {"archives":[...],"date":"2026-05-04","finished":"2026-05-04T01:17:09Z","format":1,
     "key_id":"9f0c...","seq":3,"set":"2026-05-01"}
    hmac-sha256 <64 hex digits>

The first line is JSON (sorted keys, no spaces), authenticated as written: the tag is
HMAC-SHA256(mac_key, PLACE("manifest", set, "", "", seq) || first line) (crypto.py), so a
manifest moved to another run or set fails too. ``date`` is the day of the run (restore
``--date`` picks runs by it). Each archive::

    {"name": "_admin" | "<domain>/<user>", "kind": "admin" | "user", "domain": ..., "user": ...,
     "base": <run of this chain's first archive>, "size": <object bytes>, "tag": <object tag>,
     "members": [admin paths archived; [] for users]}

``base`` is the run whose archive starts the chain (made from an empty tar snapshot): 0, or
the run where the user appeared, or where the admin paths changed. A restore of run n applies
the archives of runs base..n. ``size`` and ``tag`` pin the exact object.

Not encrypted: it tells nothing that the object names and sizes do not, ``key_id`` (public)
lets a reader say "wrong key" rather than "altered", and an admin can read it with ``cat``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from policy.backup import BackupError
from policy.backup.crypto import AuthError, Keys, Place, check_mac, mac
from policy.backup.layout import archive_name

FORMAT = 1
MAX_SIZE = 16 << 20
_TAG_LINE = re.compile(rb"hmac-sha256 ([0-9a-f]{64})\n")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


class WrongKeyError(BackupError):
    pass


@dataclass(frozen=True, slots=True)
class Entry:
    kind: str
    domain: str
    user: str
    base: int
    size: int
    tag: str
    members: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return archive_name(self.kind, self.domain, self.user)


@dataclass(frozen=True, slots=True)
class Manifest:
    set: str
    seq: int
    date: str
    finished: str
    key_id: str
    entries: tuple[Entry, ...]

    def entry(self, name: str) -> Entry | None:
        return next((e for e in self.entries if e.name == name), None)


def _place(set_name: str, seq: int) -> Place:
    return Place("manifest", set_name, "", "", seq)


def dumps(keys: Keys, m: Manifest) -> bytes:
    body = {
        "format": FORMAT,
        "key_id": m.key_id,
        "set": m.set,
        "seq": m.seq,
        "date": m.date,
        "finished": m.finished,
        "archives": [
            {
                "name": e.name,
                "kind": e.kind,
                "domain": e.domain,
                "user": e.user,
                "base": e.base,
                "size": e.size,
                "tag": e.tag,
                "members": list(e.members),
            }
            for e in m.entries
        ],
    }
    line = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return line + b"\nhmac-sha256 " + mac(keys, _place(m.set, m.seq), line).encode() + b"\n"


def loads(keys: Keys, data: bytes, set_name: str, seq: int, what: str) -> Manifest:
    """The manifest of run ``seq`` of set ``set_name``; ``what`` names it in errors.
    WrongKeyError if it was written with another key, AuthError if it is not authentic."""
    line, nl, rest = data.partition(b"\n")
    tag = _TAG_LINE.fullmatch(rest)
    if len(data) > MAX_SIZE or not nl or tag is None:
        raise AuthError(f"{what}: not a manifest (truncated or altered)")
    try:
        body = json.loads(line)
    except ValueError:
        body = None
    # Said before checking the tag: an altered key_id can only claim "wrong key" wrongly,
    # never get anything accepted.
    theirs = body.get("key_id") if isinstance(body, dict) else None
    if isinstance(theirs, str) and theirs != keys.key_id:
        raise WrongKeyError(
            f"{what}: written with another key (key id {theirs}); the configured "
            f"backup_openssl_key/backup_openssl_iv have key id {keys.key_id}: wrong key"
        )
    if not check_mac(keys, _place(set_name, seq), line, tag.group(1).decode()):
        raise AuthError(f"{what}: authentication failed: altered, truncated or moved")
    try:
        m = _parse(body)
    except (KeyError, TypeError, ValueError) as e:
        raise AuthError(f"{what}: malformed manifest ({e})") from None
    if (m.set, m.seq) != (set_name, seq):  # the tag already binds them; a bug otherwise
        raise AuthError(f"{what}: says set {m.set} run {m.seq}")
    return m


def _parse(body: Any) -> Manifest:
    def string(obj: dict[str, Any], key: str) -> str:
        value = obj[key]
        if not isinstance(value, str):
            raise TypeError(f"{key} is not a string")
        return value

    def number(obj: dict[str, Any], key: str) -> int:
        value = obj[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise TypeError(f"{key} is not a count")
        return value

    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise ValueError("unknown format")
    entries = []
    for a in body["archives"]:
        if not isinstance(a, dict):
            raise TypeError("an archive is not an object")
        e = Entry(string(a, "kind"), string(a, "domain"), string(a, "user"), number(a, "base"),
                  number(a, "size"), string(a, "tag"),
                  tuple(str(x) for x in a["members"]))  # fmt: skip
        if e.kind not in ("admin", "user") or not _HEX64.fullmatch(e.tag) or e.name != a["name"]:
            raise ValueError(f"bad archive {a.get('name')!r}")
        entries.append(e)
    m = Manifest(string(body, "set"), number(body, "seq"), string(body, "date"),
                 string(body, "finished"), string(body, "key_id"), tuple(entries))  # fmt: skip
    if not _DATE.fullmatch(m.date) or any(e.base > m.seq for e in entries):
        raise ValueError("bad date or base")
    return m
