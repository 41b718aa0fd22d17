"""Connection lifecycle and core subscriptions over real sockets and a real nats-server."""

from __future__ import annotations

import asyncio

import pytest
from nats.aio.client import Client as NATS

from shared.client import GatewayClient, RequestError
from tests.gateway.conftest import ClientFactory, UserFactory
from ws_gateway.server import Gateway


async def test_connect_sends_cap_update_first(make_user: UserFactory, connect: ClientFactory):
    """The first frame is cap_update with {uid} substituted."""
    c = await connect(await make_user("alice"), record=True)
    first = await c.envelopes.get()
    assert first["op"] == "cap_update"
    assert first["data"]["user"] == "alice"
    assert first["data"]["capabilities"]["buckets"]["todos"] == ["user.alice.>"]


async def test_subscribe_allowed_subject_receives_messages(
    make_user: UserFactory, connect: ClientFactory, nc: NATS
):
    """An allowed sub gets ok, then sub_msg with the real subject and embedded JSON."""
    c = await connect(await make_user())
    sub = await c.sub("chat.room.*")
    await nc.publish("chat.room.7", b'{"text": "hi"}')
    await nc.publish("chat.room.8", b"\xffbinary")
    m1, m2 = await sub.get(), await sub.get()
    assert m1["target"] == "chat.room.7" and m1["data"]["payload"] == {"text": "hi"}
    assert "inbox" not in m1
    assert m2["data"]["payload_b64"] == "/2JpbmFyeQ=="


async def test_subscribe_disallowed_subject_is_forbidden(
    make_user: UserFactory, connect: ClientFactory
):
    """A subject outside the capabilities is refused with forbidden."""
    c = await connect(await make_user())
    with pytest.raises(RequestError) as e:
        await c.sub("secret.stuff")
    assert e.value.code == "forbidden"


@pytest.mark.parametrize("pattern", ["chat.>", ">", "*.room.*", "chat.*.*", "chat.room.*.x"])
async def test_wildcard_escalation_refused(
    make_user: UserFactory, connect: ClientFactory, pattern: str
):
    """A wider pattern than the capability is refused even though it 'matches'."""
    c = await connect(await make_user())
    with pytest.raises(RequestError) as e:
        await c.sub(pattern)
    assert e.value.code == "forbidden"


@pytest.mark.parametrize("subject", ["$JS.API.>", "$KV.todos.>", "$SYS.>", "_INBOX.>", "cmd.x"])
async def test_internal_subjects_refused_even_for_admin(
    make_user: UserFactory, connect: ClientFactory, subject: str
):
    """System and internal subjects are never subscribable, whatever the capabilities."""
    c = await connect(await make_user("root", {"subjects": [">"]}))
    with pytest.raises(RequestError) as e:
        await c.sub(subject)
    assert e.value.code == "forbidden"


async def test_full_wildcard_is_narrowed_away_from_internal_subjects(
    make_user: UserFactory, connect: ClientFactory, nc: NATS
):
    """`sub >` by an admin never delivers $KV/_INBOX/cmd traffic."""
    c = await connect(await make_user("root", {"subjects": [">"]}))
    sub = await c.sub(">")
    await nc.publish("cmd.secret", b"1")
    await nc.publish("_INBOX.x", b"2")
    await nc.publish("$KV.todos.k", b"3")
    await nc.publish("public.done", b"4")
    seen = []
    while (m := await sub.get())["target"] != "public.done":
        seen.append(m["target"])
    internal = ("cmd.", "_INBOX.", "$")
    assert not [t for t in seen if t.startswith(internal)]


async def test_one_nats_subscription_per_pattern_and_once_per_connection(
    make_user: UserFactory, connect: ClientFactory, gateway: Gateway, nc: NATS
):
    """Connections share a NATS subscription; overlapping subs deliver once per connection."""
    token = await make_user()
    a, b = await connect(token), await connect(token)
    await a.sub("chat.room.1")
    await b.sub("chat.room.1")
    assert gateway.hub is not None and len(gateway.hub.router) == 1
    c = await connect(token, record=True)
    s1 = await c.sub("chat.room.*")
    await c.sub("chat.room.1")
    assert len(gateway.hub.router) == 2
    await nc.publish("chat.room.1", b"1")
    await nc.publish("chat.room.2", b"2")
    got = [(await s1.get())["data"]["payload"] for _ in range(2)]
    assert got == [1, 2]
    await c.ping()  # everything queued before the pong has been routed
    msgs = []
    while not c.envelopes.empty():
        env = c.envelopes.get_nowait()
        if env["op"] == "sub_msg":
            msgs.append(env["target"])
    assert msgs == ["chat.room.1", "chat.room.2"]


