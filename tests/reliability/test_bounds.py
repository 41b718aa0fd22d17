"""Bounds 1-3 (issue 14): JetStream readers and durables per user, the outbox in bytes,
and the memory of closed long-poll sessions. Each test asserts the bound as a count and
records the figures around it."""

from __future__ import annotations

import asyncio
import gc
import logging
import math
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import msgspec
import pytest
from nats.aio.client import Client as NATS
from nats.js.client import JetStreamContext
from websockets.exceptions import ConnectionClosed

from shared.capabilities import DURABLES_BUCKET
from shared.client import ClientSubscription, GatewayClient, RequestError
from shared.kvlist import live_entries
from shared.settings import Settings
from tests.gateway.conftest import ClientFactory, UserFactory
from tests.reliability.conftest import Figures, scale
from tests.reliability.helpers import open_raw, rss_kib, subscribe_raw
from tests.waits import until, until_async
from ws_gateway.poll import PollTransport
from ws_gateway.server import Gateway, WsTransport
from ws_gateway.session import Session

WIDE = {"subjects": ["chat.>"]}


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def _attempt(
    c: GatewayClient, op: str, target: str, data: dict[str, Any]
) -> tuple[str, dict[str, Any] | None]:
    """One subscribe request: ("ok", its data) or (the error code, None)."""
    try:
        reply = await c.request(op, target, data)
    except RequestError as e:
        return e.code, None
    return "ok", reply


async def _consumers(js: JetStreamContext, stream: str) -> int:
    return (await js.stream_info(stream)).state.consumer_count


def _sessions(gw: Gateway, uid: str) -> list[Session]:
    assert gw.hub is not None
    return list(gw.hub.by_user.get(uid, ()))


# ---------------------------------------------------------------------- B1. readers per user


async def test_js_readers_per_user_capped_and_released(
    gateway: Gateway,
    make_user: UserFactory,
    connect_ws: ClientFactory,
    nc: NATS,
    settings: Settings,
    figures: Figures,
) -> None:
    """One user's js_subs over several connections: MAX_READERS_PER_USER accepted, every one
    after it `limit` (a kv_sub too: they share the cap); another user is not affected; an
    ended one gives its slot back; all of them hold one NATS consumer (the stream's shared
    tail), gone once the connections close."""
    js = nc.jetstream()
    cap = settings.max_readers_per_user
    n_conns, attempts = 4, scale(cap + 16, cap + 96)
    baseline = await _consumers(js, "chat")
    token = await make_user("alice")
    conns = [await connect_ws(token) for _ in range(n_conns)]
    codes: dict[str, int] = {}
    accepted: list[tuple[GatewayClient, str]] = []
    for i in range(attempts):  # round robin over the connections: the cap is per user
        c = conns[i % n_conns]
        code, reply = await _attempt(
            c, "js_sub", "chat", {"filter": "chat.room.123", "start_seq": 1}
        )
        codes[code] = codes.get(code, 0) + 1
        if reply is not None:
            accepted.append((c, reply["inbox"]))
    peak = await _consumers(js, "chat")
    kv_code, _ = await _attempt(conns[0], "kv_sub", "todos", {"pattern": "user.alice.>"})
    other = await connect_ws(await make_user("bob"))
    other_code, _ = await _attempt(other, "js_sub", "chat", {"filter": "chat.room.123"})
    c0, inbox0 = accepted[0]
    await c0.request("unsub", inbox=inbox0)
    again, _ = await _attempt(c0, "js_sub", "chat", {"filter": "chat.room.456"})
    after_again = await _consumers(js, "chat")
    for c in [*conns, other]:
        await c.close()

    async def released() -> bool:
        return await _consumers(js, "chat") == baseline

    took = await until_async(released, "the stream's consumers to be back to baseline", 30)
    after = await _consumers(js, "chat")
    assert gateway.hub is not None
    held = dict(gateway.hub._readers)
    figures.add(
        "B1",
        "test_js_readers_per_user_capped_and_released",
        f"one user opens {attempts} js_subs round robin over {n_conns} connections "
        f"(MAX_READERS_PER_USER={cap}), then a kv_sub; another user a js_sub; one unsub and "
        "one more js_sub; then every connection closes",
        f"{codes.get('ok', 0)} accepted, {codes.get('limit', 0)} refused `limit` "
        f"(kv_sub after: {kv_code}; other user: {other_code}; after one unsub: {again}); "
        f"chat consumers {baseline} before, {peak} at peak, {after} after close "
        f"({took * 1000:.0f} ms to release); reader slots held after: {sum(held.values())}",
        accepted=codes.get("ok", 0),
        refused=codes.get("limit", 0),
        consumers_baseline=baseline,
        consumers_peak=peak,
        consumers_after_close=after,
    )
    assert codes == {"ok": cap, "limit": attempts - cap}, codes
    assert peak == baseline + 1  # every js_sub of the process shares the stream's tail
    assert (kv_code, other_code, again) == ("limit", "ok", "ok")
    assert after_again == baseline + 1
    assert after == baseline
    assert held == {}


