"""First gateway benchmark: fan-out throughput and idle memory (the full suite is `make bench`).

    .venv/bin/python bench/fanout.py --clients 1000 --messages 2000 --idle 2000

Starts its own nats-server and one ws_gateway process on free loopback ports, connects N
WebSocket clients that each subscribe to one subject, publishes M ~200-byte JSON messages
as fast as NATS takes them and counts what every client receives (lost = expected -
received). Then opens idle connections and reports the gateway's RSS growth per connection.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgspec
import nats
import uvloop
from websockets.asyncio.client import connect

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import proc_cpu, proc_rss_kb, wait_http  # noqa: E402
from shared import natsio  # noqa: E402
from shared.auth import TokenIssuer  # noqa: E402
from shared.settings import load  # noqa: E402
from shared.users import USERS_BUCKET, UserRecord, encode_user  # noqa: E402
from tests.natsd import NatsServer, free_port  # noqa: E402


async def main(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-"))
    srv = NatsServer(tmp / "nats").start()
    port = free_port()
    settings = load({}, nats_url=(srv.url,), var_dir=str(tmp / "var"))
    issuer = TokenIssuer.from_settings(settings)
    nc = await nats.connect(srv.url)
    js = nc.jetstream()
    await natsio.provision(js, settings)
    kv = await js.key_value(USERS_BUCKET)
    caps = {"subjects": ["bench.>"]}
    await kv.put(
        "bench",
        encode_user(
            msgspec.convert({"id": "bench", "username": "bench", "capabilities": caps}, UserRecord)
        ),
    )
    token, _ = issuer.issue("bench")
    env = {
        **os.environ,
        "NATS_URL": srv.url,
        "VAR_DIR": str(tmp / "var"),
        "MAX_CONNECTIONS_PER_USER": "100000",
        "LOG_LEVEL": "WARNING",
    }
    gw = subprocess.Popen(  # noqa: ASYNC220
        [
            sys.executable,
            "-m",
            "ws_gateway",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        cwd=ROOT,
        env=env,
    )
    try:
        await wait_http(port, "/readyz", time.monotonic() + 20)
        url = f"ws://127.0.0.1:{port}/ws"
        hdrs = {"Authorization": f"Bearer {token}"}
        if args.idle:
            base = proc_rss_kb(gw.pid)
            conns = []
            for _ in range(args.idle):
                ws = await connect(
                    url, additional_headers=hdrs, compression=None, ping_interval=None
                )
                await ws.recv()
                conns.append(ws)
            after = proc_rss_kb(gw.pid)
            print(
                f"idle: {args.idle} connections, gateway RSS {base} -> {after} KiB = "
                f"{(after - base) / args.idle:.1f} KiB per connection"
            )
            for ws in conns:
                await ws.close()
        counts = [0] * args.clients
        done = asyncio.Event()
        expected = args.messages
        finished = [0]

        async def client(i: int, ready: asyncio.Event) -> None:
            async with connect(
                url, additional_headers=hdrs, compression=None, max_size=None, ping_interval=None
            ) as ws:
                await ws.recv()  # cap_update
                await ws.send(json.dumps({"op": "sub", "target": "bench.fan", "inbox": "s"}))
                await ws.recv()  # ok
                ready.set()
                n = 0
                async for frame in ws:
                    n += frame.count("\n") + 1
                    if n >= expected:
                        break
                counts[i] = n
                finished[0] += 1
                if finished[0] == args.clients:
                    done.set()
                await done.wait()

        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        readies = [asyncio.Event() for _ in range(args.clients)]
        tasks = [asyncio.create_task(client(i, readies[i])) for i in range(args.clients)]
        for r in readies:
            await r.wait()
        payload_pad = "x" * 150
        t0 = time.perf_counter()
        gw_cpu0 = proc_cpu(gw.pid)
        for seq in range(expected):
            await nc.publish(
                "bench.fan",
                json.dumps({"seq": seq, "ts": time.time(), "pad": payload_pad}).encode(),
            )
        await nc.flush()
        try:
            async with asyncio.timeout(args.timeout):
                await done.wait()
        except TimeoutError:
            pass
        elapsed = time.perf_counter() - t0
        gw_cpu = proc_cpu(gw.pid) - gw_cpu0
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        delivered = sum(counts)
        total = expected * args.clients
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        client_cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
        print(
            f"fan-out N={args.clients} M={expected}: delivered {delivered}/{total} "
            f"(lost {total - delivered}) in {elapsed:.2f}s = {delivered / elapsed:,.0f} msg/s; "
            f"load client CPU {client_cpu:.1f}s ({client_cpu / elapsed:.0%} of one core); "
            f"gateway CPU {gw_cpu:.2f}s = {gw_cpu / max(delivered, 1) * 1e9:.0f} ns/delivery"
        )

    finally:
        gw.terminate()
        gw.wait(10)
        await nc.close()
        srv.stop()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--messages", type=int, default=2000)
    p.add_argument("--idle", type=int, default=2000)
    p.add_argument("--timeout", type=float, default=120)
    uvloop.run(main(p.parse_args()))
