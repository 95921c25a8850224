"""Password hashes as Dovecot writes them (``doveadm pw``): ``{SCHEME}hash``.

``mailpolicy user add`` hashes with ARGON2ID by default, with doveadm's own parameters
(m=65536 KiB, t=3, p=1, 16-byte salt, 32-byte hash): a memory-hard scheme that Dovecot 2.3 on
Debian verifies (built with libsodium), and the one ``doveadm pw -s ARGON2ID`` writes, so a
file edited by hand and one written by us look the same. SHA512-CRYPT, Dovecot's default, is
cheap to attack on GPUs; BLF-CRYPT truncates passwords at 72 bytes.

``verify`` checks a password against every scheme ``doveadm pw`` (Dovecot 2.3.19) writes that
matters for a mail server, and agrees with ``doveadm pw -t`` (tests/test_passwords.py compares
the two on hashes doveadm makes at test time). Which code verifies what:

* ARGON2I, ARGON2ID: libsodium through PyNaCl, the library Dovecot itself verifies with, for
  hashes with one lane (p=1: everything libsodium and so ``doveadm pw`` writes); argon2-cffi
  for the rest (p>1, written by other tools), which libsodium cannot read. Why not argon2-cffi
  for all: its reference code took 166 ms for doveadm's m=64 MiB t=3 where libsodium's
  optimised one took 87 ms (benchmarks/report/AUTH.md). The PHC string says i or id; Dovecot,
  through libsodium, also reads the type from the string, so ``{ARGON2I}$argon2id$...``
  verifies.
* BLF-CRYPT, and any crypt-family scheme whose hash is ``$2a$/$2b$/$2x$/$2y$`` (``doveadm pw
  -s CRYPT`` writes ``$2y$05$``!): the ``bcrypt`` package; it accepts ``$2y$`` as is. The
  password is cut to 72 bytes first, as crypt(3) does (bcrypt 5 raises instead).
* SHA512-CRYPT ``$6$``, SHA256-CRYPT ``$5$``, MD5-CRYPT/MD5 ``$1$``, CRYPT/DES-CRYPT (13
  characters, and a hash without ``{SCHEME}``, which Dovecot reads as CRYPT): the system's
  libxcrypt, the same library Dovecot calls, through ctypes (``crypt_rn``). Not the stdlib
  ``crypt`` module: it holds the GIL for the whole hash (so it needed a process pool), takes
  only UTF-8 passwords, and is gone in Python 3.13; a ctypes call releases the GIL.
* PBKDF2 (``$1$salt$rounds$hex``: PBKDF2-HMAC-SHA1, the salt used as text) and SCRAM-SHA-1/256:
  ``hashlib.pbkdf2_hmac``.
* SSHA, SSHA256, SSHA512, SMD5 (base64(digest + salt)), SHA/SHA1/SHA256/SHA512/PLAIN-MD5/
  LDAP-MD5/MD5 (plain digests), PLAIN/CLEAR/CLEARTEXT: hashlib and ``hmac.compare_digest``.
* The ``.b64``/``.base64``/``.hex`` suffixes (``{SSHA512.b64}``, ``{SHA512.HEX}``) are read as
  Dovecot reads them: the body is decoded first. Without a suffix a plain digest written in hex
  (twice the digest length) is also accepted, as Dovecot does.

Not verified (HashError): PLAIN-MD4 (no MD4 in this OpenSSL), PLAIN-TRUNC, HMAC-MD5/CRAM-MD5,
DIGEST-MD5 (needs the user name), OTP, and crypt(3) methods libxcrypt rejects.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import re
import secrets
import string
from typing import Any

SCHEMES = ("ARGON2ID", "ARGON2I")
DEFAULT_SCHEME = "ARGON2ID"

# Schemes Dovecot accepts that are fast to brute-force or store the password itself.
WEAK = frozenset(
    {
        "PLAIN",
        "CLEAR",
        "CLEARTEXT",
        "PLAIN-TRUNC",
        "PLAIN-MD4",
        "PLAIN-MD5",
        "LDAP-MD5",
        "MD5",
        "SMD5",
        "SHA",
        "SSHA",
        "SHA1",
        "SHA256",
        "SHA512",
        "CRYPT",
        "DES-CRYPT",
        "MD5-CRYPT",
        "LANMAN",
        "NTLM",
        "RPA",
        "HMAC-MD5",
        "CRAM-MD5",
        "DIGEST-MD5",
        "SKEY",
        "OTP",
    }
)
STRONG = frozenset(
    {
        "ARGON2ID",
        "ARGON2I",
        "BLF-CRYPT",
        "SHA512-CRYPT",
        "SHA256-CRYPT",
        "PBKDF2",
        "SSHA512",
        "SSHA256",
        "SCRAM-SHA-1",
        "SCRAM-SHA-256",
    }
)


class HashError(ValueError):
    """A stored hash we cannot check: unsupported scheme or malformed hash.

    The daemon answers it with a temporary failure, never with "wrong password".
    """


def make_hash(password: str, scheme: str = DEFAULT_SCHEME) -> str:
    if scheme not in SCHEMES:
        raise ValueError(f"unsupported scheme {scheme!r} (choose from {', '.join(SCHEMES)})")
    return f"{{{scheme}}}{_argon2_hasher(scheme).hash(password)}"


def _argon2_hasher(scheme: str) -> Any:
    import argon2  # here, not at the top: the daemon starts fast, and argon2 costs 2.5 MB

    kind = argon2.Type.ID if scheme == "ARGON2ID" else argon2.Type.I
    return argon2.PasswordHasher(
        time_cost=3, memory_cost=65536, parallelism=1, hash_len=32, salt_len=16, type=kind
    )


_ENCODINGS = {"B64": "b64", "BASE64": "b64", "HEX": "hex"}


def _split(stored: str) -> tuple[str, str, str]:
    """(scheme, encoding suffix or "", body); no prefix means CRYPT, as Dovecot's default."""
    if not stored.startswith("{"):
        return "", "", stored
    end = stored.find("}")
    if end <= 1:
        raise HashError("malformed {SCHEME} prefix")
    scheme, body = stored[1:end].upper(), stored[end + 1 :]
    encoding = ""
    if "." in scheme:
        scheme, _, suffix = scheme.rpartition(".")
        if suffix not in _ENCODINGS:
            raise HashError(f"unknown encoding .{suffix.lower()}")
        encoding = _ENCODINGS[suffix]
    return scheme, encoding, body


