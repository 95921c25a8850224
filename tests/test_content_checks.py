"""The content checks at DATA (policy/checks/attachments.py, virus.py, spam.py; their docstrings
are the contracts) with the message where Exim leaves it (<root>/exim/spool/scan/<id>/<id>.eml,
read by load_message), against the real clamd and spamd of tests/scan_stack.py; the headers they
add as the protocol renders them; and the DATA stage through the real daemon.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import email
import email.policy
from collections.abc import Callable, Coroutine, Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from policy import protocol
from policy import settings as settings_mod
from policy.aliases import Limits
from policy.checks import Context, Result, attachments, spam, virus
from policy.checks.spam import report_header
from policy.mailtree import Snapshot, TreeLoader
from policy.protocol import encode_request
from policy.services import Services
from policy.settings import Settings
from tests.conftest import EXAMPLE, OFFLINE, PRIMARY_HOSTNAME, Daemon
from tests.scan_stack import EICAR, EICAR_NDB, GTUBE, Clamd, Spamd
from tests.test_scanners import message as scanners_message
from tests.test_scanners import zipped

pytestmark = pytest.mark.integration

EXIM_ID = "1tAbCd-000XyZ-12"
CLIENT_IP = "203.0.113.5"
SENDER = "bob@example.net"
EICAR_NAMES = (EICAR_NDB, "Test.EICAR-HDB.UNOFFICIAL")
OUR_HEADERS = frozenset({"X-Spam-Scanned", "X-Spam-Score", "X-Spam-Status", "X-Spam-Flag",
                         "X-Spam-Report", "X-Virus-Scanned"})  # fmt: skip
Check = Callable[[Context], Coroutine[Any, Any, Result]]


# --- messages and the spool file ----------------------------------------------------------------


def message(body: str = "Hi Alice,\n\nShall we have lunch on Friday at noon?\n\nBob\n",
            attachments: tuple[tuple[str, str, bytes], ...] = ()) -> bytes:  # fmt: skip
    """tests/test_scanners.py's realistic message, with the Received line of this client."""
    received = (
        f"from client.example.net (client.example.net [{CLIENT_IP}]) by mail.example.org with "
        f"esmtps (TLS1.3) (Exim 4.96) (envelope-from <{SENDER}>) id {EXIM_ID} for "
        "alice@example.org; Tue, 01 Dec 2026 10:00:00 +0000"
    )
    return scanners_message(body, attachments, received)


def raw_mime(*parts: str) -> bytes:
    """A multipart/mixed message from hand-written parts (headers, blank line, body), for
    header syntax EmailMessage would not write."""
    head = (f"From: Bob Smith <{SENDER}>\nTo: alice@example.org\nSubject: files\n"
            "Date: Tue, 01 Dec 2026 09:59:58 +0000\nMessage-ID: <m.4711@client.example.net>\n"
            'MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="=-b-="\n\n'
            "--=-b-=\nContent-Type: text/plain\n\nsee the attachment\n")  # fmt: skip
    text = head + "".join(f"--=-b-=\n{part}\n" for part in parts) + "--=-b-=--\n"
    return text.replace("\n", "\r\n").encode("utf-8")


def part(headers: str, content: bytes = b"MZ\x90\x00 not really a program") -> str:
    """A base64 part with the given Content-Type/-Disposition lines."""
    b64 = base64.encodebytes(content).decode("ascii")
    return f"{headers}\nContent-Transfer-Encoding: base64\n\n{b64}"


def spool(root: Path, data: bytes, exim_id: str = EXIM_ID) -> Path:
    """``data`` (CRLF) as Exim writes its scan file: the mbox ``From `` line, the envelope
    headers (a folded X-Envelope-To), LF line endings."""
    path = root / "exim" / "spool" / "scan" / exim_id / f"{exim_id}.eml"
    path.parent.mkdir(parents=True, exist_ok=True)
    envelope = (f"From MAILER-DAEMON Tue Dec 01 10:00:00 2026\nX-Envelope-From: <{SENDER}>\n"
                "X-Envelope-To: alice@example.org,\n  carol@example.org\n")  # fmt: skip
    path.write_bytes(envelope.encode() + data.replace(b"\r\n", b"\n"))
    return path


# --- running a check ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def snapshot() -> Snapshot:
    return TreeLoader(str(EXAMPLE), PRIMARY_HOSTNAME).refresh()[0]


