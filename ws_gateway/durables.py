"""Durable js_subs as records in KV `gw_durables` (issue 21, design b): no NATS consumer per
durable. This module only stores them; it knows nothing of sockets or of reading streams.

A record holds a durable's filter, its ack mode, its floor (every stream seq <= floor is
done, handed on or acked; the durable resumes at floor + 1), its holder (an opaque id of the
subscription serving it) and the time of its last save. Opening a durable takes it over by
compare-and-set on the KV revision. Leases learn at once when someone else writes their key:
the bucket republishes every stored write to `DURABLES_WATCH.<key>` (a failed
compare-and-set is never stored, so never seen); the store's one subscription per process
hands each to the leases of that key, and a write by someone else after a lease's own ends
that lease (`lost` is set; its next save raises `TakenOver`). Every process so sees every
stored write (at most one per durable per save interval of its holder), not a subscription
(and a task) per durable. Holders save when the floor moves, and now and then
with an unchanged one: that keeps the durable alive.

Key `<stream>.<uid>.<name>`. Stream and durable names are `[A-Za-z0-9_-]{1,64}`, user ids
`[A-Za-z0-9-]{1,64}` (shared/users.py): each a valid KV key token without a dot, so no
encoding is needed and `<stream>.<uid>.*` lists exactly one user's durables on one stream.

A durable is *gone* when its key holds a delete marker (the user deleted it) or a record not
saved for `durable_inactive`: opening it starts afresh. The bucket keeps one revision per
key for 2 x `durable_inactive` (its TTL), so a deleted durable is told from a new one that
long.

    Exception
     └── DurableError
          ├── DurableConflict     it exists with another filter or ack mode (bad_request)
          ├── DurableLimit        a new durable beyond max_durables_per_user (limit)
          ├── DurableUnavailable  the compare-and-set lost too many races (unavailable)
          └── TakenOver           another subscription holds it now, or it was deleted

Any other error (a nats error, a timeout) propagates: the caller answers `unavailable`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.client import JetStreamContext
from nats.js.errors import APIError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from shared import kvwire
from shared.capabilities import DURABLES_BUCKET as DURABLES_BUCKET
from shared.capabilities import DURABLES_WATCH
from shared.errors import ErrorCode
from shared.kvlist import leader_get
from shared.settings import Settings
from shared.users import USER_ID_RE

log = logging.getLogger("ws_gateway.durables")

NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}\Z")  # stream and durable names
# Compare-and-set attempts before giving up: each lost one means another open or save of the
# same durable landed in between, so more than a few means a storm of takeovers.
ATTEMPTS = 12
_WRONG_LAST_SEQUENCE = (10071, 10164)  # JetStream: the key's revision is not the expected one


class DurableError(Exception):
    code: ErrorCode | None = None  # what a js_sub answers with, where the store decides it


class DurableConflict(DurableError):
    """The durable exists with another filter or ack mode: not the one asked for."""

    code = ErrorCode.BAD_REQUEST


class DurableLimit(DurableError):
    """A new durable would exceed the user's cap on the stream."""

    code = ErrorCode.LIMIT


class DurableUnavailable(DurableError):
    """Compare-and-set lost `ATTEMPTS` races in a row."""

    code = ErrorCode.UNAVAILABLE


class TakenOver(DurableError):
    """The lease no longer holds the durable: another subscription took it over, or it was
    deleted. The caller ends its subscription."""


class DurableRecord(msgspec.Struct):
    """The value of a `gw_durables` key (JSON). Unknown fields are ignored, so a newer
    gateway may add some during a rolling deploy."""

    filter: str
    ack: bool
    floor: int  # every stream seq <= floor is done; resume at floor + 1
    holder: str
    updated: float  # unix time of the last save
    # The stream's creation time (stream info) when the durable was made: a stream deleted
    # and made again under the same name numbers other messages, so the floor means
    # nothing there. "" (a record of an older gateway): not compared.
    stream_created: str = ""


_decoder = msgspec.json.Decoder(DurableRecord)
_encoder = msgspec.json.Encoder()


