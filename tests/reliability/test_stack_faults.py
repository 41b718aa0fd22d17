"""Reliability 3, 4 (and 9 through nginx): the whole stack from `make start`, with real
process kills. Full run only (`make reliability`): each starts a stack of its own."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import nats
import pytest

from deploy import stack as ops
from shared import natsio
from shared.settings import Settings
from tests.deploy.stackrun import Stack, chat_send, chat_send_acked, login, nats_node_down
from tests.deploy.test_restart import ResumingReader
from tests.reliability.conftest import Figures, Secrets
from tests.reliability.helpers import ms, summary, until

pytestmark = pytest.mark.full_only


def _logs(stack: Stack) -> list[Path]:
    return sorted((stack.layout.var / "log").glob("*"))


async def test_gateway_kill_9_under_load_through_nginx(
    tmp_path: Path, figures: Figures, secrets_seen: Secrets
) -> None:
    """kill -9 one of two gateways while clients read a stream through nginx: they reconnect
    (to the other gateway, or the restarted one) and resume with no gap and no duplicate.
    Then 100 concurrent PUTs with one If-Match through nginx and two API workers."""
    stack = Stack(tmp_path / "var")
    stack.start()
    try:
        async with aiohttp.ClientSession(base_url=stack.url) as http:
            alice, _ = await login(http, "alice")
            bob, _ = await login(http, "bob")
            secrets_seen.add(alice, bob)
            keys = (f"k{i}" for i in itertools.count())
            first = await chat_send(http, bob, "restart", "first", next(keys))
            assert first is not None
            published = [first]
            readers = [ResumingReader(stack.ws_url, alice, first) for _ in range(40)]
            tasks = [asyncio.create_task(r.run()) for r in readers]
            try:
                async with asyncio.timeout(30):
                    for r in readers:
                        await r.subscribed.wait()

                async def publish(n: int) -> None:
                    for _ in range(n):
                        key = next(keys)
                        published.append(await chat_send_acked(http, bob, "restart", key, key, 30))
                        await asyncio.sleep(0.01)  # pacing

                await publish(20)
                victim = next(
                    p
                    for p in ops._process_info(stack.layout)
                    if p["name"] == f"ws_gateway_{stack.settings.gateway_port}"
                )
                before = {id(r): r.connections for r in readers}
                t_kill = time.monotonic()
                os.kill(victim["pid"], signal.SIGKILL)
                reconnect: list[float] = []
                affected: set[int] = set()
                watching = asyncio.Event()

                async def watch() -> None:
                    while not watching.is_set():
                        for r in readers:
                            if r.connections > before[id(r)] and id(r) not in affected:
                                affected.add(id(r))
                                reconnect.append(time.monotonic() - t_kill)
                        await asyncio.sleep(0.01)  # sampling the readers, bounded below

                watcher = asyncio.create_task(watch())
                await publish(60)
                try:
                    await until(
                        lambda: all(set(r.seqs) >= set(published) for r in readers),
                        "every reader to have every message",
                        60,
                    )
                except AssertionError:
                    pass  # counted as gaps below
                watching.set()
                await watcher
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            gaps = sum(len(set(published) - set(r.seqs)) for r in readers)
            dups = sum(len(r.seqs) - len(set(r.seqs)) for r in readers)
            extra = sum(len(set(r.seqs) - set(published)) for r in readers)

            # Lost updates through nginx, two API workers.
            h = {"Authorization": f"Bearer {alice}"}
            async with http.post("/api/articles", json={"title": "t", "body": "b"}, headers=h) as r:
                art = await r.json()

            async def put(i: int) -> int:
                async with http.put(
                    f"/api/articles/{art['id']}",
                    json={"title": f"w{i}", "body": ""},
                    headers={**h, "If-Match": f'"{art["revision"]}"'},
                ) as resp:
                    return resp.status

            statuses = await asyncio.gather(*(put(i) for i in range(100)))
        figures.add(
            "R3",
            "test_gateway_kill_9_under_load_through_nginx",
            f"{len(readers)} clients through nginx reading stream chat (js_sub, resume from last "
            "seq + 1 on reconnect) while chat.send is posted through the API; kill -9 of "
            "the first of 2 gateways (supervisord restarts it)",
            f"{len(affected)} clients were on the killed gateway; kill -> resubscribed "
            f"{summary(reconnect)} (the test's reader notices a close within 0.5 s); "
            f"{len(published)} messages: JetStream gaps {gaps}, duplicates {dups}, unexpected "
            f"{extra}",
            missing=[sorted(set(published) - set(r.seqs))[:10] for r in readers],
            connections=[r.connections for r in readers],
            published=published,
        )
        figures.add(
            "R9",
            "test_gateway_kill_9_under_load_through_nginx (lost updates)",
            "100 concurrent PUT /api/articles/{id} with one If-Match through nginx, 2 API workers",
            f"{statuses.count(200)} x 200, {statuses.count(412)} x 412, "
            f"{100 - statuses.count(200) - statuses.count(412)} other",
        )
        assert affected, "the kill disconnected nobody"
        assert gaps == 0 and dups == 0 and extra == 0
        assert statuses.count(200) == 1 and statuses.count(412) == 99
    finally:
        _keep_logs(stack, tmp_path, secrets_seen)
        stack.stop()


def _keep_logs(stack: Stack, tmp_path: Path, secrets_seen: Secrets) -> None:
    """The stack's logs stay under tmp_path for the log audit (the stack dir is ours)."""
    for p in _logs(stack):
        if p not in secrets_seen.extra_logs:
            secrets_seen.extra_logs.append(p)


