"""The gateway's registry of sessions and its shared NATS machinery.

Sessions by user and by token id; the core fan-out router; one watch per process on
`auth_users` (capability changes, disabled/deleted users), one on `auth_revoked`
(logout) and one on `auth_roles` (for users admitted from a default role before they have a
record), dispatched to the sessions concerned. The revoked token ids are also kept in
memory (the bucket listed at start and after every NATS reconnect, the watch keeping it
current), so a handshake costs no KV read: a reconnect storm of N clients is not N reads.

`auth_revoked` holds two kinds of key. A token id (`secrets.token_urlsafe`: no dot) revokes
that token; its value is the token's expiry, optionally followed by a grace deadline (a
token replaced by refresh: its open sockets may still send `refresh` until then). A key
`user.<uid>` holds a time T (Unix seconds): every token of that user issued before T
(`iat < T`) is revoked (log out everywhere, password change, disable).

Fail closed: if any watch is lost for good (its stream missing past the reader's
grace), the hub closes every session, reports not ready and refuses new ones until the
watch is re-established (retried with backoff) and the revoked tokens listed again.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import msgspec
from nats.aio.client import Client as NATS
from nats.js import api
from nats.js.client import JetStreamContext
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from shared import failover, kvwire
from shared.auth import Claims
from shared.capabilities import Capabilities, CompiledCapabilities
from shared.errors import Disconnect, Disconnects, ErrorCode, ReplyError
from shared.issuers import Verifiers
from shared.kvlist import leader_get, live_entries, writes_after
from shared.settings import Settings
from shared.tasks import cancel_and_wait
from shared.users import (
    REVOKED_BUCKET,
    ROLES_BUCKET,
    USER_MARK,
    USERS_BUCKET,
    UserRecord,
    compile_or_nothing,
    decode_user,
    with_roles,
)
from ws_gateway import metrics
from ws_gateway.checkpoints import Checkpoints
from ws_gateway.core import CoreRouter
from ws_gateway.durables import DurableStore
from ws_gateway.history import History
from ws_gateway.jsfeed import JsTail, JsTails
from ws_gateway.kvfeed import KvFeed, KvFeeds
from ws_gateway.outbox import Flusher
from ws_gateway.presence import Presence
from ws_gateway.reader import Delivery, StreamReader
from ws_gateway.rules import Start
from ws_gateway.session import Session
from ws_gateway.transport import Transport

T = TypeVar("T")
log = logging.getLogger("ws_gateway.hub")

MAX_CATCHUPS = 256  # per process; two gateways stay well inside a stream's 1,000 consumers
HEARTBEAT_TICK = 1.0  # seconds between the sessions' clock ticks (at most)

REWATCH_BACKOFF_MAX = 5.0


@dataclass(frozen=True, slots=True)
class UserRead:
    """A user's record as read, with the auth_users revision it was read at (0: none)."""

    record: UserRecord | None
    revision: int
    # For a user admitted from an issuer's default role: the auth_roles revision its
    # template was read at (a change the role watch applied later is applied on open).
    role_revision: int = 0


@dataclass(frozen=True, slots=True)
class Known:
    """The record, revision and compiled capabilities of a user with a session here."""

    record: UserRecord
    revision: int
    caps: CompiledCapabilities


