"""The route table: every operation of the API, in one list (registered and documented)."""

from __future__ import annotations

from http_api.routes import articles, auth, commands, docs, ops, roles, tokens, users
from http_api.state import Route

ROUTES: list[Route] = [
    *auth.ROUTES,
    *tokens.ROUTES,
    *users.ROUTES,
    *roles.ROUTES,
    *articles.ROUTES,
    *commands.ROUTES,
    *ops.ROUTES,
    *docs.ROUTES,
]
