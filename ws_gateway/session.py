"""One client session: its requests, subscriptions, outbox and lifetime.

The session does not know its transport: it is handed a `send` coroutine (one frame of
newline-delimited envelopes) and a `close_transport` coroutine. Close order is fixed:
mark closed, deregister, close the outbox and the transport, then stop subscriptions
(logging each failure), then one summary log line.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from nats.js import api
from nats.js.errors import NotFoundError

from shared import envelope
from shared.auth import Claims
from shared.capabilities import CompiledCapabilities, SubscriptionRef, is_nats_name
from shared.errors import CloseCode, Disconnect, ErrorCode, InvalidToken, ProtocolError
from shared.subjects import match_tokens, tokens, validate_pattern
from shared.users import UserRecord, compile_or_nothing
from ws_gateway import metrics
from ws_gateway.kvfeed import KvFeed, Member, encode_change
from ws_gateway.outbox import Outbox
from ws_gateway.reader import Delivery, Start, StreamReader

if TYPE_CHECKING:
    from ws_gateway.hub import Hub

log = logging.getLogger("ws_gateway.session")

SendFn = Callable[[bytes], Awaitable[None]]
CloseFn = Callable[[int, str], Awaitable[None]]
_ids = itertools.count(1)


def _check_name(kind: str, name: str) -> None:
    if not is_nats_name(name):
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"invalid {kind} name")


def _pattern(p: str, what: str) -> str:
    try:
        return validate_pattern(p)
    except ValueError as e:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"invalid {what}: {e}") from None


class Subscription:
    """A live subscription of this session (core, KV or JetStream)."""

    def __init__(self, ref: SubscriptionRef) -> None:
        self.ref = ref
        self.active = True

    def detach(self) -> None:
        """Stop delivering now (synchronously); `close()` then releases the resources."""
        self.active = False

    async def close(self) -> None:
        raise NotImplementedError


class CoreSubscription(Subscription):
    def __init__(self, ref: SubscriptionRef, session: Session) -> None:
        super().__init__(ref)
        self._session = session
        self._release: object = None

    def detach(self) -> None:
        if self.active:
            super().detach()
            self._release = self._session.hub.router.detach(self._session, self.ref.pattern)

    async def close(self) -> None:
        self.detach()
        release, self._release = self._release, None
        await self._session.hub.router.release(release)  # type: ignore[arg-type]


class ReaderSubscription(Subscription):
    def __init__(self, ref: SubscriptionRef) -> None:
        super().__init__(ref)
        self.reader: StreamReader | None = None
        self.unacked: dict[int, str] = {}

    async def close(self) -> None:
        if self.reader is not None:
            await self.reader.close()


class KvSubscription(Subscription):
    """A kv_sub: a member of the process's shared feed, plus a catch-up reader until synced."""

    def __init__(self, ref: SubscriptionRef, session: Session) -> None:
        super().__init__(ref)
        self._session = session
        self.feed: KvFeed | None = None
        self.member: Member | None = None
        self.catchup: StreamReader | None = None

    async def end_catchup(self) -> None:
        reader, self.catchup = self.catchup, None
        if reader is not None:
            await reader.close()

    def detach(self) -> None:
        super().detach()
        if self.feed is not None and self.member is not None:
            self.feed.members.discard(self.member)

    async def close(self) -> None:
        self.detach()
        await self.end_catchup()
        if self.feed is not None and self.member is not None:
            await self._session.hub.kv_feeds.leave(self.feed, self.member)


