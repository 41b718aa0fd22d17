"""The OpenAPI 3.1 document, generated from the route table and the msgspec Structs.

Nothing here is written by hand per route: paths, parameters, bodies and responses come from
`Route` entries, schemas from `msgspec.json.schema_components`. A test checks that the
document and the router agree both ways.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from http_api.problems import DEFAULTS, PROBLEM_CONTENT_TYPE, ProblemBody
from http_api.state import Route
from shared import __version__

REF = "#/components/schemas/{name}"
_PATH_PARAM = re.compile(r"\{(\w+)\}")


def _is_schema_type(t: Any) -> bool:
    return t is not None and t is not Any


def _content(ct: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {ct: {"schema": schema}}


# Every 429 we send says when to retry (whole seconds, at least 1).
_RETRY_AFTER = {
    "Retry-After": {
        "description": "seconds to wait before retrying",
        "required": True,
        "schema": {"type": "string", "pattern": "^[1-9][0-9]*$"},
    }
}


# A 503 says when to try again where NATS is failing over (the middleware sets it).
_RETRY_AFTER_503 = {"Retry-After": {**_RETRY_AFTER["Retry-After"], "required": False}}
_ETAG = {
    "ETag": {
        "description": "the KV revision, for If-Match",
        "required": True,
        "schema": {"type": "string", "pattern": '^"[0-9]+"$'},
    }
}


def statuses(r: Route) -> set[int]:
    """Every status the operation can answer: its own, and those implied by what it takes
    (a token, a body, a path id, a checked header or query) and by the middlewares."""
    out = {*r.errors, 500}
    if r.auth:
        out |= {401, 403, 503}  # the token is checked against NATS-held records
    if r.body is not None:
        out |= {400, 413, 422, 503}
    if r.counts_as_write:
        out |= {429, 507}  # middlewares.charge_write, and a full JetStream
    if _PATH_PARAM.search(r.path) and r.auth:
        out.add(404)
    if any(q.schema or q.enum or q.required for q in (*r.query, *r.headers)):
        out.add(400)
    return out


def links(routes: list[Route], r: Route) -> dict[str, Any]:
    """OpenAPI links from a create (201 with an `id`) to every operation on the created item,
    and from an answer carrying an ETag to the operations taking If-Match: a stateful client
    chains create -> read -> update -> delete from the document alone."""
    out: dict[str, Any] = {}
    item = f"{r.path}/{{id}}"
    for other in routes:
        if not other.in_openapi or other is r:
            continue
        params: dict[str, str] = {}
        if r.method == "POST" and r.status == 201 and other.path.startswith(item):
            params["path.id"] = "$response.body#/id"
        elif r.extra.get("etag") and other.path == r.path and other.method in ("PUT", "DELETE"):
            params["path.id"] = "$request.path.id"
        else:
            continue
        if r.extra.get("etag") and any(h.name == "If-Match" for h in other.headers):
            params["header.If-Match"] = "$response.header.ETag"
        out[other.handler.__name__] = {
            "operationId": other.handler.__name__,
            "parameters": params,
        }
    return out


def build(routes: list[Route], cookie_name: str = "session") -> dict[str, Any]:
    """The document; `cookie_name`: the session cookie's (`shared.auth.session_cookie_name`)."""
    types: list[Any] = [ProblemBody]
    for r in routes:
        for t in (
            r.body,
            r.response,
            *r.extra.get("body_variants", ()),
            *r.extra.get("response_variants", ()),
        ):
            if _is_schema_type(t) and t not in types:
                types.append(t)
    schemas, components = msgspec.json.schema_components(types, ref_template=REF)
    schema_of = dict(zip(types, schemas, strict=True))

    def schema(t: Any, variants: tuple[Any, ...] = ()) -> dict[str, Any]:
        if variants:
            return {
                "anyOf": [schema_of[v] for v in variants]
                + [{"description": "any JSON (a forwarded command)"}]
            }
        return schema_of[t] if _is_schema_type(t) else {}

    problem = _content(PROBLEM_CONTENT_TYPE, schema_of[ProblemBody])
    paths: dict[str, dict[str, Any]] = {}
    for r in routes:
        if not r.in_openapi:
            continue
        path_schemas = r.extra.get("path", {})
        params: list[dict[str, Any]] = [
            {
                "name": n,
                "in": "path",
                "required": True,
                "schema": {"type": "string", **path_schemas.get(n, {})},
            }
            for n in _PATH_PARAM.findall(r.path)
        ]
        for where, items in (("query", r.query), ("header", r.headers)):
            for q in items:
                s: dict[str, Any] = dict(q.schema) if q.schema else {"type": "string"}
                if q.enum:
                    s["enum"] = list(q.enum)
                params.append(
                    {
                        "name": q.name,
                        "in": where,
                        "required": q.required,
                        "description": q.description,
                        "schema": s,
                    }
                )
        ok: dict[str, Any] = {"description": "success"}
        if r.response is not None and r.status != 204:
            ok["content"] = _content(
                r.response_content_type, schema(r.response, r.extra.get("response_variants", ()))
            )
        if r.extra.get("etag"):
            ok["headers"] = _ETAG
        if op_links := links(routes, r):
            ok["links"] = op_links
        responses: dict[str, Any] = {str(r.status): ok}
        for status in sorted(statuses(r)):
            responses[str(status)] = {"description": DEFAULTS[status][1], "content": problem}
            if status == 429:
                responses[str(status)]["headers"] = _RETRY_AFTER
            elif status == 503:
                responses[str(status)]["headers"] = _RETRY_AFTER_503
        op: dict[str, Any] = {
            "operationId": r.handler.__name__,
            "summary": r.summary,
            "tags": [r.tag],
            "responses": responses,
        }
        if params:
            op["parameters"] = params
        if r.body is not None:
            op["requestBody"] = {
                "required": True,
                "content": _content(
                    "application/json", schema(r.body, r.extra.get("body_variants", ()))
                ),
            }
        op["security"] = [{"bearer": []}, {"cookie": []}] if r.auth else []
        paths.setdefault(r.path, {})[r.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "natsgate HTTP API",
            "version": __version__,
            "description": "Every write goes into NATS and reaches browsers over the WebSocket "
            "gateway. Errors are application/problem+json (RFC 9457).",
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
                "cookie": {"type": "apiKey", "in": "cookie", "name": cookie_name},
            },
        },
    }


def encoded(routes: list[Route], cookie_name: str = "session") -> bytes:
    return msgspec.json.encode(build(routes, cookie_name))