def scheme_of(hash_: str) -> str:
    """The ``{SCHEME}`` of a stored hash, without a ``.b64``/``.hex`` suffix; "" when it has
    none (Dovecot then assumes CRYPT)."""
    try:
        return _split(hash_)[0]
    except HashError:
        return ""


def weakness(hash_: str) -> str:
    """Why a stored hash is weak, or "" when it is not."""
    scheme = scheme_of(hash_)
    if not scheme:
        return "no {SCHEME} prefix: Dovecot reads it as CRYPT (DES or MD5-crypt), which is weak"
    if scheme in WEAK:
        return f"{scheme} is a weak scheme; re-hash with `mailpolicy user passwd`"
    if scheme not in STRONG:
        return f"unknown scheme {scheme}"
    return ""


# --- verification --------------------------------------------------------------------------

# Plain digests: Dovecot's raw_password_len lets it take hex of twice that length as well.
_DIGESTS = {
    "SHA": "sha1",
    "SHA1": "sha1",
    "SHA256": "sha256",
    "SHA512": "sha512",
    "PLAIN-MD5": "md5",
    "LDAP-MD5": "md5",
    "MD5": "md5",  # {MD5}$1$... is MD5-CRYPT; {MD5}<digest> a plain MD5, as in Dovecot
}
# Salted digests: base64(digest(password + salt) + salt), salt at least one byte.
_SALTED = {"SSHA": "sha1", "SSHA256": "sha256", "SSHA512": "sha512", "SMD5": "md5"}
_PLAIN = frozenset({"PLAIN", "CLEAR", "CLEARTEXT"})
_CRYPT = frozenset({"", "CRYPT", "DES-CRYPT", "MD5-CRYPT", "SHA256-CRYPT", "SHA512-CRYPT"})
_ARGON2 = frozenset({"ARGON2I", "ARGON2ID"})
_SCRAM = {"SCRAM-SHA-1": "sha1", "SCRAM-SHA-256": "sha256"}

_C64 = "[./0-9A-Za-z]"
_BCRYPT_RE = re.compile(rf"\$2[abxy]\$(0[4-9]|[12][0-9]|3[01])\${_C64}{{53}}")
# libxcrypt methods the stdlib crypt module hands to crypt(3), strictly formed: a truncated
# hash would otherwise be read as a valid salt and give a plain "no match".
_LIBCRYPT_RE = re.compile(
    rf"\$6\$(rounds=[0-9]{{1,9}}\$)?{_C64}{{1,16}}\${_C64}{{86}}"
    rf"|\$5\$(rounds=[0-9]{{1,9}}\$)?{_C64}{{1,16}}\${_C64}{{43}}"
    rf"|\$1\${_C64}{{1,8}}\${_C64}{{22}}"
    rf"|{_C64}{{13}}"
)
_PBKDF2_RE = re.compile(r"\$1\$([^$]+)\$([1-9][0-9]{0,8})\$([0-9a-fA-F]{40})")
_BCRYPT_MAX = 72  # crypt(3) (and so Dovecot) uses only the first 72 bytes; bcrypt 5 raises


