"""Shared JetStream history: catch-up reads served from blocks read once per process.

A `js_sub` that starts in the past reads the stream through JetStream direct get batch
(`$JS.API.DIRECT.GET.<stream>` with `seq`, `batch`, `next_by_subj`; the stream needs
`allow_direct`), in blocks of at most BLOCK messages or BLOCK_BYTES. Every subscription
reading the same (stream, filter) from the same position reads the same block, once per
process: a block being read is awaited by all who want it, a block read is kept while the
cache's byte bound (`js_history_bytes`) allows, least recently used first out. A first read
starts at the position rounded down to a multiple of BLOCK, so subscriptions that start at
different points of one stretch share its blocks (each skips what lies before its start).

A block holds each message's `js_body` (envelope.py), encoded once; a subscription sends
its own prefix before it. Blocks hold no consumer and no server state: a NATS outage fails
the read, and the reader simply asks again.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import json
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from shared import envelope, logs

log = logging.getLogger("ws_gateway.history")

BLOCK = 1000  # messages per read (and the alignment of first reads)
BLOCK_BYTES = 1 << 20  # payload bytes per read: a block of large messages is cut short
READ_TIMEOUT = 5.0


class HistoryUnavailable(Exception):
    """A block could not be read (NATS down, the stream gone, direct get refused)."""


@dataclass(slots=True)
class Block:
    stream: str
    filter: str
    start: int  # the first sequence this block covers
    seqs: list[int] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    ends: list[int] = field(default_factory=lambda: [0])  # ends[i]: bytes of bodies[:i]
    next: int = 0  # where the stream continues after this block
    at_end: bool = False  # nothing matching was left in the stream when it was read
    mark: int = 0  # at_end: every matching message up to this sequence is in the block
    size: int = 0

    def fitting(self, i: int, room: int, extra: int) -> int:
        """The end k of the longest run i..k whose bodies, `extra` bytes more each, fit
        in `room` bytes."""
        ends, base = self.ends, self.ends[i]
        lo, hi = i, len(self.seqs)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if ends[mid] - base + (mid - i) * extra <= room:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def after(self, seq: int) -> int:
        """Index of the first message with a sequence above `seq`."""
        lo, hi = 0, len(self.seqs)
        while lo < hi:
            mid = (lo + hi) // 2
            if self.seqs[mid] <= seq:
                lo = mid + 1
            else:
                hi = mid
        return lo


def aligned(seq: int) -> int:
    """Where a first read for `seq` starts: its block's boundary (1, 1001, 2001, …)."""
    return seq - (seq - 1) % BLOCK


