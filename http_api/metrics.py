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
| `http_api_nats_reconnects_total` | counter | NATS connection re-established after a loss |
| `http_api_ready` | gauge | 1 when `/api/readyz` would answer 200 (set at each scrape) |
| `http_api_nats_stream_consumers` | gauge | `stream`: consumers of each stream (each scrape) |
| `http_api_nats_stream_max_consumers` | gauge | `stream`: its limit (-1: none) |

Plus `process_*` (RSS, CPU seconds, open fds), `python_gc_*` and `python_info`, as the
gateway's default registry has them: a worker's own memory and CPU.

`method` is GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS or `other`: clients choose it, and
each distinct value would be a series for the life of the process.
"""

from __future__ import annotations

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        # The default registry's collectors, which are stateless readers of this process
        # (/proc, gc, platform): registering them here too shares them, not their series.
        for collector in (PROCESS_COLLECTOR, GC_COLLECTOR, PLATFORM_COLLECTOR):
            self.registry.register(collector)
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

        self.nats_reconnects = Counter(
            "http_api_nats_reconnects_total",
            "NATS connection re-established after a loss.",
            registry=self.registry,
        )
        self.ready = Gauge(
            "http_api_ready",
            "1 when the process is ready (NATS connected, auth data readable).",
            registry=self.registry,
        )
        self.stream_consumers = Gauge(
            "http_api_nats_stream_consumers",
            "Consumers of each JetStream stream (a bucket is stream KV_<bucket>).",
            ["stream"],
            registry=self.registry,
        )
        self.stream_max_consumers = Gauge(
            "http_api_nats_stream_max_consumers",
            "Consumer limit of each stream (-1: none).",
            ["stream"],
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
