"""Content scanning at DATA through the real Exim 4.96 (exim/configure), the real daemon and a
real Dovecot 2.3: ClamAV (clamd) and SpamAssassin (spamd) from tests/scan_stack.py, over SMTP
from an outside client (127.0.0.2) to a local user, delivered over LMTP, read back over IMAP.

* viruses (EICAR as a plain and a base64 attachment, inside a ZIP, pasted into the text) are
  refused with 550 at the end of DATA naming the signature, and nothing is delivered;
* GTUBE is accepted, flagged (X-Spam-Flag: YES) and filed into Spam by Dovecot's shipped
  after-script; clean mail goes to the INBOX with our X-Spam-* and X-Virus-Scanned fields;
* scanner verdict fields that arrive with the message never survive (exim/configure removes
  them: a forged ``X-Spam-Flag: YES`` does not send ham to Spam, a forged ``NO`` does not save
  spam);
* a blocked attachment type is refused with 550 5.7.1;
* clamd or spamd down: 451 (the defaults, clamav_on_failure and spam_on_failure = "defer"), and
  the sender's retry is delivered once the scanner is back; spam_on_failure = "accept" takes the
  message marked ``X-Spam-Scanned: no (...)``;
* a message longer than clamd's StreamMaxLength: 451, never a silent pass;
* an authenticated submission is not spam-scanned, but is virus-scanned.

One clamd (StreamMaxLength 1M), one spamd, one Dovecot and one Exim per module (per xdist
worker); a test that stops a scanner or restarts the daemon puts it back before it ends.
"""

from __future__ import annotations

import email
import email.policy
import email.utils
import io
import re
import smtplib
import subprocess
import time
import uuid
import zipfile
from collections.abc import Iterator
from email.message import EmailMessage, Message
from pathlib import Path

import pytest

from policy import settings as settings_mod
from tests.dovecot_stack import DovecotStack, dovecot_stack, exim_for
from tests.exim_stack import EXIM, PRIMARY, Stack
from tests.scan_stack import EICAR, GTUBE, Clamd, Spamd

pytestmark = pytest.mark.integration

OUTSIDER = "127.0.0.2"  # not localhost, not in relay_from_hosts
SENDER = "someone@remote.example"
ALICE = "alice@example.org"
PASSWORDS = {"alice@example.org": "alice-secret", "bob@example.org": "bob-secret"}
VIRUS = re.compile(r"virus found: Test\.EICAR-(?:HDB|NDB)\.UNOFFICIAL")
STREAM_MAX = "1M"  # clamd's StreamMaxLength here; Exim's message_size_limit is 50M


@pytest.fixture(scope="module")
def clamd() -> Iterator[Clamd]:
    server = Clamd(stream_max=STREAM_MAX)
    with server:
        yield server


@pytest.fixture(scope="module")
def spamd() -> Iterator[Spamd]:
    server = Spamd()
    with server:
        yield server


def scan_config(clamd: Clamd, spamd: Spamd, **extra: object) -> dict[str, object]:
    """The daemon's settings over tests/offline.toml's: the scanners' sockets and the default
    blocked extensions (offline.toml has none); everything else (clamav_on_failure,
    spam_on_failure, spam_flag_score, spam_max_size ...) the defaults."""
    blocked = settings_mod.Settings().blocked_extensions
    return {"clamd_socket": str(clamd.socket), "spamd_socket": str(spamd.socket),
            "blocked_extensions": blocked, **extra}  # fmt: skip


@pytest.fixture(scope="module")
def stacks(clamd: Clamd, spamd: Spamd) -> Iterator[tuple[DovecotStack, Stack]]:
    with dovecot_stack(policy_config=scan_config(clamd, spamd)) as dv, exim_for(dv) as exim:
        yield dv, exim


# --- messages ----------------------------------------------------------------------------------


def marker() -> str:
    return f"s-{uuid.uuid4().hex[:12]}"


def mail(subject: str, body: str = "Hello Alice,\n\nsee you tomorrow at ten.\n\nBob\n",
         headers: dict[str, str] | None = None, rcpt: str = ALICE,
         sender: str = SENDER) -> EmailMessage:  # fmt: skip
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = rcpt
    msg["Subject"] = subject
    msg["Date"] = email.utils.formatdate(localtime=False)
    msg["Message-ID"] = f"<{subject}@client.example.net>"
    for name, value in (headers or {}).items():
        msg[name] = value
    msg.set_content(body)
    return msg