class History:
    """The process's history blocks, bounded in bytes (see the module docstring)."""

    def __init__(self, nc: NATS, bound: int) -> None:
        self._nc = nc
        self.bound = bound
        self._cache: OrderedDict[tuple[str, str, int], Block] = OrderedDict()
        self._reading: dict[tuple[str, str, int], asyncio.Future[Block]] = {}
        self.cached_bytes = 0
        self.reads = 0  # direct get requests made (a measure of sharing)
        self._sub: Subscription | None = None
        self._prefix = ""
        self._ids = itertools.count()
        self._open: dict[str, _Read] = {}
        # created, first seq, deleted count: as last seen by a subscription's setup
        self._streams: dict[str, tuple[object, int, int]] = {}

    async def block(self, stream: str, filter: str, start: int, mark: Callable[[], int]) -> Block:
        """The block of (stream, filter) that starts at `start`. `mark()` is read as the
        request leaves: a sequence the stream is known to hold everything up to (the
        stream's tail position), recorded in the block. Raises HistoryUnavailable."""
        key = (stream, filter, start)
        found = self._cache.get(key)
        if found is not None:
            self._cache.move_to_end(key)
            return found
        reading = self._reading.get(key)
        if reading is None:
            reading = asyncio.get_running_loop().create_future()
            self._reading[key] = reading
            task = asyncio.get_running_loop().create_task(
                self._fill(key, reading, mark), context=logs.detached()
            )
            task.add_done_callback(_quiet)
        # Shielded: one reader giving up (its subscription ended) does not fail the others.
        return await asyncio.shield(reading)

    async def _fill(
        self, key: tuple[str, str, int], out: asyncio.Future[Block], mark: Callable[[], int]
    ) -> None:
        try:
            block = await self._read(*key, mark)
        except Exception as e:
            out.set_exception(e if isinstance(e, HistoryUnavailable) else HistoryUnavailable(e))
            out.exception()  # retrieved: nobody may be waiting any more
            return
        finally:
            self._reading.pop(key, None)
        if not block.at_end:  # a block at the stream's end grows: read it afresh next time
            self._keep(key, block)
        out.set_result(block)

    def _keep(self, key: tuple[str, str, int], block: Block) -> None:
        if block.size > self.bound:
            return
        self._cache[key] = block
        self.cached_bytes += block.size
        while self.cached_bytes > self.bound:
            _, old = self._cache.popitem(last=False)
            self.cached_bytes -= old.size

    def check(self, stream: str, created: object, first: int, deleted: int) -> None:
        """What the stream's info says now: a stream recreated (sequences now name other
        messages) or with messages deleted inside it (a moderation delete, a subject purge)
        loses its blocks; one whose first sequence moved (purged, aged out) loses the
        blocks below it."""
        seen = self._streams.get(stream)
        self._streams[stream] = (created, first, deleted)
        if seen is None or seen == (created, first, deleted):
            return
        gone = seen[0] != created or seen[2] != deleted
        for key in [k for k in self._cache if k[0] == stream]:
            if gone or self._cache[key].next <= first:
                self.cached_bytes -= self._cache.pop(key).size

    async def close(self) -> None:
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception:
                pass
            self._sub = None
        for read in self._open.values():
            read.fail(HistoryUnavailable("closed"))
        self._open.clear()

    # ------------------------------------------------------------------ reading

    async def _read(self, stream: str, filter: str, start: int, mark: Callable[[], int]) -> Block:
        block = Block(stream, filter, start, next=start)
        request = {"seq": start, "batch": BLOCK, "next_by_subj": filter, "max_bytes": BLOCK_BYTES}
        block.mark = mark()
        return await self._request(stream, request, block)

    async def leader_next(self, stream: str, filter: str, seq: int) -> int | None:
        """The first sequence at or after `seq` matching `filter`, asked of the stream's
        leader (a direct get may be answered by a replica that lags): None when there is
        none. Raises HistoryUnavailable."""
        request = json.dumps({"seq": seq, "next_by_subj": filter}).encode()
        try:
            reply = await self._nc.request(
                f"$JS.API.STREAM.MSG.GET.{stream}", request, timeout=READ_TIMEOUT
            )
            answer = json.loads(reply.data)
        except Exception as e:
            raise HistoryUnavailable(e) from None
        error = answer.get("error")
        if error is None:
            return int(answer["message"]["seq"])
        if error.get("code") == 404:
            return None  # no message at or after it
        raise HistoryUnavailable(f"msg get: {error}")

    async def first_at(self, stream: str, filter: str, when: dt.datetime) -> int | None:
        """The sequence of the first message matching `filter` stored at or after `when`;
        None when there is none (yet). Raises HistoryUnavailable."""
        stamp = when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        request = {"start_time": stamp, "batch": 1, "next_by_subj": filter}
        block = await self._request(stream, request, Block(stream, filter, 0))
        return block.seqs[0] if block.seqs else None

    async def start(self) -> None:
        """Subscribe the process's one reply inbox for history reads (once, at start: it
        is the process's, not any client's)."""
        if self._sub is None:
            self._prefix = self._nc.new_inbox() + "."
            self._sub = await self._nc.subscribe(
                self._prefix + "*",
                cb=self._on_reply,
                pending_msgs_limit=-1,
                pending_bytes_limit=-1,
            )

    async def _request(self, stream: str, request: dict[str, object], block: Block) -> Block:
        await self.start()
        rid = str(next(self._ids))
        read = self._open[rid] = _Read(block)
        self.reads += 1
        try:
            await self._nc.publish(
                f"$JS.API.DIRECT.GET.{stream}",
                json.dumps(request).encode(),
                reply=self._prefix + rid,
            )
            async with asyncio.timeout(READ_TIMEOUT):
                return await read.done
        except TimeoutError:
            raise HistoryUnavailable("direct get timed out") from None
        finally:
            self._open.pop(rid, None)

    async def _on_reply(self, msg: Msg) -> None:
        read = self._open.get(msg.subject[len(self._prefix) :])
        if read is None:
            return  # a read that timed out or was dropped
        read.take(msg)


class _Read:
    """One direct get batch in flight: messages, then a status (204 EOB, 404, error)."""

    __slots__ = ("block", "done")

    def __init__(self, block: Block) -> None:
        self.block = block
        self.done: asyncio.Future[Block] = asyncio.get_running_loop().create_future()

    def fail(self, e: Exception) -> None:
        if not self.done.done():
            self.done.set_exception(e)
            self.done.exception()

    def take(self, msg: Msg) -> None:
        if self.done.done():
            return
        h = msg.headers or {}
        block = self.block
        status = h.get("Status")
        if status is None:
            seq = int(h["Nats-Sequence"])
            body = envelope.js_body(
                seq,
                h["Nats-Subject"],
                msg.data,
                envelope.rfc3339_from_header(h["Nats-Time-Stamp"]),
            )
            block.seqs.append(seq)
            block.bodies.append(body)
            block.ends.append(block.ends[-1] + len(body))
            block.size += len(body) + 64
            block.next = seq + 1
            return
        if status == "204":  # end of batch: more may follow from block.next
            block.at_end = h.get("Nats-Num-Pending") == "0"
            self.done.set_result(block)
        elif status == "404":  # nothing matching at or after block.start
            block.at_end = True
            self.done.set_result(block)
        else:
            self.fail(HistoryUnavailable(f"direct get: {status} {h.get('Description', '')}"))


def _quiet(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()
