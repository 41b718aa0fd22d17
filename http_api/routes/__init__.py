"""The route table: every operation of the API, in one list (registered and documented)."""

from __future__ import annotations

from http_api.routes import articles, auth, commands, docs, ops, users
from http_api.state import Route

ROUTES: list[Route] = [
    *auth.ROUTES,
    *users.ROUTES,
    *articles.ROUTES,
    *commands.ROUTES,
    *ops.ROUTES,
    *docs.ROUTES,
]
