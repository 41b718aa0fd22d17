"""Articles: KV capability reads, command-gated writes, ETag/If-Match on KV revisions."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
from nats.aio.client import Client as NATS
from nats.js.client import JetStreamContext

from shared.capabilities import Capabilities
from tests.api.conftest import Api


async def create(api: Api, title: str = "Hello", body: str = "World") -> dict[str, Any]:
    resp = await api.client.post(
        "/api/articles", json={"title": title, "body": body}, headers=api.auth("alice")
    )
    assert resp.status == 201, await resp.text()
    article: dict[str, Any] = await resp.json()
    assert resp.headers["Location"] == f"/api/articles/{article['id']}"
    assert resp.headers["ETag"] == f'"{article["revision"]}"'
    return article


async def test_create_stores_in_kv_publishes_event_and_audit(
    api: Api, nc: NATS, js: JetStreamContext
) -> None:
    events = await nc.subscribe("articles.*.created")
    article = await create(api)
    assert article["author"] == api.users["alice"].id
    assert article["author_name"] == "Alice"  # what readers show: not the user id
    kv = await js.key_value("articles")
    entry = await kv.get(article["id"])
    assert entry.revision == article["revision"]
    stored = msgspec.json.decode(entry.value or b"")
    assert stored["title"] == "Hello" and "revision" not in stored
    assert stored["author_name"] == "Alice"  # what the SPA reads from the KV watch
    event = await events.next_msg(timeout=5)
    assert event.subject == f"articles.{article['id']}.created"
    assert msgspec.json.decode(event.data)["revision"] == article["revision"]
    await events.unsubscribe()
    audit = await js.get_last_msg("audit", "audit.articles.created")
    record = msgspec.json.decode(audit.data or b"")
    assert record["who"]["id"] == api.users["alice"].id
    assert record["what"] == {
        "resource": "articles",
        "action": "created",
        "id": article["id"],
        "revision": article["revision"],
    }
    assert record["when"]


async def test_read_and_list(api: Api) -> None:
    resp = await api.client.get("/api/articles", headers=api.auth("bob"))
    assert resp.status == 200 and (await resp.json())["items"] == []  # empty bucket
    a = await create(api, "one")
    b = await create(api, "two")
    resp = await api.client.get(f"/api/articles/{a['id']}", headers=api.auth("bob"))
    assert resp.status == 200
    assert resp.headers["ETag"] == f'"{a["revision"]}"'
    assert (await resp.json())["title"] == "one"
    resp = await api.client.get("/api/articles", headers=api.auth("bob"))
    assert {x["id"] for x in (await resp.json())["items"]} == {a["id"], b["id"]}
    resp = await api.client.get("/api/articles/nope", headers=api.auth("bob"))
    assert resp.status == 404
    resp = await api.client.get("/api/articles/a.b", headers=api.auth("bob"))
    assert resp.status == 404


async def test_list_is_filtered_by_kv_capability(api: Api) -> None:
    a = await create(api, "visible")
    await create(api, "hidden")
    await api.add_user("dave", Capabilities(buckets={"articles": [a["id"]]}))
    resp = await api.client.get("/api/articles", headers=api.auth("dave"))
    assert [x["id"] for x in (await resp.json())["items"]] == [a["id"]]
    await api.add_user("erin", Capabilities())
    resp = await api.client.get("/api/articles", headers=api.auth("erin"))
    assert resp.status == 200 and (await resp.json())["items"] == []
    resp = await api.client.get(f"/api/articles/{a['id']}", headers=api.auth("erin"))
    assert resp.status == 403
    resp = await api.client.post("/api/articles", json={"title": "x"}, headers=api.auth("erin"))
    assert resp.status == 403
    resp = await api.client.get("/api/articles")
    assert resp.status == 401


async def test_bad_input(api: Api) -> None:
    auth = api.auth("alice")
    cases = [
        ({"title": "t" * 201, "body": ""}, 422),
        ({"title": "", "body": ""}, 422),
        ({"title": "ok", "body": "é" * (60 * 1024)}, 422),  # 120 KiB of UTF-8 in 60 Ki chars
        ({"title": "ok", "body": "x" * (100 * 1024 + 1)}, 422),
        ({"title": "ok", "extra": 1}, 422),
        ({"body": "no title"}, 422),
    ]
    for body, status in cases:
        # msgspec writes UTF-8 as is (aiohttp's json= would escape é into 6 bytes).
        data = msgspec.json.encode(body)
        resp = await api.client.post("/api/articles", data=data, headers=auth)
        assert resp.status == status, str(body)[:50]
    resp = await api.client.post(
        "/api/articles", json={"title": "ok", "body": "x" * 100 * 1024}, headers=auth
    )
    assert resp.status == 201
    resp = await api.client.post("/api/articles", data=b'{"title": ', headers=auth)
    assert resp.status == 400
    big = b'{"title": "x", "body": "' + b"x" * api.settings.max_body_bytes + b'"}'
    resp = await api.client.post("/api/articles", data=big, headers=auth)
    assert resp.status == 413
    assert resp.content_type == "application/problem+json"


async def test_update_with_if_match(api: Api, nc: NATS) -> None:
    a = await create(api)
    url = f"/api/articles/{a['id']}"
    auth = api.auth("alice")
    events = await nc.subscribe(f"articles.{a['id']}.updated")
    resp = await api.client.put(
        url, json={"title": "v2", "body": "b"}, headers={**auth, "If-Match": f'"{a["revision"]}"'}
    )
    assert resp.status == 200
    v2 = await resp.json()
    assert v2["revision"] > a["revision"] and resp.headers["ETag"] == f'"{v2["revision"]}"'
    assert v2["created_at"] == a["created_at"] and v2["author"] == a["author"]
    assert msgspec.json.decode((await events.next_msg(timeout=5)).data)["title"] == "v2"
    await events.unsubscribe()
    resp = await api.client.put(
        url, json={"title": "v3", "body": "b"}, headers={**auth, "If-Match": f'"{a["revision"]}"'}
    )
    assert resp.status == 412
    resp = await api.client.put(
        url, json={"title": "v3", "body": "b"}, headers={**auth, "If-Match": 'W/"1"'}
    )
    assert resp.status == 412
    resp = await api.client.put(url, json={"title": "v3", "body": "b"}, headers=auth)
    assert resp.status == 200  # no precondition asked for
    resp = await api.client.put("/api/articles/missing", json={"title": "x"}, headers=auth)
    assert resp.status == 404
    await api.add_user("reader", Capabilities(buckets={"articles": [">"]}))
    resp = await api.client.put(url, json={"title": "x"}, headers=api.auth("reader"))
    assert resp.status == 403


async def test_concurrent_puts_with_the_same_if_match(api: Api) -> None:
    """Two PUTs holding the same ETag: exactly one 200 and one 412 (KV's revision check)."""
    a = await create(api)
    headers = {**api.auth("alice"), "If-Match": f'"{a["revision"]}"'}

    async def put(title: str) -> int:
        resp = await api.client.put(
            f"/api/articles/{a['id']}", json={"title": title, "body": ""}, headers=headers
        )
        return resp.status

    for _ in range(5):  # several rounds, each from a fresh common revision
        statuses = sorted(await asyncio.gather(put("left"), put("right")))
        assert statuses == [200, 412]
        resp = await api.client.get(f"/api/articles/{a['id']}", headers=api.auth("alice"))
        headers["If-Match"] = resp.headers["ETag"]


async def test_delete(api: Api, nc: NATS) -> None:
    # The author deletes (bob, another demo user, may not since articles have owners).
    a = await create(api)
    url = f"/api/articles/{a['id']}"
    events = await nc.subscribe(f"articles.{a['id']}.deleted")
    resp = await api.client.delete(url, headers=api.auth("alice") | {"If-Match": '"999999"'})
    assert resp.status == 412
    resp = await api.client.delete(
        url, headers=api.auth("alice") | {"If-Match": f'"{a["revision"]}"'}
    )
    assert resp.status == 200
    body = await resp.json()
    assert body["id"] == a["id"] and body["revision"] > a["revision"]
    assert (await events.next_msg(timeout=5)).subject.endswith(".deleted")
    await events.unsubscribe()
    resp = await api.client.get(url, headers=api.auth("bob"))
    assert resp.status == 404
    resp = await api.client.get("/api/articles", headers=api.auth("bob"))
    assert (await resp.json())["items"] == []  # only a delete marker left in the bucket
    resp = await api.client.delete(url, headers=api.auth("alice"))
    assert resp.status == 404
    await api.add_user("reader", Capabilities(buckets={"articles": [">"]}))
    b = await create(api)
    resp = await api.client.delete(f"/api/articles/{b['id']}", headers=api.auth("reader"))
    assert resp.status == 403


# ------------------------------------------------------------------ ownership (review 11)


async def _unchanged(api: Api, a: dict[str, Any]) -> None:
    resp = await api.client.get(f"/api/articles/{a['id']}", headers=api.auth("alice"))
    assert resp.status == 200
    now = await resp.json()
    assert (now["revision"], now["title"]) == (a["revision"], a["title"])


async def test_only_the_author_or_a_moderator_changes_an_article(api: Api) -> None:
    """bob (articles.update/delete, reads every article) cannot change alice's article, with
    or without the right If-Match; a holder of articles.moderate can, authorship kept."""
    a = await create(api, "alice's")
    url = f"/api/articles/{a['id']}"
    right, stale = {"If-Match": f'"{a["revision"]}"'}, {"If-Match": '"999999"'}
    for precondition in ({}, right, stale):
        headers = api.auth("bob") | precondition
        resp = await api.client.put(url, json={"title": "bob's now"}, headers=headers)
        assert resp.status == 403, precondition  # never a 412 naming the revision
        assert "revision" not in (await resp.json())["detail"]
        resp = await api.client.delete(url, headers=headers)
        assert resp.status == 403, precondition
    await _unchanged(api, a)
    caps = Capabilities(
        buckets={"articles": [">"]},
        commands=["articles.update", "articles.delete", "articles.moderate"],
    )
    await api.add_user("mod", caps)
    resp = await api.client.put(url, json={"title": "x"}, headers=api.auth("mod") | stale)
    assert resp.status == 412  # allowed to change it: may learn the revision
    resp = await api.client.put(url, json={"title": "moderated"}, headers=api.auth("mod") | right)
    assert resp.status == 200
    moderated = await resp.json()
    assert (moderated["author"], moderated["author_name"]) == (api.users["alice"].id, "Alice")
    # The demo admin moderates too (its commands capability is `>`).
    resp = await api.client.delete(url, headers=api.auth("admin"))
    assert resp.status == 200


async def test_writers_without_read_capability_learn_nothing(api: Api) -> None:
    """A moderator whose KV capability hides a key gets the same 403 for an article that
    exists (with a stale or a right If-Match) and for one that does not: no revision, no
    existence."""
    a = await create(api)
    caps = Capabilities(
        buckets={"articles": ["someone-else"]},
        commands=["articles.update", "articles.delete", "articles.moderate"],
    )
    await api.add_user("blind", caps)
    auth = api.auth("blind")
    answers = []
    for aid, precondition in (
        (a["id"], {"If-Match": '"999999"'}),
        (a["id"], {"If-Match": f'"{a["revision"]}"'}),
        ("doesNotExist", {"If-Match": '"999999"'}),
    ):
        url = f"/api/articles/{aid}"
        put = await api.client.put(url, json={"title": "x"}, headers=auth | precondition)
        delete = await api.client.delete(url, headers=auth | precondition)
        # The detail names the key asked for, and nothing else differs.
        details = [(await r.json())["detail"].replace(aid, "<id>") for r in (put, delete)]
        answers.append((put.status, delete.status, *details))
    assert answers[0] == answers[1] == answers[2]
    assert answers[0][:2] == (403, 403)
    await _unchanged(api, a)


# ------------------------------------------------------------------ pages (review 12)


async def _page(api: Api, user: str, query: str = "") -> tuple[list[str], str | None]:
    resp = await api.client.get(f"/api/articles{query}", headers=api.auth(user))
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    return [x["id"] for x in body["items"]], body["next_cursor"]


async def test_list_pages_with_limit_and_cursor(api: Api) -> None:
    """limit=2 over 5 articles: pages of 2, 2, 1 in id order, each article once, the last
    page's next_cursor null."""
    ids = sorted([(await create(api, f"t{i}"))["id"] for i in range(5)])
    seen: list[str] = []
    pages = []
    cursor: str | None = None
    while True:
        query = "?limit=2" + (f"&cursor={cursor}" if cursor else "")
        page, cursor = await _page(api, "bob", query)
        pages.append(len(page))
        seen += page
        if cursor is None:
            break
    assert pages == [2, 2, 1]
    assert seen == ids


async def test_list_default_page_is_50_and_pages_skip_unreadable_keys(api: Api) -> None:
    ids = sorted([(await create(api, f"t{i}"))["id"] for i in range(51)])
    page, cursor = await _page(api, "bob")
    assert page == ids[:50] and cursor is not None
    assert await _page(api, "bob", f"?cursor={cursor}") == (ids[50:], None)
    # A reader of every other article: full pages of what it may read, nothing else.
    readable = ids[::2]
    await api.add_user("dave", Capabilities(buckets={"articles": readable}))
    page, cursor = await _page(api, "dave", "?limit=20")
    assert page == readable[:20] and cursor is not None
    page, cursor = await _page(api, "dave", f"?limit=20&cursor={cursor}")
    assert (page, cursor) == (readable[20:], None)


async def test_list_bad_paging_parameters_are_400(api: Api) -> None:
    await create(api)
    await create(api)
    first, cursor = await _page(api, "bob", "?limit=1")
    assert cursor is not None
    for query in (
        "?limit=0",
        "?limit=201",
        "?limit=-1",
        "?limit=1.5",
        "?limit=abc",
        "?limit=",
        "?limit=%EF%BC%91",  # a full-width digit: isdigit() but not ASCII
        "?limit=1&limit=2",
        "?cursor=!!!",
        "?cursor=a.b",  # not an id: ids are one NATS token
        "?cursor=",
        f"?cursor={cursor}=",
        f"?cursor={cursor}&cursor={cursor}",
    ):
        resp = await api.client.get(f"/api/articles{query}", headers=api.auth("bob"))
        assert resp.status == 400, query
        assert resp.content_type == "application/problem+json"
    assert (await _page(api, "bob", "?limit=200"))[0][:1] == first


async def test_any_id_is_a_cursor_and_the_page_starts_after_it(api: Api) -> None:
    """The document says a cursor is an id, so every id is taken, existing or not."""
    ids = sorted([(await create(api, f"t{i}"))["id"] for i in range(3)])
    assert await _page(api, "bob", f"?cursor={ids[0]}") == (ids[1:], None)
    before_all = "-"  # need not exist: the page holds the ids after it
    expected = [i for i in ids if i > before_all]
    assert await _page(api, "bob", f"?cursor={before_all}") == (expected, None)
    last = "z" * 64
    assert await _page(api, "bob", f"?cursor={last}") == ([i for i in ids if i > last], None)
