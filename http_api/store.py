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
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import msgspec
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.client import JetStreamContext
from nats.js.errors import APIError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from http_api.schemas import Article, Todo
from shared import kvwire
from shared.kvlist import leader_get, live_entries
from shared.users import (
    CREDENTIALS_BUCKET,
    REVOKED_BUCKET,
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

T = TypeVar("T")


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

    def __init__(self, js: JetStreamContext, kv: KeyValue, name: str, typ: type[T]) -> None:
        self._js, self._kv, self.name = js, kv, name
        self._decoder = msgspec.json.Decoder(typ)
        self._encoder = msgspec.json.Encoder()

    async def get(self, key: str) -> Versioned[T] | None:
        try:
            entry = await self._kv.get(key)
        except KeyNotFoundError:
            # A direct get, which a replica behind the latest write may answer: missing is
            # asked of the leader (a user logging in right after signing up is found).
            read = await leader_get(self._js, self.name, key)
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

    async def create(self, key: str, value: T) -> int:
        try:
            return await self._kv.create(key, self._encoder.encode(value))
        except KeyWrongLastSequenceError:
            raise Exists(key) from None

    async def put(self, key: str, value: T) -> int:
        return await self._kv.put(key, self._encoder.encode(value))

    async def update(self, key: str, value: T, last: int) -> int:
        try:
            return await self._kv.update(key, self._encoder.encode(value), last=last)
        except KeyWrongLastSequenceError:
            raise Conflict(key) from None

    async def delete(self, key: str, last: int | None = None) -> int:
        """Place a delete marker; its revision (nats-py's kv.delete does not return one)."""
        headers = {kvwire.OPERATION_HEADER: "DEL"}
        if last is not None:
            headers["Nats-Expected-Last-Subject-Sequence"] = str(last)
        try:
            ack = await self._js.publish(kvwire.subject_of(self.name, key), b"", headers=headers)
        except APIError as e:
            if e.err_code in _WRONG_LAST_SEQUENCE:
                raise Conflict(key) from None
            raise
        return ack.seq


class Store:
    """Typed access to our KV buckets; `open()` binds them (they must be provisioned)."""

    def __init__(self, js: JetStreamContext) -> None:
        self._js = js

    async def open(self) -> None:
        js = self._js
        self.users = _Bucket(js, await js.key_value(USERS_BUCKET), USERS_BUCKET, UserRecord)
        self.credentials = _Bucket(
            js, await js.key_value(CREDENTIALS_BUCKET), CREDENTIALS_BUCKET, Credential
        )
        self._revoked = await js.key_value(REVOKED_BUCKET)
        self.articles = _Bucket(js, await js.key_value(ARTICLES_BUCKET), ARTICLES_BUCKET, Article)
        self.todos = _Bucket(js, await js.key_value(TODOS_BUCKET), TODOS_BUCKET, Todo)

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
        return await self._revoked.put(jti, str(exp).encode())

    async def rotate(self, jti: str, exp: int, grace_until: int) -> int:
        """A refreshed token: revoked for new uses now; sockets using it may go on until
        `grace_until` (Unix seconds) to send their own refresh (value `<exp> <grace>`)."""
        return await self._revoked.put(jti, f"{exp} {grace_until}".encode())

    # Revocations are read from the stream's leader, not by direct get: a replica behind
    # the latest write would let a token revoked a moment ago in (a logout, then a request).

    async def is_revoked(self, jti: str) -> bool:
        return (await leader_get(self._js, REVOKED_BUCKET, jti)).value is not None

    async def revoked_before(self, uid: str) -> int:
        """T of the user's mark (every token with iat < T is revoked); 0 when none."""
        read = await leader_get(self._js, REVOKED_BUCKET, USER_MARK + uid)
        if read.value is None:
            return 0
        try:
            return int(read.value or b"0")
        except ValueError:
            log.warning("malformed revocation mark", extra={"event": "revocation_mark_bad"})
            return 0

    async def revoke_all(self, uid: str) -> int:
        """Revoke every token of `uid` issued so far, in the API and in every gateway (their
        sockets are closed 4401). T is the next whole second, so that a token issued in
        this second is covered; returns T."""
        mark = max(int(time.time()) + 1, await self.revoked_before(uid))
        await self._revoked.put(USER_MARK + uid, str(mark).encode())
        log.info("tokens revoked", extra={"event": "tokens_revoked", "user": uid})
        return mark

    async def token_revoked(self, jti: str, uid: str, iat: int) -> bool:
        """The token id is revoked, or the user's mark postdates the token."""
        if await self.is_revoked(jti):
            return True
        return iat < await self.revoked_before(uid)

    # ------------------------------------------------------------ health

    async def ping(self) -> bool:
        try:
            await self._js.account_info()
        except (NatsTimeoutError, APIError):
            return False
        return True
