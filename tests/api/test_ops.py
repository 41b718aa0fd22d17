"""Health, readiness, metrics, problem JSON for aiohttp's own errors, and OpenAPI agreement."""

from __future__ import annotations

import re

from aiohttp import web
from nats.js.client import JetStreamContext

from http_api.app import create_app
from http_api.state import NC, ROUTES
from shared.settings import Settings
from tests.api.conftest import Api


async def test_health_and_readiness(api: Api) -> None:
    resp = await api.client.get("/api/healthz")
    assert resp.status == 200 and await resp.json() == {"status": "ok"}
    resp = await api.client.get("/api/readyz")
    assert resp.status == 200
    assert await resp.json() == {"status": "ready", "checks": {"nats": True, "auth_read": True}}


async def test_not_ready_while_the_auth_data_cannot_be_read(
    api: Api, js: JetStreamContext
) -> None:
    """Connected is not enough: a process that cannot read its users or revoked tokens
    would fail every authenticated request, so it says it is not ready."""
    await js.delete_stream("KV_auth_revoked")
    resp = await api.client.get("/api/readyz")
    body = await resp.json()
    assert resp.status == 503 and resp.headers["Retry-After"] == "1"
    assert body["detail"] == "not ready: auth_read failing"


async def test_readiness_fails_without_nats(api: Api) -> None:
    """readyz follows the NATS connection; healthz does not depend on it."""
    await api.app[NC].close()
    resp = await api.client.get("/api/readyz")
    assert resp.status == 503 and resp.content_type == "application/problem+json"
    assert (await api.client.get("/api/healthz")).status == 200


async def test_metrics_count_requests_and_login_failures(api: Api) -> None:
    await api.client.get("/api/healthz")
    await api.client.post("/api/auth/login", json={"username": "alice", "password": "nope"})
    await api.client.get("/api/no/such/path")
    resp = await api.client.get("/api/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain")
    text = await resp.text()
    assert re.search(
        r'http_api_requests_total\{method="GET",route="/api/healthz",status="200"\} 1\.0', text
    )
    assert 'route="/api/auth/login",status="401"' in text
    assert 'route="unmatched",status="404"' in text  # unknown paths never become labels
    assert 'http_api_request_duration_seconds_bucket{le="0.005",method="GET",' in text
    assert 'http_api_login_failures_total{reason="credentials"} 1.0' in text


async def test_framework_errors_are_problem_json(api: Api) -> None:
    """404, 405 and 413 come out as application/problem+json like every other error."""
    resp = await api.client.get("/api/nope")
    assert resp.status == 404 and resp.content_type == "application/problem+json"
    body = await resp.json()
    assert body == {
        "type": "urn:natsgate:problem:not_found",
        "title": "Not found",
        "status": 404,
        "detail": "Not Found",
    }
    resp = await api.client.delete("/api/auth/me", headers=api.auth("alice"))
    assert resp.status == 405 and resp.content_type == "application/problem+json"
    assert resp.headers["Allow"] == "GET"
    resp = await api.client.post("/api/auth/login", data=b"x" * (api.settings.max_body_bytes + 1))
    assert resp.status == 413 and resp.content_type == "application/problem+json"


def _router_operations(app: web.Application) -> set[tuple[str, str]]:
    """Every routed operation but the files that are not one (the docs page's assets)."""
    ops = set()
    for route in app.router.routes():
        assert route.resource is not None
        if app[ROUTES][route.handler].in_openapi:
            ops.add((route.method.lower(), route.resource.canonical))
    return ops


async def test_openapi_and_router_agree_both_ways(api: Api) -> None:
    """Every route is documented, and every documented operation is routed."""
    resp = await api.client.get("/api/openapi.json")
    assert resp.status == 200
    doc = await resp.json()
    assert doc["openapi"].startswith("3.1")
    documented = {(m, path) for path, ops in doc["paths"].items() for m in ops}
    assert documented == _router_operations(api.app)
    # Every $ref resolves, and every JSON body is described by a schema.
    refs = set(re.findall(r'"\$ref": ?"#/components/schemas/(\w+)"', await resp.text()))
    assert refs <= set(doc["components"]["schemas"])
    login = doc["paths"]["/api/auth/login"]["post"]
    assert login["security"] == []
    assert login["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/LoginIn"
    }
    assert "412" in doc["paths"]["/api/articles/{id}"]["put"]["responses"]
    params = doc["paths"]["/api/users/{id}/explain"]["get"]["parameters"]
    assert {p["name"] for p in params} == {"id", "op", "target", "pattern"}


def test_create_app_needs_no_running_nats(settings: Settings) -> None:
    """The factory only builds; NATS is connected in the cleanup context on startup."""
    app = create_app(settings)
    assert len(app.cleanup_ctx) == 1
