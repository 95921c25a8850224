"""policy.protocol: request parsing, reply rendering (sans-IO, property-tested)."""

from __future__ import annotations

import base64

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policy import protocol
from policy.protocol import (
    FIELDS,
    MAX_LINE,
    MAX_REPLY,
    MAX_TEXT,
    NOTFOUND,
    VERBS,
    ProtocolError,
    Request,
    encode_request,
    parse,
    render_error,
    render_found,
    render_pong,
    render_verdict,
)
from policy.verdict import (
    OK_RCPT,
    RELAY_DENIED,
    TEMP_LOCAL,
    TEMP_PROTOCOL,
    USER_UNKNOWN,
    Status,
    Verdict,
)

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

IP_ALPHABET = "0123456789abcdefABCDEF.:_%-xyzXYZ"
# Everything an SMTP client controls, as text: unicode, spaces, quotes, newlines; no NUL (the
# protocol refuses a NUL in a decoded value).
free_text = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=120)
# Bytes that are not valid UTF-8 reach us as surrogate escapes.
hostile_text = (
    st.binary(max_size=80)
    .filter(lambda b: b"\0" not in b)
    .map(lambda b: b.decode("utf-8", "surrogateescape"))
)
field_value = st.one_of(free_text, hostile_text)
ip_value = st.text(IP_ALPHABET, max_size=45)
number_value = st.integers(0, 10**15 - 1).map(str)
message_id = st.text("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-", max_size=23)
PLAIN_VALUES = {"ip": ip_value, "id": message_id, "size": number_value, "rcpts": number_value}


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, dict[str, str]]:
    verb = draw(st.sampled_from(sorted(VERBS)))
    spec = VERBS[verb]
    names = sorted(spec.required) + [n for n in sorted(spec.optional) if draw(st.booleans())]
    names = draw(st.permutations(names))
    fields = {n: draw(PLAIN_VALUES[n] if not FIELDS[n] else field_value) for n in names}
    return verb, fields


def assert_one_safe_line(reply: bytes, limit: int = MAX_REPLY) -> str:
    assert reply.endswith(b"\n")
    assert reply.count(b"\n") == 1
    assert b"\r" not in reply
    assert len(reply) <= limit
    text = reply.decode("ascii")  # raises if not ASCII
    assert all(0x20 <= ord(c) <= 0x7E for c in text[:-1])
    return text[:-1]


# --- round trip ------------------------------------------------------------------------------


@SETTINGS
@given(requests())
def test_round_trip(req: tuple[str, dict[str, str]]) -> None:
    verb, fields = req
    line = encode_request(verb, **fields)
    if len(line) > MAX_LINE:
        with pytest.raises(ProtocolError, match="longer than"):
            parse(line)
        return
    got = parse(line)
    assert got.verb == verb
    assert got.fields == fields
    for name, value in fields.items():
        assert got.get(name) == value


@SETTINGS
@given(st.binary(max_size=200).filter(lambda b: b"\0" not in b))
def test_round_trip_keeps_invalid_utf8_bytes(raw: bytes) -> None:
    value = raw.decode("utf-8", "surrogateescape")
    req = parse(encode_request("ALIAS", addr=value))
    assert req.fields["addr"].encode("utf-8", "surrogateescape") == raw


@pytest.mark.parametrize("value", ["", "-1", "1.5", "0x10", "1e3", "1234567890123456", "+1"])
def test_numeric_fields_must_be_numbers(value: str) -> None:
    for name in ("size", "rcpts"):
        fields = {"ip": "192.0.2.1", "sender": "", "rcpts": "1", name: value}
        with pytest.raises(ProtocolError, match=f"{name}.*(number|not allowed)"):
            parse(encode_request("DATA", **fields))


def test_round_trip_examples() -> None:
    fields = {"ip": "2001:db8::1", "sender": 'a "b" c\n@x', "rcpt": "jörg+x@例え.jp", "helo": ""}
    req = parse(encode_request("RCPT", **fields))
    assert req == Request("RCPT", fields)
    assert parse(b"PING\n") == Request("PING", {})
    assert parse(b"PING\r\n") == Request("PING", {})
    assert parse(b"PING") == Request("PING", {})


def test_fields_in_any_order_and_extra_spaces() -> None:
    line = b"  RCPT  rcpt=Ym9i   sender=  ip=192.0.2.1 \n"
    assert parse(line) == Request("RCPT", {"rcpt": "bob", "sender": "", "ip": "192.0.2.1"})


def test_optional_fields_absent_read_as_empty() -> None:
    req = parse(b"MAIL ip= sender=\n")
    assert req.fields == {"ip": "", "sender": ""}
    assert req.get("helo") == ""
    assert req.get("auth") == ""


def test_max_line_boundary() -> None:
    line = b"PING" + b" " * (MAX_LINE - 5) + b"\n"
    assert len(line) == MAX_LINE
    assert parse(line).verb == "PING"
    with pytest.raises(ProtocolError, match=f"longer than {MAX_LINE}"):
        parse(line[:-1] + b" \n")