async def test_durables_per_user_capped_and_kept(
    gateway: Gateway,
    make_user: UserFactory,
    connect_ws: ClientFactory,
    nc: NATS,
    settings: Settings,
    figures: Figures,
) -> None:
    """Durable js_subs: MAX_DURABLES_PER_USER new durables per user and stream, then `limit`;
    they outlive the connections as records in gw_durables (no NATS consumer each: the
    stream holds only the shared tail while they are open, nothing after), resuming an
    existing one is free, a new one is still refused."""
    js = nc.jetstream()
    cap = settings.max_durables_per_user
    n_conns, attempts = 2, scale(cap + 4, cap + 24)
    baseline = await _consumers(js, "chat")

    async def records() -> int:
        found = await live_entries(js, DURABLES_BUCKET, values=False, pattern="chat.alice.*")
        return len(found)

    token = await make_user("alice")
    conns = [await connect_ws(token) for _ in range(n_conns)]
    codes: dict[str, int] = {}
    for i in range(attempts):
        code, _ = await _attempt(
            conns[i % n_conns], "js_sub", "chat", {"filter": "chat.room.123", "durable": f"d{i}"}
        )
        codes[code] = codes.get(code, 0) + 1
    peak_records = await records()
    peak = await _consumers(js, "chat")
    for c in conns:
        await c.close()

    async def left() -> bool:
        return not _sessions(gateway, "alice") and await _consumers(js, "chat") == baseline

    took = await until_async(left, "the sessions gone and the stream's tail released", 30)
    kept = await records()
    after = await _consumers(js, "chat")
    c = await connect_ws(token)
    bind_code, _ = await _attempt(c, "js_sub", "chat", {"filter": "chat.room.123", "durable": "d0"})
    new_code, _ = await _attempt(
        c, "js_sub", "chat", {"filter": "chat.room.123", "durable": f"d{attempts}"}
    )
    figures.add(
        "B1",
        "test_durables_per_user_capped_and_kept",
        f"one user asks for {attempts} new durables on stream chat over {n_conns} connections "
        f"(MAX_DURABLES_PER_USER={cap}); the connections close; then a reconnect resumes d0 "
        "and asks for one more new durable",
        f"{codes.get('ok', 0)} accepted, {codes.get('limit', 0)} refused `limit`; durable "
        f"records {peak_records} at peak with {peak} NATS consumers on chat (baseline "
        f"{baseline}), {kept} records kept after close with {after} consumers (released in "
        f"{took * 1000:.0f} ms); resuming d0: {bind_code}, a new one: {new_code}",
        accepted=codes.get("ok", 0),
        refused=codes.get("limit", 0),
        durables_peak=peak_records,
        durables_after_close=kept,
        consumers_peak=peak,
        consumers_after_close=after,
    )
    assert codes == {"ok": cap, "limit": attempts - cap}, codes
    assert peak_records == cap and peak == baseline + 1
    assert kept == cap and after == baseline
    assert (bind_code, new_code) == ("ok", "limit")


# ---------------------------------------------------------------------- B2. outbox in bytes