class Env:
    """One test's mail root (the spool file goes there) and the daemon's settings: the
    offline ones (tests/offline.toml: no clamd, no spamd, no blocked extensions), the default
    blocked_extensions back, plus the test's overrides."""

    def __init__(self, root: Path, snapshot: Snapshot) -> None:
        self.root = root
        self.snapshot = snapshot

    def settings(self, **overrides: object) -> Settings:
        values: dict[str, object] = {
            "root": str(self.root), "primary_hostname": PRIMARY_HOSTNAME,
            "blocked_extensions": Settings.blocked_extensions,
            "clamd_timeout": 20.0, "spamd_timeout": 20.0}  # fmt: skip
        values.update(overrides)
        return settings_mod.load(str(OFFLINE), values)

    def run(self, check: Check, data: bytes | None, *, auth: str = "", size: int | None = None,
            exim_id: str = EXIM_ID, **overrides: object) -> Result:  # fmt: skip
        """``check`` on ``data`` written to the spool (None: no file there)."""
        if data is not None:
            spool(self.root, data, exim_id)
        services = Services.create(self.settings(**overrides))
        try:
            ctx = Context("DATA", CLIENT_IP, SENDER, "", "client.example.net", auth,
                          self.snapshot, Limits(), message_id=exim_id,
                          size=len(data or b"") if size is None else size, rcpt_count=2,
                          services=services)  # fmt: skip
            return asyncio.run(check(ctx))
        finally:
            services.close()


@pytest.fixture
def env(tmp_path: Path, snapshot: Snapshot) -> Env:
    return Env(tmp_path, snapshot)


def code(result: Result) -> str:
    if result.verdict is None:
        return "250"
    return f"{result.verdict.status.code} {result.verdict.status.enhanced}"


def text(result: Result) -> str:
    assert result.verdict is not None
    return result.verdict.text


def header(result: Result, name: str) -> str | None:
    """The value of our header ``name`` (folds kept), None if the result has none."""
    found = [h.split(":", 1)[1].strip() for h in result.headers if h.split(":", 1)[0] == name]
    assert len(found) <= 1, result.headers
    return found[0] if found else None


def rendered_lines(headers: tuple[str, ...] | list[str]) -> list[str]:
    """What Exim gets from an accept: the base64 field decoded, split into lines."""
    decoded = base64.b64decode(protocol.render_headers(headers), validate=True).decode("ascii")
    assert "\r" not in decoded
    return decoded.split("\n")


def assert_only_our_fields(headers: tuple[str, ...] | list[str]) -> None:
    """Every rendered line starts one of our fields or continues one (TAB or space): a peer's
    text inside a value never starts a field of its own."""
    lines = rendered_lines(headers)
    starts = [line.split(":", 1)[0] for line in lines if line[:1] not in (" ", "\t")]
    assert starts == [h.split(":", 1)[0] for h in headers], lines
    assert set(starts) <= OUR_HEADERS
    assert all(" " <= c <= "~" or c == "\t" for line in lines for c in line)


# --- attachments -------------------------------------------------------------------------------

DEFAULT_EXTENSIONS = (".exe", ".pif", ".bat", ".scr", ".lnk", ".com", ".js", ".docm")


def refused_attachment(result: Result, shown: str) -> None:
    assert code(result) == "550 5.7.1", result
    assert text(result) == f"attachments of this type are not accepted: {shown}"
    assert result.verdict is not None and result.verdict.check == "attachments"


def test_default_list_is_the_documented_one() -> None:
    assert tuple(settings_mod.load("/dev/null").blocked_extensions.split()) == DEFAULT_EXTENSIONS


@pytest.mark.parametrize("ext", DEFAULT_EXTENSIONS)
def test_each_default_extension_is_refused(env: Env, ext: str) -> None:
    data = message(attachments=(("report" + ext, "application/octet-stream", b"payload"),))
    result = env.run(attachments.check, data)
    refused_attachment(result, "report" + ext)
    assert result.verdict is not None and "(attachment)" in result.verdict.reason


