"""Reliability 1, 2, 7, 8, 9 against an in-process gateway/API and a real nats-server:
NATS restart mid-stream, revocation during an outage, half-open TCP, leak soak, lost
updates."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import os
import time
from collections.abc import AsyncIterator

import msgspec
import pytest
from nats.aio.client import Client as NATS
from websockets.asyncio.client import connect as ws_connect

from shared.client import GatewayClient, RequestError
from shared.natsio import buckets, nats_connect
from shared.settings import Settings
from shared.users import REVOKED_BUCKET
from tests.api.conftest import Api
from tests.gateway.conftest import ALICE_CAPS, UserFactory
from tests.natsd import NatsServer
from tests.reliability.conftest import FULL, Figures, scale
from tests.reliability.helpers import TcpRelay, fd_count, ms, rss_kib, split, until, until_async
from ws_gateway.server import Gateway


class Feed:
    """Publishes JetStream, KV and core messages at a steady pace until stopped; every
    JetStream/KV write is retried with the same id until acknowledged (idempotent)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.js_acked: list[int] = []
        self.kv_acked: list[int] = []
        self.kv_key: dict[int, str] = {}  # revision -> key
        self.core_sent: list[int] = []
        self.stop = asyncio.Event()
        self.nc: NATS | None = None

    async def run(self) -> None:
        async def quiet(e: Exception) -> None:
            pass  # nats-py's default logs a traceback per reconnect attempt (5 a second)

        self.nc = await nats_connect(
            self.url,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.2,
            connect_timeout=1,
            error_cb=quiet,
        )
        js = self.nc.jetstream(timeout=1)
        for i in itertools.count():
            if self.stop.is_set():
                break
            while not self.stop.is_set() or i < 1:
                try:
                    ack = await js.publish(
                        "chat.room.123", b'{"n":%d}' % i, headers={"Nats-Msg-Id": f"r1-{i}"}
                    )
                    self.js_acked.append(ack.seq)
                    key = f"user.alice.k{i % 5}"
                    ack = await js.publish(
                        f"$KV.todos.{key}", b'{"n":%d}' % i, headers={"Nats-Msg-Id": f"kv-{i}"}
                    )
                    self.kv_acked.append(ack.seq)
                    self.kv_key[ack.seq] = key
                    break
                except Exception:
                    await asyncio.sleep(0.1)
            if self.nc.is_connected:
                try:
                    await self.nc.publish("chat.room.1", b'{"core":%d}' % i)
                    self.core_sent.append(i)
                except Exception:
                    pass
            await asyncio.sleep(0.02)  # a steady pace, not synchronisation

    async def close(self) -> None:
        if self.nc is not None:
            await self.nc.close()


