"""Shared JetStream tails: one live consumer per stream per process, whatever the filters.

Every non-durable `js_sub` of a process on a stream is a member of that stream's tail: one
NATS consumer with no filter, starting at new messages, read by a `StreamReader`. Each
message is matched against the members' filters in the process (grouped by filter, so a
filter shared by a thousand members is matched once) and its `js_body` is encoded once for
all of them. 1,000 browsers tailing a stream are one consumer on the server, so the
stream's consumer limit is never reached by subscribers.

A tail is reference counted like a KV feed: created with its first member, deleted with the
last. `position` is the sequence up to which the tail has seen the stream; a member that
starts in the past reads history (history.py) until it has caught up with it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from nats.aio.client import Client as NATS
from nats.js import api
from nats.js.client import JetStreamContext

from shared import envelope
from shared.subjects import match_tokens, tokens
from ws_gateway.feeds import Feeds
from ws_gateway.reader import Delivery, StreamReader
from ws_gateway.rules import Start, Tokens


class TailMember(Protocol):
    def on_tail(self, seq: int, body: bytes) -> None: ...


class JsTail:
    def __init__(
        self, nc: NATS, js: JetStreamContext, stream: str, gate: Callable[[], bool] | None
    ) -> None:
        self.stream = stream
        self.refs = 0
        # filter → (its tokens, its members); a member is in exactly one filter's set.
        # Literal filters (no wildcard) are found by the subject itself: thousands of
        # subscribers with a subject each cost one lookup per message, not one match each.
        self.filters: dict[str, tuple[Tokens, set[TailMember]]] = {}
        self.literal: dict[str, set[TailMember]] = {}
        self.reader = StreamReader(
            nc,
            js,
            stream,
            None,
            Start(api.DeliverPolicy.NEW),
            self._on_message,
            batch=256,
            on_lost=self._on_lost,
            gate=gate,
        )
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.on_gone: Callable[[JsTail], None] | None = None

    @property
    def position(self) -> int:
        return self.reader.position

    def add(self, filter: str, member: TailMember) -> None:
        if _is_literal(filter):
            self.literal.setdefault(filter, set()).add(member)
            return
        entry = self.filters.get(filter)
        if entry is None:
            entry = self.filters[filter] = (tokens(filter), set())
        entry[1].add(member)

    def remove(self, filter: str, member: TailMember) -> None:
        if _is_literal(filter):
            found = self.literal.get(filter)
            if found is not None:
                found.discard(member)
                if not found:
                    del self.literal[filter]
            return
        entry = self.filters.get(filter)
        if entry is not None:
            entry[1].discard(member)
            if not entry[1]:
                del self.filters[filter]

    def _on_message(self, d: Delivery) -> bool:
        body: bytes | None = None
        exact = self.literal.get(d.subject)
        if exact:
            body = envelope.js_body(d.stream_seq, d.subject, d.data, envelope.rfc3339_ns(d.time_ns))
            for m in tuple(exact):
                m.on_tail(d.stream_seq, body)
        if not self.filters:
            return True
        subject = tokens(d.subject)
        for toks, members in tuple(self.filters.values()):
            if not match_tokens(toks, subject):
                continue
            if body is None:
                body = envelope.js_body(
                    d.stream_seq, d.subject, d.data, envelope.rfc3339_ns(d.time_ns)
                )
            for m in tuple(members):
                m.on_tail(d.stream_seq, body)
        return True

    def _on_lost(self, e: Exception) -> None:
        if self.on_gone:
            self.on_gone(self)


def _is_literal(filter: str) -> bool:
    return "*" not in filter and ">" not in filter


class JsTails(Feeds[str, JsTail]):
    """The process's tails, by stream, reference-counted by their subscriptions."""

    def __init__(
        self, nc: NATS, js: JetStreamContext, gate: Callable[[], bool] | None = None
    ) -> None:
        super().__init__()
        self._nc, self._js = nc, js
        self._gate = gate

    def _make(self, key: str) -> JsTail:
        return JsTail(self._nc, self._js, key, self._gate)

    def _key(self, feed: JsTail) -> str:
        return feed.stream

    async def acquire(self, stream: str) -> JsTail:
        """Raises NotFoundError for a missing stream."""
        return await self._acquire(stream)
