"""KV write-to-delivery latency: HTTP `PUT /api/articles/{id}` until the `kv_msg` arrives.

    .venv/bin/python bench/kv_latency.py --clients 100 --updates 300

Starts its own nats-server, one ws_gateway process and one http_api process on free loopback
ports, seeds the demo users (`python -m http_api seed-demo`) and logs in as alice over HTTP.
Two phases, each on a fresh article: one WebSocket client, then N clients, each `kv_sub` on
bucket `articles` with that article's key; then U sequential PUTs (the next only once every
client has the previous one). For each update, from just before the PUT is sent: the HTTP
response, the `kv_msg` carrying the response's revision at the (first) client, and at the
last of the N clients (fan-out complete). Prints p50/p99/max/mean.

All clients run in this one process, so the figures include this process's own scheduling and
parsing of N frames per update: they are upper bounds for what one browser sees.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import uvloop
from websockets.asyncio.client import connect

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import pct, wait_http  # noqa: E402
from shared.settings import DEFAULT_DEMO_PASSWORD  # noqa: E402
from tests.natsd import NatsServer, free_port  # noqa: E402


def listen(port: int) -> tuple[str, ...]:
    return ("--host", "127.0.0.1", "--port", str(port))


def run_module(env: dict[str, str], *args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL
    )


def spawn_module(env: dict[str, str], *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, env=env)


def line(name: str, seconds: list[float]) -> str:
    ms = [s * 1000 for s in seconds]
    return (
        f"  {name:<34} p50 {pct(ms, 50):7.2f} ms   p99 {pct(ms, 99):7.2f} ms   "
        f"max {max(ms):7.2f} ms   mean {statistics.fmean(ms):7.2f} ms"
    )


class Clients:
    """N sockets on one key; arrival times per revision, and an event when all N have it."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.arrivals: dict[int, list[float]] = {}
        self.complete: dict[int, asyncio.Event] = {}

    def expect(self, revision: int) -> asyncio.Event:
        return self.complete.setdefault(revision, asyncio.Event())

    def arrived(self, i: int, revision: int) -> None:
        t = time.perf_counter()
        times = self.arrivals.setdefault(revision, [])
        times.append(t)
        if len(times) == self.n:
            self.expect(revision).set()

    async def run(
        self, i: int, url: str, token: str, key: str, ready: asyncio.Event, stop: asyncio.Event
    ) -> None:
        async with connect(
            url,
            additional_headers={"Authorization": f"Bearer {token}"},
            compression=None,
            max_size=None,
            ping_interval=None,
        ) as ws:
            sub = {"op": "kv_sub", "target": "articles", "inbox": "k", "data": {"pattern": key}}
            await ws.send(json.dumps(sub))
            reader = asyncio.create_task(self._read(i, ws, ready))
            await stop.wait()
            reader.cancel()

    async def _read(self, i: int, ws: Any, ready: asyncio.Event) -> None:
        async for frame in ws:
            for raw in frame.split("\n"):
                env = json.loads(raw)
                op = env.get("op")
                if op == "error":
                    raise RuntimeError(f"client {i}: {env}")
                if op != "kv_msg":
                    continue
                data = env["data"]
                if data["op"] == "synced":
                    ready.set()
                elif data["op"] == "put" and ready.is_set():
                    self.arrived(i, data["revision"])


async def phase(
    http: aiohttp.ClientSession,
    base: str,
    auth: dict[str, str],
    url: str,
    token: str,
    args: argparse.Namespace,
    n_clients: int,
) -> None:
    """A fresh article, n_clients sockets watching it, args.updates sequential PUTs."""
    async with http.post(
        f"{base}/articles", headers=auth, json={"title": "bench", "body": "0"}
    ) as r:
        assert r.status == 201, await r.text()
        aid = (await r.json())["id"]
    clients = Clients(n_clients)
    readies = [asyncio.Event() for _ in range(n_clients)]
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(clients.run(i, url, token, aid, readies[i], stop))
        for i in range(n_clients)
    ]
    try:
        async with asyncio.timeout(60):
            for ev in readies:
                await ev.wait()
        http_rtt: list[float] = []
        first: list[float] = []
        last: list[float] = []
        t_start = time.perf_counter()
        for n in range(1, args.updates + 1):
            t0 = time.perf_counter()
            async with http.put(
                f"{base}/articles/{aid}", headers=auth, json={"title": "bench", "body": str(n)}
            ) as r:
                assert r.status == 200, await r.text()
                revision = (await r.json())["revision"]
            http_rtt.append(time.perf_counter() - t0)
            async with asyncio.timeout(args.timeout):
                await clients.expect(revision).wait()
            first.append(min(clients.arrivals[revision]) - t0)
            last.append(max(clients.arrivals[revision]) - t0)
        elapsed = time.perf_counter() - t_start
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    print(
        f"{args.updates} sequential PUT /api/articles/{{id}}, {n_clients} client(s) kv_sub "
        f"on that key, {elapsed:.2f}s"
    )
    print(line("HTTP response", http_rtt))
    if n_clients == 1:
        print(line("kv_msg at the client", first))
    else:
        print(line(f"kv_msg at first of {n_clients} clients", first))
        print(line(f"kv_msg at last of {n_clients} clients", last))


async def main(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-kv-"))
    srv = NatsServer(tmp / "nats").start()
    gw_port, api_port = free_port(), free_port()
    env = {
        **os.environ,
        "NATS_URL": srv.url,
        "VAR_DIR": str(tmp / "var"),
        "MAX_CONNECTIONS_PER_USER": "100000",
        "LOG_LEVEL": "WARNING",
        "DEMO_PASSWORD": DEFAULT_DEMO_PASSWORD,
    }
    procs: list[subprocess.Popen[bytes]] = []
    try:
        run_module(env, "http_api", "seed-demo")
        procs.append(gw := spawn_module(env, "ws_gateway", *listen(gw_port)))
        procs.append(api := spawn_module(env, "http_api", *listen(api_port)))
        deadline = time.monotonic() + 30
        await wait_http(gw_port, "/readyz", deadline, gw)
        await wait_http(api_port, "/api/readyz", deadline, api)
        base = f"http://127.0.0.1:{api_port}/api"
        async with aiohttp.ClientSession() as http:
            async with http.post(
                f"{base}/auth/login", json={"username": "alice", "password": DEFAULT_DEMO_PASSWORD}
            ) as r:
                assert r.status == 200, await r.text()
                token = (await r.json())["token"]
            auth = {"Authorization": f"Bearer {token}"}

            for n in (1, args.clients) if args.clients > 1 else (1,):
                await phase(http, base, auth, f"ws://127.0.0.1:{gw_port}/ws", token, args, n)
    finally:
        for p in reversed(procs):
            p.terminate()
            p.wait(30)
        srv.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--updates", type=int, default=300)
    p.add_argument("--timeout", type=float, default=10, help="seconds to wait for one update")
    uvloop.run(main(p.parse_args()))