# --- anything in: a Request or a ProtocolError, never another exception --------------------

_tokens = st.one_of(
    st.sampled_from([*VERBS, "ping", "HELO", "", "=", "ip=", "sender=", "rcpt=", "addr="]),
    st.builds(
        lambda n, v: f"{n}={v}",
        st.sampled_from([*FIELDS, "x", "IP", ""]),
        st.one_of(
            st.binary(max_size=20).map(lambda b: base64.b64encode(b).decode()),
            st.text("AZaz09+/=%:.-_*", max_size=12),
        ),
    ),
)
structured_lines = st.lists(_tokens, max_size=8).map(lambda ts: " ".join(ts).encode())
garbage = st.one_of(
    st.binary(max_size=300),
    structured_lines,
    st.tuples(structured_lines, st.binary(max_size=4), structured_lines).map(b"".join),
)


@settings(max_examples=500, deadline=None)
@given(garbage)
def test_parse_never_raises_anything_else(line: bytes) -> None:
    try:
        req = parse(line)
    except ProtocolError as e:
        out = render_error(e)
        text = assert_one_safe_line(out)
        assert text.startswith("DEFER 451 4.5.0 ")
        return
    assert req.verb in VERBS
    spec = VERBS[req.verb]
    assert spec.required <= req.fields.keys() <= spec.required | spec.optional
    for value in req.fields.values():
        assert "\0" not in value


# --- malformed lines: ProtocolError naming the problem ---------------------------------------

b64 = base64.b64encode

MALFORMED = [
    (b"", "empty request"),
    (b"\n", "empty request"),
    (b"   \r\n", "empty request"),
    (b"HELO ip=1.2.3.4\n", "unknown verb 'HELO'"),
    (b"ping\n", "unknown verb 'ping'"),
    (b"ip=1 sender=\n", "unknown verb"),
    (b"MAIL ip=1.2.3.4 sender= foo=YQ==\n", "unknown field 'foo' for MAIL"),
    (b"PING ip=1.2.3.4\n", "unknown field 'ip' for PING"),
    (b"MAIL ip=1.2.3.4 sender= rcpt=YQ==\n", "unknown field 'rcpt' for MAIL"),
    (b"ALIAS addr=YQ== IP=x\n", "unknown field 'IP'"),
    (b"MAIL ip=1.2.3.4\n", "missing field 'sender' for MAIL"),
    (b"MAIL sender=\n", "missing field 'ip' for MAIL"),
    (b"MAIL sender= helo=YQ== auth=YQ==\n", "missing field 'ip' for MAIL"),
    (b"RCPT ip=1.2.3.4 sender=\n", "missing field 'rcpt' for RCPT"),
    (b"ALIAS\n", "missing field 'addr' for ALIAS"),
    (b"MAIL ip=1 sender= sender=\n", "duplicate field 'sender'"),
    (b"MAIL ip=1 ip=2 sender=\n", "duplicate field 'ip'"),
    (b"MAIL ip=1 sender\n", "field 'sender' has no '='"),
    (b"MAIL ip=1 sender=YQ\n", "field 'sender' is not valid base64"),
    (b"MAIL ip=1 sender=Y*Q=\n", "field 'sender' is not valid base64"),
    (b"MAIL ip=1 sender=YQ==YQ==\n", "field 'sender' is not valid base64"),
    (b"MAIL ip=1 sender==YQ=\n", "field 'sender' is not valid base64"),
    (b"ALIAS addr=A\n", "field 'addr' is not valid base64"),
    (b"MAIL ip=1.2.3.4/24 sender=\n", "field 'ip' has characters not allowed"),
    (b"MAIL ip=a=b sender=\n", "field 'ip' has characters not allowed"),
    (b"MAIL ip=1 sender=\0\n", "NUL byte in request"),
    (b"\0PING\n", "NUL byte in request"),
    (b"MAIL ip=1 sender=" + b64(b"a\0b") + b"\n", "NUL byte in field 'sender'"),
    (b"ALIAS addr=" + b64(b"\0") + b"\n", "NUL byte in field 'addr'"),
    (b"MAIL\tip=1 sender=\n", "control or non-ASCII byte 0x09"),
    (b"MAIL ip=1\r sender=\n", "control or non-ASCII byte 0x0d"),
    (b"PING\nPING\n", "control or non-ASCII byte 0x0a"),
    (b"PING\n\n", "control or non-ASCII byte 0x0a"),
    (b"PING\r\r\n", "control or non-ASCII byte 0x0d"),
    (b"PING \x1b[31m\n", "control or non-ASCII byte 0x1b"),
    (b"PING \x7f\n", "control or non-ASCII byte 0x7f"),
    (b"ALIAS addr=j\xc3\xb6rg\n", "control or non-ASCII byte 0xc3"),
    (b"PING" + b" " * MAX_LINE + b"\n", f"request line longer than {MAX_LINE} bytes"),
    (b"X" * (MAX_LINE + 1), f"request line longer than {MAX_LINE} bytes"),
]