def durable_key(stream: str, uid: str, name: str) -> str:
    """The record's key; ValueError for a name or user id that is not one key token."""
    if not NAME_RE.fullmatch(stream):
        raise ValueError(f"stream name {stream!r} is not [A-Za-z0-9_-]{{1,64}}")
    if not NAME_RE.fullmatch(name):
        raise ValueError(f"durable name {name!r} is not [A-Za-z0-9_-]{{1,64}}")
    if not USER_ID_RE.fullmatch(uid):
        raise ValueError(f"invalid user id {uid!r}")
    return f"{stream}.{uid}.{name}"


def _same_stream(record: DurableRecord | None, stream_created: str) -> bool:
    return (
        record is None
        or not (record.stream_created and stream_created)
        or (record.stream_created == stream_created)
    )


@dataclass(frozen=True, slots=True)
class _Found:
    revision: int  # 0: the key was never written
    record: DurableRecord | None  # None: never written, deleted, purged or undecodable


def _decode(key: str, value: bytes) -> DurableRecord | None:
    try:
        return _decoder.decode(value)
    except msgspec.DecodeError:
        log.warning(
            "undecodable durable record: treated as gone",
            extra={"event": "durable_bad_record", "key": key},
        )
        return None


async def _read(kv: KeyValue, key: str) -> _Found:
    """The key's latest record, from the stream's leader: a compare-and-set from a revision
    a lagging replica reported always loses."""
    read = await leader_get(kv._js, DURABLES_BUCKET, key)
    if read.value is None:
        return _Found(read.revision, None)  # never written, or a delete or purge marker
    return _Found(read.revision, _decode(key, read.value))


class Lease:
    """One subscription's hold on a durable, as `DurableStore.open` returned it.

    `created`: no current record existed (a new durable, or a gone one started afresh);
    `gone`: the key held a deleted or expired durable; `floor`: where it stands (resume at
    floor + 1); `revision`: the KV revision this lease last wrote. Saves and the delete of
    one lease run one at a time, in call order."""

    __slots__ = (
        "_ended",
        "_kv",
        "_lock",
        "_record",
        "_store",
        "created",
        "gone",
        "key",
        "lost",
        "revision",
    )

    def __init__(
        self,
        kv: KeyValue,
        key: str,
        record: DurableRecord,
        revision: int,
        *,
        created: bool,
        gone: bool,
    ) -> None:
        self._kv, self.key, self._record, self.revision = kv, key, record, revision
        self.created, self.gone = created, gone
        self._lock = asyncio.Lock()
        self._ended: str | None = None  # why this lease holds nothing any more
        self._store: DurableStore | None = None  # watching the key for this lease
        self.lost = asyncio.Event()  # set when a write by someone else ended the lease

    def _foreign(self, seq: int, why: str) -> None:
        """A write by someone else was stored at `seq`. Only one after the lease's own ends
        it: one before is what the lease's compare-and-set replaced."""
        if seq > self.revision:
            self._end(why)

    def _end(self, why: str) -> None:
        if self._ended is None:
            self._ended = why
            self.lost.set()

    def close(self) -> None:
        """Stop watching the key (the lease's writes may go on: its final save, a delete)."""
        if self._store is not None:
            store, self._store = self._store, None
            store._unwatch(self.key, self.holder)

    @property
    def floor(self) -> int:
        return self._record.floor

    @property
    def holder(self) -> str:
        return self._record.holder

    async def save(self, floor: int) -> None:
        """Write `floor` and the time (an unchanged floor still keeps the durable alive).
        Raises TakenOver if another subscription holds the durable or it was deleted."""

        async def write() -> None:
            record = msgspec.structs.replace(self._record, floor=floor, updated=time.time())
            self.revision = await self._kv.update(
                self.key, _encoder.encode(record), last=self.revision
            )
            self._record = record

        await self._while_held("save", write)

    async def delete(self) -> None:
        """End the durable for good: a delete marker, written only while this lease holds
        it (a later open reports it `gone`). Raises TakenOver otherwise. Its own delete
        marker must not end it as someone else's would: the watch stops first."""
        self.close()

        async def write() -> None:
            await self._kv.delete(self.key, last=self.revision)
            self._ended = "deleted"

        await self._while_held("delete", write)

    async def _while_held(self, what: str, write: Callable[[], Awaitable[None]]) -> None:
        """Run `write`, a compare-and-set on `revision`, one at a time; after a lost race,
        look again: TakenOver, or (still ours) retry at the record's revision."""
        async with self._lock:
            for _ in range(ATTEMPTS):
                self._check_held()
                try:
                    await write()
                except APIError as e:
                    # kv.update raises KeyWrongLastSequenceError; kv.delete the plain error.
                    lost = isinstance(e, KeyWrongLastSequenceError)
                    if not lost and e.err_code not in _WRONG_LAST_SEQUENCE:
                        raise
                    await self._recheck()
                    continue
                return
            raise DurableUnavailable(f"durable {self.key!r}: {what} lost {ATTEMPTS} races")

    def _check_held(self) -> None:
        if self._ended is not None:
            raise TakenOver(f"durable {self.key!r} {self._ended}")

    async def _recheck(self) -> None:
        """After a lost compare-and-set: still ours (our own write whose reply was lost),
        then adopt its revision; otherwise the lease has ended."""
        found = await _read(self._kv, self.key)
        if found.record is None:
            self._end("deleted")
        elif found.record.holder != self.holder:
            self._end("taken over by another subscription")
        else:
            self.revision = found.revision