async def test_nats_restart_mid_stream(
    make_user: UserFactory,
    gateway: Gateway,
    nats_server: NatsServer,
    figures: Figures,
) -> None:
    """Core continues, KV and JetStream resume with no gap/duplicate, requests during the
    outage get `unavailable`, and (full run) a > 2 minute outage is survived in-process."""
    hub = gateway.hub
    assert hub is not None
    # RELIABILITY_OUTAGE: seconds, to reproduce a failure at another outage length
    outage = float(os.environ.get("RELIABILITY_OUTAGE") or (125.0 if FULL else 2.0))
    token = await make_user()
    c = await GatewayClient.connect(gateway.url, token=token, record=True)
    core = await c.sub("chat.room.1")
    kv = await c.kv_sub("todos", "user.alice.>")
    jsub = await c.js_sub("chat", "chat.room.123", batch=50)
    feed = Feed(nats_server.url)
    task = asyncio.create_task(feed.run())
    core_got: list[tuple[float, int]] = []
    js_got: list[tuple[float, int]] = []
    kv_got: list[tuple[float, int]] = []
    kv_keys: dict[int, str] = {}

    async def drain() -> None:
        assert c.envelopes is not None
        while True:
            e = await c.envelopes.get()
            now = time.monotonic()
            if e["op"] == "sub_msg":
                core_got.append((now, e["data"]["payload"]["core"]))
            elif e["op"] == "js_msg":
                js_got.append((now, e["data"]["seq"]))
            elif e["op"] == "kv_msg" and e["data"]["op"] == "put":
                kv_got.append((now, e["data"]["revision"]))
                kv_keys[e["data"]["revision"]] = e["data"]["key"]

    drainer = asyncio.create_task(drain())
    unavailable: dict[str, str] = {}
    try:
        await until(lambda: len(js_got) >= 10 and len(core_got) >= 10, "traffic before", 20)
        nats_server.stop()
        down_at = time.monotonic()
        await until(lambda: not hub.nats_ready, "the gateway to see NATS down")
        for op, args in [
            ("sub", ("chat.room.2",)),
            ("kv_sub", ("todos", "user.alice.x.>")),
            ("js_sub", ("chat", "chat.room.456")),
        ]:
            try:
                await getattr(c, op)(*args)
                unavailable[op] = "ok"
            except RequestError as e:
                unavailable[op] = e.code
        await c.ping()  # the connection itself stays
        remaining = outage - (time.monotonic() - down_at)
        if remaining > 0:
            await asyncio.sleep(remaining)  # the outage itself, not synchronisation
        nats_server.start()
        up_at = time.monotonic()
        ready = asyncio.create_task(until(lambda: hub.nats_ready, "the gateway to reconnect", 60))
        acked_before = list(feed.kv_acked)
        lost_by_server = await _not_stored(nats_server.url, acked_before)
        ready_s = await ready
        await until(lambda: any(t > up_at for t, _ in core_got), "core after restart", 60)
        await until(lambda: any(t > up_at for t, _ in js_got), "JetStream after restart", 60)
        await until(lambda: any(t > up_at for t, _ in kv_got), "KV after restart", 60)
        n_after = len(feed.js_acked) + 20
        await until(lambda: len(feed.js_acked) >= n_after, "more writes after restart", 60)
        feed.stop.set()
        await task
        await until(lambda: {s for _, s in js_got} >= set(feed.js_acked), "every JS seq", 60)
        last_kv = feed.kv_acked[-1]
        await until(lambda: any(r == last_kv for _, r in kv_got), "the last KV revision", 60)
    finally:
        if nats_server.proc is None:  # failed mid-outage: leave the module a server
            nats_server.start()
        feed.stop.set()
        await asyncio.gather(task, return_exceptions=True)
        drainer.cancel()
        await asyncio.gather(drainer, return_exceptions=True)
        await feed.close()
        await c.close()
    js_seqs = [s for _, s in js_got]
    dup = len(js_seqs) - len(set(js_seqs))
    gap = sorted(set(feed.js_acked) - set(js_seqs))
    kv_revs = [r for _, r in kv_got]
    # A KV watch delivers every key's changes, but a revision superseded and trimmed by the
    # bucket's history (todos keeps 5 per key) while the gateway was cut off is no longer in
    # the stream: NATS's own watchers skip it too. Such a skip is allowed only when the
    # client then got a later revision of the same key; anything else is a lost change.
    latest: dict[str, int] = {}
    for r in kv_revs:
        latest[kv_keys[r]] = max(latest.get(kv_keys[r], 0), r)
    history = next(b.history for b in buckets(gateway.settings) if b.name == "todos")
    resumed_from = max((r for t, r in kv_got if t < up_at), default=0)
    resumed_at = min((r for t, r in kv_got if t > up_at), default=0)

    def trimmed(r: int) -> bool:
        """Could only have left the stream by history: skipped at the one resume point,
        with at least `history` later revisions of its key, one of them delivered."""
        later = [r2 for r2 in feed.kv_acked if r2 > r and feed.kv_key[r2] == feed.kv_key[r]]
        return resumed_from < r < resumed_at and len(later) >= history and any(
            r2 in kv_keys for r2 in later
        )

    kv_skipped = sorted(set(feed.kv_acked) - set(kv_revs))
    kv_superseded = [r for r in kv_skipped if trimmed(r)]
    kv_missing = [r for r in kv_skipped if r not in kv_superseded]
    final_state = {k: max(r for r in feed.kv_acked if feed.kv_key[r] == k) for k in latest}
    first = {
        name: min(t for t, _ in got if t > up_at) - up_at
        for name, got in (("core", core_got), ("JetStream", js_got), ("KV", kv_got))
    }
    figures.add(
        "R1",
        "test_nats_restart_mid_stream",
        f"nats-server stopped for {outage:.0f} s under a steady JetStream + KV + core feed; "
        "sub/kv_sub/js_sub requested during the outage; the gateway process is never restarted",
        f"during outage: {unavailable}; after restart: gateway ready in {ms(ready_s)}, first "
        + ", ".join(f"{k} msg {ms(v)}" for k, v in first.items())
        + f"; JetStream {len(feed.js_acked)} acked, gaps {len(gap)}, duplicates {dup}; KV "
        f"{len(feed.kv_acked)} acked, missing {len(kv_missing)}"
        + (f" (revisions {kv_missing[:10]})" if kv_missing else "")
        + f", superseded revisions trimmed by history before the gateway was back "
        f"{len(kv_superseded)}, duplicates {len(kv_revs) - len(set(kv_revs))}, "
        f"final value of every key delivered: {latest == final_state}"
        + "; acknowledged KV writes the restarted server no longer had: "
        + str(lost_by_server),
        gap=gap[:20],
        kv_missing=kv_missing[:20],
        kv_received=kv_revs,  # in arrival order: where a gap sits says what skipped it
        kv_acked_before_restart=acked_before,
    )
    assert unavailable == {"sub": "unavailable", "kv_sub": "unavailable", "js_sub": "unavailable"}
    assert gap == [] and dup == 0
    assert sorted(js_seqs) == js_seqs
    assert kv_missing == []
    assert latest == final_state  # the client ends with every key's last acknowledged value
    assert len(kv_revs) == len(set(kv_revs)) and sorted(kv_revs) == kv_revs
    assert c.close_code in (None, 1000)
    # the subscriptions the client kept throughout: none revoked, none ended by an error
    kept = (core, kv, jsub)
    assert [(s.revoked.is_set(), s.error) for s in kept] == [(False, None)] * 3
    assert all(c.subs.get(s.inbox) is s for s in kept)


