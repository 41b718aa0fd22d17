"""Request pipeline: problem JSON + metrics + one log line (outermost), then auth.

Auth accepts `Authorization: Bearer <jwt>` or the `session` cookie (the bearer header wins
when both are present). A token must verify, must not be revoked (`auth_revoked` has its
jti) and must name an existing user (else 401); a disabled user gets 403. A
cookie-authenticated unsafe request must carry an `Origin` in `settings.allowed_origins`
(CSRF); bearer requests need none, since a cross-site page cannot set that header.
"""

from __future__ import annotations

import ipaddress
import logging
import time

from aiohttp import hdrs, web

from http_api import problems
from http_api.problems import Problem
from http_api.state import (
    METRICS,
    PRINCIPAL,
    ROUTES,
    SETTINGS,
    STORE,
    VERIFIER,
    Handler,
    Principal,
)
from shared.auth import bearer_token
from shared.errors import InvalidToken
from shared.users import compile_or_nothing

log = logging.getLogger("http_api.access")
SESSION_COOKIE = "session"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def route_label(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def problem_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error becomes problem JSON; every request is counted, timed and logged once."""
    start = time.perf_counter()
    try:
        try:
            response = await handler(request)
        except web.HTTPException as e:
            if e.status < 400:
                raise  # redirects and the like pass through
            raise problems.from_http_exception(e) from None
    except Problem as p:
        response = problems.response(p)
    except Exception:
        log.exception(
            "unhandled error",
            extra={"event": "http_error", "method": request.method, "route": route_label(request)},
        )
        response = problems.response(Problem(500, "internal error"))
    elapsed = time.perf_counter() - start
    route = route_label(request)
    metrics = request.app[METRICS]
    metrics.requests.labels(request.method, route, str(response.status)).inc()
    metrics.latency.labels(request.method, route).observe(elapsed)
    who = request.get(PRINCIPAL)
    log.info(
        "%s %s %d",
        request.method,
        route,
        response.status,
        extra={
            "event": "http_request",
            "method": request.method,
            "route": route,
            "status": response.status,
            "ms": round(elapsed * 1000, 1),
            "user": who.user.id if who else None,
        },
    )
    return response


def bearer_or_cookie(request: web.Request) -> tuple[str | None, bool]:
    """(token, came from the cookie)."""
    auth = request.headers.get(hdrs.AUTHORIZATION)
    if auth is not None:
        token = bearer_token(auth)
        if token is None:
            raise Problem(401, "Authorization must be 'Bearer <token>'")
        return token, False
    cookie = request.cookies.get(SESSION_COOKIE)
    return (cookie, True) if cookie else (None, False)


def check_origin(request: web.Request) -> None:
    """403 unless the request's Origin is in the allow-list."""
    origin = request.headers.get(hdrs.ORIGIN)
    if origin is None or origin not in request.app[SETTINGS].allowed_origins:
        raise Problem(
            403, "cross-site request refused: Origin is missing or not allowed", slug="bad_origin"
        )


def client_address(request: web.Request) -> str:
    """The client's address; forwarding headers are trusted from a loopback proxy only."""
    peer = request.remote or "unknown"
    try:
        trusted = ipaddress.ip_address(peer).is_loopback
    except ValueError:
        trusted = False
    if trusted:
        real = request.headers.get("X-Real-IP")
        if real:
            return real.strip()
        forwarded = request.headers.get(hdrs.X_FORWARDED_FOR)
        if forwarded:
            return forwarded.split(",")[-1].strip()  # the hop our proxy appended
    return peer


async def authenticate(request: web.Request) -> Principal:
    token, via_cookie = bearer_or_cookie(request)
    if token is None:
        raise Problem(401, "authentication required", headers={"WWW-Authenticate": "Bearer"})
    try:
        claims = request.app[VERIFIER].verify(token)
    except InvalidToken as e:
        raise Problem(401, str(e), headers={"WWW-Authenticate": "Bearer"}) from None
    store = request.app[STORE]
    if await store.is_revoked(claims.jti):
        raise Problem(401, "token revoked", headers={"WWW-Authenticate": "Bearer"})
    found = await store.users.get(claims.sub)
    if found is None:
        raise Problem(401, "user no longer exists", headers={"WWW-Authenticate": "Bearer"})
    user = found.value
    if user.disabled:
        raise Problem(403, "user is disabled", slug="user_disabled")
    if via_cookie and request.method not in SAFE_METHODS:
        check_origin(request)
    return Principal(user, compile_or_nothing(user), claims, via_cookie)


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    route = request.app[ROUTES].get(request.match_info.handler)
    if route is not None and route.auth:
        request[PRINCIPAL] = await authenticate(request)
    return await handler(request)