class DurableStore:
    """The durable records of every user, in bucket `gw_durables` (provisioned beforehand)."""

    def __init__(self, nc: NATS, js: JetStreamContext, settings: Settings) -> None:
        self._nc, self._js = nc, js
        self._inactive = settings.durable_inactive
        self._cap = settings.max_durables_per_user
        self._bucket: KeyValue | None = None
        self._sub: Subscription | None = None
        # key -> holder -> its lease, or (while it opens) the highest foreign write seen:
        # (its seq, why) or None.
        self._watched: dict[str, dict[str, Lease | tuple[int, str] | None]] = {}

    async def start(self) -> None:
        """Subscribe the process's one watch of every durable's stored writes (at start:
        an open reads the key only once the watch is on, so no later write is missed)."""
        if self._sub is None:
            self._sub = await self._nc.subscribe(
                f"{DURABLES_WATCH}.>",
                cb=self._on_write,
                pending_msgs_limit=-1,
                pending_bytes_limit=-1,
            )

    async def close(self) -> None:
        if self._sub is not None:
            sub, self._sub = self._sub, None
            try:
                await sub.unsubscribe()
            except Exception:  # the connection is closed or closing: nothing to stop
                pass

    async def _on_write(self, msg: Msg) -> None:
        key = msg.subject[len(DURABLES_WATCH) + 1 :]
        holders = self._watched.get(key)
        if not holders:
            return
        headers = msg.headers or {}
        try:
            seq = int(headers.get("Nats-Sequence", "0"))
        except ValueError:
            return
        record = _decode(key, msg.data) if kvwire.kv_op(headers) == "put" else None
        why = "deleted" if record is None else "taken over by another subscription"
        for holder, seen in list(holders.items()):
            if record is not None and record.holder == holder:
                continue  # its own write
            if isinstance(seen, Lease):
                seen._foreign(seq, why)
            elif seen is None or seq > seen[0]:
                holders[holder] = (seq, why)

    def _watch(self, key: str, holder: str) -> None:
        self._watched.setdefault(key, {})[holder] = None

    def _adopt(self, lease: Lease) -> None:
        holders = self._watched.setdefault(lease.key, {})
        seen = holders.get(lease.holder)
        holders[lease.holder], lease._store = lease, self
        if isinstance(seen, tuple):
            lease._foreign(*seen)

    def _unwatch(self, key: str, holder: str) -> None:
        holders = self._watched.get(key)
        if holders is not None:
            holders.pop(holder, None)
            if not holders:
                del self._watched[key]

    async def _kv(self) -> KeyValue:
        if self._bucket is None:
            self._bucket = await self._js.key_value(DURABLES_BUCKET)
        return self._bucket

    def _current(self, record: DurableRecord | None, now: float) -> bool:
        return record is not None and now - record.updated <= self._inactive

    async def open(
        self,
        stream: str,
        uid: str,
        name: str,
        filter: str,
        ack: bool,
        holder: str,
        floor_if_new: int,
        stream_created: str = "",
    ) -> Lease:
        """Take the durable over for `holder`, or create it at `floor_if_new` if it does not
        exist or is gone (also: made on a stream since deleted and made again). Raises
        ValueError (a name or uid that is not one key token), DurableConflict, DurableLimit,
        DurableUnavailable. The lease watches its key until `Lease.close`."""
        key = durable_key(stream, uid, name)
        kv = await self._kv()
        await self.start()
        self._watch(key, holder)
        try:
            lease = await self._take(kv, key, filter, ack, holder, floor_if_new, stream_created)
        except BaseException:
            self._unwatch(key, holder)
            raise
        self._adopt(lease)
        return lease

    async def _take(
        self,
        kv: KeyValue,
        key: str,
        filter: str,
        ack: bool,
        holder: str,
        floor_if_new: int,
        stream_created: str,
    ) -> Lease:
        stream, uid, name = key.split(".")
        for attempt in range(ATTEMPTS):
            found = await _read(kv, key)
            now = time.time()
            record = found.record
            current = self._current(record, now) and _same_stream(record, stream_created)
            if record is not None and current:
                if record.filter != filter:
                    raise DurableConflict(f"durable {name!r} exists with another filter")
                if record.ack != ack:
                    raise DurableConflict(f"durable {name!r} exists with another ack mode")
                floor = record.floor
            else:
                await self._check_cap(stream, uid, key, now)
                floor = floor_if_new
            new = DurableRecord(
                filter=filter,
                ack=ack,
                floor=floor,
                holder=holder,
                updated=now,
                stream_created=stream_created,
            )
            try:
                if found.revision:
                    revision = await kv.update(key, _encoder.encode(new), last=found.revision)
                else:
                    revision = await kv.create(key, _encoder.encode(new))
            except KeyWrongLastSequenceError:
                # Another open or save came first: look again, after a pause that grows and
                # differs between contenders (two gateways retrying in step keep colliding).
                await asyncio.sleep(random.uniform(0.005, 0.02) * (attempt + 1))
                continue
            return Lease(
                kv,
                key,
                new,
                revision,
                created=not current,
                gone=bool(found.revision) and not current,
            )
        raise DurableUnavailable(f"durable {name!r}: open lost {ATTEMPTS} races")

    async def _check_cap(self, stream: str, uid: str, key: str, now: float) -> None:
        """DurableLimit if the user holds the cap of current durables on `stream` already
        (`key` itself not counted). Headers only; the values are read only when the count
        reaches the cap, to leave out expired records. Concurrent creations of different
        durables may overshoot the cap by their number."""
        # Subjects with a message, counted by the stream's leader (no consumer: a storm of
        # new durables must not create one each); markers and expired records among them
        # are told apart, by reading them, only when the count reaches the cap.
        prefix = kvwire.subject_of(DURABLES_BUCKET, "")
        info = await self._js.stream_info(
            kvwire.stream_of(DURABLES_BUCKET),
            subjects_filter=kvwire.subject_of(DURABLES_BUCKET, f"{stream}.{uid}.*"),
        )
        others = [
            subj[len(prefix) :] for subj in (info.state.subjects or {}) if subj != prefix + key
        ]
        if len(others) < self._cap:
            return
        kv = await self._kv()
        held = 0
        for other in others:
            found = await _read(kv, other)
            held += self._current(found.record, now)
        if held >= self._cap:
            raise DurableLimit(f"at most {self._cap} durables per user on stream {stream!r}")