async def _not_stored(url: str, seqs: list[int]) -> list[int]:
    """The KV_todos sequences (acknowledged before a restart) the server no longer has."""
    probe = await nats_connect(url, connect_timeout=2, max_reconnect_attempts=30)
    try:
        js = probe.jetstream(timeout=2)
        for _ in range(100):  # JetStream takes a moment to recover its streams
            try:
                await js.stream_info("KV_todos")
                break
            except Exception:
                await asyncio.sleep(0.1)
        gone = []
        for seq in seqs:
            try:
                await js.get_msg("KV_todos", seq)
            except Exception:
                gone.append(seq)
        return gone
    finally:
        await probe.close()


@pytest.fixture
async def relay(nats_server: NatsServer) -> AsyncIterator[TcpRelay]:
    r = await TcpRelay(nats_server.port).start()
    try:
        yield r
    finally:
        await r.close()


@pytest.mark.parametrize("history", ["record-before-gateway", "record-after-gateway"])
async def test_revocation_during_a_nats_outage_is_applied_before_delivery(
    settings: Settings,
    nc: NATS,
    make_user: UserFactory,
    relay: TcpRelay,
    figures: Figures,
    history: str,
) -> None:
    """Capabilities removed while the gateway is cut from NATS: on reconnect they are
    applied (full re-read) before anything is delivered; canaries never arrive."""
    s = msgspec.structs.replace(settings, nats_url=(f"nats://127.0.0.1:{relay.port}",))
    rounds = scale(3, 10)
    if history == "record-before-gateway":
        token = await make_user("alice", ALICE_CAPS)
    async with Gateway(s, host="127.0.0.1", port=0) as gw:
        hub = gw.hub
        assert hub is not None
        if history == "record-after-gateway":
            token = await make_user("alice", ALICE_CAPS)
        js = nc.jetstream()
        applied: list[float] = []
        leaked: list[str] = []
        revoked_ok = 0
        canaries = 0
        for r in range(rounds):
            if r:  # give the capabilities back for the next round
                await make_user("alice", ALICE_CAPS)
            await until(lambda: hub.nats_ready, "the gateway to be connected")
            c = await GatewayClient.connect(gw.url, token=token, record=True)
            subs = [
                await c.sub("chat.room.1"),
                await c.kv_sub("todos", "user.alice.>"),
                await c.js_sub("chat", "chat.room.123"),
            ]
            await c.cap_updates.get()  # the first one
            relay.cut()
            await until(lambda: not hub.nats_ready, "the gateway to see the cut")
            # While it is cut: the user loses chat.room.*, the chat stream and todos.
            await make_user(
                "alice", {"subjects": ["articles.>"], "buckets": {"articles": [">"]}, "streams": {}}
            )
            stop = asyncio.Event()
            # per round: a later round's kv_sub rightly sees earlier rounds' values
            marker = f'"canary-{r}"'.encode()

            async def publish_canaries(stop: asyncio.Event = stop, marker: bytes = marker) -> None:
                nonlocal canaries
                for i in itertools.count():
                    if stop.is_set():
                        return
                    await nc.publish("chat.room.1", marker)
                    await js.publish("chat.room.123", marker)
                    await js.publish(f"$KV.todos.user.alice.c{i % 3}", marker)
                    canaries += 3
                    await asyncio.sleep(0.005)

            publisher = asyncio.create_task(publish_canaries())
            relay.restore()
            t0 = time.monotonic()
            update = None
            try:
                update = await asyncio.wait_for(c.cap_updates.get(), 10)
                applied.append(time.monotonic() - t0)
                await asyncio.sleep(0.3)  # keep publishing a little after it: the point
            except TimeoutError:
                pass
            finally:
                stop.set()
                await publisher
            await c.ping()
            assert c.envelopes is not None
            while not c.envelopes.empty():
                e = c.envelopes.get_nowait()
                if e["op"] in ("sub_msg", "js_msg", "kv_msg") and marker in (
                    msgspec.json.encode(e)
                ):
                    leaked.append(e["op"])
            if update is not None:
                revoked = {r["inbox"] for r in update["data"]["revoked"]}
                revoked_ok += revoked == {sub.inbox for sub in subs}
            await c.close()
    figures.add(
        "R2",
        f"test_revocation_during_a_nats_outage_is_applied_before_delivery[{history}]",
        "the gateway's NATS link is cut (TCP relay); alice loses chat.room.*, the chat stream "
        f"and todos meanwhile; canaries on all three from the moment the link comes back "
        f"({rounds} rounds; the user record written {history.replace('-', ' ')} started)",
        f"revocation applied in {len(applied)} of {rounds} rounds "
        f"({', '.join(ms(a) for a in applied) or 'never'} after the link came back); "
        f"{revoked_ok} rounds revoked all 3 subscriptions; {canaries} canaries published, "
        f"{len(leaked)} delivered ({sorted(set(leaked))})",
    )
    assert len(applied) == rounds and revoked_ok == rounds
    assert leaked == []


