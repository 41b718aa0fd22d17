"""Limits, NATS outages, resume rules, heartbeat, SIGTERM, overlapping unsub, metrics."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from nats.aio.client import Client as NATS
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from shared.client import GatewayClient, RequestError
from shared.settings import Settings
from tests.gateway.conftest import ALICE_CAPS, ClientFactory, UserFactory
from tests.metrics import scrape_metric
from tests.natsd import NatsServer, free_port
from tests.waits import split, until, until_async
from ws_gateway.server import Gateway

ROOT = Path(__file__).resolve().parents[2]


async def _js_ready(nc: NATS) -> None:
    """Wait (bounded) until JetStream answers again after a nats-server restart."""
    await until(lambda: nc.is_connected, "test client reconnect")

    async def answers() -> bool:
        try:
            await nc.jetstream().stream_info("chat")
            await nc.jetstream().stream_info("KV_todos")
        except Exception:
            return False
        return True

    await until_async(answers, "JetStream to come back")


def _gateway_with(settings: Settings, **changes: Any) -> Gateway:
    return Gateway(msgspec.structs.replace(settings, **changes), host="127.0.0.1", port=0)


# ---------------------------------------------------------------------- error codes


@pytest.fixture
async def small_gateway(settings: Settings, nc: NATS) -> AsyncIterator[Gateway]:
    small = _gateway_with(
        settings, max_subscriptions=3, client_ops_per_second=0.001, client_ops_burst=8
    )
    async with small as gw:
        yield gw


async def test_limit_max_subscriptions(small_gateway: Gateway, make_user: UserFactory):
    """The subscription after max_subscriptions is refused with limit, with or without inbox."""
    async with await GatewayClient.connect(small_gateway.url, token=await make_user()) as c:
        subs = [await c.sub(f"chat.room.{i}") for i in range(3)]
        with pytest.raises(RequestError) as e:
            await c.sub("chat.room.3")
        assert e.value.code == "limit"
        await subs[0].unsub()  # a freed slot can be used again
        await c.sub("chat.room.3")
        # a request without an inbox (the server names it) is counted too
        await c.send({"op": "sub", "target": "chat.room.4"})
        err = await asyncio.wait_for(c.errors.get(), 5)
        assert err["data"]["code"] == "limit"


async def test_limit_client_ops_per_second(small_gateway: Gateway, make_user: UserFactory):
    """Requests beyond the burst get limit, echoing the request's inbox."""
    async with await GatewayClient.connect(small_gateway.url, token=await make_user()) as c:
        for _ in range(8):  # the burst (the refill rate is negligible)
            await c.ping()
        with pytest.raises(RequestError) as e:
            await c.request("ping", inbox="over")
        assert e.value.code == "limit"
        with pytest.raises(RequestError) as e:
            await c.sub("chat.room.1")
        assert e.value.code == "limit"
        assert c.close_code is None


async def test_unavailable_while_nats_down_then_recovers(
    make_user: UserFactory,
    connect: ClientFactory,
    gateway: Gateway,
    nats_server: NatsServer,
    nc: NATS,
):
    """With NATS stopped a sub gets unavailable; once NATS is back, the same sub succeeds."""
    c = await connect(await make_user())
    await c.sub("chat.room.1")
    assert gateway.hub is not None
    nats_server.stop()
    try:
        await until(lambda: not gateway.hub.nats_ready, "gateway to see NATS down")  # type: ignore[union-attr]
        for op, args in [("sub", ("chat.room.2",)), ("kv_sub", ("todos", "user.alice.>"))]:
            with pytest.raises(RequestError) as e:
                await getattr(c, op)(*args)
            assert e.value.code == "unavailable"
        await c.ping()  # the connection itself stays open
    finally:
        nats_server.start()
    await until(lambda: gateway.hub.nats_ready, "gateway to reconnect")  # type: ignore[union-attr]
    sub = await c.sub("chat.room.2")
    await _js_ready(nc)
    for _ in range(100):  # our test client's own resubscription is asynchronous
        await nc.publish("chat.room.2", b'"back"')
        if (m := await _get_or_none(sub)) is not None:
            assert m["data"]["payload"] == "back"
            break
    else:
        pytest.fail("no message after NATS came back")


