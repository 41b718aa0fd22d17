"""Shared JetStream reads (issue 18): one tail consumer per stream, shared history blocks.

Non-durable `js_sub`s are served by one tail consumer per stream per gateway process,
demultiplexed by each subscription's filter, and their catch-up by blocks of the stream read
once per process (direct get batch, on streams with `allow_direct`), cached within
`js_history_bytes`. None of it may change what a client sees: each subscription gets exactly
the messages matching its filter from its position, once, in stream order, through the
hand-off from history to live; `recovered` as in the resume contract.

Every expectation is computed from the publish acks (seq -> subject, payload), never from
what the gateway reports. Waits are on messages and events, each bounded.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import itertools
import socket
import urllib.parse
from collections.abc import AsyncIterator, Sequence
from typing import Any

import msgspec
import pytest
from nats.aio.client import Client as NATS
from nats.js import api
from nats.js.client import JetStreamContext
from prometheus_client import REGISTRY
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from shared import natsio
from shared.client import ClientSubscription, GatewayClient, RequestError
from shared.settings import Settings
from shared.subjects import match
from shared.tasks import cancel_and_wait
from tests.gateway.conftest import ClientFactory, UserFactory
from tests.waits import split, until_async
from ws_gateway.server import Gateway

# seq -> (subject, decoded payload), from the publish acks
Stored = dict[int, tuple[str, Any]]
Envelope = dict[str, Any]

CHAT_ALL = {"streams": {"chat": [">"]}}


# ---------------------------------------------------------------------------- helpers


def _payload(n: int, subject: str, pad: int = 24) -> bytes:
    return msgspec.json.encode({"n": n, "s": subject, "pad": "x" * pad})


async def publish_all(
    js: JetStreamContext, items: Sequence[tuple[str, bytes]], stored: Stored, chunk: int = 256
) -> list[int]:
    """Publish `items` (pipelined, `chunk` in flight) and record each by its ack's seq."""
    seqs: list[int] = []
    for i in range(0, len(items), chunk):
        part = items[i : i + chunk]
        acks = await asyncio.gather(*(js.publish(s, p) for s, p in part))
        for (subject, payload), ack in zip(part, acks, strict=True):
            stored[ack.seq] = (subject, msgspec.json.decode(payload))
            seqs.append(ack.seq)
    return seqs


def expected(stored: Stored, flt: str, floor: int) -> list[int]:
    """The seqs a subscription on `flt` starting at `floor` must get, in order."""
    return [s for s in sorted(stored) if s >= floor and match(flt, stored[s][0])]


def describe(got: Sequence[int], want: Sequence[int]) -> str:
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    dups = len(got) - len(set(got))
    ordered = all(a < b for a, b in itertools.pairwise(got))
    return (
        f"got {len(got)} messages, expected {len(want)}; missing {len(missing)} "
        f"{missing[:8]}, unexpected {len(extra)} {extra[:8]}, duplicates {dups}, "
        f"strictly increasing: {ordered}; first got {list(got[:5])}, first expected "
        f"{list(want[:5])}, last got {list(got[-3:])}, last expected {list(want[-3:])}"
    )


def check_exact(name: str, envs: Sequence[Envelope], want: Sequence[int], stored: Stored) -> None:
    """`envs` are exactly the js_msgs of `want`, in order, each with its stored subject and
    payload (a cached block serving another message's body would show here)."""
    got = [e["data"]["seq"] for e in envs]
    assert got == list(want), f"{name}: {describe(got, want)}"
    for e in envs:
        seq = e["data"]["seq"]
        subject, payload = stored[seq]
        assert e["op"] == "js_msg", f"{name}: {e}"
        assert e["data"]["subject"] == subject, f"{name}: seq {seq}: {e['data']}"
        assert e["data"]["payload"] == payload, f"{name}: seq {seq}: {e['data']}"
        assert e["data"]["time"].endswith("Z"), f"{name}: seq {seq}: {e['data']}"


async def read_through(
    sub: ClientSubscription, last: int, timeout: float = 30.0, name: str = "sub"
) -> list[Envelope]:
    """This subscription's js_msgs until one with seq >= `last` (none when `last` is 0)."""
    got: list[Envelope] = []
    if last <= 0:
        return got
    try:
        async with asyncio.timeout(timeout):
            while not got or got[-1]["data"]["seq"] < last:
                env = await sub.queue.get()
                assert env["op"] == "js_msg", f"{name}: unexpected {env}"
                got.append(env)
    except TimeoutError:
        seqs = [e["data"]["seq"] for e in got]
        raise AssertionError(
            f"{name}: no seq {last} within {timeout} s; got {len(seqs)}, last {seqs[-3:]}"
        ) from None
    return got


