"""Two hosts sharing one NATS (issue 24): host B runs no NATS of its own (NATS_CLUSTER=0,
NATS_URL = host A's) and shares A's JWT keys and NATS role passwords; everything else —
nginx, gateways, API workers, ports, VAR_DIR — is per host (deploy/README.md, "N hosts").

A subscriber on B gets what is written through A's API, and a logout on A closes B's socket.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from shared.client import GatewayClient
from shared.natsio import PASSWORD_ENV
from tests.deploy.stackrun import Stack, article_reaches, login, started

LIGHT = {"GATEWAY_PROCS": "1", "API_PROCS": "1"}


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[tuple[Stack, Stack]]:
    with started(tmp_path / "a", **LIGHT) as a:
        var = a.layout.var
        stored = json.loads((var / "nats" / "credentials.json").read_text())
        shared = {
            "NATS_URL": ",".join(a.settings.nats_url),
            "JWT_PRIVATE_KEY_FILE": str(var / "keys" / "jwt_ed25519.pem"),
            "JWT_PUBLIC_KEY_FILE": str(var / "keys" / "jwt_ed25519.pub.pem"),
            **{env: stored[role] for role, env in PASSWORD_ENV.items()},
        }
        with started(tmp_path / "b", nats_cluster=0, **LIGHT, **shared) as b:
            assert not (b.layout.var / "nats" / "n0.conf").exists()  # no NATS of its own
            yield a, b


async def test_a_subscriber_on_one_host_gets_what_the_other_host_publishes(
    hosts: tuple[Stack, Stack],
) -> None:
    a, b = hosts
    async with (
        aiohttp.ClientSession(base_url=a.url) as on_a,
        aiohttp.ClientSession(base_url=b.url) as on_b,
    ):
        alice, _ = await login(on_b, "alice")  # B's API, A's keys: valid on both hosts
        bob, _ = await login(on_a, "bob")
        client = await GatewayClient.connect(b.ws_url, token=alice)
        try:
            env = await article_reaches(await client.kv_sub("articles"), on_a, bob, "from A")
            assert env["data"]["value"]["title"] == "from A"

            # alice logs out through A: the revocation reaches B's gateway, which closes
            # her socket there.
            async with on_a.post(
                "/api/auth/logout", headers={"Authorization": f"Bearer {alice}"}
            ) as resp:
                assert resp.status in (200, 204), await resp.text()
            assert await client.wait_closed() == 4401
        finally:
            await client.close()
