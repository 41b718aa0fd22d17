"""An app with its own IdP and its own resources file, end to end through nginx: `make
start` provisions the file, and the IdP's token (no login, no password here) opens a
socket, subscribes, and sees a write made over HTTP with the same kind of token."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
from websockets.asyncio.client import connect

from tests.deploy.stackrun import Stack
from tests.deploy.test_stack import frames
from tests.idp import Idp, resources_file

APP_RESOURCES = """
[buckets.notes]
history = 3

[roles.notetaker]
buckets = { notes = ["user.{uid}.>"], todos = ["user.{uid}.>"] }
commands = ["todos.put"]
"""


async def test_idp_token_through_nginx_with_the_apps_resources(tmp_path: Path) -> None:
    idp = Idp()
    idp.add_key("k1", "ES256")
    async with idp.running():
        path = resources_file(tmp_path / "app.toml", idp, default_role="notetaker")
        path.write_text(
            path.read_text().replace("\n[issuers.testidp]", APP_RESOURCES + "\n[issuers.testidp]")
        )
        stack = Stack(tmp_path / "var", RESOURCES_FILE=str(path))
        await asyncio.to_thread(stack.start)
        try:
            token = idp.sign("kim", "k1")
            auth = {"Authorization": f"Bearer {token}"}
            async with connect(
                stack.ws_url, additional_headers=auth, proxy=None, open_timeout=10
            ) as ws:
                envelopes = frames(ws)
                async with asyncio.timeout(15):
                    first = await anext(envelopes)
                    assert first["op"] == "cap_update"
                    assert first["data"]["capabilities"]["buckets"]["notes"] == ["user.idp-kim.>"]
                    sub = {
                        "op": "kv_sub",
                        "target": "todos",
                        "inbox": "t",
                        "data": {"pattern": "user.idp-kim.>"},
                    }
                    await ws.send(json.dumps(sub))
                    while (env := await anext(envelopes))["op"] != "kv_msg":
                        assert env["op"] == "ok", env
                    assert env["data"]["op"] == "synced"
                    # The bucket the app's file declares exists: subscribing to it succeeds.
                    await ws.send(json.dumps({**sub, "target": "notes", "inbox": "n"}))
                    async with aiohttp.ClientSession(base_url=stack.url) as http:
                        async with http.post(
                            "/api/commands/todos.put",
                            json={"id": "a1", "title": "through nginx"},
                            headers=auth,
                        ) as resp:
                            assert resp.status == 200, await resp.text()
                    seen: dict[str, object] = {}
                    while not seen:
                        env = await anext(envelopes)
                        if env["op"] == "error":
                            raise AssertionError(env)
                        if env["op"] == "kv_msg" and env["target"] == "todos":
                            seen = env["data"] if env["data"]["op"] == "put" else {}
                    assert seen["key"] == "user.idp-kim.a1"
            # One fetch per process that saw the IdP's tokens (a gateway, an API worker),
            # never one per token.
            assert 1 <= idp.fetches <= stack.settings.gateway_procs + stack.settings.api_procs
        finally:
            await asyncio.to_thread(stack.stop)
