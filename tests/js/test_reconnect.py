"""The JS client, packed and installed in a clean project, on a whole stack through nginx
(Node: a bearer token; long polling, or WebSocket through `ws`): kill -9 of the gateway its
session is on while it reads a stream and a bucket. It resumes on the other gateway with no
gap, no duplicate and the bucket's exact final state; the figures (time to resume, gaps,
duplicates) are printed."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from deploy import stack as ops
from tests.deploy.stackrun import (
    MixedWrites,
    Stack,
    bring_back,
    chat_send_acked,
    gateway_of,
    keep_down,
    login,
    started,
)
from tests.js.package import PACKAGE, consumer, pack
from tests.waits import until

pytestmark = pytest.mark.timeout(300)

DRIVER = Path(__file__).with_name("driver.mjs")
# A WebSocket for Node that sends headers (the package's dev dependency, not the consumer's).
WS_MODULE = PACKAGE / "node_modules" / "ws" / "wrapper.mjs"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with started(tmp_path_factory.mktemp("jsclient") / "var") as s:
        yield s


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("js")
    app = consumer(tmp / "app", pack(tmp))
    shutil.copy(DRIVER, app / DRIVER.name)
    return app


class Driver:
    """The node process running driver.mjs: commands in, events out, each with its time."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.events: list[dict[str, Any]] = []

    async def next(self, ev: str, timeout: float) -> dict[str, Any]:
        """Read events until `ev` comes (the others are kept in `events`)."""
        assert self.proc.stdout is not None
        while True:
            line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
            assert line, f"the driver ended before {ev!r}: {self.events}"
            event: dict[str, Any] = json.loads(line)
            self.events.append(event)
            if event["ev"] == ev:
                return event

    async def ask(self, op: str, timeout: float = 90, **args: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps({"op": op, **args}) + "\n").encode())
        await self.proc.stdin.drain()
        return await self.next(f"{op}_done", timeout)

    def of(self, ev: str, **fields: Any) -> list[dict[str, Any]]:
        return [e for e in self.events if e["ev"] == ev and fields.items() <= e.items()]


