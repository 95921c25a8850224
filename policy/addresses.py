"""Mail addresses as the policy sees them: split, normalised, and validated.

Local parts and domains are compared case-insensitively (Exim's lsearch is case-insensitive and
the seed's files are lower case), so lookups use ``casefold``-free ``lower()`` keys.

A recipient's ``+suffix`` is optional, as the seed's ``local_part_suffix = +*``
with ``local_part_suffix_optional``: ``bob+lists@example.org`` is ``bob`` if there is no
``bob+lists`` of its own.
"""

from __future__ import annotations

import re

# The seed's (Exim's default) restricted-character rules, as ACL local_parts patterns:
# for local domains  ^[.] : ^.*[@%!/|]
# for other domains  ^[./|] : ^.*[@%!] : ^.*/\.\./
# They refuse the classic relay and path tricks: a%b@local, "a@b"@local, b!a@local, |cmd, /path.
_RESTRICTED_LOCAL = re.compile(r"^\.|[@%!/|]")
_RESTRICTED_REMOTE = re.compile(r"^[./|]|[@%!]|/\.\./")

# A domain: dot-separated labels of letters, digits, hyphens and underscores (plus 8-bit for
# IDNs as UTF-8), or an address literal [1.2.3.4] / [IPv6:...]. Length limits per RFC 1035.
_CHAR = r"A-Za-z0-9_\u00a0-\ud7ff\ue000-\U0010ffff"  # no controls, no lone surrogates
_LABEL = rf"(?:[{_CHAR}](?:[{_CHAR}-]{{0,61}}[{_CHAR}])?)"
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")
_LITERAL = re.compile(r"\[(?:IPv6:[0-9A-Fa-f:.]+|[0-9.]+)\]")

# Alias destinations end up, unescaped and untainted, in an Exim redirect router's data: only a
# plain address may pass (no pipes, files, :include:, :fail:, quotes, commas or spaces).
_SAFE_LOCAL_PART = re.compile(r"[A-Za-z0-9!#$&'*+=?^_`{}~.\-\u00a0-\ud7ff\ue000-\U0010ffff]{1,64}")


def split(address: str) -> tuple[str, str]:
    """Split at the last ``@``. A bare local part has domain ``""``."""
    local, at, domain = address.rpartition("@")
    if not at:
        return address, ""
    return local, domain


def is_valid_domain(domain: str) -> bool:
    return 0 < len(domain) <= 253 and bool(_DOMAIN.fullmatch(domain) or _LITERAL.fullmatch(domain))


def restricted_local_part(local: str, local_domain: bool) -> bool:
    """True when the local part hits the seed's restricted-character rule for its domain kind."""
    pattern = _RESTRICTED_LOCAL if local_domain else _RESTRICTED_REMOTE
    return pattern.search(local) is not None


def strip_suffix(local: str) -> str | None:
    """``bob+tag`` -> ``bob``; None when there is no ``+suffix`` (or nothing before the ``+``)."""
    base, plus, _ = local.partition("+")
    if plus and base:
        return base
    return None


_SAFE_ADDRESS = re.compile(
    rf"(?!\.){_SAFE_LOCAL_PART.pattern}@(?=[^@]{{1,253}}$){_LABEL}(?:\.{_LABEL})*\.?"
)


def safe_destination(address: str) -> bool:
    """True for a plain ``local@domain`` that an Exim redirect router may take as it is: a
    dot-atom local part not starting with a dot, and a domain name (no address literal)."""
    return _SAFE_ADDRESS.fullmatch(address) is not None
