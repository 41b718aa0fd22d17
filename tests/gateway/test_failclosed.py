"""Fail closed (review finding 8): a gateway whose `auth_users` or `auth_revoked` watch is
lost serves no session until the watch is back."""

from __future__ import annotations

import logging

import aiohttp
import pytest
from nats.aio.client import Client as NATS
from websockets.exceptions import InvalidStatus

from shared import natsio
from shared.client import GatewayClient
from shared.settings import Settings
from shared.users import REVOKED_BUCKET
from tests.gateway.conftest import UserFactory
from tests.waits import until, until_async
from ws_gateway.server import Gateway

SID = "failclosed-session-0123456789"


async def _ready(http: aiohttp.ClientSession, gw: Gateway) -> int:
    async with http.get(f"http://{gw.host}:{gw.port}/readyz") as r:
        return r.status


@pytest.mark.parametrize("bucket", ["auth_revoked", "auth_users"])
async def test_lost_auth_watch_fails_closed_until_reestablished(
    bucket: str,
    make_user: UserFactory,
    nc: NATS,
    settings: Settings,
    gateway: Gateway,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The watch's stream deleted past the reader's grace: a WARNING, /readyz 503, open
    sessions closed (1001 `unavailable`), upgrades and /poll/open refused 503. Once the
    bucket is back the watch is re-established: ready again, and a revocation written
    after that closes a socket again."""
    monkeypatch.setattr("ws_gateway.reader.STREAM_GRACE", 0.2)
    token = await make_user()
    hub = gateway.hub
    assert hub is not None
    client = await GatewayClient.connect(gateway.url, token=token)
    js = nc.jetstream()
    async with aiohttp.ClientSession() as http:
        assert await _ready(http, gateway) == 200
        with caplog.at_level(logging.WARNING, logger="ws_gateway.hub"):
            await js.delete_stream(f"KV_{bucket}")
            await until_async(
                lambda: _is(http, gateway, 503), "/readyz to report the lost watch", 40
            )
            assert await client.wait_closed() == 1001
            async with http.get(f"http://{gateway.host}:{gateway.port}/readyz") as r:
                body = await r.json()
            assert body["status"] == "unavailable"
            assert body["checks"]["auth_watch"] is False and body["checks"]["nats"] is True
        lost = [r for r in caplog.records if getattr(r, "event", None) == "auth_watch_lost"]
        assert lost and lost[0].levelno == logging.WARNING and lost[0].bucket == bucket  # type: ignore[attr-defined]
        with pytest.raises(InvalidStatus) as e:
            await GatewayClient.connect(gateway.url, token=token)
        assert e.value.response.status_code == 503
        auth = {"Authorization": f"Bearer {token}"}
        async with http.post(f"{gateway.poll_url}/open", params={"sid": SID}, headers=auth) as r:
            assert r.status == 503
            assert (await r.json(content_type=None))["code"] == "unavailable"

        await natsio.provision(js, settings)
        if bucket == "auth_users":
            token = await make_user()  # the records went with the bucket
        await until(lambda: hub.ready, "the watch to be re-established")
        assert await _ready(http, gateway) == 200
    again = await GatewayClient.connect(gateway.url, token=token)
    try:
        await again.ping()
        claims = hub.verifier.verify(token)
        await (await js.key_value(REVOKED_BUCKET)).put(claims.jti, str(claims.exp).encode())
        assert await again.wait_closed() == 4401  # the new watch delivers revocations
    finally:
        await again.close()
        await client.close()


async def _is(http: aiohttp.ClientSession, gw: Gateway, status: int) -> bool:
    return await _ready(http, gw) == status
