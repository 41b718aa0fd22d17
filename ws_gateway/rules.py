"""The gateway's decisions that need no I/O: plain functions, unit-tested without NATS.

Where a KV or JetStream subscription starts and what its `ok` reports (`position`,
`recovered`); which of a session's overlapping patterns delivers a message; whether a message
on a shared core subscription may reach a client at all; the per-session op budget.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass

from nats.js import api
from nats.js.errors import APIError

from shared.capabilities import is_internal_tokens, overlaps_internal
from shared.envelope import JsSubData
from shared.errors import ErrorCode, ReplyError
from shared.failover import Unavailable, transient
from shared.subjects import match_tokens, tokens

Tokens = tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Start:
    """Where a new consumer starts: NEW, ALL, LAST_PER_SUBJECT, BY_START_SEQUENCE/TIME."""

    policy: api.DeliverPolicy
    seq: int | None = None
    time: dt.datetime | None = None


@dataclass(frozen=True, slots=True)
class Resume:
    """A kv_sub's start: what its `ok` reports, and the revisions the client already has."""

    position: int
    recovered: bool
    skip_through: int = 0  # current values at or below this revision are not sent again

    # Always the current value of each key (a delete marker for a deleted one): a resume
    # never replays a superseded or deleted value that a fresh reader would not get.
    start = Start(api.DeliverPolicy.LAST_PER_SUBJECT)


def kv_resume(since: int | None, first: int, last: int) -> Resume:
    """Resume after `since` only when every change after it is still stored (first stored
    revision ≤ since + 1 ≤ last + 1): then only the keys changed since are sent. Otherwise
    the whole current state, `recovered: false`."""
    if since is not None and since <= last and since + 1 >= first:
        return Resume(since + 1, True, skip_through=since)
    return Resume(first if last else 0, False)


def js_start(d: JsSubData, first: int, last: int, now: dt.datetime) -> tuple[Start, bool]:
    """A js_sub's start and `recovered`, from the request and the stream's state."""
    if d.start_seq is not None:
        recovered = first <= d.start_seq <= last + 1 or (last == 0 and d.start_seq == 1)
        if d.start_seq > last + 1:
            return Start(api.DeliverPolicy.ALL), recovered  # the stream was recreated: replay
        return Start(api.DeliverPolicy.BY_START_SEQUENCE, seq=d.start_seq), recovered
    if d.time_delta is not None:
        since = now - dt.timedelta(seconds=d.time_delta)
        return Start(api.DeliverPolicy.BY_START_TIME, time=since), True
    if d.start_time is not None:
        t = d.start_time if d.start_time.tzinfo else d.start_time.replace(tzinfo=dt.UTC)
        return Start(api.DeliverPolicy.BY_START_TIME, time=t), True
    return Start(api.DeliverPolicy.NEW), True


def is_primary(patterns: Mapping[str, Tokens], pattern: str, subject: Tokens) -> bool:
    """True when `pattern` is the smallest of a session's `patterns` matching `subject`: a
    message that several of one session's subscriptions match is delivered once, by it."""
    for other, ot in patterns.items():
        if other < pattern and match_tokens(ot, subject):
            return False
    return True


class CoreFilter:
    """What a shared core subscription on `pattern` may hand to clients.

    NATS routes a message to a subscription by the subject it was sent to, which for the
    gateway's own JetStream and KV reads is one of its `_INBOX.…` subjects, while the
    message itself carries the stored subject. A wide pattern (`*.*`, `>`) therefore also
    receives the gateway's private deliveries for other users. Only a message published on
    a subject that the pattern matches, and that is not internal where the pattern reaches
    internal subjects, is delivered; a JetStream delivery is told by its `$JS.ACK.` reply.
    """

    __slots__ = ("_internal", "_literal", "pattern", "tokens")

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        self.tokens = tokens(pattern)
        self._literal = "*" not in self.tokens and ">" not in self.tokens
        self._internal = overlaps_internal(pattern)

    def check(self, subject: str, reply: str) -> Tokens | None:
        """The subject's tokens if the message may be delivered, else None."""
        if reply.startswith("$JS.ACK."):
            return None
        if self._literal:
            return self.tokens if subject == self.pattern else None
        st = tokens(subject)
        if not match_tokens(self.tokens, st):
            return None
        if self._internal and is_internal_tokens(st):
            return None
        return st


class OpBudget:
    """A token bucket: `rate` ops per second, bursts of `burst`. Time is passed in."""

    __slots__ = ("_at", "_burst", "_rate", "_tokens")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self._rate, self._burst = rate, float(burst)
        self._tokens, self._at = float(burst), now

    def take(self, now: float) -> bool:
        """Spend one op; False when the budget is empty (nothing is spent then)."""
        self._tokens = min(self._burst, self._tokens + max(0.0, now - self._at) * self._rate)
        self._at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True


# JetStream's own error codes (nats-server's errors.json), by what they mean to a client.
JS_LIMITS = frozenset(
    {
        10002,  # account resources exceeded
        10023,  # insufficient resources
        10026,  # maximum consumers limit reached (1,000 per stream by default)
        10027,  # maximum number of streams reached
        10028,  # insufficient memory resources
        10047,  # insufficient storage resources
    }
)
JS_STREAM_NOT_FOUND = 10059
JS_FILTER_NOT_SUBSET = 10093  # the filter does not fit the stream's subjects


def js_reply_error(e: Exception, stream: str) -> ReplyError | None:
    """What a failed JetStream request means to the client, by error code and type: a
    server limit is `limit`, an outage `unavailable`, only the client's own mistake
    `bad_request`. None: not a JetStream error (let it surface as internal)."""
    if isinstance(e, Unavailable) or transient(e):
        return ReplyError(ErrorCode.UNAVAILABLE, "JetStream is unavailable: retry later")
    if not isinstance(e, APIError):
        return None
    code = e.err_code
    if code in JS_LIMITS:
        return ReplyError(ErrorCode.LIMIT, f"JetStream limit reached: {e.description}")
    if (e.code or 0) >= 500:
        return ReplyError(ErrorCode.UNAVAILABLE, "JetStream is unavailable: retry later")
    if code == JS_STREAM_NOT_FOUND:
        return ReplyError(ErrorCode.NOT_FOUND, f"no stream {stream!r}")
    if code == JS_FILTER_NOT_SUBSET:
        return ReplyError(ErrorCode.BAD_REQUEST, "filter does not fit the stream's subjects")
    return None
