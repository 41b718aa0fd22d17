"""A bounded per-connection outbox with one writer task, flushed once per loop tick.

Producers (NATS callbacks) call `push()`, which never awaits: the frame is queued or, if
the queue would exceed its byte bound, the connection is marked slow and closed with
`backpressure`. The bound is in bytes (SEND_QUEUE_BYTES, 1 MiB by default, as Centrifugo's
per-client queue), not envelopes: a thousand 100 KiB articles are 100 MiB, a burst of two
thousand 200-byte chat lines is 400 KiB. Pushed
outboxes are flushed together by the process's `Flusher` once per event-loop tick: what
each one queued is joined into one newline-delimited frame (docs/protocol.md, Envelope) and
written straight to the socket when its buffer has room — no task switch per connection.
Only a socket whose buffer is full is left to the writer task, which awaits the drain and
gives up (backpressure) on a write that takes longer than the write timeout.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from shared.tasks import cancel_and_wait
from ws_gateway import metrics

log = logging.getLogger("ws_gateway.outbox")

MAX_BATCH_BYTES = 1 << 20

SendFn = Callable[[bytes], Awaitable[None]]
CanSendFn = Callable[[], bool]
SendNowFn = Callable[[bytes], None]


class SlowTransport(Exception):
    """Raised by a transport's send when its client is not keeping up (full poll buffer)."""


SlowFn = Callable[[str], None]


class Flusher:
    """Flushes every outbox pushed to during one event-loop tick, in one callback."""

    __slots__ = ("_dirty", "_loop", "_scheduled")

    def __init__(self) -> None:
        self._dirty: list[Outbox] = []
        self._scheduled = False
        self._loop = asyncio.get_running_loop()

    def mark(self, outbox: Outbox) -> None:
        self._dirty.append(outbox)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        dirty, self._dirty = self._dirty, []
        frames = 0
        for outbox in dirty:
            frames += outbox.flush_now()
        if frames:
            metrics.FRAMES_OUT.inc(frames)  # once per tick, not per connection


