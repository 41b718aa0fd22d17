"""The Python client (clients/python, natsgate-client) on a whole stack through nginx:
kill -9 of the gateway it is on, token refresh, revocation, the queue policy."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import time
from collections.abc import AsyncIterator
from typing import Literal

import aiohttp
import pytest
from nats.aio.client import Client as NATS
from natsgate_client import (
    CapabilitiesChanged,
    Client,
    ClientClosed,
    Disconnected,
    Event,
    Joined,
    KvChange,
    KvSynced,
    Left,
    PasswordLogin,
    Resubscribed,
    State,
    StreamMessage,
    SubscriptionClosed,
    SubscriptionEnded,
    TokenRefreshed,
    login,
)

from deploy import stack as ops
from shared import natsio
from shared.auth import TokenIssuer
from tests.deploy.stackrun import (
    MixedWrites,
    Stack,
    bring_back,
    chat_send_acked,
    gateway_of,
    keep_down,
)
from tests.waits import until

DEMO = "demo"


@contextlib.asynccontextmanager
async def _killed(stack: Stack, *ports: int) -> AsyncIterator[None]:
    """The gateways on `ports` killed (SIGKILL) and kept down for the body (supervisord would
    restart them at once); then started again, and waited for until nginx reaches them."""
    names = [f"ws_gateway_{p}" for p in ports]
    for p in ops._process_info(stack.layout):
        if p["name"] in names:
            os.kill(p["pid"], signal.SIGKILL)
    with ops.rpc(stack.layout) as server:
        for name in names:
            keep_down(server, f"ws_gateway:{name}")
    try:
        yield
    finally:
        with ops.rpc(stack.layout) as server:
            for name in names:
                bring_back(server, f"ws_gateway:{name}")
        await stack.gateways_serving()


@pytest.mark.parametrize("transport", ["websocket", "polling"])
async def test_kill_9_of_its_gateway_resumes_stream_and_bucket_exactly(
    client_stack: Stack, transport: Literal["websocket", "polling"]
) -> None:
    """kill -9 the gateway the client is on (kept down) while it reads a stream and a
    bucket through nginx: it reconnects to the other gateway and resumes with no gap, no
    duplicate, and the bucket's exact final state."""
    stack = client_stack
    room = f"pyc-{transport}"
    async with aiohttp.ClientSession(base_url=stack.url) as http:
        bob = (await login(stack.url, "bob", DEMO, http=http)).token
        alice = (await login(stack.url, "alice", DEMO, http=http)).token  # the writer's
        keys = (f"{room}-{i}" for i in itertools.count())
        published = [await chat_send_acked(http, bob, room, "first", next(keys), 30)]

        events: list[tuple[float, Event]] = []
        client = Client(stack.url, PasswordLogin(stack.url, "alice", DEMO), transport=transport)
        client.on(lambda e: events.append((time.monotonic(), e)))
        await client.connect()
        try:
            uid = client.user
            todos = await client.kv_sub("todos", f"user.{uid}.>")
            await todos.synced(10)
            chat = await client.js_sub("chat", f"chat.room.{room}", start_seq=published[0])
            seqs: list[int] = []

            async def read_stream() -> None:
                async for item in chat:
                    assert isinstance(item, StreamMessage), item
                    seqs.append(item.seq)

            async def read_bucket() -> None:
                async for _ in todos:
                    pass  # its state is `todos.entries`

            readers = [asyncio.create_task(read_stream()), asyncio.create_task(read_bucket())]
            writes = MixedWrites(http, bob, alice, room, uid, transport, published)
            try:
                await writes.write(12)
                victim = await gateway_of(list(stack.settings.gateway_ports))
                t_kill = time.monotonic()
                async with _killed(stack, victim):
                    await writes.write(30)
                    await until(
                        lambda: chat.last_seq >= published[-1]
                        and (todos.revision or 0) >= writes.last_rev,
                        "the client to have every message and change",
                        30,
                    )
                    other = next(p for p in stack.settings.gateway_ports if p != victim)
                    assert await gateway_of([other]) == other
                    # The bucket's exact state: what a fresh subscription sees now.
                    fresh = await client.kv_sub("todos", f"user.{uid}.>")
                    await fresh.synced(10)
                    assert todos.values == fresh.values
                    mine = {f"user.{uid}.{i}" for i in writes.ids}
                    titles = {k: v["title"] for k, v in todos.values.items() if k in mine}
                    assert titles == writes.expected
            finally:
                for t in readers:
                    t.cancel()
                await asyncio.gather(*readers, return_exceptions=True)
        finally:
            await client.close()

    resumed = [t for t, e in events if isinstance(e, Resubscribed) and t > t_kill]
    lost = [e for _, e in events if isinstance(e, Disconnected)]
    assert len(resumed) == 2 and all(
        e.recovered for _, e in events if isinstance(e, Resubscribed)
    ), events
    gaps = len(set(published) - set(seqs))
    dups = len(seqs) - len(set(seqs))
    print(
        f"\n[{transport}] kill -9 -> both subscriptions resumed in {max(resumed) - t_kill:.3f} s; "
        f"{len(published)} messages, gaps {gaps}, duplicates {dups} "
        f"(dropped by the client: {chat.duplicates}); disconnects {len(lost)}"
    )
    assert seqs == sorted(published)  # 0 gaps, 0 duplicates, in order



