"""The gateway's registry of sessions and its shared NATS machinery.

Sessions by user and by token id; the core fan-out router; one watch per process on
`auth_users` (capability changes, disabled/deleted users) and one on `auth_revoked`
(logout), dispatched to the sessions concerned.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict

from nats.aio.client import Client as NATS
from nats.js import api
from nats.js.client import JetStreamContext
from nats.js.errors import KeyNotFoundError

from shared.auth import TokenVerifier
from shared.capabilities import CompiledCapabilities
from shared.errors import CloseCode, ErrorCode
from shared.settings import Settings
from shared.users import REVOKED_BUCKET, USERS_BUCKET, UserRecord, decode_user
from ws_gateway.core import CoreRouter
from ws_gateway.kvfeed import KvFeed, KvFeeds
from ws_gateway.outbox import Flusher
from ws_gateway.reader import Delivery, Start, StreamReader
from ws_gateway.session import Session, compile_or_nothing

log = logging.getLogger("ws_gateway.hub")


class Hub:
    def __init__(self, settings: Settings, nc: NATS, verifier: TokenVerifier) -> None:
        self.settings = settings
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream(timeout=5)
        self.verifier = verifier
        self.router = CoreRouter(nc)
        self.flusher = Flusher()
        self.kv_feeds = KvFeeds(nc, self.js)
        self.kv_feeds.on_gone = self._feed_gone
        self.sessions: set[Session] = set()
        self.closing: set[Session] = set()  # deregistered, still releasing subscriptions
        self.by_user: dict[str, set[Session]] = defaultdict(set)
        self.by_jti: dict[str, set[Session]] = defaultdict(set)
        self._watchers: list[StreamReader] = []
        self._loading: dict[str, asyncio.Future[UserRecord | None]] = {}
        # The record and compiled capabilities of every user with a session here, kept
        # current by the auth_users watch: one KV read and one compile per user, not per
        # connection.
        self.users: dict[str, tuple[UserRecord, CompiledCapabilities]] = {}
        self.nats_ready = nc.is_connected

    async def start(self) -> None:
        users = StreamReader(
            self.nc,
            self.js,
            f"KV_{USERS_BUCKET}",
            f"$KV.{USERS_BUCKET}.>",
            Start(api.DeliverPolicy.NEW),
            self._on_user_change,
            batch=256,
        )
        revoked = StreamReader(
            self.nc,
            self.js,
            f"KV_{REVOKED_BUCKET}",
            f"$KV.{REVOKED_BUCKET}.>",
            Start(api.DeliverPolicy.NEW),
            self._on_revoked,
            batch=256,
        )
        for w in (users, revoked):
            await w.start()
            self._watchers.append(w)

    async def close(self) -> None:
        for w in self._watchers:
            await w.close()
        self._watchers.clear()
        await self.kv_feeds.close()

    def _feed_gone(self, feed: KvFeed) -> None:
        for s in list(self.sessions):
            s.feed_gone(feed)

    # ------------------------------------------------------------------ NATS state

    async def on_disconnect(self) -> None:
        self.nats_ready = False

    async def on_reconnect(self) -> None:
        self.nats_ready = True
        for w in self._watchers:
            w.mark_lost()
        self.kv_feeds.mark_lost()
        for s in list(self.sessions):
            s.on_nats_reconnect()

    # ------------------------------------------------------------------ registry

    def compiled(self, user: UserRecord) -> CompiledCapabilities:
        cached = self.users.get(user.id)
        if cached is not None and cached[0] is user:
            return cached[1]
        return compile_or_nothing(user)

    def register(self, session: Session) -> None:
        if session.uid not in self.by_user or session.uid not in self.users:
            self.users[session.uid] = (session.user, session.caps)
        self.sessions.add(session)
        self.by_user[session.uid].add(session)
        self.by_jti[session.claims.jti].add(session)

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
            kv = await self.js.key_value(USERS_BUCKET)
            try:
                entry = await kv.get(uid)
                record = decode_user(entry.value) if entry.value else None
            except KeyNotFoundError:
                record = None
            fut.set_result(record)
            return record
        except BaseException as e:
            fut.set_exception(e)
            fut.exception()
            raise
        finally:
            del self._loading[uid]

    async def is_revoked(self, jti: str) -> bool:
        kv = await self.js.key_value(REVOKED_BUCKET)
        try:
            entry = await kv.get(jti)
        except KeyNotFoundError:
            return False
        return entry.value is not None

    # ------------------------------------------------------------------ watches

    def _on_user_change(self, d: Delivery) -> bool:
        uid = d.subject[len(f"$KV.{USERS_BUCKET}.") :]
        sessions = self.by_user.get(uid)
        if not sessions:
            return True
        op = (d.headers or {}).get("KV-Operation")
        record: UserRecord | None = None
        if op not in ("DEL", "PURGE") and d.data:
            try:
                record = decode_user(d.data)
            except Exception:
                log.warning("undecodable user record", extra={"user": uid})
                record = None
        changed_at = d.time.timestamp()
        caps = None
        if record is not None and not record.disabled:
            caps = compile_or_nothing(record)
            self.users[uid] = (record, caps)
        else:
            self.users.pop(uid, None)
        for s in list(sessions):
            s.apply_user(record, changed_at, caps)
        return True

    def _on_revoked(self, d: Delivery) -> bool:
        jti = d.subject[len(f"$KV.{REVOKED_BUCKET}.") :]
        if (d.headers or {}).get("KV-Operation") in ("DEL", "PURGE"):
            return True
        for s in list(self.by_jti.get(jti, ())):
            s.close(CloseCode.TOKEN, "token revoked", ErrorCode.UNAUTHORIZED)
        return True
