"""MAX_CONNECTIONS (issue 24): a gateway at its share answers 503 problem JSON with
Retry-After at the upgrade and at /poll/open, never a cut socket; a closed session frees
its slot."""

from __future__ import annotations

import json

import aiohttp
import msgspec
import pytest
from websockets.exceptions import InvalidStatus

from shared.client import GatewayClient
from shared.settings import Settings
from tests.gateway.conftest import UserFactory
from tests.waits import until
from ws_gateway.handshake import FULL_RETRY_AFTER
from ws_gateway.server import Gateway

SID = "capacity-session-0123456789"


async def test_connection_past_the_cap_gets_503_with_retry_after(
    settings: Settings, make_user: UserFactory
) -> None:
    # Two gateways' worth of 4: this process's share is 2.
    small = msgspec.structs.replace(settings, max_connections=4, gateway_procs=2)
    token = await make_user()
    auth = {"Authorization": f"Bearer {token}"}
    async with (
        Gateway(small, host="127.0.0.1", port=0) as gw,
        aiohttp.ClientSession() as http,
    ):
        hub = gw.hub
        assert hub is not None
        first = await GatewayClient.connect(gw.url, token=token)
        # A long-poll session takes a slot as a WebSocket does.
        async with http.post(f"{gw.poll_url}/open", params={"sid": SID}, headers=auth) as r:
            assert r.status == 200
        assert len(hub.sessions) == 2

        with pytest.raises(InvalidStatus) as refused:
            await GatewayClient.connect(gw.url, token=token)
        response = refused.value.response
        assert response.status_code == 503
        assert response.headers["Retry-After"] == str(FULL_RETRY_AFTER)
        assert response.headers["Content-Type"] == "application/problem+json"
        problem = json.loads(response.body)
        assert problem["status"] == 503 and problem["code"] == "unavailable"

        other = {"sid": SID.replace("capacity", "capacity2")}
        async with http.post(f"{gw.poll_url}/open", params=other, headers=auth) as r:
            assert r.status == 503
            assert r.headers["Retry-After"] == str(FULL_RETRY_AFTER)
            assert (await r.json(content_type=None))["code"] == "unavailable"
        assert len(hub.sessions) == 2  # the refusals admitted nothing

        await first.close()
        await until(lambda: len(hub.sessions) == 1, "the closed session to free its slot")
        again = await GatewayClient.connect(gw.url, token=token)
        try:
            await again.ping()  # raises unless the session serves requests
            assert len(hub.sessions) == 2
        finally:
            await again.close()