async def test_unsub_releases_the_shared_nats_subscription(
    make_user: UserFactory, connect: ClientFactory, gateway: Gateway
):
    """The NATS subscription goes when the last member leaves, by inbox or by target."""
    token = await make_user()
    a, b = await connect(token), await connect(token)
    sa = await a.sub("chat.room.1")
    await b.sub("chat.room.1")
    await sa.unsub()
    assert gateway.hub is not None and len(gateway.hub.router) == 1
    await b.request("unsub", target="chat.room.1")
    assert len(gateway.hub.router) == 0
    with pytest.raises(RequestError) as e:
        await b.request("unsub", inbox="nope")
    assert e.value.code == "not_found"


async def test_duplicate_inbox_refused(make_user: UserFactory, connect: ClientFactory):
    """Reusing a live inbox is duplicate_inbox."""
    c = await connect(await make_user())
    await c.request("sub", "chat.room.1", inbox="x")
    with pytest.raises(RequestError) as e:
        await c.request("sub", "chat.room.2", inbox="x")
    assert e.value.code == "duplicate_inbox"


async def test_cmd_is_use_http(make_user: UserFactory, connect: ClientFactory):
    """cmd over WebSocket points at the HTTP endpoint."""
    c = await connect(await make_user())
    with pytest.raises(RequestError) as e:
        await c.request("cmd", "chat.send")
    assert e.value.code == "use_http" and "/api/commands/chat.send" in e.value.reason


@pytest.mark.parametrize(
    "frame",
    ['{"op":"sub"}', "not json", '{"op":"bogus","inbox":"i"}', '[]',
     '{"op":"sub","target":"a..b","inbox":"i"}', '{"op":"sub","target":"a","extra":1}'],
)
async def test_bad_frames_get_bad_request(
    make_user: UserFactory, connect: ClientFactory, frame: str
):
    """Malformed frames get bad_request and the connection stays open."""
    c = await connect(await make_user())
    await c.send(frame)
    err = await asyncio.wait_for(c.errors.get(), 5)
    assert err["data"]["code"] == "bad_request"
    await c.ping()


async def test_unsupported_version_closes_1002(make_user: UserFactory, connect: ClientFactory):
    """v other than 1: unsupported_version, then close 1002."""
    c = await connect(await make_user())
    await c.send('{"v":2,"op":"ping","inbox":"p"}')
    assert await c.wait_closed() == 1002


async def test_too_many_bad_frames_closes_1008(make_user: UserFactory, connect: ClientFactory):
    """A client that keeps sending garbage is closed with 1008."""
    c = await connect(await make_user())
    for _ in range(20):
        try:
            await c.send("garbage")
        except Exception:
            break
    assert await c.wait_closed() == 1008


async def test_frame_too_big_closes_1009(make_user: UserFactory, connect_ws: ClientFactory):
    """A frame over the 64 KiB limit closes 1009."""
    c = await connect_ws(await make_user())
    await c.send('{"op":"ping","inbox":"' + "x" * 70000 + '"}')
    assert await c.wait_closed() == 1009


async def test_binary_frame_is_bad_request(make_user: UserFactory, connect_ws: ClientFactory):
    """Only text frames carry envelopes."""
    c = await connect_ws(await make_user())
    await c.send(b'{"op":"ping"}')
    err = await asyncio.wait_for(c.errors.get(), 5)
    assert err["data"]["code"] == "bad_request"


async def test_upgrade_refused_without_valid_token(gateway: Gateway, make_user: UserFactory):
    """No token, a bad token, or a disabled user: HTTP 401/403 before any WebSocket."""
    from websockets.exceptions import InvalidStatus

    for headers, status in [({}, 401), ({"Authorization": "Bearer nope"}, 401)]:
        with pytest.raises(InvalidStatus) as e:
            await GatewayClient.connect(gateway.url, headers=headers)
        assert e.value.response.status_code == status
    token = await make_user("bob", disabled=True)
    with pytest.raises(InvalidStatus) as e:
        await GatewayClient.connect(gateway.url, token=token)
    assert e.value.response.status_code == 403


async def test_cookie_upgrade_needs_an_allowed_origin(gateway: Gateway, make_user: UserFactory):
    """A session cookie is only accepted with an Origin from the allow-list."""
    from websockets.exceptions import InvalidStatus

    token = await make_user()
    cookie = {"Cookie": f"session={token}"}
    c = await GatewayClient.connect(gateway.url, headers={**cookie,
                                                          "Origin": "http://127.0.0.1:8080"})
    await c.close()
    for origin in ["http://evil.example", "http://127.0.0.1:8080.evil", "null", None]:
        headers = dict(cookie)
        if origin:
            headers["Origin"] = origin
        with pytest.raises(InvalidStatus) as e:
            await GatewayClient.connect(gateway.url, headers=headers)
        assert e.value.response.status_code == 403


async def test_health_routes(gateway: Gateway):
    """healthz, readyz and metrics answer on the gateway's port."""
    import aiohttp

    async with aiohttp.ClientSession() as http:
        base = f"http://127.0.0.1:{gateway.port}"
        for path, needle in [("/healthz", "ok"), ("/readyz", "ready"),
                             ("/metrics", "gateway_connections")]:
            async with http.get(base + path) as r:
                assert r.status == 200
                assert needle in await r.text()
