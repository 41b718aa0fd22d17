"""Articles in KV `articles` (key = id).

Read: the caller's KV capability on bucket `articles` for that key (the list is filtered
key by key, and paged: `limit`, `cursor`, `next_cursor`). Create: command `articles.create`.
Update and delete: command `articles.update` / `articles.delete`, the read capability on
that key, and being its author, unless the caller also holds `articles.moderate`. Only a
caller who may change the article learns its revision: every 403 and 404 comes before a 412.
`ETag` is the KV revision; `If-Match` on PUT/DELETE is enforced by KV's own revision check,
so of two writers holding the same ETag exactly one wins and the other gets 412.
"""

from __future__ import annotations

import logging
import re
import secrets

from aiohttp import hdrs, web

from http_api.authz import ARTICLES_MODERATE, require_command, require_kv
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
from http_api.state import EVENTS, STORE, Principal, QueryParam, Route, principal
from http_api.store import ARTICLES_BUCKET, Conflict, Exists, Versioned

log = logging.getLogger("http_api.articles")
_ID_ATTEMPTS = 3
DEFAULT_PAGE = 50  # articles per page of GET /api/articles
MAX_PAGE = 200
_ID_RE = re.compile(TOKEN_PATTERN)
_ETAG_RE = re.compile(r'"[0-9]{1,19}"')


def new_article_id() -> str:
    # URL-safe base64: a valid KV key and one NATS token (no dots, no wildcards).
    return secrets.token_urlsafe(12)


def etag(revision: int) -> str:
    return f'"{revision}"'


def if_match(request: web.Request) -> int | None:
    """The revision named by If-Match; None when absent or `*` (any current version).
    Anything but `*` or a strong ETag this API gave is a precondition that cannot hold:
    412, like a stale revision (RFC 9110 13.1.1: weak tags never match)."""
    raw = request.headers.get(hdrs.IF_MATCH)
    if raw is None or raw.strip() == "*":
        return None
    tag = raw.strip()
    if tag.startswith("W/"):
        raise Problem(412, "If-Match needs a strong ETag")
    if not _ETAG_RE.fullmatch(tag):
        raise Problem(412, "If-Match is not an ETag of this resource")
    return int(tag[1:-1])


def _out(a: Article, revision: int) -> ArticleOut:
    return ArticleOut(
        a.id,
        a.title,
        a.body,
        a.author,
        a.created_at,
        a.updated_at,
        a.author_name,
        revision=revision,
    )


def _check_body(body: ArticleIn) -> None:
    if len(body.body.encode()) > MAX_ARTICLE_BODY_BYTES:
        raise Problem(422, "Expected `str` of at most 100 KiB of UTF-8 - at `$.body`")


def _article_id(request: web.Request) -> str:
    aid = request.match_info["id"]
    if not _ID_RE.fullmatch(aid):  # not a key we could have made
        raise Problem(404, "no such article")
    return aid


async def _get(request: web.Request, aid: str) -> Versioned[Article]:
    """The article; 404 if there is none."""
    found = await request.app[STORE].articles.get(aid)
    if found is None:
        raise Problem(404, "no such article")
    return found


async def _changeable(
    request: web.Request, p: Principal, command: str
) -> tuple[str, Versioned[Article]]:
    """(id, article) that `p` may change with `command`, else 403 or 404 (never 412: the
    caller learns the revision only through `_check_revision`, after this)."""
    require_command(p, command)
    aid = _article_id(request)
    require_kv(p, ARTICLES_BUCKET, aid)  # decided by the key alone: no existence oracle
    found = await _get(request, aid)
    if found.value.author != p.user.id and not p.caps.allows_command(ARTICLES_MODERATE):
        raise Problem(403, f"only its author, or a holder of {ARTICLES_MODERATE}, may change it")
    return aid, found


def _check_revision(found: Versioned[Article], expected: int | None) -> None:
    if expected is not None and expected != found.revision:
        raise Problem(412, f"the article is at revision {found.revision}, not {expected}")


def _query_one(request: web.Request, name: str) -> str | None:
    values = request.query.getall(name, [])
    if len(values) > 1:
        raise Problem(400, f"{name} is given more than once")
    return values[0] if values else None


def page_limit(request: web.Request) -> int:
    raw = _query_one(request, "limit")
    if raw is None:
        return DEFAULT_PAGE
    if not (raw.isascii() and raw.isdigit() and 1 <= int(raw) <= MAX_PAGE):
        raise Problem(400, f"limit must be an integer from 1 to {MAX_PAGE}")
    return int(raw)


def decode_cursor(request: web.Request) -> str | None:
    """The key the page starts after: `next_cursor` is the last id of the previous page, and
    any id is a valid place to start after (ids need not exist), so every cursor the document
    allows is one the API takes."""
    raw = _query_one(request, "cursor")
    if raw is None:
        return None
    if not _ID_RE.fullmatch(raw):
        raise Problem(400, "cursor must be an article id (next_cursor of a page)")
    return raw


