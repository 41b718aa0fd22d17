"""The only code that touches NATS KV: users, credentials, revocations, articles, todos.

Every write returns the KV revision it produced. Optimistic concurrency is KV's own:
`update(..., last=rev)` and deletes with `Nats-Expected-Last-Subject-Sequence`, so two
writers holding the same revision can never both succeed.

    Exception
     └── StoreError
          ├── Conflict    the key's revision is not the expected one
          └── Exists      create of a key that already exists
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Generic, TypeVar

import msgspec
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.client import JetStreamContext
from nats.js.errors import APIError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from http_api.schemas import Article, Todo
from shared import kvwire
from shared.users import (
    CREDENTIALS_BUCKET,
    REVOKED_BUCKET,
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
            return None
        if entry.value is None or entry.revision is None:
            return None
        return Versioned(self._decoder.decode(entry.value), entry.revision)

    async def list(self) -> list[tuple[str, Versioned[T]]]:
        """Every live key with its latest value, in key order."""
        watcher = await self._kv.watchall(ignore_deletes=True)
        out: list[tuple[str, Versioned[T]]] = []
        try:
            while True:
                entry = await watcher.updates(timeout=10.0)  # type: ignore[no-untyped-call]
                if entry is None:  # the initial values are all delivered
                    break
                if entry.value is None or entry.revision is None:
                    continue
                try:
                    value = self._decoder.decode(entry.value)
                except msgspec.DecodeError:
                    log.warning(
                        "undecodable value skipped",
                        extra={"event": "kv_bad_value", "bucket": self.name, "key": entry.key},
                    )
                    continue
                out.append((entry.key, Versioned(value, entry.revision)))
        finally:
            await watcher.stop()  # type: ignore[no-untyped-call]
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
        await self.credentials.create(user.username, Credential(user.id, password_hash))
        try:
            return await self.users.create(user.id, user)
        except Exception:
            await self.credentials.delete(user.username)
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

    async def is_revoked(self, jti: str) -> bool:
        try:
            await self._revoked.get(jti)
        except KeyNotFoundError:
            return False
        return True

    # ------------------------------------------------------------ health

    async def ping(self) -> bool:
        try:
            await self._js.account_info()
        except (NatsTimeoutError, APIError):
            return False
        return True
