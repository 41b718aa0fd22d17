"""Login, logout, refresh and `me`.

Login answers the same 401 after the same argon2 work for an unknown user and a wrong
password; it is rate limited per username and per client address (429 + Retry-After).
Refresh does not revoke the old token: a socket still using it must be able to send its
`refresh` op first.
"""

from __future__ import annotations

import logging
import math
import time

from aiohttp import hdrs, web

from http_api.bodies import json_response, read_json
from http_api.middlewares import SESSION_COOKIE, check_origin, client_address
from http_api.problems import Problem
from http_api.schemas import Actor, LoginIn, LoginOut, Me
from http_api.state import (
    EVENTS,
    ISSUER,
    LOGIN_BY_ADDRESS,
    LOGIN_BY_USER,
    METRICS,
    PASSWORDS,
    SETTINGS,
    STORE,
    Route,
    principal,
)
from shared.capabilities import render
from shared.users import USERNAME_RE, UserRecord

log = logging.getLogger("http_api.auth")


def me_of(user: UserRecord) -> Me:
    """The caller's view: capabilities with `{uid}` substituted (as in `cap_update`)."""
    return Me(user.id, user.username, user.display_name, render(user.capabilities, user.id))


def _issue(request: web.Request, user: UserRecord) -> web.Response:
    settings = request.app[SETTINGS]
    token, claims = request.app[ISSUER].issue(user.id)
    response = json_response(LoginOut(token=token, expires_at=claims.exp, user=me_of(user)))
    response.set_cookie(
        SESSION_COOKIE,
        token,
        max_age=claims.exp - claims.iat,
        path="/",
        secure=settings.cookie_secure,
        httponly=True,
        samesite="Strict",
    )
    return response


def _rate_limit(request: web.Request, username: str) -> None:
    now = time.monotonic()
    wait = max(
        request.app[LOGIN_BY_ADDRESS].hit(client_address(request), now),
        request.app[LOGIN_BY_USER].hit(username.lower(), now),
    )
    if wait > 0:
        request.app[METRICS].login_failures.labels("rate_limited").inc()
        log.warning("login rate limited", extra={"event": "login_rate_limited"})
        raise Problem(
            429,
            "too many login attempts; retry later",
            headers={hdrs.RETRY_AFTER: str(max(1, math.ceil(wait)))},
        )


async def login(request: web.Request) -> web.StreamResponse:
    if hdrs.ORIGIN in request.headers:  # a browser: refuse login CSRF from other sites
        check_origin(request)
    body = await read_json(request, LoginIn)
    _rate_limit(request, body.username)
    store, passwords = request.app[STORE], request.app[PASSWORDS]
    valid_name = USERNAME_RE.fullmatch(body.username) is not None
    cred = await store.credentials.get(body.username) if valid_name else None
    # Same work either way: an unknown user is verified against a dummy hash.
    hash = cred.value.hash if cred is not None else passwords.dummy_hash
    ok = await passwords.verify(hash, body.password)
    found = await store.users.get(cred.value.user_id) if cred is not None and ok else None
    if found is None:
        request.app[METRICS].login_failures.labels("credentials").inc()
        log.info("login failed", extra={"event": "login_failed"})
        raise Problem(401, "invalid username or password")
    user = found.value
    if user.disabled:
        request.app[METRICS].login_failures.labels("disabled").inc()
        raise Problem(403, "user is disabled", slug="user_disabled")
    assert cred is not None
    if passwords.needs_rehash(cred.value.hash):  # parameters were raised since
        await store.set_password(user, await passwords.hash(body.password))
    log.info("login", extra={"event": "login", "user": user.id})
    await request.app[EVENTS].audit(Actor(user.id, user.username), "auth", "login", user.id)
    return _issue(request, user)


async def logout(request: web.Request) -> web.StreamResponse:
    p = principal(request)
    await request.app[STORE].revoke(p.claims.jti, p.claims.exp)
    log.info("logout", extra={"event": "logout", "user": p.user.id})
    await request.app[EVENTS].audit(p.actor, "auth", "logout", p.user.id)
    response = web.Response(status=204)
    response.del_cookie(SESSION_COOKIE, path="/", samesite="Strict")
    return response


async def refresh(request: web.Request) -> web.StreamResponse:
    return _issue(request, principal(request).user)


async def me(request: web.Request) -> web.StreamResponse:
    return json_response(me_of(principal(request).user))


ROUTES = [
    Route(
        "POST",
        "/api/auth/login",
        login,
        "Log in: a token and the session cookie",
        "auth",
        auth=False,
        body=LoginIn,
        response=LoginOut,
        errors=(400, 401, 403, 413, 422, 429),
    ),
    Route(
        "POST",
        "/api/auth/logout",
        logout,
        "Revoke the token and clear the cookie",
        "auth",
        status=204,
        errors=(401, 403),
    ),
    Route(
        "POST",
        "/api/auth/refresh",
        refresh,
        "A new token for the same user",
        "auth",
        response=LoginOut,
        errors=(401, 403),
    ),
    Route(
        "GET", "/api/auth/me", me, "The authenticated user", "auth", response=Me, errors=(401, 403)
    ),
]
