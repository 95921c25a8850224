"""Password hashes as Dovecot writes them (``doveadm pw``): ``{SCHEME}hash``.

``mailpolicy user add`` hashes with ARGON2ID by default, with doveadm's own parameters
(m=65536 KiB, t=3, p=1, 16-byte salt, 32-byte hash): a memory-hard scheme that Dovecot 2.3 on
Debian verifies (built with libsodium), and the one ``doveadm pw -s ARGON2ID`` writes, so a
file edited by hand and one written by us look the same. SHA512-CRYPT, Dovecot's default, is
cheap to attack on GPUs; BLF-CRYPT truncates passwords at 72 bytes.

Verification of every scheme for logins is the auth issue's work; here we only classify schemes
so ``mailpolicy check`` can warn about weak ones.
"""

from __future__ import annotations

SCHEMES = ("ARGON2ID", "ARGON2I")
DEFAULT_SCHEME = "ARGON2ID"

# Schemes Dovecot accepts that are fast to brute-force or store the password itself.
WEAK = frozenset(
    {
        "PLAIN",
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


def make_hash(password: str, scheme: str = DEFAULT_SCHEME) -> str:
    if scheme not in SCHEMES:
        raise ValueError(f"unsupported scheme {scheme!r} (choose from {', '.join(SCHEMES)})")
    import argon2  # here, not at the top: the daemon never hashes, and argon2 costs 2.5 MB

    kind = argon2.Type.ID if scheme == "ARGON2ID" else argon2.Type.I
    hasher = argon2.PasswordHasher(
        time_cost=3, memory_cost=65536, parallelism=1, hash_len=32, salt_len=16, type=kind
    )
    return f"{{{scheme}}}{hasher.hash(password)}"


def scheme_of(hash_: str) -> str:
    """The ``{SCHEME}`` of a stored hash; "" when it has none (Dovecot then assumes CRYPT)."""
    if hash_.startswith("{"):
        end = hash_.find("}")
        if end > 1:
            return hash_[1:end].upper()
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
