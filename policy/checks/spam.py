"""Spam at DATA: the message through spamd (SpamAssassin), policy/scanners.py.

Skipped (no headers): authenticated submissions (our own users' mail), and messages over
``spam_max_size`` bytes (the seed's 400 KB: spam is small, and a large message would cost
spamd seconds). ``spamd_host = ""`` with no ``spamd_socket`` turns the check off.

Scanned, the message gets (the seed's headers):

* ``X-Spam-Scanned: yes (SpamAssassin on <our host>)``;
* ``X-Spam-Score: <score>``;
* ``X-Spam-Status: Yes|No, score=<score> required=<spam_flag_score>``;
* ``X-Spam-Flag: YES`` from ``spam_flag_score`` (3.5, the seed's threshold) on: Dovecot's
  shipped sieve script files it into the Spam mailbox;
* ``X-Spam-Report:`` spamd's rule list, at most ``spam_report_max`` characters, folded.

From ``spam_reject_score`` on (0 = never, the seed's default) the message is refused:
``550 5.7.1 message refused as spam (score N)``. spamd down, slow or answering garbage:
``spam_on_failure`` = ``"defer"`` (default: 451 4.3.0, the sender retries) or ``"accept"``
(the seed's spam check failed open) with ``X-Spam-Scanned: no (<why>)``.

The headers reach Exim through the daemon's accept (policy/protocol.py renders them: no CR, no
line break that is not a fold), and exim/configure removes any X-Spam-* and X-Virus-Scanned
fields the message arrived with, so only ours count.
"""

from __future__ import annotations

import re

from policy.checks import Context, Result, load_message
from policy.message import MessageError
from policy.scanners import spamd_check
from policy.verdict import SPAM_REJECTED, Verdict, defer

NAME = "spam"

_SPACES = re.compile(r"\s+")
# The line under the "pts rule name description" heading of spamd's report, above the rows.
_TABLE_RULE = re.compile(r"\s*-{3,} -{3,}")


def report_header(report: str, limit: int) -> str:
    """spamd's report as one X-Spam-Report field: its rule lines, folded at the line breaks,
    printable ASCII, at most ``limit`` characters of report.

    spamd's REPORT answer is SpamAssassin's body report template: a preamble ("... The original
    message has been attached ..." - it is not, report_safe 0 - with an unexpanded
    @@CONTACT_ADDRESS@@), a preview of the message's text, then the table of rules hit. Only the
    table's rows are kept (the whole answer if it has no table)."""
    raw = report.splitlines()
    for i, line in enumerate(raw):
        if _TABLE_RULE.match(line):
            raw = raw[i + 1 :]
            break
    lines = [_SPACES.sub(" ", line).strip() for line in raw]
    lines = [re.sub(r"[^\x20-\x7e]", "?", line) for line in lines if line]
    text, used = [], 0
    for line in lines:
        if used + len(line) > limit:
            text.append("[...]")
            break
        text.append(line)
        used += len(line)
    return "X-Spam-Report: " + ("\n\t".join(text) if text else "-")


async def check(ctx: Context) -> Result:
    services = ctx.services
    if services is None:
        return Result(note="not run (no scanner)")
    settings = services.settings
    if not settings.spamd_socket and not settings.spamd_host:
        return Result(note="spam scanning is off (no spamd_socket or spamd_host)")
    if ctx.auth:
        return Result(note=f"not scanned: authenticated user {ctx.auth!r}")
    if ctx.size > settings.spam_max_size:
        return Result(note=f"not scanned: {ctx.size} bytes is over spam_max_size "
                           f"({settings.spam_max_size})")  # fmt: skip
    try:
        message = await load_message(ctx)
    except MessageError as e:
        return Result(defer(NAME, str(e)))
    if len(message.data) > settings.spam_max_size:  # Exim's size may differ a little
        return Result(note=f"not scanned: over spam_max_size ({settings.spam_max_size})")
    result = await spamd_check(settings, message.data)
    if result.kind == "error":
        if settings.spam_on_failure == "accept":
            return Result(note=f"not scanned, accepted (spam_on_failure): {result.detail}",
                          headers=(f"X-Spam-Scanned: no ({result.detail})",))  # fmt: skip
        return Result(defer(NAME, result.detail, "spam scanner unavailable, try later"))
    score = result.score
    note = f"spamd score {score:.1f}"
    if settings.spam_reject_score > 0 and score >= settings.spam_reject_score:
        return Result(Verdict(SPAM_REJECTED, f"message refused as spam (score {score:.1f})",
                              NAME, f"{note} >= spam_reject_score "
                              f"{settings.spam_reject_score:g}"))  # fmt: skip
    flagged = score >= settings.spam_flag_score
    headers = [
        f"X-Spam-Scanned: yes (SpamAssassin on {settings.hostname})",
        f"X-Spam-Score: {score:.1f}",
        f"X-Spam-Status: {'Yes' if flagged else 'No'}, score={score:.1f} "
        f"required={settings.spam_flag_score:g}",
    ]
    if flagged:
        headers.append("X-Spam-Flag: YES")
    if settings.spam_report_max:
        headers.append(report_header(result.report, settings.spam_report_max))
    return Result(note=note + (" (flagged)" if flagged else ""), headers=tuple(headers))
