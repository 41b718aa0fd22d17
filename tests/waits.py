"""Bounded waits for conditions that have no event to await, and the frame splitter.

Every suite uses these instead of a loop of its own: `until` polls a condition, and on
timeout raises AssertionError naming what it waited for, so the wait is itself the check.
The timeout bounds the wait; it is not a speed assertion.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec


async def until(cond: Callable[[], bool], what: str, timeout: float = 20.0) -> float:
    """Bounded polling on a condition with no event to await; the seconds it took."""
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)
    return time.monotonic() - t0


async def until_async(
    cond: Callable[[], Awaitable[bool]], what: str, timeout: float = 20.0
) -> float:
    """`until` for a condition that has to ask (a NATS request, an HTTP call)."""
    t0 = time.monotonic()
    while not await cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)
    return time.monotonic() - t0


def split(frame: str | bytes) -> list[dict[str, Any]]:
    """The envelopes of one gateway frame (newline-delimited JSON)."""
    text = frame.decode() if isinstance(frame, bytes) else frame
    return [msgspec.json.decode(line) for line in text.split("\n") if line]

