"""Presence (docs/protocol.md, "Presence"): `sub` with `data.presence` holds a key of KV
`presence` that another gateway's kv_sub sees come and go; real gateways, real NATS."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NATS

from shared import kvwire
from shared.client import ClientSubscription, GatewayClient, RequestError
from shared.settings import Settings
from shared.users import USERS_BUCKET, decode_user, encode_user
from tests.gateway.conftest import ALICE_CAPS, UserFactory
from tests.reliability.helpers import gateway_process
from ws_gateway.server import Gateway

ROOM = "chat.room.7"
CAPS = {**ALICE_CAPS, "buckets": {**ALICE_CAPS["buckets"], "presence": ["chat.room.*.>"]}}
TTL = 2  # PRESENCE_TTL of these tests' gateways: a crashed one's users leave within it


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return Settings(**{**_fields(settings), "presence_ttl": TTL, "presence_refresh": 0.5})


def _fields(s: Settings) -> dict[str, Any]:
    return {f: getattr(s, f) for f in s.__struct_fields__}


@pytest.fixture
async def other(settings: Settings, nc: NATS) -> AsyncIterator[Gateway]:
    """A second gateway on the same NATS: the watcher's side."""
    async with Gateway(settings, host="127.0.0.1", port=0) as gw:
        yield gw


@pytest.fixture
async def pair(
    gateway: Gateway, other: Gateway, make_user: UserFactory
) -> AsyncIterator[tuple[GatewayClient, Watch]]:
    """alice on the first gateway; bob on the other, watching ROOM's presence."""
    bob = await GatewayClient.connect(other.url, token=await make_user("bob", CAPS))
    alice = await GatewayClient.connect(gateway.url, token=await make_user("alice", CAPS))
    try:
        yield alice, await watch(bob)
    finally:
        await alice.close()
        await bob.close()


class Watch:
    """Who a kv_sub on `<room>.*.*` says is here: uid -> its connections' keys."""

    def __init__(self, sub: ClientSubscription) -> None:
        self.sub = sub
        self.members: dict[str, set[str]] = {}
        self.last_op = ""  # of the last change: a leave's `delete`, an expiry's `purge`

    async def synced(self) -> None:
        while (await self.sub.get())["data"]["op"] != "synced":
            pass

    async def change(self) -> dict[str, Any]:
        """Fold the next kv_msg in; return its data."""
        data: dict[str, Any] = (await self.sub.get())["data"]
        self.last_op = data["op"]
        uid = data["key"].split(".")[-2]
        if data["op"] == "put":
            assert data["value"]["uid"] == uid
            self.members.setdefault(uid, set()).add(data["key"])
        else:
            conns = self.members.get(uid, set())
            conns.discard(data["key"])
            if not conns:
                self.members.pop(uid, None)
        return data

    async def until(self, want: set[str], timeout: float = 20.0) -> float:
        """Fold changes until exactly `want` is here; the seconds it took."""
        t0 = time.monotonic()
        async with asyncio.timeout(timeout):
            while set(self.members) != want:
                await self.change()
        return time.monotonic() - t0


async def watch(client: GatewayClient, room: str = ROOM) -> Watch:
    w = Watch(await client.kv_sub("presence", f"{room}.*.*"))
    await w.synced()
    return w


async def deleted(w: Watch, gateway: Gateway) -> None:
    """Until nobody is here, by the gateway's delete (not an expiry), holding no key."""
    await w.until(set())
    assert w.last_op == "delete"
    assert gateway.hub.presence.held == 0


async def announce(client: GatewayClient, room: str = ROOM) -> str:
    reply = await client.request("sub", room, {"presence": True})
    return str(reply["inbox"])


async def test_join_and_leave_seen_on_another_gateway(
    gateway: Gateway, pair: tuple[GatewayClient, Watch]
) -> None:
    alice, w = pair
    inbox = await announce(alice)
    await w.until({"alice"})
    (key,) = w.members["alice"]
    assert key.startswith(f"{ROOM}.alice.")
    await alice.request("unsub", inbox=inbox)
    await deleted(w, gateway)


