"""The opening handshake: health routes, origin and token checks, before any WebSocket.

A refused upgrade is a plain HTTP response (401/403/429/503); nothing is upgraded. A
gateway at its share of MAX_CONNECTIONS answers 503 problem JSON with Retry-After.
"""

from __future__ import annotations

import http
import json
import logging
from dataclasses import dataclass
from http.cookies import CookieError, SimpleCookie
from typing import cast

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from shared import logs
from shared.auth import Claims, bearer_token, session_cookie_name
from shared.errors import InvalidToken
from ws_gateway import metrics
from ws_gateway.hub import Hub, UserRead

log = logging.getLogger("ws_gateway.handshake")

WS_PATHS = frozenset({"/ws", "/"})
# Seconds a client refused for capacity is told to wait: long enough for sessions to end,
# short enough that a freed slot is not left idle; clients add their own jitter.
FULL_RETRY_AFTER = 5


@dataclass(frozen=True, slots=True)
class Admitted:
    claims: Claims
    user: UserRead


class GatewayConnection(ServerConnection):
    """A connection carrying what its handshake admitted (as websockets' own basic_auth
    puts `username` on the connection): nothing outlives an upgrade refused after
    process_request (a 400 or 426 from websockets, a client gone during the checks)."""

    admitted: Admitted | None = None


class Refused(Exception):
    def __init__(
        self, status: http.HTTPStatus, reason: str, retry_after: int | None = None
    ) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.retry_after = retry_after

    def problem(self) -> dict[str, object]:
        """RFC 9457 body; `code` as the protocol's error codes (docs/protocol.md)."""
        code = {429: "limit", 503: "unavailable"}.get(self.status.value, "unauthorized")
        return {
            "type": "about:blank",
            "title": self.status.phrase,
            "status": self.status.value,
            "code": code,
            "detail": self.reason,
        }


def token_from(
    headers: Headers, allowed_origins: tuple[str, ...], cookie_name: str = "session"
) -> str:
    """The bearer token, or the session cookie (`shared.auth.session_cookie_name`) when the
    Origin is allowed."""
    auth = headers.get("Authorization")
    if auth:
        token = bearer_token(auth)
        if token is None:
            raise Refused(http.HTTPStatus.UNAUTHORIZED, "malformed Authorization header")
        return token
    cookie_header = headers.get("Cookie")
    if cookie_header:
        try:
            jar = SimpleCookie(cookie_header)
        except CookieError:
            jar = SimpleCookie()
        morsel = jar.get(cookie_name)
        if morsel is not None and morsel.value:
            # A browser sends cookies on cross-site WebSocket upgrades too; only the
            # Origin tells a page of ours from someone else's (CSWSH).
            origins = headers.get_all("Origin")
            if len(origins) != 1 or origins[0] not in allowed_origins:
                raise Refused(http.HTTPStatus.FORBIDDEN, "origin not allowed")
            return morsel.value
    raise Refused(http.HTTPStatus.UNAUTHORIZED, "no token")


async def admit(hub: Hub, headers: Headers) -> Admitted:
    settings = hub.settings
    # First, before any work: a full gateway refuses cleanly instead of running out of fds
    # (or nginx out of worker connections) and cutting sockets. Handshakes in flight may
    # pass together; the fd limits keep headroom for them (deploy/limits.py).
    if hub.full():
        raise Refused(
            http.HTTPStatus.SERVICE_UNAVAILABLE, "connection limit reached", FULL_RETRY_AFTER
        )
    token = token_from(headers, settings.allowed_origins, session_cookie_name(settings))
    try:
        claims = await hub.verifier.check(token)
    except InvalidToken as e:
        raise Refused(http.HTTPStatus.UNAUTHORIZED, str(e)) from None
    if not hub.nats_ready:
        raise Refused(http.HTTPStatus.SERVICE_UNAVAILABLE, "NATS unreachable")
    if not hub.watching:  # fail closed: no session without the revocation watches
        raise Refused(http.HTTPStatus.SERVICE_UNAVAILABLE, "revocation watch lost")
    if await hub.revoked(claims):
        raise Refused(http.HTTPStatus.UNAUTHORIZED, "token revoked")
    user = await hub.load_user(claims.sub)
    if user.record is None and claims.source:
        user = await hub.role_user(claims)
        if user.record is None:
            raise Refused(http.HTTPStatus.UNAUTHORIZED, "no user record for this issuer's user")
    if user.record is None or user.record.disabled:
        raise Refused(http.HTTPStatus.FORBIDDEN, "user disabled or deleted")
    if hub.user_sessions(claims.sub) >= hub.settings.max_connections_per_user:
        raise Refused(http.HTTPStatus.TOO_MANY_REQUESTS, "too many connections for this user")
    return Admitted(claims, user)


def _text(status: http.HTTPStatus, body: str, content_type: str = "text/plain") -> Response:
    headers = Headers([("Content-Type", content_type), ("Cache-Control", "no-store")])
    return Response(status.value, status.phrase, headers, body.encode())


def _checks(hub: Hub) -> dict[str, bool]:
    """Ready = NATS connected, every auth watch running (revocations and capability
    changes reach sessions) and the capabilities re-read since the last reconnect: new
    sessions may be admitted and deliveries flow."""
    return {
        "nats": hub.nats_ready,
        "auth_watch": hub.watching,
        "capabilities_current": hub.delivering(),
    }


def _readiness(hub: Hub) -> Response:
    """/readyz: 200 or 503, JSON with each check."""
    checks = _checks(hub)
    ready = all(checks.values())
    body = json.dumps({"status": "ready" if ready else "unavailable", "checks": checks})
    status = http.HTTPStatus.OK if ready else http.HTTPStatus.SERVICE_UNAVAILABLE
    return _text(status, body + "\n", "application/json")


async def process_request(hub: Hub, ws: ServerConnection, request: Request) -> Response | None:
    path = request.path.partition("?")[0]
    if path == "/healthz":
        return _text(http.HTTPStatus.OK, "ok\n")
    if path == "/readyz":
        return _readiness(hub)
    if path == "/metrics":
        metrics.READY.set(all(_checks(hub).values()))
        return _text(http.HTTPStatus.OK, generate_latest().decode(), CONTENT_TYPE_LATEST)
    if path not in WS_PATHS:
        return _text(http.HTTPStatus.NOT_FOUND, "not found\n")
    # The connection's id on every line logged for it from here on: this task runs the
    # handshake and then the connection (server.py `_handler`), and its session's tasks
    # start from it. nginx's request id of the upgrade, so its access line matches.
    logs.bind(conn=logs.correlation_id(request.headers.get("X-Request-Id")))
    if request.headers.get("Upgrade", "").lower() != "websocket":
        return _text(http.HTTPStatus.UPGRADE_REQUIRED, "WebSocket upgrade required\n")
    try:
        cast(GatewayConnection, ws).admitted = await admit(hub, request.headers)
    except Refused as e:
        log.info("upgrade refused", extra={"status": e.status.value, "reason": e.reason})
        if e.retry_after is None:
            return _text(e.status, e.reason + "\n")
        response = _text(e.status, json.dumps(e.problem()), "application/problem+json")
        response.headers["Retry-After"] = str(e.retry_after)
        return response
    except Exception as e:
        log.warning("upgrade failed", extra={"error": type(e).__name__})
        return _text(http.HTTPStatus.SERVICE_UNAVAILABLE, "temporarily unavailable\n")
    return None
