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

from nats.aio.client import Client as NATS
from nats.js import api
from nats.js.client import JetStreamContext
from nats.js.errors import KeyNotFoundError, NoKeysError
from nats.js.kv import KeyValue

from shared.auth import TokenVerifier
from shared.capabilities import CompiledCapabilities
from shared.errors import CloseCode, ErrorCode
from shared.settings import Settings
from shared.users import (
    REVOKED_BUCKET,
    USERS_BUCKET,
    UserRecord,
    compile_or_nothing,
    decode_user,
)
from ws_gateway.core import CoreRouter
from ws_gateway.kvfeed import KvFeed, KvFeeds, kv_op
from ws_gateway.outbox import Flusher
from ws_gateway.reader import Delivery, Start, StreamReader
from ws_gateway.session import Session

log = logging.getLogger("ws_gateway.hub")


class Hub:
    def __init__(self, settings: Settings, nc: NATS, verifier: TokenVerifier) -> None:
        self.settings = settings
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream(timeout=5)
        self.verifier = verifier
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
        self._loading: dict[str, asyncio.Future[UserRecord | None]] = {}
        # The record and compiled capabilities of every user with a session here, kept
        # current by the auth_users watch: one KV read and one compile per user, not per
        # connection.
        self.users: dict[str, tuple[UserRecord, CompiledCapabilities]] = {}
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
                f"KV_{bucket}",
                f"$KV.{bucket}.>",
                Start(api.DeliverPolicy.NEW),
                on_change,
                batch=256,
            )
            await w.start()
            self._watchers.append(w)
        # After the watch started: a revocation is either listed or delivered by it.
        await self._list_revoked()

    async def close(self) -> None:
        if self._revalidation is not None:
            self._revalidation.cancel()
            try:
                await self._revalidation
            except (asyncio.CancelledError, Exception):
                pass
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
        cached = self.users.get(user.id)
        if cached is not None and cached[0] is user:
            return cached[1]
        return compile_or_nothing(user)

    def open(self, session: Session) -> None:
        """Register and start a session; then check its token again: a logout the watch
        delivered after the handshake's check would otherwise never reach it."""
        if session.uid not in self.by_user or session.uid not in self.users:
            self.users[session.uid] = (session.user, session.caps)
        self.sessions.add(session)
        self.by_user[session.uid].add(session)
        self.by_jti[session.claims.jti].add(session)
        session.start()
        self._close_if_revoked(session)

    def _close_if_revoked(self, session: Session) -> None:
        if session.claims.jti in self._revoked:
            session.close(CloseCode.TOKEN, "token revoked", ErrorCode.UNAUTHORIZED)

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

    async def load_user(self, uid: str) -> UserRecord | None:
        """The user's record; concurrent loads of one user share one KV read."""
        cached = self.users.get(uid)
        if cached is not None:
            return cached[0]
        pending = self._loading.get(uid)
        if pending is not None:
            return await asyncio.shield(pending)
        fut: asyncio.Future[UserRecord | None] = asyncio.get_running_loop().create_future()
        self._loading[uid] = fut
        try:
            record = await self._read_user(uid)
            fut.set_result(record)
            return record
        except BaseException as e:
            fut.set_exception(e)
            fut.exception()
            raise
        finally:
            del self._loading[uid]

    async def _read_user(self, uid: str) -> UserRecord | None:
        try:
            entry = await (await self._bucket(USERS_BUCKET)).get(uid)
        except KeyNotFoundError:
            return None
        return decode_user(entry.value) if entry.value else None

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
        uid = d.subject[len(f"$KV.{USERS_BUCKET}.") :]
        sessions = self.by_user.get(uid)
        if not sessions:
            return True
        record: UserRecord | None = None
        if kv_op(d) == "put" and d.data:
            try:
                record = decode_user(d.data)
            except Exception:
                log.warning("undecodable user record", extra={"user": uid})
                record = None
        self._apply(uid, record, d.time_ns / 1e9)
        return True

    def _apply(self, uid: str, record: UserRecord | None, changed_at: float | None) -> None:
        cached = self.users.get(uid)
        if record is not None and cached is not None and record == cached[0]:
            return  # already applied (the re-read after a reconnect, then the watch)
        caps = None
        if record is not None and not record.disabled:
            caps = compile_or_nothing(record)
            self.users[uid] = (record, caps)
        else:
            self.users.pop(uid, None)
        for s in list(self.by_user.get(uid, ())):
            s.apply_user(record, changed_at, caps)

    def _on_revoked(self, d: Delivery) -> bool:
        jti = d.subject[len(f"$KV.{REVOKED_BUCKET}.") :]
        if kv_op(d) != "put":
            self._revoked.pop(jti, None)
            return True
        self._revoked[jti] = d.time_ns / 1e9
        for s in list(self.by_jti.get(jti, ())):
            s.close(CloseCode.TOKEN, "token revoked", ErrorCode.UNAUTHORIZED)
        return True
