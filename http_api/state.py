"""Typed application and request state, and the route table entry type.

Kept apart from `app.py` so that routes and middlewares can import the keys without
importing the factory.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from nats.aio.client import Client as NATS
from nats.js.client import JetStreamContext

from http_api.events import Events
from http_api.metrics import Metrics
from http_api.passwords import Passwords
from http_api.ratelimit import RateLimiter
from http_api.schemas import Actor
from http_api.store import Store
from shared.auth import Claims, TokenIssuer
from shared.capabilities import CompiledCapabilities
from shared.issuers import Verifiers
from shared.settings import Settings
from shared.users import UserRecord

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# Methods that change nothing: no CSRF check, no write budget.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass(frozen=True, slots=True)
class QueryParam:
    name: str
    description: str
    required: bool = False
    enum: tuple[str, ...] | None = None
    schema: dict[str, Any] | None = None  # the OpenAPI schema; default a string (or enum)


@dataclass(frozen=True, slots=True)
class Route:
    """One operation: registered with aiohttp and described in the OpenAPI document."""

    method: str
    path: str  # full path, `/api/...`, aiohttp/OpenAPI `{param}` syntax
    handler: Handler
    summary: str
    tag: str
    auth: bool = True  # False: no token needed (login, health, docs)
    body: Any = None  # request body type (a Struct, or Any for free JSON)
    response: Any = None  # response body type; None = no body
    status: int = 200
    errors: tuple[int, ...] = ()
    query: tuple[QueryParam, ...] = ()
    headers: tuple[QueryParam, ...] = ()
    response_content_type: str = "application/json"
    in_openapi: bool = True  # False: a file, not an operation (the docs page's assets)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def counts_as_write(self) -> bool:
        """Charged to the caller's write budget (`api_writes_per_minute`): may answer 429."""
        return self.auth and self.method not in SAFE_METHODS


@dataclass(frozen=True, slots=True)
class Principal:
    """The authenticated caller of one request."""

    user: UserRecord
    caps: CompiledCapabilities
    claims: Claims
    via_cookie: bool

    @property
    def actor(self) -> Actor:
        return Actor(self.user.id, self.user.username)

    @property
    def name(self) -> str:
        """What other users see as the author of what the caller writes."""
        return self.user.display_name or self.user.username


SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
PASSWORDS = web.AppKey("passwords", Passwords)
ISSUER = web.AppKey("issuer", TokenIssuer)
VERIFIER = web.AppKey("verifier", Verifiers)
LOGIN_BY_USER = web.AppKey("login_by_user", RateLimiter)
LOGIN_BY_ADDRESS = web.AppKey("login_by_address", RateLimiter)
WRITES_BY_USER = web.AppKey("writes_by_user", RateLimiter)
ROUTES = web.AppKey("routes", dict[Handler, Route])
# Set up by the NATS cleanup context:
NC = web.AppKey("nc", NATS)
JS = web.AppKey("js", JetStreamContext)
STORE = web.AppKey("store", Store)
EVENTS = web.AppKey("events", Events)

PRINCIPAL = web.RequestKey("principal", Principal)


def principal(request: web.Request) -> Principal:
    return request[PRINCIPAL]


OPENAPI = web.AppKey("openapi", bytes)  # the encoded document, built once per app
ASYNCAPI = web.AppKey("asyncapi", bytes)  # the WebSocket protocol's, likewise
