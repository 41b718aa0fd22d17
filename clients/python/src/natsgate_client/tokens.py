"""Tokens: reading a JWT's times (unverified: the gateway verifies), and the HTTP login
helper of the API (docs/protocol.md, "HTTP API": `/api/auth/login`, `/api/auth/refresh`).

A token provider is any `async () -> str` that returns a token good for a while. `Client`
calls it before each connection and again before the token expires; `PasswordLogin` is
one: it logs in once, then refreshes.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import msgspec

from natsgate_client.errors import LoginError

TokenProvider = Callable[[], Awaitable[str]]


class _Times(msgspec.Struct):
    exp: float | None = None
    iat: float | None = None


def token_times(token: str) -> tuple[float | None, float | None]:
    """(exp, iat) of a JWT, None where absent or unreadable. Not verified: for scheduling
    the refresh only."""
    try:
        body = token.split(".")[1]
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        t = msgspec.json.decode(raw, type=_Times)
    except (IndexError, ValueError, msgspec.DecodeError):
        return None, None
    return t.exp, t.iat


def refresh_at(token: str, now: float | None = None) -> float | None:
    """When (Unix s) to replace `token`: a third of its lifetime before `exp`, at least 2 s
    and at most 60 s before it. None: it does not expire (or cannot be read)."""
    exp, iat = token_times(token)
    if exp is None:
        return None
    now = time.time() if now is None else now
    lifetime = exp - (iat if iat is not None else now)
    return exp - min(60.0, max(2.0, lifetime / 3))


class Login(msgspec.Struct, frozen=True):
    token: str
    expires_at: int  # Unix s (the JWT `exp`)
    user: dict[str, Any]


async def _problem(r: aiohttp.ClientResponse) -> LoginError:
    try:
        title = str((await r.json(content_type=None)).get("title", r.reason))
    except (ValueError, aiohttp.ContentTypeError):
        title = r.reason or ""
    return LoginError(r.status, title)


async def _post(url: str, http: aiohttp.ClientSession | None, **kwargs: Any) -> Login:
    own = http is None
    session = http or aiohttp.ClientSession()
    try:
        async with session.post(url, **kwargs) as r:
            if r.status != 200:
                raise await _problem(r)
            return msgspec.convert(await r.json(), Login)
    finally:
        if own:
            await session.close()


async def login(
    base_url: str, username: str, password: str, *, http: aiohttp.ClientSession | None = None
) -> Login:
    """`POST /api/auth/login`: the token, its expiry and the user (LoginError if refused)."""
    body = {"username": username, "password": password}
    return await _post(f"{base_url.rstrip('/')}/api/auth/login", http, json=body)


async def refresh(base_url: str, token: str, *, http: aiohttp.ClientSession | None = None) -> Login:
    """`POST /api/auth/refresh`: a new token of the same user (the old one is revoked after
    the server's grace, 30 s by default)."""
    headers = {"Authorization": f"Bearer {token}"}
    return await _post(f"{base_url.rstrip('/')}/api/auth/refresh", http, headers=headers)


class PasswordLogin:
    """A token provider: logs in with a password the first time, refreshes the token after
    that, and logs in again when a refresh is refused (the token was revoked or expired).

        tokens = PasswordLogin("https://app.example", "alice", password)
        client = Client("https://app.example", tokens)
    """

    def __init__(self, base_url: str, username: str, password: str) -> None:
        self.base_url, self.username, self._password = base_url, username, password
        self.current: Login | None = None

    async def __call__(self) -> str:
        if self.current is not None:
            try:
                self.current = await refresh(self.base_url, self.current.token)
                return self.current.token
            except LoginError as e:
                if e.status != 401:
                    raise
        self.current = await login(self.base_url, self.username, self._password)
        return self.current.token

    @property
    def token(self) -> str:
        """The token of the last login or refresh (for the app's own HTTP calls)."""
        if self.current is None:
            raise LookupError("not logged in yet: await the provider (or connect) first")
        return self.current.token

    def __repr__(self) -> str:  # never the password or a token
        return f"PasswordLogin({self.base_url!r}, {self.username!r})"
