"""Presence figures (issue 19): join→seen and leave→seen across two gateways, the leave of a
crashed gateway's user, and a gateway's CPU and KV writes for 1,000 present connections.

    .venv/bin/python bench/presence.py --joins 50 --connections 1000 --window 10

Starts its own nats-server (provisioned) and gateway processes on free loopback ports;
users are written to `auth_users` and tokens signed with the dev keys, so no API runs.
1. alice (gateway A) announces on a room and unsubscribes, `--joins` times; bob (gateway B)
   watches the room's presence keys: from just before the `sub` is sent to bob's `put`,
   and from just before the `unsub` to bob's `delete`.
2. A gateway C (PRESENCE_TTL 3 s, refresh 1 s) holds alice's key and is killed (SIGKILL):
   the time until bob sees the expiry's marker, `--crashes` times.
3. `--connections` sockets on gateway A (PRESENCE_REFRESH 2 s), each with a plain `sub`
   for a `--window` of seconds, then each with a presence `sub` for the same window:
   gateway A's CPU (user + system, /proc) in each, and the presence KV writes counted on
   NATS, per refresh interval.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import uvloop

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import pct, proc_cpu, wait_http  # noqa: E402
from shared import natsio  # noqa: E402
from shared.auth import TokenIssuer  # noqa: E402
from shared.capabilities import Capabilities  # noqa: E402
from shared.client import ClientSubscription, GatewayClient  # noqa: E402
from shared.settings import Settings, load  # noqa: E402
from shared.users import USERS_BUCKET, UserRecord, encode_user  # noqa: E402
from tests.natsd import NatsServer, free_port  # noqa: E402

CAPS = Capabilities(subjects=["chat.room.*"], buckets={"presence": ["chat.room.*.>"]})
REFRESH = 2.0  # gateway A's PRESENCE_REFRESH in phase 3


class Gateway:
    def __init__(self, settings: Settings, **env: str) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ws_gateway", "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=ROOT,
            env={
                **os.environ,
                "NATS_URL": settings.nats_url[0],
                "VAR_DIR": settings.var_dir,
                "LOG_LEVEL": "WARNING",
                "MAX_CONNECTIONS_PER_USER": "100000",
                "MAX_CONNECTIONS": "100000",
                "CLIENT_OPS_BURST": "100000",
                **env,
            },
        )

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    async def ready(self) -> None:
        await wait_http(self.port, "/readyz", time.monotonic() + 30, self.proc)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)


class Watch:
    """A presence kv_sub and the keys it has seen put (a refresh re-puts a known key)."""

    def __init__(self, sub: ClientSubscription) -> None:
        self.sub = sub
        self.keys: set[str] = set()

    @classmethod
    async def open(cls, client: GatewayClient, room: str) -> Watch:
        sub = await client.kv_sub("presence", f"{room}.*.*")
        while (await sub.get())["data"]["op"] != "synced":
            pass
        return cls(sub)

    async def next(self, want: str, prefix: str) -> float:
        """Until a new key under `prefix` is put (`join`) or a known one goes (`leave`);
        the monotonic time it arrived."""
        while True:
            data = (await self.sub.get(timeout=30))["data"]
            op, key = data["op"], data.get("key", "")
            if not key.startswith(prefix):
                continue
            if want == "join" and op == "put" and key not in self.keys:
                self.keys.add(key)
                return time.monotonic()
            if want == "leave" and op in ("delete", "purge") and key in self.keys:
                self.keys.discard(key)
                return time.monotonic()


def ms_line(name: str, seconds: list[float]) -> str:
    ms = [s * 1000 for s in seconds]
    return f"  {name:<26} p50 {pct(ms, 50):8.2f} ms   p99 {pct(ms, 99):8.2f} ms   n {len(ms)}"


async def latencies(a: Gateway, bob: GatewayClient, token: str, joins: int) -> None:
    room = "chat.room.lat"
    watch = await Watch.open(bob, room)
    alice = await GatewayClient.connect(a.url, token=token)
    join, leave = [], []
    try:
        for i in range(joins):
            t0 = time.monotonic()
            await alice.request("sub", room, {"presence": True}, inbox=f"p{i}")
            join.append(await watch.next("join", f"{room}.alice.") - t0)
            t0 = time.monotonic()
            await alice.request("unsub", inbox=f"p{i}")
            leave.append(await watch.next("leave", f"{room}.alice.") - t0)
    finally:
        await alice.close()
        await watch.sub.unsub()
    print("join → seen and leave → seen, gateway A → gateway B:")
    print(ms_line("join → put seen", join))
    print(ms_line("leave → delete seen", leave))


async def crashes(settings: Settings, bob: GatewayClient, token: str, n: int) -> None:
    room = "chat.room.crash"
    watch = await Watch.open(bob, room)
    took = []
    for _ in range(n):
        c = Gateway(settings, PRESENCE_TTL="3", PRESENCE_REFRESH="1")
        await c.ready()
        alice = await GatewayClient.connect(c.url, token=token)
        await alice.request("sub", room, {"presence": True})
        await watch.next("join", f"{room}.alice.")
        c.proc.send_signal(signal.SIGKILL)
        c.proc.wait(10)
        t0 = time.monotonic()
        took.append(await watch.next("leave", f"{room}.alice.") - t0)
        await alice.close()
    await watch.sub.unsub()
    print(f"crash-leave (kill -9, PRESENCE_TTL 3 s, refresh 1 s), {n} runs:")
    print(
        "  " + ", ".join(f"{t:.2f} s" for t in took) + "  (TTL minus the age of the last refresh)"
    )


async def cpu(settings: Settings, a: Gateway, token: str, n: int, window: float) -> None:
    nc = await natsio.nats_connect(settings.nats_url[0])
    writes = 0

    async def count(_msg: object) -> None:
        nonlocal writes
        writes += 1

    await nc.subscribe("$KV.presence.chat.room.cpu.>", cb=count)
    clients: list[GatewayClient] = []
    try:
        for i in range(0, n, 50):
            clients += await asyncio.gather(
                *(GatewayClient.connect(a.url, token=token) for _ in range(min(50, n - i)))
            )
        await asyncio.gather(*(c.request("sub", "chat.room.plain") for c in clients))

        async def measure() -> tuple[float, int]:
            nonlocal writes
            await asyncio.sleep(REFRESH)  # settle: setup writes and acks out of the window
            writes, c0, t0 = 0, proc_cpu(a.proc.pid), time.monotonic()
            await asyncio.sleep(window)
            return (proc_cpu(a.proc.pid) - c0) / (time.monotonic() - t0), writes

        base_cpu, base_writes = await measure()
        await asyncio.gather(
            *(c.request("sub", "chat.room.cpu", {"presence": True}) for c in clients)
        )
        pres_cpu, pres_writes = await measure()
    finally:
        for c in clients:
            await c.close()
        await nc.close()
    per_interval = pres_writes / (window / REFRESH)
    print(f"{n} connections on gateway A, {window:.0f} s windows, PRESENCE_REFRESH {REFRESH} s:")
    print(f"  plain sub:     CPU {base_cpu * 100:6.2f} % of a core, presence writes {base_writes}")
    print(f"  presence sub:  CPU {pres_cpu * 100:6.2f} % of a core, presence writes {pres_writes}")
    print(
        f"  → {per_interval:.0f} KV writes per refresh interval ({per_interval / n:.2f} per "
        f"connection); presence costs {(pres_cpu - base_cpu) * 100 * 1000 / n:.2f} % of a "
        f"core per 1,000 present connections at a {REFRESH} s refresh "
        f"({(pres_cpu - base_cpu) * 100 * 1000 / n * REFRESH / 10:.2f} % at the default 10 s)"
    )


async def main(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-presence-"))
    srv = NatsServer(tmp / "nats").start()
    settings = load({}, nats_url=[srv.url], var_dir=str(tmp / "var"))
    gateways: list[Gateway] = []
    try:
        nc = await natsio.nats_connect(srv.url)
        js = nc.jetstream()
        await natsio.provision(js, settings)
        kv = await js.key_value(USERS_BUCKET)
        for uid in ("alice", "bob"):
            record = UserRecord(id=uid, username=uid, display_name=uid.title(), capabilities=CAPS)
            await kv.put(uid, encode_user(record))
        await nc.close()
        issuer = TokenIssuer.from_settings(settings)
        alice_token, bob_token = issuer.issue("alice")[0], issuer.issue("bob")[0]
        gateways += [
            Gateway(settings, PRESENCE_REFRESH=str(REFRESH), PRESENCE_TTL="6"),
            Gateway(settings),
        ]
        a, b = gateways
        await a.ready()
        await b.ready()
        bob = await GatewayClient.connect(b.url, token=bob_token)
        try:
            await latencies(a, bob, alice_token, args.joins)
            await crashes(settings, bob, alice_token, args.crashes)
        finally:
            await bob.close()
        await cpu(settings, a, alice_token, args.connections, args.window)
    finally:
        for g in gateways:
            g.stop()
        srv.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--joins", type=int, default=50)
    p.add_argument("--crashes", type=int, default=3)
    p.add_argument("--connections", type=int, default=1000)
    p.add_argument("--window", type=float, default=10.0)
    uvloop.run(main(p.parse_args()))