class Outbox:
    """Bounded queue of envelopes for one connection.

    Waiting points (the writer's wake-up, room for pulled sources) are futures created
    only when someone waits: an idle connection holds no asyncio.Event
    (each carries a deque) and no task.
    """

    __slots__ = (
        "_buffered",
        "_can_send",
        "_closed",
        "_delivered",
        "_dirty",
        "_flusher",
        "_on_slow",
        "_queue",
        "_room_waiter",
        "_send",
        "_send_now",
        "_size",
        "_task",
        "_unacked",
        "_wake",
        "_write_timeout",
        "_writing",
        "max_bytes",
        "pushed",
        "track",
        "written",
    )

    def __init__(
        self,
        send: SendFn,
        on_slow: SlowFn,
        max_bytes: int,
        write_timeout: float,
        *,
        flusher: Flusher | None = None,
        can_send: CanSendFn | None = None,
        send_now: SendNowFn | None = None,
        buffered: Callable[[], int] | None = None,
        unacked: Callable[[], int | None] | None = None,
    ) -> None:
        self._send = send
        self._flusher = flusher if can_send and send_now else None
        self._can_send = can_send
        self._send_now = send_now
        self._dirty = False
        self._writing = False
        self._on_slow = on_slow
        self.max_bytes = max_bytes
        self._buffered = buffered  # what the transport holds beyond the socket (long poll)
        self._size = 0  # bytes queued
        self._write_timeout = write_timeout
        self._queue: list[bytes] = []  # drained whole: a list is smaller than a deque
        self._wake: asyncio.Future[None] | None = None
        self._room_waiter: asyncio.Future[None] | None = None
        self._closed = False
        self._task: asyncio.Task[None] | None = None
        # Bytes of frames ever queued / ever handed to the transport: a frame pushed when
        # `pushed` reached P has been written once `delivered` reaches P (durable floors).
        self.pushed = 0
        self.written = 0
        self._unacked = unacked  # bytes written but not acknowledged by the client's TCP
        self._delivered = 0
        self.track = False  # read `delivered` after each write (a durable needs it)

    def start(self) -> None:
        if self._flusher is None:
            self._start_writer()

    def _start_writer(self) -> None:
        # With a flusher the writer task exists only once a socket has been too full to
        # write without waiting: most connections never need one.
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._writer())

    def __len__(self) -> int:
        return len(self._queue)

    @staticmethod
    def _resolve(fut: asyncio.Future[None] | None) -> None:
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _wake_writer(self) -> None:
        self._start_writer()
        self._resolve(self._wake)

    def _held(self) -> int:
        return self._size + (self._buffered() if self._buffered is not None else 0)

    def _after_write(self) -> None:
        if self._room_waiter is not None and self._held() <= self.max_bytes // 2:
            self._resolve(self._room_waiter)

    def room_freed(self) -> None:
        """The transport handed buffered bytes to the client (a long poll's GET)."""
        self._after_write()

    def push(self, frame: bytes) -> bool:
        """Queue one envelope. False (and the connection is being closed) when full. One
        envelope larger than the whole bound is still taken into an empty queue."""
        if self._closed:
            return False
        if self._size + len(frame) > self.max_bytes and self._queue:
            self._closed = True
            self._on_slow("send queue full")
            return False
        self._queue.append(frame)
        self._queued(len(frame))
        return True

    def push_many(self, frames: list[bytes]) -> bool:
        """`push` for a run of envelopes (a paced source sized it to the room it was given:
        beyond the bound, the connection is closed as for one envelope)."""
        if self._closed:
            return False
        size = sum(map(len, frames))
        if self._size + size > self.max_bytes and (self._queue or len(frames) > 1):
            self._closed = True
            self._on_slow("send queue full")
            return False
        self._queue.extend(frames)
        self._queued(size)
        return True

    def _queued(self, size: int) -> None:
        """Account for `size` bytes just queued and have them written: by the flusher at
        the end of this tick, or by the writer task when one is waiting on the socket."""
        self._size += size
        self.pushed += size
        if self._flusher is not None and not self._writing:
            if not self._dirty:
                self._dirty = True
                self._flusher.mark(self)
        else:
            self._wake_writer()

    def _take(self) -> bytes:
        queue = self._queue
        if len(queue) == 1:
            data = queue[0]
            queue.clear()
            self._size = 0
            return data
        size = 0
        for i, frame in enumerate(queue):
            size += len(frame) + 1
            if size >= MAX_BATCH_BYTES:
                data = b"\n".join(queue[: i + 1])
                del queue[: i + 1]
                self._size -= size - (i + 1)
                return data
        data = b"\n".join(queue)
        queue.clear()
        self._size = 0
        return data

    def flush_now(self) -> int:
        """Write what is queued without awaiting, while the socket buffer has room.
        Returns the number of frames written."""
        self._dirty = False
        if self._closed or self._writing:
            return 0
        assert self._can_send is not None and self._send_now is not None
        queue = self._queue
        frames = 0
        while queue:
            if not self._can_send():
                self._wake_writer()  # the writer task awaits the drain, with the timeout
                return frames
            before = self._size
            try:
                self._send_now(self._take())
            except SlowTransport as e:
                self._closed = True
                self._on_slow(str(e))
                return frames
            except Exception:
                return frames  # the connection is closing; its reader notices
            self.written += before - self._size
            frames += 1
        self._after_write()
        if self.track:
            self.delivered  # noqa: B018 -- read now, while the socket can say
        return frames

    @property
    def delivered(self) -> int:
        """Bytes of frames the client's end has received: written, less what the transport
        still holds (a long poll's buffer) and what the client's TCP has not acknowledged.
        Read while the socket is open; once it is closed, the last value read (a write
        into a connection the client has just cut succeeds, yet never arrives)."""
        unacked = self._unacked() if self._unacked is not None else 0
        if unacked is None:
            return self._delivered
        held = self._buffered() if self._buffered is not None else 0
        self._delivered = max(self._delivered, self.written - held - unacked)
        return self._delivered

    @property
    def delivered_seen(self) -> int:
        """`delivered` as last read (no system call)."""
        return self._delivered

    def room(self) -> int:
        """Bytes that may still be queued before the bound (negative: over it)."""
        return self.max_bytes - self._held()

    @property
    def queued_bytes(self) -> int:
        return self._size

    async def wait_room(self, whole: bool = False) -> int:
        """Wait until the queue is at most half full (`whole`: empty), then the room left in
        bytes: what a pulled, slowable source may ask NATS for next."""
        limit = 0 if whole else self.max_bytes // 2
        while not self._closed and self._held() > limit:
            if self._room_waiter is None or self._room_waiter.done():
                self._room_waiter = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._room_waiter)
        return self.max_bytes - self._held()

    async def _writer(self) -> None:
        loop = asyncio.get_running_loop()
        queue = self._queue
        while True:
            if not queue:
                self._wake = loop.create_future()
                await self._wake
                self._wake = None
            self._writing = True
            while queue:
                before = self._size
                data = self._take()
                taken = before - self._size
                try:
                    async with asyncio.timeout(self._write_timeout):
                        await self._send(data)
                except (TimeoutError, SlowTransport) as e:
                    self._closed = True
                    self._on_slow("write timed out" if isinstance(e, TimeoutError) else str(e))
                    return
                self.written += taken
                if self.track:
                    self.delivered  # noqa: B018 -- read now, while the socket can say
                metrics.FRAMES_OUT.inc()
                self._after_write()
            self._writing = False

    def stop_accepting(self) -> None:
        self._closed = True
        self._resolve(self._room_waiter)

    async def close(self, final: bytes | None = None) -> None:
        """Drop what is queued and stop the writer; then send `final` (an error frame),
        best effort within the write timeout: the client may be why we are closing."""
        self.stop_accepting()
        self._queue.clear()
        self._size = 0
        await cancel_and_wait(self._task)
        self._task = None
        if final is not None:
            try:
                async with asyncio.timeout(self._write_timeout):
                    await self._send(final)
            except Exception:
                pass