def verify(stored: str, password: bytes) -> bool:
    """Whether ``password`` matches the stored ``{SCHEME}hash``; HashError when the scheme is
    unsupported or the hash malformed. Nothing here logs or keeps the password."""
    scheme, encoding, body = _split(stored)
    if scheme in _CRYPT or scheme == "BLF-CRYPT" or scheme in _ARGON2 or scheme == "PBKDF2":
        text = _text(body, encoding)
        if scheme in _ARGON2:
            return _verify_argon2(text, password)
        if scheme == "PBKDF2":
            return _verify_pbkdf2(text, password)
        if _BCRYPT_RE.fullmatch(text):
            return _verify_bcrypt(text, password)
        if scheme == "BLF-CRYPT":  # Dovecot: "Password is not blowfish password"
            raise HashError("BLF-CRYPT hash is not $2a$/$2b$/$2y$")
        if scheme == "MD5-CRYPT" and not text.startswith("$1$"):
            raise HashError("MD5-CRYPT hash is not $1$")
        return _verify_libcrypt(text, password)
    if scheme == "MD5" and not encoding and body.startswith("$1$"):
        return _verify_libcrypt(body, password)
    if scheme in _PLAIN:
        raw = _decode(body, encoding) if encoding else body.encode()
        return hmac.compare_digest(raw, password)
    if scheme in _DIGESTS:
        algorithm = _DIGESTS[scheme]
        size = hashlib.new(algorithm).digest_size
        if not encoding:
            encoding = "hex" if len(body) == 2 * size and _is_hex(body) else "b64"
        raw = _decode(body, encoding)
        if len(raw) != size:
            raise HashError(f"{scheme} digest has {len(raw)} bytes, not {size}")
        return hmac.compare_digest(hashlib.new(algorithm, password).digest(), raw)
    if scheme in _SALTED:
        algorithm = _SALTED[scheme]
        size = hashlib.new(algorithm).digest_size
        raw = _decode(body, encoding or "b64")
        if len(raw) <= size:  # Dovecot: "SSHA512 password is too short"
            raise HashError(f"{scheme} hash too short")
        digest, salt = raw[:size], raw[size:]
        return hmac.compare_digest(hashlib.new(algorithm, password + salt).digest(), digest)
    if scheme in _SCRAM:
        return _verify_scram(_SCRAM[scheme], _text(body, encoding), password)
    raise HashError(f"unsupported scheme {scheme}")


# Every slow hash here releases the GIL while it runs, so the daemon verifies in threads: ctypes
# releases it around crypt_rn, cffi around libsodium and argon2-cffi, bcrypt in its Rust code,
# hashlib.pbkdf2_hmac itself; SSHA* and PLAIN take microseconds. Measured with this module:
# two threads each running verify() once vs the same two calls in a row (wall time, best of 3,
# 2-core box, Python 3.11); tests/test_passwords.py checks the crypt_rn one:
#   SHA512-CRYPT rounds=50000, stdlib crypt (before)  25 ms in a row, 25 ms in 2 threads (held)
#   BLF-CRYPT cost 10 (bcrypt 5.0.0)  117 ms / 59 ms (0.50: released)
#   ARGON2ID m=64M t=3 (argon2-cffi 25.1.0)  275 ms / 146 ms (0.53: released)
#   PBKDF2 rounds=100000 (hashlib)  44 ms / 23 ms (0.51: released)


def _is_hex(text: str) -> bool:
    return all(c in string.hexdigits for c in text)


def _decode(body: str, encoding: str) -> bytes:
    try:
        if encoding == "hex":
            return bytes.fromhex(body)
        return base64.b64decode(body.encode("ascii"), validate=True)
    except (ValueError, binascii.Error) as e:  # UnicodeEncodeError is a ValueError
        raise HashError(f"bad {encoding} encoding") from e


def _text(body: str, encoding: str) -> str:
    """The body of a text scheme (crypt, argon2, PBKDF2, SCRAM), after a .b64/.hex suffix."""
    if not encoding:
        return body
    try:
        return _decode(body, encoding).decode("ascii")
    except UnicodeDecodeError as e:
        raise HashError("encoded hash is not ASCII") from e


