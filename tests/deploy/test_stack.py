"""The whole stack as an operator runs it: `make start` from the repo, traffic through nginx
only, `make stop`, and nothing of the stack left behind.

Each test runs its own stack on free ports (BASE_PORT) with VAR_DIR in a temp dir, so a
developer's `make run` may stay up meanwhile.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from websockets.asyncio.client import ClientConnection, connect

from tests.deploy.stackrun import Stack, article_reaches, login
from tests.waits import split


async def frames(ws: ClientConnection) -> AsyncIterator[dict[str, Any]]:
    """Every envelope, split from batched frames (newline-delimited JSON)."""
    async for frame in ws:
        assert isinstance(frame, str)
        for env in split(frame):
            yield env


async def test_make_start_serves_everything_through_nginx_and_make_stop_leaves_nothing(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    """alice's kv_sub over /ws (cookie + Origin) sees the article bob creates over /api/;
    `make stop` then leaves no process and no port of the stack behind."""
    print(f"make start took {stack.start_seconds:.1f} s")  # reported, not asserted
    async with http.get("/") as resp:  # the SPA (or its placeholder) with the headers
        assert resp.status == 200
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        assert resp.headers["X-Frame-Options"] == "DENY"
        assert "unsafe-inline" not in resp.headers["Content-Security-Policy"]

    _, cookie = await login(http, "alice")
    bob_token, _ = await login(http, "bob")
    async with connect(
        stack.ws_url,
        additional_headers={"Cookie": f"session={cookie}", "Origin": stack.origin},
        proxy=None,
        open_timeout=10,
    ) as ws:
        envelopes = frames(ws)
        async with asyncio.timeout(10):
            first = await anext(envelopes)
            assert first["op"] == "cap_update"
            await ws.send(json.dumps({"op": "kv_sub", "target": "articles", "inbox": "a1"}))
            seen_ok = seen_synced = False
            while not (seen_ok and seen_synced):
                env = await anext(envelopes)
                if env["op"] == "ok" and env.get("inbox") == "a1":
                    seen_ok = True
                elif env["op"] == "kv_msg" and env["data"].get("op") == "synced":
                    seen_synced = True
                else:
                    assert env["op"] in ("kv_msg", "ping"), env

            async with http.post(
                "/api/articles",
                json={"title": "through nginx", "body": "deployed"},
                headers={"Authorization": f"Bearer {bob_token}"},
            ) as resp:
                assert resp.status == 201, await resp.text()
                article_id = resp.headers["Location"].rstrip("/").rsplit("/", 1)[-1]

            while True:
                env = await anext(envelopes)
                data = env.get("data") or {}
                if env["op"] == "kv_msg" and data.get("op") == "put":
                    value = data.get("value") or {}
                    if article_id in (data.get("key"), value.get("id")):
                        assert value["title"] == "through nginx"
                        assert value["author"]
                        break

    stack.stop()
    assert stack.leftovers() == []
    assert stack.busy_ports() == []


async def test_a_socket_without_an_allowed_origin_is_refused_through_nginx(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    """Cookie auth from a foreign Origin is refused (cross-site WebSocket hijacking)."""
    _, cookie = await login(http, "alice")
    with pytest.raises(Exception) as info:
        async with connect(
            stack.ws_url,
            additional_headers={"Cookie": f"session={cookie}", "Origin": "http://evil.test"},
            proxy=None,
            open_timeout=10,
        ):
            pass
    assert "403" in str(info.value) or "401" in str(info.value)


async def test_long_polling_through_nginx_reaches_the_same_session(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    """A polling client (cookie + Origin) gets its frames through nginx, which routes every
    request of a session to the gateway holding it; bob's article reaches it."""
    from shared.client import GatewayClient

    _, cookie = await login(http, "alice")
    bob_token, _ = await login(http, "bob")
    client = await GatewayClient.connect(
        f"{stack.url}/poll", headers={"Cookie": f"session={cookie}", "Origin": stack.origin}
    )
    try:
        env = await article_reaches(await client.kv_sub("articles"), http, bob_token, "polled")
        assert env["data"]["value"]["title"] == "polled"
    finally:
        await client.close()