def eicar_mail(subject: str, how: str) -> bytes:
    msg = mail(subject, "The file you asked for.\n")
    if how == "attachment":  # as is: a 7bit text attachment
        msg.add_attachment(EICAR.decode(), filename="eicar.txt", cte="7bit")
    elif how == "base64":
        msg.add_attachment(EICAR, maintype="application", subtype="octet-stream",
                           filename="eicar.bin")  # fmt: skip
    elif how == "zip":
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            archive.writestr("docs/eicar.txt", EICAR)
        msg.add_attachment(buffer.getvalue(), maintype="application", subtype="zip",
                           filename="documents.zip")  # fmt: skip
    elif how == "text":  # pasted into the text body
        msg.set_content("Look at this:\n" + EICAR.decode() + "\nbye\n")
    else:
        raise ValueError(how)
    data = msg.as_bytes()
    assert how in ("base64", "zip") or EICAR in data
    assert how not in ("base64", "zip") or EICAR not in data  # encoded: no plain EICAR
    return data


def gtube_mail(subject: str, headers: dict[str, str] | None = None) -> bytes:
    body = f"Buy now!\n\n{GTUBE.decode()}\n"
    return mail(subject, body, headers).as_bytes()


# --- SMTP ----------------------------------------------------------------------------------------


def send(exim: Stack, data: bytes, rcpt: str = ALICE, sender: str = SENDER) -> tuple[int, str]:
    """One transaction from the outside client: the reply to the end of DATA."""
    with exim.smtp(OUTSIDER) as client:
        return transact(client, data, rcpt, sender)


def transact(client: smtplib.SMTP, data: bytes, rcpt: str, sender: str) -> tuple[int, str]:
    code, text = client.mail(sender)
    assert code == 250, (code, text)
    code, text = client.rcpt(rcpt)
    assert code == 250, (code, text)
    code, text = client.data(data)
    return code, text.decode(errors="replace")


def tls_client(exim: Stack) -> smtplib.SMTP:
    client = exim.smtp(OUTSIDER, exim.submission_port)
    client._host = PRIMARY  # type: ignore[attr-defined]  # smtplib sends it as SNI
    client.starttls(context=DovecotStack.client_context())
    client.ehlo("client.example.net")
    return client


# --- reading mail back ------------------------------------------------------------------------


def fetch(dv: DovecotStack, user: str, subject: str, timeout: float = 20) -> tuple[str, Message]:
    """(mailbox, message) of the one message with ``subject`` in ``user``'s mailboxes, over
    IMAPS; waits for the delivery (Exim delivers right after accepting, over LMTP)."""
    deadline = time.monotonic() + timeout
    while True:
        found = imap_search(dv, user, subject)
        if found or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert len(found) == 1, (subject, [box for box, _ in found])
    box, raw = found[0]
    return box, email.message_from_bytes(raw, policy=email.policy.compat32)


def imap_search(dv: DovecotStack, user: str, subject: str) -> list[tuple[str, bytes]]:
    client = dv.imaps()
    try:
        client.login(user, PASSWORDS[user])
        typ, boxes = client.list()
        assert typ == "OK"
        found = []
        for line in boxes:
            assert isinstance(line, bytes)
            name = line.decode().rsplit(" ", 1)[1].strip('"')
            client.select(f'"{name}"', readonly=True)
            typ, data = client.search(None, "SUBJECT", f'"{subject}"')
            for num in data[0].split():
                typ, parts = client.fetch(num, "(BODY.PEEK[])")
                assert typ == "OK" and isinstance(parts[0], tuple)
                found.append((name, parts[0][1]))
        return found
    finally:
        client.logout()


def on_disk(dv: DovecotStack, mark: str) -> list[Path]:
    """Every file under the mailboxes (all users, all folders) that holds ``mark``."""
    domains = dv.root / "domains"
    return [p for p in domains.rglob("*") if p.is_file() and mark.encode() in p.read_bytes()]


def not_delivered(dv: DovecotStack, exim: Stack, mark: str) -> None:
    """Refused at DATA: nothing queued, nothing in any mailbox (a delivery, had Exim accepted,
    takes a fraction of a second: give it one)."""
    time.sleep(0.5)
    assert on_disk(dv, mark) == []
    assert mark not in queue(exim)


