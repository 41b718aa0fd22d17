"""The application factory: `create_app(settings)`.

Everything an app needs is typed state on the app (`state.py` keys), set up here or, for
the NATS connection and what depends on it, in a cleanup context that also tears it down
(after aiohttp has let in-flight requests finish).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from aiohttp import web
from argon2 import PasswordHasher

from http_api import asyncapi, openapi
from http_api.events import Events
from http_api.metrics import Metrics
from http_api.middlewares import auth_middleware, problem_middleware, return_request_id
from http_api.passwords import Passwords
from http_api.ratelimit import RateLimiter
from http_api.routes import ROUTES as ROUTE_TABLE
from http_api.state import (
    ASYNCAPI,
    EVENTS,
    ISSUER,
    JS,
    LOGIN_BY_ADDRESS,
    LOGIN_BY_USER,
    METRICS,
    NC,
    OPENAPI,
    PASSWORDS,
    ROUTES,
    SETTINGS,
    STORE,
    VERIFIER,
    WRITES_BY_USER,
    Handler,
    Route,
)
from http_api.store import Retrier, Store
from shared import natsio, resources
from shared.auth import TokenIssuer, session_cookie_name
from shared.issuers import Verifiers
from shared.settings import Settings

log = logging.getLogger("http_api.app")
# Many users can share one address (NAT, offices): its budget is larger than a username's.
ADDRESS_LIMIT_FACTOR = 5


async def nats_context(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    m = app[METRICS]

    async def reconnected() -> None:
        m.nats_reconnects.inc()

    nc = await natsio.connect(settings, "http_api", on_reconnect=reconnected)
    try:
        js = nc.jetstream(timeout=settings.command_timeout)
        await natsio.provision(js, settings)  # idempotent: any worker may start first
        ride = Retrier(
            settings.nats_failover_wait,
            on_retry=lambda kind: m.nats_retries.labels(kind).inc(),
            on_failure=lambda kind: m.nats_failures.labels(kind).inc(),
        )
        store = Store(js, ride)
        await store.open()
        app[NC], app[JS], app[STORE] = nc, js, store
        app[EVENTS] = events = Events(nc, js, m)
        log.info("nats ready", extra={"event": "nats_ready", "servers": len(settings.nats_url)})
        yield
        await events.close()
    finally:
        # Requests have finished by now; drain flushes what they published, then closes.
        if not nc.is_closed:
            await nc.drain()


async def _draining(app: web.Application) -> None:
    # Runs after the listener closed and before aiohttp waits for in-flight requests.
    log.info("draining", extra={"event": "draining"})


async def _close_verifiers(app: web.Application) -> None:
    await app[VERIFIER].close()


def create_app(
    settings: Settings, *, password_hasher: PasswordHasher | None = None
) -> web.Application:
    """The API as an aiohttp app. `password_hasher`: argon2id parameters (tests make it cheap)."""
    app = web.Application(
        middlewares=[problem_middleware, auth_middleware],
        client_max_size=settings.max_body_bytes,
    )
    app[SETTINGS] = settings
    app[METRICS] = Metrics()
    app[PASSWORDS] = Passwords(password_hasher or PasswordHasher(), settings.hash_concurrency)
    app[ISSUER] = TokenIssuer.from_settings(settings)
    app[VERIFIER] = Verifiers.from_settings(settings, resources.load_or_exit(settings))
    app[LOGIN_BY_USER] = RateLimiter(settings.login_attempts_per_minute)
    app[LOGIN_BY_ADDRESS] = RateLimiter(settings.login_attempts_per_minute * ADDRESS_LIMIT_FACTOR)
    app[WRITES_BY_USER] = RateLimiter(
        settings.api_writes_per_minute, burst=settings.api_writes_burst
    )
    table: dict[Handler, Route] = {}
    for route in ROUTE_TABLE:
        app.router.add_route(route.method, route.path, route.handler)
        table[route.handler] = route
    app[ROUTES] = table
    app[OPENAPI] = openapi.encoded(ROUTE_TABLE, session_cookie_name(settings))
    app[ASYNCAPI] = asyncapi.encoded(session_cookie_name(settings))
    app.cleanup_ctx.append(nats_context)
    app.on_cleanup.append(_close_verifiers)
    app.on_shutdown.append(_draining)
    app.on_response_prepare.append(return_request_id)
    return app
