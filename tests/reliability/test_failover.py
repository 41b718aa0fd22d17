"""R13 (issue 22): lose a NATS node, not a request. On the 3-node cluster, kill -9 (a) the chat
stream's leader, (b) the node a gateway is connected to, (c) the JetStream meta leader and
(d) the leader of the auth buckets, each under steady writes and authenticated reads
through nginx. Every request is answered 2xx (perhaps late) or 503 past NATS_FAILOVER_WAIT,
never 500; every acknowledged message is stored once; a subscription asked during the
failover is `ok` or `unavailable`; deliveries resume. Figures: per kill, the write latency
p50/p99/max during the failover, the largest delivery gap, the time until every API
worker's /readyz and the deliveries are back.

`make test` runs the kill of the auth buckets' leader (the one that failed every
authenticated request before); `make reliability` all four."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from deploy import stack as ops
from shared import natsio
from shared.client import GatewayClient, RequestError
from tests.deploy.stackrun import Stack, login, nats_node_down
from tests.deploy.test_restart import ResumingReader
from tests.reliability.conftest import FULL, Figures, Secrets
from tests.reliability.helpers import ms, pct

KINDS = ("auth_leader", "chat_leader", "gateway_node", "meta_leader") if FULL else ("auth_leader",)
DOWN = 8.0  # seconds a killed node stays down, under load
WRITERS = 3  # concurrent chat.send loops (plus one article writer and one reader)
ROOM = "failover"


@dataclass
class Call:
    what: str
    started: float
    seconds: float
    status: int


@dataclass
class Load:
    """Steady requests through nginx; every answer is kept."""

    http: aiohttp.ClientSession
    token: str
    calls: list[Call] = field(default_factory=list)
    acked: dict[str, int] = field(default_factory=dict)  # Idempotency-Key -> stream seq
    acked_at: dict[int, float] = field(default_factory=dict)  # stream seq -> when acked
    keys: Any = field(default_factory=lambda: (f"f{i}" for i in itertools.count()))
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def _call(self, what: str, method: str, path: str, **kw: Any) -> tuple[int, Any]:
        started = time.monotonic()
        try:
            async with self.http.request(
                method,
                path,
                headers={"Authorization": f"Bearer {self.token}", **kw.pop("headers", {})},
                timeout=aiohttp.ClientTimeout(total=40),
                **kw,
            ) as resp:
                body = await resp.json(content_type=None)
                status = resp.status
        except (aiohttp.ClientError, TimeoutError):
            status, body = 0, None  # no answer at all: counted as an error
        self.calls.append(Call(what, started, time.monotonic() - started, status))
        return status, body

    async def chat(self) -> None:
        while not self.stop.is_set():
            key = next(self.keys)
            status, body = await self._call(
                "chat.send",
                "POST",
                "/api/commands/chat.send",
                json={"room": ROOM, "text": key},
                headers={"Idempotency-Key": key},
            )
            if status == 200:
                self.acked[key] = seq = int(body["seq"])
                self.acked_at[seq] = time.monotonic()
            await asyncio.sleep(0.05)  # pacing of the load, not synchronisation

    async def articles(self) -> None:
        while not self.stop.is_set():
            await self._call("article", "POST", "/api/articles", json={"title": "t", "body": "b"})
            await asyncio.sleep(0.05)  # pacing

    async def reads(self) -> None:
        while not self.stop.is_set():
            await self._call("read", "GET", "/api/auth/me")
            await asyncio.sleep(0.05)  # pacing


def _victim(stack: Stack, kind: str, infos: dict[str, Any]) -> int:
    s = stack.settings
    if kind == "meta_leader":
        jsz = _monitor(s.nats_monitor_port + 1, "/jsz")
        return int(jsz["meta_cluster"]["leader"][1:])
    if kind == "gateway_node":
        for node in range(1, s.nats_cluster + 1):
            connz = _monitor(s.nats_monitor_port + node, "/connz?limit=1024")
            names = [c.get("name", "") for c in connz.get("connections") or []]
            if any(n.startswith("ws_gateway") for n in names):
                return node
        raise AssertionError("no node holds a gateway's connection")
    stream = {"auth_leader": "KV_auth_revoked", "chat_leader": "chat"}[kind]
    return int(infos[stream][1:])


def _monitor(port: int, path: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
        result: dict[str, Any] = json.load(resp)
        return result


async def _leaders(stack: Stack) -> dict[str, Any]:
    s = stack.settings
    user, password = natsio.credentials(s, "provision") or (None, None)
    nc = await natsio.nats_connect(servers=list(s.nats_url), user=user, password=password)
    try:
        js = nc.jetstream()
        out = {}
        for stream in ("chat", "KV_auth_revoked", "KV_auth_users"):
            info = await js.stream_info(stream)
            assert info.cluster is not None and info.cluster.leader
            out[stream] = info.cluster.leader
        return out
    finally:
        await nc.close()


async def _stored_texts(stack: Stack) -> Counter[str]:
    """How many times each text is stored in the room's subject (from the stream itself)."""
    s = stack.settings
    user, password = natsio.credentials(s, "provision") or (None, None)
    nc = await natsio.nats_connect(servers=list(s.nats_url), user=user, password=password)
    try:
        js = nc.jetstream()
        sub = await js.pull_subscribe(f"chat.room.{ROOM}", stream="chat")
        texts: Counter[str] = Counter()
        pending = (await sub.consumer_info()).num_pending
        while pending:
            for msg in await sub.fetch(min(pending, 256), timeout=10):
                texts[json.loads(msg.data)["text"]] += 1
                pending -= 1
        await sub.unsubscribe()
        return texts
    finally:
        await nc.close()


