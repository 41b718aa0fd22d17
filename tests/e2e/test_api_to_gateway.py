"""HTTP writes through the API arrive at WebSocket clients of the gateway, and only there.

The API runs in-process as tests/api runs it, the gateway in-process as tests/gateway runs it,
both on the same real nats-server. Users are the demo users seeded by the API fixture or
created with the same admin helper; tokens come from `POST /api/auth/login`.
"""

from __future__ import annotations

from typing import Any

from shared.capabilities import Capabilities
from shared.client import ClientSubscription
from tests.api.conftest import Api
from tests.gateway.conftest import ClientFactory

READER_CAPS = Capabilities(
    subjects=["chat.room.*", "articles.>"],
    buckets={"articles": [">"]},
    streams={"chat": [">"]},
    commands=[],
)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def login(api: Api, username: str, password: str | None = None) -> str:
    token: str = (await api.login(username, password))["token"]
    return token


async def call(api: Api, method: str, path: str, token: str, status: int, **kw: Any) -> Any:
    resp = await api.client.request(method, path, headers=bearer(token), **kw)
    assert resp.status == status, await resp.text()
    return await resp.json() if resp.status != 204 else None


async def synced(sub: ClientSubscription) -> dict[str, Any]:
    msg = await sub.get()
    assert msg["op"] == "kv_msg" and msg["data"]["op"] == "synced", msg
    return msg


async def test_article_crud_arrives_as_kv_msg_and_sub_msg(api: Api, connect: ClientFactory) -> None:
    """Article create/update/delete over HTTP arrive as kv_msg put/put/delete and sub_msg events."""
    token = await login(api, "alice")
    c = await connect(token)
    kv = await c.kv_sub("articles")
    events = await c.sub("articles.>")
    await synced(kv)

    created = await call(
        api, "POST", "/api/articles", token, 201, json={"title": "One", "body": "first"}
    )
    aid = created["id"]
    updated = await call(
        api, "PUT", f"/api/articles/{aid}", token, 200, json={"title": "One", "body": "second"}
    )
    deleted = await call(api, "DELETE", f"/api/articles/{aid}", token, 200)
    assert created["revision"] < updated["revision"] < deleted["revision"]

    seen = [(await kv.get())["data"] for _ in range(3)]
    assert [(d["key"], d["op"], d["revision"]) for d in seen] == [
        (aid, "put", created["revision"]),
        (aid, "put", updated["revision"]),
        (aid, "delete", deleted["revision"]),
    ]
    assert seen[0]["value"]["body"] == "first"
    assert seen[1]["value"]["body"] == "second"

    msgs = [await events.get() for _ in range(3)]
    assert [(m["op"], m["target"]) for m in msgs] == [
        ("sub_msg", f"articles.{aid}.created"),
        ("sub_msg", f"articles.{aid}.updated"),
        ("sub_msg", f"articles.{aid}.deleted"),
    ]
    assert [m["data"]["payload"]["revision"] for m in msgs] == [
        created["revision"],
        updated["revision"],
        deleted["revision"],
    ]


async def test_chat_send_arrives_as_js_msg_with_seq(api: Api, connect: ClientFactory) -> None:
    """POST /api/commands/chat.send arrives as js_msg on stream chat with the seq it returned."""
    token = await login(api, "alice")
    c = await connect(token)
    chat = await c.js_sub("chat", "chat.room.lobby")
    sent = await call(
        api, "POST", "/api/commands/chat.send", token, 200, json={"room": "lobby", "text": "hello"}
    )
    assert sent["stream"] == "chat" and not sent["duplicate"]
    msg = await chat.get()
    assert msg["op"] == "js_msg" and msg["inbox"] == chat.inbox
    assert msg["data"]["seq"] == sent["seq"]
    assert msg["data"]["subject"] == "chat.room.lobby"
    assert msg["data"]["payload"]["text"] == "hello"
    assert msg["data"]["payload"]["author"] == api.users["alice"].id


