"""Logins: the daemon's AUTH and USER verbs, asked by Dovecot (hooks/checkpassword, the Lua
passdb) over the auth socket.

    AUTH user=<b64> pass=<b64> service=<b64> ip=<ip>   a password login
    USER user=<b64> service=<b64>                       a lookup without password (LMTP, doveadm)

Replies: ``OK user=<b64 canonical name> home=<b64 home directory>``; ``FAIL <text>`` (AUTH: a
definite wrong password or unknown user); ``NOTFOUND`` (USER: no such user); ``DEFER <code>
<enhanced> <text>`` for our own trouble (an unreadable passwd file, a hash we cannot read, a
timeout). The hook turns FAIL into exit 1, NOTFOUND into exit 3 and everything else into 111:
only definite evidence says "wrong password" (DESIGN.md guarantee 8).

Users are ``<root>/passwd/<domain>`` lines ``user:{SCHEME}hash`` (the seed's format, hashes as
``doveadm pw`` writes them). The home is ``<root>/domains/<domain>/<user>``.

What a login costs and who waits:

* The user name is canonicalised once, the same way for the lookup, the cache and the throttle:
  lower-cased (Dovecot's default ``auth_username_format = %Lu``), and without a realm the
  ``auth_default_realm`` is appended (Dovecot does the same before asking us; the setting makes
  a bare name work for any client of the verb).
* Hashing never runs on the event loop: it runs in a thread pool, and every slow scheme's code
  releases the GIL while it hashes (libsodium/argon2-cffi, bcrypt, PBKDF2, libxcrypt through
  ctypes), so ``auth_workers`` threads hash on that many cores.
* An unknown user costs what a wrong password costs: the password is checked against the hash
  of a real user of that domain (the result thrown away), so the same scheme and parameters run;
  for a domain we do not have, against a dummy hash of the default scheme.
* A short positive cache (like Dovecot's auth_cache) skips the hash for a repeated correct
  login. Its key is an HMAC of the password under a per-process random key, never the password;
  an entry counts only while the user's stored hash is unchanged, so a changed password (or a
  removed user) takes effect at the next login.
* Failures slow down: per client IP and per user, each failure beyond ``auth_throttle_free`` in
  ``auth_throttle_window`` doubles a delay (from ``auth_throttle_base`` up to
  ``auth_throttle_max`` seconds) served before the next attempt is checked. Nobody is locked
  out: the delay is bounded below the hook's timeout, and the per-user delay does not apply from
  an IP where that user logged in successfully before, so the real user is not slowed by an
  attack on their name from elsewhere.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from cachetools import TTLCache

from policy import passwords
from policy.mailtree import Snapshot

# A user name we can make a home directory of: the passwd file allows more (any local part
# without "@" or white space), but a name with "/" or a leading "." must never become a path.
_SAFE_NAME = re.compile(r"[a-z0-9_][a-z0-9._+=-]{0,63}")


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a login or lookup found. ``kind`` is OK, FAIL, NOTFOUND or DEFER."""

    kind: str
    user: str = ""  # canonical name (OK), or the name as understood (for the log)
    home: str = ""
    reason: str = ""  # for the log only
    source: str = ""  # passwd/<domain>:<line> when a line decided


@dataclass(frozen=True, slots=True)
class ThrottleSettings:
    free: int
    base: float
    maximum: float
    window: float


@dataclass(frozen=True, slots=True)
class Found:
    """A passwd lookup: ``ended`` when it decides by itself (an unreadable file), else the
    user's ``stored`` hash and its ``source`` line, or for an unknown user a ``decoy`` (another
    user's hash of that domain) to spend the same time on."""

    ended: Outcome | None = None
    stored: str = ""
    source: str = ""
    decoy: str = ""


