"""Users CRUD gated by users.manage, partial PUT, capability validation, explain."""

from __future__ import annotations

import msgspec
from nats.aio.client import Client as NATS
from nats.js.client import JetStreamContext

from shared.capabilities import Capabilities
from tests.api.conftest import Api

NEW_USER = {
    "username": "carol",
    "password": "carol-secret",
    "display_name": "Carol",
    "capabilities": {"subjects": ["chat.room.*"], "commands": ["chat.send"]},
}


async def test_admin_lists_users_others_cannot(api: Api) -> None:
    resp = await api.client.get("/api/users", headers=api.auth("admin"))
    assert resp.status == 200
    names = {u["username"] for u in (await resp.json())["items"]}
    assert names == {"admin", "alice", "bob"}
    resp = await api.client.get("/api/users", headers=api.auth("alice"))
    assert resp.status == 403
    resp = await api.client.get("/api/users")
    assert resp.status == 401


async def test_a_user_may_get_itself_but_not_others(api: Api) -> None:
    alice, bob = api.users["alice"].id, api.users["bob"].id
    resp = await api.client.get(f"/api/users/{alice}", headers=api.auth("alice"))
    assert resp.status == 200
    assert (await resp.json())["username"] == "alice"
    resp = await api.client.get(f"/api/users/{bob}", headers=api.auth("alice"))
    assert resp.status == 403
    resp = await api.client.get("/api/users/u0000000000000000", headers=api.auth("admin"))
    assert resp.status == 404
    resp = await api.client.get("/api/users/no.such", headers=api.auth("admin"))
    assert resp.status == 404


async def test_create_user_then_log_in(api: Api, nc: NATS, js: JetStreamContext) -> None:
    """POST /users → 201 + Location; the event and the audit record carry no password."""
    events = await nc.subscribe("users.*.created")
    resp = await api.client.post("/api/users", json=NEW_USER, headers=api.auth("admin"))
    assert resp.status == 201, await resp.text()
    user = await resp.json()
    assert resp.headers["Location"] == f"/api/users/{user['id']}"
    assert user["revision"] > 0 and user["disabled"] is False
    event = await events.next_msg(timeout=5)
    assert event.subject == f"users.{user['id']}.created"
    audit = await js.get_last_msg("audit", "audit.users.created")
    assert audit.data is not None
    assert b"carol-secret" not in event.data and b"carol-secret" not in audit.data
    record = msgspec.json.decode(audit.data)
    assert record["who"]["username"] == "admin" and record["what"]["id"] == user["id"]
    await events.unsubscribe()
    login = await api.login("carol", "carol-secret")
    assert login["user"]["capabilities"]["commands"] == ["chat.send"]
    resp = await api.client.post("/api/users", json=NEW_USER, headers=api.auth("admin"))
    assert resp.status == 409


async def test_create_user_bad_input(api: Api) -> None:
    """Bad capability pattern → 422 naming it; bad username, short password, extra field → 422."""
    bad_caps = {**NEW_USER, "capabilities": {"subjects": ["chat.>.x"]}}
    resp = await api.client.post("/api/users", json=bad_caps, headers=api.auth("admin"))
    assert resp.status == 422
    problem = await resp.json()
    # The document states the pattern; the answer names the field that missed it.
    assert problem["detail"] == (
        "Expected `str` matching its documented pattern - at `$.capabilities.subjects[0]`"
    )
    for body in (
        {**NEW_USER, "username": "Carol Smith"},
        {**NEW_USER, "username": "carol\n"},
        {**NEW_USER, "password": "short"},
        {**NEW_USER, "role": "admin"},
        {**NEW_USER, "capabilities": {"topics": ["x"]}},
    ):
        resp = await api.client.post("/api/users", json=body, headers=api.auth("admin"))
        assert resp.status == 422, body
    resp = await api.client.post("/api/users", json=NEW_USER, headers=api.auth("alice"))
    assert resp.status == 403


async def test_put_replaces_only_the_fields_it_carries(api: Api) -> None:
    bob = api.users["bob"]
    resp = await api.client.put(
        f"/api/users/{bob.id}", json={"display_name": "Robert"}, headers=api.auth("admin")
    )
    assert resp.status == 200
    body = await resp.json()
    assert body["display_name"] == "Robert"
    assert msgspec.convert(body["capabilities"], Capabilities) == bob.capabilities
    assert body["disabled"] is False
    resp = await api.client.put(
        f"/api/users/{bob.id}",
        json={"capabilities": {"subjects": ["chat.room.1"]}},
        headers=api.auth("admin"),
    )
    body = await resp.json()
    assert body["display_name"] == "Robert"
    assert body["capabilities"] == {"subjects": ["chat.room.1"]}


async def test_put_password(api: Api) -> None:
    bob = api.users["bob"]
    resp = await api.client.put(
        f"/api/users/{bob.id}", json={"password": "new-password-1"}, headers=api.auth("admin")
    )
    assert resp.status == 200
    await api.login("bob", "new-password-1")
    resp = await api.client.post(
        "/api/auth/login", json={"username": "bob", "password": api.settings.demo_password}
    )
    assert resp.status == 401