async def _nats(s: Settings, **options: Any) -> nats.NATS:
    """A client of the stack's NATS as the admin CLI's user (NATS asks for credentials)."""
    user, password = natsio.credentials(s, "provision") or (None, None)
    return await natsio.nats_connect(
        servers=list(s.nats_url), user=user, password=password, **options
    )


async def _leader(s: Settings, stream: str) -> str:
    nc = await _nats(s, connect_timeout=2)
    try:
        info = await nc.jetstream(timeout=5).stream_info(stream)
        assert info.cluster is not None and info.cluster.leader
        return str(info.cluster.leader)
    finally:
        await nc.close()


async def test_cluster_leader_kills_lose_no_acknowledged_write(
    tmp_path: Path, figures: Figures, secrets_seen: Secrets
) -> None:
    """3 nodes, R3: kill the leader of the articles bucket (then of the chat stream) again
    and again while writing through the API: acknowledged writes lost 0, duplicates counted."""
    stack = Stack(tmp_path / "var", nats_cluster=3)
    stack.start()
    kills = 4
    s, layout = stack.settings, stack.layout
    acked_articles: dict[str, str] = {}
    acked_chat: dict[int, str] = {}
    attempts = 0
    outages: list[float] = []
    try:
        async with aiohttp.ClientSession(base_url=stack.url) as http:
            bob, _ = await login(http, "bob")
            secrets_seen.add(bob)
            h = {"Authorization": f"Bearer {bob}"}
            counter = itertools.count()

            async def write(n: int) -> float:
                """n article creates and n chat messages acknowledged; the longest wait."""
                nonlocal attempts
                worst = 0.0
                for _ in range(n):
                    i = next(counter)
                    t0 = time.monotonic()
                    while True:
                        attempts += 1
                        try:
                            async with http.post(
                                "/api/articles",
                                json={"title": f"a{i}", "body": "x"},
                                headers=h,
                                timeout=aiohttp.ClientTimeout(total=5),
                            ) as resp:
                                if resp.status == 201:
                                    aid = resp.headers["Location"].rsplit("/", 1)[-1]
                                    acked_articles[aid] = f"a{i}"
                                    break
                        except (aiohttp.ClientError, TimeoutError):
                            pass
                        assert time.monotonic() - t0 < 60, "no article write for 60 s"
                        await asyncio.sleep(0.1)
                    left = 60 - (time.monotonic() - t0)  # no write for 60 s fails the test
                    seq = await chat_send_acked(http, bob, "cluster", f"m{i}", f"m{i}", left)
                    acked_chat[seq] = f"m{i}"
                    worst = max(worst, time.monotonic() - t0)
                return worst

            await write(10)
            for k in range(kills):
                stream = "KV_articles" if k % 2 == 0 else "chat"
                leader = await _leader(s, stream)
                async with nats_node_down(s, layout, int(leader[1:]), rejoin_timeout=60):
                    outages.append(await write(10))
                await write(5)
            # Every acknowledged write is there.
            lost_articles = []
            for aid in acked_articles:
                async with http.get(f"/api/articles/{aid}", headers=h) as resp:
                    if resp.status != 200:
                        lost_articles.append(aid)
            async with http.get("/api/articles", headers=h) as resp:
                titles = [a["title"] for a in (await resp.json())["items"]]
        nc = await _nats(s)
        try:
            js = nc.jetstream(timeout=5)
            lost_chat = []
            for seq in acked_chat:
                try:
                    await js.get_msg("chat", seq)
                except Exception:
                    lost_chat.append(seq)
            info = await js.stream_info("chat")
            texts: list[str] = []
            for seq in range(info.state.first_seq, info.state.last_seq + 1):
                try:
                    m = await js.get_msg("chat", seq)
                except Exception:
                    continue
                texts.append(_text(m.data))
        finally:
            await nc.close()
        dup_articles = len(titles) - len(set(titles))
        dup_chat = len(texts) - len(set(texts))
        figures.add(
            "R4",
            "test_cluster_leader_kills_lose_no_acknowledged_write",
            f"3 NATS nodes, R3, sync_interval: always (deploy/README.md); {kills} kill -9 of the "
            "leader of KV_articles / chat while article creates and chat.send go through the "
            "API (each retried until acknowledged; chat with an Idempotency-Key)",
            f"{len(acked_articles)} articles + {len(acked_chat)} chat messages acknowledged "
            f"({attempts} article attempts): lost {len(lost_articles)} + {len(lost_chat)}; "
            f"duplicates stored: articles {dup_articles} (creates carry no idempotency key), "
            f"chat {dup_chat}; longest wait for an acknowledged write per kill: "
            + ", ".join(ms(o) for o in outages),
        )
        assert lost_articles == [] and lost_chat == []
    finally:
        _keep_logs(stack, tmp_path, secrets_seen)
        stack.stop()


def _text(data: bytes) -> str:
    import msgspec

    body: Any = msgspec.json.decode(data)
    return str(body.get("text")) if isinstance(body, dict) else repr(body)