def queue(exim: Stack) -> str:
    """Exim's queue and the headers of every message on it."""
    listing = subprocess.run([EXIM, "-C", str(exim.conf), "-bp"], capture_output=True, text=True)
    ids = re.findall(r"\b[0-9A-Za-z]{6}-[0-9A-Za-z]{6}-[0-9A-Za-z]{2,4}\b", listing.stdout)
    texts = []
    for exim_id in ids:
        shown = subprocess.run([EXIM, "-C", str(exim.conf), "-Mvh", exim_id],
                               capture_output=True, text=True)  # fmt: skip
        texts.append(shown.stdout)
    return listing.stdout + "".join(texts)


def policy_log(dv: DovecotStack, needle: str, timeout: float = 5) -> str:
    """The daemon's log once it holds ``needle`` (it writes every 0.2 s)."""
    deadline = time.monotonic() + timeout
    while needle not in dv.policy_log() and time.monotonic() < deadline:
        time.sleep(0.05)
    return dv.policy_log()


def fields(msg: Message, name: str) -> list[str]:
    """The values of every ``name`` field of ``msg``, in order."""
    return [str(v) for v in msg.get_all(name) or []]


def spam_score(msg: Message) -> float:
    (value,) = fields(msg, "X-Spam-Score")
    return float(value)


def scanned_clean(msg: Message) -> None:
    """Our headers on a clean message: virus-scanned, spam-scanned, not flagged."""
    assert msg.get_all("X-Virus-Scanned") == [f"ClamAV on {PRIMARY}"]
    assert msg.get_all("X-Spam-Scanned") == [f"yes (SpamAssassin on {PRIMARY})"]
    assert spam_score(msg) < 3.5
    (status,) = fields(msg, "X-Spam-Status")
    assert re.fullmatch(r"No, score=-?\d+\.\d required=3\.5", status), status
    assert msg.get_all("X-Spam-Flag") is None


# --- viruses -----------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["attachment", "base64", "zip", "text"])
def test_virus_is_refused_at_data_naming_it(stacks: tuple[DovecotStack, Stack], how: str) -> None:
    dv, exim = stacks
    mark = marker()
    rejected = re.compile(r"rejected after DATA: 550 5\.7\.0 virus found: Test\.EICAR-")
    before = len(rejected.findall(exim.mainlog()))
    code, text = send(exim, eicar_mail(mark, how))
    assert code == 550, (code, text)
    assert text.startswith("5.7.0 virus found: Test.EICAR-"), text
    assert VIRUS.search(text), text
    not_delivered(dv, exim, mark)
    assert len(rejected.findall(exim.mainlog())) == before + 1


# --- spam ----------------------------------------------------------------------------------------


def test_gtube_is_accepted_flagged_and_filed_into_spam(stacks: tuple[DovecotStack, Stack]) -> None:
    dv, exim = stacks
    mark = marker()
    code, text = send(exim, gtube_mail(mark))
    assert code == 250, (code, text)
    box, msg = fetch(dv, ALICE, mark)
    assert box == "Spam"
    assert msg.get_all("X-Spam-Flag") == ["YES"]
    assert spam_score(msg) >= 900  # GTUBE: 1000, minus what Exim's path changes (RECIPES 7)
    (status,) = fields(msg, "X-Spam-Status")
    assert status.startswith("Yes, score=") and status.endswith(" required=3.5"), status
    assert msg.get_all("X-Spam-Scanned") == [f"yes (SpamAssassin on {PRIMARY})"]
    # The rules hit, and only them (not spamd's report preamble with its @@CONTACT_ADDRESS@@).
    (report,) = fields(msg, "X-Spam-Report")
    assert re.search(r"^\s*1000 GTUBE BODY: ", report, re.M), report
    assert "@@" not in report and "attached" not in report, report
    assert msg.get_all("X-Virus-Scanned") == [f"ClamAV on {PRIMARY}"]


def test_clean_mail_goes_to_the_inbox_with_our_headers(stacks: tuple[DovecotStack, Stack]) -> None:
    dv, exim = stacks
    mark = marker()
    code, text = send(exim, mail(mark).as_bytes())
    assert code == 250, (code, text)
    box, msg = fetch(dv, ALICE, mark)
    assert box == "INBOX"
    scanned_clean(msg)