@pytest.mark.parametrize(("line", "problem"), MALFORMED)
def test_malformed_line_names_the_problem(line: bytes, problem: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse(line)
    assert problem in str(info.value)
    reply = render_error(info.value)
    text = assert_one_safe_line(reply)
    assert text.startswith("DEFER 451 4.5.0 ")
    assert text == f"DEFER 451 4.5.0 bad policy request: {info.value}"


@SETTINGS
@given(st.text(max_size=2000))
def test_render_error_is_one_safe_defer_line(message: str) -> None:
    text = assert_one_safe_line(render_error(ProtocolError(message)))
    assert text.startswith(f"DEFER {TEMP_PROTOCOL.code} {TEMP_PROTOCOL.enhanced} ")
    assert text.startswith("DEFER 451 4.5.0 bad policy request: ")
    assert len(text) <= len("DEFER 451 4.5.0 ") + MAX_TEXT


# --- replies: one ASCII line, no CR/LF inside, for any text ----------------------------------

any_text = st.one_of(
    st.text(max_size=600),
    hostile_text,
    st.text("\r\n\x00 \t\x85\u2028\u2029abc", max_size=50),
)
statuses = st.sampled_from([OK_RCPT, USER_UNKNOWN, RELAY_DENIED, TEMP_LOCAL, TEMP_PROTOCOL])


@SETTINGS
@given(statuses, any_text)
def test_render_verdict_is_one_safe_line(status: Status, text: str) -> None:
    reason = "log-only: aliases/example.org:12"
    v = Verdict(status, text, "check", reason, "aliases/example.org:12")
    line = assert_one_safe_line(render_verdict(v))
    action, code, enhanced, shown = line.split(" ", 3)
    assert (action, code, enhanced) == (status.action.value, str(status.code), status.enhanced)
    assert 0 < len(shown) <= MAX_TEXT
    printable = all(0x20 <= ord(c) <= 0x7E for c in text)
    if printable and 0 < len(text) <= MAX_TEXT:
        assert shown == text
    assert "aliases/example.org" not in line  # the reason and source stay in the log


def test_render_verdict_examples() -> None:
    assert (
        render_verdict(Verdict(OK_RCPT, "recipient ok", "x")) == b"ACCEPT 250 2.1.5 recipient ok\n"
    )
    assert render_verdict(Verdict(TEMP_LOCAL, "", "x")) == b"DEFER 451 4.3.0 -\n"
    assert render_verdict(Verdict(USER_UNKNOWN, "<j\xf6rg@x>: no\r\nX", "x")) == (
        b"DENY 550 5.1.1 <j?rg@x>: no??X\n"
    )
    long = render_verdict(Verdict(RELAY_DENIED, "a" * 1000, "x"))
    assert long == b"DENY 550 5.7.1 " + b"a" * (MAX_TEXT - 3) + b"...\n"


@SETTINGS
@given(any_text)
def test_render_found_is_one_safe_line(data: str) -> None:
    """FOUND data is UTF-8 (internationalised destinations stay intact), but never carries a
    control character, CR, LF or a lone surrogate."""
    reply = render_found(data)
    assert reply.endswith(b"\n") and reply.count(b"\n") == 1 and b"\r" not in reply
    line = reply.decode("utf-8")[:-1]
    assert line.startswith("FOUND ")
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in line)
    if all(0x20 <= ord(c) <= 0x7E or 0xA0 <= ord(c) <= 0xD7FF for c in data):
        assert line == f"FOUND {data}"


def test_render_found_utf8_destination_intact() -> None:
    assert render_found("jörg@example.org") == "FOUND jörg@example.org\n".encode()


def test_render_found_refuses_to_cut_a_list() -> None:
    with pytest.raises(ValueError, match="longer than"):
        render_found("a@b.example," * 10000)
    assert render_found("a@example.org,b@example.org") == b"FOUND a@example.org,b@example.org\n"
    assert NOTFOUND == b"NOTFOUND\n"


@SETTINGS
@given(any_text)
def test_render_pong_is_one_safe_line(version: str) -> None:
    line = assert_one_safe_line(render_pong(version))
    assert line.startswith("PONG ")
    if all(0x20 <= ord(c) <= 0x7E for c in version) and len(version) <= MAX_TEXT:
        assert line == f"PONG {version}"


def test_encode_request_encodes_exactly_the_b64_fields() -> None:
    line = encode_request("RCPT", ip="192.0.2.1", sender="a b", rcpt="c", helo="", auth="x")
    assert line == b"RCPT ip=192.0.2.1 sender=YSBi rcpt=Yw== helo= auth=eA==\n"
    assert {n for n, enc in FIELDS.items() if not enc} == set(PLAIN_VALUES)
    assert protocol.parse(line).fields["sender"] == "a b"
