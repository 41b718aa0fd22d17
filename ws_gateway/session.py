"""One client session: its requests (one at a time, in order), limits, outbox and lifetime.

The session does not know its transport (transport.Transport). Its subscriptions live in
`subscriptions.py`; the session only opens them, ends them and keeps them by inbox: a
subscription is in `subs` from the moment its inbox is reserved until it is ended, and
ending it (unsub, revocation, lost stream, close) is always `_end`, which removes it and
ends it in one step. Close order is fixed: mark closed, deregister, close the outbox and
the transport, cancel timers and tasks, end every subscription and await their releases,
then one summary log line.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Iterable
from typing import TYPE_CHECKING

from shared import envelope
from shared.auth import Claims
from shared.capabilities import CompiledCapabilities, SubscriptionRef, is_nats_name
from shared.errors import (
    Disconnect,
    DisconnectError,
    Disconnects,
    ErrorCode,
    InvalidToken,
    ReplyError,
)
from shared.subjects import tokens, validate_pattern
from shared.tasks import cancel_and_wait
from shared.users import UserRecord, compile_or_nothing
from ws_gateway import metrics
from ws_gateway.jsfeed import JsTail
from ws_gateway.kvfeed import KvFeed
from ws_gateway.outbox import Outbox
from ws_gateway.presence import refusal
from ws_gateway.rules import OpBudget, Tokens, is_primary
from ws_gateway.subscriptions import (
    CoreSubscription,
    Ended,
    JsSubscription,
    KvSubscription,
    Subscription,
)
from ws_gateway.transport import Transport

if TYPE_CHECKING:
    from ws_gateway.hub import Hub

log = logging.getLogger("ws_gateway.session")

_ids = itertools.count(1)


def _check_name(kind: str, name: str) -> None:
    if not is_nats_name(name):
        raise ReplyError(ErrorCode.BAD_REQUEST, f"invalid {kind} name")


def _pattern(p: str, what: str) -> str:
    try:
        return validate_pattern(p)
    except ValueError as e:
        raise ReplyError(ErrorCode.BAD_REQUEST, f"invalid {what}: {e}") from None


class Session:
    """One connection's session: created by the hub at the upgrade (or `/poll/open`),
    started once the hub has registered it with a current user record, closed once."""

    def __init__(
        self,
        hub: Hub,
        claims: Claims,
        user: UserRecord,
        revision: int,
        transport: Transport,
    ) -> None:
        self.id = next(_ids)
        self.hub = hub
        self.settings = hub.settings
        self.claims = claims
        self.uid = claims.sub
        self.user = user
        self.user_revision = revision  # of the auth_users record `user` came from
        self.caps = hub.compiled(user)
        self.transport = transport
        self.subs: dict[str, Subscription] = {}
        self.core_patterns: dict[str, Tokens] = {}
        self.outbox = Outbox(
            transport.send,
            self._on_slow,
            self.settings.send_queue_bytes,
            self.settings.write_timeout,
            flusher=hub.flusher,
            can_send=transport.can_send,
            send_now=transport.send_now,
            buffered=transport.buffered,
            unacked=transport.unacked,
        )
        self._tasks: set[asyncio.Task[None]] = set()
        self._ending: set[asyncio.Task[None]] = set()  # subscription releases: awaited
        # No timer per session: the hub's one clock calls `tick` (an idle connection costs
        # its objects, not a timer handle or a task per duty).
        self._next_ping = 0.0
        self._requests = asyncio.Lock()  # one request at a time, in arrival order
        self._closing: asyncio.Task[None] | None = None
        self.started = False
        self.close_code: int | None = None
        self._opened = time.monotonic()
        self._last_rx = time.monotonic()
        self._bad_frames = 0
        self._budget = OpBudget(
            self.settings.client_ops_per_second, self.settings.client_ops_burst, self._opened
        )
        self._auto_inbox = itertools.count(1)
        self.frames_in = 0

    def __hash__(self) -> int:
        return self.id

    @property
    def name(self) -> str:
        """What presence shows of the user: the display name, else the username."""
        return self.user.display_name or self.user.username

    # ------------------------------------------------------------------ lifetime

    def start(self) -> None:
        self.started = True
        self.outbox.start()
        self.push(envelope.cap_update(self.uid, self.caps.document))
        self._next_ping = time.monotonic() + self.settings.ping_interval
        metrics.CONNECTIONS.inc()
        log.info(
            "session open",
            extra={
                "session": self.id,
                "user": self.uid,
                "transport": self.transport.name,
                "remote": self.transport.remote,
            },
        )

    @property
    def closed(self) -> bool:
        return self._closing is not None

    def push(self, frame: bytes) -> bool:
        return self.outbox.push(frame)

    def push_many(self, frames: list[bytes]) -> bool:
        return self.outbox.push_many(frames)

    async def wait_room(self, whole: bool = False) -> int:
        return await self.outbox.wait_room(whole)

    def room(self) -> int:
        return self.outbox.room()

    def track_delivery(self) -> None:
        """Keep `sent()`'s delivered count current after every write (a durable without
        acks resumes after what the client received)."""
        self.outbox.track = True

    def sent(self, fresh: bool = True) -> tuple[int, int]:
        """Bytes of frames queued so far, and of those the client received (`fresh`:
        asked of the socket now; else as last asked)."""
        outbox = self.outbox
        return outbox.pushed, outbox.delivered if fresh else outbox.delivered_seen

    def touch(self) -> None:
        """The transport saw the client alive (a long poll), even without a frame."""
        self._last_rx = time.monotonic()

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def close(self, disconnect: Disconnect) -> asyncio.Task[None]:
        """Start closing (idempotent); the returned task finishes when all is released."""
        if self._closing is None:
            self._closing = asyncio.get_running_loop().create_task(self._close(disconnect))
        return self._closing

    async def _close(self, d: Disconnect) -> None:
        self.close_code = d.close_code
        self.hub.unregister(self)
        final = envelope.error(d.error, d.reason) if d.error is not None else None
        self.outbox.delivered  # noqa: B018 -- read while the socket can still say
        # Subscriptions end first: nothing is handed on to an outbox that takes no more
        # (a cursor would count it as handed on), and their releases run meanwhile.
        counts = {"sub": 0, "kv_sub": 0, "js_sub": 0}
        for sub in list(self.subs.values()):
            counts[sub.kind] += 1
            self._end(sub)
        await self.outbox.close(final)
        try:
            await self.transport.close(d.close_code, d.reason)
        except Exception as e:
            log.info("transport close failed", extra={"session": self.id, "error": repr(e)})
        for task in list(self._tasks):
            await cancel_and_wait(task)
        while self._ending:  # releases are awaited, never cancelled: nothing is left held
            await asyncio.gather(*self._ending, return_exceptions=True)
        self.hub.closed(self)
        if self.started:
            metrics.CONNECTIONS.dec()
        metrics.CLOSES.labels(str(d.close_code)).inc()
        log.info(
            "session closed",
            extra={
                "session": self.id,
                "user": self.uid,
                "code": d.close_code,
                "reason": d.reason,
                "seconds": round(time.monotonic() - self._opened, 3),
                "frames_in": self.frames_in,
                **counts,
            },
        )

    def _end(self, sub: Subscription) -> asyncio.Task[None]:
        """The one way a subscription leaves the session: out of `subs` and ended, at once.
        The returned task finishes when it has released everything."""
        if self.subs.get(sub.ref.inbox) is sub:
            del self.subs[sub.ref.inbox]
        task = sub.end()
        if not task.done():
            self._ending.add(task)
            task.add_done_callback(self._ending.discard)
        return task

    def _on_slow(self, why: str) -> None:
        metrics.BACKPRESSURE_CLOSES.inc()
        log.info("slow client", extra={"session": self.id, "why": why})
        self.close(Disconnects.BACKPRESSURE.because(why))

    def tick(self, now: float, wall: float) -> None:
        """The hub's clock (every HEARTBEAT_TICK): expiry of the token, then the heartbeat:
        a ping every PING_INTERVAL, and a close after two intervals without a frame."""
        if self.closed or not self.started:
            return
        if wall >= self.claims.exp:
            self._expire()
            return
        if now < self._next_ping:
            return
        if now - self._last_rx > 2 * self.settings.ping_interval:
            self.close(Disconnects.HEARTBEAT)
            return
        self._next_ping = now + self.settings.ping_interval
        self.push(envelope.ping())
        self.transport.ping()

    def _expire(self) -> None:
        if not self.closed:
            self.close(Disconnects.TOKEN_EXPIRED)

    # ------------------------------------------------------------------ inbound

    async def handle_frames(self, frames: Iterable[str]) -> None:
        """Handle client frames one at a time, in order, after any still in hand: frames
        that arrive together (or on concurrent long-poll requests) never overtake."""
        async with self._requests:
            for frame in frames:
                if self.closed:
                    return
                await self._handle(frame)

    async def handle_frame(self, frame: str) -> None:
        await self.handle_frames((frame,))

    def refuse_frame(self, error: ReplyError) -> None:
        """A frame the transport could not hand on (a binary WebSocket frame)."""
        self._count_frame()
        self._reply_error(error, None)

    def _count_frame(self) -> None:
        self._last_rx = time.monotonic()
        self.frames_in += 1
        metrics.FRAMES_IN.inc()

    async def _handle(self, raw: str) -> None:
        self._count_frame()
        inbox: str | None = None
        try:
            # Every frame costs an op, but a refused request still gets its inbox back.
            limited = not self._budget.take(time.monotonic())
            op = envelope.decode_client_frame(raw)
            inbox = op.inbox
            if limited:
                raise ReplyError(ErrorCode.LIMIT, "too many requests: slow down")
            await self._dispatch(op)
        except DisconnectError as e:
            if e.disconnect.error is not None:
                metrics.ERRORS.labels(e.disconnect.error.value).inc()
                self.push(envelope.error(e.disconnect.error, e.disconnect.reason, e.inbox))
            self.close(e.disconnect)
        except ReplyError as e:
            self._reply_error(e, inbox)
        except Exception:
            log.exception("request failed", extra={"session": self.id})
            self._reply_error(ReplyError(ErrorCode.INTERNAL, "internal error"), inbox)

    def _reply_error(self, e: ReplyError, inbox: str | None) -> None:
        metrics.ERRORS.labels(e.code.value).inc()
        self.push(envelope.error(e.code, e.reason, inbox or e.inbox))
        if e.code == ErrorCode.BAD_REQUEST:
            self._bad_frames += 1
            if self._bad_frames > self.settings.max_bad_frames:
                self.close(Disconnects.BAD_FRAMES)

    async def _dispatch(self, op: envelope.ClientOp) -> None:
        match op:
            case envelope.Sub():
                await self._sub(op)
            case envelope.Unsub():
                await self._unsub(op)
            case envelope.KvSub():
                await self._kv_sub(op)
            case envelope.JsSub():
                await self._js_sub(op)
            case envelope.Ack():
                await self._ack(op)
            case envelope.Ping():
                self.push(envelope.pong(op.inbox))
            case envelope.Pong():
                pass
            case envelope.Refresh():
                await self._refresh(op)
            case envelope.Cmd():
                raise ReplyError(
                    ErrorCode.USE_HTTP, f"use HTTP POST /api/commands/{op.target or ''}"
                )

    # ------------------------------------------------------------------ requests

    def _new_inbox(self, inbox: str | None) -> str:
        if inbox is not None and inbox in self.subs:
            raise ReplyError(ErrorCode.DUPLICATE_INBOX, f"inbox {inbox!r} is in use")
        if len(self.subs) >= self.settings.max_subscriptions:
            raise ReplyError(ErrorCode.LIMIT, "too many subscriptions")
        if inbox is None:
            auto = f"s{next(self._auto_inbox)}"
            while auto in self.subs:
                auto = f"s{next(self._auto_inbox)}"
            return auto
        return inbox

    async def _require_nats(self) -> None:
        """A request during a NATS failover waits for it (up to NATS_FAILOVER_WAIT), then
        `unavailable`."""
        if not await self.hub.serving():
            raise ReplyError(ErrorCode.UNAVAILABLE, "NATS is unreachable: retry later")

    def _deny(self, op: str, reason: str) -> ReplyError:
        metrics.DENIED.labels(op).inc()
        return ReplyError(ErrorCode.FORBIDDEN, reason)

    async def _open(self, sub: Subscription) -> None:
        """Reserve the inbox, set the subscription up; it sends its own `ok`. Ended
        meanwhile (revoked, session closed), it says nothing more and holds nothing."""
        self.subs[sub.ref.inbox] = sub
        try:
            await sub.start()
        except Ended:
            return
        except BaseException:
            if self.subs.get(sub.ref.inbox) is sub:
                del self.subs[sub.ref.inbox]
            raise

    async def _sub(self, op: envelope.Sub) -> None:
        pattern = _pattern(op.target, "subject")
        inbox = self._new_inbox(op.inbox)
        decision = self.caps.allows_subject(pattern)
        if not decision:
            raise self._deny("sub", decision.reason)
        await self._require_nats()
        presence = op.data is not None and op.data.presence
        if presence:
            # Anyone who may subscribe to the subject may announce on it (docs/protocol.md).
            why = refusal(self.settings, pattern)
            if why is not None:
                raise ReplyError(ErrorCode.BAD_REQUEST, why)
        ref = SubscriptionRef(inbox, "sub", pattern, pattern)
        await self._open(CoreSubscription(ref, self, self.hub, presence))

    async def _unsub(self, op: envelope.Unsub) -> None:
        if op.inbox is not None and op.inbox in self.subs:
            victims = [self.subs[op.inbox]]
        elif op.target is not None:  # the inbox, if any, only correlates the reply
            victims = [s for s in self.subs.values() if s.ref.target == op.target]
        else:
            victims = []
        if not victims:
            raise ReplyError(ErrorCode.NOT_FOUND, "no such subscription")
        if op.data is not None and op.data.delete_durable:
            if not all(isinstance(s, JsSubscription) and s.lease for s in victims):
                raise ReplyError(ErrorCode.BAD_REQUEST, "delete_durable needs a durable js_sub")
            for sub in victims:
                assert isinstance(sub, JsSubscription)
                sub.delete_durable = True
        # Ended at once; `ok` once released, so a request after it finds the consumer
        # (a durable) parked, not half way.
        await asyncio.gather(*(self._end(sub) for sub in victims), return_exceptions=True)
        self.push(envelope.ok(op.inbox, op.target))

    async def _kv_sub(self, op: envelope.KvSub) -> None:
        bucket = op.target
        _check_name("bucket", bucket)
        pattern = _pattern(op.data.pattern, "key pattern")
        inbox = self._new_inbox(op.inbox)
        decision = self.caps.allows_kv(bucket, pattern)
        if not decision:
            raise self._deny("kv_sub", decision.reason)
        await self._require_nats()
        ref = SubscriptionRef(inbox, "kv_sub", bucket, pattern)
        await self._open(KvSubscription(ref, self, self.hub, op.data.since_revision))

    def kv_wanted(self, sub: KvSubscription, key: str) -> bool:
        """False when a smaller kv_sub pattern of this session on the bucket matches `key`
        (that one delivers it). The key is split only when there is such a sub."""
        bucket, pattern = sub.ref.target, sub.ref.pattern
        smaller = {
            s.ref.pattern: s.tokens
            for s in self.subs.values()
            if isinstance(s, KvSubscription)
            and s.live
            and s.ref.target == bucket
            and s.ref.pattern < pattern
        }
        return not smaller or is_primary(smaller, pattern, tokens(key))

    async def _js_sub(self, op: envelope.JsSub) -> None:
        stream = op.target
        _check_name("stream", stream)
        d = op.data
        flt = _pattern(d.filter, "filter")
        inbox = self._new_inbox(op.inbox)
        decision = self.caps.allows_stream(stream, flt)
        if not decision:
            raise self._deny("js_sub", decision.reason)
        if sum(x is not None for x in (d.start_seq, d.time_delta, d.start_time)) > 1:
            raise ReplyError(
                ErrorCode.BAD_REQUEST, "give at most one of start_seq, time_delta, start_time"
            )
        await self._require_nats()
        ref = SubscriptionRef(inbox, "js_sub", stream, flt)
        await self._open(JsSubscription(ref, self, self.hub, d))

    async def _ack(self, op: envelope.Ack) -> None:
        sub = self.subs.get(op.inbox or "")
        if not isinstance(sub, JsSubscription) or not sub.live:
            raise ReplyError(ErrorCode.NOT_FOUND, "ack needs the inbox of a js_sub")
        await self._require_nats()
        await sub.ack(op.data.seq)

    async def _refresh(self, op: envelope.Refresh) -> None:
        try:
            claims = await self.hub.verifier.check(op.data.token)
        except InvalidToken as e:
            raise ReplyError(ErrorCode.UNAUTHORIZED, str(e)) from None
        if claims.sub != self.uid:
            raise ReplyError(ErrorCode.UNAUTHORIZED, "token is for another user")
        await self._require_nats()
        if await self.hub.is_revoked(claims.jti):
            raise ReplyError(ErrorCode.UNAUTHORIZED, "token revoked")
        old = self.claims
        self.claims = claims
        self.hub.rekey(self, old.jti)
        self.push(envelope.ok(op.inbox, None, {"exp": claims.exp}))

    # ------------------------------------------------------------------ from the hub

    def subscription_lost(
        self,
        sub: Subscription,
        code: ErrorCode = ErrorCode.NOT_FOUND,
        reason: str = "stream or bucket deleted",
    ) -> None:
        """Its stream or bucket is gone (or its durable taken over): end the subscription
        and say so. One still being set up is ended too (it would go live on a dead feed);
        its setup then says nothing more, so the client hears the same error."""
        if self.subs.get(sub.ref.inbox) is sub:
            self._end(sub)
            self.push(envelope.error(code, reason, sub.ref.inbox, sub.ref.target))

    def feed_gone(self, feed: KvFeed) -> None:
        for sub in list(self.subs.values()):
            if isinstance(sub, KvSubscription) and sub.feed is feed:
                self.subscription_lost(sub)

    def tail_gone(self, tail: JsTail) -> None:
        for sub in list(self.subs.values()):
            if isinstance(sub, JsSubscription) and sub.tail is tail:
                self.subscription_lost(sub)

    def apply_user(
        self,
        user: UserRecord | None,
        revision: int,
        changed_at: float | None = None,
        caps: CompiledCapabilities | None = None,
    ) -> None:
        """The user's record changed: end what is no longer allowed, then tell the client.
        A record older than the one the session has is ignored."""
        if revision < self.user_revision:
            return
        self.user_revision = revision
        if user is None or user.disabled:
            self.close(Disconnects.USER_DISABLED)
            return
        if caps is None:
            caps = compile_or_nothing(user)
        self.user = user
        self.caps = caps
        if not self.started:
            return  # start() sends the capabilities it has then
        ended: list[envelope.RevokedRef] = []
        for sub in list(self.subs.values()):
            if not caps.allows(sub.ref):
                self._end(sub)  # nothing more is delivered on it, from this instant
                ended.append(envelope.RevokedRef(sub.ref.inbox, sub.ref.op, sub.ref.target))
        if ended and changed_at is not None:
            metrics.REVOCATION_LATENCY.observe(max(0.0, time.time() - changed_at))
        self.push(envelope.cap_update(self.uid, caps.document, ended))

    def on_nats_reconnect(self) -> None:
        for sub in self.subs.values():
            sub.on_nats_reconnect()
