"""Bounds of the API (security review 9, 10, 20, 24): the per-user write budget, the
metrics' method label, the `__Host-` session cookie, user ids without `_`."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import msgspec
import pytest
from aiohttp.test_utils import TestClient, TestServer
from nats.aio.client import Client as NATS
from nats.js.client import JetStreamContext

from http_api import admin
from http_api.app import create_app
from http_api.middlewares import KNOWN_METHODS
from http_api.state import STORE
from shared.settings import Settings
from tests.api.conftest import CHEAP_HASHER, ORIGIN, Api

ApiWith = Callable[..., AbstractAsyncContextManager[Api]]


@pytest.fixture
def api_with(nc: NATS, api_settings: Settings) -> ApiWith:
    """An API whose settings differ from the default test ones by `overrides`."""

    @asynccontextmanager
    async def start(**overrides: Any) -> AsyncIterator[Api]:
        settings = msgspec.structs.replace(api_settings, **overrides)
        app = create_app(settings, password_hasher=CHEAP_HASHER)
        async with TestClient(TestServer(app)) as client:
            seeded = await admin.seed_demo(settings, app[STORE], CHEAP_HASHER)
            yield Api(client, app, settings, {u.username: u for u, _ in seeded})

    return start


# ------------------------------------------------------------------ write budget (review 10)


async def test_writes_past_the_budget_get_429_and_change_nothing(
    api_with: ApiWith, js: JetStreamContext
) -> None:
    """3 writes at once, then 429 + Retry-After for every unsafe method of that user only;
    the refused write stores nothing, and reads go on."""
    async with api_with(api_writes_per_minute=1, api_writes_burst=3) as api:
        alice = api.auth("alice")
        ids = []
        for i in range(3):
            resp = await api.client.post("/api/articles", json={"title": f"t{i}"}, headers=alice)
            assert resp.status == 201
            ids.append((await resp.json())["id"])
        kv = await js.key_value("articles")
        before = sorted(await kv.keys())
        refused = [
            await api.client.post("/api/articles", json={"title": "t3"}, headers=alice),
            await api.client.put(f"/api/articles/{ids[0]}", json={"title": "x"}, headers=alice),
            await api.client.delete(f"/api/articles/{ids[1]}", headers=alice),
            await api.client.post(
                "/api/commands/todos.put", json={"id": "a", "title": "a"}, headers=alice
            ),
            await api.client.post("/api/auth/refresh", headers=alice),
        ]
        for resp in refused:
            assert resp.status == 429, resp.url
            assert resp.content_type == "application/problem+json"
            assert (await resp.json())["type"] == "urn:natsgate:problem:rate_limited"
            assert int(resp.headers["Retry-After"]) >= 1
        assert sorted(await kv.keys()) == before
        assert (await js.stream_info("KV_todos")).state.messages == 0
        resp = await api.client.get(f"/api/articles/{ids[0]}", headers=alice)
        assert resp.status == 200 and (await resp.json())["title"] == "t0"
        resp = await api.client.post("/api/articles", json={"title": "b"}, headers=api.auth("bob"))
        assert resp.status == 201  # another user's budget


async def test_openapi_documents_429_with_retry_after_on_every_write(api: Api) -> None:
    doc = await (await api.client.get("/api/openapi.json")).json()
    writes = [
        (path, method, op)
        for path, ops in doc["paths"].items()
        for method, op in ops.items()
        if method in ("post", "put", "patch", "delete") and op["security"]
    ]
    assert len(writes) >= 8
    for path, method, op in writes:
        too_many = op["responses"].get("429")
        assert too_many is not None, (method, path)
        assert too_many["headers"]["Retry-After"]["required"] is True
    login = doc["paths"]["/api/auth/login"]["post"]["responses"]["429"]
    assert "Retry-After" in login["headers"]
    listing = doc["paths"]["/api/articles"]["get"]
    params = {p["name"]: p for p in listing["parameters"]}
    assert params["limit"]["schema"] == {"type": "integer", "minimum": 1, "maximum": 200}
    assert params["cursor"]["in"] == "query"
    assert "400" in listing["responses"]
    assert "next_cursor" in doc["components"]["schemas"]["ArticleList"]["properties"]


# ------------------------------------------------------------------ metrics labels (review 9)


async def test_other_methods_share_one_metrics_label(api: Api) -> None:
    """Whatever method a client sends, the `method` label is a known method or `other`.
    (aiohttp's C parser refuses names it does not know with its own 400; it knows dozens,
    WebDAV's among them, and the pure-Python parser takes any token.)"""
    methods = ("PROPFIND", "MKCOL", "LOCK", "SEARCH", "PURGE", "REPORT", "FOO", "XYZZY1")
    for method in methods:
        for path in ("/api/healthz", "/api/no/such/path"):
            resp = await api.client.request(method, path)
            assert resp.status in (400, 404, 405), method
    text = await (await api.client.get("/api/metrics")).text()
    for family in ("http_api_requests_total", "http_api_request_duration_seconds_count"):
        labels = set(re.findall(rf'^{family}\{{method="([^"]*)"', text, re.M))
        assert labels <= KNOWN_METHODS | {"other"}, family
        assert "other" in labels, family


# ------------------------------------------------------------------ cookie name (review 24)


def _set_cookies(headers: Any) -> dict[str, list[str]]:
    """Set-Cookie headers by cookie name: the attributes, lower-cased."""
    out = {}
    for raw in headers.getall("Set-Cookie", []):
        name = raw.split("=", 1)[0].strip()
        out[name] = [a.strip().lower() for a in raw.split(";")[1:]]
    return out


async def test_secure_cookie_is_host_prefixed(api_with: ApiWith) -> None:
    """COOKIE_SECURE: the cookie is `__Host-session` (Secure, Path=/, no Domain); a plain
    `session` cookie is not accepted; logout expires it with the same attributes."""
    async with api_with(cookie_secure=True) as api:
        resp = await api.client.post(
            "/api/auth/login", json={"username": "alice", "password": api.settings.demo_password}
        )
        assert resp.status == 200
        token = (await resp.json())["token"]
        cookies = _set_cookies(resp.headers)
        assert set(cookies) == {"__Host-session"}
        attrs = cookies["__Host-session"]
        assert "secure" in attrs and "path=/" in attrs and "httponly" in attrs
        assert not any(a.startswith("domain") for a in attrs)
        resp = await api.client.get("/api/auth/me", headers={"Cookie": f"__Host-session={token}"})
        assert resp.status == 200
        resp = await api.client.get("/api/auth/me", headers={"Cookie": f"session={token}"})
        assert resp.status == 401
        resp = await api.client.post(
            "/api/auth/logout", headers={"Cookie": f"__Host-session={token}", "Origin": ORIGIN}
        )
        assert resp.status == 204
        attrs = _set_cookies(resp.headers)["__Host-session"]
        assert "secure" in attrs and "path=/" in attrs and "max-age=0" in attrs
        doc = await (await api.client.get("/api/openapi.json")).json()
        assert doc["components"]["securitySchemes"]["cookie"]["name"] == "__Host-session"


# ------------------------------------------------------------------ user ids (review 20)


async def test_a_user_id_with_an_underscore_is_refused(api: Api) -> None:
    """`u_<uid>_<name>` names durables: an id with `_` is a 422 and creates nothing; other
    given ids are kept, generated ones are `u` + 16 hex, a taken id is 409."""
    admin_auth = api.auth("admin")
    body = {"username": "carol", "password": "carol-secret"}
    for bad in ("u1_x", "_", "a_", "a.b", "", "x" * 65):
        resp = await api.client.post("/api/users", json=body | {"id": bad}, headers=admin_auth)
        assert resp.status == 422, bad
        assert resp.content_type == "application/problem+json"
    names = {
        u["username"]
        for u in (await (await api.client.get("/api/users", headers=admin_auth)).json())["items"]
    }
    assert "carol" not in names
    resp = await api.client.post("/api/users", json=body | {"id": "ext-42"}, headers=admin_auth)
    assert resp.status == 201 and (await resp.json())["id"] == "ext-42"
    resp = await api.client.post(
        "/api/users", json={"username": "dan", "password": "dan-secret"}, headers=admin_auth
    )
    assert resp.status == 201 and re.fullmatch(r"u[0-9a-f]{16}", (await resp.json())["id"])
    resp = await api.client.post(
        "/api/users",
        json={"username": "erin", "password": "erin-secret", "id": "ext-42"},
        headers=admin_auth,
    )
    assert resp.status == 409
    resp = await api.client.post(
        "/api/auth/login", json={"username": "erin", "password": "erin-secret"}
    )
    assert resp.status == 401  # the refused user left no credentials behind


# ------------------------------------------------------------------ storage full (review 10)


async def test_a_full_bucket_is_507_not_a_500(api: Api, js: JetStreamContext) -> None:
    """A write refused because JetStream is at its limit is 507 storage_full (a server
    bound, said as such), and nothing is stored."""
    info = await js.stream_info("KV_articles")
    info.config.max_bytes = 1024
    await js.update_stream(info.config)
    resp = await api.client.post(
        "/api/articles", json={"title": "t", "body": "x" * 4096}, headers=api.auth("alice")
    )
    body = await resp.json()
    assert resp.status == 507, body
    assert body["type"].endswith("storage_full")
    assert (await js.stream_info("KV_articles")).state.messages == 0