async def test_a_sub_asked_during_an_outage_waits_for_nats(
    make_user: UserFactory, settings: Settings, nats_server: NatsServer, nc: NATS
) -> None:
    """A request made while NATS is away is answered once NATS is back (within
    NATS_FAILOVER_WAIT), `ok`, not `unavailable`: a failover costs time, not an error."""
    patient = msgspec.structs.replace(settings, nats_failover_wait=60.0)
    async with Gateway(patient, host="127.0.0.1", port=0) as gw:
        assert gw.hub is not None
        hub = gw.hub
        async with await GatewayClient.connect(gw.url, token=await make_user()) as c:
            nats_server.stop()
            try:
                await until(lambda: not hub.nats_ready, "gateway to see NATS down")
                waiting = hub.checkpoint.hold("nats.wait")
                asked = asyncio.create_task(c.kv_sub("todos", "user.alice.>", timeout=90))
                await waiting.reached()  # the kv_sub is in the gateway's hands, waiting
                assert not asked.done()
            finally:
                nats_server.start()
                waiting.release()
            sub = await asked
            assert "position" in sub.ok  # `ok`: RequestError("unavailable") would raise


async def _get_or_none(sub: Any, timeout: float = 0.1) -> dict[str, Any] | None:
    try:
        return await sub.get(timeout=timeout)  # type: ignore[no-any-return]
    except TimeoutError:
        return None


# ---------------------------------------------------------------------- NATS restarts


async def test_kv_watch_survives_nats_restart(
    make_user: UserFactory,
    connect: ClientFactory,
    gateway: Gateway,
    nats_server: NatsServer,
    nc: NATS,
):
    """A kv_sub keeps going across a nats-server restart: new puts once, no replay."""
    kv = await nc.jetstream().key_value("todos")
    r1 = await kv.put("user.alice.1", b'"one"')
    c = await connect(await make_user())
    sub = await c.kv_sub("todos", "user.alice.>")
    assert (await sub.get())["data"]["revision"] == r1
    assert (await sub.get())["data"]["op"] == "synced"
    nats_server.restart()
    await until(lambda: gateway.hub.nats_ready, "gateway to reconnect")  # type: ignore[union-attr]
    await _js_ready(nc)
    js = nc.jetstream()
    revs = {}
    for key in ("user.alice.2", "user.alice.3"):
        for _ in range(100):  # the msg id makes a retried put idempotent
            try:
                ack = await js.publish(
                    f"$KV.todos.{key}", b'"new"', timeout=1, headers={"Nats-Msg-Id": key}
                )
                revs[key] = ack.seq
                break
            except Exception:
                await asyncio.sleep(0.1)
        else:
            pytest.fail("KV put never succeeded after the restart")
    got = []
    while len(got) < 2 or got[-1][0] != "user.alice.3":
        m = (await sub.get(timeout=20))["data"]
        got.append((m.get("key"), m["revision"], m["op"]))
    assert got == [
        ("user.alice.2", revs["user.alice.2"], "put"),
        ("user.alice.3", revs["user.alice.3"], "put"),
    ]
    assert revs["user.alice.2"] > r1


async def test_js_resume_after_reconnect_with_start_seq(
    make_user: UserFactory, connect: ClientFactory, nc: NATS
):
    """Re-js_sub with start_seq = last seen + 1 yields every later message once, in order."""
    js = nc.jetstream()
    token = await make_user()
    c1 = await connect(token)
    sub1 = await c1.js_sub("chat", "chat.room.123", start_seq=1)
    first = [(await js.publish("chat.room.123", str(i).encode())).seq for i in range(3)]
    await js.publish("chat.room.456", b"other")
    seen = [(await sub1.get())["data"]["seq"] for _ in range(3)]
    assert seen == first
    await c1.close()
    missed = []
    for i in range(4):
        missed.append((await js.publish("chat.room.123", f'"m{i}"'.encode())).seq)
        await js.publish("chat.room.456", b"other")
    c2 = await connect(token)
    sub2 = await c2.js_sub("chat", "chat.room.123", start_seq=seen[-1] + 1)
    assert sub2.ok == {"position": seen[-1] + 1, "recovered": True}
    live = (await js.publish("chat.room.123", b'"live"')).seq
    got = []
    while not got or got[-1] != live:
        got.append((await sub2.get())["data"]["seq"])
    assert got == [*missed, live]


# ---------------------------------------------------------------------- heartbeat


@pytest.fixture
async def fast_ping_gateway(settings: Settings, nc: NATS) -> AsyncIterator[Gateway]:
    async with _gateway_with(settings, ping_interval=0.3) as gw:
        yield gw


async def test_silent_client_closed_after_two_intervals(
    fast_ping_gateway: Gateway, make_user: UserFactory
):
    """A client that never sends is pinged, then closed 1008."""
    token = await make_user()
    async with ws_connect(
        fast_ping_gateway.url,
        additional_headers={"Authorization": f"Bearer {token}"},
        ping_interval=None,
    ) as ws:
        ops = []
        with pytest.raises(ConnectionClosed):
            async with asyncio.timeout(10):
                while True:
                    ops += [e["op"] for e in split(await ws.recv())]
        assert ws.close_code == 1008
    assert ops[0] == "cap_update" and "ping" in ops


