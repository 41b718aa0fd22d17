"""shared/tasks.cancel_and_wait: the task is stopped and awaited, its outcome dropped, and
the caller's own cancellation (a timeout around it) is never swallowed."""

from __future__ import annotations

import asyncio

import pytest

from shared.tasks import cancel_and_wait


async def test_the_task_is_cancelled_and_finished_its_outcome_dropped() -> None:
    started = asyncio.Event()

    async def forever() -> None:
        started.set()
        await asyncio.Event().wait()

    async def fails() -> None:
        raise ValueError("dropped")

    task = asyncio.create_task(forever())
    await started.wait()
    await cancel_and_wait(task)
    assert task.cancelled()
    failed = asyncio.create_task(fails())
    await asyncio.wait({failed})
    await cancel_and_wait(failed)  # finished with an error: nothing raised
    await cancel_and_wait(None)


async def test_a_timeout_around_the_caller_fires_while_the_task_is_slow_to_stop() -> None:
    """A task that takes its time to stop: the caller's deadline still ends the wait (the
    task is left to finish on its own), as TimeoutError, not as a silent return."""
    running, stopping, release = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def slow_to_stop() -> None:
        try:
            running.set()
            await asyncio.Event().wait()
        finally:
            stopping.set()
            await release.wait()  # cleanup that outlasts the caller's deadline

    task = asyncio.create_task(slow_to_stop())
    await running.wait()  # started: its finally runs on the cancel
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await cancel_and_wait(task)
    assert stopping.is_set() and not task.done()
    release.set()
    await asyncio.wait({task})
    assert task.cancelled()


async def test_a_cancel_that_wait_for_swallowed_is_sent_again() -> None:
    """Python 3.11's asyncio.wait_for returns its future's result when the cancel arrives
    as that future completes (gh-86296): a loop of them runs on. cancel_and_wait cancels
    again, and the task ends (bounded here, so a regression fails instead of hanging)."""
    futures: asyncio.Queue[asyncio.Future[None]] = asyncio.Queue()
    rounds = 0

    async def requests_in_a_loop() -> None:
        nonlocal rounds
        while True:
            f = asyncio.get_running_loop().create_future()
            futures.put_nowait(f)
            await asyncio.wait_for(f, 30)
            rounds += 1

    task = asyncio.create_task(requests_in_a_loop())
    first = await futures.get()
    first.set_result(None)  # the reply lands ...
    async with asyncio.timeout(10):
        await cancel_and_wait(task)  # ... with the cancel, in the same loop iteration
    assert task.cancelled()
    assert rounds == 1  # the first cancel was swallowed: the loop went round once more
