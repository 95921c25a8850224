"""policy.verdict: one source for code, enhanced code and action."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policy import verdict
from policy.verdict import Action, Status, Verdict, defer

NAMED = {name: value for name, value in vars(verdict).items() if isinstance(value, Status)}
ACTIONS = {2: Action.ACCEPT, 4: Action.DEFER, 5: Action.DENY}

valid_codes = st.integers(200, 599).filter(lambda c: c // 100 in (2, 4, 5))
sub = st.integers(0, 999).map(str)
valid_details = st.builds(lambda a, b: f"{a}.{b}", sub, sub)


def test_named_statuses_exist() -> None:
    assert {"OK_RCPT", "USER_UNKNOWN", "RELAY_DENIED", "TEMP_LOCAL", "TEMP_PROTOCOL"} <= set(NAMED)


@pytest.mark.parametrize("name", sorted(NAMED))
def test_named_status_classes_agree(name: str) -> None:
    s = NAMED[name]
    assert s.enhanced.split(".")[0] == str(s.code)[0]
    assert s.action is ACTIONS[s.code // 100]


@pytest.mark.parametrize(
    ("status", "code", "enhanced", "action"),
    [
        (verdict.OK_RCPT, 250, "2.1.5", Action.ACCEPT),
        (verdict.OK_SENDER, 250, "2.1.0", Action.ACCEPT),
        (verdict.USER_UNKNOWN, 550, "5.1.1", Action.DENY),
        (verdict.BAD_ADDRESS_SYNTAX, 550, "5.1.3", Action.DENY),
        (verdict.RELAY_DENIED, 550, "5.7.1", Action.DENY),
        (verdict.TEMP_LOCAL, 451, "4.3.0", Action.DEFER),
        (verdict.TEMP_OVERLOAD, 451, "4.3.2", Action.DEFER),
        (verdict.TEMP_ROUTING_LOOP, 451, "4.4.6", Action.DEFER),
        (verdict.TEMP_PROTOCOL, 451, "4.5.0", Action.DEFER),
    ],
)
def test_named_status_values(status: Status, code: int, enhanced: str, action: Action) -> None:
    assert (status.code, status.enhanced, status.action) == (code, enhanced, action)


@settings(max_examples=300, deadline=None)
@given(valid_codes, valid_details)
def test_enhanced_class_is_code_class(code: int, detail: str) -> None:
    s = Status(code, detail)
    cls, subject, det = s.enhanced.split(".")
    assert cls == str(code // 100)
    assert f"{subject}.{det}" == detail
    assert s.action is ACTIONS[code // 100]
    v = Verdict(s, "text", "check")
    assert v.action is s.action


@settings(max_examples=300, deadline=None)
@given(st.integers(-10_000, 10_000))
def test_only_2xx_4xx_5xx_codes_are_accepted(code: int) -> None:
    if 200 <= code <= 599 and code // 100 != 3:
        assert Status(code, "0.0").code == code
    else:
        with pytest.raises(ValueError, match="not an SMTP reply code"):
            Status(code, "0.0")


@pytest.mark.parametrize("code", [0, 99, 199, 300, 354, 399, 600, 999, 2500, -550])
def test_invalid_codes_rejected(code: int) -> None:
    with pytest.raises(ValueError, match="not an SMTP reply code"):
        Status(code, "1.1")


@pytest.mark.parametrize("code", [550.0, 550.5, "550", True, None])
def test_non_integer_codes_rejected(code: object) -> None:
    with pytest.raises(ValueError, match="not an SMTP reply code"):
        Status(code, "1.1")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "detail",
    [
        "",
        "1",
        "1.",
        ".1",
        "1.1.1",
        "5.1.1",
        "01.1",
        "1.01",
        "1.1000",
        "a.b",
        " 1.1",
        "1.1\n",
        "1 .1",
        "١.١",
        None,
    ],
)
def test_invalid_enhanced_details_rejected(detail: object) -> None:
    with pytest.raises(ValueError, match="enhanced"):
        Status(550, detail)  # type: ignore[arg-type]


@pytest.mark.parametrize("detail", ["0.0", "1.1", "7.1", "999.999", "10.0"])
def test_valid_details(detail: str) -> None:
    assert Status(451, detail).enhanced == f"4.{detail}"


def test_status_is_frozen() -> None:
    s = Status(550, "1.1")
    with pytest.raises(AttributeError):
        s.code = 250  # type: ignore[misc]


def test_defer_is_temporary_local_trouble() -> None:
    v = defer("relay", "relay_from_hosts unreadable")
    assert v.status is verdict.TEMP_LOCAL
    assert v.action is Action.DEFER
    assert (v.check, v.reason) == ("relay", "relay_from_hosts unreadable")
    assert "relay_from_hosts" not in v.text  # the reason is for the log only
    loop = defer("recipient", "loop", "try later", verdict.TEMP_ROUTING_LOOP)
    assert (loop.status.code, loop.status.enhanced, loop.text) == (451, "4.4.6", "try later")
