"""Shared KV watches: one live reader per (bucket, key pattern) per process.

Every `kv_sub` on the same bucket and pattern in a process shares one JetStream consumer;
each change is encoded once and the same bytes go to every member (KV fan-out carries no
inbox). A member that joins late first reads the current values through a private
catch-up consumer while the shared feed's live changes are buffered for it; at `synced`
the buffer is replayed from just after the last revision the catch-up covered and the
member goes live. No gap (the member joined the feed before the catch-up started), no
duplicate (everything at or below the catch-up's cutoff is dropped from the buffer).

A subscription *acquires* a feed (reference counted: the consumer is created with the first
and deleted with the last), then adds its member; ending it removes the member at once and
releases the feed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from nats.aio.client import Client as NATS
from nats.js import api
from nats.js.client import JetStreamContext

from shared import envelope, kvwire
from ws_gateway.feeds import Feeds
from ws_gateway.reader import Delivery, StreamReader
from ws_gateway.rules import Start

log = logging.getLogger("ws_gateway.kvfeed")


def encode_change(bucket: str, key: str, d: Delivery) -> bytes:
    op = kvwire.kv_op(d.headers)
    return envelope.kv_msg(bucket, key, op, d.stream_seq, d.data if op == "put" else None)


class Member:
    """One kv_sub's place in a feed."""

    __slots__ = ("buffer", "cutoff", "deliver", "live", "wanted")

    def __init__(self, deliver: Callable[[bytes], bool], wanted: Callable[[str], bool]) -> None:
        self.deliver = deliver  # to the subscription: nothing once it has ended
        self.wanted = wanted  # False when another kv_sub of the session delivers this key
        self.live = False
        self.cutoff = 0  # revisions at or below this came from the catch-up
        self.buffer: list[tuple[int, str, bytes]] = []

    def go_live(self, cutoff: int) -> None:
        self.cutoff = cutoff
        for seq, key, frame in self.buffer:
            if seq > cutoff and self.wanted(key):
                self.deliver(frame)
        self.buffer = []
        self.live = True


class KvFeed:
    def __init__(
        self,
        nc: NATS,
        js: JetStreamContext,
        bucket: str,
        pattern: str,
        gate: Callable[[], bool] | None = None,
    ) -> None:
        self.bucket, self.pattern = bucket, pattern
        self.members: set[Member] = set()
        self.refs = 0  # subscriptions holding the feed, live or still setting up
        self._key_at = kvwire.key_offset(bucket)
        self.reader = StreamReader(
            nc,
            js,
            kvwire.stream_of(bucket),
            kvwire.subject_of(bucket, pattern),
            Start(api.DeliverPolicy.NEW),
            self._on_message,
            batch=256,
            on_lost=self._on_lost,
            gate=gate,
        )
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.on_gone: Callable[[KvFeed], None] | None = None

    def _on_message(self, d: Delivery) -> bool:
        key = d.subject[self._key_at :]
        frame = encode_change(self.bucket, key, d)
        seq = d.stream_seq
        for m in tuple(self.members):
            if m.live:
                if seq > m.cutoff and m.wanted(key):
                    m.deliver(frame)
            else:
                m.buffer.append((seq, key, frame))
        return True

    def _on_lost(self, e: Exception) -> None:
        if self.on_gone:
            self.on_gone(self)


class KvFeeds(Feeds[tuple[str, str], KvFeed]):
    """The process's feeds, by (bucket, pattern), reference-counted by their subscriptions."""

    def __init__(
        self, nc: NATS, js: JetStreamContext, gate: Callable[[], bool] | None = None
    ) -> None:
        super().__init__()
        self._nc, self._js = nc, js
        self._gate = gate

    def _make(self, key: tuple[str, str]) -> KvFeed:
        return KvFeed(self._nc, self._js, *key, self._gate)

    def _key(self, feed: KvFeed) -> tuple[str, str]:
        return (feed.bucket, feed.pattern)

    async def acquire(self, bucket: str, pattern: str) -> KvFeed:
        """Raises NotFoundError for a missing bucket."""
        return await self._acquire((bucket, pattern))
