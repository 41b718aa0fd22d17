"""Task ownership: whoever starts a task cancels and awaits it."""

from __future__ import annotations

import asyncio
from typing import Any

RECANCEL = 0.5  # seconds before a cancel that changed nothing is sent again


async def cancel_and_wait(task: asyncio.Future[Any] | None) -> None:
    """Cancel `task` and wait until it has finished; its outcome is dropped (its owner is
    stopping it). A no-op for None, a finished task, or the calling task itself. The
    caller's own cancellation propagates (awaiting the task would swallow it with the
    task's: an `asyncio.timeout` around the caller would then never fire).

    A task still running RECANCEL seconds after a cancel is cancelled again: Python 3.11's
    `asyncio.wait_for` returns the result instead of raising when the cancel lands as its
    future completes (gh-86296; nats-py's requests use it), and a loop in that task then
    runs on forever (seen: a test's sampler loop kept its owner waiting past every
    deadline)."""
    if task is None or task is asyncio.current_task():
        return
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=RECANCEL)
    if not task.cancelled():
        task.exception()  # retrieved: dropped, not logged as never retrieved