async def assert_nothing_more(c: GatewayClient, sub: ClientSubscription, name: str) -> None:
    """After a round trip on the connection, nothing further is queued for `sub`."""
    await c.ping()
    extra = sub.get_nowait()
    assert extra is None, f"{name}: unexpected after the last message: {extra}"


async def consumer_count(js: JetStreamContext, stream: str) -> int:
    info = await js.stream_info(stream)
    return int(info.state.consumer_count)


def rfc3339(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


async def time_boundary(js: JetStreamContext, stream: str, near: int) -> tuple[int, dt.datetime]:
    """A seq k at or after `near` whose stored time (to the microsecond) is later than its
    predecessor's, so that "time >= time(k)" selects exactly the seqs >= k."""
    for k in range(near, near + 50):
        before = await js.get_msg(stream, k - 1)
        at = await js.get_msg(stream, k)
        assert before.time is not None and at.time is not None
        if before.time < at.time:
            return k, at.time
    raise AssertionError(f"no two distinct stored times between {near} and {near + 50}")


def backpressure_closes() -> float:
    return REGISTRY.get_sample_value("gateway_backpressure_closes_total") or 0.0


class RawClient:
    """A WebSocket client that reads only when told to. `pause()` stops reading at the
    socket (asyncio takes nothing more from the kernel, whose receive buffer is kept small),
    so the gateway faces a reader that stopped; `resume()` reads again."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.pending: collections.deque[Envelope] = collections.deque()

    @classmethod
    async def connect(cls, url: str, token: str, rcvbuf: int = 16 * 1024) -> RawClient:
        parts = urllib.parse.urlsplit(url)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, (parts.hostname, parts.port))
            ws = await ws_connect(
                url,
                sock=sock,
                additional_headers={"Authorization": f"Bearer {token}"},
                compression=None,
                max_size=None,
                max_queue=None,  # no flow control of its own: only pause() stops reading
                ping_interval=None,
                open_timeout=10,
            )
        except BaseException:
            sock.close()
            raise
        client = cls(ws)
        try:
            first = await client.next()
            assert first["op"] == "cap_update", first
        except BaseException:
            await client.close()
            raise
        return client

    async def next(self, timeout: float = 10.0) -> Envelope:
        while not self.pending:
            try:
                async with asyncio.timeout(timeout):
                    frame = await self.ws.recv()
            except ConnectionClosed:
                raise AssertionError(
                    f"connection closed: {self.ws.close_code} {self.ws.close_reason!r}"
                ) from None
            self.pending.extend(split(frame))
        return self.pending.popleft()

    async def js_sub(self, stream: str, flt: str, inbox: str, **options: Any) -> Envelope:
        """Subscribe and return the `ok`'s data (frames before it are kept)."""
        env = {"op": "js_sub", "target": stream, "inbox": inbox, "data": {"filter": flt, **options}}
        await self.ws.send(msgspec.json.encode(env).decode())
        skipped: list[Envelope] = []
        while True:
            reply = await self.next()
            if reply.get("inbox") == inbox and reply["op"] in ("ok", "error"):
                break
            skipped.append(reply)
        self.pending.extendleft(reversed(skipped))
        assert reply["op"] == "ok", reply
        data: Envelope = reply.get("data") or {}
        return data

    async def read_through(self, inbox: str, last: int, timeout: float = 30.0) -> list[Envelope]:
        got: list[Envelope] = []
        try:
            async with asyncio.timeout(timeout):
                while not got or got[-1]["data"]["seq"] < last:
                    env = await self.next(timeout)
                    if env["op"] in ("ping", "cap_update"):
                        continue
                    assert env["op"] == "js_msg" and env["inbox"] == inbox, env
                    got.append(env)
        except TimeoutError:
            seqs = [e["data"]["seq"] for e in got]
            raise AssertionError(f"no seq {last}: got {len(seqs)}, last {seqs[-3:]}") from None
        return got

    def pause(self) -> None:
        self.ws.transport.pause_reading()

    def resume(self) -> None:
        self.ws.transport.resume_reading()

    async def close(self) -> None:
        self.ws.transport.resume_reading()
        await self.ws.close()


@pytest.fixture
async def opened() -> AsyncIterator[list[GatewayClient | RawClient]]:
    """Clients a test opens itself (on a gateway of its own settings), closed at the end."""
    clients: list[GatewayClient | RawClient] = []
    yield clients
    await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


async def open_client(
    url: str, token: str, opened: list[GatewayClient | RawClient]
) -> GatewayClient:
    c = await GatewayClient.connect(url, token=token)
    opened.append(c)
    return c


@contextlib.asynccontextmanager
async def gateway_with(settings: Settings, **changes: Any) -> AsyncIterator[Gateway]:
    """A gateway with some settings changed (an unknown setting name fails here, loudly)."""
    changed = msgspec.structs.replace(settings, **changes)
    async with Gateway(changed, host="127.0.0.1", port=0) as gw:
        yield gw


# ------------------------------------------------------- 1. many readers, one stream

SUBJECTS = ("chat.room.123", "chat.room.456", "chat.room.789", "chat.lobby.main")
FILTERS = ("chat.room.123", "chat.room.*", ">", "chat.lobby.>", "chat.*.456")
HISTORY = 2600  # three 1,000-message blocks, the last one partial and growing
BATCHES = (100, 1000, 10, 250, 3)
# start_seq points on and around the block boundaries, the partial block and the live end
SEQ_POINTS = (1, 2, 500, 998, 999, 1000, 1001, 1002, 1500, 1999, 2000, 2001, 2002, 2400,
              2599, 2600, HISTORY + 1, 1, 1000, 1001, 2001, 1, 999, 2000, 1500, 2, 2600,
              1002, 1, 2500)  # fmt: skip
RESUMERS = (0, 5, 7, 12, 17)  # indexes of start_seq readers that also disconnect and resume


class Reader:
    """One client of the many-readers test: its subscription, what it got, when it is done."""

    def __init__(self, name: str, flt: str, options: dict[str, Any], batch: int) -> None:
        self.name, self.flt, self.options, self.batch = name, flt, options, batch
        self.client: GatewayClient | None = None
        self.sub: ClientSubscription | None = None
        self.ok: Envelope = {}
        self.acked_before = 0  # the last seq acked to the publisher before the js_sub
        self.floor = 0  # the first seq it may get (position, start_seq, start_time's seq)
        self.resume_after = 0  # resume right after this seq (0: never)
        self.resumed_ok: Envelope | None = None
        self.got: list[Envelope] = []
        self.target: int | None = None
        self.reached = asyncio.Event()
        self.failure: BaseException | None = None

    def set_target(self, last: int) -> None:
        self.target = last
        self._check()

    def _check(self) -> None:
        if self.target is not None and (
            self.target == 0 or (self.got and self.got[-1]["data"]["seq"] >= self.target)
        ):
            self.reached.set()

    async def pump(self, connect: ClientFactory, token: str) -> None:
        """Take its messages as they come; resume once if told to."""
        try:
            while True:
                assert self.sub is not None
                env = await self.sub.queue.get()
                assert env["op"] == "js_msg", f"{self.name}: {env}"
                self.got.append(env)
                seq = env["data"]["seq"]
                if seq == self.resume_after:
                    await self._resume(connect, token, seq + 1)
                self._check()
        except asyncio.CancelledError:
            raise
        except BaseException as e:
            self.failure = e
            self.reached.set()

    async def _resume(self, connect: ClientFactory, token: str, start: int) -> None:
        assert self.client is not None
        await self.client.close()
        self.client = await connect(token)
        self.sub = await self.client.js_sub("chat", self.flt, start_seq=start, batch=self.batch)
        self.resumed_ok = self.sub.ok


async def test_fifty_readers_get_exactly_their_messages_through_blocks_and_hand_off(
    make_user: UserFactory, connect_ws: ClientFactory, nc: NATS, gateway: Gateway
) -> None:
    """50 clients on `chat` with mixed filters and starts (start_seq on and around block
    boundaries, time_delta, start_time, new only), five of them resuming on a new connection
    part way, while messages keep being published through their catch-up: each gets exactly
    the messages matching its filter from its position, once, in order, with their own
    subject and payload."""
    js = nc.jetstream()
    token = await make_user("reader", CHAT_ALL)
    stored: Stored = {}
    history = [(SUBJECTS[i % 4], _payload(i, SUBJECTS[i % 4])) for i in range(HISTORY)]
    assert await publish_all(js, history, stored) == list(range(1, HISTORY + 1))
    k1, t1 = await time_boundary(js, "chat", 1234)
    k2, t2 = await time_boundary(js, "chat", 2222)

    readers: list[Reader] = []
    for i, s in enumerate(SEQ_POINTS):
        r = Reader(f"start_seq={s}#{i}", FILTERS[i % 5], {"start_seq": s}, BATCHES[i % 5])
        r.floor = s
        if i in RESUMERS:  # a third into its history: for most, across a block boundary
            mine = expected(stored, r.flt, s)
            r.resume_after = mine[len(mine) // 3]
        readers.append(r)
    for i in range(4):
        r = Reader(f"time_delta#{i}", FILTERS[(i + 1) % 5], {"time_delta": 3600}, BATCHES[i])
        r.floor = 1  # the whole stream is within the hour
        readers.append(r)
    for i, (k, t) in enumerate(((k1, t1), (k1, t1), (k2, t2), (k2, t2))):
        opts = {"start_time": rfc3339(t)}
        r = Reader(f"start_time@{k}#{i}", FILTERS[(i + 2) % 5], opts, BATCHES[(i + 1) % 5])
        r.floor = k
        readers.append(r)
    for i in range(12):
        readers.append(Reader(f"new#{i}", FILTERS[i % 5], {}, BATCHES[(i + 2) % 5]))
    assert len(readers) == 50

    # The publisher keeps going (bursts of 8 in flight) until every reader is subscribed
    # and has reached live messages, so that the hand-offs happen while it publishes;
    # bounded in count whatever happens.
    subscribed = asyncio.Event()
    last_acked = HISTORY

    def handed_off() -> int:
        return sum(1 for r in readers if r.got and r.got[-1]["data"]["seq"] > HISTORY)

    async def keep_publishing() -> None:
        nonlocal last_acked
        n, after = HISTORY, 0
        while after < 400 or (handed_off() < len(readers) and after < 4000):
            if not subscribed.is_set() and n - HISTORY >= 5000:
                await subscribed.wait()
            burst = [(SUBJECTS[m % 4], _payload(m, SUBJECTS[m % 4])) for m in range(n, n + 8)]
            last_acked = max(last_acked, *await publish_all(js, burst, stored))
            n += len(burst)
            if subscribed.is_set():
                after += len(burst)

    async def subscribe(r: Reader) -> None:
        r.client = await connect_ws(token)
        r.acked_before = last_acked
        r.sub = await r.client.js_sub("chat", r.flt, batch=r.batch, **r.options)
        r.ok = r.sub.ok
        if "start_seq" not in r.options and "start_time" not in r.options:
            r.floor = 1 if "time_delta" in r.options else r.ok["position"]

    publisher = asyncio.create_task(keep_publishing())
    pumps: list[asyncio.Task[None]] = []
    try:
        for i in range(0, len(readers), 10):  # ten connections at a time
            await asyncio.gather(*(subscribe(r) for r in readers[i : i + 10]))
            pumps += [asyncio.create_task(r.pump(connect_ws, token)) for r in readers[i : i + 10]]
        subscribed.set()
        async with asyncio.timeout(60):
            await publisher
        assert sorted(stored) == list(range(1, max(stored) + 1))
        for r in readers:
            want = expected(stored, r.flt, r.floor)
            r.set_target(want[-1] if want else 0)
        try:
            async with asyncio.timeout(60):
                await asyncio.gather(*(r.reached.wait() for r in readers))
        except TimeoutError:
            stuck = [
                f"{r.name} [{r.flt}]: {describe([e['data']['seq'] for e in r.got], want)}"
                for r in readers
                if not r.reached.is_set()
                for want in [expected(stored, r.flt, r.floor)]
            ]
            raise AssertionError(
                "readers never got their last message:\n" + "\n".join(stuck)
            ) from None
    finally:
        await cancel_and_wait(publisher)
        for p in pumps:
            await cancel_and_wait(p)

    for r in readers:
        if r.failure is not None:
            raise AssertionError(f"{r.name}: {r.failure!r}") from r.failure
        opts = r.options
        if "start_seq" in opts:
            assert r.ok == {"position": opts["start_seq"], "recovered": True}, (r.name, r.ok)
        else:
            assert r.ok["recovered"] is True, (r.name, r.ok)
        if "start_time" in opts:
            assert r.ok["position"] >= r.floor, (r.name, r.ok)
        if not opts:  # new only: after every message stored before it subscribed
            assert r.ok["position"] >= r.acked_before + 1, (r.name, r.ok, r.acked_before)
        if r.got:
            assert r.ok["position"] <= r.got[0]["data"]["seq"], (r.name, r.ok)
        if r.resume_after:
            assert r.resumed_ok == {"position": r.resume_after + 1, "recovered": True}, (
                r.name,
                r.resumed_ok,
            )
        check_exact(f"{r.name} [{r.flt}]", r.got, expected(stored, r.flt, r.floor), stored)
    for r in readers:
        assert r.client is not None and r.sub is not None
        await assert_nothing_more(r.client, r.sub, r.name)


# ------------------------------------------------------------------------ 2. resume


async def test_a_resume_from_last_plus_one_gets_exactly_the_rest(
    make_user: UserFactory, connect: ClientFactory, nc: NATS
) -> None:
    """A client reads part of a filter's history (across a block boundary) and leaves; more
    is published; it comes back with start_seq = last + 1: `recovered`, position = start_seq,
    and exactly the rest, history then live."""
    js = nc.jetstream()
    token = await make_user("reader", CHAT_ALL)
    stored: Stored = {}
    items = [(SUBJECTS[i % 2], _payload(i, SUBJECTS[i % 2])) for i in range(2500)]
    await publish_all(js, items, stored)
    c1 = await connect(token)
    sub1 = await c1.js_sub("chat", "chat.room.123", start_seq=1, batch=100)
    assert sub1.ok == {"position": 1, "recovered": True}
    mine = expected(stored, "chat.room.123", 1)
    cut = next(s for s in mine if s > 1500)
    first = await read_through(sub1, cut, name="first part")
    check_exact("first part", first, [s for s in mine if s <= cut], stored)
    await c1.close()

    gap = [(SUBJECTS[i % 2], _payload(i, SUBJECTS[i % 2])) for i in range(2500, 2520)]
    await publish_all(js, gap, stored)
    c2 = await connect(token)
    sub2 = await c2.js_sub("chat", "chat.room.123", start_seq=cut + 1, batch=100)
    assert sub2.ok == {"position": cut + 1, "recovered": True}
    live = [(SUBJECTS[i % 2], _payload(i, SUBJECTS[i % 2])) for i in range(2520, 2540)]
    await publish_all(js, live, stored)
    rest = expected(stored, "chat.room.123", cut + 1)
    check_exact("rest", await read_through(sub2, rest[-1], name="rest"), rest, stored)
    await assert_nothing_more(c2, sub2, "rest")


# -------------------------------------------------------------------- 3. consumers


async def test_tailing_and_caught_up_subscriptions_share_one_consumer(
    make_user: UserFactory, connect_ws: ClientFactory, nc: NATS
) -> None:
    """20 new-only js_subs with different filters on one stream are one NATS consumer (or
    none) and each still gets exactly its messages; 10 more reading history first are
    still at most one once live; after every unsub the stream has no consumer left."""
    js = nc.jetstream()
    token = await make_user("reader", CHAT_ALL)
    filters = [f"chat.room.{i}" for i in range(16)] + [
        "chat.room.*",
        "chat.>",
        ">",
        "chat.*.3",
    ]
    clients = [await connect_ws(token) for _ in range(4)]
    subs = [await clients[i % 4].js_sub("chat", f) for i, f in enumerate(filters)]
    assert all(s.ok["recovered"] is True and s.ok["position"] == 1 for s in subs)
    assert await consumer_count(js, "chat") <= 1

    stored: Stored = {}
    await publish_all(js, [(f"chat.room.{i}", _payload(i, f"chat.room.{i}")) for i in range(16)],
                      stored)  # fmt: skip
    for s, f in zip(subs, filters, strict=True):
        want = expected(stored, f, 1)
        check_exact(f, await read_through(s, want[-1], name=f), want, stored)
    assert await consumer_count(js, "chat") <= 1

    history_readers = [await connect_ws(token) for _ in range(2)]
    late = [
        await history_readers[i % 2].js_sub("chat", f, start_seq=1 + i)
        for i, f in enumerate(["chat.room.*", ">", "chat.>", "chat.room.3", "chat.room.15"] * 2)
    ]
    await publish_all(js, [("chat.room.3", _payload(99, "chat.room.3"))], stored)
    for i, s in enumerate(late):
        want = expected(stored, s.pattern, 1 + i)
        check_exact(f"late {s.pattern}", await read_through(s, want[-1]), want, stored)
    assert await consumer_count(js, "chat") <= 1

    for s in subs + late:
        await s.unsub()

    async def none_left() -> bool:
        return await consumer_count(js, "chat") == 0

    await until_async(none_left, "the stream's consumers to be released", 15)


# ------------------------------------------------------------ 4. purged, recreated


OLD_N = 1100  # a full 1,000-message block (cached whole) and part of the next


async def test_a_resume_from_a_purged_position_is_not_recovered(
    make_user: UserFactory, connect: ClientFactory, nc: NATS
) -> None:
    """After a purge, a resume from a purged position (and one from 1): `recovered: false`,
    position at the first message that exists, then exactly the new messages, never the
    purged ones (even though a full block of them was read, and may be cached, before); a
    reader tailing through the purge gets the new ones."""
    js = nc.jetstream()
    token = await make_user("reader", CHAT_ALL)
    stored: Stored = {}
    await publish_all(js, [("chat.room.123", _payload(i, "old")) for i in range(OLD_N)], stored)
    c1 = await connect(token)
    part = await c1.js_sub("chat", "chat.room.123", start_seq=1, batch=10)
    check_exact("part", await read_through(part, 30), list(range(1, 31)), stored)
    await c1.close()
    tail_client = await connect(token)
    tail = await tail_client.js_sub("chat", "chat.room.123", start_seq=1)
    check_exact("tail before", await read_through(tail, OLD_N), sorted(stored), stored)

    await js.purge_stream("chat")
    stored.clear()
    await publish_all(js, [("chat.room.123", _payload(i, "new")) for i in range(5)], stored)
    new = list(range(OLD_N + 1, OLD_N + 6))
    assert sorted(stored) == new
    check_exact("tail after purge", await read_through(tail, new[-1]), new, stored)

    c2 = await connect(token)
    resumed = await c2.js_sub("chat", "chat.room.123", start_seq=31)
    assert resumed.ok == {"position": new[0], "recovered": False}
    check_exact("resumed", await read_through(resumed, new[-1]), new, stored)
    again = await c2.js_sub("chat", "chat.room.123", start_seq=1)
    assert again.ok == {"position": new[0], "recovered": False}
    check_exact("from 1", await read_through(again, new[-1]), new, stored)
    await assert_nothing_more(c2, resumed, "resumed")
    await assert_nothing_more(c2, again, "from 1")
    await assert_nothing_more(tail_client, tail, "tail")


async def test_a_resume_on_a_recreated_stream_is_not_recovered(
    make_user: UserFactory, connect: ClientFactory, nc: NATS, settings: Settings
) -> None:
    """The stream deleted and recreated (as deployed: provisioning makes it again) after a
    full block of it was read: a resume past the new stream's end is `recovered: false`
    from position 1, and every reader gets the new stream's messages, never the old
    stream's (cached) ones under the same sequence numbers."""
    js = nc.jetstream()
    token = await make_user("reader", CHAT_ALL)
    old: Stored = {}
    await publish_all(js, [("chat.room.123", _payload(i, "old")) for i in range(OLD_N)], old)
    c1 = await connect(token)
    sub = await c1.js_sub("chat", "chat.room.123", start_seq=1, batch=1000)
    check_exact("old stream", await read_through(sub, 1050), list(range(1, 1051)), old)
    await c1.close()

    await js.delete_stream("chat")
    await natsio.provision(js, settings)
    stored: Stored = {}
    recreated = [("chat.room.123", _payload(i, "recreated")) for i in range(3)]
    assert await publish_all(js, recreated, stored) == [1, 2, 3]
    c2 = await connect(token)
    past = await c2.js_sub("chat", "chat.room.123", start_seq=1051)
    assert past.ok == {"position": 1, "recovered": False}
    check_exact("past the end", await read_through(past, 3), [1, 2, 3], stored)
    inside = await c2.js_sub("chat", "chat.room.123", start_seq=2)
    assert inside.ok["position"] == 2  # `recovered` cannot tell: seq 2 exists again
    check_exact("inside", await read_through(inside, 3), [2, 3], stored)
    whole = await c2.js_sub("chat", "chat.room.123", start_seq=1)
    assert whole.ok == {"position": 1, "recovered": True}
    check_exact("from 1", await read_through(whole, 3), [1, 2, 3], stored)
    for s in (past, inside, whole):
        await assert_nothing_more(c2, s, "recreated")


async def test_a_purge_while_a_reader_is_mid_history(
    make_user: UserFactory, gateway: Gateway, nc: NATS, opened: list[GatewayClient | RawClient]
) -> None:
    """A reader stopped part way through a long history (more than its buffers hold) while
    the stream is purged: once it reads again it gets, in order and once each, what was
    still delivered of the old messages (each with its own body), then every new one."""
    js = nc.jetstream()
    token = await make_user("reader", CHAT_ALL)
    stored: Stored = {}
    big = [("chat.room.123", _payload(i, "old", pad=32 * 1024)) for i in range(120)]  # 3.8 MB
    await publish_all(js, big, stored, chunk=16)
    raw = await RawClient.connect(gateway.url, token)
    opened.append(raw)
    ok = await raw.js_sub("chat", "chat.room.123", "mid", start_seq=1, batch=100)
    raw.pause()
    assert ok == {"position": 1, "recovered": True}
    await js.purge_stream("chat")
    fresh: Stored = {}
    await publish_all(js, [("chat.room.123", _payload(i, "new")) for i in range(5)], fresh)
    assert sorted(fresh) == [121, 122, 123, 124, 125]
    raw.resume()
    got = await raw.read_through("mid", 125)
    seqs = [e["data"]["seq"] for e in got]
    old = [s for s in seqs if s <= 120]
    assert seqs == [*old, 121, 122, 123, 124, 125], describe(seqs, [])
    assert all(a < b for a, b in itertools.pairwise(old)), describe(seqs, [])
    for e in got:
        source = stored if e["data"]["seq"] <= 120 else fresh
        assert e["data"]["payload"] == source[e["data"]["seq"]][1]
    assert raw.ws.close_code is None


# ------------------------------------------------------------- 5. the cache bound

CACHE_BOUND = 256 * 1024
H_STREAMS = 10
H_MESSAGES = 1100  # one full block and part of the next per stream; ~6x the bound in all
H_STARTS = (1, 1, 1, 1, 1, 1, 1, 1, 2, 300, 500, 700, 999, 1000, 1001, 1002, 1050, 1, 1, 1)


@pytest.fixture
async def small_cache_gateway(settings: Settings, nc: NATS) -> AsyncIterator[Gateway]:
    async with gateway_with(settings, js_history_bytes=CACHE_BOUND) as gw:
        yield gw


async def test_the_history_cache_stays_within_its_bound_under_200_readers(
    small_cache_gateway: Gateway,
    make_user: UserFactory,
    nc: NATS,
    opened: list[GatewayClient | RawClient],
) -> None:
    """200 clients read the history of 10 streams (allow_direct) at once with the cache
    bounded to 256 KiB (about a sixth of the streams' data): every client gets exactly its
    messages, and the cache's size, sampled at every message received, after every client
    finished and at the end, never exceeds the bound (and was used)."""
    js = nc.jetstream()
    hub = small_cache_gateway.hub
    assert hub is not None
    stored: dict[str, Stored] = {}
    for i in range(H_STREAMS):
        name = f"h{i}"
        await js.add_stream(api.StreamConfig(name=name, subjects=[f"{name}.>"], allow_direct=True))
        stored[name] = {}
        items = [(f"{name}.{'ab'[j % 2]}", _payload(j, name, pad=40)) for j in range(H_MESSAGES)]
        await publish_all(js, items, stored[name])
    caps = {"streams": {f"h{i}": [">"] for i in range(H_STREAMS)}}
    tokens = [await make_user(f"u{u}", caps) for u in range(5)]  # 40 connections each

    peak = 0

    def sample() -> None:
        nonlocal peak
        size = hub.history.cached_bytes
        assert isinstance(size, int)
        peak = max(peak, size)
        assert size <= CACHE_BOUND, f"history cache holds {size} bytes > {CACHE_BOUND}"

    async def one(n: int) -> None:
        stream = f"h{n % H_STREAMS}"
        start = H_STARTS[(n // H_STREAMS) % len(H_STARTS)]
        flt = ">" if n % 3 else f"{stream}.a"
        c = await open_client(small_cache_gateway.url, tokens[n % 5], opened)
        sub = await c.js_sub(stream, flt, start_seq=start, batch=(100, 1000, 250)[n % 3])
        assert sub.ok == {"position": start, "recovered": True}
        want = expected(stored[stream], flt, start)
        got: list[Envelope] = []
        async with asyncio.timeout(60):
            while not got or got[-1]["data"]["seq"] < want[-1]:
                env = await sub.queue.get()
                assert env["op"] == "js_msg", env
                got.append(env)
                sample()
        check_exact(f"client {n} {stream} [{flt}] from {start}", got, want, stored[stream])
        sample()

    await asyncio.gather(*(one(n) for n in range(200)))
    sample()
    assert peak > 0, "the history cache was never used"


# --------------------------------------------------------------- 6. a slow live reader


async def test_a_stopped_live_reader_is_not_closed_and_catches_up(
    make_user: UserFactory,
    gateway: Gateway,
    connect_ws: ClientFactory,
    nc: NATS,
    settings: Settings,
    opened: list[GatewayClient | RawClient],
) -> None:
    """A live js_sub whose client stops reading while 3 MiB is published on its filter
    (more than the outbox and both socket buffers hold): its outbox is never overfilled
    (no `send queue full` close, as a core or KV burst would get), and once it reads again
    it gets every message once, in order, then live. The socket's own write timeout is
    set long here: a frame stuck longer than it still closes the connection (docs/protocol.md,
    "Delivery and flow control"), which is not what this test is about."""
    js = nc.jetstream()
    token = await make_user()  # chat.room.123 is among alice's streams
    patient = msgspec.structs.replace(settings, write_timeout=120.0)
    slow_gateway = await Gateway(patient, host="127.0.0.1", port=0).__aenter__()
    try:
        # The fast reader on the same gateway process: once it has every message, that
        # process has handed every message on (to the stopped reader's subscription too).
        fast = await open_client(slow_gateway.url, token, opened)
        fast_sub = await fast.js_sub("chat", "chat.room.123")
        await _stopped_reader(slow_gateway, token, js, fast_sub, opened)
    finally:
        await slow_gateway.__aexit__(None, None, None)


async def _stopped_reader(
    gateway: Gateway,
    token: str,
    js: JetStreamContext,
    fast_sub: ClientSubscription,
    opened: list[GatewayClient | RawClient],
) -> None:
    raw = await RawClient.connect(gateway.url, token)
    opened.append(raw)
    ok = await raw.js_sub("chat", "chat.room.123", "slow")
    raw.pause()
    assert ok == {"position": 1, "recovered": True} == fast_sub.ok
    closes = backpressure_closes()

    stored: Stored = {}
    items = [("chat.room.123", _payload(i, "big", pad=16 * 1024)) for i in range(192)]
    seqs = await publish_all(js, items, stored, chunk=32)
    assert seqs == list(range(1, 193))
    # The fast reader has them all: the gateway has handed every message on.
    check_exact("fast", await read_through(fast_sub, 192, name="fast"), seqs, stored)
    raw.resume()
    got = await raw.read_through("slow", 192)
    check_exact("slow", got, seqs, stored)
    assert raw.ws.close_code is None
    assert backpressure_closes() == closes

    await publish_all(js, [("chat.room.123", _payload(999, "after"))], stored)
    check_exact("slow, live again", await raw.read_through("slow", 193), [193], stored)
    check_exact("fast, live", await read_through(fast_sub, 193), [193], stored)


# ------------------------------------------------------ 7. a stream without allow_direct


async def test_a_stream_without_direct_get_is_refused_as_unavailable(
    make_user: UserFactory, connect: ClientFactory, nc: NATS
) -> None:
    """A stream without allow_direct has no shared history: rather than a NATS consumer per
    subscription (growing with users to the stream's limit), its js_sub is `unavailable`,
    naming the setting, creates no consumer, and the session goes on."""
    js = nc.jetstream()
    await js.add_stream(api.StreamConfig(name="plain", subjects=["plain.>"], allow_direct=False))
    assert (await js.stream_info("plain")).config.allow_direct is not True
    await js.publish("plain.a", b"1")
    c = await connect(await make_user("reader", {"streams": {"plain": [">"]}}))
    for durable in (None, "d"):
        with pytest.raises(RequestError) as e:
            await c.js_sub("plain", "plain.a", start_seq=1, durable=durable)
        assert e.value.code == "unavailable" and "allow_direct" in e.value.reason
    assert (await js.stream_info("plain")).state.consumer_count == 0
    await c.ping()


# ------------------------------------------------------------- 8. ack: true redelivery

ACK_WAIT = 1.0


@pytest.fixture
async def ack_gateway(settings: Settings, nc: NATS) -> AsyncIterator[Gateway]:
    async with gateway_with(settings, js_ack_wait=ACK_WAIT) as gw:
        yield gw


async def test_unacked_messages_of_a_non_durable_are_redelivered(
    ack_gateway: Gateway,
    make_user: UserFactory,
    nc: NATS,
    opened: list[GatewayClient | RawClient],
) -> None:
    """`ack: true` without a durable: of two history and two live messages, the two left
    unacked come back with the same seq and body after the ack wait; acked ones may only
    come back as at-least-once duplicates, and nothing else arrives."""
    js = nc.jetstream()
    stored: Stored = {}
    await publish_all(js, [("chat.room.123", _payload(i, "acked")) for i in range(2)], stored)
    c = await open_client(ack_gateway.url, await make_user(), opened)
    sub = await c.js_sub("chat", "chat.room.123", start_seq=1, ack=True)
    assert sub.ok == {"position": 1, "recovered": True}
    await publish_all(js, [("chat.room.123", _payload(i, "acked")) for i in (2, 3)], stored)
    first = await read_through(sub, 4)
    check_exact("first delivery", first, [1, 2, 3, 4], stored)
    await sub.ack(1)
    await sub.ack(3)
    await c.ping()
    again: list[Envelope] = []
    async with asyncio.timeout(ACK_WAIT * 15):
        while not {2, 4} <= {e["data"]["seq"] for e in again}:
            env = await sub.get(timeout=ACK_WAIT * 15)
            assert env["op"] == "js_msg", env
            again.append(env)
    for e in again:
        seq = e["data"]["seq"]
        assert seq in (1, 2, 3, 4), e
        assert e["data"]["payload"] == stored[seq][1] and e["inbox"] == sub.inbox
    await sub.ack(2)
    await sub.ack(4)
    await c.ping()


async def test_an_unacked_live_message_is_redelivered_on_the_same_connection(
    ack_gateway: Gateway,
    make_user: UserFactory,
    nc: NATS,
    opened: list[GatewayClient | RawClient],
) -> None:
    """A message delivered LIVE (from the tail, the cursor caught up) and never acked comes
    back after the ack wait, while the connection stays open; an acked one does not."""
    js = nc.jetstream()
    stored: Stored = {}
    c = await open_client(ack_gateway.url, await make_user(), opened)
    sub = await c.js_sub("chat", "chat.room.123", ack=True)  # new messages only: live at once
    await publish_all(js, [("chat.room.123", _payload(0, "acked"))], stored)
    check_exact("acked", await read_through(sub, 1), [1], stored)
    await sub.ack(1)
    await c.ping()
    await publish_all(js, [("chat.room.123", _payload(1, "unacked"))], stored)
    check_exact("first", await read_through(sub, 2), [2], stored)
    again = await sub.get(timeout=ACK_WAIT * 15)
    assert again["op"] == "js_msg" and again["data"]["seq"] == 2, again
    assert again["data"]["payload"] == stored[2][1]
    await sub.ack(2)
    await c.ping()
    assert sub.get_nowait() is None