async def test_outbox_bounded_in_bytes_closes_a_stopped_reader_1013(
    gateway: Gateway,
    make_user: UserFactory,
    connect_ws: ClientFactory,
    nc: NATS,
    settings: Settings,
    figures: Figures,
) -> None:
    """A client that stops reading while 100 KiB messages arrive on its subject is closed
    1013 (backpressure) with at most SEND_QUEUE_BYTES queued for it; a reading client on
    the same subject gets every message and stays."""
    size = 100 * 1024
    bound = settings.send_queue_bytes
    limit_msgs = 64 * (1 << 20) // size  # 64 MiB: far past any buffer on the way
    after_close = scale(10, 40)
    reader = await connect_ws(await make_user("reader", WIDE))
    rsub = await reader.sub("chat.bulk")
    ws = await open_raw(gateway.url, await make_user("slow", WIDE))
    got: list[int] = []
    # Its own handler, not caplog: `make reliability` runs without pytest's logging plugin.
    records = _Records()
    session_log = logging.getLogger("ws_gateway.session")
    level = session_log.level
    session_log.setLevel(logging.INFO)
    session_log.addHandler(records)

    def payload(i: int) -> bytes:
        head = b'{"i":%d,"pad":"' % i
        return head + b"y" * (size - len(head) - 2) + b'"}'

    async def publish(i: int) -> None:
        await nc.publish("chat.bulk", payload(i))
        env = await rsub.get(timeout=20)  # the reader has it: the slow one was pushed it too
        got.append(env["data"]["payload"]["i"])

    try:
        await subscribe_raw(ws, "chat.bulk")
        (slow,) = _sessions(gateway, "slow")
        wt = slow.transport
        assert isinstance(wt, WsTransport)
        ws.transport.pause_reading()
        peak_queued = peak_buffered = 0
        published = 0
        while published < limit_msgs and not slow.closed:
            await publish(published)
            published += 1
            peak_queued = max(peak_queued, slow.outbox.queued_bytes)
            peak_buffered = max(peak_buffered, wt._transport.get_write_buffer_size())
        before_close = published
        for _ in range(after_close):
            await publish(published)
            published += 1
        await until(lambda: slow not in _sessions(gateway, "slow"), "the slow session to end")
        ws.transport.resume_reading()
        client_code: int | None = None
        try:
            async with asyncio.timeout(10):
                while True:
                    await ws.recv()
        except ConnectionClosed:
            client_code = ws.close_code
        except TimeoutError:
            client_code = None
    finally:
        ws.transport.abort()
        session_log.removeHandler(records)
        session_log.setLevel(level)
    why = [
        getattr(r, "why", "?")
        for r in records.records
        if r.getMessage() == "slow client" and getattr(r, "session", None) == slow.id
    ]
    figures.add(
        "B2",
        "test_outbox_bounded_in_bytes_closes_a_stopped_reader_1013",
        f"a client subscribes and stops reading (its socket paused) while {size // 1024} KiB "
        f"messages are published one by one (SEND_QUEUE_BYTES={bound // 1024} KiB, "
        f"SOCKET_SEND_BUFFER={settings.socket_send_buffer // 1024} KiB); a second client "
        "reads the same subject",
        f"closed {slow.close_code} ({', '.join(why)}) after {before_close} messages "
        f"({before_close * size / 2**20:.1f} MiB published); held for it at most "
        f"{peak_queued // 1024} KiB queued + "
        f"{peak_buffered // 1024} KiB in its transport buffer (bound {bound // 1024} KiB + "
        f"kernel); the client saw close {client_code}; the reader got {len(got)}/{published} "
        f"in order, not closed",
        published_before_close=before_close * size,
        outbox_bound=bound,
        peak_queued=peak_queued,
        peak_transport_buffer=peak_buffered,
        close_code=slow.close_code,
        why=why,
        client_close_code=client_code,
    )
    assert slow.close_code == 1013 and len(why) == 1
    assert before_close < limit_msgs
    assert peak_queued <= bound
    assert got == list(range(published))
    assert reader.close_code is None and rsub.queue.empty()