class Session:
    def __init__(
        self,
        hub: Hub,
        claims: Claims,
        user: UserRecord,
        send: SendFn,
        close_transport: CloseFn,
        *,
        remote: str = "",
        transport: str = "ws",
        can_send: Callable[[], bool] | None = None,
        send_now: Callable[[bytes], None] | None = None,
    ) -> None:
        self.id = next(_ids)
        self.hub = hub
        self.settings = hub.settings
        self.claims = claims
        self.uid = claims.sub
        self.user = user
        self.caps = hub.compiled(user)
        self.remote = remote
        self.transport = transport
        self.subs: dict[str, Subscription] = {}
        self.core_patterns: dict[str, tuple[str, ...]] = {}
        self._close_transport = close_transport
        self.outbox = Outbox(
            send,
            self._on_slow,
            self.settings.send_queue_size,
            self.settings.write_timeout,
            flusher=hub.flusher,
            can_send=can_send,
            send_now=send_now,
        )
        self._tasks: set[asyncio.Task[None]] = set()
        # Timers, not tasks: an idle connection should cost a few hundred bytes, not a
        # coroutine frame per duty (issue: ≤ 16 KB per idle connection).
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._closing: asyncio.Task[None] | None = None
        self.close_code: int | None = None
        self._opened = time.monotonic()
        self._last_rx = time.monotonic()
        self._bad_frames = 0
        self._tokens = float(self.settings.client_ops_burst)
        self._tokens_at = time.monotonic()
        self._auto_inbox = itertools.count(1)
        self.frames_in = 0

    def __hash__(self) -> int:
        return self.id

    # ------------------------------------------------------------------ lifetime

    def start(self) -> None:
        self.outbox.start()
        self.push(envelope.cap_update(self.uid, self.caps.document))
        self._schedule_heartbeat()
        self._schedule_expiry()
        metrics.CONNECTIONS.inc()
        log.info(
            "session open",
            extra={
                "session": self.id,
                "user": self.uid,
                "transport": self.transport,
                "remote": self.remote,
            },
        )

    @property
    def closed(self) -> bool:
        return self._closing is not None

    def push(self, frame: bytes) -> bool:
        return self.outbox.push(frame)

    def touch(self) -> None:
        """The transport saw the client alive (a long poll), even without a frame."""
        self._last_rx = time.monotonic()

    def _spawn(self, coro: Awaitable[None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def close(self, code: int, reason: str, error: ErrorCode | None = None) -> asyncio.Task[None]:
        """Start closing (idempotent); the returned task finishes when all is released."""
        if self._closing is None:
            self._closing = asyncio.get_running_loop().create_task(self._close(code, reason, error))
        return self._closing

    async def _close(self, code: int, reason: str, error: ErrorCode | None) -> None:
        self.close_code = code
        self.hub.unregister(self)
        await self.outbox.close(envelope.error(error, reason) if error is not None else None)
        try:
            await self._close_transport(code, reason)
        except Exception as e:
            log.info("transport close failed", extra={"session": self.id, "error": repr(e)})
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task is not current:
                task.cancel()
        for task in list(self._tasks):
            if task is not current:
                try:
                    await task
                except (asyncio.CancelledError, Exception):
                    pass
        counts = {"sub": 0, "kv_sub": 0, "js_sub": 0}
        while self.subs:
            _, sub = self.subs.popitem()
            counts[sub.ref.op] += 1
            await self._end(sub)
        self.hub.closing.discard(self)
        metrics.CONNECTIONS.dec()
        metrics.CLOSES.labels(str(code)).inc()
        log.info(
            "session closed",
            extra={
                "session": self.id,
                "user": self.uid,
                "code": code,
                "reason": reason,
                "seconds": round(time.monotonic() - self._opened, 3),
                "frames_in": self.frames_in,
                **counts,
            },
        )

    async def _end(self, sub: Subscription) -> None:
        sub.detach()
        metrics.SUBSCRIPTIONS.labels(sub.ref.op).dec()
        try:
            await sub.close()
        except Exception as e:
            log.info("subscription close failed", extra={"session": self.id, "error": repr(e)})

    def _on_slow(self, why: str) -> None:
        metrics.BACKPRESSURE_CLOSES.inc()
        log.info("slow client", extra={"session": self.id, "why": why})
        self.close(CloseCode.TRY_AGAIN_LATER, f"backpressure: {why}", ErrorCode.BACKPRESSURE)

    def _schedule_heartbeat(self) -> None:
        loop = asyncio.get_running_loop()
        self._timers["heartbeat"] = loop.call_later(self.settings.ping_interval, self._heartbeat)

    def _heartbeat(self) -> None:
        if self.closed:
            return
        if time.monotonic() - self._last_rx > 2 * self.settings.ping_interval:
            self.close(CloseCode.POLICY, "heartbeat timeout")
            return
        self.push(envelope.ping())
        self._schedule_heartbeat()

    def _schedule_expiry(self) -> None:
        old = self._timers.pop("expiry", None)
        if old:
            old.cancel()
        delay = max(0.0, self.claims.exp - time.time())
        self._timers["expiry"] = asyncio.get_running_loop().call_later(delay, self._expire)

    def _expire(self) -> None:
        if not self.closed:
            self.close(CloseCode.TOKEN, "token expired", ErrorCode.TOKEN_EXPIRED)

    # ------------------------------------------------------------------ inbound

    async def handle_frame(self, raw: bytes | str) -> None:
        """Handle one client frame; protocol errors become error frames."""
        self._last_rx = time.monotonic()
        self.frames_in += 1
        metrics.FRAMES_IN.inc()
        inbox: str | None = None
        try:
            if isinstance(raw, bytes) and self.transport == "ws":
                raise ProtocolError(ErrorCode.BAD_REQUEST, "text frames only")
            # Every frame costs a token, but a refused request still gets its inbox back.
            limited = not self._take_token()
            op = envelope.decode_client_frame(raw)
            inbox = op.inbox
            if limited:
                raise ProtocolError(ErrorCode.LIMIT, "too many requests: slow down")
            await self._dispatch(op)
        except Disconnect as e:
            self._reply_error(e, inbox)
            self.close(e.close_code, e.reason)
        except ProtocolError as e:
            self._reply_error(e, inbox)
            if e.code == ErrorCode.BAD_REQUEST:
                self._bad_frames += 1
                if self._bad_frames > self.settings.max_bad_frames:
                    self.close(CloseCode.POLICY, "too many bad frames")
        except Exception:
            log.exception("request failed", extra={"session": self.id})
            self._reply_error(ProtocolError(ErrorCode.INTERNAL, "internal error"), inbox)

    def _reply_error(self, e: ProtocolError, inbox: str | None) -> None:
        metrics.ERRORS.labels(e.code.value).inc()
        self.push(envelope.error(e.code, e.reason, inbox or e.inbox))

    def _take_token(self) -> bool:
        now = time.monotonic()
        rate = self.settings.client_ops_per_second
        self._tokens = min(
            self.settings.client_ops_burst, self._tokens + (now - self._tokens_at) * rate
        )
        self._tokens_at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

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
                raise ProtocolError(
                    ErrorCode.USE_HTTP, f"use HTTP POST /api/commands/{op.target or ''}"
                )

    # ------------------------------------------------------------------ requests

    def _new_inbox(self, inbox: str | None) -> str:
        if inbox is not None and inbox in self.subs:
            raise ProtocolError(ErrorCode.DUPLICATE_INBOX, f"inbox {inbox!r} is in use")
        if len(self.subs) >= self.settings.max_subscriptions:
            raise ProtocolError(ErrorCode.LIMIT, "too many subscriptions")
        if inbox is None:
            auto = f"s{next(self._auto_inbox)}"
            while auto in self.subs:
                auto = f"s{next(self._auto_inbox)}"
            return auto
        return inbox

    def _require_nats(self) -> None:
        if not self.hub.nats_ready:
            raise ProtocolError(ErrorCode.UNAVAILABLE, "NATS is unreachable: retry later")

    def _deny(self, op: str, reason: str) -> ProtocolError:
        metrics.DENIED.labels(op).inc()
        return ProtocolError(ErrorCode.FORBIDDEN, reason)

    async def _open(self, sub: Subscription, start: Awaitable[None]) -> None:
        """Reserve the subscription's inbox across `start`; release all it took if that
        fails; release it at once if the session closed meanwhile (KV and JetStream)."""
        inbox = sub.ref.inbox
        self.subs[inbox] = sub
        try:
            await start
        except BaseException:
            self.subs.pop(inbox, None)
            await sub.close()
            raise
        metrics.SUBSCRIPTIONS.labels(sub.ref.op).inc()
        await self._closed_meanwhile(inbox, sub)

    async def _sub(self, op: envelope.Sub) -> None:
        pattern = _pattern(op.target, "subject")
        inbox = self._new_inbox(op.inbox)
        decision = self.caps.allows_subject(pattern)
        if not decision:
            raise self._deny("sub", decision.reason)
        self._require_nats()
        ref = SubscriptionRef(inbox, "sub", pattern, pattern)
        sub = CoreSubscription(ref, self)
        self.subs[inbox] = sub  # reserve the inbox across the await
        try:
            await self.hub.router.join(self, pattern)
        except BaseException:
            self.subs.pop(inbox, None)
            raise
        metrics.SUBSCRIPTIONS.labels("sub").inc()
        if await self._closed_meanwhile(inbox, sub):
            return
        self.push(envelope.ok(inbox, pattern))

    async def _closed_meanwhile(self, inbox: str, sub: Subscription) -> bool:
        """If the session closed while a subscription was being set up, release it here."""
        if not self.closed:
            return False
        if self.subs.get(inbox) is sub:
            del self.subs[inbox]
            await self._end(sub)
        return True

    async def _unsub(self, op: envelope.Unsub) -> None:
        if op.inbox is not None and op.inbox in self.subs:
            victims = [op.inbox]
        elif op.target is not None:  # the inbox, if any, only correlates the reply
            victims = [i for i, s in self.subs.items() if s.ref.target == op.target]
        else:
            victims = []
        if not victims:
            raise ProtocolError(ErrorCode.NOT_FOUND, "no such subscription")
        for inbox in victims:
            sub = self.subs.pop(inbox)
            await self._end(sub)
        self.push(envelope.ok(op.inbox, op.target))

    async def _kv_sub(self, op: envelope.KvSub) -> None:
        bucket = op.target
        _check_name("bucket", bucket)
        pattern = _pattern(op.data.pattern, "key pattern")
        inbox = self._new_inbox(op.inbox)
        decision = self.caps.allows_kv(bucket, pattern)
        if not decision:
            raise self._deny("kv_sub", decision.reason)
        self._require_nats()
        ref = SubscriptionRef(inbox, "kv_sub", bucket, pattern)
        sub = KvSubscription(ref, self)
        await self._open(sub, self._start_kv(sub, bucket, pattern, op.data.since_revision))

    async def _start_kv(
        self, sub: KvSubscription, bucket: str, pattern: str, since: int | None
    ) -> None:
        stream = f"KV_{bucket}"
        js = self.hub.js
        inbox = sub.ref.inbox
        member = Member(self.push, lambda key: self._kv_primary(bucket, pattern, key))
        sub.member = member
        # Join the shared live feed first, then read the current values: every change
        # after the catch-up's cutoff is then in the member's buffer (no gap).
        try:
            sub.feed = await self.hub.kv_feeds.join(bucket, pattern, member)
            info = await js.stream_info(stream)
        except NotFoundError:
            raise ProtocolError(ErrorCode.NOT_FOUND, f"no bucket {bucket!r}") from None
        first, last = info.state.first_seq, info.state.last_seq
        # Resuming is only complete when every change after `since` is still stored.
        recovered = since is not None and since <= last and since + 1 >= first
        if since is not None and recovered:
            start = Start(api.DeliverPolicy.BY_START_SEQUENCE, seq=since + 1)
            position = since + 1
        else:
            start = Start(api.DeliverPolicy.LAST_PER_SUBJECT)
            position = first if last else 0
        cut = len(f"$KV.{bucket}.")
        state = {"done": False, "revision": last}

        def synced() -> None:
            state["done"] = True
            cutoff = state["revision"]
            self.push(envelope.kv_synced(bucket, inbox, cutoff))
            member.go_live(cutoff)
            if sub.catchup is not None:
                self._spawn(sub.end_catchup())

        def on_message(d: Delivery) -> bool:
            if state["done"] or not sub.active:
                return True  # the shared feed delivers from here on, or nobody does
            delivered = self.push(encode_change(bucket, d.subject[cut:], d))
            state["revision"] = max(state["revision"], d.stream_seq)
            if d.pending == 0:
                synced()
            return delivered

        sub.catchup = StreamReader(
            self.hub.nc,
            js,
            stream,
            f"$KV.{bucket}.{pattern}",
            start,
            on_message,
            batch=256,
            on_lost=lambda e: self._reader_lost(sub, e),
            gate=self.hub.delivering,
        )
        await sub.catchup.start()
        self.push(envelope.ok(inbox, bucket, {"position": position, "recovered": recovered}))
        if sub.catchup.initial_pending == 0 and not state["done"]:
            synced()

    def _kv_primary(self, bucket: str, pattern: str, key: str) -> bool:
        """True unless a smaller kv_sub pattern of this session on the bucket matches
        `key` (that one delivers it). The key is split only when there is such a sub."""
        kt: tuple[str, ...] | None = None
        for other in self.subs.values():
            r = other.ref
            if r.op == "kv_sub" and r.target == bucket and r.pattern < pattern:
                kt = kt or tokens(key)
                if match_tokens(tokens(r.pattern), kt):
                    return False
        return True

    def feed_gone(self, feed: KvFeed) -> None:
        for sub in list(self.subs.values()):
            if isinstance(sub, KvSubscription) and sub.feed is feed:
                sub.feed = None  # nothing to leave: the feed is gone
                self._reader_lost(sub, None)

    def _reader_lost(self, sub: Subscription, e: Exception | None) -> None:
        """The stream or bucket is gone: end the subscription and say so."""
        if self.subs.get(sub.ref.inbox) is sub:
            del self.subs[sub.ref.inbox]
            self._spawn(self._end(sub))
            self.push(
                envelope.error(
                    ErrorCode.NOT_FOUND, "stream or bucket deleted", sub.ref.inbox, sub.ref.target
                )
            )

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
            raise ProtocolError(
                ErrorCode.BAD_REQUEST, "give at most one of start_seq, time_delta, start_time"
            )
        self._require_nats()
        ref = SubscriptionRef(inbox, "js_sub", stream, flt)
        sub = ReaderSubscription(ref)
        await self._open(sub, self._start_js(sub, stream, flt, d))

    async def _start_js(
        self, sub: ReaderSubscription, stream: str, flt: str, d: envelope.JsSubData
    ) -> None:
        try:
            info = await self.hub.js.stream_info(stream)
        except NotFoundError:
            raise ProtocolError(ErrorCode.NOT_FOUND, f"no stream {stream!r}") from None
        first, last = info.state.first_seq, info.state.last_seq
        recovered = True
        if d.start_seq is not None:
            recovered = first <= d.start_seq <= last + 1 or (last == 0 and d.start_seq == 1)
            if d.start_seq > last + 1:
                start = Start(api.DeliverPolicy.ALL)  # the stream was recreated: replay it
            else:
                start = Start(api.DeliverPolicy.BY_START_SEQUENCE, seq=d.start_seq)
        elif d.time_delta is not None:
            since = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=d.time_delta)
            start = Start(api.DeliverPolicy.BY_START_TIME, time=since)
        elif d.start_time is not None:
            t = d.start_time if d.start_time.tzinfo else d.start_time.replace(tzinfo=dt.UTC)
            start = Start(api.DeliverPolicy.BY_START_TIME, time=t)
        else:
            start = Start(api.DeliverPolicy.NEW)
        inbox = sub.ref.inbox
        ack = d.ack

        encoder = envelope.JsEncoder(stream, inbox)

        def on_message(m: Delivery) -> bool:
            if not sub.active:
                return False
            if ack:
                sub.unacked[m.stream_seq] = m.reply
            return self.push(encoder.encode(m.stream_seq, m.subject, m.data, m.time_ns))

        durable = f"u_{self.uid}_{d.durable}" if d.durable else None
        sub.reader = StreamReader(
            self.hub.nc,
            self.hub.js,
            stream,
            flt,
            start,
            on_message,
            batch=d.batch,
            ack=ack,
            durable=durable,
            wait_room=self.outbox.wait_room,
            on_lost=lambda e: self._reader_lost(sub, e),
            gate=self.hub.delivering,
        )
        try:
            cinfo = await sub.reader.start()
        except ValueError as e:
            raise ProtocolError(ErrorCode.BAD_REQUEST, str(e)) from None
        except NotFoundError:
            raise ProtocolError(ErrorCode.NOT_FOUND, f"no stream {stream!r}") from None
        except Exception as e:
            if type(e).__name__ == "BadRequestError":
                raise ProtocolError(
                    ErrorCode.BAD_REQUEST, "filter does not fit the stream's subjects"
                ) from None
            raise
        delivered = cinfo.delivered.stream_seq if cinfo.delivered else 0
        position = max(delivered or 0, 0) + 1
        if start.policy == api.DeliverPolicy.NEW:
            position = last + 1
        self.push(envelope.ok(inbox, stream, {"position": position, "recovered": recovered}))

    async def _ack(self, op: envelope.Ack) -> None:
        sub = self.subs.get(op.inbox or "")
        if not isinstance(sub, ReaderSubscription) or sub.ref.op != "js_sub":
            raise ProtocolError(ErrorCode.NOT_FOUND, "ack needs the inbox of a js_sub")
        reply = sub.unacked.pop(op.data.seq, None)
        if reply is None:
            raise ProtocolError(ErrorCode.NOT_FOUND, f"seq {op.data.seq} is not awaiting an ack")
        self._require_nats()
        try:
            # A confirmed ack: the ack floor has moved when this returns, so a durable
            # parked right after (client leaving) resumes after it, not before.
            await self.hub.nc.request(reply, b"+ACK", timeout=2)
        except Exception:
            sub.unacked[op.data.seq] = reply
            raise ProtocolError(ErrorCode.UNAVAILABLE, "ack not confirmed: retry") from None

    async def _refresh(self, op: envelope.Refresh) -> None:
        try:
            claims = self.hub.verifier.verify(op.data.token)
        except InvalidToken as e:
            raise ProtocolError(ErrorCode.UNAUTHORIZED, str(e)) from None
        if claims.sub != self.uid:
            raise ProtocolError(ErrorCode.UNAUTHORIZED, "token is for another user")
        self._require_nats()
        if await self.hub.is_revoked(claims.jti):
            raise ProtocolError(ErrorCode.UNAUTHORIZED, "token revoked")
        old = self.claims
        self.claims = claims
        self.hub.rekey(self, old.jti)
        self._schedule_expiry()
        self.push(envelope.ok(op.inbox, None, {"exp": claims.exp}))

    # ------------------------------------------------------------------ from the hub

    def apply_user(
        self,
        user: UserRecord | None,
        changed_at: float | None = None,
        caps: CompiledCapabilities | None = None,
    ) -> None:
        """The user's record changed: end what is no longer allowed, then tell the client."""
        if user is None or user.disabled:
            self.close(CloseCode.USER_DISABLED, "user disabled or deleted", ErrorCode.USER_DISABLED)
            return
        if caps is None:
            caps = compile_or_nothing(user)
        self.user = user
        self.caps = caps
        ended: list[envelope.RevokedRef] = []
        for inbox, sub in list(self.subs.items()):
            if not caps.allows(sub.ref):
                del self.subs[inbox]
                sub.detach()  # nothing more is delivered on it, from this instant
                ended.append(envelope.RevokedRef(inbox, sub.ref.op, sub.ref.target))
                self._spawn(self._end(sub))
        if ended and changed_at is not None:
            metrics.REVOCATION_LATENCY.observe(max(0.0, time.time() - changed_at))
        self.push(envelope.cap_update(self.uid, caps.document, ended))

    def on_nats_reconnect(self) -> None:
        for sub in self.subs.values():
            if isinstance(sub, ReaderSubscription) and sub.reader is not None:
                sub.reader.mark_lost()
            elif isinstance(sub, KvSubscription) and sub.catchup is not None:
                sub.catchup.mark_lost()
