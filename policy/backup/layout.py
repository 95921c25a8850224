"""Object names in the bucket, and what a listing says about sets and runs.

::

    <set>/_admin.<seq>.tar.gz.aes            the admin data (passwd, aliases, dkim, ssl,
                                             dovecot, exim/conf)
    <set>/<domain>/<user>.<seq>.tar.gz.aes   one user's home, <root>/domains/<domain>/<user>
    <set>/_manifest.<seq>.json               the run's manifest, uploaded last

``<set>`` is the date (YYYY-MM-DD) of the set's full backup; ``seq`` numbers the runs of a
set: 0 is the full, 1, 2 ... the increments. A run is complete when its manifest exists, a
set when its run 0 is; runs 0..n with no manifest missing are the restorable ones. Keys of
another shape are not ours and are never touched, except inside a set being deleted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from policy.backup.store import Store

SET_NAME = re.compile(r"\d{4}-\d{2}-\d{2}")
_KEY = re.compile(
    r"(?P<set>\d{4}-\d{2}-\d{2})/(?:_manifest\.(?P<manifest>\d+)\.json"
    r"|_admin\.(?P<admin>\d+)\.tar\.gz\.aes"
    r"|[^/]+/[^/]+\.(?P<user>\d+)\.tar\.gz\.aes)"
)
ADMIN = "_admin"


def valid_name(name: str) -> bool:
    """Can a domain or user directory name be part of an object key (and a log line)?"""
    return (
        0 < len(name) <= 255
        and name.isprintable()
        and not any(c.isspace() or c in "/\\" for c in name)
        and not name.startswith(".")
        and not any(0xD800 <= ord(c) <= 0xDFFF for c in name)  # undecodable bytes
    )


def archive_name(kind: str, domain: str, user: str) -> str:
    """The name of an archive across runs: ``_admin`` or ``<domain>/<user>``."""
    return ADMIN if kind == "admin" else f"{domain}/{user}"


def archive_key(set_name: str, name: str, seq: int) -> str:
    return f"{set_name}/{name}.{seq}.tar.gz.aes"


def manifest_key(set_name: str, seq: int) -> str:
    return f"{set_name}/_manifest.{seq}.json"


@dataclass
class SetListing:
    name: str
    # Every object under "<set>/" and its size.
    objects: dict[str, int] = field(default_factory=dict)
    # The run number of each archive and manifest among them.
    seq_of: dict[str, int] = field(default_factory=dict)
    manifests: set[int] = field(default_factory=set)

    @property
    def complete(self) -> bool:
        return 0 in self.manifests

    def runs(self) -> list[int]:
        """The restorable runs: 0, 1 ... up to the first missing manifest."""
        n = 0
        while n in self.manifests:
            n += 1
        return list(range(n))

    def leftovers(self) -> list[str]:
        """Objects of runs without a manifest: what an interrupted run left behind."""
        return sorted(k for k, seq in self.seq_of.items() if seq not in self.manifests)

    @property
    def size(self) -> int:
        return sum(self.objects.values())


def scan(store: Store) -> dict[str, SetListing]:
    """The sets in ``store``, by name (a listing only; nothing is downloaded)."""
    sets: dict[str, SetListing] = {}
    for obj in store.list(""):
        first = obj.key.split("/", 1)[0]
        if "/" not in obj.key or not SET_NAME.fullmatch(first):
            continue
        listing = sets.setdefault(first, SetListing(first))
        listing.objects[obj.key] = obj.size
        m = _KEY.fullmatch(obj.key)
        if m is None:
            continue
        if m["manifest"] is not None:
            listing.manifests.add(int(m["manifest"]))
            listing.seq_of[obj.key] = int(m["manifest"])
        else:
            listing.seq_of[obj.key] = int(m["admin"] or m["user"])
    return dict(sorted(sets.items()))
