"""Shared KV watches: one live reader per (bucket, key pattern) per process.

Every `kv_sub` on the same bucket and pattern in a process shares one JetStream consumer;
each change is encoded once and the same bytes go to every member (KV fan-out carries no
inbox). A member that joins late first reads the current values through a private
catch-up consumer while the shared feed's live changes are buffered for it; at `synced`
the buffer is replayed from just after the last revision the catch-up covered and the
member goes live. No gap (the member joined the feed before the catch-up started), no
duplicate (everything at or below the catch-up's cutoff is dropped from the buffer).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Literal

from nats.aio.client import Client as NATS
from nats.js import api
from nats.js.client import JetStreamContext

from shared import envelope
from ws_gateway.reader import Delivery, Start, StreamReader

log = logging.getLogger("ws_gateway.kvfeed")

KvOp = Literal["put", "delete", "purge"]


def kv_op(d: Delivery) -> KvOp:
    headers = d.headers or {}
    op = headers.get("KV-Operation")
    marker = headers.get("Nats-Marker-Reason")
    if op == "DEL" or marker == "Remove":
        return "delete"
    if op == "PURGE" or marker in ("MaxAge", "Purge"):
        return "purge"
    return "put"


def encode_change(bucket: str, key: str, d: Delivery) -> bytes:
    op = kv_op(d)
    return envelope.kv_msg(bucket, key, op, d.stream_seq, d.data if op == "put" else None)


class Member:
    """One kv_sub's place in a feed."""

    __slots__ = ("buffer", "cutoff", "deliver", "live", "wanted")

    def __init__(self, deliver: Callable[[bytes], bool], wanted: Callable[[str], bool]) -> None:
        self.deliver = deliver  # push to the session's outbox
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
        self._prefix_len = len(f"$KV.{bucket}.")
        self.reader = StreamReader(
            nc,
            js,
            f"KV_{bucket}",
            f"$KV.{bucket}.{pattern}",
            Start(api.DeliverPolicy.NEW),
            self._on_message,
            batch=256,
            on_lost=self._on_lost,
            gate=gate,
        )
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.on_gone: Callable[[KvFeed], None] | None = None

    def _on_message(self, d: Delivery) -> bool:
        key = d.subject[self._prefix_len :]
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


class KvFeeds:
    """The process's feeds, by (bucket, pattern), reference-counted by their members."""

    def __init__(
        self, nc: NATS, js: JetStreamContext, gate: Callable[[], bool] | None = None
    ) -> None:
        self._nc, self._js = nc, js
        self._gate = gate
        self.feeds: dict[tuple[str, str], KvFeed] = {}
        self.on_gone: Callable[[KvFeed], None] | None = None

    def __len__(self) -> int:
        return len(self.feeds)

    async def join(self, bucket: str, pattern: str, member: Member) -> KvFeed:
        key = (bucket, pattern)
        feed = self.feeds.get(key)
        if feed is None:
            feed = KvFeed(self._nc, self._js, bucket, pattern, self._gate)
            feed.on_gone = self._gone
            self.feeds[key] = feed
            feed.members.add(member)
            try:
                await feed.reader.start()
            except BaseException as e:
                self.feeds.pop(key, None)
                feed.ready.set_exception(e)
                feed.ready.exception()
                raise
            feed.ready.set_result(None)
        else:
            feed.members.add(member)
            try:
                await asyncio.shield(feed.ready)
            except Exception:
                feed.members.discard(member)
                raise
        return feed

    async def leave(self, feed: KvFeed, member: Member) -> None:
        feed.members.discard(member)
        if feed.members or self.feeds.get((feed.bucket, feed.pattern)) is not feed:
            return
        del self.feeds[(feed.bucket, feed.pattern)]
        await feed.reader.close()

    def _gone(self, feed: KvFeed) -> None:
        if self.feeds.get((feed.bucket, feed.pattern)) is feed:
            del self.feeds[(feed.bucket, feed.pattern)]
        if self.on_gone:
            self.on_gone(feed)

    def mark_lost(self) -> None:
        for feed in self.feeds.values():
            feed.reader.mark_lost()

    async def close(self) -> None:
        for feed in list(self.feeds.values()):
            await feed.reader.close()
        self.feeds.clear()