async def test_ping_answered_with_pong_and_answering_client_stays(
    fast_ping_gateway: Gateway, make_user: UserFactory
):
    """ping gets pong with the same inbox; a client answering pings outlives many intervals."""
    token = await make_user()
    async with ws_connect(
        fast_ping_gateway.url,
        additional_headers={"Authorization": f"Bearer {token}"},
        ping_interval=None,
    ) as ws:
        await ws.send('{"op":"ping","inbox":"hb-1"}')
        async with asyncio.timeout(5):
            while True:
                pongs = [e for e in split(await ws.recv()) if e["op"] == "pong"]
                if pongs:
                    break
        assert pongs[0]["inbox"] == "hb-1"
    c = await GatewayClient.connect(fast_ping_gateway.url, token=token, record=True)
    async with c:
        pings = 0
        async with asyncio.timeout(10):
            while pings < 6:  # 6 intervals > 2: the client's pongs keep it alive
                if (await c.envelopes.get())["op"] == "ping":  # type: ignore[union-attr]
                    pings += 1
        await c.ping()
        assert c.close_code is None


# ---------------------------------------------------------------------- SIGTERM


async def test_sigterm_closes_clients_1001_and_exits_0(
    settings: Settings, make_user: UserFactory, tmp_path: Path
):
    """`python -m ws_gateway` drains on SIGTERM: clients see 1001, the process exits 0."""
    token = await make_user()
    port = free_port()
    env = {
        **os.environ,
        "NATS_URL": settings.nats_url[0],
        "VAR_DIR": settings.var_dir,
        "LOG_FORMAT": "json",
    }
    log_path = tmp_path / "gateway.log"
    log = log_path.open("wb")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "ws_gateway", "--host", "127.0.0.1", "--port", str(port)),
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    try:
        url = f"ws://127.0.0.1:{port}/ws"
        for _ in range(300):
            assert proc.returncode is None, log_path.read_text()
            try:
                c = await GatewayClient.connect(url, token=token, open_timeout=2)
                break
            except (OSError, TimeoutError):
                await asyncio.sleep(0.05)
        else:
            pytest.fail("gateway subprocess never accepted a connection")
        await c.sub("chat.room.1")
        proc.send_signal(signal.SIGTERM)
        code = await c.wait_closed()
        async with asyncio.timeout(10):  # a bound on the wait, not a speed assertion
            returncode = await proc.wait()
        assert code == 1001
        assert returncode == 0, log_path.read_text()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        log.close()


# ---------------------------------------------------------------------- overlapping unsub


async def test_unsub_one_of_two_overlapping_keeps_the_other(
    make_user: UserFactory, connect: ClientFactory, nc: NATS
):
    """After unsub chat.room.*, chat.room.1 still delivers, once per message."""
    token = await make_user()
    c = await connect(token, record=True)
    wide = await c.sub("chat.room.*")
    narrow = await c.sub("chat.room.1")
    other = await connect(token)  # keeps the shared chat.room.* NATS subscription alive
    witness = await other.sub("chat.room.*")
    await wide.unsub()
    for p in (b'"m1"', b'"m2"'):
        await nc.publish("chat.room.1", p)
    await nc.publish("chat.room.2", b'"not for c"')
    assert [(await narrow.get())["data"]["payload"] for _ in range(2)] == ["m1", "m2"]
    # once `other` has all three, the chat.room.* fan-out of each is done for c too
    assert [(await witness.get())["data"]["payload"] for _ in range(3)] == [
        "m1",
        "m2",
        "not for c",
    ]
    await c.ping()
    got = []
    while not c.envelopes.empty():  # type: ignore[union-attr]
        env = c.envelopes.get_nowait()  # type: ignore[union-attr]
        if env["op"] == "sub_msg":
            got.append(env["data"]["payload"])
    assert got == ["m1", "m2"]


# ---------------------------------------------------------------------- metrics


async def test_revocation_latency_metric_counts(
    make_user: UserFactory, connect: ClientFactory, gateway: Gateway
):
    """A capability revocation increments gateway_revocation_seconds_count on /metrics."""
    name = "gateway_revocation_seconds_count"
    c = await connect(await make_user())
    sub = await c.sub("chat.room.1")
    await c.cap_updates.get()
    before = await scrape_metric(gateway.port, name)
    await make_user("alice", {**ALICE_CAPS, "subjects": ["articles.>"]})
    update = await asyncio.wait_for(c.cap_updates.get(), 5)
    assert [r["inbox"] for r in update["data"]["revoked"]] == [sub.inbox]
    after = await scrape_metric(gateway.port, name)
    assert after == before + 1
