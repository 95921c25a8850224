"""policy.passwords against Dovecot itself: hashes made by ``doveadm pw -s SCHEME -p PW`` at test
time must verify with the right password and not with a wrong one, and where the two could
differ (72-byte bcrypt, 8-character DES, encoding suffixes, malformed hashes) ``doveadm pw -t``
is asked too. doveadm is installed by setup (Debian's dovecot-core): no skips.
"""

from __future__ import annotations

import base64
import logging
import re
import secrets
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policy import passwords
from policy.passwords import HashError, dummy_hash, verify

# Uses the doveadm binary (a subprocess): marked like the other tests that start programs.
doveadm_test = pytest.mark.integration

# Every scheme `doveadm pw -l` lists that verify() supports.
SCHEMES = [
    "SHA512-CRYPT",
    "SHA256-CRYPT",
    "BLF-CRYPT",
    "ARGON2I",
    "ARGON2ID",
    "SSHA512",
    "SSHA256",
    "SSHA",
    "SMD5",
    "PBKDF2",
    "CRYPT",
    "DES-CRYPT",
    "MD5-CRYPT",
    "MD5",
    "PLAIN",
    "CLEAR",
    "CLEARTEXT",
    "SHA",
    "SHA1",
    "SHA256",
    "SHA512",
    "PLAIN-MD5",
    "LDAP-MD5",
    "SCRAM-SHA-1",
    "SCRAM-SHA-256",
]
# Listed by `doveadm pw -l` but not verified: HashError (a temporary failure in the daemon).
UNSUPPORTED = ["PLAIN-MD4", "PLAIN-TRUNC", "HMAC-MD5", "CRAM-MD5", "DIGEST-MD5", "OTP"]
# The crypt(3) schemes the stdlib crypt module verifies (GIL held: process pool).

PASSWORDS = [
    'pa ss"w=rd',
    "it's 'quoted' = \"x\" \\ $HOME `id`",
    " leading and trailing ",
    "-dash=first",
    "пароль-密码-é",  # non-ASCII UTF-8
    "é" * 40,  # 80 bytes: over bcrypt's 72
    "x" * 100,
]
# ARGON2 costs 0.1-0.5 s a hash here (64 MiB): fewer passwords, the hostile ones.
ARGON2_PASSWORDS = [*PASSWORDS[:2], "пароль-密码-é"]


def passwords_for(scheme: str) -> list[str]:
    return ARGON2_PASSWORDS if scheme.startswith("ARGON2") else PASSWORDS


