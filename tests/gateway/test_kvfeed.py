"""Shared KV watches: one consumer per (bucket, pattern) per process, gapless late joins."""

from __future__ import annotations

import asyncio

from nats.aio.client import Client as NATS

from tests.gateway.conftest import ClientFactory, UserFactory
from tests.waits import until, until_async
from ws_gateway.server import Gateway


async def _synced(sub) -> list[dict]:  # type: ignore[no-untyped-def]
    before = []
    while (env := await sub.get())["data"]["op"] != "synced":
        before.append(env)
    return before


async def test_many_kv_subs_share_one_consumer(
    make_user: UserFactory, connect: ClientFactory, gateway: Gateway, nc: NATS
):
    """50 clients on the same kv_sub cost one live NATS consumer once they are synced."""
    token = await make_user()
    js = nc.jetstream()
    kv = await js.key_value("articles")
    await kv.put("a", b'"1"')
    clients = [await connect(token) for _ in range(50)]
    subs = [await c.kv_sub("articles") for c in clients]
    for s in subs:
        assert [e["data"]["key"] for e in await _synced(s)] == ["a"]
    assert gateway.hub is not None and len(gateway.hub.kv_feeds) == 1

    async def consumers_are(n: int) -> bool:
        return (await js.stream_info("KV_articles")).state.consumer_count == n

    # catch-up consumers are deleted in the background after synced
    await until_async(lambda: consumers_are(1), "one consumer left on KV_articles", 10)
    rev = await kv.put("b", b'"2"')
    for s in subs:
        env = await s.get()
        assert (env["data"]["key"], env["data"]["revision"]) == ("b", rev)
    for c in clients:
        await c.close()
    hub = gateway.hub
    await until(
        lambda: not hub.kv_feeds and not hub.sessions and not hub.closing,
        "every session and its KV feed to close",
        10,
    )
    assert (await js.stream_info("KV_articles")).state.consumer_count == 0


async def test_late_joiner_gets_every_change_once_while_writes_continue(
    make_user: UserFactory, connect: ClientFactory, nc: NATS
):
    """A kv_sub joining a live feed during a stream of writes misses nothing, repeats nothing."""
    token = await make_user()
    kv = await nc.jetstream().key_value("articles")
    first = await connect(token)
    early = await first.kv_sub("articles", "k.>")
    await _synced(early)
    stop = asyncio.Event()
    under_way = asyncio.Event()
    written: list[int] = []

    async def writer() -> None:
        i = 0
        while not stop.is_set() and i < 400:
            written.append(await kv.put(f"k.{i % 5}", str(i).encode()))
            i += 1
            if i == 50:
                under_way.set()

    task = asyncio.create_task(writer())
    await under_way.wait()
    late_client = await connect(token)
    late = await late_client.kv_sub("articles", "k.>")
    snapshot = await _synced(late)
    await task
    stop.set()
    last = written[-1]
    state = {e["data"]["key"]: e["data"]["revision"] for e in snapshot}
    seen: list[int] = []
    while max([*state.values(), *seen, 0]) < last:
        env = await late.get()
        seen.append(env["data"]["revision"])
        state[env["data"]["key"]] = env["data"]["revision"]
    assert seen == sorted(set(seen)), "live changes repeat or go back"
    assert not set(seen) & {e["data"]["revision"] for e in snapshot}
    # every write after the snapshot's newest revision arrived live
    cutoff = max(e["data"]["revision"] for e in snapshot)
    assert [r for r in written if r > cutoff] == seen
    # and the final state equals the bucket's
    for key, rev in state.items():
        assert (await kv.get(key)).revision == rev