@contextlib.asynccontextmanager
async def driven(
    stack: Stack,
    project: Path,
    transport: str,
    room: str,
    start_seq: int,
    refresh_before: int | None = None,
) -> AsyncIterator[Driver]:
    """alice's client in a node process, ready (bucket synced, `start_seq` read); closed
    after the block, and the process must then end by itself: the client left nothing open."""
    ws = str(WS_MODULE) if transport == "websocket" else ""
    assert not ws or WS_MODULE.exists(), f"{WS_MODULE} missing: `make js-deps` installs it"
    args = [stack.url, "alice", "demo", room, str(start_seq), ws]
    args += [str(refresh_before)] if refresh_before else []
    proc = await asyncio.create_subprocess_exec(
        "node",
        DRIVER.name,
        *args,
        cwd=project,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    driver = Driver(proc)
    try:
        ready = await driver.next("ready", 30)
        assert ready["transport"] == transport
        yield driver
        await driver.ask("close", 30)
        assert proc.stdin is not None
        proc.stdin.close()  # node's stdin reader holds the process until then
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.mark.parametrize("transport", ["polling", "websocket"])
async def test_kill_9_of_its_gateway_resumes_stream_and_bucket_exactly(
    stack: Stack, project: Path, transport: str
) -> None:
    room = f"js-{transport}"
    async with aiohttp.ClientSession(base_url=stack.url) as http:
        bob, _ = await login(http, "bob")
        alice, _ = await login(http, "alice")  # the writer's token; the driver logs in itself
        keys = (f"{room}-{i}" for i in itertools.count())
        published = [await chat_send_acked(http, bob, room, "first", next(keys), 30)]
        async with driven(stack, project, transport, room, published[0]) as driver:
            uid = driver.of("ready")[0]["uid"]
            writes = MixedWrites(http, bob, alice, room, uid, room, published)
            await writes.write(12)
            await driver.ask("wait", seq=published[-1], revision=writes.last_rev)
            victim = await gateway_of(list(stack.settings.gateway_ports))
            name = f"ws_gateway_{victim}"
            pid = next(p["pid"] for p in ops._process_info(stack.layout) if p["name"] == name)
            t_kill = time.time() * 1000
            os.kill(pid, signal.SIGKILL)
            with ops.rpc(stack.layout) as server:
                keep_down(server, f"ws_gateway:{name}")
            try:
                await writes.write(30)
                done = await driver.ask("wait", seq=published[-1], revision=writes.last_rev)
                assert done["transport"] == transport
                other = next(p for p in stack.settings.gateway_ports if p != victim)
                assert await gateway_of([other]) == other
                check = await driver.ask("check")
            finally:
                with ops.rpc(stack.layout) as server:
                    bring_back(server, f"ws_gateway:{name}")
        await stack.gateways_serving()

    after = [e for e in driver.events if e["t"] > t_kill]
    live = min(e["t"] for e in after if e["ev"] == "stream" and e["state"] == "live")
    synced = min(e["t"] for e in after if e["ev"] == "kv" and e["state"] == "synced")
    reconnects = [e for e in after if e["ev"] == "state" and e["state"] == "reconnecting"]
    troubles = [e for e in driver.events if e["ev"].startswith(("stream_", "kv_"))]
    seqs = check["seqs"]
    gaps = len(set(published) - set(seqs))
    dups = len(seqs) - len(set(seqs))
    print(
        f"\n[js {transport}] kill -9 -> both subscriptions resumed in "
        f"{(max(live, synced) - t_kill) / 1000:.3f} s; {len(published)} messages, gaps {gaps}, "
        f"duplicates {dups}; reconnecting states {len(reconnects)}"
    )
    assert not troubles, troubles  # no gap, reset, error or revocation reported
    assert seqs == sorted(published)  # 0 gaps, 0 duplicates, in order
    assert check["values"] == check["fresh"]  # the bucket's exact state
    mine = {f"user.{uid}.{i}" for i in writes.ids}
    assert {k: v["title"] for k, v in check["values"].items() if k in mine} == writes.expected


async def test_revocation_is_an_event_and_ends_the_subscription(
    stack: Stack, project: Path
) -> None:
    """An admin takes the streams away from alice: her stream reports `revoked` and ends
    (status `revoked`), her bucket stays synced, the connection stays open."""
    async with aiohttp.ClientSession(base_url=stack.url) as http:
        bob, _ = await login(http, "bob")
        admin, _ = await login(http, "admin")
        first = await chat_send_acked(http, bob, "js-revoke", "first", "js-revoke-0", 30)
        async with driven(stack, project, "websocket", "js-revoke", first) as driver:
            uid = driver.of("ready")[0]["uid"]
            auth = {"Authorization": f"Bearer {admin}"}
            async with http.get(f"/api/users/{uid}", headers=auth) as r:
                caps = (await r.json())["capabilities"]
            async with http.put(
                f"/api/users/{uid}", json={"capabilities": {**caps, "streams": {}}}, headers=auth
            ) as r:
                assert r.status == 200, await r.text()
            try:
                revoked = await driver.next("stream_revoked", 30)
                assert revoked["detail"]["code"] == "revoked"
                status = await driver.ask("status")
                assert status["stream"] == "revoked" and status["kv"] == "active"
                assert status["state"] == "open" and not driver.of("kv_revoked")
            finally:
                async with http.put(
                    f"/api/users/{uid}", json={"capabilities": caps}, headers=auth
                ) as r:
                    assert r.status == 200, await r.text()


async def test_a_token_near_expiry_is_refreshed_with_no_disconnect(
    tmp_path: Path, project: Path
) -> None:
    """Tokens of 6 s, rotation grace 1 s, clients refreshing 3 s before expiry, one on each
    transport: each session outlives its first token (and that token's grace) with no
    disconnect, and still delivers."""
    room = "js-refresh"
    settings = {"TOKEN_TTL": "6", "TOKEN_ROTATION_GRACE": "1"}
    with started(tmp_path / "var", **settings) as short:
        async with (
            driven(short, project, "polling", room, 0, refresh_before=3) as polled,
            driven(short, project, "websocket", room, 0, refresh_before=3) as socket,
        ):
            drivers = [polled, socket]
            first_exp = max(d.of("ready")[0]["expires_at"] for d in drivers)
            for d in drivers:
                await d.next("refreshed", 10)
                await d.next("refreshed", 10)
            await until(lambda: time.time() > first_exp + 2, "the first tokens and grace to end")
            async with aiohttp.ClientSession(base_url=short.url) as http:
                bob, _ = await login(http, "bob")
                seq = await chat_send_acked(http, bob, room, "after", f"{room}-1", 10)
            for d in drivers:
                done = await d.ask("wait", seq=seq, revision=0)
                assert done["state"] == "open" and done["lastSeq"] == seq
        for d in drivers:
            assert not d.of("state", state="reconnecting"), d.events
