"""Token lifecycle (review findings 7 and 14): refresh rotates, log out everywhere, the
`auth_revoked` TTL follows TOKEN_TTL. The gateway is started in-process beside the API
where a test checks what open sockets see."""

from __future__ import annotations

import time
from collections.abc import Awaitable

import msgspec
import pytest
from nats.js.client import JetStreamContext
from websockets.exceptions import InvalidStatus

from http_api.state import STORE, VERIFIER
from shared import natsio
from shared.auth import Claims
from shared.client import GatewayClient, RequestError
from shared.settings import Settings
from shared.users import USER_MARK
from tests.api.conftest import Api
from ws_gateway.server import Gateway


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_refresh_revokes_the_old_token(api: Api, js: JetStreamContext) -> None:
    """Refresh writes the presented token's jti to auth_revoked (with the sockets' grace
    deadline after its expiry); the API refuses it from then on, the new one works."""
    old = (await api.login("alice"))["token"]
    resp = await api.client.post("/api/auth/refresh", headers=bearer(old))
    assert resp.status == 200
    new = (await resp.json())["token"]
    claims = api.app[VERIFIER].verify(old)
    entry = await (await js.key_value("auth_revoked")).get(claims.jti)
    assert entry.value is not None
    exp, grace_until = entry.value.split()
    assert int(exp) == claims.exp
    assert 0 < int(grace_until) - time.time() <= api.settings.token_rotation_grace + 1
    resp = await api.client.get("/api/auth/me", headers=bearer(old))
    assert resp.status == 401
    assert resp.content_type == "application/problem+json"
    resp = await api.client.post("/api/auth/refresh", headers=bearer(old))
    assert resp.status == 401  # no chaining from a replaced token
    me = await api.client.get("/api/auth/me", headers=bearer(new))
    assert me.status == 200 and (await me.json())["username"] == "alice"


async def test_logout_all_closes_every_socket_of_the_user(
    api: Api, settings: Settings, js: JetStreamContext
) -> None:
    """`logout?all=1` writes the user's mark: the gateway closes every socket of the user
    (4401), refuses their tokens at the upgrade, and a login afterwards works everywhere;
    other users are untouched."""
    first = (await api.login("alice"))["token"]
    second = (await api.login("alice"))["token"]
    bob = (await api.login("bob"))["token"]
    async with Gateway(settings, host="127.0.0.1", port=0) as gw:
        a = await GatewayClient.connect(gw.url, token=second)
        b = await GatewayClient.connect(gw.url, token=bob)
        try:
            resp = await api.client.post(
                "/api/auth/logout", params={"all": "1"}, headers=bearer(first)
            )
            assert resp.status == 204
            assert await a.wait_closed() == 4401
            with pytest.raises(InvalidStatus) as e:
                await GatewayClient.connect(gw.url, token=second)
            assert e.value.response.status_code == 401
            await b.ping()  # bob's socket is not concerned
            uid = api.users["alice"].id
            mark = await (await js.key_value("auth_revoked")).get(USER_MARK + uid)
            assert mark.value is not None and int(mark.value) > 0
            # A login right after (same second) carries iat >= T: not revoked.
            fresh = (await api.login("alice"))["token"]
            assert api.app[VERIFIER].verify(fresh).iat >= int(mark.value)
            c = await GatewayClient.connect(gw.url, token=fresh)
            await c.ping()
            await c.close()
            resp = await api.client.get("/api/auth/me", headers=bearer(fresh))
            assert resp.status == 200
        finally:
            await a.close()
            await b.close()


async def test_logout_all_flag_must_be_0_or_1(api: Api) -> None:
    """A malformed `all` is 400 problem JSON and revokes nothing."""
    token = (await api.login("alice"))["token"]
    for params in ({"all": "yes"}, {"all": "2"}, [("all", "1"), ("all", "1")]):
        resp = await api.client.post("/api/auth/logout", params=params, headers=bearer(token))
        assert resp.status == 400, params
        assert resp.content_type == "application/problem+json"
    resp = await api.client.get("/api/auth/me", headers=bearer(token))
    assert resp.status == 200


async def test_logout_all_is_in_the_openapi_document(api: Api) -> None:
    """The route table documents the `all` query flag."""
    doc = await (await api.client.get("/api/openapi.json")).json()
    params = doc["paths"]["/api/auth/logout"]["post"]["parameters"]
    assert {"name": "all", "in": "query"}.items() <= params[0].items()
    assert params[0]["schema"]["enum"] == ["0", "1"]