async def test_token_near_expiry_is_refreshed_with_no_disconnect(client_stack: Stack) -> None:
    """A provider minting 5 s tokens (a trusted backend with the signing key): the client
    hands the session a new one before each expires, and the session outlives the first
    token with no disconnect."""
    stack = client_stack
    me = await login(stack.url, "alice", DEMO)
    issuer = TokenIssuer.from_settings(stack.settings)
    minted: list[int] = []

    async def provider() -> str:
        token, claims = issuer.issue(str(me.user["id"]), ttl=5)
        minted.append(claims.exp)
        return token

    events: list[Event] = []
    async with Client(stack.url, provider) as client:
        client.on(events.append)
        room = "pyc-refresh"
        chat = await client.js_sub("chat", f"chat.room.{room}")
        first_exp = minted[0]
        for _ in range(2):
            await client.wait_for(TokenRefreshed, timeout=10)
        await until(lambda: time.time() > first_exp + 0.5, "the first token to expire", 10)
        async with aiohttp.ClientSession(base_url=stack.url) as http:
            seq = await chat_send_acked(http, me.token, room, "after", "pyc-refresh-1", 10)
        msg = await chat.get(10)
        assert isinstance(msg, StreamMessage) and msg.seq == seq
        assert client.state == State.CONNECTED
    assert len(minted) >= 3  # the connection's token, then one per refresh
    assert not [e for e in events if isinstance(e, Disconnected)], events


async def test_revocation_is_an_event_and_ends_the_subscription(client_stack: Stack) -> None:
    """An admin takes the stream away: the client reports it, the js_sub's iteration raises
    `SubscriptionEnded("revoked")`, and the kv_sub stays."""
    stack = client_stack
    admin = await login(stack.url, "admin", DEMO)
    async with Client(stack.url, PasswordLogin(stack.url, "alice", DEMO)) as client:
        chat = await client.js_sub("chat", "chat.room.pyc-revoke")
        todos = await client.kv_sub("todos", f"user.{client.user}.>")
        await todos.synced(10)
        url = f"{stack.url}/api/users/{client.user}"
        auth = {"Authorization": f"Bearer {admin.token}"}
        async with aiohttp.ClientSession() as http:
            async with http.get(url, headers=auth) as r:
                caps = (await r.json())["capabilities"]
            changed = client.expect(CapabilitiesChanged)
            closed = client.expect(SubscriptionClosed)
            revoke = {"capabilities": {**caps, "streams": {}}}
            async with http.put(url, json=revoke, headers=auth) as r:
                assert r.status == 200, await r.text()
            try:
                ended = await asyncio.wait_for(closed, 10)
                assert (ended.inbox, ended.reason) == (chat.inbox, "revoked")
                revoked = (await asyncio.wait_for(changed, 10)).revoked
                assert [ref.inbox for ref in revoked] == [chat.inbox]
                with pytest.raises(SubscriptionEnded) as e:
                    async for _ in chat:
                        pass
                assert e.value.reason == "revoked"
                assert todos.ended is None and client.state == State.CONNECTED
            finally:
                async with http.put(url, json={"capabilities": caps}, headers=auth) as r:
                    assert r.status == 200, await r.text()


