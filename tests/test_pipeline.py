"""policy.pipeline: the stages, the interpreter, its trace, and what a crashing check gives."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policy import settings as settings_mod
from policy.aliases import Limits
from policy.callout import Outcome
from policy.checks import Context, Result
from policy.mailtree import Snapshot, TreeLoader
from policy.pipeline import ASYNC_STAGES, STAGES, evaluate, evaluate_async, evaluate_quick
from policy.services import Services
from policy.verdict import Action, Status, Verdict

PRIMARY = "mail.example.org"
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "srv-mail"


def load(root: Path) -> Snapshot:
    return TreeLoader(str(root), PRIMARY).refresh()[0]


@pytest.fixture
def snap(tree: Path) -> Snapshot:
    return load(tree)


def ctx(
    snapshot: Snapshot,
    rcpt: str = "",
    ip: str = "203.0.113.5",
    auth: str = "",
    sender: str = "someone@remote.example",
    stage: str = "RCPT",
) -> Context:
    return Context(stage, ip, sender, rcpt, "helo.example", auth, snapshot, Limits())


def summary(v: Verdict) -> tuple[str, int, str, str]:
    return (v.action.value, v.status.code, v.status.enhanced, v.check)


def test_stage_table() -> None:
    assert [name for name, _ in STAGES["RCPT"][0]] == [
        "restricted_characters",
        "relay",
        "recipient",
    ]
    # SPF before the callout: a sender SPF refuses is forged, its domain gets no probe.
    assert [name for name, _ in STAGES["MAIL"][0]] == ["spf", "sender_verify"]
    assert STAGES["RCPT"][1].enhanced == "2.1.5"
    assert STAGES["MAIL"][1].enhanced == "2.1.0"
    # MAIL waits on DNS and SMTP peers: the daemon answers it from a task.
    assert "MAIL" in ASYNC_STAGES and "RCPT" not in ASYNC_STAGES and "CONNECT" not in ASYNC_STAGES


@pytest.mark.parametrize(
    ("rcpt", "ip", "auth", "expected", "trace"),
    [
        ("bob@example.org", "203.0.113.5", "", ("ACCEPT", 250, "2.1.5", "recipient"), 3),
        ("info@example.org", "203.0.113.5", "", ("ACCEPT", 250, "2.1.5", "recipient"), 3),
        ("x@backup.example", "203.0.113.5", "", ("ACCEPT", 250, "2.1.5", "relay"), 3),
        ("x@remote.example", "192.0.2.7", "", ("ACCEPT", 250, "2.1.5", "relay"), 3),
        ("x@remote.example", "::1", "", ("ACCEPT", 250, "2.1.5", "relay"), 3),
        ("x@remote.example", "203.0.113.5", "u", ("ACCEPT", 250, "2.1.5", "relay"), 3),
        ("nobody@example.org", "203.0.113.5", "", ("DENY", 550, "5.1.1", "recipient"), 3),
        ("nobody@example.org", "127.0.0.1", "u", ("DENY", 550, "5.1.1", "recipient"), 3),
        ("x@remote.example", "203.0.113.5", "", ("DENY", 550, "5.7.1", "relay"), 2),
        ("a%b@example.org", "203.0.113.5", "", ("DENY", 550, "5.1.3", "restricted_characters"), 1),
        (
            "a%b@remote.example",
            "127.0.0.1",
            "u",
            ("DENY", 550, "5.1.3", "restricted_characters"),
            1,
        ),
        (
            '"a@b"@example.org',
            "203.0.113.5",
            "",
            ("DENY", 550, "5.1.3", "restricted_characters"),
            1,
        ),
        ("b!a@example.org", "192.0.2.7", "", ("DENY", 550, "5.1.3", "restricted_characters"), 1),
        ("|cmd@example.org", "203.0.113.5", "", ("DENY", 550, "5.1.3", "restricted_characters"), 1),
        ("/tmp/x@example.org", "::1", "", ("DENY", 550, "5.1.3", "restricted_characters"), 1),
        ("a/../b@remote.example", "::1", "u", ("DENY", 550, "5.1.3", "restricted_characters"), 1),
    ],
)
def test_rcpt_stage(
    snap: Snapshot, rcpt: str, ip: str, auth: str, expected: tuple[str, int, str, str], trace: int
) -> None:
    steps: list[tuple[str, Result]] = []
    v = evaluate(ctx(snap, rcpt, ip, auth), steps)
    assert summary(v) == expected
    names = ["restricted_characters", "relay", "recipient"]
    assert [name for name, _ in steps] == names[:trace]
    # The last trace entry is the deciding one for a deny; every result is recorded.
    if v.action is not Action.ACCEPT:
        assert steps[-1][1].verdict is not None
        assert steps[-1][1].verdict.status == v.status
    else:
        assert all(r.verdict is None for _, r in steps)
    assert evaluate(ctx(snap, rcpt, ip, auth)) == v  # trace or not, the same answer


def test_accept_explains_with_the_last_note(snap: Snapshot) -> None:
    v = evaluate(ctx(snap, "bob@example.org"))
    assert v.text == "ok"
    assert v.reason == "bob@example.org: user"
    assert v.source == "passwd/example.org:14"
    v = evaluate(ctx(snap, "x@mx.backup.example"))
    assert v.check == "relay"
    assert v.reason == "mx.backup.example is in relay_to_domains"
    assert v.source == "exim/conf/relay_to_domains:16"


def test_deny_carries_the_source(tmp_path: Path) -> None:
    root = tmp_path / "t"
    shutil.copytree(EXAMPLE, root)
    (root / "exim/conf/relay_from_hosts").write_text("!192.0.2.9\n192.0.2.0/24\n")
    v = evaluate(ctx(load(root), "x@remote.example", ip="192.0.2.9"))
    assert summary(v) == ("DENY", 550, "5.7.1", "relay")
    assert v.source == "exim/conf/relay_from_hosts:1"


def test_mail_stage(snap: Snapshot) -> None:
    steps: list[tuple[str, Result]] = []
    v = asyncio.run(evaluate_async(ctx(snap, sender="newsletter@shop.example", stage="MAIL"),
                                   steps))  # fmt: skip
    assert summary(v) == ("ACCEPT", 250, "2.1.0", "sender_verify")
    assert v.source == "exim/conf/senderverify_exceptions:15"
    assert [name for name, _ in steps] == ["spf", "sender_verify"]
    v = asyncio.run(evaluate_async(ctx(snap, sender="", stage="MAIL")))
    assert summary(v) == ("ACCEPT", 250, "2.1.0", "sender_verify")
    # An async stage cannot be answered by the synchronous interpreter.
    with pytest.raises(TypeError, match="needs evaluate_async"):
        evaluate(ctx(snap, sender="", stage="MAIL"))


def test_headers_of_an_accept_and_none_on_a_deny(
    snap: Snapshot, monkeypatch: pytest.MonkeyPatch
) -> None:
    def tag(name: str) -> Callable[[Context], Result]:
        return lambda c: Result(note=name, headers=(f"X-{name}: yes",))

    def deny(c: Context) -> Result:
        return Result(Verdict(Status(550, "7.1"), "no", "d"))

    ok = STAGES["MAIL"][1]
    monkeypatch.setitem(STAGES, "MAIL", ((("a", tag("a")), ("b", tag("b"))), ok))
    v = asyncio.run(evaluate_async(ctx(snap, sender="x@remote.example", stage="MAIL")))
    assert v.headers == ("X-a: yes", "X-b: yes")
    assert v.reason == "a: a; b: b"
    monkeypatch.setitem(STAGES, "MAIL", ((("a", tag("a")), ("d", deny)), ok))
    v = asyncio.run(evaluate_async(ctx(snap, sender="x@remote.example", stage="MAIL")))
    assert summary(v) == ("DENY", 550, "5.7.1", "d") and v.headers == ()


def test_defer_when_files_are_unavailable(tmp_path: Path) -> None:
    root = tmp_path / "t"
    shutil.copytree(EXAMPLE, root)
    (root / "passwd/example.org").unlink()
    (root / "passwd/example.org").mkdir()
    (root / "exim/conf/relay_from_hosts").write_text("mail.example.org\n")
    s = load(root)
    for rcpt, ip, check in [
        ("bob@example.org", "203.0.113.5", "recipient"),
        ("nobody@example.org", "203.0.113.5", "recipient"),
        ("x@remote.example", "192.0.2.7", "relay"),
    ]:
        v = evaluate(ctx(s, rcpt, ip))
        assert summary(v) == ("DEFER", 451, "4.3.0", check), rcpt


# --- a check that raises -----------------------------------------------------------------------


def boom(ctx: Context) -> Result:
    raise RuntimeError("boom")


@pytest.fixture
def crashing_relay(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    called: list[str] = []
    checks, ok = STAGES["RCPT"]

    def spy(name: str, fn: object) -> object:
        def wrapped(c: Context) -> Result:
            called.append(name)
            return fn(c)  # type: ignore[operator]

        return wrapped

    patched = tuple((name, spy(name, boom if name == "relay" else fn)) for name, fn in checks)
    monkeypatch.setitem(STAGES, "RCPT", (patched, ok))
    yield called


@pytest.mark.parametrize("rcpt", ["bob@example.org", "x@remote.example", "x@backup.example"])
def test_raising_check_defers_never_accepts(
    snap: Snapshot, crashing_relay: list[str], rcpt: str
) -> None:
    steps: list[tuple[str, Result]] = []
    v = evaluate(ctx(snap, rcpt, ip="127.0.0.1", auth="u"), steps)
    assert summary(v) == ("DEFER", 451, "4.3.0", "relay")
    assert v.reason == "internal error in relay: RuntimeError: boom"
    assert "boom" not in v.text
    assert [name for name, _ in steps] == ["restricted_characters", "relay"]
    assert steps[1][1].verdict == v
    assert crashing_relay == ["restricted_characters", "relay"]  # recipient never ran


def test_raising_check_in_mail_stage(snap: Snapshot, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(STAGES, "MAIL", ((("sender_verify", boom),), STAGES["MAIL"][1]))
    v = asyncio.run(evaluate_async(ctx(snap, sender="x@remote.example", stage="MAIL")))
    assert summary(v) == ("DEFER", 451, "4.3.0", "sender_verify")

    async def async_boom(c: Context) -> Result:
        raise RuntimeError("boom")

    monkeypatch.setitem(STAGES, "MAIL", ((("spf", async_boom),), STAGES["MAIL"][1]))
    v = asyncio.run(evaluate_async(ctx(snap, sender="x@remote.example", stage="MAIL")))
    assert summary(v) == ("DEFER", 451, "4.3.0", "spf")


def test_raising_on_broken_snapshot_defers(snap: Snapshot) -> None:
    # An unexpected file state (here: a list missing from the snapshot) is a defer too.
    broken = Snapshot(snap.root, snap.primary_hostname, snap.users, snap.aliases, {})
    v = evaluate(ctx(broken, "bob@example.org"))
    assert summary(v)[:3] == ("DEFER", 451, "4.3.0")
    assert "internal error" in v.reason


# --- properties: never an open relay, never 5xx on our own trouble -----------------------------


@pytest.fixture(scope="module")
def trees(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Snapshot]:
    good = tmp_path_factory.mktemp("good") / "t"
    shutil.copytree(EXAMPLE, good)
    bad = tmp_path_factory.mktemp("bad") / "t"
    shutil.copytree(EXAMPLE, bad)
    for rel in (
        "passwd/example.org",
        "aliases/example.net",
        "exim/conf/global_aliases",
        "exim/conf/relay_from_hosts",
    ):
        (bad / rel).unlink()
        (bad / rel).mkdir()
    return {"good": load(good), "bad": load(bad)}


locals_ = st.sampled_from(["bob", "alice", "info", "nobody", "postmaster", "x+y", "Bob", "a.b"])
domains = st.sampled_from(
    [
        "example.org",
        "example.net",
        "example.com",
        "example.info",
        "mail.example.org",
        "backup.example",
        "mx.backup.example",
        "remote.example",
        "example.org.evil",
        "EXAMPLE.ORG",
    ]
)
ips = st.sampled_from(
    [
        "203.0.113.5",
        "192.0.2.7",
        "198.51.100.7",
        "198.51.100.8",
        "2001:db8::5",
        "2001:db9::5",
        "127.0.0.1",
        "::1",
        "",
        "::ffff:192.0.2.7",
        "::ffff:203.0.113.5",
    ]
)


def relay_allowed(domain: str, ip: str, auth: str) -> bool:
    d = domain.lower()
    local = d in {"example.org", "example.net", "example.com", "example.info", "mail.example.org"}
    relay_to = d in {"backup.example", "mx.backup.example"}
    hosts = ip.removeprefix("::ffff:").startswith(("192.0.2.", "2001:db8:")) or ip in (
        "198.51.100.7",
        "127.0.0.1",
        "::1",
    )
    submitted_here = ip == ""  # no client IP: a local `exim -bs` submission
    return local or relay_to or bool(auth) or hosts or submitted_here


@settings(max_examples=300, deadline=None)
@given(locals_, domains, ips, st.sampled_from(["", "alice@example.org"]))
def test_never_an_open_relay(
    trees: dict[str, Snapshot], local: str, domain: str, ip: str, auth: str
) -> None:
    for name, s in trees.items():
        v = evaluate(ctx(s, f"{local}@{domain}", ip, auth))
        if v.action is Action.ACCEPT:
            assert relay_allowed(domain, ip, auth), (name, v)
        if not relay_allowed(domain, ip, auth) and name == "good":
            assert summary(v) == ("DENY", 550, "5.7.1", "relay")


@settings(max_examples=300, deadline=None)
@given(locals_, domains, ips, st.sampled_from(["", "alice@example.org"]))
def test_unreadable_files_never_give_a_5xx(
    trees: dict[str, Snapshot], local: str, domain: str, ip: str, auth: str
) -> None:
    # In the bad tree every decision needs an unreadable file (global_aliases for all local
    # domains, relay_from_hosts for the rest), unless auth, loopback or relay_to_domains decide.
    v = evaluate(ctx(trees["bad"], f"{local}@{domain}", ip, auth))
    assert v.action is not Action.DENY, v
    if v.action is Action.DEFER:
        assert (v.status.code, v.status.enhanced) == (451, "4.3.0")


# --- the quick path of async stages (a MAIL answered from the caches, without a task) --------


def _services(**overrides: object) -> Services:
    base = settings_mod.load("/dev/null", {"dns_servers": "127.0.0.1", "dns_port": 9,
                                           "primary_hostname": PRIMARY})  # fmt: skip
    return Services.create(replace(base, **overrides))  # type: ignore[arg-type]


def test_quick_answers_what_needs_no_waiting_exactly_as_the_async_path(snap: Snapshot) -> None:
    services = _services(spf_enabled=False)
    try:
        remembered = Outcome("refused", "mx[192.0.2.9] RCPT 550 5.1.1 no such user")
        services.callouts._positive = None  # only the negative cache holds this one
        assert services.callouts._negative is not None
        services.callouts._negative["gone@remote.example"] = remembered
        cases = [
            ("newsletter@shop.example", "203.0.113.5", ""),  # senderverify_exceptions
            ("", "203.0.113.5", ""),  # <>
            ("x@remote.example", "192.0.2.7", ""),  # relay_from_hosts
            ("x@remote.example", "203.0.113.5", "bob@example.org"),  # authenticated
            ("gone@Remote.Example", "203.0.113.5", ""),  # a cached refusal
        ]
        for sender, ip, auth in cases:
            c = Context("MAIL", ip, sender, "", "helo.example", auth, snap, Limits(),
                        services=services)  # fmt: skip
            quick = evaluate_quick(c)
            assert quick is not None, sender
            assert quick == asyncio.run(evaluate_async(c)), sender
        assert quick.status.code == 550 and "(cached)" in quick.reason
        # Not cached: it must wait for a callout, so no quick answer (and nothing started).
        c = Context("MAIL", "203.0.113.5", "new@remote.example", "", "h", "", snap, Limits(),
                    services=services)  # fmt: skip
        assert evaluate_quick(c) is None and services.callouts.stats.callouts == 0
        # SPF on: an outside sender's record must be evaluated, never answered quickly.
        spf_on = _services()
        c = Context("MAIL", "203.0.113.5", "newsletter@shop.example", "", "h", "", snap,
                    Limits(), services=spf_on)  # fmt: skip
        assert evaluate_quick(c) is None
        spf_on.close()
    finally:
        services.close()


def test_quick_is_none_for_a_stage_with_a_check_it_cannot_answer(snap: Snapshot) -> None:
    c = Context("DATA", "203.0.113.5", "x@remote.example", "", "h", "", snap, Limits(),
                message_id="1tAbCd-000XyZ-12", rcpt_count=1)  # fmt: skip
    assert evaluate_quick(c) is None
