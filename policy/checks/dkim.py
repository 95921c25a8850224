"""DKIM-required domains (RFC 6376, RFC 8301) at DATA: mail that claims to come from a domain
in ``exim/conf/dkim_required`` must carry a valid DKIM signature of that domain.

Which domains must be signed. Both the envelope sender's domain and every domain in the
message's From header fields are looked up in ``dkim_required`` (wildlsearch: exact keys,
``*`` suffix wildcards, ``^`` regexes; first match wins). Each one that matches needs its own
valid signature. Why both: the seed's rule was Exim's usual recipe, which checks the envelope
sender (``sender_domains = wildlsearch;dkim_required``), and we keep that; but the From header
is what the recipient's mail program shows and what a phisher forges, while the envelope
sender is free for him to choose - checking the envelope alone protects nothing. Several From
addresses (RFC 5322 allows a list; a forger may add a second From field): each domain counts.
The From is read failing closed: the obsolete ``From :`` counts, and a value the address parser
cannot take apart counts every ``@domain`` in it (``from_domains``). A message without a From
with a domain in it names no one to protect, so only its envelope sender is judged; the null
sender ``<>`` has no domain either.

Which signature counts for a domain D ("aligned"): ``d=`` equal to D or to a parent domain of
it (DMARC's relaxed alignment, RFC 7489 section 3.1.1), never a bare top-level domain. Why not
an exact match: large senders commonly sign mail from ``service.paypal.example`` with
``d=paypal.example``, and only the owner of the parent domain can publish its keys. A
signature of any other domain (a mailing list, a forwarder, the forger's own) never counts.

A signature counts as valid only if all of these hold:

* dkimpy verifies it: the body hash and the header signature match the key in DNS
  (``<s>._domainkey.<d>`` TXT, asked through the daemon's resolver, policy/dns.py);
* it is not ``a=rsa-sha1`` (RFC 8301 section 3.1) and an RSA key has at least 1024 bits
  (RFC 8301 section 3.2); Ed25519 (RFC 8463) verifies if PyNaCl is installed, else it is
  ``neutral`` (dkimpy cannot process it);
* ``From`` is in ``h=`` (RFC 6376 section 5.4 requires it; unsigned, the forger writes it);
* no ``l=``, or an ``l=`` equal to the length of the canonicalised body: a shorter one leaves
  whatever follows unsigned (a forger appends his text below a real signed message); a longer
  one means the body is not what was signed.

| required domain's aligned signatures | verdict |
|---|---|
| one valid | accept |
| none valid, and one failed only for a temporary key lookup (timeout, SERVFAIL) | 451 4.4.3 |
| none at all, or all invalid (bad signature, no key, RFC 8301, l=, From unsigned) | 550 5.7.20 |
| verification did not finish within ``dkim_timeout`` | 451 4.4.3 |

A temporary failure never becomes a 5xx: the valid signature may be the one we could not check.

Every accepted message that was checked gets an ``Authentication-Results`` header (RFC 8601)
with ``settings.hostname`` as the authserv-id and one ``dkim=`` result per signature
evaluated: ``pass``, ``fail`` (the signature does not verify), ``policy`` (it verifies but we
do not accept it: rsa-sha1, a small key, l=, From unsigned), ``neutral`` (malformed, or an
algorithm we cannot process), ``permerror`` (no usable key, an expired signature),
``temperror``; ``dkim=none`` for an unsigned message. Only our own fixed words go into
``reason=``; ``header.d``/``header.s`` are left out when the signature's values are not plain
DNS tokens.

Not checked (no header): ``dkim_enabled = false``, no network (``mailpolicy explain``), and the
clients we relay for - authenticated users, local submissions, localhost and relay_from_hosts -
whose mail is our own outgoing mail, not a stranger's claim. Unlike SPF, mail through our
``secondary_mx_hosts`` IS checked: a DKIM signature survives relaying.

Limits: at most ``MAX_SIGNATURES`` signatures are evaluated, those aligned with a required
domain first (RFC 6376 section 6.1 lets a verifier limit them; a flood of bogus signatures must
not cost a key lookup each, nor make the header too long to send).

How: the header section is parsed in a worker thread (up to 1 MB: some 80 ms); the keys are
then looked up concurrently on the event loop through the daemon's async resolver; dkimpy then
verifies each signature with its fetched key in ``services.threads`` (parsing and canonicalising
a large body is CPU work: 0.6 s to parse and 4 s to canonicalise a 50 MB body relaxed,
measured), stopping at the ``dkim_timeout`` deadline (a thread cannot be cancelled).
dkimpy's own asyncio support (``dkim.asyncsupport``) is not used: it imports aiodns (not a
dependency) even when given a ``dnsfunc``, it would canonicalise on the event loop, and its
verify turns a missing or broken key into the same ``False`` as a bad signature; evaluating the
fetched key ourselves (``dkim.evaluate_pk``, then dkimpy's ``verify_sig_process``) tells
``permerror``, ``fail`` and ``temperror`` apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.parser
import email.utils
import logging
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import dkim
import dkim.util
import dns.asyncresolver
import dns.exception
import dns.name

from policy import dns as mpdns
from policy.addresses import split
from policy.checks import Context, Result, load_message
from policy.checks.relay import trusted_client
from policy.mailtree import Loaded
from policy.matchers import WildMap
from policy.message import MessageError
from policy.verdict import DKIM_REQUIRED, TEMP_DNS, Verdict, defer

if TYPE_CHECKING:
    from policy.services import Services

NAME = "dkim"

# Signatures evaluated per message at most (aligned candidates first).
MAX_SIGNATURES = 10
# RFC 8301 section 3.2: verifiers MUST NOT consider smaller RSA keys valid.
MIN_RSA_BITS = 1024

# A value that may stand unquoted in an Authentication-Results property (RFC 8601 "value"
# as a MIME token, restricted to what a domain, selector or algorithm name holds).
_TOKEN = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9._-]{0,252})")

_OBS_FROM = re.compile(r"^from[ \t]+:", re.IGNORECASE | re.MULTILINE)
_AT_DOMAIN = re.compile(r"@([^\s<>,;:\"()\[\]\\@]+)")

# dkimpy logs through "dkimpy"; it has a NullHandler, and our log is the decision log.
_quiet = logging.getLogger("mailpolicy.dkim.dkimpy")
_quiet.addHandler(logging.NullHandler())
_quiet.propagate = False


@dataclass(frozen=True, slots=True)
class Signature:
    """One DKIM-Signature header field as judged. ``why`` is in our own words (it goes into
    the header's reason=); ``detail`` may quote the message (log only)."""

    index: int  # among the message's DKIM-Signature fields, 0 = topmost
    domain: str  # d=, lower case, A-labels; "" when unreadable
    selector: str
    algorithm: str
    result: str  # RFC 8601: pass, fail, policy, neutral, permerror, temperror
    why: str = ""
    detail: str = ""
    bits: int = 0  # key size

    @property
    def valid(self) -> bool:
        return self.result == "pass"

    def describe(self) -> str:
        what = f"d={self.domain or '?'} s={self.selector or '?'} {self.algorithm or '?'}"
        if self.bits:
            what += f" {self.bits} bits"
        why = ": ".join(w for w in (self.why, self.detail) if w)
        return f"{what}: {self.result}{f' ({why})' if why else ''}"


@dataclass(frozen=True, slots=True)
class Required:
    domain: str
    role: str  # "envelope sender", "From", or both
    source: str  # the dkim_required file:line that matched


@dataclass(frozen=True, slots=True)
class _Todo:
    """A signature whose key is to be looked up and which is then verified."""

    index: int
    domain: str
    selector: str
    algorithm: str
    key_name: str


def normalise_domain(domain: str) -> str:
    """Lower case, no trailing dot, A-labels (what d= holds, RFC 6376 section 3.5). Stray
    quoting around a header's domain (``a@paypal.example\\``) does not make it another one."""
    domain = domain.strip(" \t\\\"'<>()[],;").lower().rstrip(".")
    if not domain.isascii():
        # Not an IDN we can convert: compared as it is (it then matches no d=).
        with contextlib.suppress(UnicodeError):
            domain = domain.encode("idna").decode("ascii")
    return domain


def aligned(signer: str, domain: str) -> bool:
    """Does a signature with d=``signer`` speak for ``domain``: the same domain or a parent,
    never a bare TLD (relaxed alignment)."""
    if not signer:
        return False
    return signer == domain or ("." in signer and domain.endswith("." + signer))


def from_domains(header_block: bytes) -> list[str]:
    """The domains of every address in every From header field, in order, without repeats.
    Read the way a mail program would, and failing closed: RFC 5322's obsolete ``From :``
    (white space before the colon, section 4.5) is a From too, and a From value with an ``@``
    that the address parser cannot take apart counts every ``@domain`` in it."""
    text = _OBS_FROM.sub("From:", header_block.decode("utf-8", "surrogateescape"))
    parsed = email.parser.HeaderParser().parsestr(text + "\r\n")
    domains: list[str] = []
    for value in map(str, parsed.get_all("From", [])):
        found = [split(address)[1] for _, address in email.utils.getaddresses([value])]
        found = [d for d in found if d]
        if not found and "@" in value:
            found = _AT_DOMAIN.findall(value)
        for domain in map(normalise_domain, found):
            if domain and domain not in domains:
                domains.append(domain)
    return domains


def required_domains(
    listed: Loaded[WildMap], sender: str, header_from: list[str]
) -> list[Required]:
    """The domains that must be signed (see the module docstring): the envelope sender's and
    the From domains that ``dkim_required`` (available) matches."""
    assert listed.data is not None
    roles: dict[str, list[str]] = {}
    _, envelope = split(sender)
    if envelope:
        roles.setdefault(normalise_domain(envelope), []).append("envelope sender")
    for domain in header_from:
        roles.setdefault(domain, []).append("From")
    found = []
    for domain, role in roles.items():
        hit = listed.data.lookup(domain)
        if hit is not None:
            found.append(Required(domain, " and ".join(role), listed.source(hit.line)))
    return found


# --- signatures: read, keys fetched, verified ---------------------------------------------


def _text(value: bytes) -> str:
    return value.decode("utf-8", "replace").strip()


def read_signatures(
    header_block: bytes, required: list[Required]
) -> tuple[list[Signature | _Todo], int]:
    """The message's signatures, read without the body: each one judged already (malformed)
    or to be verified; at most MAX_SIGNATURES, those aligned with a required domain first, and
    how many were left out over that limit."""
    try:
        headers, _ = dkim.rfc822_parse(header_block)
    except dkim.MessageFormatError as e:
        # dkimpy cannot read this header section, so it cannot verify any signature in it.
        return [Signature(-1, "", "", "", "neutral", "malformed message header", str(e))], 0
    values = [v for n, v in headers if n.lower() == b"dkim-signature"]
    found: list[Signature | _Todo] = []
    for index, value in enumerate(values):
        try:
            tags = dkim.util.parse_tag_value(value)
        except dkim.util.InvalidTagValueList as e:
            found.append(Signature(index, "", "", "", "neutral", "malformed signature",
                                   f"{type(e).__name__}: {e}"))  # fmt: skip
            continue
        domain = normalise_domain(_text(tags.get(b"d", b"")))
        selector, algorithm = _text(tags.get(b"s", b"")), _text(tags.get(b"a", b"")).lower()
        try:
            dkim.validate_signature_fields(tags)
        except dkim.DKIMException as e:
            # An expired signature (x=) is well formed but over (RFC 6376 section 6.1.1).
            result, why = (("permerror", "signature expired") if str(e).startswith("x= value is "
                           "past") else ("neutral", "malformed signature"))  # fmt: skip
            found.append(Signature(index, domain, selector, algorithm, result, why,
                                   f"{type(e).__name__}: {e}"))  # fmt: skip
            continue
        try:
            key_name = dns.name.from_text(f"{selector}._domainkey.{domain}").to_text()
        except (dns.exception.DNSException, UnicodeError) as e:
            # Not a name DNS can hold: no key can exist (not a temporary failure).
            found.append(Signature(index, domain, selector, algorithm, "permerror",
                                   "no valid key name", str(e)))  # fmt: skip
            continue
        found.append(_Todo(index, domain, selector, algorithm, key_name))
    # Aligned candidates first, the others after them, each in message order (a stable sort).
    found.sort(key=lambda f: not any(aligned(f.domain, r.domain) for r in required))
    return found[:MAX_SIGNATURES], max(0, len(found) - MAX_SIGNATURES)


async def fetch_key(resolver: dns.asyncresolver.Resolver, name: str) -> tuple[str, str]:
    """("key", record), ("none", why) or ("temp", why) for one ``<s>._domainkey.<d>``."""
    try:
        answer = await mpdns.lookup(resolver, name, "TXT")
    except mpdns.DnsTemporary as e:
        return "temp", str(e)
    if answer.kind is mpdns.Kind.NXDOMAIN:
        return "none", f"{name}: no such name (NXDOMAIN)"
    if not answer.records:
        return "none", f"{name}: no TXT record"
    # RFC 6376 section 3.6.2.2: several TXT records for one selector give undefined results;
    # the first is as good as any.
    return "key", answer.records[0]


def verify_all(
    data: bytes, todo: list[_Todo], keys: dict[str, tuple[str, str]], deadline: float
) -> list[Signature]:
    """Blocking (a worker thread): verify each signature in ``todo`` against its fetched key,
    until ``deadline`` (time.monotonic())."""
    try:
        message = dkim.DKIM(data, logger=_quiet, minkey=0)  # minkey: we judge key size below
    except dkim.DKIMException as e:
        return [Signature(t.index, t.domain, t.selector, t.algorithm, "neutral",
                          "malformed message", str(e)) for t in todo]  # fmt: skip
    results = []
    for t in todo:
        if time.monotonic() > deadline:
            results.append(Signature(t.index, t.domain, t.selector, t.algorithm, "temperror",
                                     "timed out"))  # fmt: skip
            continue
        try:
            results.append(_verify_one(message, t, keys[t.key_name]))
        except Exception as e:
            # dkimpy tripped over something we did not foresee: our trouble, so temporary.
            results.append(Signature(t.index, t.domain, t.selector, t.algorithm, "temperror",
                                     "internal error", f"{type(e).__name__}: {e}"))  # fmt: skip
    return results


def _verify_one(message: Any, t: _Todo, key: tuple[str, str]) -> Signature:
    def judged(result: str, why: str = "", detail: str = "", bits: int = 0) -> Signature:
        return Signature(t.index, t.domain, t.selector, t.algorithm, result, why, detail, bits)

    kind, record = key
    if kind == "temp":
        return judged("temperror", "key lookup failed", record)
    if kind == "none":
        return judged("permerror", "no key", record)
    sig, include_headers, sigheaders = message.verify_headerprep(t.index)
    # What dkimpy's own verify_sig does after its DNS lookup, with the key we fetched.
    try:
        pk, bits, ktag, tlsrpt_only = dkim.evaluate_pk(t.key_name, record.encode("utf-8"))
    except dkim.NaClNotFoundError as e:
        return judged("neutral", "ed25519 not supported here", str(e))
    except dkim.DKIMException as e:
        return judged("permerror", "unusable key", str(e))
    bits = int(bits or 0)
    if pk is None or tlsrpt_only:
        return judged("permerror", "key not for email", bits=bits)
    if not t.algorithm.startswith(_text(ktag) + "-"):
        return judged("permerror", "key type does not match a=", bits=bits)
    message.pk, message.keysize, message.ktag, message.seqtlsrpt = pk, bits, ktag, tlsrpt_only
    from_signed = b"from" in include_headers  # before dkimpy appends to the list
    try:
        ok = message.verify_sig_process(sig, include_headers, sigheaders[t.index], None)
    except dkim.ValidationError as e:
        return judged("fail", "body hash mismatch" if "body hash" in str(e) else "invalid",
                      str(e), bits)  # fmt: skip
    except dkim.KeyFormatError as e:  # the digest does not fit the key
        return judged("fail", "unusable key", str(e), bits)
    except dkim.DKIMException as e:  # an invalid c=, an unknown key type
        return judged("neutral", "cannot process", str(e), bits)
    if not ok:
        return judged("fail", "signature does not verify", bits=bits)
    # It verifies; now what we (RFC 8301, RFC 6376 5.4) accept.
    if t.algorithm == "rsa-sha1":
        return judged("policy", "rsa-sha1 is not accepted (RFC 8301)", bits=bits)
    if _text(ktag) == "rsa" and bits < MIN_RSA_BITS:
        return judged("policy", f"RSA key of {bits} bits (RFC 8301)", bits=bits)
    if not from_signed:
        return judged("policy", "From is not signed", bits=bits)
    if b"l" in sig:
        canon = dkim.CanonicalizationPolicy.from_c_value(sig.get(b"c", b"simple/simple"))
        length = len(canon.canonicalize_body(message.body))
        if int(sig[b"l"]) != length:
            return judged("policy", "l= does not cover the whole body",
                          f"l={int(sig[b'l'])}, body {length} bytes", bits)  # fmt: skip
    return judged("pass", bits=bits)


# --- the header --------------------------------------------------------------------------


def authentication_results(authserv_id: str, signatures: list[Signature]) -> str:
    """``Authentication-Results`` (RFC 8601): one dkim= result per signature, folded."""
    parts = []
    for s in signatures:
        part = f"dkim={s.result}"
        if s.why:
            part += f' reason="{s.why}"'
        for prop, value in (("header.d", s.domain), ("header.s", s.selector),
                            ("header.a", s.algorithm)):  # fmt: skip
            if _TOKEN.fullmatch(value):
                part += f" {prop}={value}"
        parts.append(part)
    return f"Authentication-Results: {authserv_id};\n\t" + (";\n\t".join(parts) or "dkim=none")


# --- the check ---------------------------------------------------------------------------


def _prepare(
    header_block: bytes, listed: Loaded[WildMap], sender: str
) -> tuple[list[Required], list[Signature | _Todo], int]:
    """Blocking (a worker thread: a header section may be 1 MB, some 80 ms to parse): the
    required domains and the signatures to evaluate."""
    required = required_domains(listed, sender, from_domains(header_block))
    return required, *read_signatures(header_block, required)


async def _judge_signatures(
    services: Services, data: bytes, found: list[Signature | _Todo], deadline: float
) -> list[Signature]:
    """Keys looked up (concurrently, on the event loop), then verified in a worker thread."""
    done = [f for f in found if isinstance(f, Signature)]
    todo = [f for f in found if isinstance(f, _Todo)]
    names = sorted({t.key_name for t in todo})
    fetched = await asyncio.gather(*(fetch_key(services.resolver, n) for n in names))
    keys = dict(zip(names, fetched, strict=True))
    verified: list[Signature] = []
    if todo:
        loop = asyncio.get_running_loop()
        verified = await loop.run_in_executor(
            services.threads, verify_all, data, todo, keys, deadline
        )
    return sorted(done + verified, key=lambda s: s.index)


async def check(ctx: Context) -> Result:
    services = ctx.services
    if services is None:
        return Result(note="not run (no network)")
    settings = services.settings
    if not settings.dkim_enabled:
        return Result(note="DKIM checks are off (dkim_enabled = false)")
    trusted, why, source = trusted_client(ctx)
    if trusted is None:
        return Result(defer(NAME, why))
    if trusted:
        return Result(note=f"not checked: {why}", source=source)
    listed = ctx.snapshot.dkim_required
    if listed.data is None:
        return Result(defer(NAME, listed.problem))
    try:
        message = await load_message(ctx)
    except MessageError as e:
        return Result(defer(NAME, str(e)))
    started = time.monotonic()
    # The worker thread cannot be cancelled: it stops by itself at the same deadline.
    deadline = started + settings.dkim_timeout
    loop = asyncio.get_running_loop()
    required, found, left_out = await loop.run_in_executor(
        services.threads, _prepare, message.header_block(), listed, ctx.sender
    )
    try:
        signatures = await asyncio.wait_for(
            _judge_signatures(services, message.data, found, deadline),
            max(0.0, deadline - time.monotonic()),
        )
    except TimeoutError:
        note = f"DKIM verification timed out after {time.monotonic() - started:.1f} s"
        if required:
            return Result(defer(NAME, note, "DKIM verification could not be completed, try "
                                "later", TEMP_DNS), source=required[0].source)  # fmt: skip
        timed_out = Signature(-1, "", "", "", "temperror", "timed out")
        return Result(note=note, headers=(authentication_results(settings.hostname,
                                                                 [timed_out]),))  # fmt: skip
    return _conclude(settings.hostname, required, signatures, left_out)


def _conclude(
    authserv_id: str, required: list[Required], signatures: list[Signature], left_out: int
) -> Result:
    summary = "; ".join(s.describe() for s in signatures) or "unsigned"
    if left_out:
        summary += f"; {left_out} more signatures not evaluated"
    missing: list[Required] = []
    unsure: list[Required] = []
    for r in required:
        candidates = [s for s in signatures if aligned(s.domain, r.domain)]
        if any(s.valid for s in candidates):
            continue
        (unsure if any(s.result == "temperror" for s in candidates) else missing).append(r)
    wanted = ", ".join(f"{r.domain} ({r.role}, {r.source})" for r in required)
    note = f"DKIM required for {wanted}: {summary}" if required else f"DKIM: {summary}"
    if missing:
        r = missing[0]
        # Short: Exim wraps a reply longer than 75 characters onto several lines.
        return Result(Verdict(DKIM_REQUIRED, f"a valid DKIM signature of {r.domain} is "
                              "required", NAME, note, r.source),
                      source=r.source)  # fmt: skip
    if unsure:
        return Result(defer(NAME, note, "DKIM key lookup failed, try later", TEMP_DNS),
                      source=unsure[0].source)  # fmt: skip
    header = authentication_results(authserv_id, signatures)
    return Result(note=note, source=required[0].source if required else "", headers=(header,))