class Hub:
    def __init__(self, settings: Settings, nc: NATS, verifier: Verifiers) -> None:
        self.settings = settings
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream(timeout=5)
        self.verifier = verifier
        self.checkpoint = Checkpoints()
        self.router = CoreRouter(nc)
        self.flusher = Flusher()
        self.kv_feeds = KvFeeds(nc, self.js, self.delivering)
        self.kv_feeds.on_gone = self._feed_gone
        self.js_tails = JsTails(nc, self.js, self.delivering)
        self.js_tails.on_gone = self._tail_gone
        self.history = History(nc, settings.js_history_bytes)
        self.durables = DurableStore(nc, self.js, settings)
        self.presence = Presence(self.js, settings)
        self.catchups = asyncio.Semaphore(MAX_CATCHUPS)  # kv_sub catch-up consumers at once
        self.sessions: set[Session] = set()
        self.closing: set[Session] = set()  # deregistered, still releasing subscriptions
        self.by_user: dict[str, set[Session]] = defaultdict(set)
        self.by_jti: dict[str, set[Session]] = defaultdict(set)
        self._watchers: dict[str, StreamReader] = {}
        # Buckets whose watch was lost for good; not ready until the set is empty and the
        # revoked tokens were listed again (`_rewatch`).
        self._watch_lost: set[str] = set()
        self._rewatch: asyncio.Task[None] | None = None
        # uid -> T: every token of uid with iat < T is revoked (the `user.<uid>` marks).
        self._marks: dict[str, int] = {}
        self._grace: dict[str, asyncio.TimerHandle] = {}  # jti -> close of its sockets
        self._buckets: dict[str, KeyValue] = {}
        # jti -> when it was revoked (wall clock). Only trusted while `_revoked_whole`: from
        # the first listing until NATS drops, and again once re-listed after the reconnect.
        self._revoked: dict[str, float] = {}
        self._revoked_whole = False
        # Listed once with the revoked watch running: from then on the watch's position
        # marks what the mirror holds (until the watch is lost and made again).
        self._listed = False
        self._revoked_pruned = time.time()
        self._loading: dict[str, asyncio.Future[UserRead]] = {}
        # The record and compiled capabilities of every user with a session here, kept
        # current by the auth_users watch: one KV read and one compile per user, not per
        # connection.
        self.users: dict[str, Known] = {}
        # The newest auth_users revision seen per user id, sessions or not (one int per
        # key of the bucket): a handshake whose read is older than it re-reads, so a
        # change that lands while a handshake reads is never lost.
        self._seen: dict[str, int] = {}
        # Role -> (auth_roles revision, template or None: deleted) the role watch applied.
        self._role_seen: dict[str, tuple[int, Capabilities | None]] = {}
        self._readers: dict[str, int] = {}  # kv_sub + js_sub held per user (take_reader)
        self.nats_ready = nc.is_connected
        # False from a NATS disconnect until every user's record has been re-read:
        # nothing is delivered on capabilities that may have changed meanwhile.
        self._delivering = True
        self._delivering_event = asyncio.Event()
        self._delivering_event.set()
        self._revalidation: asyncio.Task[None] | None = None
        self._clock: asyncio.Task[None] | None = None

    async def start(self) -> None:
        for bucket in (USERS_BUCKET, REVOKED_BUCKET, ROLES_BUCKET):
            await self._watch(bucket)
        # After the watch started: a revocation is either listed or delivered by it.
        await self._list_revoked()
        await self.history.start()
        await self.durables.start()
        self.presence.start()
        self._clock = asyncio.get_running_loop().create_task(self._tick())

    async def _tick(self) -> None:
        """The sessions' one clock: token expiry and heartbeats (Session.tick), instead of
        timers per connection. A token expires at most HEARTBEAT_TICK late."""
        period = min(HEARTBEAT_TICK, self.settings.ping_interval / 4)
        while True:
            await asyncio.sleep(period)
            now, wall = time.monotonic(), time.time()
            for session in list(self.sessions):
                session.tick(now, wall)

    async def _watch(self, bucket: str) -> None:
        on_change = {
            USERS_BUCKET: self._on_user_change,
            REVOKED_BUCKET: self._on_revoked,
            ROLES_BUCKET: self._on_role_change,
        }[bucket]
        w = StreamReader(
            self.nc,
            self.js,
            kvwire.stream_of(bucket),
            kvwire.subject_of(bucket, ">"),
            Start(api.DeliverPolicy.NEW),
            on_change,
            batch=256,
            on_lost=functools.partial(self._on_watch_lost, bucket),
        )
        await w.start()
        old = self._watchers.pop(bucket, None)
        self._watchers[bucket] = w
        if old is not None:
            await old.close()

    async def close(self) -> None:
        await cancel_and_wait(self._clock)
        await cancel_and_wait(self._revalidation)
        await cancel_and_wait(self._rewatch)
        for timer in self._grace.values():
            timer.cancel()
        self._grace.clear()
        for w in self._watchers.values():
            await w.close()
        self._watchers.clear()
        await self.presence.close()
        await self.kv_feeds.close()
        await self.js_tails.close()
        await self.history.close()
        await self.durables.close()
        await self.verifier.close()

    # ------------------------------------------------------------------ auth watches lost

    @property
    def ready(self) -> bool:
        """Connected, and every auth watch running: new sessions may be admitted."""
        return self.nats_ready and self.watching

    @property
    def watching(self) -> bool:
        return not self._watch_lost and (self._rewatch is None or self._rewatch.done())

    def _on_watch_lost(self, bucket: str, e: Exception) -> None:
        """The reader gave up (stream missing past its grace): no revocation or capability
        change would reach a session any more. Fail closed until it is back."""
        log.warning(
            "auth watch lost",
            extra={
                "event": "auth_watch_lost",
                "bucket": bucket,
                "error": type(e).__name__,
                "sessions": len(self.sessions),
            },
        )
        self._watch_lost.add(bucket)
        self._revoked_whole = False
        self._listed = False
        if bucket == USERS_BUCKET:
            # A recreated bucket numbers its revisions from 1 again.
            self._seen.clear()
            self._role_seen.clear()
            self.users.clear()
        for s in list(self.sessions):
            s.close(Disconnects.AUTH_WATCH_LOST)
        if self._rewatch is None or self._rewatch.done():
            self._rewatch = asyncio.get_running_loop().create_task(self._rewatch_loop())

    async def _rewatch_loop(self) -> None:
        backoff = 0.1
        while True:
            try:
                for bucket in sorted(self._watch_lost):
                    await self._watch(bucket)
                    self._watch_lost.discard(bucket)
                await self._list_revoked()
                if not self._watch_lost:
                    break  # else another watch was lost meanwhile: this task re-creates it
                continue
            except Exception as e:
                log.info(
                    "auth watch retry",
                    extra={
                        "event": "auth_watch_retry",
                        "buckets": sorted(self._watch_lost),
                        "error": type(e).__name__,
                    },
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, REWATCH_BACKOFF_MAX)
        log.warning("auth watches re-established", extra={"event": "auth_watch_restored"})

    def _feed_gone(self, feed: KvFeed) -> None:
        for s in list(self.sessions):
            s.feed_gone(feed)

    def _tail_gone(self, tail: JsTail) -> None:
        for s in list(self.sessions):
            s.tail_gone(tail)

    # ------------------------------------------------------------------ NATS state

    def delivering(self) -> bool:
        return self._delivering

    async def delivering_open(self) -> None:
        """Returns once deliveries are no longer held (at once when they are not)."""
        if not self._delivering:
            await self._delivering_event.wait()

    async def ride_out(self, op: Callable[[], Awaitable[T]], kind: str) -> T:
        """`op` tried again while NATS fails over, up to NATS_FAILOVER_WAIT; then
        failover.Unavailable (the client's `unavailable`)."""
        try:
            return await failover.ride_out(
                op,
                self.settings.nats_failover_wait,
                kind,
                on_retry=lambda k: metrics.NATS_RETRIES.labels(k).inc(),
            )
        except failover.Unavailable:
            metrics.NATS_FAILURES.labels(kind).inc()
            raise

    async def serving(self) -> bool:
        """Wait (up to NATS_FAILOVER_WAIT) until NATS is connected and the capabilities are
        re-read after a reconnect; False if it is still not so by then."""
        if self._delivering and self.nats_ready:
            return True
        await self.checkpoint("nats.wait")
        try:
            async with asyncio.timeout(self.settings.nats_failover_wait):
                while not (self._delivering and self.nats_ready):
                    await self._delivering_event.wait()
        except TimeoutError:
            return False
        return True

    def take_reader(self, uid: str) -> None:
        """A slot for one more JetStream-reading subscription (js_sub, kv_sub) of `uid` in
        this process: each holds a consumer or a share of one. `limit` beyond the cap."""
        held = self._readers.get(uid, 0)
        if held >= self.settings.max_readers_per_user:
            raise ReplyError(
                ErrorCode.LIMIT,
                f"at most {self.settings.max_readers_per_user} kv_sub and js_sub per user "
                "on this gateway",
            )
        self._readers[uid] = held + 1

    def give_reader(self, uid: str) -> None:
        held = self._readers.get(uid, 0) - 1
        if held > 0:
            self._readers[uid] = held
        else:
            self._readers.pop(uid, None)

    async def on_disconnect(self) -> None:
        self.nats_ready = False
        self._delivering = False
        self._delivering_event.clear()
        self._revoked_whole = False
        self.router.open = False

    async def on_reconnect(self) -> None:
        self.nats_ready = True
        for w in self._watchers.values():
            w.mark_lost()
        # nats-py awaits this callback inside its reconnect; the re-read needs the
        # connection, so it runs beside it, owned by the hub.
        if self._revalidation is None or self._revalidation.done():
            self._revalidation = asyncio.get_running_loop().create_task(self._revalidate())

    async def _revalidate(self) -> None:
        """Fail closed: re-read every connected user's record before delivering again."""
        attempt = 0
        while True:
            try:
                # Each read bounded by TRY_TIMEOUT: a read that went to a leader that has
                # just died is asked again at once (an election takes a few seconds), not
                # after nats-py's 5 s.
                for uid in list(self.by_user):
                    async with asyncio.timeout(failover.TRY_TIMEOUT):
                        read = await self._read_user(uid)
                    self._apply(uid, read, None)
                await self._catch_up_revoked()
                for s in list(self.sessions):
                    self._close_if_revoked(s)
                break
            except Exception as e:
                if not self.nc.is_connected:
                    return  # disconnected again: the next reconnect starts over
                log.warning("revalidation retry", extra={"error": type(e).__name__})
                metrics.NATS_RETRIES.labels("revalidate").inc()
                await asyncio.sleep(failover.backoff(attempt))  # a pause between tries
                attempt += 1
        self._delivering = True
        self._delivering_event.set()
        self.router.open = True
        self.kv_feeds.mark_lost()
        self.js_tails.mark_lost()
        for s in list(self.sessions):
            s.on_nats_reconnect()
        log.info("capabilities re-read after reconnect", extra={"users": len(self.by_user)})

    # ------------------------------------------------------------------ registry

    def compiled(self, user: UserRecord) -> CompiledCapabilities:
        known = self.users.get(user.id)
        if known is not None and known.record is user:
            return known.caps
        return compile_or_nothing(user)

    async def open(self, claims: Claims, read: UserRead, transport: Transport) -> Session:
        """A session for an admitted handshake, registered and started (or already closing,
        if the user was disabled meanwhile).

        Registered first, so the auth_users watch applies every later change to it; then,
        if the watch saw a newer record than the handshake read, read again: a change that
        landed during the handshake is applied before anything is delivered. Last, the
        token is checked again: a logout the watch delivered after the handshake's check
        would otherwise never reach it."""
        assert read.record is not None
        session = Session(self, claims, read.record, read.revision, transport)
        self.sessions.add(session)
        self.by_user[session.uid].add(session)
        self.by_jti[claims.jti].add(session)
        if self._seen.get(session.uid, 0) > session.user_revision:
            try:
                fresh = await self._read_user(session.uid)
            except Exception as e:  # NATS away: the session cannot start on a known record
                log.info("user re-read failed", extra={"user": session.uid, "error": repr(e)})
                session.close(Disconnects.UNAVAILABLE)
                return session
            await self.checkpoint("open.reread")
            session.apply_user(fresh.record, fresh.revision)
        if session.closed:
            return session
        self._catch_up_role(session, read)
        known = self.users.get(session.uid)
        if known is None or known.revision < session.user_revision:
            self.users[session.uid] = Known(session.user, session.user_revision, session.caps)
        session.start()
        self._close_if_revoked(session)
        if not self.watching:  # lost while this handshake was admitted
            session.close(Disconnects.AUTH_WATCH_LOST)
        return session

    def _catch_up_role(self, session: Session, read: UserRead) -> None:
        """A default-role user's template changed while its handshake ran: the role watch
        applied the change to the users it knew, not to this one. Applied here, with no
        await before the user joins `self.users`, so every later change reaches it."""
        if read.revision != 0 or session.user_revision != 0 or not session.user.roles:
            return
        role = session.user.roles[0]
        seen = self._role_seen.get(role)
        if seen is None or seen[0] <= read.role_revision:
            return
        templates = {role: seen[1]} if seen[1] is not None else {}
        record = with_roles(session.user, session.user.roles, templates)
        session.apply_user(record, 0, time.time(), compile_or_nothing(record))

    def _close_if_revoked(self, session: Session) -> None:
        if self._token_revoked(session.claims):
            session.close(Disconnects.TOKEN_REVOKED)

    def _token_revoked(self, claims: Claims) -> bool:
        """From the mirror: the token id is revoked, or the user's mark postdates the token."""
        return claims.jti in self._revoked or claims.iat < self._marks.get(claims.sub, 0)

    def closed(self, session: Session) -> None:
        """The session has released everything."""
        self.closing.discard(session)

    def unregister(self, session: Session) -> None:
        if session in self.sessions:
            self.closing.add(session)
        self.sessions.discard(session)
        for index, key in ((self.by_user, session.uid), (self.by_jti, session.claims.jti)):
            group = index.get(key)
            if group is not None:
                group.discard(session)
                if not group:
                    del index[key]
        if session.uid not in self.by_user:
            self.users.pop(session.uid, None)

    def rekey(self, session: Session, old_jti: str) -> None:
        group = self.by_jti.get(old_jti)
        if group is not None:
            group.discard(session)
            if not group:
                del self.by_jti[old_jti]
        self.by_jti[session.claims.jti].add(session)
        self._close_if_revoked(session)

    def user_sessions(self, uid: str) -> int:
        return len(self.by_user.get(uid, ()))

    def full(self) -> bool:
        """At this process's share of MAX_CONNECTIONS (WebSocket and long-poll sessions)."""
        return len(self.sessions) >= self.settings.gateway_max_connections

    # ------------------------------------------------------------------ lookups

    async def load_user(self, uid: str) -> UserRead:
        """The user's record; concurrent loads of one user share one KV read."""
        known = self.users.get(uid)
        if known is not None:
            return UserRead(known.record, known.revision)
        pending = self._loading.get(uid)
        if pending is not None:
            return await asyncio.shield(pending)
        fut: asyncio.Future[UserRead] = asyncio.get_running_loop().create_future()
        self._loading[uid] = fut
        try:
            read = await self._read_user(uid)
            await self.checkpoint("admit.read")
            fut.set_result(read)
            return read
        except BaseException as e:
            fut.set_exception(e)
            fut.exception()
            raise
        finally:
            del self._loading[uid]

    async def role_user(self, claims: Claims) -> UserRead:
        """A trusted issuer's user without a record, as the issuer's default role makes it
        (not stored: only the API writes auth_users, and does so on the user's first API
        request); no record when the issuer names no role or the role is missing. Revision
        0: the record the API creates later reaches the session through the watch."""
        role = self.verifier.by_name[claims.source].config.default_role
        if not role:
            return UserRead(None, 0)
        try:
            entry = await (await self._bucket(ROLES_BUCKET)).get(role)
        except KeyNotFoundError:
            return UserRead(None, 0)
        if not entry.value:
            return UserRead(None, 0)
        template = msgspec.json.decode(entry.value, type=Capabilities)
        await self.checkpoint("admit.role")
        record = UserRecord(id=claims.sub, username=claims.sub, display_name=claims.sub)
        return UserRead(with_roles(record, [role], {role: template}), 0, entry.revision or 0)

    async def _read_user(self, uid: str) -> UserRead:
        try:
            entry = await (await self._bucket(USERS_BUCKET)).get(uid)
        except KeyNotFoundError:
            # Deleted or never was, says a direct get, which a replica that has not applied
            # the latest write may answer: the leader decides (a user created a moment ago
            # is admitted).
            try:
                async with asyncio.timeout(failover.LEADER_TRY):
                    read = await leader_get(self.js, USERS_BUCKET, uid)
            except Exception as e:
                if not failover.transient(e):
                    raise
                return UserRead(None, 0)  # no leader now (an election): as the replica said
            record = decode_user(read.value) if read.value else None
            return UserRead(record, read.revision)
        revision = entry.revision or 0
        record = decode_user(entry.value) if entry.value else None
        return UserRead(record, revision)

    async def _bucket(self, name: str) -> KeyValue:
        # Handles are kept: `js.key_value()` is a stream-info request of its own, which
        # doubled the JetStream requests of every handshake (reconnect storms).
        kv = self._buckets.get(name)
        if kv is None:
            kv = self._buckets[name] = await self.js.key_value(name)
        return kv

    async def _catch_up_revoked(self) -> None:
        """After a reconnect: the revocations written since the watch's last delivery,
        read by direct get from any replica (a node loss may take the bucket's leader:
        a listing, a consumer, would wait for the election). The watch delivers, in
        order and without a gap, everything up to its position; with that, the mirror is
        whole again. Without a watch position to trust, a full listing."""
        watch = self._watchers.get(REVOKED_BUCKET)
        if watch is None or not self._listed:
            async with asyncio.timeout(failover.TRY_TIMEOUT):
                await self._list_revoked()
            return
        writes = await writes_after(
            self.nc, REVOKED_BUCKET, watch.position, timeout=failover.TRY_TIMEOUT
        )
        for w in writes:
            self._on_revoked(Delivery(w.seq, 0, w.subject, w.data, w.headers, w.time_ns))
        self._revoked_whole = True

    async def _list_revoked(self) -> None:
        """Add every revoked token id in the bucket to the mirror; never removes one (a
        revocation the watch added meanwhile may postdate the listing)."""
        listed = await live_entries(self.js, REVOKED_BUCKET, values=True)
        now = time.time()
        for entry in listed:
            if entry.key.startswith(USER_MARK):
                uid = entry.key[len(USER_MARK) :]
                mark = _parse_mark(entry.value)
                if mark:
                    self._marks[uid] = max(self._marks.get(uid, 0), mark)
            else:
                self._revoked.setdefault(entry.key, now)
        self._revoked_whole = True
        self._listed = True

    @staticmethod
    async def _read_mark(kv: KeyValue, key: str) -> int:
        """The T of a `user.<uid>` mark; 0 when there is none (or it is unreadable)."""
        try:
            entry = await kv.get(key)
        except KeyNotFoundError:
            return 0
        return _parse_mark(entry.value)

    async def is_revoked(self, jti: str) -> bool:
        """Whether this token id is revoked (by id only: `revoked()` also applies the
        user's mark; a session refreshed to a token older than the mark is closed by
        `rekey`)."""
        if self._revoked_whole:
            self._prune_revoked()
            return jti in self._revoked
        try:  # before the first listing, or while NATS is (or just was) away
            entry = await (await self._bucket(REVOKED_BUCKET)).get(jti)
        except KeyNotFoundError:
            return False
        return entry.value is not None

    def known_revoked(self, claims: Claims) -> bool:
        """Whether the token is revoked as far as the mirror knows, for the requests of an
        admitted long-poll session (whatever the watches delivered since its handshake). A
        token replaced by refresh still counts until its grace ends, as its sockets do."""
        self._prune_revoked()
        if claims.jti in self._grace:
            return claims.iat < self._marks.get(claims.sub, 0)
        return self._token_revoked(claims)

    async def revoked(self, claims: Claims) -> bool:
        """Whether the token is revoked, by its id or by its user's mark."""
        if self._revoked_whole:
            self._prune_revoked()
            return self._token_revoked(claims)
        if await self.is_revoked(claims.jti):
            return True
        kv = await self._bucket(REVOKED_BUCKET)
        return claims.iat < await self._read_mark(kv, USER_MARK + claims.sub)

    def _prune_revoked(self) -> None:
        """Forget revocations older than the bucket's TTL: their tokens have expired."""
        now = time.time()
        if now - self._revoked_pruned < 60:
            return
        self._revoked_pruned = now
        horizon = now - (self.settings.token_ttl + 60)
        self._revoked = {j: t for j, t in self._revoked.items() if t > horizon}
        self._marks = {u: t for u, t in self._marks.items() if t > horizon}

    # ------------------------------------------------------------------ watches

    def _on_user_change(self, d: Delivery) -> bool:
        uid = d.subject[kvwire.key_offset(USERS_BUCKET) :]
        self._seen[uid] = max(self._seen.get(uid, 0), d.stream_seq)
        if not self.by_user.get(uid):
            return True
        record: UserRecord | None = None
        if kvwire.kv_op(d.headers) == "put" and d.data:
            try:
                record = decode_user(d.data)
            except Exception:
                log.warning("undecodable user record", extra={"user": uid})
                record = None
        self._apply(uid, UserRead(record, d.stream_seq), d.time_ns / 1e9)
        return True

    def _apply(self, uid: str, read: UserRead, changed_at: float | None) -> None:
        self._seen[uid] = max(self._seen.get(uid, 0), read.revision)
        known = self.users.get(uid)
        if known is not None and read.revision <= known.revision:
            return  # already applied (the re-read after a reconnect, then the watch)
        record = read.record
        caps = None
        if record is not None and not record.disabled:
            caps = compile_or_nothing(record)
            self.users[uid] = Known(record, read.revision, caps)
        else:
            self.users.pop(uid, None)
        for s in list(self.by_user.get(uid, ())):
            s.apply_user(record, read.revision, changed_at, caps)

    def _on_role_change(self, d: Delivery) -> bool:
        """A role changed. Users with a record follow it through their record (the API
        rewrites every holder's, http_api/roles.py); this is for the sessions of users
        admitted from an issuer's default role before they have one (revision 0,
        `role_user`), which no record change would reach. A role deleted or unreadable
        grants nothing (fail closed)."""
        role = d.subject[kvwire.key_offset(ROLES_BUCKET) :]
        templates: dict[str, Capabilities] = {}
        if kvwire.kv_op(d.headers) == "put" and d.data:
            try:
                templates[role] = msgspec.json.decode(d.data, type=Capabilities)
            except Exception:
                log.warning("undecodable role", extra={"role": role})
        self._role_seen[role] = (d.stream_seq, templates.get(role))
        for uid, known in list(self.users.items()):
            if known.revision != 0 or role not in known.record.roles:
                continue
            # Such a record holds its issuer's default role only: `templates` is all of it.
            record = with_roles(known.record, known.record.roles, templates)
            caps = compile_or_nothing(record)
            self.users[uid] = Known(record, 0, caps)
            for s in list(self.by_user.get(uid, ())):
                s.apply_user(record, 0, d.time_ns / 1e9, caps)
        return True

    def _on_revoked(self, d: Delivery) -> bool:
        key = d.subject[kvwire.key_offset(REVOKED_BUCKET) :]
        put = kvwire.kv_op(d.headers) == "put"
        if key.startswith(USER_MARK):
            self._on_mark(key[len(USER_MARK) :], _parse_mark(d.data) if put else 0)
            return True
        jti = key
        if not put:
            self._revoked.pop(jti, None)
            return True
        self._revoked[jti] = d.time_ns / 1e9
        grace = _parse_grace(d.data) - time.time()
        if grace > 0 and jti not in self._grace:
            # Replaced by refresh: its sockets may still send the new token until then.
            loop = asyncio.get_running_loop()
            self._grace[jti] = loop.call_later(grace, self._grace_over, jti)
        elif grace <= 0:
            self._close_jti(jti, Disconnects.TOKEN_REVOKED)
        return True

    def _grace_over(self, jti: str) -> None:
        self._grace.pop(jti, None)
        if jti in self._revoked:
            self._close_jti(jti, Disconnects.TOKEN_REVOKED.because("replaced by refresh"))

    def _close_jti(self, jti: str, disconnect: Disconnect) -> None:
        for s in list(self.by_jti.get(jti, ())):
            s.close(disconnect)

    def _on_mark(self, uid: str, mark: int) -> None:
        if not mark:
            self._marks.pop(uid, None)
            return
        mark = max(mark, self._marks.get(uid, 0))
        self._marks[uid] = mark
        for s in list(self.by_user.get(uid, ())):
            if s.claims.iat < mark:
                s.close(Disconnects.TOKEN_REVOKED)


def _parse_mark(value: bytes | None) -> int:
    """T of a `user.<uid>` mark (Unix seconds as text); 0 when malformed."""
    try:
        return int(value or b"0")
    except ValueError:
        log.warning("malformed revocation mark", extra={"event": "revocation_mark_bad"})
        return 0


def _parse_grace(value: bytes | None) -> float:
    """The grace deadline of a revoked token id (`<exp> <grace_until>`); 0: none."""
    parts = (value or b"").split()
    if len(parts) < 2:
        return 0.0
    try:
        return float(parts[1])
    except ValueError:
        return 0.0
