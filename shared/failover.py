"""Riding out a NATS failover: which errors mean "NATS is busy electing or reconnecting",
and a retry loop that waits them out until a deadline.

On the 3-node cluster a killed node costs a few seconds of leader elections and
reconnects: requests time out, meet no responders or get 503 "cluster not available". None
of that is the caller's fault or an internal error. Writes are retried with the same
`Nats-Msg-Id` (JetStream's dedupe stores them once however many tries reach the server),
reads and setups simply again; only past the deadline is the caller told (503, or
`unavailable` on the WebSocket).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import nats.errors
from nats.js.errors import APIError, NoStreamResponseError, ServiceUnavailableError

T = TypeVar("T")

# JetStream error codes of a cluster or consumer that is offline for now.
JS_UNAVAILABLE = frozenset({10008, 10009, 10119, 10195})
OUTAGES: tuple[type[Exception], ...] = (
    ServiceUnavailableError,
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.StaleConnectionError,
    NoStreamResponseError,  # a JetStream publish that met no responders: no leader now
)
# Each try is bounded by this (seconds), so that a request to a leader that just died is
# asked again soon instead of after nats-py's 5 s default; a write whose ack was merely
# slow is then stored once (dedupe), a read repeated.
TRY_TIMEOUT = 2.0
# A read of a stream's leader gives up after this (seconds) while the leader is being
# elected; the caller then asks any replica (a direct get) instead.
LEADER_TRY = 0.5
_BACKOFF_FIRST, _BACKOFF_MAX = 0.05, 0.5


class Unavailable(Exception):
    """NATS could not serve the request within the failover wait."""

    def __init__(self, kind: str, cause: BaseException) -> None:
        super().__init__(f"{kind}: {type(cause).__name__}")
        self.kind, self.cause = kind, cause


def transient(e: BaseException) -> bool:
    """NATS is electing a leader, reconnecting or briefly overloaded: the same request
    may succeed in a moment."""
    if isinstance(e, APIError):
        # A 503 with a code of its own (storage full: 10077, a limit) is no failover: only
        # the codes of an offline cluster or consumer, or a bare 503 (no responders).
        code = getattr(e, "err_code", None)
        if code is not None:
            return code in JS_UNAVAILABLE
        return isinstance(e, ServiceUnavailableError) or getattr(e, "code", None) == 503
    if isinstance(e, OUTAGES):
        return True
    return isinstance(e, asyncio.TimeoutError)


def backoff(attempt: int) -> float:
    """The pause before try `attempt` + 1 (from 0): 50 ms doubling to 0.5 s."""
    return float(min(_BACKOFF_FIRST * (2**attempt), _BACKOFF_MAX))


async def ride_out(
    op: Callable[[], Awaitable[T]],
    wait: float,
    kind: str,
    *,
    on_retry: Callable[[str], None] | None = None,
    try_timeout: float = TRY_TIMEOUT,
) -> T:
    """`op()` until it succeeds, retried on transient errors for up to `wait` seconds;
    then `Unavailable`. Any other error is raised at once. `op` must be safe to repeat
    (a read, or a write carrying its own Nats-Msg-Id)."""
    deadline = time.monotonic() + wait
    attempt = 0
    while True:
        try:
            async with asyncio.timeout(try_timeout):
                return await op()
        except Exception as e:
            if not transient(e):
                raise
            pause = backoff(attempt)
            if time.monotonic() + pause >= deadline:
                raise Unavailable(kind, e) from e
        if on_retry is not None:
            on_retry(kind)
        await asyncio.sleep(pause)  # a pause between tries, not synchronisation
        attempt += 1
