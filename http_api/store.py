"""The only code that touches NATS KV: users, credentials, revocations, articles, todos.

Every write returns the KV revision it produced. Optimistic concurrency is KV's own:
`update(..., last=rev)` and deletes with `Nats-Expected-Last-Subject-Sequence`, so two
writers holding the same revision can never both succeed.

    Exception
     └── StoreError
          ├── Conflict    the key's revision is not the expected one
          └── Exists      create of a key that already exists
               └── IdTaken    create_user with the id of another user
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import msgspec
from nats.js.client import JetStreamContext
from nats.js.errors import APIError, KeyNotFoundError
from nats.js.kv import KeyValue

from http_api.schemas import Article, Todo
from shared import kvwire
from shared.capabilities import Capabilities
from shared.failover import LEADER_TRY, TRY_TIMEOUT, Unavailable, ride_out, transient
from shared.kvlist import LeaderRead, leader_get, live_entries
from shared.users import (
    CREDENTIALS_BUCKET,
    REVOKED_BUCKET,
    ROLES_BUCKET,
    USER_ID_RE,
    USER_MARK,
    USERS_BUCKET,
    Credential,
    UserRecord,
)

log = logging.getLogger("http_api.store")

ARTICLES_BUCKET = "articles"
TODOS_BUCKET = "todos"
_WRONG_LAST_SEQUENCE = (10071, 10164)
_EXPECT_LAST = "Nats-Expected-Last-Subject-Sequence"

T = TypeVar("T")
U = TypeVar("U")
READY_PROBE_KEY = "readyz.probe"  # never written: a read of it only proves reads work


class Retrier:
    """How this process rides out a NATS failover: the wait, and the metrics of retries
    and of operations that failed for good."""

    def __init__(
        self,
        wait: float = 10.0,
        on_retry: Callable[[str], None] | None = None,
        on_failure: Callable[[str], None] | None = None,
    ) -> None:
        self.wait, self._on_retry, self._on_failure = wait, on_retry, on_failure

    async def __call__(self, kind: str, op: Callable[[], Awaitable[U]]) -> U:
        try:
            return await ride_out(op, self.wait, kind, on_retry=self._on_retry)
        except Unavailable:
            if self._on_failure is not None:
                self._on_failure(kind)
            raise


async def leader_or_replica(
    js: JetStreamContext, kv: KeyValue, bucket: str, key: str, ride: Retrier
) -> LeaderRead:
    """The key as the stream's leader has it (a write a moment ago is seen); while the
    leader is being elected, as any replica has it (a direct get), so that losing a node
    fails no read."""
    try:
        async with asyncio.timeout(LEADER_TRY):
            return await leader_get(js, bucket, key)
    except Exception as e:
        if not transient(e):
            raise
    try:
        entry = await ride("read", lambda: kv.get(key))
    except KeyNotFoundError:
        return LeaderRead(0, None)
    return LeaderRead(entry.revision or 0, entry.value)


class StoreError(Exception):
    pass


class Conflict(StoreError):
    """The key changed since the revision the caller holds."""


class Exists(StoreError):
    """The key already exists."""


class IdTaken(Exists):
    """A new user's id is already another user's."""


@dataclass(frozen=True, slots=True)
class Versioned(Generic[T]):
    value: T
    revision: int


def todo_key(uid: str, item: str) -> str:
    return f"user.{uid}.{item}"


class _Bucket(Generic[T]):
    """One KV bucket holding msgspec-encoded values of one type."""

    def __init__(
        self, js: JetStreamContext, kv: KeyValue, name: str, typ: type[T], ride: Retrier
    ) -> None:
        self._js, self.kv, self.name, self._ride = js, kv, name, ride
        self._decoder = msgspec.json.Decoder(typ)
        self._encoder = msgspec.json.Encoder()

    async def get(self, key: str) -> Versioned[T] | None:
        try:
            entry = await self._ride("read", lambda: self.kv.get(key))
        except KeyNotFoundError:
            # A direct get, which a replica behind the latest write may answer: missing is
            # asked of the leader (a user logging in right after signing up is found).
            read = await leader_or_replica(self._js, self.kv, self.name, key, self._ride)
            if read.value is None:
                return None
            return Versioned(self._decoder.decode(read.value), read.revision)
        if entry.value is None or entry.revision is None:
            return None
        return Versioned(self._decoder.decode(entry.value), entry.revision)

    async def values(self, keys: Sequence[str]) -> list[tuple[str, Versioned[T]]]:
        """The current values of `keys`, read concurrently, in the same order; a key deleted
        since it was listed, or holding an undecodable value, is left out."""

        async def one(key: str) -> Versioned[T] | None:
            try:
                return await self.get(key)
            except msgspec.DecodeError:
                log.warning(
                    "undecodable value skipped",
                    extra={"event": "kv_bad_value", "bucket": self.name, "key": key},
                )
                return None

        found = await asyncio.gather(*(one(key) for key in keys))
        return [(key, v) for key, v in zip(keys, found, strict=True) if v is not None]

    async def keys(self) -> list[str]:
        """Every live key, sorted. Headers only: NATS sends no values, so this costs the key
        strings (one message each), whatever the values weigh."""
        return sorted(e.key for e in await live_entries(self._js, self.name, values=False))

    async def list(self) -> list[tuple[str, Versioned[T]]]:
        """Every live key with its latest value, in key order."""
        out: list[tuple[str, Versioned[T]]] = []
        for entry in await live_entries(self._js, self.name, values=True):
            try:
                value = self._decoder.decode(entry.value)
            except msgspec.DecodeError:
                log.warning(
                    "undecodable value skipped",
                    extra={"event": "kv_bad_value", "bucket": self.name, "key": entry.key},
                )
                continue
            out.append((entry.key, Versioned(value, entry.revision)))
        out.sort(key=lambda kv: kv[0])
        return out

    async def publish(self, key: str, payload: bytes, headers: dict[str, str]) -> int:
        """One write, retried through a failover under one Nats-Msg-Id: however many tries
        reach the server, it is stored once (a repeat is answered with the first's ack)."""
        headers["Nats-Msg-Id"] = secrets.token_urlsafe(16)
        subject = kvwire.subject_of(self.name, key)
        try:
            ack = await self._ride(
                "write", lambda: self._js.publish(subject, payload, headers=headers)
            )
        except APIError as e:
            if e.err_code in _WRONG_LAST_SEQUENCE:
                raise Conflict(key) from None
            raise
        return ack.seq

    async def create(self, key: str, value: T) -> int:
        payload = self._encoder.encode(value)
        try:
            return await self.publish(key, payload, {_EXPECT_LAST: "0"})
        except Conflict:
            # A deleted key may be created again (as nats-py's kv.create allows).
            read = await leader_or_replica(self._js, self.kv, self.name, key, self._ride)
            if read.value is not None or not read.revision:
                raise Exists(key) from None
        try:
            return await self.publish(key, payload, {_EXPECT_LAST: str(read.revision)})
        except Conflict:
            raise Exists(key) from None

    async def put(self, key: str, value: T) -> int:
        return await self.publish(key, self._encoder.encode(value), {})

    async def update(self, key: str, value: T, last: int) -> int:
        return await self.publish(key, self._encoder.encode(value), {_EXPECT_LAST: str(last)})

    async def delete(self, key: str, last: int | None = None) -> int:
        """Place a delete marker; its revision (nats-py's kv.delete does not return one)."""
        headers = {kvwire.OPERATION_HEADER: "DEL"}
        if last is not None:
            headers[_EXPECT_LAST] = str(last)
        return await self.publish(key, b"", headers)


class Store:
    """Typed access to our KV buckets; `open()` binds them (they must be provisioned)."""

    def __init__(self, js: JetStreamContext, ride: Retrier | None = None) -> None:
        self._js = js
        self.ride = ride or Retrier()

    async def open(self) -> None:
        js, ride = self._js, self.ride

        async def bucket(name: str, typ: type[U]) -> _Bucket[U]:
            return _Bucket(js, await js.key_value(name), name, typ, ride)

        self.users = await bucket(USERS_BUCKET, UserRecord)
        self.credentials = await bucket(CREDENTIALS_BUCKET, Credential)
        self._revoked = await bucket(REVOKED_BUCKET, str)  # raw text values: publish only
        self._revoked_kv = await js.key_value(REVOKED_BUCKET)
        self.articles = await bucket(ARTICLES_BUCKET, Article)
        self.todos = await bucket(TODOS_BUCKET, Todo)
        self.roles = await bucket(ROLES_BUCKET, Capabilities)

    # ------------------------------------------------------------ users and credentials

    async def create_user(self, user: UserRecord, password_hash: str) -> int:
        """Credentials first (KV create: usernames are unique), then the record."""
        if not USER_ID_RE.fullmatch(user.id):  # every path that creates users comes here
            raise ValueError(f"invalid user id {user.id!r}")
        await self.credentials.create(user.username, Credential(user.id, password_hash))
        try:
            return await self.users.create(user.id, user)
        except Exception as e:
            await self.credentials.delete(user.username)
            if isinstance(e, Exists):
                raise IdTaken(user.id) from None
            raise

    async def set_password(self, user: UserRecord, password_hash: str) -> int:
        return await self.credentials.put(user.username, Credential(user.id, password_hash))

    async def delete_user(self, user: UserRecord) -> int:
        """Credentials first (no new logins), then the record (gateways close its sockets)."""
        cred = await self.credentials.get(user.username)
        if cred is not None and cred.value.user_id == user.id:
            await self.credentials.delete(user.username, last=cred.revision)
        return await self.users.delete(user.id)

    async def find_user_by_name(self, username: str) -> Versioned[UserRecord] | None:
        cred = await self.credentials.get(username)
        return None if cred is None else await self.users.get(cred.value.user_id)

    # ------------------------------------------------------------ revoked tokens

    async def revoke(self, jti: str, exp: int) -> int:
        """Key = jti, value = expiry (Unix seconds, as text); the bucket's TTL forgets it."""
        return await self._revoked.publish(jti, str(exp).encode(), {})

    async def rotate(self, jti: str, exp: int, grace_until: int) -> int:
        """A refreshed token: revoked for new uses now; sockets using it may go on until
        `grace_until` (Unix seconds) to send their own refresh (value `<exp> <grace>`)."""
        return await self._revoked.publish(jti, f"{exp} {grace_until}".encode(), {})

    # Revocations are read from the stream's leader, not by direct get: a replica behind
    # the latest write would let a token revoked a moment ago in (a logout, then a request).
    # Only while the leader is being elected does a replica answer (leader_or_replica):
    # no revocation can be written then either.

    async def _read_revoked(self, key: str) -> bytes | None:
        read = await leader_or_replica(self._js, self._revoked_kv, REVOKED_BUCKET, key, self.ride)
        return read.value

    async def is_revoked(self, jti: str) -> bool:
        return await self._read_revoked(jti) is not None

    async def revoked_before(self, uid: str) -> int:
        """T of the user's mark (every token with iat < T is revoked); 0 when none."""
        value = await self._read_revoked(USER_MARK + uid)
        if value is None:
            return 0
        try:
            return int(value or b"0")
        except ValueError:
            log.warning("malformed revocation mark", extra={"event": "revocation_mark_bad"})
            return 0

    async def revoke_all(self, uid: str) -> int:
        """Revoke every token of `uid` issued so far, in the API and in every gateway (their
        sockets are closed 4401). T is the next whole second, so that a token issued in
        this second is covered; returns T."""
        mark = max(int(time.time()) + 1, await self.revoked_before(uid))
        await self._revoked.publish(USER_MARK + uid, str(mark).encode(), {})
        log.info("tokens revoked", extra={"event": "tokens_revoked", "user": uid})
        return mark

    async def token_revoked(self, jti: str, uid: str, iat: int) -> bool:
        """The token id is revoked, or the user's mark postdates the token."""
        if await self.is_revoked(jti):
            return True
        return iat < await self.revoked_before(uid)

    # ------------------------------------------------------------ health

    async def auth_readable(self) -> bool:
        """This process can read its auth data now: a direct get of a probe key on the
        users and revoked-token buckets is answered (found or not) within TRY_TIMEOUT."""
        try:
            async with asyncio.timeout(TRY_TIMEOUT):
                for kv in (self.users.kv, self._revoked_kv):
                    try:
                        await kv.get(READY_PROBE_KEY)
                    except KeyNotFoundError:
                        pass
        except Exception as e:
            log.info("auth data not readable", extra={"event": "not_ready", "error": repr(e)})
            return False
        return True
