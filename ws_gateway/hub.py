"""The gateway's registry of sessions and its shared NATS machinery.

Sessions by user and by token id; the core fan-out router; one watch per process on
`auth_users` (capability changes, disabled/deleted users) and one on `auth_revoked`
(logout), dispatched to the sessions concerned. The revoked token ids are also kept in
memory (the bucket listed at start and after every NATS reconnect, the watch keeping it
current), so a handshake costs no KV read: a reconnect storm of N clients is not N reads.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from dataclasses import dataclass

from nats.aio.client import Client as NATS
from nats.js import api
from nats.js.client import JetStreamContext
from nats.js.errors import KeyNotFoundError, NoKeysError
from nats.js.kv import KeyValue

from shared import kvwire
from shared.auth import Claims, TokenVerifier
from shared.capabilities import CompiledCapabilities
from shared.errors import Disconnects
from shared.settings import Settings
from shared.tasks import cancel_and_wait
from shared.users import (
    REVOKED_BUCKET,
    USERS_BUCKET,
    UserRecord,
    compile_or_nothing,
    decode_user,
)
from ws_gateway.checkpoints import Checkpoints
from ws_gateway.core import CoreRouter
from ws_gateway.kvfeed import KvFeed, KvFeeds
from ws_gateway.outbox import Flusher
from ws_gateway.reader import Delivery, StreamReader
from ws_gateway.rules import Start
from ws_gateway.session import Session
from ws_gateway.transport import Transport

log = logging.getLogger("ws_gateway.hub")


@dataclass(frozen=True, slots=True)
class UserRead:
    """A user's record as read, with the auth_users revision it was read at (0: none)."""

    record: UserRecord | None
    revision: int


@dataclass(frozen=True, slots=True)
class Known:
    """The record, revision and compiled capabilities of a user with a session here."""

    record: UserRecord
    revision: int
    caps: CompiledCapabilities


