"""Prometheus metrics of a gateway process (one gateway per process in production)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

CONNECTIONS = Gauge("gateway_connections", "Open client connections")
SUBSCRIPTIONS = Gauge("gateway_subscriptions", "Live subscriptions by kind", ["kind"])
NATS_SUBSCRIPTIONS = Gauge("gateway_nats_core_subscriptions", "Shared NATS core subscriptions")
FRAMES_IN = Counter("gateway_frames_in_total", "Client envelopes received")
FRAMES_OUT = Counter("gateway_frames_out_total", "WebSocket frames written (batched)")
ENVELOPES_OUT = Counter("gateway_envelopes_out_total", "Envelopes queued to clients")
BACKPRESSURE_CLOSES = Counter("gateway_backpressure_closes_total", "Clients closed as too slow")
NATS_RETRIES = Counter(
    "gateway_nats_retries_total", "NATS requests tried again while NATS fails over", ["kind"]
)
NATS_FAILURES = Counter(
    "gateway_nats_failures_total", "NATS requests that failed past the failover wait", ["kind"]
)
NATS_RECONNECTS = Counter("gateway_nats_reconnects_total", "NATS connection re-established")
READY = Gauge("gateway_ready", "1 when /readyz answers 200 (set at each scrape)")
DENIED = Counter("gateway_denied_total", "Requests refused by capabilities", ["op"])
ERRORS = Counter("gateway_errors_total", "Error replies by code", ["code"])
CLOSES = Counter("gateway_closes_total", "Connections closed by close code", ["code"])
REVOCATION_LATENCY = Histogram(
    "gateway_revocation_seconds",
    "From the auth_users change in KV to the subscription ended",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
DURABLE_FAILURES = Counter(
    "gateway_durable_failures_total",
    "Durable floors not saved (save: retried at the next one; leave: the resume repeats "
    "what was handed on since the last save)",
    ["when"],
)
PRESENCE_WRITES = Counter(
    "gateway_presence_writes_total", "Presence KV writes: joins, refreshes and leaves"
)
