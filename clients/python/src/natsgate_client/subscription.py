"""Subscriptions: what `async for` iterates, with a bounded queue and the resume state.

Overflow policy: each subscription holds at most `maxsize` unread items. When one more
arrives, the subscription ends with reason `overflow` (the server is told to stop sending
it); what was queued is still yielded, then iteration raises `SubscriptionEnded`. Nothing
is dropped silently and memory stays bounded: a consumer slower than its data learns it,
and resubscribes (a KV or stream subscription from where it stopped) when it can keep up.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from natsgate_client.errors import SubscriptionEnded
from natsgate_client.messages import (
    Gap,
    JsMsgFrame,
    KvChange,
    KvEvent,
    KvMsgFrame,
    KvSynced,
    Message,
    OkData,
    StreamEvent,
    StreamMessage,
)

if TYPE_CHECKING:
    from natsgate_client.client import Client

T = TypeVar("T")

# Ends that are the consumer's own doing: iteration stops without an exception.
QUIET_ENDS = frozenset({"unsubscribed", "client_closed"})


def match(pattern: str, subject: str) -> bool:
    """NATS wildcard matching: `*` one token, `>` one or more trailing tokens."""
    p, s = pattern.split("."), subject.split(".")
    for i, tok in enumerate(p):
        if tok == ">":
            return len(s) > i
        if i >= len(s) or (tok != "*" and tok != s[i]):
            return False
    return len(p) == len(s)


class Subscription(Generic[T]):
    """One subscription; kept across reconnects (made again on each new session)."""

    kind: ClassVar[str] = ""

    def __init__(self, client: Client, target: str, pattern: str, inbox: str, maxsize: int):
        self._client = client
        self.target, self.pattern, self.inbox, self.maxsize = target, pattern, inbox, maxsize
        self.position: int | None = None  # from the last `ok` (docs/protocol.md, resume contract)
        self.recovered: bool | None = None
        self.ended: SubscriptionEnded | None = None
        self._items: deque[T] = deque()
        self._wake = asyncio.Event()
        self._gen = -1  # the session it was last requested on
        self._live_gen = -1  # the session whose `ok` it got: fan-out is routed to it then
        self._ok_count = 0
        self._first_ok: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # -------------------------------------------------------------- consumer side

    def __aiter__(self) -> Subscription[T]:
        return self

    async def __anext__(self) -> T:
        while True:
            if self._items:
                return self._items.popleft()
            if self.ended is not None:
                if self.ended.reason in QUIET_ENDS:
                    raise StopAsyncIteration
                raise self.ended
            self._wake.clear()
            await self._wake.wait()

    async def get(self, timeout: float | None = None) -> T:
        """The next item; `SubscriptionEnded` once it has ended and its queue is empty."""
        async with asyncio.timeout(timeout):
            try:
                return await self.__anext__()
            except StopAsyncIteration:
                assert self.ended is not None
                raise self.ended from None

    @property
    def pending(self) -> int:
        """Items queued and not yet read (at most `maxsize`)."""
        return len(self._items)

    async def unsub(self) -> None:
        """End it here and on the server; iteration then stops (no exception)."""
        await self._client._unsub(self, {})

    # -------------------------------------------------------------- client side

    def _request_data(self) -> dict[str, Any] | None:
        return None

    def _on_ok(self, data: OkData) -> None:
        self.position, self.recovered = data.position, data.recovered
        self._ok_count += 1
        if not self._first_ok.done():
            self._first_ok.set_result(None)

    @property
    def _resumed(self) -> bool:
        return self._ok_count > 1

    def _room(self) -> bool:
        """Whether one more item fits; if not, it ends the subscription (overflow). Checked
        before an item moves the resume point, so that point stays at the last item kept."""
        if self.ended is not None:
            return False
        if len(self._items) >= self.maxsize:
            self._client._end(self, "overflow", f"{self.maxsize} items unread")
            return False
        return True

    def _push(self, item: T) -> None:
        if self._room():
            self._items.append(item)
            self._wake.set()

    def _finish(self, ended: SubscriptionEnded, first: Exception | None = None) -> None:
        """Ended; `first`: what a caller still waiting for its first `ok` gets instead."""
        if self.ended is None:
            self.ended = ended
        self._wake.set()
        if not self._first_ok.done():
            self._first_ok.set_exception(first or ended)
            self._first_ok.exception()  # retrieved: the caller may have given up waiting


class CoreSubscription(Subscription[Message]):
    """`sub`: at-most-once; what is published while disconnected is not delivered."""

    kind = "sub"
    presence = False  # announced on its subject (docs/protocol.md, "Presence")

    def _request_data(self) -> dict[str, Any] | None:
        return {"presence": True} if self.presence else None


class KvSubscription(Subscription[KvEvent]):
    """`kv_sub`: yields `KvChange`s and, after each (re)subscription, `KvSynced`; keeps the
    bucket's current state in `entries` (key → its last put)."""

    kind = "kv_sub"

    def __init__(self, client: Client, target: str, pattern: str, inbox: str, maxsize: int):
        super().__init__(client, target, pattern, inbox, maxsize)
        self.entries: dict[str, KvChange] = {}
        self.revision: int | None = None  # the next since_revision
        self._round: set[str] | None = None  # keys seen since the last ok, until synced
        self._synced = asyncio.Event()

    @property
    def values(self) -> dict[str, Any]:
        """key → JSON value of every key present now."""
        return {k: c.value for k, c in self.entries.items()}

    async def synced(self, timeout: float | None = None) -> None:
        """Until the current (re)subscription has sent every current value."""
        async with asyncio.timeout(timeout):
            await self._synced.wait()

    def _request_data(self) -> dict[str, Any]:
        data: dict[str, Any] = {"pattern": self.pattern}
        if self.revision is not None:
            data["since_revision"] = self.revision
        return data

    def _on_ok(self, data: OkData) -> None:
        super()._on_ok(data)
        self._round = set()
        self._synced.clear()

    def _on_change(self, frame: KvMsgFrame) -> None:
        if not self._room():
            return
        change = KvChange.of(frame)
        if self._round is not None:
            self._round.add(change.key)
        elif self.revision is not None:
            # Live changes come in revision order: resume after the last one seen. Within a
            # round they may not, so the round's resume point is its `synced`.
            self.revision = max(self.revision, change.revision)
        if change.op == "put":
            self.entries[change.key] = change
        else:
            self.entries.pop(change.key, None)
        self._push(change)

    def _on_synced(self, revision: int) -> None:
        seen, self._round = self._round or set(), None
        if not self.recovered:
            # A full reload: a key it did not send is gone (deleted while we were away,
            # and its delete marker trimmed).
            for key in [k for k in self.entries if k not in seen]:
                del self.entries[key]
                self._push(KvChange(self.target, key, "drop", revision))
        self.revision = revision
        self._push(KvSynced(self.target, revision, bool(self.recovered)))
        self._synced.set()


