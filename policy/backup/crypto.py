"""The encrypted object format: AES-128-CBC for secrecy, HMAC-SHA256 for authenticity.

Every archive in the bucket (``*.tar.gz.aes``) is::

    IV (16 bytes) || AES-128-CBC(key, IV, PKCS#7-padded .tar.gz) || TAG (32 bytes)

    TAG     = HMAC-SHA256(mac_key, PLACE || IV || ciphertext)
    PLACE   = "mailpolicy-backup 1" NUL kind NUL set NUL domain NUL user NUL seq NUL   (UTF-8)
    mac_key = HKDF-SHA256(ikm = backup_openssl_key, salt = backup_openssl_iv,
                          info = "mailpolicy-backup 1 hmac-sha256", length 32)
    key_id  = HKDF-SHA256(same ikm and salt, info = "mailpolicy-backup 1 key-id", length 8), hex

* ``key`` is the configured ``backup_openssl_key`` itself, so a stock ``openssl enc -d
  -aes-128-cbc -K <key> -iv <first 16 bytes>`` decrypts the middle part (docs/backups.md).
* The IV is random per object. The seed used the configured IV for every file, which shows
  which files start alike and allows chosen-prefix games; the configured IV is kept as the HKDF
  salt instead, so both configured values are needed to authenticate a backup.
* Encrypt-then-MAC: the tag is checked (constant time) before a single byte is decrypted.
  PLACE binds the object to where it belongs (``kind`` is "user" or "admin"; ``set`` the date of
  the set's full; ``domain`` and ``user`` empty for admin data; ``seq`` the run number in the
  set), so an object copied over another one, from another user, run or set, fails as surely
  as a tampered or truncated one. Names never contain NUL, so PLACE is unambiguous.
* ``key_id`` is public (manifests carry it): it tells "wrong key" apart from "altered object".

Manifests (policy/backup/manifest.py) are not encrypted but carry a tag computed the same way
with kind "manifest" and empty domain and user.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from cryptography.hazmat.primitives import hashes, padding
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from policy.backup import BackupError

FORMAT = "mailpolicy-backup 1"
IV_SIZE = 16
TAG_SIZE = 32
BLOCK = 16
# An empty plaintext still has one block of padding.
MIN_SIZE = IV_SIZE + BLOCK + TAG_SIZE
CHUNK = 1 << 20
KINDS = ("user", "admin", "manifest")


class AuthError(BackupError):
    """An object is not what we wrote there: altered, truncated, moved, or another key."""


@dataclass(frozen=True, slots=True)
class Keys:
    enc: bytes
    mac: bytes
    key_id: str

    @classmethod
    def from_hex(cls, key_hex: str, iv_hex: str) -> Keys:
        try:
            key, salt = bytes.fromhex(key_hex), bytes.fromhex(iv_hex)
        except ValueError:
            raise BackupError("backup_openssl_key and backup_openssl_iv must be hex") from None
        if len(key) != 16 or len(salt) != 16:
            raise BackupError("backup_openssl_key and backup_openssl_iv must be 32 hex digits")
        return cls(key, _hkdf(key, salt, "hmac-sha256", 32), _hkdf(key, salt, "key-id", 8).hex())


def _hkdf(key: bytes, salt: bytes, purpose: str, length: int) -> bytes:
    info = f"{FORMAT} {purpose}".encode()
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(key)


@dataclass(frozen=True, slots=True)
class Place:
    """Where an object belongs; authenticated with it (PLACE above)."""

    kind: str
    set: str
    domain: str
    user: str
    seq: int

    def header(self) -> bytes:
        fields = (FORMAT, self.kind, self.set, self.domain, self.user, str(self.seq))
        if self.kind not in KINDS or any("\0" in f for f in fields) or self.seq < 0:
            raise ValueError(f"bad object place {self!r}")
        return "".join(f + "\0" for f in fields).encode("utf-8")


class Sealer:
    """Writes one object to ``out``: feed the plaintext with ``write``, then ``close``."""

    def __init__(self, keys: Keys, place: Place, out: BinaryIO) -> None:
        iv = os.urandom(IV_SIZE)
        self._out = out
        self._enc: CipherContext = Cipher(algorithms.AES(keys.enc), modes.CBC(iv)).encryptor()
        self._pad = padding.PKCS7(BLOCK * 8).padder()
        self._mac = hmac.new(keys.mac, place.header() + iv, hashlib.sha256)
        self.size = IV_SIZE
        out.write(iv)

    def _emit(self, data: bytes) -> None:
        if data:
            self._mac.update(data)
            self._out.write(data)
            self.size += len(data)

    def write(self, data: bytes) -> None:
        self._emit(self._enc.update(self._pad.update(data)))

    def close(self) -> str:
        """Finish the object; returns its tag (hex). The caller closes ``out``."""
        self._emit(self._enc.update(self._pad.finalize()) + self._enc.finalize())
        tag = self._mac.digest()
        self._out.write(tag)
        self.size += TAG_SIZE
        return tag.hex()


def seal_file(keys: Keys, place: Place, src: Path, dst: Path) -> tuple[int, str]:
    """Encrypt the file ``src`` into ``dst``; returns (size, tag hex)."""
    with src.open("rb") as fin, dst.open("wb") as fout:
        sealer = Sealer(keys, place, fout)
        while chunk := fin.read(CHUNK):
            sealer.write(chunk)
        tag = sealer.close()
    return sealer.size, tag


def _body(f: BinaryIO, start: int, end: int) -> Iterator[bytes]:
    f.seek(start)
    left = end - start
    while left > 0:
        chunk = f.read(min(CHUNK, left))
        if not chunk:
            raise AuthError("the object shrank while being read")
        left -= len(chunk)
        yield chunk


def authenticate(keys: Keys, place: Place, path: Path, what: str) -> str:
    """Check the tag of the object at ``path`` (named ``what`` in errors); returns the tag (hex).
    Nothing is decrypted."""
    size = path.stat().st_size
    if size < MIN_SIZE or (size - IV_SIZE - TAG_SIZE) % BLOCK:
        raise AuthError(f"{what}: {size} bytes is not a whole object (truncated?)")
    mac = hmac.new(keys.mac, place.header(), hashlib.sha256)
    with path.open("rb") as f:
        for chunk in _body(f, 0, size - TAG_SIZE):
            mac.update(chunk)
        tag = f.read(TAG_SIZE)
    if not hmac.compare_digest(mac.digest(), tag):
        raise AuthError(
            f"{what}: authentication failed: the object was altered, truncated or moved from "
            "another place (or written with another backup_openssl_key/backup_openssl_iv)"
        )
    return tag.hex()


def decrypt_file(keys: Keys, path: Path, out: BinaryIO) -> int:
    """Decrypt an object that ``authenticate`` accepted into ``out``; returns the plaintext size."""
    size = path.stat().st_size
    written = 0
    with path.open("rb") as f:
        iv = f.read(IV_SIZE)
        dec = Cipher(algorithms.AES(keys.enc), modes.CBC(iv)).decryptor()
        unpad = padding.PKCS7(BLOCK * 8).unpadder()
        for chunk in _body(f, IV_SIZE, size - TAG_SIZE):
            data = unpad.update(dec.update(chunk))
            out.write(data)
            written += len(data)
        try:
            data = unpad.update(dec.finalize()) + unpad.finalize()
        except ValueError:
            raise AuthError(f"{path.name}: bad padding after a good tag (another key?)") from None
        out.write(data)
    return written + len(data)


def mac(keys: Keys, place: Place, data: bytes) -> str:
    """The tag of a manifest's text (hex)."""
    return hmac.new(keys.mac, place.header() + data, hashlib.sha256).hexdigest()


def check_mac(keys: Keys, place: Place, data: bytes, tag: str) -> bool:
    return hmac.compare_digest(mac(keys, place, data), tag)
