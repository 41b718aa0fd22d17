"""Prometheus metrics of one API process, in a registry owned by its app.

| name | type | labels |
|---|---|---|
| `http_api_requests_total` | counter | `method`, `route` (the route template), `status` |
| `http_api_request_duration_seconds` | histogram | `method`, `route` |
| `http_api_login_failures_total` | counter | `reason` (`credentials`, `disabled`, `rate_limited`) |
| `http_api_event_failures_total` | counter | `kind` (`event`, `audit`: dropped for good) |
| `http_api_nats_retries_total` | counter | `kind` (`read`, `write`, `audit`, `command`) |
| `http_api_nats_failures_total` | counter | `kind`: failed past NATS_FAILOVER_WAIT (503) |
| `http_api_audit_pending` | gauge | audit records buffered until JetStream takes them |

`method` is GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS or `other`: clients choose it, and
each distinct value would be a series for the life of the process.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
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
        self.nats_retries = Counter(
            "http_api_nats_retries_total",
            "NATS operations tried again while NATS fails over, by kind.",
            ["kind"],
            registry=self.registry,
        )
        self.nats_failures = Counter(
            "http_api_nats_failures_total",
            "NATS operations that failed for good (past the failover wait), by kind.",
            ["kind"],
            registry=self.registry,
        )
        self.audit_pending = Gauge(
            "http_api_audit_pending",
            "Audit records buffered until JetStream takes them.",
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