class StreamSubscription(Subscription[StreamEvent]):
    """`js_sub`: yields each `StreamMessage` once, in `seq` order, across reconnects
    (resumes at last seq + 1, drops what it already had); a `Gap` when it cannot."""

    kind = "js_sub"

    def __init__(
        self,
        client: Client,
        target: str,
        pattern: str,
        inbox: str,
        maxsize: int,
        options: dict[str, Any],
    ):
        super().__init__(client, target, pattern, inbox, maxsize)
        self.options = options
        self.last_seq = 0
        self.duplicates = 0  # messages it had already, dropped (a resumed durable resends)

    def _request_data(self) -> dict[str, Any]:
        data = {"filter": self.pattern, **self.options}
        if self._ok_count and "durable" not in self.options:
            # Resume: replace the first start point by the next message.
            for k in ("start_seq", "time_delta", "start_time"):
                data.pop(k, None)
            data["start_seq"] = self.last_seq + 1
        return data

    def _on_ok(self, data: OkData) -> None:
        super()._on_ok(data)
        if self._resumed and data.recovered is False and self.last_seq:
            position = data.position or 1
            self._push(Gap(self.target, self.last_seq + 1, position))
            if position <= self.last_seq:  # the stream was recreated: seqs start again
                self.last_seq = position - 1

    def _on_msg(self, frame: JsMsgFrame) -> None:
        if not self._room():
            return
        seq = frame.data.seq
        if seq <= self.last_seq:
            self.duplicates += 1
            if self.options.get("ack"):
                self._client._spawn(self._client._ack_quietly(self, seq))
            return
        self.last_seq = seq
        self._push(StreamMessage.of(frame))

    async def ack(self, seq: int) -> None:
        """Acknowledge a message (`ack=True` subscriptions)."""
        await self._client._ack(self, seq)

    async def unsub(self, *, delete_durable: bool = False) -> None:
        await self._client._unsub(self, {"delete_durable": True} if delete_durable else {})