class ReadyWatch:
    """Polls every API worker's /api/readyz and every gateway's /readyz (direct, not
    through nginx)."""

    def __init__(self, stack: Stack) -> None:
        s = stack.settings
        self.urls = [f"http://127.0.0.1:{p}/api/readyz" for p in s.api_ports]
        self.urls += [f"http://127.0.0.1:{p}/readyz" for p in s.gateway_ports]
        self.samples: list[tuple[float, bool]] = []

    async def run(self) -> None:
        async with aiohttp.ClientSession() as http:
            while True:
                ok = True
                for url in self.urls:
                    try:
                        async with http.get(url, timeout=aiohttp.ClientTimeout(total=3)) as r:
                            ok = ok and r.status == 200
                    except (aiohttp.ClientError, TimeoutError):
                        ok = False
                self.samples.append((time.monotonic(), ok))
                await asyncio.sleep(0.1)  # sampling period

    def last_unready(self, since: float) -> float | None:
        """Seconds after `since` of the last sample that was not ready (None: always ready)."""
        bad = [t for t, ok in self.samples if t >= since and not ok]
        return bad[-1] - since if bad else None


async def _probe(client: GatewayClient, kill: float) -> list[str]:
    """Subscriptions asked right after the kill: their outcomes."""
    outcomes = []
    for op in ("kv_sub", "js_sub"):
        asked = time.monotonic()
        try:
            if op == "kv_sub":
                sub = await client.kv_sub("articles", timeout=40)
            else:
                sub = await client.js_sub("chat", f"chat.room.{ROOM}", timeout=40)
            outcomes.append("ok")
            await sub.unsub()
        except RequestError as e:
            outcomes.append(e.code)
            print(f"{op} refused after {time.monotonic() - asked:.1f} s: {e.reason}")
        except Exception as e:
            outcomes.append(f"failed:{type(e).__name__}")
    return outcomes


