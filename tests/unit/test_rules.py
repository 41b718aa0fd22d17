"""The gateway's pure decisions (ws_gateway/rules.py): no NATS, no sockets."""

from __future__ import annotations

import datetime as dt

import pytest
from nats.js import api

from shared.envelope import JsSubData
from shared.subjects import tokens
from ws_gateway.rules import (
    CoreFilter,
    OpBudget,
    Resume,
    Start,
    is_primary,
    js_start,
    kv_resume,
)

BY_SEQ = api.DeliverPolicy.BY_START_SEQUENCE
LAST = api.DeliverPolicy.LAST_PER_SUBJECT


@pytest.mark.parametrize(
    ("since", "first", "last", "expected"),
    [
        (None, 1, 10, Resume(1, False)),
        (None, 0, 0, Resume(0, False)),  # an empty bucket
        (10, 1, 10, Resume(11, True, skip_through=10)),  # up to date
        (4, 1, 10, Resume(5, True, skip_through=4)),
        (4, 5, 10, Resume(5, True, skip_through=4)),  # first missing is first stored
        (3, 5, 10, Resume(5, False)),  # revision 4 is gone: full state
        (11, 1, 10, Resume(1, False)),  # from a bucket recreated since
        (0, 1, 10, Resume(1, True, skip_through=0)),
    ],
)
def test_kv_resume(since: int | None, first: int, last: int, expected: Resume) -> None:
    """Resume only when every change after `since` is still stored; else the full state.
    Either way the current value per key: never a superseded one."""
    resume = kv_resume(since, first, last)
    assert resume == expected
    assert resume.start == Start(LAST)


NOW = dt.datetime(2026, 12, 3, 12, 0, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    ("data", "first", "last", "start", "recovered"),
    [
        (JsSubData(), 1, 10, Start(api.DeliverPolicy.NEW), True),
        (JsSubData(start_seq=5), 1, 10, Start(BY_SEQ, seq=5), True),
        (JsSubData(start_seq=11), 1, 10, Start(BY_SEQ, seq=11), True),  # the next one
        (JsSubData(start_seq=2), 5, 10, Start(BY_SEQ, seq=2), False),  # 2-4 are gone
        (JsSubData(start_seq=50), 1, 10, Start(api.DeliverPolicy.ALL), False),  # recreated
        (JsSubData(start_seq=1), 0, 0, Start(BY_SEQ, seq=1), True),  # empty stream
        (
            JsSubData(time_delta=60),
            1,
            10,
            Start(api.DeliverPolicy.BY_START_TIME, time=NOW - dt.timedelta(seconds=60)),
            True,
        ),
        (
            JsSubData(start_time=dt.datetime(2026, 1, 1)),  # naive: taken as UTC
            1,
            10,
            Start(api.DeliverPolicy.BY_START_TIME, time=dt.datetime(2026, 1, 1, tzinfo=dt.UTC)),
            True,
        ),
    ],
)
def test_js_start(data: JsSubData, first: int, last: int, start: Start, recovered: bool) -> None:
    """Where a js_sub starts, and whether what it asked for is all still stored."""
    assert js_start(data, first, last, NOW) == (start, recovered)


def test_the_smallest_matching_pattern_delivers() -> None:
    """Of one session's overlapping patterns, only the smallest matching one delivers."""
    patterns = {p: tokens(p) for p in ("a.>", "a.b", "x.*")}
    subject = tokens("a.b")
    assert is_primary(patterns, "a.>", subject)  # "a.>" < "a.b"
    assert not is_primary(patterns, "a.b", subject)
    assert is_primary(patterns, "a.>", tokens("a.c"))
    assert is_primary({"x.*": tokens("x.*")}, "x.*", tokens("x.y"))


@pytest.mark.parametrize(
    ("pattern", "subject", "reply", "delivers"),
    [
        ("bench.fan", "bench.fan", "", True),
        ("bench.fan", "bench.other", "", False),
        ("chat.*", "chat.x", "", True),
        ("chat.*", "chat.x", "reply.to.me", True),  # a request is a publication
        # The gateway's own JetStream deliveries, routed to its inbox: never handed on.
        ("*.*", "chat.room.123", "$JS.ACK.chat.c1.1.5.5.1700000000000000000.0", False),
        ("*.*", "chat.x", "$JS.ACK.chat.c1.1.5.5.1700000000000000000.0", False),
        (">", "chat.room.1", "$JS.ACK.chat.c1.1.5.5.1700000000000000000.0", False),
        ("*.*", "chat.room.123", "", False),  # 3 tokens never match 2
        ("*.*", "_INBOX.abc", "", False),  # internal, reached by a wide pattern
        ("*.*.*", "_INBOX.abc.def", "", False),
        (">", "$KV.articles.a", "", False),
        (">", "cmd.chat.send", "", False),
        (">", "chat.room.1", "", True),
        ("*.*.*.*", "a.b.c.d", "", True),
    ],
)
def test_core_filter(pattern: str, subject: str, reply: str, delivers: bool) -> None:
    """A shared core subscription hands on only publications its pattern matches."""
    assert (CoreFilter(pattern).check(subject, reply) is not None) is delivers


def test_op_budget_bursts_then_refills_at_its_rate() -> None:
    """`burst` ops at once, then one per 1/rate seconds; an empty budget spends nothing."""
    budget = OpBudget(rate=4, burst=3, now=100.0)
    assert [budget.take(100.0) for _ in range(4)] == [True, True, True, False]
    assert not budget.take(100.125)  # half an op refilled
    assert budget.take(100.25)
    assert not budget.take(100.25)
    assert [budget.take(1000.0) for _ in range(4)] == [True, True, True, False]  # capped
