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
    kv = await js.key_value("articles")
    entry = await kv.get(article["id"])
    assert entry.revision == article["revision"]
    stored = msgspec.json.decode(entry.value or b"")
    assert stored["title"] == "Hello" and "revision" not in stored
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
    a = await create(api)
    url = f"/api/articles/{a['id']}"
    events = await nc.subscribe(f"articles.{a['id']}.deleted")
    resp = await api.client.delete(url, headers=api.auth("bob") | {"If-Match": '"999999"'})
    assert resp.status == 412
    resp = await api.client.delete(
        url, headers=api.auth("bob") | {"If-Match": f'"{a["revision"]}"'}
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
    resp = await api.client.delete(url, headers=api.auth("bob"))
    assert resp.status == 404
    await api.add_user("reader", Capabilities(buckets={"articles": [">"]}))
    b = await create(api)
    resp = await api.client.delete(f"/api/articles/{b['id']}", headers=api.auth("reader"))
    assert resp.status == 403
