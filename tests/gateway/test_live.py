"""Live capability changes, revocation, token expiry, backpressure, outages, leaks."""

from __future__ import annotations

import asyncio
import gc

import pytest
from nats.aio.client import Client as NATS

from shared.auth import TokenIssuer
from shared.client import GatewayClient, RequestError
from shared.users import REVOKED_BUCKET, USERS_BUCKET
from tests.gateway.conftest import ALICE_CAPS, ClientFactory, UserFactory
from tests.natsd import NatsServer
from tests.waits import until, until_async
from ws_gateway.server import Gateway


async def test_capability_removal_revokes_live_subscriptions(
    make_user: UserFactory, connect: ClientFactory, nc: NATS
):
    """Removing a capability ends the subscription and sends cap_update listing it."""
    c = await connect(await make_user(), record=True)
    chat = await c.sub("chat.room.1")
    articles = await c.sub("articles.>")  # kept: its messages mark how far the socket got
    todos = await c.kv_sub("todos", "user.alice.>")
    js = await c.js_sub("chat", "chat.room.123")
    await c.cap_updates.get()  # the connect-time one
    reduced = {**ALICE_CAPS, "subjects": ["articles.>"], "streams": {}}
    await make_user("alice", reduced)
    update = await asyncio.wait_for(c.cap_updates.get(), 5)
    revoked = {(r["inbox"], r["op"]) for r in update["data"]["revoked"]}
    assert revoked == {(chat.inbox, "sub"), (js.inbox, "js_sub")}
    assert update["data"]["capabilities"]["subjects"] == ["articles.>"]
    assert chat.revoked.is_set() and not todos.revoked.is_set()
    assert not articles.revoked.is_set()
    with pytest.raises(RequestError) as e:
        await c.sub("chat.room.1")
    assert e.value.code == "forbidden"

    # Gone on the server too, not only in the client's table: a message on chat.room.1
    # published after the cap_update never reaches the socket. The witness on the kept
    # subject, published after it by the same connection, arrives behind anything it sent.
    await nc.publish("chat.room.1", b'"after"')
    await nc.publish("articles.x", b'"witness"')
    witness = await articles.get()
    assert witness["target"] == "articles.x" and witness["data"]["payload"] == "witness"
    assert c.envelopes is not None
    seen = [c.envelopes.get_nowait() for _ in range(c.envelopes.qsize())]
    since = seen[next(i for i, env in enumerate(seen) if env is update) :]
    assert witness in since
    assert not [e for e in since if e["op"] == "sub_msg" and e["target"] == "chat.room.1"]


async def test_disabled_user_closed_4403(make_user: UserFactory, connect: ClientFactory):
    """Disabling the user sends user_disabled and closes 4403."""
    c = await connect(await make_user())
    await make_user("alice", disabled=True)
    err = await asyncio.wait_for(c.errors.get(), 5)
    assert err["data"]["code"] == "user_disabled"
    assert await c.wait_closed() == 4403


async def test_deleted_user_closed_4403(make_user: UserFactory, connect: ClientFactory, nc: NATS):
    """Deleting the user record closes 4403."""
    c = await connect(await make_user())
    kv = await nc.jetstream().key_value(USERS_BUCKET)
    await kv.delete("alice")
    assert await c.wait_closed() == 4403


async def test_logout_revocation_closes_4401(
    make_user: UserFactory, connect: ClientFactory, nc: NATS, issuer: TokenIssuer, gateway: Gateway
):
    """A jti written to auth_revoked closes every socket using that token, and only those."""
    token = await make_user()
    a, b = await connect(token), await connect(token)
    other_token, _ = issuer.issue("alice")
    other = await connect(other_token)
    jti = gateway.hub.verifier.verify(token).jti  # type: ignore[union-attr]
    kv = await nc.jetstream().key_value(REVOKED_BUCKET)
    await kv.put(jti, b"1")
    assert await a.wait_closed() == 4401
    assert await b.wait_closed() == 4401
    await other.ping()
    from websockets.exceptions import InvalidStatus

    with pytest.raises(InvalidStatus) as e:
        await GatewayClient.connect(gateway.url, token=token)
    assert e.value.response.status_code == 401