# A well-formed one-lane hash, which libsodium verifies. libsodium answers "no" alike for a wrong
# password and a string it cannot parse, so only these go to it; anything else goes to
# argon2-cffi, which tells a malformed hash (HashError, the admin's trouble) from a mismatch.
_ONE_LANE = re.compile(
    r"\$argon2id?\$v=19\$m=[1-9][0-9]{0,9},t=[1-9][0-9]{0,9},p=1"
    r"\$[A-Za-z0-9+/]{11,}\$[A-Za-z0-9+/]{22,}"
)


def _verify_argon2(text: str, password: bytes) -> bool:
    from argon2 import PasswordHasher, exceptions

    if not text.startswith(("$argon2i$", "$argon2id$")):
        raise HashError("ARGON2 hash is not $argon2i$/$argon2id$")
    if _ONE_LANE.fullmatch(text):
        import nacl.exceptions
        import nacl.pwhash

        try:
            return bool(nacl.pwhash.verify(text.encode("ascii"), password))
        except nacl.exceptions.InvalidkeyError:  # the password does not match
            return False
        except (nacl.exceptions.CryptoError, ValueError, TypeError):
            pass  # a string libsodium cannot parse: argon2-cffi says what is wrong with it
    try:
        # verify() reads type, m, t, p from the string; the hasher's own parameters don't matter.
        return bool(PasswordHasher().verify(text, password))
    except exceptions.VerifyMismatchError:
        return False
    except (exceptions.VerificationError, exceptions.InvalidHashError) as e:
        raise HashError(f"malformed ARGON2 hash: {e}") from None


def _verify_bcrypt(text: str, password: bytes) -> bool:
    import bcrypt  # lazy: only BLF-CRYPT users pay for it

    if b"\0" in password:  # crypt(3) would stop at the NUL; Dovecot never passes one
        return False
    try:
        return bool(bcrypt.checkpw(password[:_BCRYPT_MAX], text.encode("ascii")))
    except ValueError as e:
        raise HashError("malformed BLF-CRYPT hash") from e


def _verify_libcrypt(text: str, password: bytes) -> bool:
    if not _LIBCRYPT_RE.fullmatch(text):
        raise HashError("malformed or unsupported crypt(3) hash")
    if b"\0" in password:  # crypt(3) would stop at the NUL; Dovecot never passes one
        return False
    # The password's bytes as they are (Dovecot passes them to crypt(3) the same way), so a
    # Latin-1 password from an old client matches a hash made from the same bytes.
    result = _crypt_rn(password, text.encode("ascii"))
    if result is None or result.startswith(b"*") or len(result) != len(text):
        raise HashError("crypt(3) rejected the hash")  # libxcrypt's failure token is *0 / *1
    return hmac.compare_digest(result, text.encode("ascii"))


# struct crypt_data is 32768 bytes in libxcrypt (crypt.h); crypt_rn is told the size and
# fails rather than overrun a smaller buffer.
_CRYPT_DATA_SIZE = 32768


