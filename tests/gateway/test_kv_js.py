"""KV and JetStream subscriptions: sync, live changes, resume, ack, durables."""

from __future__ import annotations

import pytest
from nats.aio.client import Client as NATS

from shared.client import RequestError
from tests.gateway.conftest import ClientFactory, UserFactory
from tests.waits import until
from ws_gateway.server import Gateway


async def test_kv_sub_sends_values_then_synced_then_live(
    make_user: UserFactory, connect: ClientFactory, nc: NATS
):
    """Current values, synced with the bucket revision, then put/delete with revisions."""
    kv = await nc.jetstream().key_value("todos")
    r1 = await kv.put("user.alice.1", b'{"title": "one"}')
    await kv.put("user.bob.1", b'{"title": "bob"}')
    c = await connect(await make_user())
    sub = await c.kv_sub("todos", "user.alice.>")
    assert sub.ok["recovered"] is False
    first = await sub.get()
    assert first["data"] == {"op": "put", "revision": r1, "key": "user.alice.1",
                             "value": {"title": "one"}}
    synced = await sub.get()
    assert synced["data"]["op"] == "synced" and synced["inbox"] == sub.inbox
    assert synced["data"]["revision"] == 2
    r3 = await kv.put("user.alice.2", b'"two"')
    await kv.put("user.bob.2", b"x")
    await kv.delete("user.alice.1")
    live = await sub.get()
    assert live["data"]["key"] == "user.alice.2" and live["data"]["revision"] == r3
    assert "inbox" not in live
    gone = await sub.get()
    assert gone["data"]["op"] == "delete" and gone["data"]["key"] == "user.alice.1"


async def test_kv_sub_empty_bucket_synced_at_zero(make_user: UserFactory, connect: ClientFactory):
    """An empty bucket is synced immediately with revision 0."""
    c = await connect(await make_user())
    sub = await c.kv_sub("articles")
    synced = await sub.get()
    assert synced["data"] == {"op": "synced", "revision": 0}


async def test_kv_sub_since_revision_resumes(
    make_user: UserFactory, connect: ClientFactory, nc: NATS
):
    """since_revision delivers only later changes and reports recovered."""
    kv = await nc.jetstream().key_value("articles")
    r1 = await kv.put("a", b"1")
    r2 = await kv.put("b", b"2")
    c = await connect(await make_user())
    sub = await c.kv_sub("articles", since_revision=r1)
    assert sub.ok == {"position": r1 + 1, "recovered": True}
    m = await sub.get()
    assert m["data"]["key"] == "b" and m["data"]["revision"] == r2
    assert (await sub.get())["data"]["op"] == "synced"
    future = await c.kv_sub("articles", since_revision=r2 + 100)
    assert future.ok["recovered"] is False


@pytest.mark.parametrize("pattern", [">", "user.*.>", "user.bob.>", "*.alice.>"])
async def test_kv_escalation_refused(make_user: UserFactory, connect: ClientFactory, pattern: str):
    """Only user.{uid}.> of todos: wider or sideways patterns are forbidden."""
    c = await connect(await make_user())
    with pytest.raises(RequestError) as e:
        await c.kv_sub("todos", pattern)
    assert e.value.code == "forbidden"


@pytest.mark.parametrize("bucket", ["auth_credentials", "auth_revoked"])
async def test_internal_buckets_refused(make_user: UserFactory, connect: ClientFactory, bucket):
    """Credential and revocation buckets are never exposed, even to `*` capabilities."""
    c = await connect(await make_user("root", {"buckets": {"*": [">"]}}))
    with pytest.raises(RequestError) as e:
        await c.kv_sub(bucket)
    assert e.value.code == "forbidden"


async def test_kv_unknown_bucket_not_found(make_user: UserFactory, connect: ClientFactory):
    """A bucket that does not exist is not_found."""
    c = await connect(await make_user("root", {"buckets": {"*": [">"]}}))
    with pytest.raises(RequestError) as e:
        await c.kv_sub("nosuchbucket")
    assert e.value.code == "not_found"


async def test_js_sub_allowed_filter_new_messages(
    make_user: UserFactory, connect: ClientFactory, nc: NATS
):
    """Default js_sub delivers only new messages, with seq, subject, time and inbox."""
    js = nc.jetstream()
    await js.publish("chat.room.123", b'{"old": true}')
    c = await connect(await make_user())
    sub = await c.js_sub("chat", "chat.room.123")
    assert sub.ok == {"position": 2, "recovered": True}
    ack = await js.publish("chat.room.123", b'{"new": true}')
    await js.publish("chat.room.999", b"{}")
    m = await sub.get()
    assert m["op"] == "js_msg" and m["inbox"] == sub.inbox
    assert m["data"]["seq"] == ack.seq and m["data"]["payload"] == {"new": True}
    assert m["data"]["subject"] == "chat.room.123" and m["data"]["time"].endswith("Z")