@pytest.mark.parametrize(
    ("headers", "shown"),
    [
        ('Content-Type: application/octet-stream\nContent-Disposition: attachment; '
         'filename="INVOICE.EXE"', "INVOICE.EXE"),
        ('Content-Type: application/octet-stream\nContent-Disposition: attachment; '
         'filename="Setup.Exe"', "Setup.Exe"),
        ('Content-Type: application/octet-stream\nContent-Disposition: attachment; '
         'filename="x.exe."', "x.exe."),
        ('Content-Type: application/octet-stream\nContent-Disposition: attachment; '
         'filename="a.exe "', "a.exe"),
        ('Content-Type: application/octet-stream\nContent-Disposition: attachment; '
         'filename="a.js. . ."', "a.js. . ."),
        ('Content-Type: application/pdf\nContent-Disposition: attachment; '
         'filename="invoice.pdf.exe"', "invoice.pdf.exe"),
        ('Content-Type: image/gif\nContent-Disposition: inline; filename="pic.scr"', "pic.scr"),
        # No Content-Disposition: the name of Content-Type only.
        ('Content-Type: application/octet-stream; name="run.bat"', "run.bat"),
        # RFC 2231: percent-encoded, continued, and in Content-Type's name*.
        ("Content-Type: application/octet-stream\nContent-Disposition: attachment; "
         "filename*=UTF-8''invoice%2Eexe", "invoice.exe"),
        ("Content-Type: application/octet-stream\nContent-Disposition: attachment;\n"
         '\tfilename*0="quarterly report.pd";\n\tfilename*1="f.e";\n\tfilename*2="xe"',
         "quarterly report.pdf.exe"),
        ("Content-Type: application/octet-stream; name*=UTF-8''na%C3%AFve%2Ejs",
         "na?ve.js"),
        # RFC 2047 encoded words in the parameter (Outlook and Gmail send them, every mail
        # program shows "invoice.exe").
        ('Content-Type: application/octet-stream\nContent-Disposition: attachment; '
         'filename="=?UTF-8?B?aW52b2ljZS5leGU=?="', "invoice.exe"),
        ('Content-Type: application/octet-stream; name="=?utf-8?Q?shortcut=2Elnk?="',
         "shortcut.lnk"),
        # A folded header.
        ("Content-Type: application/octet-stream\nContent-Disposition: attachment;\n"
         '\tfilename="long name.com"', "long name.com"),
    ],
    ids=["upper", "mixed-case", "trailing-dot", "trailing-space", "dots-and-spaces",
         "double-extension", "inline", "content-type-name", "rfc2231", "rfc2231-continued",
         "rfc2231-name", "rfc2047-b", "rfc2047-q", "folded"],
)  # fmt: skip
def test_blocked_names_however_written(env: Env, headers: str, shown: str) -> None:
    result = env.run(attachments.check, raw_mime(part(headers)))
    assert code(result) == "550 5.7.1", result
    # The name as the mail program shows it (trailing blanks of a quoted name aside).
    assert text(result).startswith("attachments of this type are not accepted: ")
    assert text(result).removeprefix("attachments of this type are not accepted: ") in (
        shown,
        shown.rstrip(),
    )


@pytest.mark.parametrize(
    ("members", "shown"),
    [
        ({"readme.txt": b"hi", "invoice.pdf.exe": b"MZ"}, "invoice.pdf.exe"),
        ({"a/b/Setup.EXE": b"MZ"}, "Setup.EXE"),  # in a subdirectory of the archive
        ({"docs/": b"", "docs/macro.docm": b"PK"}, "macro.docm"),
    ],
    ids=["top", "subdirectory", "after-a-directory-entry"],
)
def test_blocked_names_inside_a_zip(env: Env, members: dict[str, bytes], shown: str) -> None:
    data = message(attachments=(("documents.zip", "application/zip", zipped(members)),))
    result = env.run(attachments.check, data)
    refused_attachment(result, shown)
    assert result.verdict is not None and "inside documents.zip" in result.verdict.reason


@pytest.mark.parametrize(
    ("name", "mime"),
    [("data.bin", "application/zip"), ("data.bin", "application/x-zip-compressed"),
     ("Archive.ZIP", "application/octet-stream")],
)  # fmt: skip
def test_a_zip_is_known_by_its_type_or_its_name(env: Env, name: str, mime: str) -> None:
    data = message(attachments=((name, mime, zipped({"run.exe": b"MZ"})),))
    refused_attachment(env.run(attachments.check, data), "run.exe")


@pytest.mark.parametrize(
    "attachment",
    [
        ("report.pdf", "application/pdf", b"%PDF-1.4"),
        ("budget.xlsx", "application/octet-stream", b"PK"),
        ("my.exe.pdf", "application/pdf", b"%PDF-1.4"),  # .exe not at the end
        ("docm_notes.txt", "text/plain", b"notes"),
        ("examples.zip", "application/zip", zipped({"a.txt": b"a", "b/c.pdf": b"%PDF"})),
        # Documented: one level deep; a ZIP inside the ZIP is left to ClamAV.
        ("outer.zip", "application/zip", zipped({"inner.zip": zipped({"evil.exe": b"MZ"})})),
        # Documented: a ZIP that cannot be read is not refused for that.
        ("broken.zip", "application/zip", b"PK\x03\x04 this is not really a zip archive"),
        ("cut.zip", "application/zip", zipped({"evil.exe": b"MZ" * 100})[:-30]),
    ],
    ids=["pdf", "xlsx", "exe-in-the-middle", "docm-in-the-middle", "zip-of-harmless",
         "nested-zip", "broken-zip", "truncated-zip"],
)  # fmt: skip
def test_allowed(env: Env, attachment: tuple[str, str, bytes]) -> None:
    result = env.run(attachments.check, message(attachments=(attachment,)))
    assert code(result) == "250", result
    assert result.headers == ()


def test_names_in_the_text_are_not_attachments(env: Env) -> None:
    data = message("Run setup.exe from the share, then open invoice.js.\n")
    assert code(env.run(attachments.check, data)) == "250"