@functools.cache
def _libcrypt() -> Any:
    """libxcrypt's crypt_rn(phrase, setting, data, size) -> char* (NULL on failure): reentrant,
    no global state, and called through ctypes.CDLL, which releases the GIL for the call."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("crypt") or "libcrypt.so.1"
    lib = ctypes.CDLL(name, use_errno=True)
    fn = lib.crypt_rn
    fn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int]
    fn.restype = ctypes.c_char_p
    return fn


def _crypt_rn(phrase: bytes, setting: bytes) -> bytes | None:
    import ctypes

    data = ctypes.create_string_buffer(_CRYPT_DATA_SIZE)  # zeroed, as crypt_rn expects
    result: bytes | None = _libcrypt()(phrase, setting, data, _CRYPT_DATA_SIZE)
    ctypes.memset(data, 0, _CRYPT_DATA_SIZE)  # do not leave the phrase's state lying around
    return result


def _verify_pbkdf2(text: str, password: bytes) -> bool:
    m = _PBKDF2_RE.fullmatch(text)
    if not m:
        raise HashError("malformed PBKDF2 hash (want $1$salt$rounds$hex-sha1)")
    salt, rounds, expected = m[1].encode(), int(m[2]), bytes.fromhex(m[3])
    got = hashlib.pbkdf2_hmac("sha1", password, salt, rounds)
    return hmac.compare_digest(got, expected)


def _verify_scram(algorithm: str, text: str, password: bytes) -> bool:
    parts = text.split(",")
    size = hashlib.new(algorithm).digest_size
    if len(parts) != 4 or not parts[0].isdigit() or not 1 <= int(parts[0]) <= 10**9:
        raise HashError("malformed SCRAM hash (want iterations,salt,storedkey,serverkey)")
    salt, stored_key = _decode(parts[1], "b64"), _decode(parts[2], "b64")
    if not salt or len(stored_key) != size or len(_decode(parts[3], "b64")) != size:
        raise HashError("malformed SCRAM hash")
    salted = hashlib.pbkdf2_hmac(algorithm, password, salt, int(parts[0]))
    client_key = hmac.digest(salted, b"Client Key", algorithm)
    return hmac.compare_digest(hashlib.new(algorithm, client_key).digest(), stored_key)


# --- dummy hashes ---------------------------------------------------------------------------


@functools.cache
def dummy_hash(scheme: str) -> str:
    """A valid hash of a random password in ``scheme``, with the cost of a typical real one
    (doveadm's defaults; ARGON2* as ``make_hash`` writes them), for unknown users: verifying it
    costs what a wrong password costs. HashError for a scheme ``verify`` does not support."""
    scheme = scheme.upper()
    password = secrets.token_urlsafe(24)
    if scheme in _ARGON2:
        return make_hash(password, scheme)
    return _make_other(scheme, password.encode())


_SALT_CHARS = string.ascii_letters + string.digits + "./"


def _salt(n: int) -> str:
    return "".join(secrets.choice(_SALT_CHARS) for _ in range(n))


def _make_other(scheme: str, password: bytes) -> str:
    """A ``{SCHEME}`` hash with doveadm's default parameters (dummy hashes and tests)."""
    if scheme in ("", "CRYPT", "BLF-CRYPT"):
        # doveadm pw -s CRYPT and -s BLF-CRYPT both write $2y$05$ (cost 5).
        import bcrypt

        hashed = bcrypt.hashpw(password[:_BCRYPT_MAX], bcrypt.gensalt(5)).decode("ascii")
        return f"{{{scheme or 'CRYPT'}}}$2y${hashed[4:]}"
    if scheme in ("SHA512-CRYPT", "SHA256-CRYPT", "MD5-CRYPT", "MD5", "DES-CRYPT"):
        setting = {
            "SHA512-CRYPT": f"$6${_salt(16)}",  # 5000 rounds, doveadm's default
            "SHA256-CRYPT": f"$5${_salt(16)}",
            "MD5-CRYPT": f"$1${_salt(8)}",
            "MD5": f"$1${_salt(8)}",
            "DES-CRYPT": _salt(2),
        }[scheme]
        made = _crypt_rn(password, setting.encode("ascii"))
        if made is None or made.startswith(b"*"):
            raise HashError(f"crypt(3) cannot make {scheme} here")
        return f"{{{scheme}}}{made.decode('ascii')}"
    if scheme == "PBKDF2":
        text_salt = _salt(16)  # doveadm: 16 characters, 5000 rounds
        hexdigest = hashlib.pbkdf2_hmac("sha1", password, text_salt.encode(), 5000).hex()
        return f"{{PBKDF2}}$1${text_salt}$5000${hexdigest}"
    if scheme in _SALTED:
        salt = secrets.token_bytes(4)  # doveadm's salt length
        digest = hashlib.new(_SALTED[scheme], password + salt).digest()
        return f"{{{scheme}}}{base64.b64encode(digest + salt).decode('ascii')}"
    if scheme in _DIGESTS:
        digest = hashlib.new(_DIGESTS[scheme], password).digest()
        text = digest.hex() if scheme == "PLAIN-MD5" else base64.b64encode(digest).decode()
        return f"{{{scheme}}}{text}"
    if scheme in _SCRAM:
        algorithm, salt = _SCRAM[scheme], secrets.token_bytes(16)
        salted = hashlib.pbkdf2_hmac(algorithm, password, salt, 4096)  # doveadm: 4096
        stored = hashlib.new(algorithm, hmac.digest(salted, b"Client Key", algorithm)).digest()
        server = hmac.digest(salted, b"Server Key", algorithm)
        fields = [base64.b64encode(x).decode() for x in (salt, stored, server)]
        return f"{{{scheme}}}4096,{','.join(fields)}"
    if scheme in _PLAIN:
        return f"{{{scheme}}}{password.decode('utf-8')}"
    raise HashError(f"unsupported scheme {scheme}")