async def test_logout_closes_a_static_token_client_for_good(client_stack: Stack) -> None:
    """A fixed token revoked by logout: 4401, no provider to ask, so the client is CLOSED
    and its subscriptions end with reason `closed`."""
    stack = client_stack
    me = await login(stack.url, "alice", DEMO)
    client = Client(stack.url, me.token)
    await client.connect()
    try:
        sub = await client.sub("chat.room.pyc-logout")
        lost = client.expect(Disconnected)
        async with aiohttp.ClientSession() as http:
            async with http.post(
                f"{stack.url}/api/auth/logout", headers={"Authorization": f"Bearer {me.token}"}
            ) as r:
                assert r.status == 204
        gone = await asyncio.wait_for(lost, 10)
        assert (gone.code, gone.reconnect) == (4401, False)
        with pytest.raises(SubscriptionEnded) as e:
            await sub.get(10)
        assert e.value.reason == "closed" and client.state == State.CLOSED
        assert client.closed is not None and client.closed.code == 4401
    finally:
        await client.close()


async def test_a_slow_consumer_hits_its_queue_bound(client_stack: Stack) -> None:
    """Nobody reads a stream subscription of 50 slots while 120 messages arrive: it ends
    with `overflow` holding 50 (bounded memory), yields them, then raises; the session and
    its other subscriptions go on."""
    stack = client_stack
    room = "pyc-slow"
    me = await login(stack.url, "bob", DEMO)
    async with aiohttp.ClientSession(base_url=stack.url) as http:
        seqs = [
            await chat_send_acked(http, me.token, room, f"m{i}", f"{room}-{i}", 10)
            for i in range(120)
        ]
    async with Client(stack.url, PasswordLogin(stack.url, "alice", DEMO)) as client:
        overflow = client.expect(SubscriptionClosed)
        slow = await client.js_sub("chat", f"chat.room.{room}", start_seq=seqs[0], queue_size=50)
        assert (await asyncio.wait_for(overflow, 10)).reason == "overflow"
        assert slow.pending == 50
        got: list[int] = []
        with pytest.raises(SubscriptionEnded) as e:
            async for item in slow:
                assert isinstance(item, StreamMessage)
                got.append(item.seq)
        assert e.value.reason == "overflow" and got == seqs[:50]
        assert slow.last_seq == seqs[49]  # the resume point is the last item it kept
        # The client is fine; a subscription from there that reads at its pace gets the rest.
        again = await client.js_sub(
            "chat", f"chat.room.{room}", start_seq=slow.last_seq + 1, queue_size=100
        )
        rest = [(await again.get(10)) for _ in range(70)]
        assert [m.seq for m in rest if isinstance(m, StreamMessage)] == seqs[50:]


async def test_password_login_refreshes_and_a_wrong_password_is_final(
    client_stack: Stack,
) -> None:
    stack = client_stack
    tokens = PasswordLogin(stack.url, "alice", DEMO)
    first, second = await tokens(), await tokens()  # a login, then a refresh
    assert first != second and tokens.current is not None and tokens.current.token == second
    async with Client(stack.url, second) as client:
        assert client.user == tokens.current.user["id"]
    wrong = Client(stack.url, PasswordLogin(stack.url, "alice", "not the password"))
    with pytest.raises(ClientClosed) as e:
        await wrong.connect()
    assert e.value.code == 401 and wrong.state == State.CLOSED
    assert "not the password" not in repr(wrong.__dict__)


