"""The API in-process on a real port (aiohttp's TestServer) against a real nats-server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from argon2 import PasswordHasher
from nats.aio.client import Client as NATS

from http_api import admin
from http_api.app import create_app
from http_api.state import ISSUER, PASSWORDS, STORE
from shared.capabilities import Capabilities
from shared.settings import Settings
from shared.users import UserRecord

# Still argon2id, with the cheapest parameters: tests count hash work, they don't time it.
CHEAP_HASHER = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
ORIGIN = "http://127.0.0.1:8080"


@dataclass
class Api:
    client: TestClient[web.Request, web.Application]
    app: web.Application
    settings: Settings
    users: dict[str, UserRecord]

    def token(self, username: str) -> str:
        """A token issued directly (no login, no hashing)."""
        return self.app[ISSUER].issue(self.users[username].id)[0]

    def auth(self, username: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(username)}"}

    async def login(self, username: str, password: str | None = None) -> dict[str, Any]:
        resp = await self.client.post(
            "/api/auth/login",
            json={"username": username, "password": password or self.settings.demo_password},
        )
        assert resp.status == 200, await resp.text()
        body: dict[str, Any] = await resp.json()
        return body

    async def add_user(
        self, username: str, caps: Capabilities, password: str = "pw-123456"
    ) -> UserRecord:
        user = await admin.create_user(
            self.app[STORE], self.app[PASSWORDS], username, password, capabilities=caps
        )
        self.users[username] = user
        return user


@pytest.fixture
def api_settings(settings: Settings) -> Settings:
    return msgspec.structs.replace(settings, login_attempts_per_minute=5, command_timeout=1.0)


@pytest.fixture
async def api(nc: NATS, api_settings: Settings) -> AsyncIterator[Api]:
    app = create_app(api_settings, password_hasher=CHEAP_HASHER)
    async with TestClient(TestServer(app)) as client:
        seeded = await admin.seed_demo(api_settings, app[STORE], CHEAP_HASHER)
        yield Api(client, app, api_settings, {u.username: u for u, _ in seeded})