def test_forged_spam_flag_yes_on_clean_mail_is_removed(stacks: tuple[DovecotStack, Stack]) -> None:
    """Dovecot's after-script files on ``X-Spam-Flag: YES``: a sender who sets it himself must
    not put ham into Spam (nor claim it was virus-scanned)."""
    dv, exim = stacks
    mark = marker()
    forged = {"X-Spam-Flag": "YES", "X-Spam-Status": "Yes, score=50.0 required=3.5",
              "X-Spam-Score": "50.0", "X-Virus-Scanned": "by the sender, honestly",
              "X-Spam-Report": "forged"}  # fmt: skip
    data = mail(mark, headers=forged).as_bytes()
    assert b"X-Spam-Flag: YES" in data
    assert send(exim, data)[0] == 250
    box, msg = fetch(dv, ALICE, mark)
    assert box == "INBOX"
    scanned_clean(msg)  # exactly our fields: no X-Spam-Flag at all, one of each of the others
    assert msg.get_all("X-Spam-Report") != ["forged"]


def test_forged_spam_flag_no_on_gtube_does_not_survive(stacks: tuple[DovecotStack, Stack]) -> None:
    dv, exim = stacks
    mark = marker()
    forged = {"X-Spam-Flag": "NO", "X-Spam-Score": "-100",
              "X-Spam-Status": "No, score=-100.0 required=3.5",
              "X-Spam-Scanned": "yes (SpamAssassin on somewhere.else)"}  # fmt: skip
    assert send(exim, gtube_mail(mark, forged))[0] == 250
    box, msg = fetch(dv, ALICE, mark)
    assert box == "Spam"
    assert msg.get_all("X-Spam-Flag") == ["YES"]
    assert spam_score(msg) >= 900  # one X-Spam-Score, ours (spam_score unpacks exactly one)
    (status,) = fields(msg, "X-Spam-Status")
    assert status.startswith("Yes, ")
    assert msg.get_all("X-Spam-Scanned") == [f"yes (SpamAssassin on {PRIMARY})"]


# --- blocked attachments -----------------------------------------------------------------------


def test_blocked_attachment_is_refused_naming_it(stacks: tuple[DovecotStack, Stack]) -> None:
    dv, exim = stacks
    mark = marker()
    msg = mail(mark, "The invoice.\n")
    msg.add_attachment(b"MZ\x90\x00not really a program", maintype="application",
                       subtype="octet-stream", filename="invoice.pdf.exe")  # fmt: skip
    code, text = send(exim, msg.as_bytes())
    assert code == 550, (code, text)
    assert text == "5.7.1 attachments of this type are not accepted: invoice.pdf.exe", text
    not_delivered(dv, exim, mark)


# --- scanners down -----------------------------------------------------------------------------


def test_clamd_down_defers_and_the_retry_is_delivered(
    stacks: tuple[DovecotStack, Stack], clamd: Clamd
) -> None:
    """clamav_on_failure = "defer" (the default): 451 at the end of DATA, the sender keeps the
    message; its retry (the same message, a new connection) is delivered once clamd is back,
    exactly once."""
    dv, exim = stacks
    mark = marker()
    data = mail(mark).as_bytes()
    deferred = re.compile(r'verdict="DEFER 451 4\.3\.0" check=virus reason="[^"]*clamd socket ')
    before = len(deferred.findall(dv.policy_log()))
    clamd.stop()
    try:
        code, text = send(exim, data)
    finally:
        clamd.start()
    assert code == 451, (code, text)
    assert text == "4.3.0 virus scanner unavailable, try later", text
    deadline = time.monotonic() + 5  # the daemon writes its log every 0.2 s
    while len(deferred.findall(dv.policy_log())) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(deferred.findall(dv.policy_log())) == before + 1, dv.policy_log()[-2000:]
    not_delivered(dv, exim, mark)
    code, text = send(exim, data)  # the sender's MTA retries
    assert code == 250, (code, text)
    box, msg = fetch(dv, ALICE, mark)  # exactly one copy
    assert box == "INBOX"
    scanned_clean(msg)