async def test_js_sub_disallowed_filter_forbidden(make_user: UserFactory, connect: ClientFactory):
    """A filter outside the stream capability is refused, and KV_ streams always."""
    c = await connect(await make_user())
    for stream, flt in [("chat", "chat.room.*"), ("chat", ">"), ("chat", "chat.room.789")]:
        with pytest.raises(RequestError) as e:
            await c.js_sub(stream, flt)
        assert e.value.code == "forbidden"
    root = await connect(await make_user("root", {"streams": {"*": [">"]}}))
    with pytest.raises(RequestError) as e:
        await root.js_sub("KV_auth_credentials", ">")
    assert e.value.code == "forbidden"
    with pytest.raises(RequestError) as e:
        await root.js_sub("nosuch", ">")
    assert e.value.code == "not_found"


async def test_js_start_seq_replays_and_reports_recovery(
    make_user: UserFactory, connect: ClientFactory, nc: NATS
):
    """start_seq replays history in order; beyond the stream's end recovered is false."""
    js = nc.jetstream()
    for i in range(5):
        await js.publish("chat.room.123", str(i).encode())
    c = await connect(await make_user())
    sub = await c.js_sub("chat", "chat.room.123", start_seq=3, batch=2)
    assert sub.ok == {"position": 3, "recovered": True}
    seqs = [(await sub.get())["data"]["seq"] for _ in range(3)]
    assert seqs == [3, 4, 5]
    gone = await c.js_sub("chat", "chat.room.123", start_seq=100)
    assert gone.ok["recovered"] is False


async def test_js_time_delta(make_user: UserFactory, connect: ClientFactory, nc: NATS):
    """time_delta replays recent history."""
    js = nc.jetstream()
    await js.publish("chat.room.456", b"1")
    c = await connect(await make_user())
    sub = await c.js_sub("chat", "chat.room.456", time_delta=3600)
    assert (await sub.get())["data"]["payload"] == 1


async def _until_closed(gateway: Gateway) -> None:
    """The old connection's session has released its consumer (bounded wait)."""
    hub = gateway.hub
    assert hub is not None
    await until(lambda: not hub.sessions and not hub.closing, "the old session to close", 10)


async def test_js_ack_redelivers_unacked(
    make_user: UserFactory, connect: ClientFactory, nc: NATS, gateway: Gateway
):
    """With ack: true an unacked message comes back on a durable resumed elsewhere."""
    js = nc.jetstream()
    await js.publish("chat.room.123", b"1")
    await js.publish("chat.room.123", b"2")
    token = await make_user()
    c1 = await connect(token)
    sub = await c1.js_sub("chat", "chat.room.123", start_seq=1, ack=True, durable="d1")
    m1, m2 = await sub.get(), await sub.get()
    assert (m1["data"]["seq"], m2["data"]["seq"]) == (1, 2)
    await sub.ack(m1["data"]["seq"])
    await c1.ping()
    await c1.close()
    await _until_closed(gateway)
    record = await (await js.key_value("gw_durables")).get("chat.alice.d1")
    assert record.value and b'"floor":1' in record.value  # its ack floor, saved on leaving
    c2 = await connect(token)
    await js.publish("chat.room.123", b"3")
    sub2 = await c2.js_sub("chat", "chat.room.123", ack=True, durable="d1")
    # The acked message never comes back; the unacked 2 does, at once, then 3.
    assert sub2.ok == {"position": 2, "recovered": True, "durable": "resumed"}
    assert [(await sub2.get())["data"]["seq"] for _ in range(2)] == [2, 3]
    with pytest.raises(RequestError) as e:
        await c2.request("ack", "chat", {"seq": 999}, inbox=sub2.inbox)
    assert e.value.code == "not_found"


async def test_js_durable_resumes_across_connections(
    make_user: UserFactory, connect: ClientFactory, nc: NATS, gateway: Gateway
):
    """A durable without acks resumes after the last delivered message on a new connection."""
    js = nc.jetstream()
    token = await make_user()
    c1 = await connect(token)
    sub = await c1.js_sub("chat", "chat.room.123", durable="tail", start_seq=1)
    for i in range(3):
        await js.publish("chat.room.123", str(i).encode())
    assert [(await sub.get())["data"]["seq"] for _ in range(3)] == [1, 2, 3]
    await c1.close()
    await js.publish("chat.room.123", b"3")
    await _until_closed(gateway)
    c2 = await connect(token)
    sub2 = await c2.js_sub("chat", "chat.room.123", durable="tail")
    assert (await sub2.get())["data"]["seq"] == 4
