"""One js_sub's place in a stream, served by the process's shared history and tail.

    BEHIND ──caught up with the tail──▶ LIVE
      ▲                                  │
      └── no room, ack window full, ─────┘
          ack wait expired

`last`: every message matching the filter up to this sequence has been handed on (or lay
before the start). BEHIND, the cursor reads history blocks from `last + 1`, at the pace
of the connection (room in the outbox, the ack window), while the tail's matching messages
are kept in a small buffer. A block read when nothing more matched in the stream says up
to which sequence it is complete (`mark`); if the buffer holds every matching message
after that, the buffer is sent and the cursor is LIVE: the tail's messages go straight to
the connection, each encoded once for all cursors. A LIVE cursor that cannot take a
message (no room, window full) does not drop it and is not closed: it falls BEHIND and
reads it from history, so a slow reader slows down, as the protocol promises.

With acks, a message not acked within the ack wait is sent again: the cursor rewinds to
just before the oldest unacked message (what was acked after it comes again too: clients
dedupe by `seq`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from shared.tasks import cancel_and_wait
from ws_gateway.history import Block, History, HistoryUnavailable, aligned
from ws_gateway.jsfeed import JsTail

log = logging.getLogger("ws_gateway.jscursor")

BUFFER_BYTES = 256 * 1024  # the tail's messages kept while catching up (then: read on)
RETRY = (0.1, 2.0)  # history read retry backoff, first and largest (seconds)


class Cursor:
    def __init__(
        self,
        *,
        stream: str,
        filter: str,
        begin: int,
        prefix: bytes,
        history: History,
        tail: JsTail,
        deliver: Callable[[bytes], bool],
        deliver_many: Callable[[list[bytes]], bool],
        room: Callable[[], int],
        wait_room: Callable[[bool], Awaitable[int]],
        half: int,
        gate: Callable[[], Awaitable[None]],
        gate_open: Callable[[], bool],
        ack_window: int | None,
        ack_wait: float,
        on_handed: Callable[[int, int], None] | None = None,
    ) -> None:
        self.stream, self.filter = stream, filter
        self.last = begin - 1
        self.live = False
        self._prefix = prefix
        self._history, self._tail = history, tail
        self._deliver, self._room, self._wait_room, self._half = deliver, room, wait_room, half
        self._deliver_many = deliver_many
        self._gate, self._gate_open = gate, gate_open
        self._window, self._ack_wait = ack_window, ack_wait
        self._on_handed = on_handed
        self.pending: dict[int, float] = {}  # ack mode: seq → when it was handed on
        self._behind = asyncio.Event()
        self._behind.set()
        self._acked = asyncio.Event()
        self._buffer: list[tuple[int, bytes]] = []
        self._buffer_bytes = 0
        self._buffer_from: int | None = None  # None: the buffer is not complete
        self._task: asyncio.Task[None] | None = None
        self._epoch = 0  # rewinds so far

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        self._deliver = _closed
        self._deliver_many = _closed
        await cancel_and_wait(self._task)

    # ------------------------------------------------------------------ live

    def on_tail(self, seq: int, body: bytes) -> None:
        if seq <= self.last:
            return  # history handed it on already
        if not self.live:
            if self._buffer_from is not None and seq > self._buffer_from:
                self._buffer.append((seq, body))
                self._buffer_bytes += len(self._prefix) + len(body)
                if self._buffer_bytes > BUFFER_BYTES:
                    self._drop_buffer()
            return
        frame = self._prefix + body
        if (self._window is not None and len(self.pending) >= self._window) or (
            self._room() - len(frame) < self._half
        ):
            self._fall_behind()
            return
        if self._deliver(frame):
            self._handed(seq)

    def _handed(self, seq: int) -> None:
        self.last = seq
        if self._window is not None:
            self.pending[seq] = time.monotonic()
        if self._on_handed is not None:
            self._on_handed(seq, seq)

    def _fall_behind(self) -> None:
        self.live = False
        self._drop_buffer()
        self._behind.set()

    def _drop_buffer(self) -> None:
        self._buffer, self._buffer_bytes, self._buffer_from = [], 0, None

    # ------------------------------------------------------------------ acks

    def ack(self, seq: int) -> bool:
        """False when `seq` is not awaiting an ack."""
        if self.pending.pop(seq, None) is None:
            return False
        self._acked.set()
        return True

    def _expired(self) -> float | None:
        """Rewind if the oldest unacked message waited out the ack wait; else how long
        until it will have (None: nothing is waiting)."""
        if not self.pending:
            return None
        oldest = min(self.pending)
        left = self.pending[oldest] + self._ack_wait - time.monotonic()
        if left > 0:
            return left
        self.last = min(self.last, oldest - 1)
        self._epoch += 1  # a catch-up under way starts again from here
        self.pending.clear()
        self._acked.set()
        self._fall_behind()
        return None

    # ------------------------------------------------------------------ catching up

    async def _run(self) -> None:
        try:
            while True:
                while not self._behind.is_set():
                    wait = self._expired()
                    if wait is None and self._window is not None:
                        # Nothing unacked now; live messages may become so without waking us.
                        wait = self._ack_wait / 4
                    try:
                        async with asyncio.timeout(wait):
                            await self._behind.wait()
                    except TimeoutError:
                        pass
                while not await self._catch_up(self._epoch):
                    pass  # rewound meanwhile (ack wait): again from the rewound point
        except _Stopped:
            return  # the subscription takes nothing more: its end stops this task

    async def _catch_up(self, epoch: int) -> bool:
        """Read history from `last + 1` until caught up with the tail, then go LIVE (True).
        False when a rewind happened meanwhile (`epoch` moved): nothing read since counts.
        Every await is followed by that check: a rewind can happen during any of them."""
        self._drop_buffer()
        self._buffer_from = self._tail.position
        start = aligned(self.last + 1)
        backoff = RETRY[0]
        while True:
            await self._ready()
            try:
                block = await self._history.block(
                    self.stream, self.filter, start, lambda: self._tail.position
                )
            except HistoryUnavailable as e:
                log.info("history retry", extra={"stream": self.stream, "error": str(e)})
                await asyncio.sleep(backoff)  # NATS away or the stream gone (the tail says)
                backoff = min(backoff * 2, RETRY[1])
                if self._epoch != epoch:
                    return False
                continue
            backoff = RETRY[0]
            if self._epoch != epoch:
                return False
            i = block.after(self.last)
            while i < len(block.seqs):
                room = await self._ready()
                if self._epoch != epoch:
                    return False
                j = self._push(block, i, room)
                if j == i and not self._window_full():
                    # One message larger than the room: it goes alone into an empty queue.
                    await self._wait_room(True)
                    await self._ready_now()
                    if self._epoch != epoch:
                        return False
                    j = self._push(block, i, 0, one=True)
                i = j
            if not block.at_end:
                start = block.next
                continue
            if block.mark > self.last:
                # Complete up to `mark` on the server that answered, which may be a replica
                # behind the tail: the stream's leader confirms nothing lies in between.
                try:
                    nxt = await self._history.leader_next(self.stream, self.filter, self.last + 1)
                except HistoryUnavailable:
                    nxt = self.last + 1  # unconfirmed: read again
                if self._epoch != epoch:
                    return False
                if nxt is not None and nxt <= block.mark:
                    start = self.last + 1  # the replica was behind: read again
                    await asyncio.sleep(0)
                    continue
            self.last = max(self.last, block.mark)
            if self._buffer_from is None or block.mark < self._buffer_from:
                # The tail ran ahead of the buffer: keep a new one and read on.
                self._drop_buffer()
                self._buffer_from = self._tail.position
                start = self.last + 1
                continue
            await self._ready()  # the buffer (≤ BUFFER_BYTES of frames) fits half the room
            if self._epoch != epoch:
                return False
            if self._buffer_from is None:
                self._buffer_from = self._tail.position  # overflowed meanwhile: read on
                start = self.last + 1
                continue
            # From here to LIVE, nothing awaits: no tail message can slip between.
            run = [(seq, body) for seq, body in self._buffer if seq > self.last]
            if run:
                if not self._deliver_many([self._prefix + body for _, body in run]):
                    raise _Stopped
                self._handed_run([seq for seq, _ in run])
            self._drop_buffer()
            self.live = True
            self._behind.clear()
            return True

    def _window_full(self) -> bool:
        return self._window is not None and len(self.pending) >= self._window

    def _push(self, block: Block, i: int, room: int, *, one: bool = False) -> int:
        """Hand on the block's messages from index `i` while they fit in `room` (`one`:
        exactly one, whatever its size), as one batch; the index to go on from."""
        i = max(i, block.after(self.last))
        if one:
            k = min(i + 1, len(block.seqs))
        else:
            k = block.fitting(i, room, len(self._prefix))
        if self._window is not None:
            k = min(k, i + max(0, self._window - len(self.pending)))
        if k <= i:
            return i
        prefix = self._prefix
        if not self._deliver_many([prefix + body for body in block.bodies[i:k]]):
            raise _Stopped  # the subscription ended: none of these was handed on
        self._handed_run(block.seqs[i:k])
        return k

    def _handed_run(self, seqs: list[int]) -> None:
        self.last = seqs[-1]
        if self._window is not None:
            self.pending.update(dict.fromkeys(seqs, time.monotonic()))
        if self._on_handed is not None:
            self._on_handed(seqs[0], seqs[-1])

    async def _ready(self) -> int:
        """Wait until this cursor may hand on more: deliveries not held (capabilities being
        re-read), an ack window with room, room in the outbox; all three at once, when it
        returns (the room in bytes)."""
        while True:
            await self._gate()
            while self._window_full():
                self._acked.clear()
                try:
                    async with asyncio.timeout(self._expired()):
                        await self._acked.wait()
                except TimeoutError:
                    pass
            room = await self._wait_room(False)
            if self._gate_open() and not self._window_full():
                return room

    async def _ready_now(self) -> None:
        """After waiting for an empty queue: the gate still open (else wait for it)."""
        while not self._gate_open():
            await self._gate()


class _Stopped(Exception):
    """The subscription takes nothing more (it ended): the cursor stops."""


def _closed(frames: object) -> bool:
    return False
