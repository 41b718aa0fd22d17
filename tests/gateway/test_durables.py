"""Durable js_subs kept as records (ws_gateway/durables.py) and served by the shared history
and tail: resumed on any gateway at the first message not yet done, taken over by the
newer connection, deleted by their user. Two real gateways on one real nats-server."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from nats.aio.client import Client as NATS

from shared.client import ClientSubscription, GatewayClient, RequestError, WsTransport
from shared.settings import Settings
from tests.gateway.conftest import UserFactory
from tests.waits import until
from ws_gateway.server import Gateway


@pytest.fixture
async def other(settings: Settings, nc: NATS) -> AsyncIterator[Gateway]:
    async with Gateway(settings, host="127.0.0.1", port=0) as gw:
        yield gw


async def _closed(gw: Gateway) -> None:
    hub = gw.hub
    assert hub is not None
    await until(lambda: not hub.sessions and not hub.closing, "the old session to close", 10)


async def _seqs(sub: ClientSubscription, n: int) -> list[int]:
    return [(await sub.get())["data"]["seq"] for _ in range(n)]


@pytest.mark.parametrize("where", ["same", "other"])
async def test_resumes_with_exactly_what_was_sent_while_away(
    where: str, gateway: Gateway, other: Gateway, make_user: UserFactory, nc: NATS
) -> None:
    js = nc.jetstream()
    token = await make_user()
    c1 = await GatewayClient.connect(gateway.url, token=token)
    sub = await c1.js_sub("chat", "chat.room.123", durable="d", start_seq=1)
    assert sub.ok == {"position": 1, "recovered": True, "durable": "created"}
    for i in range(3):
        await js.publish("chat.room.123", str(i).encode())
    assert await _seqs(sub, 3) == [1, 2, 3]
    await c1.close()
    await _closed(gateway)
    await js.publish("chat.room.456", b"not ours")
    await js.publish("chat.room.123", b"4")
    await js.publish("chat.room.123", b"5")
    back = gateway if where == "same" else other
    async with await GatewayClient.connect(back.url, token=token) as c2:
        sub2 = await c2.js_sub("chat", "chat.room.123", durable="d")
        assert sub2.ok == {"position": 5, "recovered": True, "durable": "resumed"}
        assert await _seqs(sub2, 2) == [5, 6]
        await js.publish("chat.room.123", b"6")
        assert await _seqs(sub2, 1) == [7]
        assert sub2.get_nowait() is None
    # No NATS consumer per durable: only the shared tails, gone once nobody reads.
    consumers = [c.name for c in await js.consumers_info("chat")]
    assert not [n for n in consumers if n.startswith("u_")]


async def test_the_newer_connection_takes_over_and_the_older_is_told(
    gateway: Gateway, other: Gateway, make_user: UserFactory, nc: NATS
) -> None:
    js = nc.jetstream()
    token = await make_user()
    async with (
        await GatewayClient.connect(gateway.url, token=token) as c1,
        await GatewayClient.connect(other.url, token=token) as c2,
    ):
        old = await c1.js_sub("chat", "chat.room.123", durable="d", ack=True, start_seq=1)
        await js.publish("chat.room.123", b"1")
        assert await _seqs(old, 1) == [1]
        await old.ack(1)
        await c1.ping()
        new = await c2.js_sub("chat", "chat.room.123", durable="d", ack=True)
        assert new.ok["durable"] == "resumed"
        err = await old.get(timeout=10)  # at the older holder's next save
        assert err["op"] == "error" and err["data"]["code"] == "taken_over"
        await js.publish("chat.room.123", b"2")
        got = await _seqs(new, 1 if new.ok["position"] == 2 else 2)
        assert got[-1] == 2 and set(got) <= {1, 2}  # 1 again only if its ack was not saved
        assert old.get_nowait() is None  # ended: nothing more


async def test_a_deleted_durable_starts_afresh_not_recovered(
    gateway: Gateway, make_user: UserFactory, nc: NATS
) -> None:
    js = nc.jetstream()
    for i in range(3):
        await js.publish("chat.room.123", str(i).encode())
    async with await GatewayClient.connect(gateway.url, token=await make_user()) as c:
        sub = await c.js_sub("chat", "chat.room.123", durable="d", start_seq=1)
        assert await _seqs(sub, 3) == [1, 2, 3]
        await c.request("unsub", inbox=sub.inbox, data={"delete_durable": True})
        again = await c.js_sub("chat", "chat.room.123", durable="d", start_seq=2)
        assert again.ok == {"position": 2, "recovered": False, "durable": "created"}
        assert await _seqs(again, 2) == [2, 3]
        plain = await c.js_sub("chat", "chat.room.123")
        with pytest.raises(RequestError) as e:
            await c.request("unsub", inbox=plain.inbox, data={"delete_durable": True})
        assert e.value.code == "bad_request"
        await c.ping()  # the refused unsub ended nothing


async def test_ack_true_never_loses_an_unacked_message_when_the_socket_drops(
    gateway: Gateway, other: Gateway, make_user: UserFactory, nc: NATS
) -> None:
    """The connection is cut (no close frame) with messages handed on but unacked; the
    client resumes at once on the other gateway: each unacked one comes again, first."""
    js = nc.jetstream()
    token = await make_user()
    for attempt in range(5):
        c1 = await GatewayClient.connect(gateway.url, token=token)
        name = f"drop{attempt}"
        sub = await c1.js_sub("chat", "chat.room.123", durable=name, ack=True, start_seq=1)
        first = sub.ok["position"]
        last = (await js.stream_info("chat")).state.last_seq
        await js.publish("chat.room.123", b"x")
        await js.publish("chat.room.123", b"y")
        got = await _seqs(sub, last + 2 - first + 1)
        await sub.ack(got[0])
        await c1.ping()
        assert isinstance(c1.ws, WsTransport)
        c1.ws.ws.transport.abort()
        async with await GatewayClient.connect(other.url, token=token) as c2:
            sub2 = await c2.js_sub("chat", "chat.room.123", durable=name, ack=True)
            n = last + 2 - sub2.ok["position"] + 1
            again = await _seqs(sub2, n)
            assert again[0] == sub2.ok["position"]
            assert set(got[1:]) <= set(again)  # the unacked ones, none lost
        await _closed(gateway)