async def test_handshakes_check_revocation_without_a_kv_read(
    make_user: UserFactory, connect: ClientFactory, nc: NATS, gateway: Gateway
):
    """The gateway keeps the revoked token ids in memory (listed at start, kept by its
    watch): a reconnect storm costs no auth_revoked read per handshake, and a token
    revoked is still refused."""
    reads: list[str] = []

    async def spy(msg: object) -> None:
        subject = msg.subject  # type: ignore[attr-defined]
        if "KV_auth_revoked" in subject or "$KV.auth_revoked" in subject:
            reads.append(subject)

    probe = await nc.subscribe("$JS.API.>", cb=spy)
    try:
        revoked_token, kept_token = await make_user(), await make_user()
        doomed = await connect(revoked_token)
        jti = gateway.hub.verifier.verify(revoked_token).jti  # type: ignore[union-attr]
        await (await nc.jetstream().key_value(REVOKED_BUCKET)).put(jti, b"1")
        assert await doomed.wait_closed() == 4401  # the watch has it: so has the mirror
        clients = [await connect(kept_token) for _ in range(10)]
        from websockets.exceptions import InvalidStatus

        with pytest.raises(InvalidStatus) as e:
            await GatewayClient.connect(gateway.url, token=revoked_token)
        assert e.value.response.status_code == 401
        for c in clients:
            await c.ping()
        await nc.flush()
        assert [s for s in reads if "DIRECT.GET" in s or "MSG.GET" in s] == []
    finally:
        await probe.unsubscribe()


async def test_token_expiry_closes_4401_unless_refreshed(
    make_user: UserFactory, connect: ClientFactory, issuer: TokenIssuer
):
    """At exp: token_expired + 4401; a refresh with a newer token first keeps it open."""
    short = await make_user(ttl=1)
    c = await connect(short)
    err = await asyncio.wait_for(c.errors.get(), 10)
    assert err["data"]["code"] == "token_expired"
    assert await c.wait_closed() == 4401

    kept = await connect(await make_user(ttl=1))
    fresh, claims = issuer.issue("alice", ttl=600)
    reply = await kept.refresh(fresh)
    assert reply["data"]["exp"] == claims.exp
    bob_token, _ = issuer.issue("bob", ttl=600)
    with pytest.raises(RequestError) as e:
        await kept.refresh(bob_token)
    assert e.value.code == "unauthorized"
    # outlive the old token's exp by pinging past it: still open
    deadline = asyncio.get_running_loop().time() + 2.5
    while asyncio.get_running_loop().time() < deadline:
        await kept.ping()
        await asyncio.sleep(0.25)
    assert kept.close_code is None


async def test_backpressure_closes_slow_client_only(
    make_user: UserFactory, gateway: Gateway, nc: NATS, settings
):
    """A client that stops reading is closed 1013; a second client keeps receiving."""
    from websockets.asyncio.client import connect as ws_connect

    token = await make_user()
    reader = await GatewayClient.connect(gateway.url, token=token)
    sub = await reader.sub("chat.room.1")
    slow = await ws_connect(gateway.url, additional_headers={"Authorization": f"Bearer {token}"},
                            compression=None, max_queue=1, ping_interval=None)
    slow.transport.pause_reading()  # stop reading: the kernel buffers fill up
    await slow.send('{"op":"sub","target":"chat.room.1","inbox":"s"}')
    payload = b'{"pad":"' + b"x" * 4000 + b'"}'
    before = gateway.hub.sessions.copy()  # type: ignore[union-attr]
    assert len(before) == 2
    for i in range(3000):
        await nc.publish("chat.room.1", payload)
        if i % 100 == 0:
            await nc.flush()
            got = [s for s in before if s.close_code == 1013]
            if got:
                break
    async def closed_1013() -> bool:
        await nc.flush()
        return any(s.close_code == 1013 for s in before)

    await until_async(closed_1013, "the slow client to be closed 1013", 10)
    codes = sorted(s.close_code or 0 for s in before)
    assert codes == [0, 1013]
    await nc.publish("chat.room.1", b'"still here"')
    while (await sub.get())["data"]["payload"] != "still here":
        pass
    slow.transport.abort()
    await reader.close()


