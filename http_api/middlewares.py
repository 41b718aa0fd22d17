"""Request pipeline: problem JSON + metrics + one log line (outermost), then auth.

Auth accepts `Authorization: Bearer <jwt>` or the session cookie (`session`, or
`__Host-session` with COOKIE_SECURE; the bearer header wins when both are present). A token
must verify, must not be revoked (`auth_revoked` has its jti) and must name an existing user
(else 401); a disabled user gets 403. A cookie-authenticated unsafe request must carry an
`Origin` in `settings.allowed_origins` (CSRF); bearer requests need none, since a cross-site
page cannot set that header. Every authenticated unsafe request is then charged to the
user's write budget (`api_writes_per_minute`, `api_writes_burst`, per process): beyond it
429 + Retry-After, before the handler runs, so a refused write changes nothing.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import time

from aiohttp import hdrs, web
from nats.js.errors import APIError

from http_api import problems, roles
from http_api.problems import Problem
from http_api.state import (
    METRICS,
    PRINCIPAL,
    ROUTES,
    SAFE_METHODS,
    SETTINGS,
    STORE,
    VERIFIER,
    WRITES_BY_USER,
    Handler,
    Principal,
)
from http_api.store import Versioned
from shared import logs
from shared.auth import Claims, bearer_token, session_cookie_name
from shared.errors import InvalidToken
from shared.failover import Unavailable, transient
from shared.users import UserRecord, compile_or_nothing

log = logging.getLogger("http_api.access")
# The metrics' `method` label: the client chooses the method, and every distinct label value
# is a new series kept for the life of the process.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


REQUEST_ID_HEADER = "X-Request-Id"  # from nginx ($request_id), returned in the response
REQUEST_ID_KEY = web.RequestKey("request_id", str)


async def return_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: every response says which request id its log lines carry."""
    rid = request.get(REQUEST_ID_KEY)
    if rid is not None:
        response.headers[REQUEST_ID_HEADER] = rid


def method_label(method: str) -> str:
    return method if method in KNOWN_METHODS else "other"


def route_label(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def problem_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error becomes problem JSON; every request is counted, timed and logged once,
    and every line logged while it is handled carries its request id."""
    request[REQUEST_ID_KEY] = rid = logs.correlation_id(request.headers.get(REQUEST_ID_HEADER))
    with logs.bound(request_id=rid):
        return await _handle(request, handler)


async def _handle(request: web.Request, handler: Handler) -> web.StreamResponse:
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
    except APIError as e:
        # A server-side limit or outage, never the client's fault: 507 or 503, logged.
        log.warning(
            "jetstream refused",
            extra={"route": route_label(request), "err_code": e.err_code, "code": e.code},
        )
        response = problems.response(problems.from_jetstream(e))
    except Exception as e:
        if isinstance(e, Unavailable) or transient(e):
            # NATS failed over for longer than NATS_FAILOVER_WAIT: busy, not broken.
            log.warning(
                "nats unavailable",
                extra={"route": route_label(request), "error": type(e).__name__},
            )
            busy = Problem(503, "NATS is failing over: retry later", headers={"Retry-After": "2"})
            response = problems.response(busy)
        else:
            log.exception(
                "unhandled error",
                extra={
                    "event": "http_error",
                    "method": request.method,
                    "route": route_label(request),
                },
            )
            response = problems.response(Problem(500, "internal error"))
    elapsed = time.perf_counter() - start
    route = route_label(request)
    metrics = request.app[METRICS]
    method = method_label(request.method)
    metrics.requests.labels(method, route, str(response.status)).inc()
    metrics.latency.labels(method, route).observe(elapsed)
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
    cookie = request.cookies.get(session_cookie_name(request.app[SETTINGS]))
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


async def _external_user(request: web.Request, claims: Claims) -> Versioned[UserRecord] | None:
    """A trusted issuer's user without a record: created from the issuer's default role,
    or none (refused) when it names none."""
    role = request.app[VERIFIER].by_name[claims.source].config.default_role
    return await roles.user_from_role(request.app[STORE], claims.sub, role) if role else None


async def authenticate(request: web.Request) -> Principal:
    token, via_cookie = bearer_or_cookie(request)
    if token is None:
        raise Problem(401, "authentication required", headers={"WWW-Authenticate": "Bearer"})
    try:
        claims = await request.app[VERIFIER].check(token)
    except InvalidToken as e:
        raise Problem(401, str(e), headers={"WWW-Authenticate": "Bearer"}) from None
    store = request.app[STORE]
    if await store.is_revoked(claims.jti):
        raise Problem(401, "token revoked", headers={"WWW-Authenticate": "Bearer"})
    found = await store.users.get(claims.sub)
    if found is None and claims.source:
        found = await _external_user(request, claims)
        if found is None:
            raise Problem(
                401, "no user record for this issuer's user", headers={"WWW-Authenticate": "Bearer"}
            )
    if found is None:
        raise Problem(401, "user no longer exists", headers={"WWW-Authenticate": "Bearer"})
    user = found.value
    if user.disabled:  # said as such, before the logout-everywhere mark a disable also sets
        raise Problem(403, "user is disabled", slug="user_disabled")
    if claims.iat < await store.revoked_before(user.id):
        raise Problem(401, "token revoked", headers={"WWW-Authenticate": "Bearer"})
    if via_cookie and request.method not in SAFE_METHODS:
        check_origin(request)
    return Principal(user, compile_or_nothing(user), claims, via_cookie)


def charge_write(request: web.Request, p: Principal) -> None:
    """429 + Retry-After when the user's write budget in this process is spent."""
    wait = request.app[WRITES_BY_USER].hit(p.user.id, time.monotonic())
    if wait > 0:
        log.warning("write rate limited", extra={"event": "write_rate_limited", "user": p.user.id})
        raise Problem(
            429,
            "too many changes; retry later",
            headers={hdrs.RETRY_AFTER: str(max(1, math.ceil(wait)))},
        )


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    route = request.app[ROUTES].get(request.match_info.handler)
    if route is not None and route.auth:
        p = await authenticate(request)
        request[PRINCIPAL] = p
        if route.counts_as_write:
            charge_write(request, p)
    return await handler(request)
