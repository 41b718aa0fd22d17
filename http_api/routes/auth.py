"""Login, logout, refresh and `me`.

Login answers the same 401 after the same argon2 work for an unknown user and a wrong
password; it is rate limited per username and per client address (429 + Retry-After).
Refresh rotates: the old token id is revoked as the new token is issued, with a grace
(`token_rotation_grace`) for the gateways only, so that a socket still using it can send
its `refresh` op first; the API and new handshakes refuse the old token at once.

`auth_revoked` keys: a token id (revokes that token; value `<exp>` or, rotated,
`<exp> <grace_until>`), and `user.<uid>` = T (Unix seconds, whole): every token of the
user with `iat < T` is revoked (`revoke_all`: `POST /logout?all=1`, a password change, a
disable, a capability reset). A token id (`secrets.token_urlsafe`) has no dot, so the two
never collide. Tokens issued after a mark carry `iat >= T` (see `_issue`).
"""

from __future__ import annotations

import logging
import math
import time

from aiohttp import hdrs, web

from http_api.bodies import json_response, read_json
from http_api.middlewares import check_origin, client_address
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
    QueryParam,
    Route,
    principal,
)
from shared.auth import session_cookie_name
from shared.users import USERNAME_RE, UserRecord, compile_or_nothing

log = logging.getLogger("http_api.auth")


def me_of(user: UserRecord) -> Me:
    """The caller's view: its effective capabilities (its own and its roles'), `{uid}`
    substituted (as in `cap_update`)."""
    return Me(user.id, user.username, user.display_name, compile_or_nothing(user).document)


async def _issue(request: web.Request, user: UserRecord) -> web.Response:
    settings = request.app[SETTINGS]
    # Never before the user's mark, or a login right after a password change (in the same
    # second) would be revoked already. At most a second ahead: within the JWT leeway.
    mark = await request.app[STORE].revoked_before(user.id)
    token, claims = request.app[ISSUER].issue(user.id, now=max(time.time(), float(mark)))
    response = json_response(LoginOut(token=token, expires_at=claims.exp, user=me_of(user)))
    # With COOKIE_SECURE the name is `__Host-session`, which browsers keep only as set here:
    # Secure, Path=/ and no Domain.
    response.set_cookie(
        session_cookie_name(settings),
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
    return await _issue(request, user)


async def logout(request: web.Request) -> web.StreamResponse:
    p = principal(request)
    everywhere = request.query.getall("all", [])
    if everywhere not in ([], ["0"], ["1"]):
        raise Problem(400, "all must be 0 or 1, given at most once")
    store = request.app[STORE]
    await store.revoke(p.claims.jti, p.claims.exp)
    if everywhere == ["1"]:
        await store.revoke_all(p.user.id)
    log.info("logout", extra={"event": "logout", "user": p.user.id, "all": everywhere == ["1"]})
    action = "logout_all" if everywhere == ["1"] else "logout"
    await request.app[EVENTS].audit(p.actor, "auth", action, p.user.id)
    response = web.Response(status=204)
    settings = request.app[SETTINGS]
    # The expiring cookie must meet the same `__Host-` rules, or the browser ignores it.
    response.del_cookie(
        session_cookie_name(settings),
        path="/",
        secure=settings.cookie_secure,
        httponly=True,
        samesite="Strict",
    )
    return response


async def refresh(request: web.Request) -> web.StreamResponse:
    """A new token; the presented one is revoked (rotation), its sockets after the grace."""
    p = principal(request)
    if p.claims.source:
        # Made here from an IdP's token, ours would outlive what the IdP decides (a
        # disabled account, a shorter lifetime): its tokens come from the IdP again.
        raise Problem(403, "refresh this token at its issuer", slug="refresh_at_issuer")
    response = await _issue(request, p.user)
    grace_until = int(time.time() + request.app[SETTINGS].token_rotation_grace)
    await request.app[STORE].rotate(p.claims.jti, p.claims.exp, grace_until)
    log.info("token refreshed", extra={"event": "token_refreshed", "user": p.user.id})
    return response


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
        "Revoke the token (with all=1: every token of the user) and clear the cookie",
        "auth",
        status=204,
        errors=(400, 401, 403),
        query=(
            QueryParam(
                "all",
                "1: log out everywhere (every token of this user issued so far is revoked)",
                enum=("0", "1"),
            ),
        ),
    ),
    Route(
        "POST",
        "/api/auth/refresh",
        refresh,
        "A new token for the same user; the presented one is revoked",
        "auth",
        response=LoginOut,
        errors=(401, 403),
    ),
    Route(
        "GET", "/api/auth/me", me, "The authenticated user", "auth", response=Me, errors=(401, 403)
    ),
]