async def test_token_revoked_applies_the_users_mark(api: Api) -> None:
    """`Store.token_revoked` (the API's check) refuses a token issued before `revoke_all`, and not
    one issued after it, nor another user's."""
    store = api.app[STORE]
    verify = api.app[VERIFIER].verify
    before = verify(api.token("alice"))
    bob = verify(api.token("bob"))
    def revoked(c: Claims) -> Awaitable[bool]:
        return store.token_revoked(c.jti, c.sub, c.iat)

    assert not await revoked(before)
    await store.revoke_all(api.users["alice"].id)
    assert await revoked(before)
    assert not await revoked(bob)
    after = verify((await api.login("alice"))["token"])
    assert not await revoked(after)


async def test_api_refuses_tokens_issued_before_logout_all(api: Api) -> None:
    """Every request with a token older than the user's mark is 401."""
    older = (await api.login("alice"))["token"]
    current = (await api.login("alice"))["token"]
    resp = await api.client.post("/api/auth/logout", params={"all": "1"}, headers=bearer(current))
    assert resp.status == 204
    resp = await api.client.get("/api/auth/me", headers=bearer(older))
    assert resp.status == 401


@pytest.mark.parametrize("change", [{"password": "a-new-password-1"}, {"disabled": True}])
async def test_password_change_or_disable_revokes_the_users_tokens(
    api: Api, change: dict[str, object]
) -> None:
    """A password change or a disable logs the user out everywhere; a display-name change
    does not."""
    token = (await api.login("alice"))["token"]
    uid = api.users["alice"].id
    resp = await api.client.put(
        f"/api/users/{uid}", json={"display_name": "A"}, headers=api.auth("admin")
    )
    assert resp.status == 200, await resp.text()
    assert (await api.client.get("/api/auth/me", headers=bearer(token))).status == 200
    resp = await api.client.put(f"/api/users/{uid}", json=change, headers=api.auth("admin"))
    assert resp.status == 200, await resp.text()
    assert await api.app[STORE].revoked_before(uid) > 0
    resp = await api.client.get("/api/auth/me", headers=bearer(token))
    assert resp.status in (401, 403)


async def test_revoked_bucket_ttl_follows_token_ttl(
    settings: Settings, js: JetStreamContext
) -> None:
    """Provisioning updates an existing auth_revoked bucket's TTL to TOKEN_TTL + 60 (it was
    frozen at creation), and keeps what it holds."""
    kv = await js.key_value("auth_revoked")
    await kv.put("some-jti", b"1")
    assert (await js.stream_info("KV_auth_revoked")).config.max_age == settings.token_ttl + 60
    longer = msgspec.structs.replace(settings, token_ttl=settings.token_ttl * 24)
    await natsio.provision(js, longer)
    assert (await js.stream_info("KV_auth_revoked")).config.max_age == longer.token_ttl + 60
    assert (await kv.get("some-jti")).value == b"1"
    await natsio.provision(js, settings)  # and back: it follows the setting
    assert (await js.stream_info("KV_auth_revoked")).config.max_age == settings.token_ttl + 60


# Headers that are base64url but not JSON (or not text): the verifier's parser fails on them.
MALFORMED_TOKENS = ["bm90IGpzb24.e30.AAAA", "eyJhbGciOiAx.e30.AAAA", "__4A.e30.AAAA", "x.y.z"]
LIBRARY_WORDS = ("jwt", "decode", "error", "exception", "binascii", "unicode", "json")


def names_no_library(text: str) -> bool:
    return not any(word in text.lower() for word in LIBRARY_WORDS)


@pytest.mark.parametrize("token", MALFORMED_TOKENS)
async def test_a_malformed_token_is_refused_without_naming_a_library(
    api: Api, settings: Settings, token: str
) -> None:
    """Neither the API's problem JSON, the gateway's upgrade refusal nor its `refresh`
    error names the parser's exception: the walkthrough saw "token rejected: DecodeError"."""
    resp = await api.client.get("/api/auth/me", headers=bearer(token))
    assert resp.status == 401
    problem = await resp.json()
    assert problem["detail"] == "token malformed" and names_no_library(str(problem))
    async with Gateway(settings, host="127.0.0.1", port=0) as gw:
        with pytest.raises(InvalidStatus) as refused:
            await GatewayClient.connect(gw.url, token=token)
        body = refused.value.response.body or b""
        assert refused.value.response.status_code == 401 and names_no_library(body.decode())
        async with await GatewayClient.connect(gw.url, token=api.token("alice")) as c:
            with pytest.raises(RequestError) as answered:
                await c.refresh(token)
    assert answered.value.code == "unauthorized"
    assert answered.value.reason == "token malformed"
