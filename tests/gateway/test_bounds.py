"""What one user can make a gateway hold is bounded, and a bound reached is `limit`.

The outbox in bytes (not envelopes), pulled sources paced by its room, JetStream readers
per user, NATS's own limits told apart from the client's mistakes, durables bound only with
the same ack mode, and KV resume without superseded values.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import msgspec
import pytest
from nats.aio.client import Client as NATS
from nats.js import api

from shared.client import GatewayClient, RequestError
from shared.settings import Settings
from tests.gateway.conftest import ALICE_CAPS, ClientFactory, UserFactory
from ws_gateway.hub import MAX_CATCHUPS
from ws_gateway.outbox import Outbox
from ws_gateway.server import Gateway


async def test_the_outbox_is_bounded_in_bytes_not_envelopes(settings: Settings) -> None:
    """A burst of 2,000 chat-sized envelopes in one tick fits the default 1 MiB (the old
    1,024-envelope queue closed a healthy reader here); 1 MiB of 100 KiB ones does not."""
    slow: list[str] = []

    async def send(data: bytes) -> None:
        return None

    small = Outbox(send, slow.append, settings.send_queue_bytes, 0.25)
    assert all(small.push(b"x" * 200) for _ in range(2000))
    assert not slow
    big = Outbox(send, slow.append, settings.send_queue_bytes, 0.25)
    pushed = [big.push(b"y" * 100 * 1024) for _ in range(11)]
    assert pushed == [True] * 10 + [False]
    assert slow == ["send queue full"]
    alone = Outbox(send, slow.append, 1000, 0.25)
    assert alone.push(b"z" * 5000)  # one envelope larger than the bound, into an empty queue
    assert not alone.push(b"z")


async def test_a_kv_catch_up_larger_than_the_outbox_is_paced_not_closed(
    make_user: UserFactory, connect: ClientFactory, nc: NATS
) -> None:
    """40 values of 60 KiB (2.4 MB, over twice the outbox) and one of 400 KiB: the catch-up
    asks NATS only for what fits, so the client gets every one and is not closed."""
    kv = await nc.jetstream().key_value("articles")
    for i in range(40):
        await kv.put(f"big.{i}", b'"' + b"v" * 60 * 1024 + b'"')
    await kv.put("huge", b'"' + b"h" * 400 * 1024 + b'"')
    c = await connect(await make_user())
    sub = await c.kv_sub("articles", ">")
    keys = set()
    while True:
        env = await sub.get()
        if env["data"]["op"] == "synced":
            break
        keys.add(env["data"]["key"])
    assert keys == {f"big.{i}" for i in range(40)} | {"huge"}
    assert c.close_code is None


async def test_a_js_replay_larger_than_the_outbox_is_paced_not_closed(
    make_user: UserFactory, connect: ClientFactory, nc: NATS
) -> None:
    """A stream replay of 40 x 60 KiB with batch 1000 arrives whole, the client not closed."""
    js = nc.jetstream()
    for i in range(40):
        await js.publish("chat.room.123", b'"' + str(i).encode() + b"x" * 60 * 1024 + b'"')
    c = await connect(await make_user())
    sub = await c.js_sub("chat", "chat.room.123", start_seq=1, batch=1000)
    seqs = [(await sub.get())["data"]["seq"] for _ in range(40)]
    assert seqs == list(range(1, 41))
    assert c.close_code is None


@pytest.fixture
async def capped_gateway(settings: Settings, nc: NATS) -> AsyncIterator[Gateway]:
    capped = msgspec.structs.replace(settings, max_readers_per_user=2)
    async with Gateway(capped, host="127.0.0.1", port=0) as gw:
        yield gw


async def test_kv_and_js_subscriptions_per_user_are_capped(
    capped_gateway: Gateway, make_user: UserFactory
) -> None:
    """Past the per-user cap of JetStream-reading subscriptions, across the user's
    connections: `limit`; ending one frees its slot."""
    token = await make_user()
    a = await GatewayClient.connect(capped_gateway.url, token=token)
    b = await GatewayClient.connect(capped_gateway.url, token=token)
    try:
        first = await a.js_sub("chat", "chat.room.123")
        await b.kv_sub("todos", "user.alice.>")
        with pytest.raises(RequestError) as e:
            await b.js_sub("chat", "chat.room.456")
        assert e.value.code == "limit"
        await a.sub("chat.room.1")  # core subscriptions hold no consumer: not counted
        await first.unsub()
        await b.js_sub("chat", "chat.room.456")
    finally:
        await a.close()
        await b.close()


async def test_a_nats_consumer_limit_is_limit_not_bad_request(
    make_user: UserFactory, connect: ClientFactory, nc: NATS
) -> None:
    """A stream at its consumer limit (its one consumer taken by another application)
    refuses the gateway's shared tail: the client hears `limit` (a server bound), never
    `bad_request`, and can go on; once the slot is free, the same js_sub is served."""
    js = nc.jetstream()
    await js.add_stream(
        api.StreamConfig(name="capped", subjects=["capped.>"], max_consumers=1, allow_direct=True)
    )
    other = await js.add_consumer("capped", api.ConsumerConfig(durable_name="other"))
    c = await connect(await make_user("alice", {**ALICE_CAPS, "streams": {"capped": [">"]}}))
    for _ in range(12):  # more than MAX_BAD_FRAMES: none of them counts as a bad frame
        with pytest.raises(RequestError) as e:
            await c.js_sub("capped", "capped.b")
        assert e.value.code == "limit"
    await c.ping()
    await js.delete_consumer("capped", other.name)
    await c.js_sub("capped", "capped.b")


async def test_a_durable_is_bound_only_with_its_own_ack_mode(
    make_user: UserFactory, connect: ClientFactory
) -> None:
    """A durable made without acks cannot be bound with `ack: true` (the unacked map would
    grow with messages the server never waits on), and the other way round."""
    c = await connect(await make_user())
    d = await c.js_sub("chat", "chat.room.123", durable="d1")
    await d.unsub()
    with pytest.raises(RequestError) as e:
        await c.js_sub("chat", "chat.room.123", durable="d1", ack=True)
    assert e.value.code == "bad_request" and "ack" in e.value.reason


async def test_a_js_sub_filter_in_internal_subjects_is_forbidden(
    make_user: UserFactory, connect: ClientFactory
) -> None:
    """A filter such as $KV.auth_credentials.> is refused by the capability check itself,
    whatever the stream: not left to NATS's stream-subject check."""
    c = await connect(await make_user("alice", {**ALICE_CAPS, "streams": {"chat": [">"]}}))
    for flt in ("$KV.auth_credentials.>", "_INBOX.>", "cmd.chat.send"):
        with pytest.raises(RequestError) as e:
            await c.js_sub("chat", flt)
        assert e.value.code == "forbidden"