async def list_articles(request: web.Request) -> web.StreamResponse:
    """One page, in key order. Cost per request: one headers-only pass over the bucket's keys
    (the key strings in memory, no values), then one KV get per article on the page (at most
    MAX_PAGE). A page can hold fewer than `limit` items when articles are deleted meanwhile;
    `next_cursor` is null on the last page."""
    p = principal(request)
    limit = page_limit(request)
    after = decode_cursor(request)
    articles = request.app[STORE].articles
    page: list[str] = []
    more = False
    for key in await articles.keys():
        if (after is not None and key <= after) or not p.caps.allows_kv(ARTICLES_BUCKET, key):
            continue
        if len(page) == limit:
            more = True
            break
        page.append(key)
    items = [_out(v.value, v.revision) for _, v in await articles.values(page)]
    next_cursor = page[-1] if more else None
    return json_response(ArticleList(items, next_cursor))


async def create_article(request: web.Request) -> web.StreamResponse:
    p = principal(request)
    require_command(p, "articles.create")
    body = await read_json(request, ArticleIn)
    _check_body(body)
    t = now()
    for _ in range(_ID_ATTEMPTS):
        article = Article(new_article_id(), body.title, body.body, p.user.id, t, t, p.name)
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
    aid, found = await _changeable(request, p, "articles.update")
    body = await read_json(request, ArticleIn)  # a bad body is 400/422 whatever If-Match says
    _check_body(body)
    expected = if_match(request)
    _check_revision(found, expected)
    old = found.value
    # A moderator's edit keeps the author; an article from before author_name gets its
    # author's name when the author edits it.
    name = p.name if old.author == p.user.id else old.author_name
    article = Article(aid, body.title, body.body, old.author, old.created_at, now(), name)
    try:
        revision = await request.app[STORE].articles.update(aid, article, last=found.revision)
    except Conflict:
        raise Problem(412, "the article changed concurrently") from None
    out = _out(article, revision)
    await request.app[EVENTS].write(p.actor, "articles", aid, "updated", out, revision=revision)
    return json_response(out, headers={"ETag": etag(revision)})


async def delete_article(request: web.Request) -> web.StreamResponse:
    p = principal(request)
    aid, found = await _changeable(request, p, "articles.delete")
    _check_revision(found, if_match(request))
    try:
        revision = await request.app[STORE].articles.delete(aid, last=found.revision)
    except Conflict:
        raise Problem(412, "the article changed concurrently") from None
    out = Deleted(aid, revision)
    await request.app[EVENTS].write(p.actor, "articles", aid, "deleted", out, revision=revision)
    return json_response(out)


_IF_MATCH = (
    QueryParam(
        "If-Match",
        'the ETag the change is based on (`"<revision>"`), or `*`; any other value: 412',
    ),
)

_ID_PATH = {"id": {"pattern": TOKEN_PATTERN}}

ROUTES = [
    Route(
        "GET",
        "/api/articles",
        list_articles,
        "Articles the caller may read (KV capability on bucket articles), one page in id "
        "order; the next page: the same request with cursor = next_cursor",
        "articles",
        response=ArticleList,
        errors=(400, 401, 403),
        query=(
            QueryParam(
                "limit",
                f"articles per page (default {DEFAULT_PAGE})",
                schema={"type": "integer", "minimum": 1, "maximum": MAX_PAGE},
            ),
            QueryParam(
                "cursor",
                "next_cursor of the previous page: the page starts after this id",
                schema={"type": "string", "pattern": TOKEN_PATTERN},
            ),
        ),
    ),
    Route(
        "POST",
        "/api/articles",
        create_article,
        "Create an article (articles.create)",
        "articles",
        body=ArticleIn,
        response=ArticleOut,
        extra={"etag": True},
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
        extra={"etag": True, "path": _ID_PATH},
        errors=(401, 403, 404),
    ),
    Route(
        "PUT",
        "/api/articles/{id}",
        update_article,
        "Replace title and body (articles.update; its author or articles.moderate); "
        "If-Match → 412 on mismatch",
        "articles",
        body=ArticleIn,
        response=ArticleOut,
        extra={"etag": True, "path": _ID_PATH},
        headers=_IF_MATCH,
        errors=(400, 401, 403, 404, 412, 413, 422),
    ),
    Route(
        "DELETE",
        "/api/articles/{id}",
        delete_article,
        "Delete an article (articles.delete; its author or articles.moderate); "
        "If-Match → 412 on mismatch",
        "articles",
        response=Deleted,
        headers=_IF_MATCH,
        extra={"path": _ID_PATH},
        errors=(401, 403, 404, 412),
    ),
]