def test_forwarded_message_with_a_blocked_attachment(env: Env) -> None:
    inner = email.message_from_bytes(
        message(attachments=(("setup.exe", "application/octet-stream", b"MZ"),)),
        policy=email.policy.default,
    )
    m = EmailMessage()
    m["From"] = f"Bob <{SENDER}>"
    m["To"] = "alice@example.org"
    m["Subject"] = "Fwd: setup"
    m.set_content("forwarded\n")
    m.add_attachment(inner)  # message/rfc822, the inner message as it is (7bit)
    data = m.as_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    refused_attachment(env.run(attachments.check, data), "setup.exe")


def test_a_disguised_name_in_either_header_is_refused(env: Env) -> None:
    """Content-Disposition says one name, Content-Type another: a mail program may show
    either, so both are checked."""
    data = raw_mime(part('Content-Type: application/octet-stream; name="setup.exe"\n'
                         'Content-Disposition: attachment; filename="invoice.pdf"'))  # fmt: skip
    refused_attachment(env.run(attachments.check, data), "setup.exe")


def test_too_many_parts_to_check_is_refused(env: Env) -> None:
    """An .exe behind more parts than the check looks at is not passed unchecked."""
    padding = [part('Content-Type: text/plain; name="note.txt"', b"x")] * attachments.MAX_PARTS
    data = raw_mime(*padding, part('Content-Type: application/octet-stream; name="late.exe"'))
    result = env.run(attachments.check, data)
    assert code(result) == "550 5.7.1" and "too many MIME parts" in text(result)
    # Within the limit, a long but ordinary message passes.
    assert code(env.run(attachments.check, raw_mime(*padding[:50]))) == "250"


def test_off_when_the_list_is_empty(env: Env) -> None:
    data = message(attachments=(("setup.exe", "application/octet-stream", b"MZ"),))
    result = env.run(attachments.check, data, blocked_extensions="")
    assert code(result) == "250" and result.note == "no blocked extensions"


def test_custom_list(env: Env) -> None:
    custom = ".pdf .XyZ"
    pdf = message(attachments=(("report.pdf", "application/pdf", b"%PDF"),))
    refused_attachment(env.run(attachments.check, pdf, blocked_extensions=custom), "report.pdf")
    xyz = message(attachments=(("data.xyz", "application/octet-stream", b"x"),))
    refused_attachment(env.run(attachments.check, xyz, blocked_extensions=custom), "data.xyz")
    exe = message(attachments=(("setup.exe", "application/octet-stream", b"MZ"),))
    assert (
        code(env.run(attachments.check, exe, blocked_extensions=custom)) == "250"
    )  # not in this list


def test_hostile_name_is_shown_printable_and_bounded(env: Env) -> None:
    # RFC 2231 lets a sender put any byte in a name: ESC, CR LF, a fake SMTP reply, 2000 bytes.
    name = "%1B[31m%0D%0A250 ok%0D%0AX-Injected: yes%00" + "A" * 2000 + "%E2%80%AE.exe"
    data = raw_mime(part("Content-Type: application/octet-stream\nContent-Disposition: "
                         f"attachment; filename*=UTF-8''{name}"))  # fmt: skip
    result = env.run(attachments.check, data)
    assert code(result) == "550 5.7.1"
    shown = text(result).removeprefix("attachments of this type are not accepted: ")
    assert shown.startswith("?[31m??250 ok??X-Injected: yes?AAA") and len(shown) == 80
    assert all(" " <= c <= "~" for c in text(result))
    assert result.verdict is not None
    assert all(" " <= c <= "~" for c in result.verdict.reason) and len(result.verdict.reason) < 200
    reply = protocol.render_verdict(result.verdict)
    assert reply.count(b"\n") == 1 and reply.endswith(b"\n") and len(reply) < 200
    assert reply.startswith(b"DENY 550 5.7.1 attachments of this type are not accepted: ")


@pytest.mark.parametrize(
    "headers",
    [
        "Content-Type: application/octet-stream\nContent-Disposition: attachment; "
        "filename*=bogus-charset''evil%2Eexe",
        "Content-Type: application/octet-stream\nContent-Disposition: attachment; "
        "filename*=UTF-8''%ZZ%2",
        "Content-Type: application/octet-stream\nContent-Disposition: attachment; "
        'filename="=?UTF-8?B?!!!?="',
        "Content-Type: application/octet-stream\nContent-Disposition: attachment; filename=",
        'Content-Type: ; name="\nContent-Disposition: ;;;=="',
        "Content-Type: application/zip; name=x.zip\nContent-Disposition: attachment",
    ],
)
def test_malformed_headers_never_crash_the_check(env: Env, headers: str) -> None:
    result = env.run(attachments.check, raw_mime(part(headers, b"PK\x05\x06" + b"\0" * 18)))
    assert code(result) in ("250", "550 5.7.1"), result


def test_no_message_file_defers(env: Env) -> None:
    result = env.run(attachments.check, None)
    assert code(result) == "451 4.3.0"
    assert result.verdict is not None and "no such file" in result.verdict.reason


# --- virus -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clamd() -> Iterator[Clamd]:
    with Clamd(stream_max="1M") as server:
        assert isinstance(server, Clamd)
        yield server


