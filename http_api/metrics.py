"""Prometheus metrics of one API process, in a registry owned by its app.

| name | type | labels |
|---|---|---|
| `http_api_requests_total` | counter | `method`, `route` (the route template), `status` |
| `http_api_request_duration_seconds` | histogram | `method`, `route` |
| `http_api_login_failures_total` | counter | `reason` (`credentials`, `disabled`, `rate_limited`) |
| `http_api_event_failures_total` | counter | `kind` (`event`, `audit`) |

`method` is GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS or `other`: clients choose it, and
each distinct value would be a series for the life of the process.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "http_api_requests_total",
            "HTTP requests by method, route template and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "http_api_request_duration_seconds",
            "HTTP request latency by method and route template.",
            ["method", "route"],
            registry=self.registry,
        )
        self.login_failures = Counter(
            "http_api_login_failures_total",
            "Failed logins by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.event_failures = Counter(
            "http_api_event_failures_total",
            "Events or audit records that could not be published after a write.",
            ["kind"],
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
