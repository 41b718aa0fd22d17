"""Health, readiness, metrics, the OpenAPI and AsyncAPI documents: no token needed."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from http_api.bodies import json_response
from http_api.metrics import CONTENT_TYPE
from http_api.problems import Problem
from http_api.schemas import AnyJson, Status
from http_api.state import ASYNCAPI, JS, METRICS, NC, OPENAPI, STORE, Route

log = logging.getLogger("http_api.ops")
STREAMS_TIMEOUT = 1.0  # seconds a scrape waits for NATS's stream list


async def healthz(request: web.Request) -> web.StreamResponse:
    """The process answers; no dependency is checked."""
    return json_response(Status("ok"))


async def _readiness(app: web.Application) -> dict[str, bool]:
    """Ready = connected to NATS and able to read the auth data every request needs (any
    replica answering is enough: no leader is needed for a read)."""
    nc = app.get(NC)
    checks = {"nats": nc is not None and nc.is_connected}
    checks["auth_read"] = checks["nats"] and await app[STORE].auth_readable()
    return checks


async def readyz(request: web.Request) -> web.StreamResponse:
    """200 with each check when ready (`_readiness`), else 503."""
    checks = await _readiness(request.app)
    failing = [name for name, ok in checks.items() if not ok]
    if failing:
        raise Problem(
            503, "not ready: " + ", ".join(failing) + " failing", headers={"Retry-After": "1"}
        )
    return json_response(Status("ready", checks))


async def _observe_nats(app: web.Application) -> None:
    """The gauges read from NATS, fresh at each scrape: readiness, and each stream's
    consumers against its limit (every gateway's readers hold consumers; at the limit a new
    `js_sub`, `kv_sub` or durable fails). A NATS that does not answer within a second
    leaves the last values: the scrape is answered regardless."""
    m = app[METRICS]
    m.ready.set(all((await _readiness(app)).values()))
    js = app.get(JS)
    if js is None:
        return
    try:
        async with asyncio.timeout(STREAMS_TIMEOUT):
            infos = await js.streams_info()
    except Exception as e:  # a scrape must not fail because NATS is failing over
        log.info("stream info unavailable", extra={"event": "metrics_nats", "error": repr(e)})
        return
    for info in infos:
        name = info.config.name or "?"
        m.stream_consumers.labels(name).set(info.state.consumer_count)
        limit = info.config.max_consumers
        m.stream_max_consumers.labels(name).set(-1 if limit is None else limit)


async def metrics(request: web.Request) -> web.StreamResponse:
    await _observe_nats(request.app)
    response = web.Response(body=request.app[METRICS].render())
    response.headers["Content-Type"] = CONTENT_TYPE
    return response


async def openapi(request: web.Request) -> web.StreamResponse:
    return web.Response(body=request.app[OPENAPI], content_type="application/json")


async def asyncapi(request: web.Request) -> web.StreamResponse:
    return web.Response(body=request.app[ASYNCAPI], content_type="application/json")


ROUTES = [
    Route(
        "GET",
        "/api/healthz",
        healthz,
        "Liveness: the process answers",
        "ops",
        auth=False,
        response=Status,
    ),
    Route(
        "GET",
        "/api/readyz",
        readyz,
        "Readiness: NATS connected and the auth data readable (each check)",
        "ops",
        auth=False,
        response=Status,
        errors=(503,),
    ),
    Route(
        "GET",
        "/api/metrics",
        metrics,
        "Prometheus metrics",
        "ops",
        auth=False,
        response=str,
        response_content_type="text/plain",
    ),
    Route(
        "GET",
        "/api/openapi.json",
        openapi,
        "This document (OpenAPI 3.1)",
        "ops",
        auth=False,
        response=AnyJson,
    ),
    Route(
        "GET",
        "/api/asyncapi.json",
        asyncapi,
        "The WebSocket protocol (AsyncAPI 3.0; docs/protocol.md is its prose)",
        "ops",
        auth=False,
        response=AnyJson,
    ),
]
