"""A test hook at the gateway's await points, to make a race deterministic.

Real code awaits `checkpoint("kv_sub.feed")` right after an await whose outcome another
task could overtake (a subscription's setup, the handshake's user read). Unused, that is
one falsy check. A test holds the next pass through a point, does what should race with it
(revoke, unsubscribe, close), then releases it:

    hold = gateway.hub.checkpoint.hold("kv_sub.feed")
    ...send the kv_sub...
    await hold.reached()
    ...revoke...
    hold.release()
"""

from __future__ import annotations

import asyncio


class Hold:
    def __init__(self) -> None:
        self._reached = asyncio.Event()
        self._released = asyncio.Event()

    async def reached(self, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            await self._reached.wait()

    def release(self) -> None:
        self._released.set()


class Checkpoints:
    def __init__(self) -> None:
        self._holds: dict[str, Hold] = {}

    def hold(self, name: str) -> Hold:
        """The next pass through `name` waits until the returned hold is released."""
        hold = self._holds[name] = Hold()
        return hold

    async def __call__(self, name: str) -> None:
        if not self._holds:
            return
        hold = self._holds.pop(name, None)
        if hold is not None:
            hold._reached.set()
            await hold._released.wait()
