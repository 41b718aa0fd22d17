"""RFC 9457 problem details: the one error shape of the HTTP API.

    Exception
     └── Problem                  any failed request; carries status, slug and detail
          └── (raised by handlers and middlewares; aiohttp's own HTTPException is
               converted to a Problem by the problem middleware)

`type` is `urn:natsgate:problem:<slug>`, so clients can switch on it; `detail` is safe to
show (never a token, a password or an exception's text).
"""

from __future__ import annotations

import msgspec
from aiohttp import web
from nats.js.errors import APIError

PROBLEM_CONTENT_TYPE = "application/problem+json"
TYPE_PREFIX = "urn:natsgate:problem:"

# status -> (slug, title) for the statuses we produce
DEFAULTS: dict[int, tuple[str, str]] = {
    400: ("bad_request", "Bad request"),
    401: ("unauthorized", "Unauthorized"),
    403: ("forbidden", "Forbidden"),
    404: ("not_found", "Not found"),
    405: ("method_not_allowed", "Method not allowed"),
    408: ("request_timeout", "Request timeout"),
    409: ("conflict", "Conflict"),
    411: ("length_required", "Length required"),
    412: ("precondition_failed", "Precondition failed"),
    413: ("payload_too_large", "Payload too large"),
    414: ("uri_too_long", "URI too long"),
    415: ("unsupported_media_type", "Unsupported media type"),
    422: ("unprocessable", "Unprocessable content"),
    428: ("precondition_required", "Precondition required"),
    429: ("rate_limited", "Too many requests"),
    500: ("internal", "Internal server error"),
    502: ("bad_gateway", "Bad gateway"),
    503: ("unavailable", "Service unavailable"),
    504: ("timeout", "Gateway timeout"),
    507: ("storage_full", "Insufficient storage"),
}


class ProblemBody(msgspec.Struct, omit_defaults=True):
    """The problem document. Extension members (`pattern`, `where`) appear when set."""

    type: str
    title: str
    status: int
    detail: str
    where: str | None = None
    pattern: str | None = None


class Problem(Exception):
    """A request failed with `status`; the middleware renders it as problem JSON."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        slug: str | None = None,
        title: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        default_slug, default_title = DEFAULTS.get(status, ("error", "Error"))
        self.status = status
        self.slug = slug or default_slug
        self.title = title or default_title
        self.detail = detail
        self.headers = headers or {}
        self.extra = extra or {}

    def body(self) -> ProblemBody:
        return ProblemBody(
            type=TYPE_PREFIX + self.slug,
            title=self.title,
            status=self.status,
            detail=self.detail,
            where=self.extra.get("where"),
            pattern=self.extra.get("pattern"),
        )


def from_http_exception(exc: web.HTTPException) -> Problem:
    """aiohttp's own errors (404, 405, 413, …) as problems, keeping their useful headers."""
    headers = {k: v for k, v in exc.headers.items() if k in ("Allow", "Retry-After")}
    detail = exc.reason
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        detail = "request body is too large"
    return Problem(exc.status, detail, headers=headers)


_encoder = msgspec.json.Encoder()


def response(problem: Problem) -> web.Response:
    resp = web.Response(
        status=problem.status,
        body=_encoder.encode(problem.body()),
        content_type=PROBLEM_CONTENT_TYPE,
    )
    for k, v in problem.headers.items():
        resp.headers[k] = v
    return resp


# JetStream's codes for a full account, stream or bucket (nats-server's errors.json).
STORAGE_FULL = frozenset({10002, 10023, 10026, 10028, 10047, 10077})


def from_jetstream(e: APIError) -> Problem:
    """A JetStream refusal that reached the edge: storage full (507) or unavailable (503)."""
    if e.err_code in STORAGE_FULL:
        return Problem(507, "storage is full: nothing was written")
    return Problem(503, "JetStream is unavailable: retry later", headers={"Retry-After": "1"})