async def test_a_logout_during_a_nats_outage_is_applied_on_reconnect(
    settings: Settings, nc: NATS, make_user: UserFactory, relay: TcpRelay, figures: Figures
) -> None:
    """A token revoked while the gateway is cut off from NATS: its sockets are closed 4401
    once the link is back, and a new upgrade with it is refused (the gateway's in-memory
    list of revoked tokens is listed again after every reconnect, not trusted stale)."""
    s = msgspec.structs.replace(settings, nats_url=(f"nats://127.0.0.1:{relay.port}",))
    from websockets.exceptions import InvalidStatus

    async with Gateway(s, host="127.0.0.1", port=0) as gw:
        hub = gw.hub
        assert hub is not None
        token, other = await make_user(), await make_user()
        doomed = await GatewayClient.connect(gw.url, token=token)
        kept = await GatewayClient.connect(gw.url, token=other)
        relay.cut()
        await until(lambda: not hub.nats_ready, "the gateway to see the cut")
        jti = hub.verifier.verify(token).jti
        await (await nc.jetstream().key_value(REVOKED_BUCKET)).put(jti, b"1")
        relay.restore()
        t0 = time.monotonic()
        code = await asyncio.wait_for(doomed.wait_closed(), 30)
        closed_after = time.monotonic() - t0
        with pytest.raises(InvalidStatus) as e:
            await GatewayClient.connect(gw.url, token=token)
        await kept.ping()
        await kept.close()
    figures.add(
        "R2",
        "test_a_logout_during_a_nats_outage_is_applied_on_reconnect",
        "a token revoked (logout) while the gateway's NATS link is cut; then the link is back",
        f"its socket closed {code} {ms(closed_after)} after the link came back; a new upgrade "
        f"with it: HTTP {e.value.response.status_code}; another user's socket kept",
    )
    assert code == 4401
    assert e.value.response.status_code == 401