class Hub:
    def __init__(self, settings: Settings, nc: NATS, verifier: TokenVerifier) -> None:
        self.settings = settings
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream(timeout=5)
        self.verifier = verifier
        self.checkpoint = Checkpoints()
        self.router = CoreRouter(nc)
        self.flusher = Flusher()
        self.kv_feeds = KvFeeds(nc, self.js, self.delivering)
        self.kv_feeds.on_gone = self._feed_gone
        self.sessions: set[Session] = set()
        self.closing: set[Session] = set()  # deregistered, still releasing subscriptions
        self.by_user: dict[str, set[Session]] = defaultdict(set)
        self.by_jti: dict[str, set[Session]] = defaultdict(set)
        self._watchers: list[StreamReader] = []
        self._buckets: dict[str, KeyValue] = {}
        # jti -> when it was revoked (wall clock). Only trusted while `_revoked_whole`: from
        # the first listing until NATS drops, and again once re-listed after the reconnect.
        self._revoked: dict[str, float] = {}
        self._revoked_whole = False
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
        self.nats_ready = nc.is_connected
        # False from a NATS disconnect until every user's record has been re-read:
        # nothing is delivered on capabilities that may have changed meanwhile.
        self._delivering = True
        self._revalidation: asyncio.Task[None] | None = None

    async def start(self) -> None:
        watches = ((USERS_BUCKET, self._on_user_change), (REVOKED_BUCKET, self._on_revoked))
        for bucket, on_change in watches:
            w = StreamReader(
                self.nc,
                self.js,
                kvwire.stream_of(bucket),
                kvwire.subject_of(bucket, ">"),
                Start(api.DeliverPolicy.NEW),
                on_change,
                batch=256,
            )
            await w.start()
            self._watchers.append(w)
        # After the watch started: a revocation is either listed or delivered by it.
        await self._list_revoked()

    async def close(self) -> None:
        await cancel_and_wait(self._revalidation)
        for w in self._watchers:
            await w.close()
        self._watchers.clear()
        await self.kv_feeds.close()

    def _feed_gone(self, feed: KvFeed) -> None:
        for s in list(self.sessions):
            s.feed_gone(feed)

    # ------------------------------------------------------------------ NATS state

    def delivering(self) -> bool:
        return self._delivering

    async def on_disconnect(self) -> None:
        self.nats_ready = False
        self._delivering = False
        self._revoked_whole = False
        self.router.open = False

    async def on_reconnect(self) -> None:
        self.nats_ready = True
        for w in self._watchers:
            w.mark_lost()
        # nats-py awaits this callback inside its reconnect; the re-read needs the
        # connection, so it runs beside it, owned by the hub.
        if self._revalidation is None or self._revalidation.done():
            self._revalidation = asyncio.get_running_loop().create_task(self._revalidate())

    async def _revalidate(self) -> None:
        """Fail closed: re-read every connected user's record before delivering again."""
        while True:
            try:
                for uid in list(self.by_user):
                    self._apply(uid, await self._read_user(uid), None)
                await self._list_revoked()
                for s in list(self.sessions):
                    self._close_if_revoked(s)
                break
            except Exception as e:
                if not self.nc.is_connected:
                    return  # disconnected again: the next reconnect starts over
                log.warning("revalidation retry", extra={"error": type(e).__name__})
                await asyncio.sleep(0.5)
        self._delivering = True
        self.router.open = True
        self.kv_feeds.mark_lost()
        for s in list(self.sessions):
            s.on_nats_reconnect()
        log.info("capabilities re-read after reconnect", extra={"users": len(self.by_user)})

    # ------------------------------------------------------------------ registry

    def compiled(self, user: UserRecord) -> CompiledCapabilities:
        known = self.users.get(user.id)
        if known is not None and known.record is user:
            return known.caps
        return compile_or_nothing(user)

    async def open(
        self, claims: Claims, read: UserRead, transport: Transport
    ) -> Session:
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
            fresh = await self._read_user(session.uid)
            await self.checkpoint("open.reread")
            session.apply_user(fresh.record, fresh.revision)
        if session.closed:
            return session
        known = self.users.get(session.uid)
        if known is None or known.revision < session.user_revision:
            self.users[session.uid] = Known(session.user, session.user_revision, session.caps)
        session.start()
        self._close_if_revoked(session)
        return session

    def _close_if_revoked(self, session: Session) -> None:
        if session.claims.jti in self._revoked:
            session.close(Disconnects.TOKEN_REVOKED)

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

    async def _read_user(self, uid: str) -> UserRead:
        try:
            entry = await (await self._bucket(USERS_BUCKET)).get(uid)
        except KeyNotFoundError as e:
            # deleted (nats-py's KeyDeletedError carries the marker's entry) or never was
            marker = getattr(e, "entry", None)
            return UserRead(None, (marker.revision or 0) if marker is not None else 0)
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

    async def _list_revoked(self) -> None:
        """Add every revoked token id in the bucket to the mirror; never removes one (a
        revocation the watch added meanwhile may postdate the listing)."""
        kv = await self._bucket(REVOKED_BUCKET)
        try:
            async with asyncio.timeout(10):  # nats-py's listing waits on a watcher, unbounded
                keys = await kv.keys()
        except NoKeysError:
            keys = []
        now = time.time()
        for jti in keys:
            self._revoked.setdefault(jti, now)
        self._revoked_whole = True

    async def is_revoked(self, jti: str) -> bool:
        if self._revoked_whole:
            self._prune_revoked()
            return jti in self._revoked
        try:  # before the first listing, or while NATS is (or just was) away
            entry = await (await self._bucket(REVOKED_BUCKET)).get(jti)
        except KeyNotFoundError:
            return False
        return entry.value is not None

    def _prune_revoked(self) -> None:
        """Forget revocations older than the bucket's TTL: their tokens have expired."""
        now = time.time()
        if now - self._revoked_pruned < 60:
            return
        self._revoked_pruned = now
        horizon = now - (self.settings.token_ttl + 60)
        self._revoked = {j: t for j, t in self._revoked.items() if t > horizon}

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

    def _on_revoked(self, d: Delivery) -> bool:
        jti = d.subject[kvwire.key_offset(REVOKED_BUCKET) :]
        if kvwire.kv_op(d.headers) != "put":
            self._revoked.pop(jti, None)
            return True
        self._revoked[jti] = d.time_ns / 1e9
        for s in list(self.by_jti.get(jti, ())):
            s.close(Disconnects.TOKEN_REVOKED)
        return True
