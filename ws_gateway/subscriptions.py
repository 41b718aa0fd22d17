"""A session's subscriptions (core, KV, JetStream) and their one lifecycle.

    SETTING_UP ──start() done──▶ LIVE ──end()──▶ ENDED
        └──────────────end()─────────────────────┘

Only a LIVE subscription delivers: every delivery path (the core router, a KV feed, a
catch-up or JetStream reader) goes through `deliver()`, which checks the state, and a
reader starts pulling only once its subscription is live. `end()` is the one way out, in
any state: idempotent, it stops delivery at once (synchronously) and releases everything
the subscription holds. What a setup still in flight acquires after `end()` is released
as soon as its await returns, and the setup then stops with `Ended` and delivers nothing.

Each resource is taken with `_hold(step, acquire, release)`: the release is recorded the
moment the acquisition returns, so `end()` and a failed or ended setup release exactly what
was taken, each thing once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import enum
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, Protocol, TypeVar

from nats.aio.client import Client as NATS
from nats.js import api
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError

from shared import envelope, kvwire
from shared.capabilities import SubscriptionRef
from shared.errors import ErrorCode, ReplyError
from shared.settings import Settings
from shared.subjects import tokens
from shared.tasks import cancel_and_wait
from ws_gateway import metrics
from ws_gateway.checkpoints import Checkpoints
from ws_gateway.core import CoreRouter, Shared
from ws_gateway.durables import DurableError, DurableStore, Lease, TakenOver
from ws_gateway.history import History, HistoryUnavailable, aligned
from ws_gateway.jscursor import Cursor
from ws_gateway.jsfeed import JsTail, JsTails
from ws_gateway.kvfeed import KvFeed, KvFeeds, Member, encode_change
from ws_gateway.presence import Announcement, Presence
from ws_gateway.reader import Delivery, StreamReader
from ws_gateway.rules import Start, Tokens, js_reply_error, js_start, kv_resume

log = logging.getLogger("ws_gateway.subscriptions")

T = TypeVar("T")

DURABLE_SAVE = 1.0  # at most one save of a durable's floor per this many seconds
KEEPALIVES = 8  # saves of an unmoved floor per durable_inactive: a durable held stays current


class State(enum.Enum):
    SETTING_UP = "setting up"
    LIVE = "live"
    ENDED = "ended"


class Ended(Exception):
    """The subscription was ended while it was being set up: nothing more to say."""


class Node(Protocol):
    """The process's shared machinery that subscriptions use (the hub)."""

    nc: NATS
    presence: Presence
    js: JetStreamContext
    settings: Settings
    router: CoreRouter
    kv_feeds: KvFeeds
    js_tails: JsTails
    history: History
    durables: DurableStore
    catchups: asyncio.Semaphore
    checkpoint: Checkpoints

    def delivering(self) -> bool: ...

    async def delivering_open(self) -> None: ...

    def take_reader(self, uid: str) -> None: ...

    def give_reader(self, uid: str) -> None: ...

    async def ride_out(self, op: Callable[[], Awaitable[T]], kind: str) -> T: ...


class Owner(Protocol):
    """The session a subscription belongs to, as the subscription sees it."""

    uid: str
    id: int
    core_patterns: dict[str, Tokens]

    @property
    def name(self) -> str: ...

    def push(self, frame: bytes) -> bool: ...

    def push_many(self, frames: list[bytes]) -> bool: ...

    async def wait_room(self, whole: bool = False) -> int: ...

    def room(self) -> int: ...

    def sent(self, fresh: bool = True) -> tuple[int, int]: ...

    def track_delivery(self) -> None: ...

    def kv_wanted(self, sub: KvSubscription, key: str) -> bool: ...

    def subscription_lost(
        self, sub: Subscription, code: ErrorCode = ..., reason: str = ...
    ) -> None: ...