@contextlib.asynccontextmanager
async def _tasks(*coros: Any) -> AsyncIterator[None]:
    tasks = [asyncio.create_task(c) for c in coros]
    try:
        yield
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_losing_a_nats_node_fails_no_request(
    tmp_path: Path, figures: Figures, secrets_seen: Secrets
) -> None:
    stack = Stack(
        tmp_path / "var",
        nats_cluster=3,
        NATS_FAILOVER_WAIT="10",
        API_WRITES_PER_MINUTE="100000",  # the load, not the write budget, is under test
        API_WRITES_BURST="100000",
    )
    stack.start()
    try:
        async with aiohttp.ClientSession(base_url=stack.url) as http:
            alice, _ = await login(http, "alice")
            bob, _ = await login(http, "bob")
            secrets_seen.add(alice, bob)
            load = Load(http, bob)
            first = await load._call(
                "chat.send", "POST", "/api/commands/chat.send", json={"room": ROOM, "text": "start"}
            )
            assert first[0] == 200, first
            reader = ResumingReader(stack.ws_url, alice, int(first[1]["seq"]), f"chat.room.{ROOM}")
            ready = ReadyWatch(stack)
            probe = await GatewayClient.connect(stack.ws_url, token=alice, open_timeout=10)
            loops = [load.chat() for _ in range(WRITERS)] + [load.articles(), load.reads()]
            async with _tasks(reader.run(), ready.run(), *loops):
                async with asyncio.timeout(30):
                    await reader.subscribed.wait()
                for kind in KINDS:
                    victim = _victim(stack, kind, await _leaders(stack))
                    kill = time.monotonic()
                    async with nats_node_down(stack.settings, stack.layout, victim):
                        outcomes = await _probe(probe, kill)
                        await asyncio.sleep(max(0.0, kill + DOWN - time.monotonic()))  # load
                    back = time.monotonic()
                    # every request under way at some point while the node was down
                    window = [
                        c for c in load.calls if c.started <= back and c.started + c.seconds >= kill
                    ]
                    writes = [c.seconds for c in window if c.what != "read"]
                    statuses = Counter(c.status for c in window)
                    after = [t for t in reader.times if t >= kill]
                    gaps = [b - a for a, b in itertools.pairwise([kill, *after])]
                    # From a message's ack to its delivery: what the gateway adds to the
                    # stall (a gap while no write is stored is the election's, not ours).
                    got = dict(zip(reader.seqs, reader.times, strict=True))
                    lags = [
                        got[seq] - at
                        for seq, at in load.acked_at.items()
                        if kill <= at <= back and seq in got
                    ]
                    unready = ready.last_unready(kill)
                    figures.add(
                        "R13",
                        "test_losing_a_nats_node_fails_no_request",
                        f"kill -9 of the {kind.replace('_', ' ')} (n{victim}) for {DOWN:.0f} s"
                        f" under ~{len(window) / DOWN:.0f} requests/s through nginx",
                        f"{len(window)} requests: {dict(sorted(statuses.items()))}; write p50"
                        f" {ms(pct(writes, 0.5))}, p99 {ms(pct(writes, 0.99))}, max"
                        f" {ms(max(writes))}; largest delivery gap"
                        f" {ms(max(gaps) if gaps else 0.0)}, ack to delivery max"
                        f" {ms(max(lags) if lags else 0.0)}; deliveries back after"
                        f" {ms(after[0] - kill) if after else 'never'}; /readyz last not ready"
                        f" {'never' if unready is None else ms(unready)} after the kill;"
                        f" subscriptions asked meanwhile: {outcomes}",
                        kind=kind,
                        statuses=dict(statuses),
                        write_p50=pct(writes, 0.5),
                        write_p99=pct(writes, 0.99),
                        write_max=max(writes),
                        largest_gap=max(gaps) if gaps else None,
                        lag_max=max(lags) if lags else None,
                        outcomes=outcomes,
                    )
                    odd = [c for c in window if c.status not in (200, 201, 503)]
                    assert not odd, (kind, statuses, odd[:5])
                    late_503 = [c for c in window if c.status == 503 and c.seconds < 9.0]
                    assert not late_503, (kind, "503 before the failover wait", late_503[:3])
                    assert set(outcomes) <= {"ok", "unavailable"}, (kind, outcomes)
                    # deliveries resume: a message sent after the node is back arrives
                    async with asyncio.timeout(30):
                        while not reader.times or reader.times[-1] < back:
                            reader.changed.clear()
                            await reader.changed.wait()
                load.stop.set()
                async with asyncio.timeout(30):  # every acknowledged message is delivered
                    while not set(load.acked.values()) <= set(reader.seqs):
                        reader.changed.clear()
                        await reader.changed.wait()
            await probe.close()
            texts = await _stored_texts(stack)
            lost = [k for k in load.acked if texts[k] == 0]
            twice = [t for t, n in texts.items() if n > 1]
            assert not lost, lost[:5]
            assert not twice, twice[:5]
            # every acknowledged seq reached the reader once, in order
            assert set(load.acked.values()) <= set(reader.seqs)
            assert len(reader.seqs) == len(set(reader.seqs))
        assert ops._http_status(f"{stack.url}/api/readyz") == 200
    finally:
        import shutil  # TEMP

        shutil.copytree(stack.layout.var / "log", "/tmp/fo_logs", dirs_exist_ok=True)
        stack.stop()
    assert stack.leftovers() == []
