"""Read a JetStream stream continuously through a pull consumer, resumably.

One reader per KV watch, KV catch-up and shared stream tail (never one per JetStream
subscription: those are cursors on the tail, ws_gateway/jscursor.py). No acks: its
consumers are ephemeral, in memory, R1. Messages are handled in the NATS
subscription callback (no extra queue hop); the next pull is issued only when the sink
has room, so a slow reader of history is slowed, not dropped. If the consumer is lost
(NATS restart, ephemeral consumer expired during an outage, leader change) the reader
recreates it from the last stream sequence it delivered + 1: no gap, no duplicate.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import api
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError

from shared import failover, logs
from shared.tasks import cancel_and_wait
from ws_gateway.rules import Start

log = logging.getLogger("ws_gateway.reader")

STREAM_NOT_FOUND = 10059  # JetStream's err_code; 10014 is "consumer not found"
PULL_EXPIRES = 30.0
# A pull request's heartbeat: a reader whose consumer's node died notices after 2.5 of them
# (~1.9 s) and recreates it on a live node. Readers are shared per (stream, filter) per
# process, so this costs a few small messages a second, whatever the number of clients.
IDLE_HEARTBEAT = 0.75
EPHEMERAL_INACTIVE = 300.0  # survives NATS outages of a few minutes without a resume
STREAM_GRACE = 30.0  # a stream missing after a reconnect for longer than this is gone


@dataclass(slots=True)
class Delivery:
    stream_seq: int
    pending: int  # messages left for this consumer after this one
    subject: str
    data: bytes
    headers: dict[str, str] | None
    time_ns: int  # when the stream stored it


def parse_ack_reply(reply: str) -> tuple[str, int, int, int, int]:
    """(consumer, delivered count, stream seq, timestamp ns, pending) from an ack subject.

    `$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>`, or the newer
    form with domain and account hash before the stream (and a trailing token). nats-py's
    `msg.metadata` does the same with dataclasses and datetimes: a quarter of the
    gateway's CPU in a JetStream catch-up, by profile.
    """
    t = reply.split(".")
    if len(t) == 9:
        return t[3], int(t[4]), int(t[5]), int(t[7]), int(t[8])
    return t[5], int(t[6]), int(t[7]), int(t[9]), int(t[10])


OnMessage = Callable[[Delivery], bool]  # False: the sink is closed, not delivered
WaitRoom = Callable[[bool], Awaitable[int]]  # (whole) -> bytes of room; see Outbox.wait_room


class StreamReader:
    def __init__(
        self,
        nc: NATS,
        js: JetStreamContext,
        stream: str,
        filter_subject: str | None,
        start: Start,
        on_message: OnMessage,
        *,
        batch: int = 256,
        wait_room: WaitRoom | None = None,
        on_lost: Callable[[Exception], None] | None = None,
        gate: Callable[[], bool] | None = None,
    ) -> None:
        self._nc, self._js = nc, js
        self.stream, self.filter_subject = stream, filter_subject
        self._start = start
        self._on_message = on_message
        self._batch = batch
        self._wait_room = wait_room
        self._on_lost = on_lost
        self._gate = gate  # False: hold deliveries (capabilities being re-read after an outage)
        self.consumer: str | None = None
        self.last_seq = 0  # last stream sequence handed to on_message
        self.initial_pending = 0
        self.info: api.ConsumerInfo | None = None  # as created or bound
        self._bound_at = 0
        self._sub: Subscription | None = None
        self._task: asyncio.Task[None] | None = None
        self._activity = asyncio.Event()
        self._request_done = asyncio.Event()
        self._wake = asyncio.Event()  # set by mark_lost: stop waiting out a retry pause
        self._remaining = 0
        self._lost = False
        self._largest = 0  # the largest envelope a message of this stream may become
        self._missing_since: float | None = None
        self._closed = False

    # ------------------------------------------------------------------ lifecycle

    async def start(self, *, pull: bool = True) -> StreamReader:
        """Create (or bind to) the consumer, then start pulling (`pull=False`: only when
        `pull()` is called). Raises NotFoundError.

        All or nothing: if it fails or is cancelled part way, what it made is released
        (its consumer deleted) before the error propagates, and it may be called again."""
        self._closed, self.consumer = False, None
        try:
            self.info = info = await self._ensure_consumer(self._start)
            self.initial_pending = info.num_pending or 0
            self._bound_at = info.delivered.stream_seq if info.delivered else 0
            inbox = self._nc.new_inbox()
            self._sub = await self._nc.subscribe(
                inbox, cb=self._handle, pending_msgs_limit=-1, pending_bytes_limit=-1
            )
        except BaseException:
            await asyncio.shield(self.close())
            raise
        self._inbox = inbox
        if pull:
            self.pull()
        return self

    @property
    def position(self) -> int:
        """Every message of the stream up to this sequence has been handed on (or came
        before the consumer's start)."""
        return max(self.last_seq, self._bound_at)

    def pull(self) -> None:
        """Start pulling (once): nothing is fetched before, so nothing is dropped."""
        if self._task is None and not self._closed:
            self._task = asyncio.get_running_loop().create_task(
                self._pull_loop(), context=logs.detached()
            )

    async def close(self) -> None:
        """Stop pulling and release the consumer (idempotent)."""
        if self._closed:
            return
        self._closed = True
        await cancel_and_wait(self._task)
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception as e:
                self._log_release("unsubscribe", e)
        if self.consumer and self._nc.is_connected:
            try:
                await self._js.delete_consumer(self.stream, self.consumer)
            except Exception as e:  # the server removes it after its inactive threshold
                self._log_release("consumer delete", e)

    def _log_release(self, what: str, e: Exception) -> None:
        log.info(
            f"{what} failed",
            extra={"stream": self.stream, "consumer": self.consumer, "error": type(e).__name__},
        )

    # ------------------------------------------------------------------ consumer

    def _config(self, start: Start) -> api.ConsumerConfig:
        return api.ConsumerConfig(
            deliver_policy=start.policy,
            opt_start_seq=start.seq,
            opt_start_time=start.time,
            ack_policy=api.AckPolicy.NONE,
            filter_subject=self.filter_subject,  # None: the whole stream
            inactive_threshold=EPHEMERAL_INACTIVE,
            mem_storage=True,
            num_replicas=1,
        )

    async def _ensure_consumer(self, start: Start) -> api.ConsumerInfo:
        created: api.ConsumerInfo = await self._js.add_consumer(self.stream, self._config(start))
        self.consumer = created.name
        return created

    async def _recreate(self) -> None:
        """After a loss: resume right after the last delivered message."""
        if self.consumer:
            # Best effort, briefly: the old consumer may have died with its node, and its
            # inactive threshold removes it anyway. Waiting nats-py's 5 s here was most of
            # the delivery gap after a node loss.
            try:
                async with asyncio.timeout(failover.LEADER_TRY):
                    await self._js.delete_consumer(self.stream, self.consumer)
            except Exception as e:
                self._log_release("consumer delete", e)
        # Resume after what was handed on; with nothing handed on yet, after where the
        # consumer began (a NEW consumer recreated as NEW would skip the outage's changes).
        # A LAST_PER_SUBJECT snapshot with nothing delivered is simply taken again.
        floor = self.last_seq
        if not floor and self._start.policy != api.DeliverPolicy.LAST_PER_SUBJECT:
            floor = self._bound_at
        if floor:
            start = Start(api.DeliverPolicy.BY_START_SEQUENCE, seq=floor + 1)
        else:
            start = self._start
        # Bounded: after a node loss, a creation sent while the stream elects its leader
        # is asked again soon (the loop retries), not after nats-py's 5 s.
        async with asyncio.timeout(failover.TRY_TIMEOUT):
            await self._ensure_consumer(start)

    # ------------------------------------------------------------------ pulling

    async def _pull_loop(self) -> None:
        backoff = 0.1
        while not self._closed:
            self._wake.clear()  # a mark_lost from here on cuts the next pause short
            try:
                if not self._nc.is_connected or (self._gate is not None and not self._gate()):
                    # Disconnected, a request would wait in nats-py's reconnect buffer and
                    # reach the server after the outage (an orphan consumer per retry); held,
                    # it would be dropped. mark_lost wakes us when either is over.
                    self._lost = True
                    await self._pause(IDLE_HEARTBEAT)
                    continue
                if self._lost:
                    began = time.monotonic()
                    await self._recreate()
                    self._lost = False
                    self._missing_since = None
                    log.info(
                        "reader recreated",
                        extra={
                            "stream": self.stream,
                            "after": self.last_seq,
                            "ms": round((time.monotonic() - began) * 1000),
                        },
                    )
                req = {
                    "batch": self._batch,
                    "expires": int(PULL_EXPIRES * 1e9),
                    "idle_heartbeat": int(IDLE_HEARTBEAT * 1e9),
                }
                if self._wait_room is not None:
                    req["batch"] = await self._paced_batch()
                self._request_done.clear()
                self._remaining = int(req["batch"])
                await self._nc.publish(
                    f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.{self.consumer}",
                    json.dumps(req).encode(),
                    reply=self._inbox,
                )
                while not self._request_done.is_set():
                    self._activity.clear()
                    try:
                        async with asyncio.timeout(IDLE_HEARTBEAT * 2.5):
                            await self._activity.wait()
                    except TimeoutError:
                        # No message, heartbeat or status: the request or the consumer
                        # is gone (NATS restarted, or we were disconnected).
                        self._lost = True
                        break
                backoff = 0.1
            except asyncio.CancelledError:
                raise
            except NotFoundError as e:
                # Right after a NATS restart JetStream may not have loaded the stream yet:
                # only a stream still missing after a grace period is really gone.
                now = asyncio.get_running_loop().time()
                if self._lost and now - (self._missing_since or now) < STREAM_GRACE:
                    self._missing_since = self._missing_since or now
                    backoff = await self._pause(backoff)
                    continue
                if self._on_lost:
                    self._on_lost(e)
                return
            except Exception as e:
                self._lost = True
                log.info("reader retry", extra={"stream": self.stream, "error": type(e).__name__})
                backoff = await self._pause(backoff)

    async def _paced_batch(self) -> int:
        """How many messages to ask for: as many of the largest seen so far as fit in the
        sink's room (one, into an empty queue, when even one does not; one to begin with).
        Not the pull request's `max_bytes`: with no acks, the message that overflows it is
        skipped by the server, not kept for the next request."""
        wait_room = self._wait_room
        assert wait_room is not None
        room = await wait_room(False)
        if not self._largest:
            return 1
        if self._largest > room:
            await wait_room(True)
            return 1
        return max(1, min(self._batch, room // self._largest))

    async def _pause(self, seconds: float) -> float:
        """Sleep before a retry, cut short by mark_lost (NATS is back: retry now).
        Returns the next backoff: doubled, or back to the start when woken."""
        try:
            async with asyncio.timeout(seconds):
                await self._wake.wait()
            return 0.1
        except TimeoutError:
            return min(seconds * 2, 2.0)

    async def _handle(self, msg: Msg) -> None:
        self._activity.set()
        headers = msg.headers
        if not msg.reply and headers and "Status" in headers:
            status = headers["Status"]
            if status == "100":  # idle heartbeat
                return
            if status == "409" and "Consumer Deleted" in headers.get("Description", ""):
                self._lost = True
            self._request_done.set()  # 404 no messages, 408 expired, 409 …
            return
        if self._gate is not None and not self._gate():
            # Not delivered, so not counted: the reader is recreated from its last
            # delivered message once the gate opens (fail closed after an outage).
            self._lost = True
            self._request_done.set()
            return
        if self._lost:
            # From a request being abandoned (the consumer is recreated from the last
            # delivered message): taking one now could skip one dropped before it.
            return
        consumer, _, seq, ts, pending = parse_ack_reply(msg.reply)
        if consumer != self.consumer:
            return  # in flight from a consumer this reader already replaced
        if seq <= self.last_seq:
            return  # a duplicate after a consumer was recreated
        self._remaining -= 1
        if self._remaining <= 0:
            self._request_done.set()
        if self._wait_room is not None:  # only paced readers size their pulls
            # Encoded: a binary payload grows by a third in base64, plus the envelope.
            size = len(msg.data) * 4 // 3 + len(msg.subject) + 256
            if size > self._largest:
                self._largest = size
        if self._closed:
            return
        delivered = self._on_message(
            Delivery(
                stream_seq=seq,
                pending=pending,
                subject=msg.subject,
                data=msg.data,
                headers=headers,
                time_ns=ts,
            )
        )
        if delivered:
            self.last_seq = max(self.last_seq, seq)

    def mark_lost(self) -> None:
        """Called when NATS reconnects: the outstanding pull request died with the link."""
        self._lost = True
        self._request_done.set()
        self._activity.set()
        self._wake.set()