class Subscription:
    """One subscription of a session; see the module docstring for its lifecycle."""

    kind: ClassVar[str]

    def __init__(self, ref: SubscriptionRef, owner: Owner, node: Node) -> None:
        self.ref = ref
        self.state = State.SETTING_UP
        self._owner = owner
        self._node = node
        self._held: list[tuple[object, Callable[[], Awaitable[None]]]] = []
        self._stops: list[Callable[[], None]] = []  # synchronous: stop delivering now
        self._early: set[asyncio.Task[None]] = set()  # releases run before the end
        self._ending: asyncio.Task[None] | None = None

    @property
    def live(self) -> bool:
        return self.state is State.LIVE

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Set up, go live and send `ok`. Raises ReplyError if the setup failed, Ended if
        the subscription was ended meanwhile; either way nothing is held afterwards."""
        try:
            data = await self._setup()
            await self._step("live")
        except Exception:
            ended = self._ending is not None  # ended from outside: its failure is moot
            await self._abandon()
            if ended:
                raise Ended from None
            raise
        except BaseException:
            await self._abandon()
            raise
        self.state = State.LIVE
        metrics.SUBSCRIPTIONS.labels(self.kind).inc()
        self._on_live()
        self._owner.push(envelope.ok(self.ref.inbox, self.ref.target, data))
        self._after_ok()

    def end(self) -> asyncio.Task[None]:
        """End it, in any state (idempotent): nothing is delivered from this instant; the
        returned task finishes when everything it held is released."""
        if self._ending is None:
            was_live = self.state is State.LIVE
            self.state = State.ENDED
            if was_live:
                metrics.SUBSCRIPTIONS.labels(self.kind).dec()
            self._run_stops()
            self._ending = asyncio.get_running_loop().create_task(self._release_all())
        return self._ending

    async def _abandon(self) -> None:
        """A setup that failed or was ended: release what it took, deliver nothing."""
        if self.state is not State.ENDED:
            self.state = State.ENDED
            self._run_stops()
        await asyncio.shield(self._release_all())

    def _run_stops(self) -> None:
        while self._stops:
            self._stops.pop()()

    async def _release_all(self) -> None:
        while self._held:
            _, release = self._held.pop()
            await self._release(release)
        while self._early:
            await asyncio.gather(*self._early, return_exceptions=True)

    async def _release(self, release: Callable[[], Awaitable[None]]) -> None:
        try:
            await release()
        except Exception as e:
            log.info("release failed", extra={"inbox": self.ref.inbox, "error": repr(e)})

    async def _hold(
        self, step: str, acquire: Awaitable[T], release: Callable[[T], Awaitable[None]]
    ) -> T:
        """Await `acquire` and record its release before anything else can happen; raise
        Ended if the subscription was ended meanwhile (the caller's setup then stops)."""
        value = await acquire
        self._held.append((value, lambda: release(value)))
        await self._step(step)
        return value

    async def _step(self, step: str) -> None:
        """A point where the setup has just awaited: the test hook may hold it here."""
        await self._node.checkpoint(f"{self.kind}.{step}")
        if self.state is State.ENDED:
            raise Ended

    def _take_slot(self) -> None:
        """One of the user's JetStream-reading slots, given back the instant it ends."""
        node, uid = self._node, self._owner.uid
        node.take_reader(uid)
        self._stops.append(lambda: node.give_reader(uid))

    def _release_now(self, value: object) -> None:
        """Release one held thing before the end (a catch-up that is done)."""
        for i, (held, release) in enumerate(self._held):
            if held is value:
                del self._held[i]
                task = asyncio.get_running_loop().create_task(self._release(release))
                self._early.add(task)
                task.add_done_callback(self._early.discard)
                return

    def deliver(self, frame: bytes) -> bool:
        """The only way a frame of this subscription reaches its session."""
        if self.state is not State.LIVE:
            return False
        return self._owner.push(frame)

    def deliver_many(self, frames: list[bytes]) -> bool:
        """`deliver` for a run of frames (a history block's), at once."""
        if self.state is not State.LIVE:
            return False
        return self._owner.push_many(frames)

    # ------------------------------------------------------------------ per kind

    async def _setup(self) -> Any:
        """Acquire what the subscription needs; the `ok`'s data."""
        raise NotImplementedError

    def _on_live(self) -> None:
        """Start delivering (synchronously, as the state becomes LIVE)."""

    def _after_ok(self) -> None:
        """Anything to send right after the `ok`."""

    def on_nats_reconnect(self) -> None:
        """NATS came back: pull requests in flight died with the link."""


class CoreSubscription(Subscription):
    kind = "sub"

    def __init__(self, ref: SubscriptionRef, owner: Owner, node: Node, presence: bool) -> None:
        super().__init__(ref, owner, node)
        self.presence = presence

    async def _setup(self) -> None:
        router = self._node.router
        self._shared: Shared = await self._hold(
            "join", router.acquire(self.ref.pattern), router.release
        )
        if self.presence:
            await self._announce()

    async def _announce(self) -> None:
        """Hold this connection's presence key; `ok` once it is written. Its leave is a
        stop, so `end()` queues it at once, whatever the setup was doing."""
        presence, owner = self._node.presence, self._owner
        key = presence.key(self.ref.pattern, owner.uid, owner.id)
        written = presence.join(key, Announcement(owner.uid, owner.name, time.time()))
        self._stops.append(lambda: presence.leave(key))
        await asyncio.shield(written)
        await self._step("presence")

    def _on_live(self) -> None:
        router, shared, owner = self._node.router, self._shared, self._owner
        router.attach(shared, owner)
        self._stops.append(lambda: router.detach(shared, owner))


class KvSubscription(Subscription):
    """A member of the process's shared feed, plus a catch-up reader until `synced`."""

    kind = "kv_sub"

    def __init__(self, ref: SubscriptionRef, owner: Owner, node: Node, since: int | None) -> None:
        super().__init__(ref, owner, node)
        self.since = since
        self.tokens = tokens(ref.pattern)
        self.feed: KvFeed | None = None
        self.catchup: StreamReader | None = None
        self._member: Member | None = None
        self._synced = False
        self._slot: object = None  # the catch-up slot held until `synced`
        self._cutoff = 0
        self._skip_through = 0

    async def _setup(self) -> dict[str, Any]:
        bucket, pattern = self.ref.target, self.ref.pattern
        feeds = self._node.kv_feeds
        self._take_slot()
        try:
            feed = await self._hold(
                "feed",
                self._node.ride_out(lambda: feeds.acquire(bucket, pattern), "feed"),
                feeds.release,
            )
            # Join the shared live feed first, then read the current values: every change
            # after the catch-up's cutoff is then in the member's buffer (no gap).
            member = Member(self.deliver, self._wanted)
            feed.members.add(member)
            self._stops.append(lambda: feed.members.discard(member))
            self.feed, self._member = feed, member
            info = await self._node.ride_out(
                lambda: self._node.js.stream_info(kvwire.stream_of(bucket)), "stream_info"
            )
            await self._step("stream_info")
        except NotFoundError:
            raise ReplyError(ErrorCode.NOT_FOUND, f"no bucket {bucket!r}") from None
        except Exception as e:
            raise js_reply_error(e, kvwire.stream_of(bucket)) or e from None
        first, last = info.state.first_seq, info.state.last_seq
        resume = kv_resume(self.since, first, last)
        self._cutoff = last
        self._skip_through = resume.skip_through
        self._key_at = kvwire.key_offset(bucket)
        reader = StreamReader(
            self._node.nc,
            self._node.js,
            kvwire.stream_of(bucket),
            kvwire.subject_of(bucket, pattern),
            resume.start,
            self._on_catchup,
            batch=256,
            wait_room=self._owner.wait_room,
            on_lost=lambda e: self._owner.subscription_lost(self),
            gate=self._node.delivering,
        )
        # A catch-up is a consumer of its own until `synced`: at most MAX_CATCHUPS at once
        # per process (the stream's consumer limit is shared by every gateway), the rest
        # wait their turn here.
        slots = self._node.catchups
        self._slot = await self._hold("catchup_slot", slots.acquire(), _give(slots))
        try:
            # reader.start is all or nothing, so it may be tried again during a failover.
            self.catchup = await self._hold(
                "catchup",
                self._node.ride_out(lambda: reader.start(pull=False), "consumer"),
                _close_reader,
            )
        except (ReplyError, Ended):
            raise
        except Exception as e:
            raise js_reply_error(e, kvwire.stream_of(bucket)) or e from None
        return {"position": resume.position, "recovered": resume.recovered}

    def _wanted(self, key: str) -> bool:
        return self._owner.kv_wanted(self, key)

    def _on_live(self) -> None:
        if self.catchup is not None:
            self.catchup.pull()

    def _after_ok(self) -> None:
        if self.catchup is not None and self.catchup.initial_pending == 0:
            self._sync()

    def _on_catchup(self, d: Delivery) -> bool:
        if self.state is not State.LIVE:
            return False  # not handed on: ended, nothing more is delivered
        if self._synced:
            return True  # the shared feed delivers from here on
        if d.stream_seq <= self._skip_through:
            delivered = True  # the client has this value already (resumed after it)
        else:
            delivered = self.deliver(encode_change(self.ref.target, d.subject[self._key_at :], d))
        self._cutoff = max(self._cutoff, d.stream_seq)
        if d.pending == 0:
            self._sync()
        return delivered

    def _sync(self) -> None:
        if self._synced or self.state is not State.LIVE:
            return
        self._synced = True
        self.deliver(envelope.kv_synced(self.ref.target, self.ref.inbox, self._cutoff))
        assert self._member is not None
        self._member.go_live(self._cutoff)
        catchup, self.catchup = self.catchup, None
        self._release_now(catchup)
        self._release_now(self._slot)

    def on_nats_reconnect(self) -> None:
        if self.catchup is not None:
            self.catchup.mark_lost()


class JsSubscription(Subscription):
    kind = "js_sub"

    def __init__(
        self, ref: SubscriptionRef, owner: Owner, node: Node, data: envelope.JsSubData
    ) -> None:
        super().__init__(ref, owner, node)
        self.data = data
        self.tail: JsTail | None = None
        self.cursor: Cursor | None = None
        self.lease: Lease | None = None
        self.delete_durable = False  # set by an unsub that deletes the durable
        self._holder = secrets.token_hex(8)
        # Without acks, a durable's messages queued but not yet written to the socket:
        # (bytes pushed to the outbox once it was queued, seq), oldest first.
        self._unwritten: collections.deque[tuple[int, int]] = collections.deque()
        self._keeper: asyncio.Task[None] | None = None
        # NATS came back: a takeover written while it was away was not watched, so the
        # keeper saves once (a compare-and-set that then tells).
        self._save_soon = False
        self._encoder = envelope.JsEncoder(ref.target, ref.inbox)

    async def _setup(self) -> dict[str, Any]:
        stream, d = self.ref.target, self.data
        self._take_slot()
        try:
            info = await self._node.ride_out(
                lambda: self._node.js.stream_info(stream), "stream_info"
            )
        except NotFoundError:
            raise ReplyError(ErrorCode.NOT_FOUND, f"no stream {stream!r}") from None
        except Exception as e:
            raise js_reply_error(e, stream) or e from None
        await self._step("stream_info")
        first, last = info.state.first_seq, info.state.last_seq
        start, recovered = js_start(d, first, last, dt.datetime.now(dt.UTC))
        if not info.config.allow_direct:
            # Every js_sub reads the shared history (direct get) and tail: without it, a
            # consumer per subscription would grow with users, to the stream's limit.
            raise ReplyError(
                ErrorCode.UNAVAILABLE,
                f"stream {stream!r} does not allow direct get: an operator must set"
                " allow_direct on it",
            )
        self._node.history.check(stream, info.created, first, info.state.num_deleted or 0)
        begin = await self._begin(start, first, last)
        if d.durable is not None:
            created = info.created.isoformat() if info.created else ""
            return await self._resume(begin, recovered, first, last, created)
        await self._share(begin)
        return {"position": begin, "recovered": recovered}

    async def _begin(self, start: Start, first: int, last: int) -> int:
        """The first sequence the subscription delivers (from the stream's info)."""
        if start.policy == api.DeliverPolicy.BY_START_SEQUENCE and start.seq is not None:
            return max(start.seq, first)  # purged below `first`: that is where it begins
        if start.policy == api.DeliverPolicy.ALL:
            return max(first, 1)
        if start.policy == api.DeliverPolicy.BY_START_TIME and start.time is not None:
            try:
                seq = await self._node.history.first_at(
                    self.ref.target, self.ref.pattern, start.time
                )
            except HistoryUnavailable:
                raise ReplyError(ErrorCode.UNAVAILABLE, "stream history unavailable") from None
            await self._step("first_at")
            return last + 1 if seq is None else seq
        return last + 1  # new messages only

    async def _first(self, begin: int, last: int) -> int:
        """A resumed durable's first delivery when a matching message is stored already
        (from the history block its catch-up reads first anyway), else `begin`: the client
        sees where the durable really stood (a plain js_sub reports its start)."""
        if begin > last:
            return begin
        tail = self.tail
        assert tail is not None
        start = aligned(begin)
        for _ in range(8):  # blocks cut short by their byte bound: a few more, not forever
            try:
                block = await self._node.history.block(
                    self.ref.target, self.ref.pattern, start, lambda: tail.position
                )
            except HistoryUnavailable:
                return begin
            i = block.after(begin - 1)
            if i < len(block.seqs):
                return block.seqs[i]
            if block.at_end:
                return begin
            start = block.next
        return begin

    async def _resume(
        self, begin: int, recovered: bool, first: int, last: int, created: str
    ) -> dict[str, Any]:
        """Take the durable over (or create it at `begin`) and read on from its floor."""
        d, stream = self.data, self.ref.target
        assert d.durable is not None
        store = self._node.durables
        opening = store.open(
            stream,
            self._owner.uid,
            d.durable,
            self.ref.pattern,
            d.ack,
            self._holder,
            begin - 1,
            stream_created=created,
        )
        try:
            lease = await self._hold("durable", opening, self._leave)
        except DurableError as e:
            raise ReplyError(e.code or ErrorCode.UNAVAILABLE, str(e)) from None
        except ValueError as e:
            raise ReplyError(ErrorCode.BAD_REQUEST, str(e)) from None
        except Ended:
            raise
        except Exception as e:
            raise js_reply_error(e, stream) or ReplyError(
                ErrorCode.UNAVAILABLE, "durables unavailable"
            ) from None
        self.lease = lease
        if not d.ack:
            self._owner.track_delivery()
        if lease.created:
            recovered = recovered and not lease.gone
        elif lease.floor > last:  # the stream was recreated since: its floor means nothing
            begin, recovered = max(first, 1), False
        else:
            begin = lease.floor + 1
            if begin < first:  # its messages were purged or aged out meanwhile
                begin, recovered = first, False
            else:
                recovered = True
        await self._share(begin)
        return {
            "position": await self._first(begin, last),
            "recovered": recovered,
            "durable": "created" if lease.created else "resumed",
        }

    def _floor(self) -> int:
        """Where the durable resumes after: acked, or (without acks) written to the socket:
        every message up to it handed on, and each handed one written."""
        cursor = self.cursor
        assert cursor is not None
        if self.data.ack:
            return min(cursor.pending) - 1 if cursor.pending else cursor.last
        self._drop_written()
        return self._unwritten[0][1] - 1 if self._unwritten else cursor.last

    def _drop_written(self, fresh: bool = True) -> None:
        delivered = self._owner.sent(fresh)[1]
        unwritten = self._unwritten
        while unwritten and unwritten[0][0] <= delivered:
            unwritten.popleft()

    def _handed(self, first: int, last: int) -> None:
        """Messages `first`..`last` were queued (without acks, for the floor)."""
        self._drop_written(fresh=False)  # bounded by what the outbox (and socket) hold
        self._unwritten.append((self._owner.sent(False)[0], first))

    async def _keep(self) -> None:
        """Save the floor when it moved (at most every DURABLE_SAVE seconds) and, unmoved,
        every keep-alive interval (that keeps the durable alive); end the subscription at
        once when the lease is lost (another subscription took the durable over)."""
        lease = self.lease
        assert lease is not None
        keepalive = max(DURABLE_SAVE, self._node.settings.durable_inactive / KEEPALIVES)
        saved, at = lease.floor, time.monotonic()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(lease.lost.wait(), DURABLE_SAVE)
            floor, now = self._floor(), time.monotonic()
            due = self._save_soon or lease.lost.is_set() or now - at >= keepalive
            if floor == saved and not due:
                continue
            try:
                await lease.save(floor)
            except TakenOver:
                self._owner.subscription_lost(
                    self, ErrorCode.TAKEN_OVER, "durable taken over by another subscription"
                )
                return
            except Exception as e:  # NATS away: the next save carries the floor
                self._not_kept("save", e)
                continue
            saved, at, self._save_soon = floor, now, False

    async def _leave(self, lease: Lease) -> None:
        await cancel_and_wait(self._keeper)
        lease.close()
        try:
            if self.delete_durable:
                await lease.delete()
            elif self.cursor is not None:
                await lease.save(self._floor())
        except TakenOver:
            pass  # the newer holder has it: its floor is the one that counts
        except Exception as e:
            self._not_kept("leave", e)

    def _not_kept(self, when: str, e: Exception) -> None:
        metrics.DURABLE_FAILURES.labels(when).inc()
        log.warning(
            "durable floor not saved",
            extra={
                "event": "durable_not_kept",
                "when": when,
                "stream": self.ref.target,
                "durable": self.data.durable,
                "user": self._owner.uid,
                "error": type(e).__name__,
            },
        )

    async def _share(self, begin: int) -> None:
        """Join the stream's shared tail, with a cursor that reads history up to it."""
        stream, flt, d = self.ref.target, self.ref.pattern, self.data
        tails, settings = self._node.js_tails, self._node.settings
        try:
            tail = await self._hold(
                "tail", self._node.ride_out(lambda: tails.acquire(stream), "tail"), tails.release
            )
        except Exception as e:
            raise js_reply_error(e, stream) or e from None
        self.tail = tail
        cursor = Cursor(
            stream=stream,
            filter=flt,
            begin=begin,
            prefix=self._encoder.prefix,
            history=self._node.history,
            tail=tail,
            deliver=self.deliver,
            deliver_many=self.deliver_many,
            room=self._owner.room,
            wait_room=self._owner.wait_room,
            half=settings.send_queue_bytes // 2,
            gate=self._node.delivering_open,
            gate_open=self._node.delivering,
            ack_window=max(d.batch * 4, 1000) if d.ack else None,
            ack_wait=settings.js_ack_wait,
            on_handed=self._handed if d.durable and not d.ack else None,
        )
        self.cursor = cursor
        tail.add(flt, cursor)
        self._stops.append(lambda: tail.remove(flt, cursor))
        self._held.append((cursor, cursor.stop))

    def _on_live(self) -> None:
        if self.cursor is not None:
            self.cursor.start()
        if self.lease is not None:
            self._keeper = asyncio.get_running_loop().create_task(self._keep())

    def on_nats_reconnect(self) -> None:
        self._save_soon = self.lease is not None

    async def ack(self, seq: int) -> None:
        """Acknowledge one delivered message."""
        if self.cursor is None or not self.cursor.ack(seq):
            raise ReplyError(ErrorCode.NOT_FOUND, f"seq {seq} is not awaiting an ack")


async def _close_reader(reader: StreamReader) -> None:
    await reader.close()


def _give(slots: asyncio.Semaphore) -> Callable[[object], Awaitable[None]]:
    async def give(_: object) -> None:
        slots.release()

    return give
