"""Health, readiness, metrics, the OpenAPI and AsyncAPI documents: no token needed."""

from __future__ import annotations

from aiohttp import web

from http_api.bodies import json_response
from http_api.metrics import CONTENT_TYPE
from http_api.problems import Problem
from http_api.schemas import AnyJson, Status
from http_api.state import ASYNCAPI, METRICS, NC, OPENAPI, STORE, Route


async def healthz(request: web.Request) -> web.StreamResponse:
    """The process answers; no dependency is checked."""
    return json_response(Status("ok"))


async def readyz(request: web.Request) -> web.StreamResponse:
    """Ready = connected to NATS and able to read the auth data every request needs (any
    replica answering is enough: no leader is needed for a read)."""
    nc = request.app.get(NC)
    checks = {"nats": nc is not None and nc.is_connected}
    checks["auth_read"] = checks["nats"] and await request.app[STORE].auth_readable()
    failing = [name for name, ok in checks.items() if not ok]
    if failing:
        raise Problem(
            503, "not ready: " + ", ".join(failing) + " failing", headers={"Retry-After": "1"}
        )
    return json_response(Status("ready", checks))


async def metrics(request: web.Request) -> web.StreamResponse:
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