def infected() -> bytes:
    # .txt: a .com would be refused by the attachments check before clamd is asked.
    return message(attachments=(("eicar.txt", "application/octet-stream", EICAR),))


def test_virus_is_refused_naming_it(env: Env, clamd: Clamd) -> None:
    result = env.run(virus.check, infected(), clamd_socket=str(clamd.socket))
    assert code(result) == "550 5.7.0", result
    assert text(result) in {f"virus found: {name}" for name in EICAR_NAMES}
    assert result.verdict is not None and result.verdict.check == "virus"
    assert result.headers == ()


def test_virus_in_a_text_body_and_in_a_zip(env: Env, clamd: Clamd) -> None:
    body = message("The string:\n" + EICAR.decode() + "\n")
    result = env.run(virus.check, body, clamd_socket=str(clamd.socket))
    assert text(result) == f"virus found: {EICAR_NDB}"
    archive = message(attachments=(("files.zip", "application/zip", zipped({"e.txt": EICAR})),))
    result = env.run(virus.check, archive, clamd_socket=str(clamd.socket))
    assert code(result) == "550 5.7.0" and text(result).removeprefix("virus found: ") in EICAR_NAMES


def test_authenticated_mail_is_scanned_too(env: Env, clamd: Clamd) -> None:
    result = env.run(virus.check, infected(), auth="alice@example.org",
                     clamd_socket=str(clamd.socket))  # fmt: skip
    assert code(result) == "550 5.7.0"


def test_clean_message_gets_the_header(env: Env, clamd: Clamd) -> None:
    result = env.run(virus.check, message(), clamd_socket=str(clamd.socket))
    assert code(result) == "250" and result.note == "clamd: clean"
    assert result.headers == (f"X-Virus-Scanned: ClamAV on {PRIMARY_HOSTNAME}",)
    assert_only_our_fields(result.headers)


def test_clamd_down_defers_by_default(env: Env, tmp_path: Path) -> None:
    result = env.run(virus.check, infected(), clamd_socket=str(tmp_path / "none.sock"))
    assert code(result) == "451 4.3.0", result
    assert text(result) == "virus scanner unavailable, try later"
    assert result.verdict is not None and "No such file or directory" in result.verdict.reason


def test_clamd_stopped_defers_then_accept_marks_unscanned(env: Env, clamd: Clamd) -> None:
    clamd.stop()
    try:
        deferred = env.run(virus.check, infected(), clamd_socket=str(clamd.socket))
        accepted = env.run(virus.check, infected(), clamd_socket=str(clamd.socket),
                           clamav_on_failure="accept")  # fmt: skip
    finally:
        clamd.start()
    assert code(deferred) == "451 4.3.0"
    assert code(accepted) == "250"
    value = header(accepted, "X-Virus-Scanned")
    assert value is not None and value.startswith(f"no (clamd socket {clamd.socket}: ")
    assert_only_our_fields(accepted.headers)


def test_message_over_stream_max_length_is_never_clean(env: Env, clamd: Clamd) -> None:
    big = message("x" * 76 + "\n" * 1 + ("y" * 76 + "\n") * 15000)  # 1.2 MB > StreamMaxLength
    assert len(big) > 1024 * 1024
    deferred = env.run(virus.check, big, clamd_socket=str(clamd.socket))
    assert code(deferred) == "451 4.3.0"
    assert (
        deferred.verdict is not None and "INSTREAM size limit exceeded" in deferred.verdict.reason
    )
    accepted = env.run(virus.check, big, clamd_socket=str(clamd.socket),
                       clamav_on_failure="accept")  # fmt: skip
    assert accepted.headers == ("X-Virus-Scanned: no (clamd: INSTREAM size limit exceeded. ERROR)",)


def test_virus_check_off_and_no_message(env: Env, clamd: Clamd) -> None:
    off = env.run(virus.check, infected(), clamd_socket="")
    assert code(off) == "250" and off.headers == () and "off" in off.note
    missing = env.run(virus.check, None, clamd_socket=str(clamd.socket),
                      exim_id="1tAbCd-000XyZ-99")  # fmt: skip
    assert code(missing) == "451 4.3.0"


# --- spam --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def spamd() -> Iterator[Spamd]:
    with Spamd() as server:
        assert isinstance(server, Spamd)
        yield server


def gtube() -> bytes:
    return message("Buy now!\n\n" + GTUBE.decode() + "\n")


def score_of(result: Result) -> float:
    value = header(result, "X-Spam-Score")
    assert value is not None, result
    return float(value)


