"""Reference-counted shared readers: a KV feed per (bucket, pattern), a JetStream tail per
stream. The first subscription that acquires one creates its consumer, the others wait for
that; the last one to release it deletes the consumer."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable
from typing import Generic, Protocol, TypeVar

from ws_gateway.reader import StreamReader


class Feed(Protocol):
    refs: int
    reader: StreamReader
    ready: asyncio.Future[None]
    on_gone: Callable[..., None] | None


K = TypeVar("K", bound=Hashable)
F = TypeVar("F", bound=Feed)


class Feeds(Generic[K, F]):
    """The process's shared readers of one kind, by key."""

    def __init__(self) -> None:
        self.feeds: dict[K, F] = {}
        self.on_gone: Callable[[F], None] | None = None

    def __len__(self) -> int:
        return len(self.feeds)

    def _make(self, key: K) -> F:
        raise NotImplementedError

    def _key(self, feed: F) -> K:
        raise NotImplementedError

    async def _acquire(self, key: K) -> F:
        """A reference to the reader of `key`, its consumer created. Give it back with
        `release`, whatever happens. Raises what creating the consumer raised."""
        feed = self.feeds.get(key)
        if feed is not None:
            feed.refs += 1
            try:
                await asyncio.shield(feed.ready)
            except BaseException:
                feed.refs -= 1
                raise
            return feed
        feed = self._make(key)
        feed.on_gone = self._gone
        feed.refs = 1
        self.feeds[key] = feed
        try:
            await feed.reader.start()  # all or nothing: a failed start released its consumer
        except BaseException as e:
            if self.feeds.get(key) is feed:
                del self.feeds[key]
            cause = e if isinstance(e, Exception) else ConnectionError("feed start cancelled")
            feed.ready.set_exception(cause)
            feed.ready.exception()
            raise
        feed.ready.set_result(None)
        return feed

    async def release(self, feed: F) -> None:
        """Give back one reference; the last one deletes the reader's consumer."""
        feed.refs -= 1
        if feed.refs > 0:
            return
        if self.feeds.get(self._key(feed)) is feed:
            del self.feeds[self._key(feed)]
        await feed.reader.close()

    def _gone(self, feed: F) -> None:
        if self.feeds.get(self._key(feed)) is feed:
            del self.feeds[self._key(feed)]
        if self.on_gone:
            self.on_gone(feed)

    def mark_lost(self) -> None:
        for feed in self.feeds.values():
            feed.reader.mark_lost()

    async def close(self) -> None:
        for feed in list(self.feeds.values()):
            await feed.reader.close()
        self.feeds.clear()