def test_spamd_down_defers_by_default_and_accepts_marked_when_configured(
    stacks: tuple[DovecotStack, Stack], clamd: Clamd, spamd: Spamd
) -> None:
    dv, exim = stacks
    first, second = marker(), marker()
    spamd.stop()
    try:
        # spam_on_failure = "defer" (the default).
        code, text = send(exim, mail(first).as_bytes())
        assert code == 451, (code, text)
        assert text == "4.3.0 spam scanner unavailable, try later", text
        not_delivered(dv, exim, first)
        # spam_on_failure = "accept": taken, and says it was not scanned.
        dv.restart_policy(scan_config(clamd, spamd, spam_on_failure="accept"))
        try:
            code, text = send(exim, mail(second).as_bytes())
        finally:
            dv.restart_policy(scan_config(clamd, spamd))
    finally:
        spamd.start()
    assert code == 250, (code, text)
    box, msg = fetch(dv, ALICE, second)
    assert box == "INBOX"
    (scanned,) = fields(msg, "X-Spam-Scanned")
    # What went wrong: spamd's socket and why (here: gone, the stopped spamd removed it).
    assert re.fullmatch(rf"no \(spamd {re.escape(str(spamd.socket))}: \w+: .*\S.*\)", scanned), (
        scanned
    )
    assert msg.get_all("X-Spam-Flag") is None and msg.get_all("X-Spam-Score") is None
    assert msg.get_all("X-Virus-Scanned") == [f"ClamAV on {PRIMARY}"]
    # spamd back, the default again: the sender's retry of the first message is scanned.
    assert send(exim, mail(first).as_bytes())[0] == 250
    scanned_clean(fetch(dv, ALICE, first)[1])


def test_message_over_clamds_stream_limit_is_deferred_never_passed(
    stacks: tuple[DovecotStack, Stack], clamd: Clamd
) -> None:
    """clamd takes at most StreamMaxLength (1M here) per scan; a longer message cannot be
    scanned: 451 (clamav_on_failure = "defer"), and the daemon's log says why."""
    dv, exim = stacks
    mark = marker()
    line = "All work and no play makes Jack a dull boy. " * 2 + "\n"
    msg = mail(mark, line * (1_500_000 // len(line)))  # ~1.5 MB: too big for spamd anyway
    data = msg.as_bytes()
    assert 1_400_000 < len(data) < 50_000_000
    started = time.monotonic()
    code, text = send(exim, data)
    assert code == 451, (code, text)
    assert text == "4.3.0 virus scanner unavailable, try later", text
    assert time.monotonic() - started < 20  # clamd's answer, not a timeout
    log = policy_log(dv, "INSTREAM size limit exceeded")
    decisions = [ln for ln in log.splitlines() if "stage=DATA" in ln and "check=virus" in ln]
    assert any("INSTREAM size limit exceeded" in ln for ln in decisions), log[-2000:]
    assert "451 4.3.0" in exim.mainlog()
    not_delivered(dv, exim, mark)


# --- authenticated submission ------------------------------------------------------------------


def test_authenticated_submission_is_not_spam_scanned(stacks: tuple[DovecotStack, Stack]) -> None:
    """Our own users' mail (AUTH over TLS on 587): no spamd, no X-Spam-* fields, even for
    GTUBE; still virus-scanned."""
    dv, exim = stacks
    mark = marker()
    data = gtube_mail(mark)
    with tls_client(exim) as client:
        client.login(ALICE, PASSWORDS[ALICE])
        code, text = transact(client, data, "bob@example.org", ALICE)
    assert code == 250, (code, text)
    box, msg = fetch(dv, "bob@example.org", mark)
    assert box == "INBOX"
    assert [k for k in msg if k.lower().startswith("x-spam-")] == []
    assert msg.get_all("X-Virus-Scanned") == [f"ClamAV on {PRIMARY}"]
    assert "authenticated user" in policy_log(dv, "not scanned: authenticated user")


def test_virus_from_an_authenticated_user_is_refused(stacks: tuple[DovecotStack, Stack]) -> None:
    dv, exim = stacks
    mark = marker()
    with tls_client(exim) as client:
        client.login(ALICE, PASSWORDS[ALICE])
        code, text = transact(client, eicar_mail(mark, "base64"), "bob@example.org", ALICE)
    assert code == 550, (code, text)
    assert VIRUS.search(text), text
    not_delivered(dv, exim, mark)
