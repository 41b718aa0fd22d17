"""Task ownership: whoever starts a task cancels and awaits it."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


async def cancel_and_wait(task: asyncio.Future[Any] | None) -> None:
    """Cancel `task` and wait until it has finished; its outcome is dropped (its owner is
    stopping it). A no-op for None, a finished task, or the calling task itself."""
    if task is None or task is asyncio.current_task():
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