async def test_put_bad_input_and_denials(api: Api) -> None:
    bob = api.users["bob"].id
    admin = api.auth("admin")
    cases = [
        ({"capabilities": {"buckets": {"a.b": [">"]}}}, 422),
        ({"username": "robert"}, 422),  # not a field PUT may change
        ({"disabled": "yes"}, 422),
    ]
    for body, status in cases:
        resp = await api.client.put(f"/api/users/{bob}", json=body, headers=admin)
        assert resp.status == status, body
    resp = await api.client.put(f"/api/users/{bob}", data=b"[", headers=admin)
    assert resp.status == 400
    resp = await api.client.put(
        "/api/users/u0000000000000000", json={"disabled": True}, headers=admin
    )
    assert resp.status == 404
    resp = await api.client.put(
        f"/api/users/{bob}", json={"disabled": True}, headers=api.auth("alice")
    )
    assert resp.status == 403


async def test_delete_removes_record_and_credentials(api: Api, js: JetStreamContext) -> None:
    bob = api.users["bob"].id
    resp = await api.client.delete(f"/api/users/{bob}", headers=api.auth("alice"))
    assert resp.status == 403
    resp = await api.client.delete(f"/api/users/{bob}", headers=api.auth("admin"))
    assert resp.status == 200
    assert (await resp.json())["revision"] > 0
    users = await js.key_value("auth_users")
    creds = await js.key_value("auth_credentials")
    for kv, key in ((users, bob), (creds, "bob")):
        try:
            await kv.get(key)
        except Exception as e:
            assert type(e).__name__ == "KeyNotFoundError"
        else:
            raise AssertionError(f"{key} still exists")
    resp = await api.client.delete(f"/api/users/{bob}", headers=api.auth("admin"))
    assert resp.status == 404
    resp = await api.client.post(
        "/api/auth/login", json={"username": "bob", "password": api.settings.demo_password}
    )
    assert resp.status == 401


async def test_explain(api: Api) -> None:
    """explain answers {allowed, rule, reason} with the gateway's own capability checks."""
    alice = api.users["alice"].id
    admin = api.auth("admin")

    async def explain(**q: str) -> dict[str, object]:
        resp = await api.client.get(f"/api/users/{alice}/explain", params=q, headers=admin)
        assert resp.status == 200, await resp.text()
        body: dict[str, object] = await resp.json()
        return body

    assert await explain(op="sub", target="chat.room.1") == {
        "allowed": True,
        "rule": "subjects: chat.room.*",
        "reason": "'chat.room.1' is within 'chat.room.*'",
    }
    denied = await explain(op="sub", target="chat.>")
    assert denied["allowed"] is False and denied["rule"] is None
    ok = await explain(op="kv_sub", target="todos", pattern=f"user.{alice}.>")
    assert ok["allowed"] is True and ok["rule"] == f"buckets.todos: user.{alice}.>"
    assert (await explain(op="kv_sub", target="todos", pattern="user.x.>"))["allowed"] is False
    assert (await explain(op="kv_sub", target="auth_credentials"))["allowed"] is False
    assert (await explain(op="js_sub", target="chat", pattern="chat.room.1"))["allowed"] is True
    assert (await explain(op="cmd", target="chat.send"))["allowed"] is True
    assert (await explain(op="cmd", target="users.manage"))["allowed"] is False
    for q in ({"op": "pub", "target": "x"}, {"op": "sub"}, {"op": "sub", "target": ""}):
        resp = await api.client.get(f"/api/users/{alice}/explain", params=q, headers=admin)
        assert resp.status == 400, q
    # A well-formed question about a target no request could name: never allowed.
    invalid = await explain(op="sub", target="a..b")
    assert invalid["allowed"] is False and "invalid" in str(invalid["reason"])
    resp = await api.client.get(
        f"/api/users/{alice}/explain",
        params={"op": "sub", "target": "x"},
        headers=api.auth("alice"),
    )
    assert resp.status == 403


async def test_the_last_admin_cannot_lock_everyone_out(api: Api) -> None:
    """The only enabled admin may not disable itself, drop users.manage or be deleted
    (409, nothing changed); once a second admin exists, either change is allowed."""
    admin = api.users["admin"].id
    auth = api.auth("admin")
    url = f"/api/users/{admin}"
    before = await (await api.client.get(url, headers=auth)).json()
    for method, body in (
        ("PUT", {"disabled": True}),
        ("PUT", {"capabilities": {"commands": ["chat.send"]}}),
        ("DELETE", None),
    ):
        resp = await api.client.request(method, url, json=body, headers=auth)
        assert resp.status == 409, (method, body, await resp.text())
        assert "last enabled admin" in (await resp.json())["detail"]
    after = await (await api.client.get(url, headers=auth)).json()
    assert after == before
    # Disabling another user or changing one's own display name is not affected.
    resp = await api.client.put(url, json={"display_name": "Root"}, headers=auth)
    assert resp.status == 200, await resp.text()
    await api.add_user("second", Capabilities(commands=["users.manage"]))
    resp = await api.client.put(url, json={"disabled": True}, headers=auth)
    assert resp.status == 200, await resp.text()
    # Now "second" is the last one.
    second = api.users["second"].id
    resp = await api.client.delete(f"/api/users/{second}", headers=api.auth("second"))
    assert resp.status == 409


async def test_a_put_with_no_field_changes_nothing(api: Api, js: JetStreamContext) -> None:
    """`{}` is a valid UserUpdate: it replaces nothing, answers the user as it is, writes
    no revision."""
    bob = api.users["bob"].id
    url, auth = f"/api/users/{bob}", api.auth("admin")
    before = await (await api.client.get(url, headers=auth)).json()
    resp = await api.client.put(url, json={}, headers=auth)
    assert resp.status == 200, await resp.text()
    assert await resp.json() == before
    assert await (await api.client.get(url, headers=auth)).json() == before
