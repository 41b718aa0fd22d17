"""The gateway's side of the token lifecycle (review findings 7 and 18): the user's
"every token issued before T" mark, the grace of a token replaced by refresh, and long-poll
requests checked for revocation like a handshake."""

from __future__ import annotations

import time

import aiohttp
import msgspec
import pytest
from nats.aio.client import Client as NATS
from websockets.exceptions import InvalidStatus

from shared.auth import TokenIssuer
from shared.client import GatewayClient
from shared.settings import Settings
from shared.users import REVOKED_BUCKET
from tests.gateway.conftest import ClientFactory, UserFactory
from tests.waits import until
from ws_gateway.server import Gateway

SID_A = "tokens-session-a-0123456789"
SID_B = "tokens-session-b-0123456789"


async def _put(nc: NATS, key: str, value: bytes) -> None:
    await (await nc.jetstream().key_value(REVOKED_BUCKET)).put(key, value)


async def test_user_mark_closes_the_users_older_sessions(
    make_user: UserFactory,
    connect: ClientFactory,
    issuer: TokenIssuer,
    nc: NATS,
    gateway: Gateway,
) -> None:
    """`user.<uid>` = T closes every session of that user whose token has iat < T (4401);
    a token issued at T or later, and other users, are untouched; the old token is refused."""
    old = await make_user()
    bob = await connect(await make_user("bob"))
    a1, a2 = await connect(old), await connect(old)
    iat = issuer.issue("alice")[1].iat
    newer, _ = issuer.issue("alice", now=iat + 1)
    kept = await connect(newer)
    await _put(nc, "user.alice", str(iat + 1).encode())
    assert await a1.wait_closed() == 4401
    assert await a2.wait_closed() == 4401
    await kept.ping()
    await bob.ping()
    with pytest.raises(InvalidStatus) as e:
        await GatewayClient.connect(gateway.url, token=old)
    assert e.value.response.status_code == 401


async def test_user_mark_listed_at_start(
    make_user: UserFactory, issuer: TokenIssuer, nc: NATS, settings: Settings
) -> None:
    """A gateway started after the mark was written refuses the older tokens too."""
    old = await make_user()
    iat = issuer.issue("alice")[1].iat
    await _put(nc, "user.alice", str(iat + 1).encode())
    newer, _ = issuer.issue("alice", now=iat + 1)
    async with Gateway(settings, host="127.0.0.1", port=0) as gw:
        with pytest.raises(InvalidStatus) as e:
            await GatewayClient.connect(gw.url, token=old)
        assert e.value.response.status_code == 401
        c = await GatewayClient.connect(gw.url, token=newer)
        await c.ping()
        await c.close()


async def test_replaced_token_keeps_its_sockets_for_the_grace(
    make_user: UserFactory, issuer: TokenIssuer, nc: NATS, gateway: Gateway
) -> None:
    """A token revoked by refresh (`<exp> <grace_until>`) is refused at the upgrade at once;
    its open sockets may send `refresh` until the grace ends; one that did not is then
    closed 4401, one that did stays."""
    token = await make_user()
    lazy = await GatewayClient.connect(gateway.url, token=token)
    prompt = await GatewayClient.connect(gateway.url, token=token)
    polled = await GatewayClient.connect(gateway.poll_url, token=token)
    try:
        claims = gateway.hub.verifier.verify(token)  # type: ignore[union-attr]
        await _put(nc, claims.jti, f"{claims.exp} {int(time.time()) + 5}".encode())
        hub = gateway.hub
        assert hub is not None
        await until(lambda: claims.jti in hub._revoked, "the revocation to reach the gateway")
        with pytest.raises(InvalidStatus) as e:
            await GatewayClient.connect(gateway.url, token=token)
        assert e.value.response.status_code == 401
        await lazy.ping()  # within the grace: still open
        await polled.ping()  # a long-poll session too (its requests carry the old token)
        fresh, _ = issuer.issue("alice")
        await prompt.refresh(fresh)
        assert await lazy.wait_closed() == 4401
        assert await polled.wait_closed() == 4401
        await prompt.ping()
    finally:
        await lazy.close()
        await prompt.close()
        await polled.close()


async def test_poll_requests_check_revocation(
    make_user: UserFactory, issuer: TokenIssuer, nc: NATS, gateway: Gateway
) -> None:
    """A revoked token cannot send to, read or close another session of its user (401), and
    a caller without a token learns nothing about which sids exist (401, not 404)."""
    good = await make_user()
    spare, _ = issuer.issue("alice")
    url = gateway.poll_url
    async with aiohttp.ClientSession() as http:
        for sid, token in ((SID_A, good), (SID_B, spare)):
            async with http.post(
                f"{url}/open", params={"sid": sid}, headers={"Authorization": f"Bearer {token}"}
            ) as r:
                assert r.status == 200
        claims = gateway.hub.verifier.verify(spare)  # type: ignore[union-attr]
        await _put(nc, claims.jti, str(claims.exp).encode())
        hub = gateway.hub
        assert hub is not None
        await until(lambda: not hub.by_jti.get(claims.jti), "the revoked session to close")
        revoked = {"Authorization": f"Bearer {spare}"}
        params = {"sid": SID_A, "after": "0", "wait": "0"}
        async with http.get(url, params=params, headers=revoked) as r:
            assert r.status == 401
            assert (await r.json(content_type=None))["code"] == "unauthorized"
        async with http.post(f"{url}/send", params=params, data=b"", headers=revoked) as r:
            assert r.status == 401
        async with http.post(f"{url}/close", params=params, headers=revoked) as r:
            assert r.status == 401
        # Its own closed session: how it ended (4401), none of its frames.
        async with http.get(url, params={**params, "sid": SID_B}, headers=revoked) as r:
            assert r.status == 410
            assert (await r.json(content_type=None))["close_code"] == 4401
        async with http.get(url, params=params) as r:  # no token at all, a live sid
            assert r.status == 401
        good_headers = {"Authorization": f"Bearer {good}"}
        async with http.get(url, params=params, headers=good_headers) as r:
            assert r.status == 200  # the session itself was never touched
            assert b'"cap_update"' in await r.read()
        # The user's mark: every older token is refused on poll requests too.
        await _put(nc, "user.alice", str(int(time.time()) + 1).encode())
        await until(lambda: not hub.by_user.get("alice"), "alice's sessions to close")
        async with http.post(f"{url}/send", params=params, data=b"", headers=good_headers) as r:
            assert r.status == 410


async def test_secure_cookie_name_is_read_by_both_transports(
    make_user: UserFactory, settings: Settings
) -> None:
    """With COOKIE_SECURE the API sets `__Host-session` (shared.auth.session_cookie_name):
    the upgrade and /poll/open read that cookie, with an allowed Origin."""
    secure = msgspec.structs.replace(settings, cookie_secure=True)
    token = await make_user()
    origin = secure.allowed_origins[0]
    headers = {"Cookie": f"__Host-session={token}", "Origin": origin}
    async with Gateway(secure, host="127.0.0.1", port=0) as gw:
        c = await GatewayClient.connect(gw.url, headers=headers)
        await c.ping()
        await c.close()
        async with aiohttp.ClientSession() as http:
            async with http.post(
                f"{gw.poll_url}/open", params={"sid": SID_A}, headers=headers
            ) as r:
                assert r.status == 200
