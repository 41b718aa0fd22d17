"""The connections figure of `make bench` (issue 24): how many subscribed connections a
`make start` stack holds through nginx on this host, one publish reaching all of them, and
what a connection costs; the same for nats-server's own WebSocket listener in the same run.

    .venv/bin/python bench/connections.py --n 2000,50000   # or `make bench` (bench/run.py)

For each N: a stack (`python -m deploy start`, MAX_CONNECTIONS from N, enough gateways for
the fd limit) in a temp VAR_DIR; N sockets through nginx subscribed to one subject
(load-client processes of bench/run.py, several source addresses on 127.0.0.0/8 past one
address's ephemeral ports); `--publishes` messages published one at a time on NATS, each
timed from its publish to its arrival on every socket (p50, p99, max = time to reach all);
the gateways' and nginx workers' RSS before and after, per connection. Then the peer:
nats-server with `websocket {}`, the same clients and messages (its N is capped by the fd
limit: one process holds every socket). Every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec
import nats
from nats.aio.client import Client as NATS

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import pct, proc_rss_kb  # noqa: E402
from bench.run import SUBJECT, LoadClients, message, raise_nofile  # noqa: E402
from deploy.limits import HEADROOM, Limits, hard_nofile  # noqa: E402
from deploy.render import Layout  # noqa: E402
from deploy.stack import stack_pids  # noqa: E402
from shared.auth import TokenIssuer  # noqa: E402
from shared.capabilities import Capabilities  # noqa: E402
from shared.settings import Settings, load  # noqa: E402
from shared.users import USERS_BUCKET, UserRecord, encode_user  # noqa: E402
from tests.deploy.stackrun import clean_env, free_base_port  # noqa: E402
from tests.natsd import NatsServer, free_port  # noqa: E402

LOG = print
# Sockets per source address. A client that binds its source address gets a port unused by
# any socket on that address (whatever the destination): well below the ~28,000 ephemeral
# ports, and never 127.0.0.1, whose ports nginx's upstream connections take.
PER_ADDRESS = 10000
PER_CLIENT = 15000  # sockets per load-client process: below a 20,000 fd limit


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _children(parent: int) -> list[int]:
    """nginx's workers: their environment is cleared, so they carry no NATSGATE_STACK."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            if int(stat.read_text().rpartition(")")[2].split()[1]) == parent:
                found.append(int(stat.parent.name))
    return found