async def test_two_connections_one_member_until_the_last_closes(
    gateway: Gateway, other: Gateway, make_user: UserFactory
) -> None:
    token = await make_user("alice", CAPS)
    bob = await GatewayClient.connect(other.url, token=await make_user("bob", CAPS))
    tab1 = await GatewayClient.connect(gateway.url, token=token)
    tab2 = await GatewayClient.connect(other.url, token=token)
    try:
        w = await watch(bob)
        await announce(tab1)
        await announce(tab2)
        while sum(len(c) for c in w.members.values()) < 2:
            await w.change()
        assert set(w.members) == {"alice"}  # two connections, one member
        await tab1.close()
        while (await w.change())["op"] != "delete":
            pass  # refreshes (puts of known keys) until the first tab's leave
        assert set(w.members) == {"alice"}  # still here: the other tab holds it
        await tab2.close()
        await w.until(set())
    finally:
        for c in (tab1, tab2, bob):
            await c.close()


async def test_revoking_the_subject_deletes_the_key(
    gateway: Gateway, nc: NATS, pair: tuple[GatewayClient, Watch]
) -> None:
    alice, w = pair
    await announce(alice)
    await w.until({"alice"})
    kv = await nc.jetstream().key_value(USERS_BUCKET)
    record = decode_user((await kv.get("alice")).value or b"")
    record.capabilities.subjects = ["articles.>"]
    await kv.put("alice", encode_user(record))
    await deleted(w, gateway)


async def test_refused_without_the_bucket_capability_or_on_a_wildcard(
    gateway: Gateway, make_user: UserFactory, settings: Settings
) -> None:
    alice = await GatewayClient.connect(gateway.url, token=await make_user("alice"))
    try:
        with pytest.raises(RequestError) as e:
            await alice.kv_sub("presence", f"{ROOM}.*.*")
        assert e.value.code == "forbidden"
        with pytest.raises(RequestError) as e:
            await alice.request("sub", "chat.room.*", {"presence": True})
        assert e.value.code == "bad_request"
        assert "literal subject" in e.value.reason
        assert gateway.hub.presence.held == 0
    finally:
        await alice.close()


async def test_without_the_bucket_the_sub_is_refused_and_nothing_is_held(
    gateway: Gateway, nc: NATS, make_user: UserFactory
) -> None:
    """A resources file without `presence`: the announce fails `not_found`, holds nothing."""
    await nc.jetstream().delete_stream(kvwire.stream_of("presence"))
    alice = await GatewayClient.connect(gateway.url, token=await make_user("alice", CAPS))
    try:
        with pytest.raises(RequestError) as e:
            await alice.request("sub", ROOM, {"presence": True})
        assert e.value.code == "not_found"
        assert gateway.hub.presence.held == 0
        await alice.request("sub", ROOM)  # a plain sub still works
    finally:
        await alice.close()


async def test_refused_on_a_presence_refuse_subject(
    settings: Settings, nc: NATS, make_user: UserFactory
) -> None:
    refusing = Settings(**{**_fields(settings), "presence_refuse": ("chat.room.9",)})
    async with Gateway(refusing, host="127.0.0.1", port=0) as gw:
        alice = await GatewayClient.connect(gw.url, token=await make_user("alice", CAPS))
        try:
            with pytest.raises(RequestError) as e:
                await alice.request("sub", "chat.room.9", {"presence": True})
            assert e.value.code == "bad_request"
            await announce(alice, "chat.room.8")  # others are not refused
            assert gw.hub.presence.held == 1
        finally:
            await alice.close()


async def test_killed_gateway_users_leave_within_the_ttl(
    gateway: Gateway, settings: Settings, nc: NATS, make_user: UserFactory, tmp_path: Path
) -> None:
    bob = await GatewayClient.connect(gateway.url, token=await make_user("bob", CAPS))
    env = {"PRESENCE_TTL": str(TTL), "PRESENCE_REFRESH": "0.5"}
    try:
        w = await watch(bob)
        async with gateway_process(settings, tmp_path / "gw.log", **env) as gp:
            alice = await GatewayClient.connect(gp.url, token=await make_user("alice", CAPS))
            await announce(alice)
            await w.until({"alice"})
            gp.kill()  # SIGKILL: nothing deletes the key
            t0 = time.monotonic()
            await w.until(set(), timeout=TTL + 10)
            assert w.last_op == "purge"  # the expiry's marker: nobody deleted it
            left = time.monotonic() - t0
            await alice.close()
        # The expiry's marker is the leave (a bounded wait, reported: not a speed check).
        info = await nc.jetstream().stream_info(kvwire.stream_of("presence"))
        assert info.config.allow_msg_ttl
        print(f"crash-leave after {left:.2f} s (PRESENCE_TTL {TTL} s)")
    finally:
        await bob.close()