async def test_client_sockets_have_a_bounded_kernel_send_buffer(
    make_user: UserFactory, gateway: Gateway, settings
):
    """SOCKET_SEND_BUFFER bounds what the kernel queues for a client (Linux reports the
    doubled value); left to autotuning it grows to 4 MiB, all of it ahead of the write
    timeout for a client that stops reading."""
    import socket

    c = await GatewayClient.connect(gateway.url, token=await make_user())
    try:
        assert gateway.server is not None
        (conn,) = gateway.server.connections
        sock = conn.transport.get_extra_info("socket")
        got = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        assert settings.socket_send_buffer <= got <= 2 * settings.socket_send_buffer
    finally:
        await c.close()


async def test_nats_restart_core_continues_and_js_resumes(
    make_user: UserFactory, connect: ClientFactory, gateway: Gateway, nats_server: NatsServer,
    nc: NATS,
):
    """After nats-server restarts: core subs continue, JetStream resumes with no gap/duplicate."""
    c = await connect(await make_user())
    core = await c.sub("chat.room.1")
    js_sub = await c.js_sub("chat", "chat.room.123")
    js = nc.jetstream()
    await js.publish("chat.room.123", b"1")
    assert (await js_sub.get())["data"]["seq"] == 1
    nats_server.restart()
    await until(
        lambda: gateway.hub.nats_ready and nc.is_connected,  # type: ignore[union-attr]
        "the gateway and the test client to reconnect",
    )
    for i in range(2, 6):
        # JetStream needs a moment to recover its streams after a restart; the msg id
        # makes a retried publish idempotent.
        for _ in range(100):
            try:
                await js.publish("chat.room.123", str(i).encode(), timeout=1,
                                 headers={"Nats-Msg-Id": f"m{i}"})
                break
            except Exception:
                await asyncio.sleep(0.1)
    seqs = [(await js_sub.get(timeout=20))["data"]["seq"] for _ in range(4)]
    assert seqs == [2, 3, 4, 5]
    for _ in range(100):  # core resubscription is asynchronous in nats-py
        await nc.publish("chat.room.1", b'"back"')
        await nc.flush()
        if (m := core.get_nowait()) is not None:
            assert m["data"]["payload"] == "back"
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail("core subscription did not resume")


async def test_connect_subscribe_disconnect_leaves_nothing_behind(
    make_user: UserFactory, gateway: Gateway, nc: NATS
):
    """1,000 cycles leave NATS subscriptions, consumers and tasks where they started."""
    token = await make_user()
    hub = gateway.hub
    assert hub is not None
    gc.collect()
    tasks_before = len(asyncio.all_tasks())
    subs_before = len(hub.nc._subs)
    consumers_before = (await nc.jetstream().stream_info("KV_todos")).state.consumer_count
    for i in range(1000):
        c = await GatewayClient.connect(gateway.url, token=token)
        await c.sub(f"chat.room.{i % 7}")
        if i % 50 == 0:
            await c.kv_sub("todos", "user.alice.>")
        await c.close()
    await until(lambda: not hub.sessions and not hub.closing, "every session to close", 10)
    assert not hub.by_user and not hub.by_jti
    assert len(hub.router) == 0
    assert len(hub.nc._subs) == subs_before
    info = await nc.jetstream().stream_info("KV_todos")
    assert info.state.consumer_count == consumers_before
    gc.collect()
    assert len(asyncio.all_tasks()) <= tasks_before + 1