def test_gtube_is_flagged_with_the_headers(env: Env, spamd: Spamd) -> None:
    result = env.run(spam.check, gtube(), spamd_socket=str(spamd.socket))
    assert code(result) == "250", result
    score = score_of(result)
    assert score >= 900
    assert header(result, "X-Spam-Scanned") == f"yes (SpamAssassin on {PRIMARY_HOSTNAME})"
    assert header(result, "X-Spam-Status") == f"Yes, score={score:.1f} required=3.5"
    assert header(result, "X-Spam-Flag") == "YES"
    report = header(result, "X-Spam-Report")
    assert report is not None and "GTUBE" in report
    assert "\r" not in report and "\n\t" in report  # folded, with LF + TAB only
    assert all(line[:1] == "\t" for line in report.split("\n")[1:])
    assert len(report.replace("\n\t", "")) <= 2000 + len("[...]")
    assert_only_our_fields(result.headers)


def test_ham_is_not_flagged(env: Env, spamd: Spamd) -> None:
    result = env.run(spam.check, message(), spamd_socket=str(spamd.socket))
    assert code(result) == "250"
    score = score_of(result)
    assert score < 3.5, result.headers  # seen: 1.3
    assert header(result, "X-Spam-Status") == f"No, score={score:.1f} required=3.5"
    assert header(result, "X-Spam-Flag") is None
    assert header(result, "X-Spam-Scanned") is not None
    assert header(result, "X-Spam-Report") is not None


def test_thresholds_are_ours_not_spamds(env: Env, spamd: Spamd) -> None:
    # Above GTUBE's score: not flagged, though spamd itself calls it spam (required 5.0).
    high = env.run(spam.check, gtube(), spamd_socket=str(spamd.socket), spam_flag_score=5000.0)
    assert header(high, "X-Spam-Flag") is None
    assert (header(high, "X-Spam-Status") or "").startswith("No, score=")
    # 0: everything is flagged, ham too.
    low = env.run(spam.check, message(), spamd_socket=str(spamd.socket), spam_flag_score=0.0)
    assert header(low, "X-Spam-Flag") == "YES"


def test_report_is_bounded_by_spam_report_max(env: Env, spamd: Spamd) -> None:
    full = header(env.run(spam.check, gtube(), spamd_socket=str(spamd.socket)), "X-Spam-Report")
    assert full is not None and "GTUBE" in full and not full.endswith("[...]")
    full_lines = full.split("\n\t")
    for limit in (1, 40, len(full_lines[0]), len(full.replace("\n\t", "")) - 1):
        result = env.run(spam.check, gtube(), spamd_socket=str(spamd.socket),
                         spam_report_max=limit)  # fmt: skip
        report = header(result, "X-Spam-Report")
        assert report is not None
        assert len(report.replace("\n\t", "")) <= limit + len("[...]"), (limit, report)
        lines = report.split("\n\t")
        # Whole lines of the report, in order, then the mark of the cut.
        assert lines[-1] == "[...]" and lines[:-1] == full_lines[: len(lines) - 1], (limit, report)
        assert_only_our_fields(result.headers)
    # 0: no report at all; the other headers stay.
    none = env.run(spam.check, gtube(), spamd_socket=str(spamd.socket), spam_report_max=0)
    assert header(none, "X-Spam-Report") is None and header(none, "X-Spam-Flag") == "YES"


def test_reject_score_refuses(env: Env, spamd: Spamd) -> None:
    result = env.run(spam.check, gtube(), spamd_socket=str(spamd.socket), spam_reject_score=5.0)
    assert code(result) == "550 5.7.1", result
    assert text(result).startswith("message refused as spam (score ")
    assert float(text(result).removeprefix("message refused as spam (score ")[:-1]) >= 900
    assert result.headers == ()
    ham = env.run(spam.check, message(), spamd_socket=str(spamd.socket), spam_reject_score=5.0)
    assert code(ham) == "250"


def test_large_messages_are_not_scanned(env: Env, spamd: Spamd) -> None:
    data = gtube()
    # Exim's size over spam_max_size ...
    by_size = env.run(spam.check, data, size=5000, spamd_socket=str(spamd.socket),
                      spam_max_size=4000)  # fmt: skip
    assert code(by_size) == "250" and by_size.headers == ()
    assert by_size.note.startswith("not scanned: 5000 bytes is over spam_max_size")
    # ... or the message itself, whatever Exim said.
    by_data = env.run(spam.check, data, size=10, spamd_socket=str(spamd.socket),
                      spam_max_size=len(data) - 1)  # fmt: skip
    assert code(by_data) == "250" and by_data.headers == ()
    assert by_data.note.startswith("not scanned: over spam_max_size")
    # At the limit: scanned.
    at_limit = env.run(spam.check, data, spamd_socket=str(spamd.socket), spam_max_size=len(data))
    assert header(at_limit, "X-Spam-Flag") == "YES"


def test_authenticated_mail_is_not_scanned(env: Env, spamd: Spamd) -> None:
    result = env.run(spam.check, gtube(), auth="alice@example.org",
                     spamd_socket=str(spamd.socket), spam_reject_score=5.0)  # fmt: skip
    assert code(result) == "250" and result.headers == ()
    assert "authenticated" in result.note