class Throttle:
    """Failure counters per IP and per user, forgotten ``window`` seconds after the last
    failure. Bounded (TTLCache maxsize): an attacker rotating names or addresses cannot grow
    the daemon's memory, only push older counters out."""

    def __init__(self, s: ThrottleSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.s = s
        self.failures: TTLCache[tuple[str, str], int] = TTLCache(65536, s.window, timer=clock)
        # (user, ip) pairs that logged in: the per-user delay does not apply to them.
        self.known: TTLCache[tuple[str, str], bool] = TTLCache(65536, 30 * 86400, timer=clock)

    def _delay(self, count: int) -> float:
        if count < self.s.free:
            return 0.0
        return float(min(self.s.base * 2 ** (count - self.s.free), self.s.maximum))

    def delay(self, user: str, ip: str) -> float:
        by_ip = self._delay(self.failures.get(("ip", ip), 0)) if ip else 0.0
        by_user = 0.0
        if (user, ip) not in self.known:
            by_user = self._delay(self.failures.get(("user", user), 0))
        return max(by_ip, by_user)

    def failed(self, user: str, ip: str) -> None:
        for key in (("ip", ip), ("user", user)):
            if key[1]:
                self.failures[key] = self.failures.get(key, 0) + 1  # re-set: the window restarts

    def succeeded(self, user: str, ip: str) -> None:
        self.known[(user, ip)] = True
        self.failures.pop(("ip", ip), None)


def canonical(name: str, realm: str) -> tuple[str, str] | None:
    """(local part, domain) of a login name, or None when it cannot be one of our users."""
    name = name.lower()
    if "@" not in name:
        if not realm:
            return None
        name = f"{name}@{realm.lower()}"
    local, _, domain = name.rpartition("@")
    if not local or not domain or not _SAFE_NAME.fullmatch(local):
        return None
    return local, domain


class Authenticator:
    def __init__(
        self,
        snapshot: Callable[[], Snapshot],
        *,
        realm: str = "",
        workers: int = 2,
        cache_ttl: float = 300.0,
        throttle: ThrottleSettings | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.snapshot = snapshot
        self.realm = realm
        self.workers = max(1, workers)
        # Every slow hash releases the GIL while it runs (policy/passwords.py), so threads hash
        # in parallel on as many cores as there are workers.
        self.threads = ThreadPoolExecutor(self.workers, thread_name_prefix="auth")
        self._key = os.urandom(32)
        self.cache: TTLCache[tuple[str, bytes], str] | None = (
            TTLCache(10000, cache_ttl, timer=clock) if cache_ttl > 0 else None
        )
        self.throttle = Throttle(throttle or ThrottleSettings(3, 0.5, 5.0, 900.0), clock)

    def close(self) -> None:
        self.threads.shutdown(wait=False, cancel_futures=True)

    def warm_up(self) -> None:
        """Make the dummy hash and load the hashing libraries (a start-up task, in a thread), so
        the first login pays for neither."""
        passwords.dummy_hash(passwords.DEFAULT_SCHEME)
        passwords.verify(passwords.dummy_hash("SHA512-CRYPT"), b"warm-up")

    def _find(self, local: str, domain: str) -> Found:
        snapshot = self.snapshot()
        loaded = snapshot.users.get(domain)
        if loaded is None:  # not a domain with users
            return Found()
        if loaded.data is None:
            reason = loaded.problem or f"{loaded.path} unavailable"
            return Found(Outcome("DEFER", f"{local}@{domain}", reason=reason))
        user = loaded.data.get(local)
        if user is None:
            first = next(iter(loaded.data.items()), None)
            return Found(decoy=first[1].hash if first is not None else "")
        return Found(stored=user.hash, source=loaded.source(user.line))

    def lookup(self, name: str) -> Outcome:
        """USER: does this user exist, and where does it live?"""
        parts = canonical(name, self.realm)
        if parts is None:
            return Outcome("NOTFOUND", name, reason="not a user name of ours")
        local, domain = parts
        found = self._find(local, domain)
        if found.ended is not None:
            return found.ended
        if not found.stored:
            return Outcome("NOTFOUND", f"{local}@{domain}", reason="no such user")
        return self._ok(local, domain, found.source)

    def _ok(self, local: str, domain: str, source: str, reason: str = "") -> Outcome:
        home = os.path.join(self.snapshot().root, "domains", domain, local)
        return Outcome("OK", f"{local}@{domain}", home, reason, source)

    async def login(self, name: str, password: bytes, ip: str) -> Outcome:
        parts = canonical(name, self.realm)
        key = f"{parts[0]}@{parts[1]}" if parts else name.lower()
        found = self._find(*parts) if parts is not None else Found()
        if found.ended is not None:
            return found.ended
        digest = hmac.new(self._key, key.encode("utf-8", "surrogateescape") + b"\0" + password,
                          hashlib.sha256).digest()  # fmt: skip
        if parts is not None and found.stored and self._cached(key, digest) == found.stored:
            self.throttle.succeeded(key, ip)
            return self._ok(*parts, found.source, "cached")
        pause = self.throttle.delay(key, ip)
        if pause:
            await asyncio.sleep(pause)
        delayed = f"after a {pause:.2f}s throttle delay" if pause else ""
        target = found.stored or found.decoy or passwords.dummy_hash(passwords.DEFAULT_SCHEME)
        loop = asyncio.get_running_loop()
        try:
            matched = await loop.run_in_executor(self.threads, passwords.verify, target, password)
        except passwords.HashError as e:
            if found.stored:  # the user's own hash is unusable: the admin's trouble, not a FAIL
                return Outcome("DEFER", key, reason=f"{found.source}: unusable hash: {e}")
            matched = False  # a decoy's trouble changes nothing: still unknown
        if parts is None or not found.stored:
            self.throttle.failed(key, ip)
            return Outcome("FAIL", key, reason=_join("unknown user", delayed))
        if not matched:
            self.throttle.failed(key, ip)
            return Outcome("FAIL", key, reason=_join("wrong password", delayed),
                           source=found.source)  # fmt: skip
        self.throttle.succeeded(key, ip)
        if self.cache is not None:
            self.cache[(key, digest)] = found.stored
        return self._ok(*parts, found.source, delayed)

    def _cached(self, key: str, digest: bytes) -> str | None:
        return self.cache.get((key, digest)) if self.cache is not None else None


def _join(*parts: str) -> str:
    return ", ".join(p for p in parts if p)
