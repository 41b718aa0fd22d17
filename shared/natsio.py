"""NATS connection and idempotent provisioning of every bucket and stream we use."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import nats
from nats.aio.client import Client as NATS
from nats.js import api
from nats.js.client import JetStreamContext
from nats.js.errors import BucketNotFoundError, NotFoundError

from shared.settings import Settings

log = logging.getLogger("shared.natsio")


@dataclass(frozen=True, slots=True)
class Bucket:
    name: str
    history: int = 1
    ttl: float | None = None  # seconds; None = keep forever


@dataclass(frozen=True, slots=True)
class Stream:
    name: str
    subjects: tuple[str, ...]
    max_age: float | None = None


def buckets(settings: Settings) -> tuple[Bucket, ...]:
    return (
        Bucket("auth_users", history=5),
        Bucket("auth_credentials"),
        # A revoked token id only matters until the token would have expired anyway.
        Bucket("auth_revoked", ttl=float(settings.token_ttl + 60)),
        Bucket("articles", history=5),
        Bucket("todos", history=5),
    )


STREAMS: tuple[Stream, ...] = (
    Stream("chat", ("chat.>",)),
    Stream("audit", ("audit.>",)),
)


async def connect(
    settings: Settings,
    name: str,
    *,
    on_disconnect: Callable[[], Awaitable[None]] | None = None,
    on_reconnect: Callable[[], Awaitable[None]] | None = None,
    connect_timeout: float = 30.0,
) -> NATS:
    """Connect to any of the configured servers; once connected, reconnect forever."""

    # While NATS is down every reconnect attempt (each 0.5 s) reports an error: one line
    # for the first of a kind, then a count when the link is back, not 240 lines a minute.
    failures: dict[str, int] = {}
    down = False

    async def error_cb(e: Exception) -> None:
        kind = type(e).__name__
        if down:
            failures[kind] = failures.get(kind, 0) + 1
            if failures[kind] > 1:
                return
        log.warning("nats error", extra={"event": "nats_error", "error": kind})

    async def disconnected_cb() -> None:
        nonlocal down
        down = True
        log.warning("nats disconnected", extra={"event": "nats_disconnected"})
        if on_disconnect:
            await on_disconnect()

    async def reconnected_cb() -> None:
        nonlocal down
        down = False
        log.info("nats reconnected", extra={"event": "nats_reconnected", "errors": dict(failures)})
        failures.clear()
        if on_reconnect:
            await on_reconnect()

    deadline = asyncio.get_running_loop().time() + connect_timeout
    while True:
        try:
            return await nats.connect(
                servers=list(settings.nats_url),
                name=name,
                # nats-py's default gives up after ~60 attempts; a gateway must outlive
                # any outage and resume by itself.
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,
                connect_timeout=2,
                ping_interval=10,
                max_outstanding_pings=3,
                allow_reconnect=True,
                error_cb=error_cb,
                disconnected_cb=disconnected_cb,
                reconnected_cb=reconnected_cb,
            )
        except Exception as e:
            if asyncio.get_running_loop().time() > deadline:
                raise
            log.warning("nats not reachable yet: %s", type(e).__name__)
            await asyncio.sleep(0.5)


async def settle(nc: NATS, timeout: float = 5.0) -> None:
    """Return once the server has processed everything this client sent so far.

    nats-py's `flush()` writes its PING straight to the socket while earlier commands (a
    SUB) may still sit in the client's pending buffer, so a PONG can come back before the
    server has the SUB: under load, "subscribed" was then not true yet. Writing the
    pending buffer out first restores the order.
    """
    await nc._flush_pending(force_flush=True)
    await nc.flush(timeout=int(max(1, timeout)))


async def provision(js: JetStreamContext, settings: Settings) -> None:
    """Create every bucket and stream of ARCHITECTURE.md; safe to run any number of times."""
    replicas = settings.nats_replicas
    for b in buckets(settings):
        config = api.KeyValueConfig(
            bucket=b.name,
            history=b.history,
            ttl=b.ttl,
            replicas=replicas,
            storage=api.StorageType.FILE,
        )
        try:
            await js.key_value(b.name)
        except BucketNotFoundError:
            await js.create_key_value(config)
            log.info("created bucket %s", b.name)
    for s in STREAMS:
        config2 = api.StreamConfig(
            name=s.name,
            subjects=list(s.subjects),
            num_replicas=replicas,
            storage=api.StorageType.FILE,
            max_age=s.max_age,
            duplicate_window=120.0,  # the Idempotency-Key window of chat.send
        )
        try:
            await js.stream_info(s.name)
        except NotFoundError:
            await js.add_stream(config2)
            log.info("created stream %s", s.name)
