"""Tokens of an external IdP (tests/idp.py, a real aiohttp app on loopback serving its JWKS)
used against the API and the gateway (WebSocket and long polling) as their own tokens are:
users from a default role, live role changes, refresh, revocation, the forged-token matrix,
and tokens minted by `POST /api/auth/tokens`."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import msgspec
import pytest

from http_api import roles
from http_api.state import JS, STORE
from shared import resources
from shared.capabilities import Capabilities
from shared.client import RequestError
from shared.settings import Settings, load
from tests.api.conftest import Api
from tests.gateway.conftest import ClientFactory
from tests.idp import Idp, resources_file
from tests.natsd import NatsServer
from tests.unit.test_issuers import forgeries
from tests.waits import until
from ws_gateway.server import Gateway


@pytest.fixture
def settings(nats_server: NatsServer, keys_dir: Path, idp: Idp, tmp_path: Path) -> Settings:
    path = resources_file(tmp_path / "resources.toml", idp)
    return load(
        {},
        nats_url=[nats_server.url],
        var_dir=str(keys_dir),
        nats_failover_wait=1.0,
        resources_file=str(path),
    )


@pytest.fixture
async def seeded_roles(api: Api) -> None:
    await roles.sync(api.app[STORE], resources.load(api.settings).roles)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.usefixtures("seeded_roles")
async def test_idp_user_connects_subscribes_and_sees_an_http_write(
    api: Api, connect: ClientFactory, idp: Idp
) -> None:
    """No password, no record: the IdP's RS256 token opens a socket (capabilities of the
    default role), the ES256 one writes over HTTP (the API creates the record from the
    role), and the write arrives on the socket."""
    c = await connect(idp.sign("carol", "rsa-1"))
    todos = await c.kv_sub("todos", "user.idp-carol.>")
    assert (await todos.get())["data"]["op"] == "synced"
    resp = await api.client.post(
        "/api/commands/todos.put",
        json={"id": "t1", "title": "from the IdP", "done": False},
        headers=bearer(idp.sign("carol", "ec-1")),
    )
    assert resp.status == 200, await resp.text()
    seen = (await todos.get())["data"]
    assert (seen["key"], seen["value"]["title"]) == ("user.idp-carol.t1", "from the IdP")
    me = await api.client.get("/api/auth/me", headers=bearer(idp.sign("carol", "ec-1")))
    body = await me.json()
    assert (body["id"], body["capabilities"]["buckets"]["todos"]) == (
        "idp-carol",
        ["user.idp-carol.>"],
    )
    # Someone else's todos stay out of reach, as for any member.
    with pytest.raises(RequestError) as e:
        await c.kv_sub("todos", "user.idp-dave.>")
    assert e.value.code == "forbidden"


@pytest.mark.usefixtures("seeded_roles")
async def test_without_a_default_role_unknown_users_are_refused(
    api: Api, gateway: Gateway, idp: Idp, tmp_path: Path, settings: Settings
) -> None:
    path = resources_file(tmp_path / "strict.toml", idp, default_role="")
    strict = msgspec.structs.replace(settings, resources_file=str(path))
    async with Gateway(strict, host="127.0.0.1", port=0) as gw:
        token = idp.sign("erin", "rsa-1")
        async with aiohttp.ClientSession() as http:
            with pytest.raises(aiohttp.WSServerHandshakeError) as e:
                await http.ws_connect(gw.url, headers=bearer(token))
        assert e.value.status == 401
    # The API's issuer config is the default-role one: created as a member there.
    assert (await api.client.get("/api/auth/me", headers=bearer(token))).status == 200


@pytest.mark.usefixtures("seeded_roles")
async def test_role_change_reaches_every_holder_live(
    api: Api, connect: ClientFactory, idp: Idp
) -> None:
    """Two IdP users hold `member` (records created by their first API call), a third
    only on the gateway (no record yet); narrowing the role sends each open socket a
    cap_update, and the subscription it no longer allows ends."""
    clients = []
    for name in ("fay", "gus", "hank"):
        token = idp.sign(name, "rsa-1")
        if name != "hank":  # hank never calls the API: no record, the gateway's role watch
            assert (await api.client.get("/api/auth/me", headers=bearer(token))).status == 200
        c = await connect(token)
        await c.cap_updates.get()  # the connect-time one
        chat = await c.js_sub("chat", "chat.>")
        clients.append((c, chat))
    narrowed = Capabilities(subjects=["chat.room.*"], buckets={"todos": ["user.{uid}.>"]})
    resp = await api.client.put(
        "/api/roles/member", json=msgspec.to_builtins(narrowed), headers=api.auth("admin")
    )
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["holders_updated"] == 2  # the records; hank has none
    for c, _ in clients:
        update = await asyncio.wait_for(c.cap_updates.get(), 10)
        assert "streams" not in update["data"]["capabilities"]  # omitted: none
        assert update["data"]["revoked"], update


@pytest.mark.usefixtures("seeded_roles")
async def test_a_role_change_during_a_default_role_handshake_is_applied(
    api: Api, gateway: Gateway, connect: ClientFactory, idp: Idp
) -> None:
    """The role loses `streams` while a record-less user's handshake holds the template it
    read: the new socket and every later one of that user get the narrowed role (the role
    watch applied the change before the user was known to it)."""
    assert gateway.hub is not None
    hub = gateway.hub
    token = idp.sign("ida", "rsa-1")
    hold = hub.checkpoint.hold("admit.role")
    connecting = asyncio.ensure_future(connect(token))
    await hold.reached()
    narrowed = Capabilities(subjects=["chat.room.*"], buckets={"todos": ["user.{uid}.>"]})
    resp = await api.client.put(
        "/api/roles/member", json=msgspec.to_builtins(narrowed), headers=api.auth("admin")
    )
    assert resp.status == 200, await resp.text()
    roles_kv = await api.app[JS].key_value("auth_roles")
    last = (await roles_kv.get("member")).revision or 0
    await until(
        lambda: hub._role_seen.get("member", (0, None))[0] >= last, "the role watch", 10
    )
    hold.release()
    c = await connecting
    assert "streams" not in c.capabilities, c.capabilities
    with pytest.raises(RequestError) as e:
        await c.js_sub("chat", "chat.>")
    assert e.value.code == "forbidden"
    again = await connect(token)
    assert "streams" not in again.capabilities


@pytest.mark.usefixtures("seeded_roles")
async def test_refresh_with_a_new_idp_token_and_logout_revokes(
    api: Api, connect: ClientFactory, idp: Idp
) -> None:
    first = idp.sign("hal", "rsa-1", claims={"jti": "a1"})
    c = await connect(first)
    fresh = idp.sign("hal", "ec-1", claims={"jti": "a2"})
    ok = await c.refresh(fresh)
    assert ok["op"] == "ok", ok
    with pytest.raises(RequestError) as e:
        await c.refresh(idp.sign("ivy", "rsa-1"))
    assert (e.value.code, e.value.reason) == ("unauthorized", "token is for another user")
    # Logout revokes the presented IdP token: the socket on it closes, the API refuses it.
    resp = await api.client.post("/api/auth/logout", headers=bearer(fresh))
    assert resp.status == 204, await resp.text()
    assert await c.wait_closed() is not None
    assert (await api.client.get("/api/auth/me", headers=bearer(fresh))).status == 401


@pytest.mark.usefixtures("seeded_roles")
async def test_the_api_does_not_turn_an_idp_token_into_ours(api: Api, idp: Idp) -> None:
    """POST /api/auth/refresh with an IdP's token: 403, no token of ours. Ours would outlive
    what the IdP decides (a disabled account, a shorter lifetime)."""
    token = idp.sign("hal", "rsa-1")
    assert (await api.client.get("/api/auth/me", headers=bearer(token))).status == 200
    resp = await api.client.post("/api/auth/refresh", headers=bearer(token))
    assert resp.status == 403, await resp.text()
    assert (await resp.json())["detail"] == "refresh this token at its issuer"
    assert "session" not in resp.cookies
    assert (await api.client.get("/api/auth/me", headers=bearer(token))).status == 200


@pytest.mark.usefixtures("seeded_roles")
async def test_forged_idp_tokens_get_401_at_gateway_and_api(
    api: Api, gateway: Gateway, idp: Idp
) -> None:
    """The forged-token matrix of the external issuer, on /ws, /poll/open and the API
    (bearer and cookie): every one a 401, never a 5xx; the control is accepted."""
    from tests.reliability.test_security import _poll_open_status, _upgrade_status

    control = idp.sign("jay", "rsa-1")
    assert await _upgrade_status(gateway.url, bearer(control)) == 101
    assert (await api.client.get("/api/auth/me", headers=bearer(control))).status == 200
    statuses: dict[str, list[int]] = {}
    for name, token, _ in forgeries(idp):
        statuses[name] = [
            await _upgrade_status(gateway.url, bearer(token)),
            await _poll_open_status(gateway, bearer(token)),
            (await api.client.get("/api/auth/me", headers=bearer(token))).status,
            (await api.client.get("/api/auth/me", headers={"Cookie": f"session={token}"})).status,
        ]
    assert {k: v for k, v in statuses.items() if v != [401] * 4} == {}


async def test_minted_tokens_for_app_backends(
    api: Api, connect: ClientFactory, nats_server: NatsServer
) -> None:
    """An admin mints for anyone; a service user with tokens.issue mints for ordinary users
    only; the minted token works on the gateway and expires when asked."""
    svc = await api.add_user("svc", Capabilities(commands=["tokens.issue"]))
    alice = api.users["alice"].id
    resp = await api.client.post(
        "/api/auth/tokens", json={"user_id": alice, "ttl": 60}, headers=api.auth("svc")
    )
    assert resp.status == 200, await resp.text()
    minted = await resp.json()
    assert minted["user_id"] == alice
    assert time.time() < minted["expires_at"] <= time.time() + 61
    c = await connect(minted["token"])
    assert (await c.cap_updates.get())["op"] == "cap_update"
    admin = api.users["admin"].id
    refused = await api.client.post(
        "/api/auth/tokens", json={"user_id": admin}, headers=api.auth("svc")
    )
    assert refused.status == 403
    assert (
        await api.client.post("/api/auth/tokens", json={"user_id": svc.id}, headers=api.auth("bob"))
    ).status == 403
    for body, status in [
        ({"user_id": "nobody"}, 404),
        ({"user_id": alice, "ttl": 0}, 422),
        ({"user_id": alice, "ttl": 10**9}, 422),
        ({"user_id": alice, "ttl": 86400}, 200),  # cut to TOKEN_TTL
        ({"user_id": "a.b"}, 422),
    ]:
        r = await api.client.post("/api/auth/tokens", json=body, headers=api.auth("admin"))
        assert r.status == status, (body, await r.text())


@pytest.mark.usefixtures("seeded_roles")
async def test_a_default_role_user_is_disabled_not_deleted(api: Api, idp: Idp) -> None:
    """Deleted, its next request would make it again from the issuer's default role: the
    API refuses the delete (409) and a disable keeps it out."""
    token = idp.sign("jon", "rsa-1")
    me = await api.client.get("/api/auth/me", headers=bearer(token))
    assert me.status == 200, await me.text()
    uid = (await me.json())["id"]
    resp = await api.client.delete(f"/api/users/{uid}", headers=api.auth("admin"))
    assert resp.status == 409
    assert "disable it instead" in (await resp.json())["detail"]
    resp = await api.client.put(
        f"/api/users/{uid}", json={"disabled": True}, headers=api.auth("admin")
    )
    assert resp.status == 200, await resp.text()
    fresh = idp.sign("jon", "ec-1", claims={"jti": "after-disable"})
    assert (await api.client.get("/api/auth/me", headers=bearer(fresh))).status == 403