def _rss_kb(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += proc_rss_kb(pid)
    return total


def _locals(n: int) -> list[str]:
    return [f"127.0.0.{i + 2}" for i in range(max(1, math.ceil(n / PER_ADDRESS)))]


async def _fan(
    clients: LoadClients, publish: Any, n: int, publishes: int, timeout: float
) -> dict[str, Any]:
    """`publishes` messages one at a time, each collected from all n sockets before the next."""
    reach: list[float] = []
    p50: list[float] = []
    p99: list[float] = []
    complete = 0
    for run in range(1, publishes + 1):
        marker = f'"run":{run},"seq":'
        await clients.call("arm", tag="c", expect=1, latency=True, marker=marker)
        await publish(message(run, 0))
        rs = await clients.call("collect", tag="c", timeout=timeout)
        samples = [s for r in rs for s in r.get("samples", [])]
        complete += sum(r["complete"] for r in rs)
        if samples:
            reach.append(max(samples))
            p50.append(pct(samples, 50))
            p99.append(pct(samples, 99))
    return {
        "delivered_all": complete == n * publishes,
        "complete": complete,
        "expected": n * publishes,
        "p50_ms": round(pct(p50, 50), 1),
        "p99_ms": round(pct(p99, 50), 1),
        "reach_all_ms": round(pct(reach, 50), 1),
        "reach_all_max_ms": round(max(reach, default=float("nan")), 1),
    }


async def _open(
    clients: LoadClients, n: int, url: str, mode: str, token: str, sub: str, timeout: float
) -> dict[str, Any]:
    t0 = time.monotonic()
    # At least 200 handshakes/s, or the run is not worth measuring: 250 s for 50,000.
    timeout = max(timeout, n / 200)
    rs = await asyncio.wait_for(
        clients.call(
            "open",
            n,
            tag="c",
            url=url,
            mode=mode,
            token=token,
            sub=sub,
            concurrency=64,
            local=_locals(n),
        ),
        timeout,
    )
    took = time.monotonic() - t0
    opened = sum(r["opened"] for r in rs)
    errors = [e for r in rs for e in r["errors"]][:3]
    return {"opened": opened, "failed": n - opened, "errors": errors, "open_s": round(took, 1)}


async def _deploy(command: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`make start|stop` of the bench's stack (bounded: supervisord's own waits and this)."""
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "deploy", command],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )


async def _measure(
    clients: LoadClients,
    nc: NATS,
    n: int,
    url: str,
    mode: str,
    token: str,
    args: argparse.Namespace,
    server: list[int],
    proxy: list[int],
) -> dict[str, Any]:
    """Open n subscribed sockets, the RSS they cost the server's (and the proxy's)
    processes, then the publishes."""
    s0, p0 = _rss_kb(server), _rss_kb(proxy)
    await clients.start()
    res = await _open(clients, n, url, mode, token, SUBJECT, args.timeout)
    s1, p1 = _rss_kb(server), _rss_kb(proxy)
    held = max(1, res["opened"])
    res["server_rss_mb"] = round(s1 / 1024, 1)
    res["kib_per_conn"] = round((s1 - s0) / held, 1)
    if proxy:
        res["nginx_kib_per_conn"] = round((p1 - p0) / held, 1)

    async def publish(data: bytes) -> None:
        await nc.publish(SUBJECT, data)
        await nc.flush()

    res.update(await _fan(clients, publish, res["opened"], args.publishes, args.timeout))
    return res


def _stack_env(n: int, var: Path) -> tuple[dict[str, str], Settings]:
    hard = hard_nofile()
    cap = math.ceil(n * 1.05) + 64  # least_conn spreads evenly; a little room per gateway
    procs = max(2, math.ceil(cap / (hard - 2 * HEADROOM)))
    env = clean_env(
        VAR_DIR=str(var),
        BASE_PORT=str(free_base_port()),
        MAX_CONNECTIONS=str(cap),
        GATEWAY_PROCS=str(procs),
        API_PROCS="1",
        APP_ENV="dev",
        DEMO_PASSWORD="demo",
        LOG_LEVEL="WARNING",
        MAX_CONNECTIONS_PER_USER=str(cap),
    )
    return env, load(env)


async def ours(n: int, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    var = tmp / f"stack-{n}"
    env, settings = _stack_env(n, var)
    layout = Layout.of(settings, ROOT)
    limits = Limits.of(settings)
    res: dict[str, Any] = {"n": n, "gateways": settings.gateway_procs, "limits": vars(limits)}
    start = await _deploy("start", env)
    if start.returncode != 0:
        return {**res, "error": f"make start failed: {start.stderr[-500:]}"}
    clients = LoadClients(max(2, math.ceil(n / PER_CLIENT)), args.client)
    nc = None
    try:
        passwords = json.loads((layout.nats_dir / "credentials.json").read_text())
        nc = await nats.connect(
            settings.nats_url[0], user="provision", password=passwords["provision"]
        )
        kv = await nc.jetstream().key_value(USERS_BUCKET)
        caps = msgspec.convert({"subjects": ["bench.>"]}, Capabilities)
        record = UserRecord(id="bench", username="bench", display_name="Bench", capabilities=caps)
        await kv.put("bench", encode_user(record))
        token, _ = TokenIssuer.from_settings(settings).issue("bench", ttl=3600)

        pids = stack_pids(layout)
        gateways = [p for p in pids if "-m ws_gateway" in _cmdline(p)]
        workers = _children(int((layout.run_dir / "nginx.pid").read_text()))
        url = f"ws://127.0.0.1:{settings.base_port}/ws"
        res.update(await _measure(clients, nc, n, url, "ours", token, args, gateways, workers))
    finally:
        await clients.stop()
        if nc is not None:
            await nc.close()
        await _deploy("stop", env)
    return res


async def peer(n: int, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    # One process holds every socket: the fd limit caps it.
    n = min(n, resource.getrlimit(resource.RLIMIT_NOFILE)[0] - HEADROOM)
    port = free_port()
    extra = f'websocket {{ listen: "127.0.0.1:{port}", no_tls: true }}\nmax_connections: {n + 100}'
    server = NatsServer(tmp / f"peer-{n}", extra_config=extra).start()
    clients = LoadClients(max(2, math.ceil(n / PER_CLIENT)), args.client)
    res: dict[str, Any] = {"n": n}
    nc = None
    try:
        nc = await nats.connect(server.url)
        assert server.proc is not None
        url = f"ws://127.0.0.1:{port}"
        res.update(await _measure(clients, nc, n, url, "peer", "", args, [server.proc.pid], []))
    finally:
        await clients.stop()
        if nc is not None:
            await nc.close()
        server.stop()
    return res


def summary(rows: list[dict[str, Any]]) -> str:
    """The RESULTS.md section: ours through nginx beside nats-server's listener, per N."""
    lines = [
        "## Connections (issue 24)",
        "",
        "Subscribed WebSockets through nginx of a `make start` stack (MAX_CONNECTIONS from N),"
        " beside nats-server's own WebSocket listener (capped by one process's fd limit), in"
        " the same run (`bench/connections.py`). Per publish: p50 and p99 of the time from"
        " the publish to each socket, and to the last of them (median over the publishes)."
        " KiB/conn: the gateways' RSS growth (ours), nats-server's (peer); nginx's workers"
        " beside it. Targets: ≥ 50,000 held, each receiving every publish; ≤ 20 KiB gateway"
        " RSS per connection; reaching all within 2x of the peer.",
        "",
        "| N | server | held | every publish to all | p50 ms | p99 ms | all reached ms "
        "| KiB/conn | nginx KiB/conn |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        for kind in ("ours", "peer"):
            r = row.get(kind)
            if not r:
                continue
            if "error" in r:
                lines.append(f"| {row['n']} | {kind} | error: {r['error'][:120]} ||||||||")
                continue
            kib = r.get("kib_per_conn")
            lines.append(
                f"| {r['n']} | {kind} | {r['opened']} | {r.get('delivered_all')} | "
                f"{r.get('p50_ms')} | {r.get('p99_ms')} | {r.get('reach_all_ms')} | {kib} | "
                f"{r.get('nginx_kib_per_conn', '')} |"
            )
    return "\n".join(lines) + "\n"


async def main(args: argparse.Namespace) -> list[dict[str, Any]]:
    nofile = raise_nofile()  # the load clients inherit it
    LOG(f"connections: N={args.n}, {args.client} load clients, nofile {nofile}")
    tmp = Path(tempfile.mkdtemp(prefix="bench-conns-"))
    rows: list[dict[str, Any]] = []
    deadline = time.monotonic() + args.budget
    for n in args.n:
        if time.monotonic() > deadline:
            LOG(f"  N={n}: skipped, past the {args.budget:.0f} s budget")
            break
        row: dict[str, Any] = {"n": n, "load": os.getloadavg()[0]}
        for kind, measure in (("ours", ours), ("peer", peer)):
            try:
                row[kind] = await measure(n, args, tmp)
            except Exception as e:  # a figure missing, said in the table; the next N still runs
                row[kind] = {"n": n, "error": f"{type(e).__name__}: {e}"}
            LOG(f"  {kind} N={n}: {json.dumps(row[kind], default=str)}")
        rows.append(row)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1, default=str) + "\n")
    LOG(summary(rows))
    return rows


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    from bench.run import default_client

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=lambda s: [int(x) for x in s.split(",")], default=[2000, 50000])
    p.add_argument("--publishes", type=int, default=5)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per open or publish")
    p.add_argument("--budget", type=float, default=1200.0, help="no new N after this many s")
    p.add_argument("--client", default=default_client(), choices=["node", "python"])
    p.add_argument("--out", type=Path, default=None, help="JSON of every figure")
    return p.parse_args(argv)


if __name__ == "__main__":
    import uvloop

    uvloop.run(main(parse()))
