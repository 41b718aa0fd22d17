"""POST /api/commands/{command}: chat.send, todos, and forwarding to cmd.<command>."""

from __future__ import annotations

import asyncio

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.client import JetStreamContext

from shared.capabilities import Capabilities
from tests.api.conftest import Api


async def test_chat_send_publishes_to_the_stream(api: Api, js: JetStreamContext) -> None:
    resp = await api.client.post(
        "/api/commands/chat.send", json={"room": "lobby", "text": "hi"}, headers=api.auth("alice")
    )
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert body["stream"] == "chat" and body["seq"] >= 1 and body["duplicate"] is False
    msg = await js.get_msg("chat", body["seq"])
    assert msg.subject == "chat.room.lobby"
    stored = msgspec.json.decode(msg.data or b"")
    assert stored["text"] == "hi" and stored["author"] == api.users["alice"].id
    assert stored["author_name"] == "Alice" and stored["time"]


async def test_chat_send_idempotency_key_stores_once(api: Api, js: JetStreamContext) -> None:
    """The same Idempotency-Key twice: one stored message, the retry answered duplicate."""
    headers = {**api.auth("alice"), "Idempotency-Key": "k-1"}
    answers = []
    for _ in range(2):
        resp = await api.client.post(
            "/api/commands/chat.send", json={"room": "r1", "text": "once"}, headers=headers
        )
        assert resp.status == 200
        answers.append(await resp.json())
    assert answers[0]["seq"] == answers[1]["seq"]
    assert [a["duplicate"] for a in answers] == [False, True]
    info = await js.stream_info("chat")
    assert info.state.messages == 1
    # Another user's identical key is another message (keys are per user).
    resp = await api.client.post(
        "/api/commands/chat.send",
        json={"room": "r1", "text": "once"},
        headers={**api.auth("bob"), "Idempotency-Key": "k-1"},
    )
    assert (await resp.json())["duplicate"] is False
    assert (await js.stream_info("chat")).state.messages == 2


async def test_chat_send_bad_input_and_denial(api: Api) -> None:
    auth = api.auth("alice")
    for body in (
        {"room": "a.b", "text": "x"},
        {"room": "*", "text": "x"},
        {"room": "r"},
        {"room": "r", "text": ""},
        {"room": "r", "text": "x", "to": "y"},
    ):
        resp = await api.client.post("/api/commands/chat.send", json=body, headers=auth)
        assert resp.status == 422, body
    resp = await api.client.post("/api/commands/chat.send", data=b"nope", headers=auth)
    assert resp.status == 400
    resp = await api.client.post(
        "/api/commands/chat.send",
        json={"room": "r", "text": "x"},
        headers={**auth, "Idempotency-Key": "x" * 200},
    )
    assert resp.status == 400
    await api.add_user("mute", Capabilities(subjects=["chat.room.*"]))
    resp = await api.client.post(
        "/api/commands/chat.send", json={"room": "r", "text": "x"}, headers=api.auth("mute")
    )
    assert resp.status == 403
    resp = await api.client.post("/api/commands/chat.send", json={"room": "r", "text": "x"})
    assert resp.status == 401
    resp = await api.client.post("/api/commands/chat.>", json={}, headers=api.auth("admin"))
    assert resp.status == 400


async def test_todos_put_and_delete(api: Api, js: JetStreamContext, nc: NATS) -> None:
    uid = api.users["alice"].id
    auth = api.auth("alice")
    events = await nc.subscribe(f"todos.{uid}.t1.*")
    resp = await api.client.post(
        "/api/commands/todos.put", json={"id": "t1", "title": "milk", "done": False}, headers=auth
    )
    assert resp.status == 200
    first = await resp.json()
    assert first["key"] == f"user.{uid}.t1"
    kv = await js.key_value("todos")
    entry = await kv.get(f"user.{uid}.t1")
    assert entry.revision == first["revision"]
    assert msgspec.json.decode(entry.value or b"")["title"] == "milk"
    resp = await api.client.post(
        "/api/commands/todos.put", json={"id": "t1", "title": "milk", "done": True}, headers=auth
    )
    second = await resp.json()
    assert second["revision"] > first["revision"]
    resp = await api.client.post("/api/commands/todos.delete", json={"id": "t1"}, headers=auth)
    assert resp.status == 200
    assert (await resp.json())["revision"] > second["revision"]
    subjects = [(await events.next_msg(timeout=5)).subject for _ in range(3)]
    assert subjects == [f"todos.{uid}.t1.{a}" for a in ("created", "updated", "deleted")]
    await events.unsubscribe()
    resp = await api.client.post("/api/commands/todos.delete", json={"id": "t1"}, headers=auth)
    assert resp.status == 404
    resp = await api.client.post(
        "/api/commands/todos.put", json={"id": "a.b", "title": "x"}, headers=auth
    )
    assert resp.status == 422


async def test_forwarded_command_gets_the_reply(api: Api, nc: NATS, js: JetStreamContext) -> None:
    """A real NATS responder on cmd.<x> answers; the caller arrives in the User-Id header."""
    seen: list[Msg] = []

    async def responder(msg: Msg) -> None:
        seen.append(msg)
        await msg.respond(msgspec.json.encode({"echo": msgspec.json.decode(msg.data)}))

    sub = await nc.subscribe("cmd.reports.build", cb=responder)
    await nc.flush()
    await api.add_user("rep", Capabilities(commands=["reports.*"]))
    resp = await api.client.post(
        "/api/commands/reports.build",
        json={"n": 1},
        headers={**api.auth("rep"), "Idempotency-Key": "r-1"},
    )
    assert resp.status == 200
    assert await resp.json() == {"echo": {"n": 1}}
    assert seen[0].headers and seen[0].headers["User-Id"] == api.users["rep"].id
    assert seen[0].headers["Idempotency-Key"] == "r-1"
    audit = await js.get_last_msg("audit", "audit.commands.reports.build")
    assert msgspec.json.decode(audit.data or b"")["who"]["username"] == "rep"
    resp = await api.client.post("/api/commands/other.thing", json={}, headers=api.auth("rep"))
    assert resp.status == 403
    resp = await api.client.post("/api/commands/reports.build", data=b"{", headers=api.auth("rep"))
    assert resp.status == 400
    await sub.unsubscribe()


async def test_forwarded_command_errors(api: Api, nc: NATS) -> None:
    """No responder → 404; a responder that never answers → 504; a service error → its status."""
    admin = api.auth("admin")
    resp = await api.client.post("/api/commands/nobody.home", json={}, headers=admin)
    assert resp.status == 404
    received = asyncio.Event()

    async def silent(msg: Msg) -> None:
        received.set()

    async def failing(msg: Msg) -> None:
        assert msg.reply
        await nc.publish(
            msg.reply,
            b"",
            headers={"Nats-Service-Error-Code": "409", "Nats-Service-Error": "already running"},
        )

    subs = [await nc.subscribe("cmd.slow", cb=silent), await nc.subscribe("cmd.bad", cb=failing)]
    await nc.flush()
    resp = await api.client.post("/api/commands/slow", json={}, headers=admin)
    assert resp.status == 504 and received.is_set()
    resp = await api.client.post("/api/commands/bad", json={}, headers=admin)
    assert resp.status == 409
    assert (await resp.json())["detail"] == "already running"
    for s in subs:
        await s.unsubscribe()
