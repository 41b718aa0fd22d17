"""Admin operations behind the CLI: provision NATS, create a user, seed the demo users.

They use the same Store and the same validation as the HTTP API.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import msgspec
from argon2 import PasswordHasher

from http_api import roles
from http_api.passwords import Passwords
from http_api.routes.users import new_user_id
from http_api.store import Exists, Store
from shared import natsio, resources
from shared.auth import TokenIssuer
from shared.capabilities import Capabilities, validate
from shared.settings import Settings
from shared.users import USER_ID_RE, USERNAME_RE, UserRecord

log = logging.getLogger("http_api.admin")

# docs/protocol.md's example ("Capabilities"), with per-user todos.
DEMO_USER_CAPABILITIES = Capabilities(
    subjects=["chat.room.*", "articles.>"],
    buckets={"todos": ["user.{uid}.>"], "articles": [">"], "presence": ["chat.room.*.>"]},
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


async def provision(settings: Settings) -> list[str]:
    """Buckets and streams (system and the resources file's), then the file's roles; what
    was created, updated, and what differs and was left as it is (drift)."""
    try:
        res = resources.load(settings)
    except (OSError, resources.ResourcesError) as e:
        raise AdminError(f"invalid resources file: {e}") from None
    nc = await natsio.connect(settings, "http_api-admin", connect_timeout=10.0)
    try:
        js = nc.jetstream()
        report = await natsio.provision(js, settings, res)
        store = Store(js)
        await store.open()
        written = await roles.sync(store, res.roles)
    finally:
        await nc.drain()
    return report.lines() + [f"updated role {name}" for name in written]


async def mint_token(settings: Settings, user_id: str, ttl: int) -> tuple[str, int]:
    """A token for an existing, enabled user (the CLI's `token`): (token, exp)."""
    if not 1 <= ttl <= settings.token_ttl:
        raise AdminError(f"ttl must be 1 to TOKEN_TTL ({settings.token_ttl}) seconds")
    async with connected_store(settings) as store:
        found = await store.users.get(user_id) if USER_ID_RE.fullmatch(user_id) else None
        if found is None:
            raise AdminError(f"no user with id {user_id!r}")
        if found.value.disabled:
            raise AdminError(f"user {user_id!r} is disabled")
        mark = await store.revoked_before(user_id)
    token, claims = TokenIssuer.from_settings(settings).issue(
        user_id, now=max(time.time(), float(mark)), ttl=ttl
    )
    return token, claims.exp


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
