"""Articles in KV `articles` (key = id).

Read: the caller's KV capability on bucket `articles` for that key (the list is filtered
key by key). Write: commands `articles.create` / `articles.update` / `articles.delete`.
`ETag` is the KV revision; `If-Match` on PUT/DELETE is enforced by KV's own revision check,
so of two writers holding the same ETag exactly one wins and the other gets 412.
"""

from __future__ import annotations

import logging
import re
import secrets

from aiohttp import hdrs, web

from http_api.authz import require_command, require_kv
from http_api.bodies import json_response, read_json
from http_api.events import now
from http_api.problems import Problem
from http_api.schemas import (
    MAX_ARTICLE_BODY_BYTES,
    TOKEN_PATTERN,
    Article,
    ArticleIn,
    ArticleList,
    ArticleOut,
    Deleted,
)
from http_api.state import EVENTS, STORE, QueryParam, Route, principal
from http_api.store import ARTICLES_BUCKET, Conflict, Exists, Versioned

log = logging.getLogger("http_api.articles")
_ID_ATTEMPTS = 3
_ID_RE = re.compile(TOKEN_PATTERN)


def new_article_id() -> str:
    # URL-safe base64: a valid KV key and one NATS token (no dots, no wildcards).
    return secrets.token_urlsafe(12)


def etag(revision: int) -> str:
    return f'"{revision}"'


def if_match(request: web.Request) -> int | None:
    """The revision named by If-Match; None when absent or `*` (any current version)."""
    raw = request.headers.get(hdrs.IF_MATCH)
    if raw is None or raw.strip() == "*":
        return None
    tag = raw.strip()
    if tag.startswith("W/"):
        raise Problem(412, "If-Match needs a strong ETag")
    tag = tag.strip('"')
    if not tag.isdigit():
        raise Problem(412, f"If-Match {raw!r} is not an ETag of this resource")
    return int(tag)


def _out(a: Article, revision: int) -> ArticleOut:
    return ArticleOut(a.id, a.title, a.body, a.author, a.created_at, a.updated_at, revision)


def _check_body(body: ArticleIn) -> None:
    if len(body.body.encode()) > MAX_ARTICLE_BODY_BYTES:
        raise Problem(422, "Expected `str` of at most 100 KiB of UTF-8 - at `$.body`")


def _article_id(request: web.Request) -> str:
    aid = request.match_info["id"]
    if not _ID_RE.fullmatch(aid):  # not a key we could have made
        raise Problem(404, "no such article")
    return aid


async def _get(request: web.Request, aid: str, expected: int | None = None) -> Versioned[Article]:
    """The article; 404 if there is none, 412 if it is not at the `expected` revision."""
    found = await request.app[STORE].articles.get(aid)
    if found is None:
        raise Problem(404, "no such article")
    if expected is not None and expected != found.revision:
        raise Problem(412, f"the article is at revision {found.revision}, not {expected}")
    return found


async def list_articles(request: web.Request) -> web.StreamResponse:
    p = principal(request)
    rows = await request.app[STORE].articles.list()
    items = [_out(v.value, v.revision) for key, v in rows if p.caps.allows_kv(ARTICLES_BUCKET, key)]
    return json_response(ArticleList(items))


async def create_article(request: web.Request) -> web.StreamResponse:
    p = principal(request)
    require_command(p, "articles.create")
    body = await read_json(request, ArticleIn)
    _check_body(body)
    t = now()
    for _ in range(_ID_ATTEMPTS):
        article = Article(new_article_id(), body.title, body.body, p.user.id, t, t)
        try:
            revision = await request.app[STORE].articles.create(article.id, article)
            break
        except Exists:
            continue
    else:
        raise Problem(500, "could not allocate an article id")
    out = _out(article, revision)
    await request.app[EVENTS].write(
        p.actor, "articles", article.id, "created", out, revision=revision
    )
    log.info("article created", extra={"event": "article_created", "id": article.id})
    return json_response(
        out,
        status=201,
        headers={"Location": f"/api/articles/{article.id}", "ETag": etag(revision)},
    )


async def get_article(request: web.Request) -> web.StreamResponse:
    p = principal(request)
    aid = _article_id(request)
    require_kv(p, ARTICLES_BUCKET, aid)
    found = await _get(request, aid)
    return json_response(_out(found.value, found.revision), headers={"ETag": etag(found.revision)})


async def update_article(request: web.Request) -> web.StreamResponse:
    p = principal(request)
    require_command(p, "articles.update")
    aid = _article_id(request)
    expected = if_match(request)
    body = await read_json(request, ArticleIn)
    _check_body(body)
    found = await _get(request, aid, expected)
    old = found.value
    article = Article(aid, body.title, body.body, old.author, old.created_at, now())
    try:
        revision = await request.app[STORE].articles.update(aid, article, last=found.revision)
    except Conflict:
        raise Problem(412, "the article changed concurrently") from None
    out = _out(article, revision)
    await request.app[EVENTS].write(p.actor, "articles", aid, "updated", out, revision=revision)
    return json_response(out, headers={"ETag": etag(revision)})


async def delete_article(request: web.Request) -> web.StreamResponse:
    p = principal(request)
    require_command(p, "articles.delete")
    aid = _article_id(request)
    found = await _get(request, aid, if_match(request))
    try:
        revision = await request.app[STORE].articles.delete(aid, last=found.revision)
    except Conflict:
        raise Problem(412, "the article changed concurrently") from None
    out = Deleted(aid, revision)
    await request.app[EVENTS].write(p.actor, "articles", aid, "deleted", out, revision=revision)
    return json_response(out)


_IF_MATCH = (QueryParam("If-Match", "the ETag (KV revision) the change is based on"),)

ROUTES = [
    Route(
        "GET",
        "/api/articles",
        list_articles,
        "Articles the caller may read (KV capability on bucket articles)",
        "articles",
        response=ArticleList,
        errors=(401, 403),
    ),
    Route(
        "POST",
        "/api/articles",
        create_article,
        "Create an article (articles.create)",
        "articles",
        body=ArticleIn,
        response=ArticleOut,
        status=201,
        errors=(400, 401, 403, 413, 422),
    ),
    Route(
        "GET",
        "/api/articles/{id}",
        get_article,
        "Read an article; ETag = KV revision",
        "articles",
        response=ArticleOut,
        errors=(401, 403, 404),
    ),
    Route(
        "PUT",
        "/api/articles/{id}",
        update_article,
        "Replace title and body (articles.update); If-Match → 412 on mismatch",
        "articles",
        body=ArticleIn,
        response=ArticleOut,
        headers=_IF_MATCH,
        errors=(400, 401, 403, 404, 412, 413, 422),
    ),
    Route(
        "DELETE",
        "/api/articles/{id}",
        delete_article,
        "Delete an article (articles.delete); If-Match → 412 on mismatch",
        "articles",
        response=Deleted,
        headers=_IF_MATCH,
        errors=(401, 403, 404, 412),
    ),
]