async def test_half_open_client_is_detected_and_freed(
    settings: Settings, nc: NATS, make_user: UserFactory, figures: Figures
) -> None:
    """A client that goes silent without closing is closed 1008 by the heartbeat and every
    NATS resource it held is released."""
    interval = 2.0 if FULL else 0.5
    s = msgspec.structs.replace(settings, ping_interval=interval)
    js = nc.jetstream()
    async with Gateway(s, host="127.0.0.1", port=0) as gw:
        hub = gw.hub
        assert hub is not None
        base_subs = len(hub.nc._subs)
        base_consumers = (await js.stream_info("chat")).state.consumer_count
        token = await make_user()
        ws = await ws_connect(
            gw.url, additional_headers={"Authorization": f"Bearer {token}"}, ping_interval=None
        )
        for req in (
            '{"op":"sub","target":"chat.room.1","inbox":"a"}',
            '{"op":"kv_sub","target":"todos","inbox":"b","data":{"pattern":"user.alice.>"}}',
            '{"op":"js_sub","target":"chat","inbox":"c","data":{"filter":"chat.room.123"}}',
        ):
            await ws.send(req)
        oks: set[str] = set()
        async with asyncio.timeout(10):
            while len(oks) < 3:
                oks |= {e["inbox"] for e in split(await ws.recv()) if e["op"] == "ok"}
        session = next(iter(hub.sessions))
        held = (len(hub.router), len(hub.nc._subs) - base_subs)
        # Silent from now on: no frame, no pong, and nothing read (the kernel buffers fill).
        ws.transport.pause_reading()
        t0 = time.monotonic()
        await until(lambda: session.close_code is not None, "the heartbeat to close it", 30)
        detected = time.monotonic() - t0
        await until(lambda: not hub.closing and not hub.sessions, "release", 10)
        freed = time.monotonic() - t0

        async def consumers() -> int:
            return (await js.stream_info("chat")).state.consumer_count

        async def consumers_back() -> bool:
            return await consumers() == base_consumers

        with contextlib.suppress(AssertionError):  # one still there is counted in `left`
            await until_async(consumers_back, "the JetStream consumer to be deleted", 10)
        left = (len(hub.router), len(hub.nc._subs) - base_subs, await consumers() - base_consumers)
        ws.transport.abort()
    figures.add(
        "R7",
        "test_half_open_client_is_detected_and_freed",
        f"a subscribed client (core, KV, JetStream) stops reading and sending without closing; "
        f"PING_INTERVAL={interval:g} s (window: 2 intervals without a frame)",
        f"closed {session.close_code} after {detected:.2f} s ({detected / interval:.1f} "
        f"intervals), resources freed after {freed:.2f} s: held (core patterns, NATS subs) "
        f"{held}, left (core patterns, NATS subs, JS consumers) {left}",
    )
    assert session.close_code == 1008
    assert left == (0, 0, 0)