def test_spamd_down_defers_by_default_or_marks_unscanned(env: Env, tmp_path: Path) -> None:
    down = str(tmp_path / "none.sock")
    deferred = env.run(spam.check, gtube(), spamd_socket=down)
    assert code(deferred) == "451 4.3.0"
    assert text(deferred) == "spam scanner unavailable, try later"
    accepted = env.run(spam.check, gtube(), spamd_socket=down, spam_on_failure="accept")
    assert code(accepted) == "250"
    value = header(accepted, "X-Spam-Scanned")
    assert value is not None and value.startswith(f"no (spamd {down}: ")
    assert header(accepted, "X-Spam-Flag") is None
    assert_only_our_fields(accepted.headers)


def test_spamd_stopped_defers(env: Env, spamd: Spamd) -> None:
    spamd.stop()
    try:
        result = env.run(spam.check, gtube(), spamd_socket=str(spamd.socket))
    finally:
        spamd.start()
    assert code(result) == "451 4.3.0"


def test_spam_check_off_without_socket_or_host(env: Env) -> None:
    result = env.run(spam.check, gtube(), spamd_socket="", spamd_host="")
    assert code(result) == "250" and result.headers == () and "off" in result.note


def test_spam_check_no_message_defers(env: Env, spamd: Spamd) -> None:
    assert code(env.run(spam.check, None, spamd_socket=str(spamd.socket))) == "451 4.3.0"


# --- header safety -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "report",
    [
        # No rule table: kept whole.
        "Content preview: hello\r\nX-Injected: yes\r\n\r\nSubject: pwned\n\x00\x1b[2J"
        "\u2028X-Other: 1\x85Bcc: victim@example.net\r\n 1.0 RULE  text\r",
        # A rule table whose rows try it too.
        "Content preview:  X-Injected: yes\n\n pts rule name   description\n---- ----------- ----\n"
        " 1.0 RULE\r\nX-Injected: yes\r\n\tfold\n2.0 OTHER\rBcc: victim@example.net\n",
    ],
    ids=["no-table", "table"],
)
def test_report_header_cannot_start_a_field(report: str) -> None:
    value = report_header(report, 2000)
    assert value.startswith("X-Spam-Report: ") and "X-Injected: yes" in value
    assert_only_our_fields([value, "X-Spam-Flag: YES"])


@pytest.mark.parametrize(
    "value",
    [
        "report\r\nX-Injected: yes",
        "report\nX-Injected: yes",
        "report\rX-Injected: yes",
        "report\r\n\r\nbody: starts here",
        "report\n\tfolded\nX-Injected: yes",
        "report\x00\x0bX-Injected: yes\x0c",
        "report\u2028X-Injected: yes\u0085X-Other: no",
    ],
)
def test_render_headers_never_lets_a_value_start_a_field(value: str) -> None:
    headers = [f"X-Spam-Report: {value}", "X-Spam-Score: 1.0", f"X-Virus-Scanned: no ({value})"]
    assert_only_our_fields(headers)
    starts = [line for line in rendered_lines(headers) if line[:1] not in (" ", "\t")]
    assert len(starts) == 3 and not any(line.startswith("X-Injected") for line in starts)


def test_real_report_of_a_hostile_message_stays_in_its_field(env: Env, spamd: Spamd) -> None:
    # spamd's REPORT answer quotes the body ("Content preview"): header-like lines in it.
    body = ("X-Injected: yes\nX-Spam-Flag: NO\n\nSubject: pwned\n" + GTUBE.decode() + "\n"
            "\x1b[31m\u202e line \u00e9\n")  # fmt: skip
    result = env.run(spam.check, message(body), spamd_socket=str(spamd.socket))
    assert header(result, "X-Spam-Report") is not None
    assert_only_our_fields(result.headers)
    verdict_headers = base64.b64decode(protocol.render_headers(result.headers)).decode()
    assert [line for line in verdict_headers.split("\n") if line.startswith("X-Spam-Flag")] == [
        "X-Spam-Flag: YES"
    ]


# --- the DATA stage through the daemon ---------------------------------------------------------


def data_request(exim_id: str, size: int, ip: str = CLIENT_IP, auth: str = "") -> bytes:
    fields = {"ip": ip, "sender": SENDER, "rcpts": "1", "id": exim_id, "size": str(size)}
    if auth:
        fields["auth"] = auth
    return encode_request("DATA", **fields)


def accepted_headers(reply: bytes) -> str:
    assert reply.startswith(b"ACCEPT 250 2.0.0 ok\t") and reply.endswith(b"\n"), reply
    field = reply[:-1].split(b"\t", 1)[1]
    try:
        return base64.b64decode(field, validate=True).decode("ascii")
    except binascii.Error:
        raise AssertionError(f"not base64: {reply!r}") from None