def doveadm_pw(scheme: str, password: str, *extra: str) -> str:
    out = subprocess.run(
        ["doveadm", "pw", "-s", scheme, "-p", password, *extra],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.removesuffix("\n")  # not strip(): {PLAIN} keeps a trailing space
    assert out.startswith(f"{{{scheme}}}"), out
    return out


def doveadm_accepts(stored: str, password: str) -> bool:
    """`doveadm pw -t`: exit 0 when the password matches; it exits 75 on a mismatch and on a
    hash it cannot read alike (and needs a {SCHEME} prefix)."""
    r = subprocess.run(
        ["doveadm", "pw", "-t", stored, "-p", password], capture_output=True, timeout=30
    )
    return r.returncode == 0


def wrong(password: str) -> str:
    # Differs in the first character: DES reads only 8 characters, bcrypt only 72 bytes.
    return ("Y" if password[0] != "Y" else "Z") + password[1:]


@pytest.fixture(scope="module")
def made() -> dict[tuple[str, str], str]:
    """{(scheme, password): doveadm's hash}, made once per module (in parallel: ~1-2 s)."""
    jobs = [(s, p) for s in SCHEMES for p in passwords_for(s)]
    with ThreadPoolExecutor(8) as pool:
        hashes = list(pool.map(lambda job: doveadm_pw(*job), jobs))
    return dict(zip(jobs, hashes, strict=True))


@doveadm_test
@pytest.mark.parametrize("scheme", SCHEMES)
def test_doveadm_hashes_verify(made: dict[tuple[str, str], str], scheme: str) -> None:
    for password in passwords_for(scheme):
        stored = made[scheme, password]
        assert passwords.scheme_of(stored) == scheme
        assert verify(stored, password.encode()) is True, (stored, password)
        assert verify(stored, wrong(password).encode()) is False, (stored, password)


@doveadm_test
def test_doveadm_crypt_writes_bcrypt(made: dict[tuple[str, str], str]) -> None:
    # Surprise kept as a test: on Debian, `doveadm pw -s CRYPT` writes bcrypt $2y$05$, which
    # verify() hands to the bcrypt package (GIL released), not to the crypt module.
    assert re.fullmatch(r"\{CRYPT\}\$2y\$05\$.{53}", made["CRYPT", PASSWORDS[0]])


@doveadm_test
def test_bcrypt_72_bytes_like_dovecot(made: dict[tuple[str, str], str]) -> None:
    """crypt(3), so Dovecot, uses the first 72 bytes of the password; bcrypt 5 would raise."""
    for long in ("é" * 40, "x" * 100):
        stored = made["BLF-CRYPT", long]
        head = long.encode()[:72].decode()
        for candidate in (long, head, head + "anything", head[:-1]):
            ours = verify(stored, candidate.encode())
            assert ours is doveadm_accepts(stored, candidate), candidate
        assert verify(stored, head.encode() + b"\xff") is True  # past 72 bytes: ignored
        assert verify(stored, head[:-1].encode()) is False


@doveadm_test
def test_des_8_characters_like_dovecot(made: dict[tuple[str, str], str]) -> None:
    stored = made["DES-CRYPT", "x" * 100]
    for candidate in ("x" * 8, "x" * 8 + "yyy", "x" * 7):
        assert verify(stored, candidate.encode()) is doveadm_accepts(stored, candidate)
    assert verify(stored, b"x" * 8) is True


@doveadm_test
@pytest.mark.parametrize("scheme", ["DES-CRYPT", "MD5-CRYPT", "SHA256-CRYPT", "SHA512-CRYPT"])
def test_no_prefix_is_crypt(made: dict[tuple[str, str], str], scheme: str) -> None:
    password = PASSWORDS[1]
    body = made[scheme, password].split("}", 1)[1]
    assert passwords.scheme_of(body) == ""
    assert verify(body, password.encode()) is True
    assert verify(body, wrong(password).encode()) is False
    assert doveadm_accepts("{CRYPT}" + body, password)  # how Dovecot reads a bare hash


def _reencode(stored: str, encoding: str) -> str:
    scheme, body = stored[1:].split("}", 1)
    raw = base64.b64decode(body)
    text = raw.hex() if encoding.lower() == "hex" else base64.b64encode(raw).decode()
    return f"{{{scheme}.{encoding}}}{text}"


@doveadm_test
def test_encoding_suffixes_like_dovecot(made: dict[tuple[str, str], str]) -> None:
    password = "пароль-密码-é"
    pw = password.encode()
    cases = [
        _reencode(made["SSHA512", password], "b64"),
        _reencode(made["SSHA512", password], "hex"),
        _reencode(made["SSHA256", password], "HEX"),
        _reencode(made["SSHA", password], "base64"),
        _reencode(made["SHA512", password], "HEX"),
        _reencode(made["SHA256", password], "b64"),
        "{SHA512}" + base64.b64decode(made["SHA512", password][8:]).hex(),  # hex, no suffix
        "{ssha512}" + made["SSHA512", password][9:],  # scheme names are case-insensitive
        "{PLAIN.b64}" + base64.b64encode(pw).decode(),
        "{PLAIN.hex}" + pw.hex(),
        "{SHA512-CRYPT.b64}"
        + base64.b64encode(made["SHA512-CRYPT", password][14:].encode()).decode(),
    ]
    for stored in cases:
        assert doveadm_accepts(stored, password), stored
        assert verify(stored, pw) is True, stored
        assert verify(stored, b"wrong") is False, stored
    assert passwords.scheme_of(cases[0]) == "SSHA512"
    assert passwords.weakness(cases[0]) == ""


@doveadm_test
def test_argon2_type_is_read_from_the_hash(made: dict[tuple[str, str], str]) -> None:
    stored = "{ARGON2I}" + made["ARGON2ID", PASSWORDS[0]].split("}", 1)[1]
    assert doveadm_accepts(stored, PASSWORDS[0])
    assert verify(stored, PASSWORDS[0].encode()) is True


MALFORMED = [
    "",
    "{}",
    "{",
    "{FOO}abc",
    "{SSHA512.xyz}abc",
    "{SSHA512}!!!!",
    "{SSHA512}iLUCLE/VCdoOv9MTdGlA",  # shorter than the digest
    "{SSHA512}",
    "{SHA512}abc",
    "{SHA512.hex}zz",
    "{SHA512-CRYPT}",
    "{SHA512-CRYPT}garbage",
    "{SHA512-CRYPT}$6$rounds=5000$abc$",
    "{SHA256-CRYPT}$5$abc$tooshort",
    "{MD5-CRYPT}$6$abc$def",
    "{CRYPT}*",
    "{CRYPT}!locked",
    "{CRYPT}$argon2id$v=19$m=65536,t=3,p=1$Nxghd32PrNUBhmGinj9FBA$Yh4ZK7Jw+12ylyVELNa66RFer3dv4Sp",
    "{BLF-CRYPT}$2y$05$zehZPvcqsl",
    "{BLF-CRYPT}$6$4Mb6ZYaHmA./n241$DJHW63CIdy9FbyMy6DPQUshz3aEUvp5L/KQCUUFzx6PI2iBEleGViXByoPdZo42."
    "MFtfe80mX3GB1N4MmLQWN0",
    "{BLF-CRYPT}$2y$99$zehZPvcqslRaWZ8IcBtxgO6Gx2b2lGCXjHGGTop2Gwg6dHTOow3Ti",
    "{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$xx",
    "{ARGON2ID}$argon2d$v=19$m=65536,t=3,p=1$3XqTUTWVkrhVRgnd6twbVA$zxDi06CqFDbXMSeLBXB48YmuCZ56geZreyZKWl7hnug",
    "{ARGON2I}plain text",
    "{PBKDF2}$1$salt$5000$abc",
    "{PBKDF2}$1$salt$0$" + "a" * 40,
    "{PBKDF2.b64}$1$BWkzK0hOdnjsigCz$5000$3c286c5a2f244481083c365546d77e35a76b6b6e",
    "{SCRAM-SHA-256}4096,abc",
    "{SCRAM-SHA-1}x,Ew2qcnOOr2HZtA9vTF62Hg==,Npbgvm7dzdAafe5fr3e40LtD/PY=,+DVxGGEsR2pQo7ZS6MmCatJlOjc=",
    "$6$hLXGA6kOneyM3S9v$trunc",
    ".xnKDUO22cG",
] + [f"{{{s}}}87735443ba464c09db873fa04d5332d1" for s in UNSUPPORTED]


@pytest.mark.parametrize("stored", MALFORMED)
def test_malformed_or_unsupported_raise(stored: str) -> None:
    with pytest.raises(HashError):
        verify(stored, b'pa ss"w=rd')
    assert isinstance(HashError("x"), ValueError)


@doveadm_test
def test_dovecot_rejects_what_we_reject() -> None:
    # A HashError must never hide a hash Dovecot would accept (a bare hash needs {CRYPT} there).
    for stored in MALFORMED:
        probe = stored if stored.startswith("{") else "{CRYPT}" + stored
        assert not doveadm_accepts(probe, 'pa ss"w=rd'), stored


@doveadm_test
@pytest.mark.parametrize("scheme", [s for s in SCHEMES if s not in {"PLAIN", "CLEAR", "CLEARTEXT"}])
def test_truncated_doveadm_hash_raises(made: dict[tuple[str, str], str], scheme: str) -> None:
    stored = made[scheme, PASSWORDS[0]]
    half = stored[: len(stored) // 2 + 1]
    with pytest.raises(HashError):
        verify(half, PASSWORDS[0].encode())
    assert not doveadm_accepts(half, PASSWORDS[0])


@pytest.mark.parametrize("stored", [
    "{SHA512-CRYPT}$6$rounds=400000$saltsaltsaltsalt$",  # libxcrypt through ctypes
    "{ARGON2ID}$argon2id$v=19$m=65536,t=6,p=1$c2FsdHNhbHRzYWx0c2FsdA$",  # libsodium
    "{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=2$c2FsdHNhbHRzYWx0c2FsdA$",  # argon2-cffi (p=2)
])  # fmt: skip
def test_slow_hashes_release_the_gil(stored: str) -> None:
    """The daemon hashes in threads (policy/auth.py): that is only right if no verifier holds
    the GIL while it hashes. While one thread verifies a slow hash, a pure-Python thread must
    keep running: with the GIL held it would stall for the whole hash. Not a speed test: it
    compares the longest stall with the hash's own duration on the same run."""
    import threading
    import time

    # A real hash of the right shape (the digest part is irrelevant to the cost).
    if "$6$" in stored:
        stored += "a" * 86
    else:
        stored += "A" * 43  # canonical base64 (the last character's spare bits are zero)
    stalls: list[float] = []
    done = threading.Event()

    def ticker() -> None:
        last = time.perf_counter()
        while not done.is_set():
            now = time.perf_counter()
            stalls.append(now - last)
            last = now
            sum(range(200))  # pure-Python work: needs the GIL

    t = threading.Thread(target=ticker)
    t.start()
    try:
        started = time.perf_counter()
        assert verify(stored, b"not the password") is False
        took = time.perf_counter() - started
    finally:
        done.set()
        t.join()
    assert took > 0.05, f"the hash took {took:.3f} s: too fast to tell"
    # Held, the GIL would stall the ticker for about the whole hash; released, only for
    # switch intervals (5 ms) and scheduling.
    assert max(stalls) < took / 2, (max(stalls), took)


DUMMY_SHAPES = {
    "ARGON2ID": r"\$argon2id\$v=19\$m=65536,t=3,p=1\$.{22}\$.{43}",
    "ARGON2I": r"\$argon2i\$v=19\$m=65536,t=3,p=1\$.{22}\$.{43}",
    "BLF-CRYPT": r"\$2y\$05\$.{53}",
    "CRYPT": r"\$2y\$05\$.{53}",
    "SHA512-CRYPT": r"\$6\$.{16}\$.{86}",
    "SHA256-CRYPT": r"\$5\$.{16}\$.{43}",
    "MD5-CRYPT": r"\$1\$.{8}\$.{22}",
    "DES-CRYPT": r".{13}",
    "PBKDF2": r"\$1\$.{16}\$5000\$[0-9a-f]{40}",
    "SSHA512": r"[A-Za-z0-9+/]{91}=",  # 64-byte digest + 4-byte salt
    "SCRAM-SHA-256": r"4096,.{24},.{44},.{44}",
}


@pytest.mark.parametrize("scheme", SCHEMES)
def test_dummy_hash(scheme: str) -> None:
    dummy = dummy_hash(scheme)
    assert dummy_hash(scheme) is dummy  # cached
    assert passwords.scheme_of(dummy) == scheme
    assert verify(dummy, secrets.token_urlsafe(12).encode()) is False
    if scheme in DUMMY_SHAPES:  # the cost parameters of a real hash
        assert re.fullmatch(DUMMY_SHAPES[scheme], dummy.split("}", 1)[1]), dummy


def test_dummy_hash_unsupported() -> None:
    for scheme in [*UNSUPPORTED, "NOPE"]:
        with pytest.raises(HashError):
            dummy_hash(scheme)


def test_verify_logs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    for scheme in ("SSHA512", "PBKDF2", "SHA512-CRYPT", "BLF-CRYPT"):
        verify(dummy_hash(scheme), b"Sekr1t-Pa55")
    with pytest.raises(HashError) as info:
        verify("{SHA512-CRYPT}garbage", b"Sekr1t-Pa55")
    assert "Sekr1t" not in caplog.text
    assert "Sekr1t" not in str(info.value)


# Passwords Dovecot can receive: no NUL (the SASL separator), valid UTF-8 for doveadm's argv.
password_text = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), min_size=1, max_size=30
)
CHEAP = ["SSHA512", "SSHA256", "SSHA", "PBKDF2", "SHA512-CRYPT", "BLF-CRYPT", "SCRAM-SHA-256"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(password=password_text, scheme=st.sampled_from(CHEAP))
def test_property_roundtrip(password: str, scheme: str) -> None:
    stored = passwords._make_other(scheme, password.encode())
    assert verify(stored, password.encode()) is True
    assert verify(stored, password.encode() + b"!") is (
        scheme == "BLF-CRYPT" and len(password.encode()) >= 72
    )


@settings(max_examples=2, deadline=None)
@given(password=password_text)
def test_property_make_hash(password: str) -> None:
    stored = passwords.make_hash(password)
    assert verify(stored, password.encode()) is True
    assert verify(stored, password.encode() + b"x") is False


@doveadm_test
@settings(max_examples=6, deadline=None)
@given(password=password_text, scheme=st.sampled_from(CHEAP))
def test_property_agrees_with_doveadm(password: str, scheme: str) -> None:
    ours = passwords._make_other(scheme, password.encode())
    assert doveadm_accepts(ours, password), (ours, password)
    theirs = doveadm_pw(scheme, password)
    assert verify(theirs, password.encode()) is True
    assert verify(theirs, ("!" + password).encode()) is doveadm_accepts(theirs, "!" + password)
