"""Listing a bucket (shared/kvlist.py) against a real nats-server: exactly the live keys,
every time, and no consumer left behind. nats-py's own `keys()` raced its end marker
against the deliveries and sometimes came back short (a page of five articles listed four);
a short listing of the revoked bucket would let a revoked token in."""

from __future__ import annotations

import asyncio

from nats.js.client import JetStreamContext

from shared import kvwire
from shared.kvlist import live_entries


async def _consumers(js: JetStreamContext, bucket: str) -> int:
    info = await js.stream_info(kvwire.stream_of(bucket))
    return info.state.consumer_count


async def test_lists_exactly_the_live_keys_every_time(js: JetStreamContext) -> None:
    kv = await js.create_key_value(bucket="listing", history=3)
    for i in range(300):
        await kv.put(f"k.{i:03}", f"v{i}".encode())
    for i in range(0, 300, 7):
        await kv.delete(f"k.{i:03}")
    for i in range(1, 300, 11):
        await kv.purge(f"k.{i:03}")
    await kv.put("k.000", b"again")  # deleted, then written: live
    live = {f"k.{i:03}" for i in range(300) if i % 7 and (i - 1) % 11} | {"k.000"}
    for _ in range(40):
        keys = [e.key for e in await live_entries(js, "listing", values=False)]
        assert sorted(keys) == sorted(live)
    entries = {e.key: e for e in await live_entries(js, "listing", values=True)}
    assert entries["k.000"].value == b"again" and entries["k.002"].value == b"v2"
    assert entries["k.002"].revision == (await kv.get("k.002")).revision
    assert all(e.value == b"" for e in await live_entries(js, "listing", values=False))
    assert await _consumers(js, "listing") == 0


async def test_an_empty_bucket_lists_nothing(js: JetStreamContext) -> None:
    kv = await js.create_key_value(bucket="empty_listing")
    assert await live_entries(js, "empty_listing", values=True) == []
    await kv.put("a", b"1")
    await kv.delete("a")
    assert await live_entries(js, "empty_listing", values=False) == []
    assert await _consumers(js, "empty_listing") == 0


async def test_a_key_pattern_lists_only_the_keys_it_matches(js: JetStreamContext) -> None:
    """`pattern` filters by key with NATS wildcards; deleted keys stay out; `>` is all."""
    kv = await js.create_key_value(bucket="pattern_listing")
    for key in ("chat.u1.a", "chat.u1.b", "chat.u10.a", "chat.u1.a.deep", "audit.u1.a"):
        await kv.put(key, b"x")
    await kv.delete("chat.u1.b")
    keys = [
        e.key for e in await live_entries(js, "pattern_listing", values=False, pattern="chat.u1.*")
    ]
    assert keys == ["chat.u1.a"]
    deep = await live_entries(js, "pattern_listing", values=True, pattern="chat.u1.>")
    assert sorted(e.key for e in deep) == ["chat.u1.a", "chat.u1.a.deep"]
    assert len(await live_entries(js, "pattern_listing", values=False)) == 4
    assert await live_entries(js, "pattern_listing", values=False, pattern="nope.*") == []
    assert await _consumers(js, "pattern_listing") == 0


async def test_listings_under_writes_hold_every_key_written_before(js: JetStreamContext) -> None:
    """Writes during a listing may or may not appear; what was there before always does."""
    kv = await js.create_key_value(bucket="busy_listing")
    before = {f"old.{i}" for i in range(200)}
    for key in before:
        await kv.put(key, b"x")

    async def writer() -> None:
        for i in range(300):
            await kv.put(f"new.{i}", b"y")

    task = asyncio.create_task(writer())
    try:
        while not task.done():
            keys = {e.key for e in await live_entries(js, "busy_listing", values=False)}
            assert before <= keys
            assert keys - before <= {f"new.{i}" for i in range(300)}
    finally:
        await task
    assert await _consumers(js, "busy_listing") == 0
