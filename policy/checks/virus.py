"""Viruses at DATA: the whole message through clamd (ClamAV), policy/scanners.py.

| clamd says | verdict |
|---|---|
| ``stream: OK`` | accept, ``X-Virus-Scanned: ClamAV on <our host>`` |
| ``<signature> FOUND`` | ``550 5.7.0 virus found: <signature>`` |
| anything else | ``clamav_on_failure`` |

Anything else: no socket, no answer within ``clamd_timeout``, ``INSTREAM size limit exceeded``
(a message over clamd's StreamMaxLength), any ERROR. ``clamav_on_failure = "defer"`` (the
default, the seed's virus check) answers 451 4.3.0 and the sender retries; ``"accept"`` takes
the message with ``X-Virus-Scanned: no (<why>)``.

A message too large for clamd is therefore never passed as clean without saying so: it is
deferred, or (fail-open chosen by the admin) marked unscanned. Every message is scanned,
authenticated submissions too: a user's infected machine must not send viruses through us.
``clamd_socket = ""`` turns the check off.
"""

from __future__ import annotations

from policy.checks import Context, Result, load_message
from policy.message import MessageError
from policy.scanners import clamd_scan
from policy.verdict import VIRUS_FOUND, Verdict, defer

NAME = "virus"


async def check(ctx: Context) -> Result:
    services = ctx.services
    if services is None:
        return Result(note="not run (no scanner)")
    settings = services.settings
    if not settings.clamd_socket:
        return Result(note='virus scanning is off (clamd_socket = "")')
    try:
        message = await load_message(ctx)
    except MessageError as e:
        return Result(defer(NAME, str(e)))
    result = await clamd_scan(settings.clamd_socket, message.data, settings.clamd_timeout)
    if result.kind == "clean":
        return Result(
            note="clamd: clean", headers=(f"X-Virus-Scanned: ClamAV on {settings.hostname}",)
        )
    if result.kind == "virus":
        return Result(Verdict(VIRUS_FOUND, f"virus found: {result.detail}", NAME,
                              f"clamd: {result.detail} FOUND"))  # fmt: skip
    if settings.clamav_on_failure == "accept":
        return Result(note=f"not scanned, accepted (clamav_on_failure): {result.detail}",
                      headers=(f"X-Virus-Scanned: no ({result.detail})",))  # fmt: skip
    return Result(defer(NAME, result.detail, "virus scanner unavailable, try later"))