async def test_a_kv_resume_point_gone_reloads_and_drops_what_it_did_not_send(
    client_stack: Stack,
) -> None:
    """While every gateway is down, an article is deleted and another updated, then the
    bucket's history is purged below the update: the resume comes back `recovered: false`
    with the full state, and the client drops the deleted key it never heard of."""
    stack = client_stack
    tokens = PasswordLogin(stack.url, "alice", DEMO)
    async with Client(stack.url, tokens, backoff_max=1.0) as client:
        articles = await client.kv_sub("articles")
        await articles.synced(10)
        auth = {"Authorization": f"Bearer {tokens.token}"}
        async with aiohttp.ClientSession(base_url=stack.url, headers=auth) as http:
            made = []
            for title in ("gone", "kept"):
                async with http.post("/api/articles", json={"title": title, "body": ""}) as r:
                    assert r.status == 201, await r.text()
                    made.append(await r.json())
            gone, kept = made
            await until(
                lambda: (articles.revision or 0) >= kept["revision"], "both articles", 10
            )
            assert {gone["id"], kept["id"]} <= set(articles.values)
            resumed = client.expect(Resubscribed, lambda e: e.inbox == articles.inbox)
            async with _killed(stack, *stack.settings.gateway_ports):
                async with http.delete(f"/api/articles/{gone['id']}") as r:
                    assert r.status == 200, await r.text()
                body = {"title": "kept, edited", "body": ""}
                async with http.put(f"/api/articles/{kept['id']}", json=body) as r:
                    assert r.status == 200, await r.text()
                    edited = (await r.json())["revision"]
                nc = await _nats(stack)
                try:
                    await nc.jetstream().purge_stream("KV_articles", seq=edited)
                finally:
                    await nc.close()
            assert (await asyncio.wait_for(resumed, 30)).recovered is False
        await articles.synced(10)
        items = []
        while articles.pending:
            items.append(await articles.get())
        drops = [i for i in items if isinstance(i, KvChange) and i.op == "drop"]
        assert [d.key for d in drops] == [gone["id"]]
        assert isinstance(items[-1], KvSynced) and items[-1].recovered is False
        assert articles.values[kept["id"]]["title"] == "kept, edited"
        fresh = await client.kv_sub("articles")
        await fresh.synced(10)
        assert articles.values == fresh.values


async def _nats(stack: Stack) -> NATS:
    """A client of the stack's NATS as the admin CLI's user (NATS asks for credentials)."""
    user, password = natsio.credentials(stack.settings, "provision") or (None, None)
    return await natsio.nats_connect(
        servers=list(stack.settings.nats_url), user=user, password=password
    )


async def test_presence_is_one_member_per_user_with_joins_and_leaves(client_stack: Stack) -> None:
    """`presence(subject)` through nginx: alice's two connections are one member (two
    connections), she leaves when the last one unsubscribes or closes."""
    stack, room = client_stack, "chat.room.pyc-presence"
    async with Client(stack.url, PasswordLogin(stack.url, "bob", DEMO)) as bob:
        here = await bob.presence(room)
        await here.synced(10)
        assert here.members == {}
        tab1 = await Client(stack.url, PasswordLogin(stack.url, "alice", DEMO)).connect()
        tab2 = await Client(stack.url, PasswordLogin(stack.url, "alice", DEMO)).connect()
        try:
            first = await tab1.sub(room, presence=True)
            event = await here.get(10)
            assert isinstance(event, Joined)
            uid = event.member.uid
            assert (event.member.name, event.member.connections) == ("Alice", 1)
            await tab2.sub(room, presence=True)
            await until(lambda: here.members[uid].connections == 2, "the second tab")
            assert list(here.members) == [uid]  # one member
            await first.unsub()
            await until(lambda: here.members[uid].connections == 1, "the first tab's leave")
            await tab2.close()
            event = await here.get(10)
            assert event == Left(uid)
            assert here.members == {}
        finally:
            await tab1.close()
            await tab2.close()
