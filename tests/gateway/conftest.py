"""Gateway fixtures: a real gateway in-process on port 0, real NATS, real sockets."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
import pytest
from nats.aio.client import Client as NATS

from shared.auth import TokenIssuer
from shared.capabilities import Capabilities
from shared.client import GatewayClient
from shared.settings import Settings
from shared.users import USERS_BUCKET, UserRecord, encode_user
from ws_gateway.server import Gateway

ALICE_CAPS = {
    "subjects": ["chat.room.*", "articles.>"],
    "buckets": {"todos": ["user.{uid}.>"], "articles": [">"]},
    "streams": {"chat": ["chat.room.123", "chat.room.456"], "audit": [">"]},
    "commands": ["chat.send"],
}


@pytest.fixture
async def gateway(settings: Settings, nc: NATS) -> AsyncIterator[Gateway]:
    async with Gateway(settings, host="127.0.0.1", port=0) as gw:
        yield gw


@pytest.fixture
def issuer(settings: Settings) -> TokenIssuer:
    return TokenIssuer.from_settings(settings)


UserFactory = Callable[..., Awaitable[str]]


@pytest.fixture
def make_user(nc: NATS, issuer: TokenIssuer) -> UserFactory:
    """Write a user record to auth_users and return a token for it."""

    async def make(
        uid: str = "alice",
        caps: dict[str, Any] | None = None,
        disabled: bool = False,
        ttl: int | None = None,
    ) -> str:
        kv = await nc.jetstream().key_value(USERS_BUCKET)
        record = UserRecord(
            id=uid,
            username=uid,
            display_name=uid.title(),
            disabled=disabled,
            capabilities=msgspec.convert(ALICE_CAPS if caps is None else caps, Capabilities),
        )
        await kv.put(uid, encode_user(record))
        token, _ = issuer.issue(uid, ttl=ttl)
        return token

    return make


ClientFactory = Callable[..., Awaitable[GatewayClient]]


async def _factory(url: str) -> AsyncIterator[ClientFactory]:
    clients: list[GatewayClient] = []

    async def factory(token: str, **kw: Any) -> GatewayClient:
        c = await GatewayClient.connect(url, token=token, **kw)
        clients.append(c)
        return c

    yield factory
    for c in clients:
        await c.close()


@pytest.fixture(params=["ws", "poll"])
async def connect(gateway: Gateway, request: pytest.FixtureRequest) -> AsyncIterator[ClientFactory]:
    """Clients over both transports: every protocol test runs over WebSocket and long polling."""
    url = gateway.url if request.param == "ws" else gateway.poll_url
    async for factory in _factory(url):
        yield factory


@pytest.fixture
async def connect_ws(gateway: Gateway) -> AsyncIterator[ClientFactory]:
    """WebSocket-only clients, for what only a WebSocket has (frame types, frame size)."""
    async for factory in _factory(gateway.url):
        yield factory
