"""The stack on the 3-node NATS cluster (`make start NATS_CLUSTER=3`): kill the node that
leads the articles bucket while articles are written and chat messages published through
nginx. API and gateways keep serving, no acknowledged write is lost, the node rejoins."""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path

import aiohttp

from deploy import stack as ops
from shared import natsio
from shared.client import GatewayClient
from tests.deploy.stackrun import Stack, chat_send_acked, login, nats_node_down


async def test_killing_a_nats_node_loses_no_acknowledged_write(tmp_path: Path) -> None:
    stack = Stack(tmp_path / "var", nats_cluster=3)
    stack.start()
    try:
        s, layout = stack.settings, stack.layout
        assert s.nats_replicas == 3 and len(s.nats_url) == 3
        user, password = natsio.credentials(s, "provision") or (None, None)
        nc = await natsio.nats_connect(servers=list(s.nats_url), user=user, password=password)
        try:
            info = await nc.jetstream().stream_info("KV_articles")
            assert info.config.num_replicas == 3
            assert info.cluster is not None and info.cluster.leader
            leader = info.cluster.leader  # server_name n<i> → program nats:nats_<i>
        finally:
            await nc.close()

        async with aiohttp.ClientSession(base_url=stack.url) as http:
            alice, _ = await login(http, "alice")
            bob, _ = await login(http, "bob")
            watcher = await GatewayClient.connect(stack.ws_url, token=alice, open_timeout=10)
            articles = await watcher.kv_sub("articles")
            seen: set[str] = set()
            seen_more = asyncio.Event()
            acked_articles: list[str] = []
            acked_chat: list[int] = []
            keys = (f"k{i}" for i in itertools.count())

            async def write(n: int) -> None:
                """n articles and n chat messages acknowledged (failures retried)."""
                deadline = time.monotonic() + 45
                done = 0
                while done < n:
                    assert time.monotonic() < deadline, "the API stopped taking writes"
                    try:
                        async with http.post(
                            "/api/articles",
                            json={"title": f"a{len(acked_articles)}", "body": "x"},
                            headers={"Authorization": f"Bearer {bob}"},
                            timeout=aiohttp.ClientTimeout(total=5),
                        ) as resp:
                            if resp.status != 201:
                                await asyncio.sleep(0.1)
                                continue
                            acked_articles.append(resp.headers["Location"].rsplit("/", 1)[-1])
                    except (aiohttp.ClientError, TimeoutError):
                        await asyncio.sleep(0.1)
                        continue
                    key = next(keys)
                    left = deadline - time.monotonic()
                    acked_chat.append(await chat_send_acked(http, bob, "cluster", key, key, left))
                    done += 1

            async def drain_articles() -> None:
                while True:
                    env = await articles.get(timeout=60)
                    if env["op"] == "kv_msg" and env["data"].get("op") == "put":
                        seen.add(env["data"]["key"])
                        seen_more.set()

            drainer = asyncio.create_task(drain_articles())
            try:
                await write(20)
                async with nats_node_down(s, layout, int(leader[1:])):  # writes meanwhile
                    await write(20)
                await write(10)

                # No acknowledged write lost: every article reads back, every seq is stored.
                for article_id in acked_articles:
                    async with http.get(
                        f"/api/articles/{article_id}",
                        headers={"Authorization": f"Bearer {alice}"},
                    ) as resp:
                        assert resp.status == 200, article_id
                nc = await natsio.nats_connect(
                    servers=list(s.nats_url), user=user, password=password
                )
                try:
                    js = nc.jetstream()
                    for seq in acked_chat:
                        assert (await js.get_msg("chat", seq)).seq == seq
                finally:
                    await nc.close()
                # The gateway kept serving the watch across the leader change.
                async with asyncio.timeout(20):
                    while not set(acked_articles) <= seen:
                        seen_more.clear()
                        await seen_more.wait()
            finally:
                drainer.cancel()
                await asyncio.gather(drainer, return_exceptions=True)
                await watcher.close()
        assert ops._http_status(f"{stack.url}/api/readyz") == 200
    finally:
        stack.stop()
    assert stack.leftovers() == []