async def test_capability_change_over_http_revokes_live_subscription(
    api: Api, connect: ClientFactory
) -> None:
    """An admin PUT /api/users/{id} removing a capability sends cap_update and revokes that sub."""
    user = await api.add_user("carol", READER_CAPS)
    admin = await login(api, "admin")
    c = await connect(await login(api, "carol", "pw-123456"), record=True)
    chat = await c.sub("chat.room.1")
    articles = await c.sub("articles.>")
    await c.cap_updates.get()  # the connect-time one
    assert c.envelopes is not None
    while not c.envelopes.empty():  # cap_update and the two ok replies
        c.envelopes.get_nowait()

    reduced = {"subjects": ["articles.>"], "buckets": {"articles": [">"]}, "streams": {}}
    out = await call(
        api, "PUT", f"/api/users/{user.id}", admin, 200, json={"capabilities": reduced}
    )
    assert out["capabilities"]["subjects"] == ["articles.>"]

    update = await c.cap_updates.get()
    assert update["data"]["user"] == user.id
    assert update["data"]["capabilities"]["subjects"] == ["articles.>"]
    assert [(r["inbox"], r["op"], r["target"]) for r in update["data"]["revoked"]] == [
        (chat.inbox, "sub", "chat.room.1")
    ]
    assert chat.revoked.is_set() and not articles.revoked.is_set()

    # Gone on the server too: a chat message sent after it never reaches the socket; an
    # article event published after it by the same API connection does, and marks the end.
    await call(
        api, "POST", "/api/commands/chat.send", admin, 200, json={"room": "1", "text": "after"}
    )
    created = await call(api, "POST", "/api/articles", admin, 201, json={"title": "marker"})
    marker = await articles.get()
    assert marker["target"] == f"articles.{created['id']}.created"
    seen = [c.envelopes.get_nowait() for _ in range(c.envelopes.qsize())]
    assert not [e for e in seen if e["op"] == "sub_msg" and e["target"].startswith("chat.")]
    assert marker in seen


async def test_disabling_user_over_http_closes_4403(api: Api, connect: ClientFactory) -> None:
    """An admin PUT /api/users/{id} with disabled=true closes the user's socket 4403."""
    user = await api.add_user("dave", READER_CAPS)
    admin = await login(api, "admin")
    c = await connect(await login(api, "dave", "pw-123456"))
    out = await call(api, "PUT", f"/api/users/{user.id}", admin, 200, json={"disabled": True})
    assert out["disabled"] is True
    err = await c.errors.get()
    assert err["data"]["code"] == "user_disabled"
    assert await c.wait_closed() == 4403


async def test_logout_over_http_closes_that_tokens_socket_4401(
    api: Api, connect: ClientFactory
) -> None:
    """POST /api/auth/logout closes the sockets using that token 4401, and only those."""
    token = await login(api, "alice")
    other_token = await login(api, "alice")
    c = await connect(token)
    other = await connect(other_token)
    assert await call(api, "POST", "/api/auth/logout", token, 204) is None
    assert await c.wait_closed() == 4401
    await other.ping()
    assert other.close_code is None


async def test_http_response_changes_no_client_state(api: Api, connect: ClientFactory) -> None:
    """After an HTTP write the subscription holds only what the WebSocket delivered, in order."""
    token = await login(api, "alice")
    a = await call(api, "POST", "/api/articles", token, 201, json={"title": "A", "body": "a0"})
    b = await call(api, "POST", "/api/articles", token, 201, json={"title": "B", "body": "b0"})
    c = await connect(token, record=True)
    kv = await c.kv_sub("articles", a["id"])
    initial = await kv.get()
    assert (initial["data"]["key"], initial["data"]["revision"]) == (a["id"], a["revision"])
    await synced(kv)
    assert c.envelopes is not None
    while not c.envelopes.empty():  # cap_update, ok, initial value, synced
        c.envelopes.get_nowait()

    # An unrelated key changes first, then ours; only ours may reach this subscription.
    b2 = await call(
        api, "PUT", f"/api/articles/{b['id']}", token, 200, json={"title": "B", "body": "b1"}
    )
    a2 = await call(
        api, "PUT", f"/api/articles/{a['id']}", token, 200, json={"title": "A", "body": "a1"}
    )
    assert b2["revision"] < a2["revision"]

    msg = await kv.get()
    assert msg["op"] == "kv_msg" and msg["target"] == "articles"
    assert msg["data"]["key"] == a["id"] and msg["data"]["op"] == "put"
    assert msg["data"]["revision"] == a2["revision"]
    assert msg["data"]["value"]["body"] == "a1"

    await c.ping()  # a round trip: anything the gateway sent before the pong is in by now
    assert kv.get_nowait() is None
    # The response is an acknowledgement: what the subscription got came off the socket
    # (the reader records every envelope it decodes), never from the HTTP response.
    seen = [c.envelopes.get_nowait() for _ in range(c.envelopes.qsize())]
    assert seen[0] is msg  # the first thing after the write was our kv_msg, read off the socket
    assert [e["op"] for e in seen[1:]] == ["pong"]
    assert not [e for e in seen if e.get("data", {}).get("key") == b["id"]]