async def test_burst_of_small_messages_closes_no_reader(
    gateway: Gateway,
    make_user: UserFactory,
    connect_ws: ClientFactory,
    nc: NATS,
    settings: Settings,
    figures: Figures,
) -> None:
    """2,000 ~200-byte messages published as fast as possible to many reading clients:
    with the default bounds no client is closed and every one receives all of them, in
    order."""
    n_clients, n_msgs = scale(50, 200), 2000
    per_user = 50
    tokens = [await make_user(f"burst{k}", WIDE) for k in range(math.ceil(n_clients / per_user))]
    clients: list[GatewayClient] = []
    subs: list[ClientSubscription] = []
    for i in range(n_clients):
        c = await connect_ws(tokens[i // per_user])
        clients.append(c)
        subs.append(await c.sub("chat.burst"))
    sessions = [s for k in range(len(tokens)) for s in _sessions(gateway, f"burst{k}")]
    assert len(sessions) == n_clients
    peak_queued = 0

    def delivered() -> bool:
        nonlocal peak_queued
        peak_queued = max([peak_queued, *(s.outbox.queued_bytes for s in sessions)])
        return all(s.queue.qsize() >= n_msgs for s in subs) or any(s.closed for s in sessions)

    loop = asyncio.get_running_loop()
    t0 = loop.time()
    pad = b"z" * 170
    for i in range(n_msgs):
        await nc.publish("chat.burst", b'{"i":%d,"pad":"%s"}' % (i, pad))
    await nc.flush()
    published_in = loop.time() - t0
    await until(delivered, "every reader to receive the burst", 120)
    took = loop.time() - t0
    closes = sum(1 for s in sessions if s.closed) + sum(
        1 for c in clients if c.close_code is not None
    )
    in_order = 0
    counts = []
    for s in subs:
        seq = [s.queue.get_nowait()["data"]["payload"]["i"] for _ in range(s.queue.qsize())]
        counts.append(len(seq))
        in_order += seq == list(range(n_msgs))
    figures.add(
        "B2",
        "test_burst_of_small_messages_closes_no_reader",
        f"{n_msgs} messages of ~200 B published back to back (in {published_in * 1000:.0f} ms) "
        f"to {n_clients} reading clients, one gateway in-process, default bounds "
        f"(SEND_QUEUE_BYTES={settings.send_queue_bytes // 1024} KiB)",
        f"closes: {closes}; every client received {min(counts)}..{max(counts)} messages "
        f"({sum(counts)} in all, {in_order}/{n_clients} complete and in order) within "
        f"{took * 1000:.0f} ms; peak queued per connection {peak_queued // 1024} KiB",
        closes=closes,
        received=sum(counts),
        clients=n_clients,
        peak_queued=peak_queued,
    )
    assert closes == 0
    assert counts == [n_msgs] * n_clients
    assert in_order == n_clients


# ---------------------------------------------------------------------- B3. long-poll memory

PAD = b'{"pad":"' + b"p" * 8192 + b'"}'


@pytest.fixture(params=["count", "bytes"])
async def poll_gateway(
    request: pytest.FixtureRequest, settings: Settings, nc: NATS
) -> AsyncIterator[Gateway]:
    """A gateway whose closed-session caps bind at this scale: the count (a quarter of the
    sessions opened) or the bytes (about 64 sessions' buffers)."""
    n = scale(200, 1000)
    if request.param == "count":
        s = msgspec.structs.replace(settings, poll_closed_keep_max=n // 4)
    else:
        s = msgspec.structs.replace(settings, poll_closed_keep_bytes=64 * (len(PAD) + 1024))
    async with Gateway(s, host="127.0.0.1", port=0) as gw:
        yield gw


def _sid(i: int) -> str:
    return f"bounds-poll-{i:06d}-0123456789"


async def test_closed_poll_sessions_memory_is_bounded(
    poll_gateway: Gateway, make_user: UserFactory, nc: NATS, figures: Figures
) -> None:
    """Many long-poll sessions opened, given buffered frames, and closed: the closed ones the
    process still holds stay within POLL_CLOSED_KEEP_MAX and POLL_CLOSED_KEEP_BYTES; the
    newest closed ones are still fetchable, the oldest answer 404."""
    gw = poll_gateway
    poll = gw.poll
    assert poll is not None
    s = gw.settings
    n, batch = scale(200, 1000), 50  # at most 50 open at once: under the per-user cap
    auth = {"Authorization": f"Bearer {await make_user('poller', WIDE)}"}
    sub = b'{"op":"sub","target":"chat.poll","inbox":"s"}\n{"op":"ping","inbox":"p"}'
    gc.collect()
    rss_before = peak_rss = rss_kib()
    async with aiohttp.ClientSession() as http:

        async def post(path: str, sid: str, data: bytes | None = None) -> int:
            async with http.post(
                f"{gw.poll_url}/{path}", params={"sid": sid}, data=data, headers=auth
            ) as r:
                await r.read()
                return r.status

        statuses: dict[int, int] = {}
        for start in range(0, n, batch):
            sids = [_sid(i) for i in range(start, min(n, start + batch))]
            for st in await asyncio.gather(*(post("open", sid) for sid in sids)):
                statuses[st] = statuses.get(st, 0) + 1
            for st in await asyncio.gather(*(post("send", sid, sub) for sid in sids)):
                statuses[st] = statuses.get(st, 0) + 1
            # `ok` is buffered before /poll/send answers: every session is subscribed.
            await nc.publish("chat.poll", PAD)
            ts = [poll.transports[sid] for sid in sids]

            def buffered(ts: list[PollTransport] = ts) -> bool:
                return all(t.size > len(PAD) for t in ts)

            await until(buffered, "the message to be buffered by every session")
            peak_rss = max(peak_rss, rss_kib())
            for st in await asyncio.gather(*(post("close", sid) for sid in sids)):
                statuses[st] = statuses.get(st, 0) + 1

        async def get(sid: str) -> int:
            params = {"sid": sid, "after": "0", "wait": "0"}
            async with http.get(gw.poll_url, params=params, headers=auth) as r:
                await r.read()
                return r.status

        oldest, newest = await get(_sid(0)), await get(_sid(n - 1))
    closed = [t for t in poll.transports.values() if t.close_code is not None]
    open_left = len(poll.transports) - len(closed)
    held = sum(t.retained for t in closed)
    gc.collect()
    rss_after = rss_kib()
    per_session = held / max(1, len(closed))
    mode = "count" if s.poll_closed_keep_max < n else "bytes"
    figures.add(
        "B3",
        f"test_closed_poll_sessions_memory_is_bounded[{mode}]",
        f"{n} long-poll sessions opened ({batch} at a time), each subscribed, sent a ping and "
        f"an {len(PAD) // 1024} KiB message, then closed; POLL_CLOSED_KEEP_MAX="
        f"{s.poll_closed_keep_max}, POLL_CLOSED_KEEP_BYTES={s.poll_closed_keep_bytes // 1024} "
        "KiB",
        f"{len(closed)} closed sessions held ({held // 1024} KiB, ~{per_session / 1024:.1f} "
        f"KiB each; {n - len(closed)} dropped, ~{n * per_session / 2**20:.1f} MiB uncapped), "
        f"{open_left} open; oldest sid: {oldest}, newest: {newest}; process RSS (gateway and "
        f"test in one process) {rss_before // 1024} MiB before, {peak_rss // 1024} MiB at the "
        f"largest batch end, {rss_after // 1024} MiB after "
        f"({(rss_after - rss_before) / 1024:+.1f} MiB)",
        sessions=n,
        closed_held=len(closed),
        held_bytes=held,
        rss_growth_kib=rss_after - rss_before,
        rss_peak_growth_kib=peak_rss - rss_before,
    )
    assert statuses == {200: n, 204: 2 * n}, statuses
    assert open_left == 0
    assert len(closed) <= s.poll_closed_keep_max
    assert held <= s.poll_closed_keep_bytes
    assert held == poll.gone_bytes and len(closed) == len(poll.gone)
    assert 0 < len(closed) < n  # the cap bound: some were dropped, the newest kept
    assert (oldest, newest) == (404, 200)
    if s.poll_closed_keep_max < n:
        assert len(closed) == s.poll_closed_keep_max
