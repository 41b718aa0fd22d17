"""`POST /api/auth/tokens`: a short-lived token for a user, minted for an app's backend.

An app that has its own login hands its browser a natsgate token without any password
here: its backend, holding a credential with the command `tokens.issue` (a service user)
or `users.manage` (an admin), asks for one. `tokens.issue` alone mints only for users who
can neither manage users nor mint tokens themselves: a leaked service credential reaches
ordinary users, never the administrators. Minted tokens are ordinary tokens: revocation,
expiry and refresh apply as to any other (docs/auth.md).
"""

from __future__ import annotations

import logging
import time
from typing import Annotated

from aiohttp import web
from msgspec import Meta, Struct

from http_api.authz import USERS_MANAGE, require_command
from http_api.bodies import json_response, read_json
from http_api.problems import Problem
from http_api.state import ISSUER, SETTINGS, STORE, Route, principal
from shared.capabilities import CompiledCapabilities
from shared.users import USER_ID_RE, compile_or_nothing

log = logging.getLogger("http_api.tokens")

TOKENS_ISSUE = "tokens.issue"
MAX_MINTED_TTL = 86400  # seconds; and never beyond TOKEN_TTL
USER_ID_PATTERN = USER_ID_RE.pattern.removesuffix("\\Z") + r"(?!\n)$"


class TokenRequest(Struct, forbid_unknown_fields=True):
    user_id: Annotated[str, Meta(pattern=USER_ID_PATTERN, description="the user's id")]
    ttl: Annotated[
        int,
        Meta(
            ge=1,
            le=MAX_MINTED_TTL,
            description="seconds the token is valid; TOKEN_TTL at most (longer is cut to it)",
        ),
    ] = 300


class TokenOut(Struct):
    token: str
    expires_at: Annotated[int, Meta(description="token expiry, Unix seconds (the JWT `exp`)")]
    user_id: str


def _privileged(caps: CompiledCapabilities) -> bool:
    return any(caps.allows_command(c).allowed for c in (USERS_MANAGE, TOKENS_ISSUE))


async def mint(request: web.Request) -> web.StreamResponse:
    p = principal(request)
    manager = p.caps.allows_command(USERS_MANAGE).allowed
    if not manager:
        require_command(p, TOKENS_ISSUE)
    body = await read_json(request, TokenRequest)
    ttl = min(body.ttl, request.app[SETTINGS].token_ttl)  # never longer than a login's
    store = request.app[STORE]
    found = await store.users.get(body.user_id)
    if found is None:
        raise Problem(404, "no such user")
    user = found.value
    if user.disabled:
        raise Problem(409, "user is disabled")
    if not manager and _privileged(compile_or_nothing(user)):
        raise Problem(403, "tokens.issue mints only for users without users.manage or tokens.issue")
    # Never before the user's mark (as a login): a logout-everywhere a moment ago must not
    # revoke the token minted after it.
    mark = await store.revoked_before(user.id)
    token, claims = request.app[ISSUER].issue(user.id, now=max(time.time(), float(mark)), ttl=ttl)
    log.info(
        "token minted",
        extra={"event": "token_minted", "user": user.id, "by": p.user.id, "ttl": ttl},
    )
    return json_response(TokenOut(token=token, expires_at=claims.exp, user_id=user.id))


ROUTES = [
    Route(
        "POST",
        "/api/auth/tokens",
        mint,
        "Mint a short-lived token for a user (users.manage, or tokens.issue for ordinary users)",
        "auth",
        body=TokenRequest,
        response=TokenOut,
        errors=(400, 401, 403, 404, 409, 413, 422, 429),
    ),
]