@pytest.fixture
def scanning_daemon(
    start_daemon: Callable[..., Daemon], tree: Path, clamd: Clamd, spamd: Spamd
) -> Daemon:
    config = {"clamd_socket": str(clamd.socket), "spamd_socket": str(spamd.socket),
              "blocked_extensions": Settings.blocked_extensions}  # fmt: skip
    daemon: Daemon = start_daemon(tree, config=config)
    return daemon


def ask_data(daemon: Daemon, data: bytes, exim_id: str) -> bytes:
    spool(daemon.root, data, exim_id)
    reply: bytes = daemon.ask(data_request(exim_id, len(data)), timeout=60)
    return reply


def test_daemon_data_stage(scanning_daemon: Daemon) -> None:
    d = scanning_daemon
    virus_reply = ask_data(d, infected(), "1tAb01-000XyZ-12")
    assert virus_reply.startswith(b"DENY 550 5.7.0 virus found: Test.EICAR-"), virus_reply
    assert virus_reply.rstrip(b"\n").split(b": ", 1)[1].decode() in EICAR_NAMES

    spam_headers = accepted_headers(ask_data(d, gtube(), "1tAb02-000XyZ-12"))
    lines = spam_headers.split("\n")
    assert "X-Spam-Flag: YES" in lines
    assert f"X-Virus-Scanned: ClamAV on {PRIMARY_HOSTNAME}" in lines
    assert any(line.startswith("X-Spam-Status: Yes, score=") for line in lines)

    clean_headers = accepted_headers(ask_data(d, message(), "1tAb03-000XyZ-12"))
    lines = clean_headers.split("\n")
    assert f"X-Virus-Scanned: ClamAV on {PRIMARY_HOSTNAME}" in lines
    assert any(line.startswith("X-Spam-Score: ") for line in lines)
    assert any(line.startswith("X-Spam-Status: No, score=") for line in lines)
    assert "X-Spam-Flag: YES" not in lines
    assert all(line[:1] in (" ", "\t") or line.split(":")[0] in OUR_HEADERS for line in lines)

    blocked = message(attachments=(("setup.exe", "application/octet-stream", b"MZ"),))
    assert ask_data(d, blocked, "1tAb04-000XyZ-12") == (
        b"DENY 550 5.7.1 attachments of this type are not accepted: setup.exe\n"
    )
    # A blocked attachment that also carries a virus: refused by the cheaper check first.
    both = message(attachments=(("eicar.com", "application/octet-stream", EICAR),))
    assert ask_data(d, both, "1tAb05-000XyZ-12").startswith(b"DENY 550 5.7.1 ")

    # An authenticated user's spam is not scanned for spam, but a virus is still refused.
    spool(d.root, gtube(), "1tAb06-000XyZ-12")
    own = d.ask(data_request("1tAb06-000XyZ-12", 500, auth="alice@example.org"), timeout=60)
    assert "X-Spam" not in accepted_headers(own)
    spool(d.root, infected(), "1tAb07-000XyZ-12")
    own_virus = d.ask(data_request("1tAb07-000XyZ-12", 500, auth="alice@example.org"), timeout=60)
    assert own_virus.startswith(b"DENY 550 5.7.0 virus found: ")


@pytest.mark.parametrize(
    ("exim_id", "expected"),
    [
        ("1tAb99-000XyZ-12", b"DEFER 451 4.3.0 "),  # a valid id, no file
        ("1tAb99-000XyZ", b"DEFER 451 4.3.0 "),  # not an Exim id: never made into a path
        ("..-..-..", b"DEFER 451 4.3.0 "),
        ("1tAb98-000XyZ-12/../../x", b"DEFER 451 4.5.0 "),  # refused by the protocol
    ],
    ids=["no-file", "short-id", "dots", "path"],
)
def test_daemon_without_the_message_defers(
    scanning_daemon: Daemon, exim_id: str, expected: bytes
) -> None:
    # A message that would be accepted, were it where the id says: never accepted unseen.
    spool(scanning_daemon.root, message(), "1tAb98-000XyZ-12")
    reply = scanning_daemon.ask(data_request(exim_id, 500), timeout=60)
    assert reply.startswith(expected) and reply.count(b"\n") == 1, reply


def test_daemon_defers_when_clamd_is_stopped(scanning_daemon: Daemon, clamd: Clamd) -> None:
    clamd.stop()
    try:
        reply = ask_data(scanning_daemon, infected(), "1tAb11-000XyZ-12")
        clean = ask_data(scanning_daemon, message(), "1tAb12-000XyZ-12")
    finally:
        clamd.start()
    assert reply == b"DEFER 451 4.3.0 virus scanner unavailable, try later\n"
    assert clean == reply  # unscanned is not clean
    # Back: scanned again, through the same daemon.
    assert ask_data(scanning_daemon, infected(), "1tAb13-000XyZ-12").startswith(b"DENY 550 5.7.0")
    scanning_daemon.stop()
    log = scanning_daemon.log_text()
    assert "id=1tAb11-000XyZ-12" in log and "check=virus" in log
