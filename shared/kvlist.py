"""Reading KV buckets exactly: every live key, counted before anything is delivered, and
one key as the stream's leader has it.

nats-py's `keys()` and `watchall()` decide "everything is delivered" by racing a consumer
info request against the push deliveries it has already started: when the deliveries win,
the end marker is queued before them and the listing comes back short (seen in CI: five
articles listed as four). A short listing of the revoked bucket would let a revoked token
in. Here the count is the consumer's creation reply, made before any delivery, and the
listing ends on the message after which the server says none is pending.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
from dataclasses import dataclass

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import api
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError, ServiceUnavailableError

from shared import kvwire

_BATCH = 1024
_RETRIES = 5


@dataclass(frozen=True, slots=True)
class KvEntry:
    key: str
    revision: int
    value: bytes  # b"" when listed without values


async def live_entries(
    js: JetStreamContext,
    bucket: str,
    *,
    values: bool,
    pattern: str = ">",
    timeout: float = 10.0,
) -> list[KvEntry]:
    """The latest put of every key of `bucket` matching the key `pattern` (NATS wildcards),
    in stream order (deleted and purged keys left out). Without `values` the server sends
    headers only. Raises TimeoutError when the listing takes longer than `timeout`, never
    returns a short one."""
    stream = kvwire.stream_of(bucket)
    offset = kvwire.key_offset(bucket)
    config = api.ConsumerConfig(
        deliver_policy=api.DeliverPolicy.LAST_PER_SUBJECT,
        ack_policy=api.AckPolicy.NONE,
        filter_subject=kvwire.subject_of(bucket, pattern),
        headers_only=not values,
        mem_storage=True,
        num_replicas=1,
        inactive_threshold=2 * timeout,  # left behind only if the delete below fails
    )
    out: list[KvEntry] = []
    async with asyncio.timeout(timeout):
        info = await js.add_consumer(stream, config)
        try:
            pending = info.num_pending or 0
            if pending:
                sub = await js.pull_subscribe_bind(consumer=info.name, stream=stream)
                try:
                    while pending:
                        for msg in await _fetch(sub, min(pending, _BATCH), timeout):
                            pending = msg.metadata.num_pending or 0
                            if kvwire.kv_op(msg.headers) == "put":
                                seq = msg.metadata.sequence.stream
                                out.append(KvEntry(msg.subject[offset:], seq, msg.data))
                finally:
                    await sub.unsubscribe()
        finally:
            with contextlib.suppress(Exception):
                await asyncio.shield(js.delete_consumer(stream, info.name))
    return out


async def _fetch(sub: JetStreamContext.PullSubscription, n: int, timeout: float) -> list[Msg]:
    """A pull on a consumer just created on a replicated stream may be answered 503 while
    the consumer's group forms (seen on the 3-node cluster): asked again, briefly."""
    for attempt in range(_RETRIES):
        try:
            return await sub.fetch(n, timeout=timeout)
        except ServiceUnavailableError:
            if attempt == _RETRIES - 1:
                raise
            await asyncio.sleep(0.05 * (attempt + 1))
    raise AssertionError("unreachable")


@dataclass(frozen=True, slots=True)
class LeaderRead:
    revision: int  # 0: never written (or its delete marker expired)
    value: bytes | None  # None: never written, deleted or purged


async def leader_get(js: JetStreamContext, bucket: str, key: str) -> LeaderRead:
    """The key's latest value as the stream's leader has it. A direct get (nats-py's
    `kv.get` on a bucket with allow_direct) may be answered by a replica that has not
    applied the latest write yet: on the 3-node cluster 4-7 % of reads right after a write
    saw the one before (a user created a moment ago read as missing)."""
    try:
        msg = await js.get_msg(
            kvwire.stream_of(bucket), subject=kvwire.subject_of(bucket, key), direct=False
        )
    except NotFoundError:
        return LeaderRead(0, None)
    assert msg.seq is not None
    if kvwire.kv_op(msg.headers) != "put":
        return LeaderRead(msg.seq, None)  # a delete or purge marker
    return LeaderRead(msg.seq, msg.data or b"")


@dataclass(frozen=True, slots=True)
class StoredWrite:
    """One message of a bucket's stream, as a direct get returns it."""

    seq: int
    subject: str
    headers: dict[str, str]
    data: bytes
    time_ns: int


class DirectGetError(Exception):
    """A direct get batch answered with an error status."""


async def writes_after(nc: NATS, bucket: str, after: int, timeout: float) -> list[StoredWrite]:
    """Every write to `bucket` with a stream sequence above `after`, in order, read by
    direct get batch: any replica answers, so no stream leader is needed (during an
    election this still reads). A replica a few milliseconds behind the leader may leave
    out the latest writes; callers that watch the bucket get those from the watch."""
    stream, subject = kvwire.stream_of(bucket), kvwire.subject_of(bucket, ">")
    replies: asyncio.Queue[Msg] = asyncio.Queue()

    async def take(msg: Msg) -> None:
        replies.put_nowait(msg)

    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, cb=take)
    out: list[StoredWrite] = []
    try:
        async with asyncio.timeout(timeout):
            seq = after + 1
            while True:
                request = {"seq": seq, "batch": _BATCH, "next_by_subj": subject}
                await nc.publish(
                    f"$JS.API.DIRECT.GET.{stream}", json.dumps(request).encode(), reply=inbox
                )
                while True:
                    msg = await replies.get()
                    h = msg.headers or {}
                    status = h.get("Status")
                    if status is None:
                        seq = int(h["Nats-Sequence"])
                        stamp = stamp_ns(h.get("Nats-Time-Stamp", ""))
                        out.append(StoredWrite(seq, h["Nats-Subject"], h, msg.data, stamp))
                        seq += 1
                    elif status == "204":  # end of this batch
                        if h.get("Nats-Num-Pending") in (None, "0"):
                            return out
                        break
                    elif status == "404":  # nothing at or after seq
                        return out
                    else:
                        raise DirectGetError(f"{status} {h.get('Description', '')}")
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


def stamp_ns(stamp: str) -> int:
    """Nanoseconds since the epoch of a NATS time stamp (RFC 3339, up to 9 fraction
    digits); 0 when there is none."""
    if not stamp:
        return 0
    head, _, frac = stamp.rstrip("Z").partition(".")
    whole = dt.datetime.fromisoformat(head).replace(tzinfo=dt.UTC)
    return int(whole.timestamp()) * 1_000_000_000 + int((frac + "000000000")[:9] or 0)
