"""Task ownership: whoever starts a task cancels and awaits it."""

from __future__ import annotations

import asyncio
from typing import Any


async def cancel_and_wait(task: asyncio.Future[Any] | None) -> None:
    """Cancel `task` and wait until it has finished; its outcome is dropped (its owner is
    stopping it). A no-op for None, a finished task, or the calling task itself. The
    caller's own cancellation propagates (awaiting the task would swallow it with the
    task's: an `asyncio.timeout` around the caller would then never fire)."""
    if task is None or task is asyncio.current_task():
        return
    task.cancel()
    await asyncio.wait({task})
    if not task.cancelled():
        task.exception()  # retrieved: dropped, not logged as never retrieved