async def test_kv_resume_sends_current_values_never_superseded_or_deleted_ones(
    make_user: UserFactory, connect: ClientFactory, nc: NATS
) -> None:
    """Resuming after revision R sends each key changed since R once, at its current value
    (a delete as a delete): never an intermediate or deleted value a fresh reader would not
    get; keys unchanged since R are not sent again."""
    kv = await nc.jetstream().key_value("articles")
    await kv.put("kept", b'"old"')
    since = await kv.put("k", b'"v1"')
    await kv.put("k", b'"v2"')
    await kv.put("k", b'"v3"')
    await kv.put("gone", b'"secret"')
    await kv.delete("gone")
    c = await connect(await make_user())
    sub = await c.kv_sub("articles", ">", since_revision=since)
    assert sub.ok["recovered"] is True
    got = []
    while True:
        env = await sub.get()
        if env["data"]["op"] == "synced":
            break
        got.append((env["data"]["key"], env["data"]["op"], env["data"].get("value")))
    assert sorted(got) == [("gone", "delete", None), ("k", "put", "v3")]


@pytest.fixture
async def durable_gateway(settings: Settings, nc: NATS) -> AsyncIterator[Gateway]:
    capped = msgspec.structs.replace(settings, max_durables_per_user=2, durable_inactive=3600.0)
    async with Gateway(capped, host="127.0.0.1", port=0) as gw:
        yield gw


async def test_durables_per_user_are_capped_and_expire_when_unused(
    durable_gateway: Gateway, make_user: UserFactory, nc: NATS
) -> None:
    """A user's new durables beyond the cap are `limit` (binding an existing one is not),
    other users are not affected, and a durable is a record in gw_durables, not a NATS
    consumer (its expiry when unused: tests/gateway/test_durable_store.py)."""
    alice = await GatewayClient.connect(durable_gateway.url, token=await make_user())
    bob = await GatewayClient.connect(durable_gateway.url, token=await make_user("bob"))
    try:
        for name in ("d1", "d2"):
            await (await alice.js_sub("chat", "chat.room.123", durable=name)).unsub()
        with pytest.raises(RequestError) as e:
            await alice.js_sub("chat", "chat.room.123", durable="d3")
        assert e.value.code == "limit"
        await alice.js_sub("chat", "chat.room.123", durable="d1")  # resuming one is free
        await bob.js_sub("chat", "chat.room.123", durable="d1")
        js = nc.jetstream()
        assert not [c for c in await js.consumers_info("chat") if c.name.startswith("u_")]
        record = await (await js.key_value("gw_durables")).get("chat.alice.d2")
        assert record.value and b'"filter":"chat.room.123"' in record.value
    finally:
        await alice.close()
        await bob.close()


async def test_kv_catch_ups_at_once_are_bounded_and_the_rest_wait(
    settings: Settings, nc: NATS, make_user: UserFactory
) -> None:
    """300 kv_subs set up at once (more than MAX_CATCHUPS): every one is `ok` and synced,
    and the bucket's consumers never exceed the catch-up slots plus the shared feeds —
    before, the 1,001st concurrent catch-up of a process hit the stream's consumer limit
    and the client was told `internal`."""
    many = msgspec.structs.replace(settings, max_readers_per_user=1000)
    js = nc.jetstream()
    kv = await js.key_value("articles")
    for i in range(20):
        await kv.put(f"a{i}", b'"x"')
    async with Gateway(many, host="127.0.0.1", port=0) as gw:
        token = await make_user()
        clients = [await GatewayClient.connect(gw.url, token=token) for _ in range(6)]
        peak = 0
        done = asyncio.Event()

        async def sample() -> None:
            nonlocal peak
            while not done.is_set():
                info = await js.stream_info("KV_articles")
                peak = max(peak, info.state.consumer_count)

        async def one(i: int) -> None:
            sub = await clients[i % 6].kv_sub("articles", f"a{i % 20}")
            while (await sub.get())["data"]["op"] != "synced":
                pass

        sampler = asyncio.create_task(sample())
        try:
            await asyncio.gather(*(one(i) for i in range(300)))
        finally:
            done.set()
            await sampler
            for c in clients:
                await c.close()
    assert 0 < peak <= MAX_CATCHUPS + 20  # + one shared feed per pattern
