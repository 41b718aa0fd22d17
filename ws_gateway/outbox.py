"""A bounded per-connection outbox with one writer task.

Producers (NATS callbacks) call `push()`, which never awaits: the frame is queued or, if
the queue is full, the connection is marked slow and closed with `backpressure`. The
writer joins everything queued into one newline-delimited frame (PROTOCOL.md, Envelope),
so a burst costs one socket write, and gives up on a write that takes longer than the
write timeout.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable

from ws_gateway import metrics

log = logging.getLogger("ws_gateway.outbox")

MAX_BATCH_BYTES = 1 << 20

SendFn = Callable[[bytes], Awaitable[None]]


class SlowTransport(Exception):
    """Raised by a transport's send when its client is not keeping up (full poll buffer)."""


SlowFn = Callable[[str], None]


class Outbox:
    __slots__ = (
        "_closed",
        "_drained",
        "_has_room",
        "_on_slow",
        "_queue",
        "_send",
        "_task",
        "_wake",
        "_write_timeout",
        "maxsize",
    )

    def __init__(self, send: SendFn, on_slow: SlowFn, maxsize: int, write_timeout: float) -> None:
        self._send = send
        self._on_slow = on_slow
        self.maxsize = maxsize
        self._write_timeout = write_timeout
        self._queue: collections.deque[bytes] = collections.deque()
        self._wake = asyncio.Event()
        self._has_room = asyncio.Event()
        self._has_room.set()
        self._drained = asyncio.Event()
        self._drained.set()
        self._closed = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._writer())

    def __len__(self) -> int:
        return len(self._queue)

    def push(self, frame: bytes) -> bool:
        """Queue one envelope. False (and the connection is being closed) when full."""
        if self._closed:
            return False
        if len(self._queue) >= self.maxsize:
            self._closed = True
            self._on_slow("send queue full")
            return False
        self._queue.append(frame)
        self._drained.clear()
        if len(self._queue) >= self.maxsize // 2:
            self._has_room.clear()
        self._wake.set()
        return True

    def room(self) -> int:
        return self.maxsize - len(self._queue)

    async def wait_room(self, n: int) -> None:
        """Wait until at least `n` envelopes fit (used by pulled, slowable sources)."""
        n = min(n, self.maxsize // 2)
        while not self._closed and self.room() < n:
            self._has_room.clear()
            await self._has_room.wait()

    async def _writer(self) -> None:
        queue = self._queue
        while True:
            await self._wake.wait()
            self._wake.clear()
            while queue:
                if len(queue) == 1:
                    data = queue.popleft()
                else:
                    parts: list[bytes] = []
                    size = 0
                    while queue and size < MAX_BATCH_BYTES:
                        frame = queue.popleft()
                        parts.append(frame)
                        size += len(frame) + 1
                    data = b"\n".join(parts)
                if len(queue) < self.maxsize // 2:
                    self._has_room.set()
                try:
                    async with asyncio.timeout(self._write_timeout):
                        await self._send(data)
                except (TimeoutError, SlowTransport) as e:
                    self._closed = True
                    self._on_slow("write timed out" if isinstance(e, TimeoutError) else str(e))
                    return
                metrics.FRAMES_OUT.inc()
            self._drained.set()

    def stop_accepting(self) -> None:
        self._closed = True
        self._has_room.set()

    async def flush(self, grace: float) -> None:
        """Best effort: let the writer send what is queued, for a final error frame."""
        if self._task is None or self._task.done():
            return
        try:
            async with asyncio.timeout(grace):
                await self._drained.wait()
        except TimeoutError:
            pass

    async def close(self) -> None:
        self.stop_accepting()
        self._queue.clear()
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
            self._task = None