async def test_leak_soak(
    gateway: Gateway, make_user: UserFactory, nc: NATS, figures: Figures
) -> None:
    """Connect/subscribe/disconnect cycles: tasks, fds, NATS subscriptions and consumers
    back to their baseline; RSS growth reported."""
    hub = gateway.hub
    assert hub is not None
    cycles = scale(1_000, 100_000)
    workers = 8
    token = await make_user()
    js = nc.jetstream()
    headers = {"Authorization": f"Bearer {token}"}

    async def cycle(i: int) -> None:
        async with ws_connect(gateway.url, additional_headers=headers, ping_interval=None) as ws:
            await ws.recv()  # cap_update
            reqs = [f'{{"op":"sub","target":"chat.room.{i % 7}","inbox":"a"}}']
            if i % 50 == 0:
                reqs.append(
                    '{"op":"kv_sub","target":"todos","inbox":"b","data":{"pattern":"user.alice.>"}}'
                )
            if i % 100 == 0:
                reqs.append(
                    '{"op":"js_sub","target":"chat","inbox":"c","data":{"filter":"chat.room.123"}}'
                )
            for r in reqs:
                await ws.send(r)
            oks = 0
            while oks < len(reqs):
                oks += sum(1 for e in split(await ws.recv()) if e["op"] == "ok")

    async def run(n: int) -> None:
        counter = itertools.count()

        async def worker() -> None:
            while (i := next(counter)) < n:
                await cycle(i)

        await asyncio.gather(*(worker() for _ in range(workers)))

    async def settle() -> None:
        await until(lambda: not hub.sessions and not hub.closing, "sessions to close", 30)

    async def consumers() -> int:
        return sum([(await js.stream_info(s)).state.consumer_count for s in ("chat", "KV_todos")])

    async def state() -> dict[str, int]:
        """What a leak would grow, after a collection."""
        gc.collect()
        return {
            "rss_kib": rss_kib(),
            "tasks": len(asyncio.all_tasks()),
            "fds": fd_count(),
            "nats_subs": len(hub.nc._subs),
            "core_patterns": len(hub.router),
            "consumers": await consumers(),
        }

    await run(200)  # warm-up: imports, caches, the first KV feed
    await settle()
    base = await state()
    t0 = time.monotonic()
    await run(cycles)
    elapsed = time.monotonic() - t0
    await settle()

    async def consumers_back() -> bool:
        return await consumers() <= base["consumers"]

    with contextlib.suppress(AssertionError):  # any still there are counted in `after`
        await until_async(consumers_back, "the JetStream consumers to be deleted", 10)
    after = await state()
    growth = (after["rss_kib"] - base["rss_kib"]) / 1024
    figures.add(
        "R8",
        "test_leak_soak",
        f"{cycles} connect/sub/disconnect cycles ({workers} at a time; a kv_sub every 50th, "
        "a js_sub every 100th), gateway and clients in one process",
        f"{cycles / elapsed:.0f} cycles/s; RSS {base['rss_kib'] // 1024} -> "
        f"{after['rss_kib'] // 1024} MiB ({growth:+.1f}); tasks {base['tasks']} -> "
        f"{after['tasks']}; fds {base['fds']} -> {after['fds']}; NATS subs "
        f"{base['nats_subs']} -> {after['nats_subs']}; consumers {base['consumers']} -> "
        f"{after['consumers']}",
        base=base,
        after=after,
    )
    for k in ("tasks", "fds", "nats_subs", "core_patterns", "consumers"):
        assert after[k] <= base[k], (k, base, after)
    assert growth < 64, (base, after)


async def test_lost_updates_with_the_same_if_match(api: Api, figures: Figures) -> None:
    """100 concurrent PUTs holding the same ETag: exactly one succeeds, the others 412."""
    n = 100
    h = api.auth("alice")
    r = await api.client.post("/api/articles", json={"title": "t", "body": "b"}, headers=h)
    a = await r.json()
    headers = {**h, "If-Match": f'"{a["revision"]}"'}

    async def put(i: int) -> int:
        resp = await api.client.put(
            f"/api/articles/{a['id']}", json={"title": f"w{i}", "body": ""}, headers=headers
        )
        resp.release()
        return resp.status

    t0 = time.monotonic()
    statuses = await asyncio.gather(*(put(i) for i in range(n)))
    elapsed = time.monotonic() - t0
    final = await (await api.client.get(f"/api/articles/{a['id']}", headers=h)).json()
    figures.add(
        "R9",
        "test_lost_updates_with_the_same_if_match",
        f"{n} concurrent PUT /api/articles/{{id}} with the same If-Match (in-process API)",
        f"{statuses.count(200)} x 200, {statuses.count(412)} x 412, "
        f"{n - statuses.count(200) - statuses.count(412)} other, in {ms(elapsed)}; "
        f"revision {a['revision']} -> {final['revision']}",
    )
    assert statuses.count(200) == 1 and statuses.count(412) == n - 1
    assert final["revision"] > a["revision"]
