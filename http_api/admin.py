"""Admin operations behind the CLI: provision NATS, create a user, seed the demo users.

They use the same Store and the same validation as the HTTP API.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import msgspec
from argon2 import PasswordHasher

from http_api.passwords import Passwords
from http_api.routes.users import new_user_id
from http_api.store import Exists, Store
from shared import natsio
from shared.capabilities import Capabilities, validate
from shared.settings import Settings
from shared.users import USERNAME_RE, UserRecord

log = logging.getLogger("http_api.admin")

# docs/protocol.md's example ("Capabilities"), with per-user todos.
DEMO_USER_CAPABILITIES = Capabilities(
    subjects=["chat.room.*", "articles.>"],
    buckets={"todos": ["user.{uid}.>"], "articles": [">"]},
    streams={"chat": [">"]},
    commands=[
        "articles.create",
        "articles.update",
        "articles.delete",
        "chat.send",
        "todos.put",
        "todos.delete",
    ],
)
# Everything, `users.manage` and `articles.moderate` (others' articles) included.
ADMIN_CAPABILITIES = Capabilities(
    subjects=[">"], buckets={"*": [">"]}, streams={"*": [">"]}, commands=[">"]
)
DEMO_USERS: tuple[tuple[str, str, Capabilities], ...] = (
    ("admin", "Admin", ADMIN_CAPABILITIES),
    ("alice", "Alice", DEMO_USER_CAPABILITIES),
    ("bob", "Bob", DEMO_USER_CAPABILITIES),
)


class AdminError(Exception):
    """A refused admin operation; the message is for the operator."""


@asynccontextmanager
async def connected_store(settings: Settings) -> AsyncIterator[Store]:
    nc = await natsio.connect(settings, "http_api-admin", connect_timeout=10.0)
    try:
        js = nc.jetstream()
        await natsio.provision(js, settings)
        store = Store(js)
        await store.open()
        yield store
    finally:
        await nc.drain()


async def provision(settings: Settings) -> None:
    async with connected_store(settings):
        pass


async def create_user(
    store: Store,
    passwords: Passwords,
    username: str,
    password: str,
    display_name: str = "",
    capabilities: Capabilities | None = None,
) -> UserRecord:
    if not USERNAME_RE.fullmatch(username):
        raise AdminError(f"invalid username {username!r}: {USERNAME_RE.pattern}")
    if not password:
        raise AdminError("the password is empty")
    caps = capabilities or Capabilities()
    validate(caps)
    user = UserRecord(new_user_id(), username, display_name or username, False, caps)
    try:
        await store.create_user(user, await passwords.hash(password))
    except Exists:
        raise AdminError(f"username {username!r} is taken") from None
    return user


async def ensure_user(
    store: Store,
    passwords: Passwords,
    username: str,
    password: str,
    display_name: str,
    capabilities: Capabilities,
) -> tuple[UserRecord, bool]:
    """Create the user, or bring an existing one to this state (same id). (user, created)"""
    existing = await store.find_user_by_name(username)
    if existing is None:
        return await create_user(
            store, passwords, username, password, display_name, capabilities
        ), True
    user = msgspec.structs.replace(
        existing.value, display_name=display_name, disabled=False, capabilities=capabilities
    )
    if user != existing.value:
        await store.users.update(user.id, user, last=existing.revision)
    cred = await store.credentials.get(username)
    if cred is None or not await passwords.verify(cred.value.hash, password):
        await store.set_password(user, await passwords.hash(password))
    return user, False


async def seed_demo(
    settings: Settings, store: Store, hasher: PasswordHasher | None = None
) -> list[tuple[UserRecord, bool]]:
    """admin, alice and bob with settings.demo_password; idempotent; never in production."""
    if settings.production:
        raise AdminError("refusing to seed demo users in production")
    passwords = Passwords(hasher or PasswordHasher(), settings.hash_concurrency)
    out = []
    for username, display_name, caps in DEMO_USERS:
        out.append(
            await ensure_user(
                store, passwords, username, settings.demo_password, display_name, caps
            )
        )
    return out
