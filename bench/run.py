"""The benchmark suite (`make bench`): ours vs nats-server's WebSocket listener vs a Python ceiling.

    .venv/bin/python bench/run.py            # the full run: bench/RESULTS.md, bench/fanout.png
    .venv/bin/python bench/run.py --quick    # a smoke run with small N (writes to /tmp)

Three servers, measured one at a time on this machine, each behind a fresh nats-server, with
the same messages (~200-byte compact JSON `{"seq":N,"ts":<send time>,"pad":"…"}` published on
one subject by this process over core NATS) and the same load client (`bench/loadclient.py`,
several processes each holding a share of the connections):

- **peer**: nats-server's own WebSocket listener (`websocket { no_tls: true }`), clients
  speaking the NATS protocol over WebSocket (no auth);
- **ceiling**: `bench/ceiling.py`, one NATS subscription and `websockets.broadcast()` of
  pre-encoded envelopes batched per event-loop tick (no auth, no protocol);
- **ours**: `python -m ws_gateway` with a bearer JWT per connection, capability checks and
  docs/protocol.md's envelopes.

Workloads: idle connections (handshakes/s while opening them, RSS per connection); fan-out to
N subscribers of one subject (delivered msg/s at max publish rate; p50/p99 end-to-end latency
at a fixed rate); KV fan-out (ours only: `PUT /api/articles/{id}` to the last of N `kv_sub`
clients); JetStream catch-up (N clients replaying the stream from `start_seq` 1; ours, and
peer through `$JS.API` pull consumers; the stream's NATS consumers sampled throughout);
JetStream tail (ours only: N clients `js_sub` one stream from its end, one filter for all and
then one filter each: the stream's NATS consumers while they are subscribed, and one message
to every client). Messages lost are counted by sequence in every run. `bench/report.py`
writes RESULTS.md (every figure against issue 18's targets) and the chart. Then the
connections figure (`--connections`, bench/connections.py): subscribed sockets through the
nginx of a `make start` stack beside nats-server's listener, its own section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import nats
import uvloop
from nats.js import api

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import pct, proc_cpu, proc_rss_kb, wait_http  # noqa: E402
from bench.report import JS_STREAM, KINDS, SAMPLE_S, TAIL_STREAM, chart, write_report  # noqa: E402
from shared import natsio  # noqa: E402
from shared.auth import TokenIssuer  # noqa: E402
from shared.settings import load  # noqa: E402
from shared.users import USERS_BUCKET, UserRecord, encode_user  # noqa: E402
from tests.natsd import NatsServer, free_port  # noqa: E402

SUBJECT = "bench.fan"
JS_SUBJECT = f"{JS_STREAM}.bench"
TAIL_SAME = f"{TAIL_STREAM}.all"  # the one filter of every client; one each: tail.c.<pid>.<i>
PAD = "x" * 148  # 200 bytes with a 4-digit seq
LOG = print


def message(run: int, seq: int) -> bytes:
    """`"run":R,"seq":N` first: the load client counts that marker (R: the measured window)."""
    return json.dumps(
        {"run": run, "seq": seq, "ts": time.time(), "pad": PAD}, separators=(",", ":")
    ).encode()


def raise_nofile() -> tuple[int, int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else 1 << 20
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


class LoadClients:
    """P load-client processes; a command goes to all, with `n` split between them."""

    def __init__(self, procs: int, kind: str) -> None:
        self.n = procs
        self.argv = (
            [shutil.which("node") or "node", str(ROOT / "bench" / "loadclient.js")]
            if kind == "node"
            else [sys.executable, str(ROOT / "bench" / "loadclient.py")]
        )
        self.procs: list[asyncio.subprocess.Process] = []

    async def start(self) -> None:
        for _ in range(self.n):
            self.procs.append(
                await asyncio.create_subprocess_exec(
                    *self.argv,
                    cwd=ROOT,
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    limit=1 << 28,
                )
            )

    def split(self, n: int) -> list[int]:
        return [n // self.n + (i < n % self.n) for i in range(self.n)]

    async def call(self, cmd: str, n: int | None = None, **kw: Any) -> list[dict[str, Any]]:
        shares = self.split(n) if n is not None else [None] * self.n

        async def one(proc: asyncio.subprocess.Process, share: int | None) -> dict[str, Any]:
            p = {"cmd": cmd, **kw}
            if share is not None:
                p["n"] = share
            assert proc.stdin and proc.stdout
            proc.stdin.write(json.dumps(p).encode() + b"\n")
            await proc.stdin.drain()
            line = await proc.stdout.readline()
            if not line:
                raise RuntimeError("a load client died")
            res: dict[str, Any] = json.loads(line)
            if "error" in res:
                raise RuntimeError(f"load client {cmd}: {res['error']}")
            return res

        return list(
            await asyncio.gather(*(one(p, s) for p, s in zip(self.procs, shares, strict=True)))
        )

    async def stop(self) -> None:
        for proc in self.procs:
            if proc.returncode is None:
                with contextlib.suppress(Exception):
                    assert proc.stdin
                    proc.stdin.write(b'{"cmd":"exit"}\n')
                    await proc.stdin.drain()
        for proc in self.procs:
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        self.procs.clear()


@dataclasses.dataclass
class Samples:
    counts: list[int] = dataclasses.field(default_factory=list)
    failed: int = 0


class Bench:
    """One server kind: its nats-server, its process, its load clients, its figures."""

    def __init__(self, kind: str, args: argparse.Namespace, tmp: Path) -> None:
        self.kind = kind
        self.args = args
        self.tmp = tmp / kind
        self.procs: list[subprocess.Popen[bytes]] = []
        self.res: dict[str, Any] = {"fanout": {}, "errors": []}
        self.token = ""
        self.run_id = 0  # 0: the JetStream messages
        self.clients = LoadClients(args.procs, args.client)

    # ------------------------------------------------------------------ setup

    async def setup(self) -> None:
        extra = ""
        if self.kind == "peer":
            extra = f'websocket {{ listen: "127.0.0.1:{free_port()}", no_tls: true }}'
        self.nats = NatsServer(self.tmp / "nats", extra_config=extra).start()
        self.nc = await nats.connect(self.nats.url, pending_size=1 << 24)
        js = self.nc.jetstream()
        self.settings = load({}, nats_url=(self.nats.url,), var_dir=str(self.tmp / "var"))
        await natsio.provision(js, self.settings)
        self.env = {
            **os.environ,
            "NATS_URL": self.nats.url,
            "VAR_DIR": str(self.tmp / "var"),
            "MAX_CONNECTIONS_PER_USER": "1000000",
            "LOG_LEVEL": "WARNING",
            # one bench user holds every kv_sub and js_sub of the run
            "MAX_READERS_PER_USER": "1000000",
        }
        if self.kind == "ours":
            kv = await js.key_value(USERS_BUCKET)
            caps = {
                "subjects": ["bench.>"],
                "buckets": {"articles": [">"]},
                "streams": {JS_STREAM: [JS_SUBJECT], TAIL_STREAM: [">"]},
                "commands": ["articles.create", "articles.update"],
            }
            await kv.put(
                "bench",
                encode_user(
                    msgspec.convert(
                        {"id": "bench", "username": "bench", "capabilities": caps}, UserRecord
                    )
                ),
            )
            self.token, _ = TokenIssuer.from_settings(self.settings).issue("bench", ttl=3600)
            if self.args.tail_clients:
                # allow_direct: issue 18's shared history reads it by direct get batch
                await js.add_stream(
                    api.StreamConfig(
                        name=TAIL_STREAM,
                        subjects=[f"{TAIL_STREAM}.>"],
                        storage=api.StorageType.FILE,
                        allow_direct=True,
                    )
                )
        if self.kind in ("ours", "peer") and self.args.js_clients:
            for seq in range(self.args.js_messages):
                await self.nc.publish(JS_SUBJECT, message(0, seq))
            await self.nc.flush()
            deadline = time.monotonic() + 30
            while (await js.stream_info(JS_STREAM)).state.messages < self.args.js_messages:
                if time.monotonic() > deadline:
                    raise RuntimeError("stream not populated")
                await asyncio.sleep(0.1)
        port = free_port()
        if self.kind == "ours":
            self.server = self.spawn(
                "gateway",
                [sys.executable, "-m", "ws_gateway", "--host", "127.0.0.1", "--port", str(port)],
            )
            await wait_http(port, "/readyz", time.monotonic() + 30, self.server)
            self.url = f"ws://127.0.0.1:{port}/ws"
            self.server_pid = self.server.pid
        elif self.kind == "ceiling":
            self.server = self.spawn(
                "ceiling",
                [sys.executable, "bench/ceiling.py", "--nats", self.nats.url, "--port", str(port)],
            )
            await wait_http(port, None, time.monotonic() + 30, self.server)
            self.url = f"ws://127.0.0.1:{port}/"
            self.server_pid = self.server.pid
        else:
            assert self.nats.ws_port and self.nats.proc
            self.url = f"ws://127.0.0.1:{self.nats.ws_port}/"
            self.server_pid = self.nats.proc.pid
        assert self.nats.proc
        self.nats_pid = self.nats.proc.pid
        await self.clients.start()

    def spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.tmp / f"{name}.log", "wb")
        proc = subprocess.Popen(argv, cwd=ROOT, env=self.env, stdout=log, stderr=log)
        self.procs.append(proc)
        return proc

    async def teardown(self) -> None:
        with contextlib.suppress(Exception):
            await self.clients.stop()
        for p in reversed(self.procs):
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        with contextlib.suppress(Exception):
            await self.nc.close()
        self.nats.stop()

    def conn_params(self, tag: str, sub: str | None) -> dict[str, Any]:
        return {
            "tag": tag,
            "mode": self.kind,
            "url": self.url,
            "token": self.token,
            "sub": sub,
            "concurrency": self.args.concurrency,
        }

    async def open(self, tag: str, n: int, sub: str | None) -> dict[str, Any]:
        rs = await self.clients.call("open", n=n, **self.conn_params(tag, sub))
        opened = sum(r["opened"] for r in rs)
        failed = sum(r["failed"] for r in rs)
        if failed:
            errs = [e for r in rs for e in r["errors"]]
            self.res["errors"].append(f"{tag}: {failed} connections failed: {errs[:2]}")
            LOG(f"  ! {failed} connections failed: {errs[:2]}")
        elapsed = max(r["t1"] for r in rs) - min(r["t0"] for r in rs)
        return {
            "opened": opened,
            "failed": failed,
            "elapsed": elapsed,
            "total": sum(r["total"] for r in rs),
            "client_cpu": [r["cpu"] for r in rs],
        }

    # ------------------------------------------------------------------ workloads

    async def idle(self) -> None:
        n = self.args.idle
        gc_settle = 2.0
        await asyncio.sleep(1.0)
        base, nats_base = proc_rss_kb(self.server_pid), proc_rss_kb(self.nats_pid)
        cpu0 = proc_cpu(self.server_pid)
        o = await self.open("idle", n, None)
        cpu1 = proc_cpu(self.server_pid)
        await asyncio.sleep(gc_settle)
        after, nats_after = proc_rss_kb(self.server_pid), proc_rss_kb(self.nats_pid)
        opened = max(o["opened"], 1)
        self.res["idle"] = {
            "n": o["opened"],
            "failed": o["failed"],
            "rss_kb_per_conn": (after - base) / opened,
            "server_rss_mb": (base / 1024, after / 1024),
            "nats_rss_mb": (nats_base / 1024, nats_after / 1024),
        }
        self.res["connect"] = {
            "n": o["opened"],
            "elapsed": o["elapsed"],
            "rate": o["opened"] / o["elapsed"],
            "server_cpu": (cpu1 - cpu0) / o["elapsed"],
            "client_cpu": [c / o["elapsed"] for c in o["client_cpu"]],
        }
        LOG(
            f"  idle: {o['opened']} connections ({o['failed']} failed) in {o['elapsed']:.2f}s = "
            f"{o['opened'] / o['elapsed']:,.0f} handshakes/s; RSS {base / 1024:.0f} -> "
            f"{after / 1024:.0f} MiB = {(after - base) / opened:.1f} KiB/conn "
            f"(nats-server {nats_base / 1024:.0f} -> {nats_after / 1024:.0f} MiB)"
        )
        await self.clients.call("close", tag="idle")
        await asyncio.sleep(1.0)

    async def window(
        self,
        tag: str,
        expect: int,
        publish: Any,
        timeout: float,
        latency: bool = False,
        js: bool = False,
        run_id: int | None = None,
    ) -> dict[str, Any]:
        """Arm the clients, run `publish(run_id)`, collect: figures of one measured window.

        Messages carry the window's run id, so stragglers of a window that timed out are
        not counted in the next one. `js`: count `js_msg` envelopes (ours' JetStream).
        """
        if run_id is None:
            self.run_id += 1
            run_id = self.run_id
        marker = "js" if js else f'"run":{run_id},"seq":'
        await self.clients.call("arm", tag=tag, expect=expect, latency=latency, marker=marker)
        s0, n0 = proc_cpu(self.server_pid), proc_cpu(self.nats_pid)
        t0 = time.time()
        await publish(run_id)
        t_pub = time.time() - t0
        rs = await self.clients.call("collect", tag=tag, timeout=timeout)
        t_end = time.time()
        if any(r["timed_out"] for r in rs):
            # what is still in flight must not delay the next window: wait for quiet
            q = await self.clients.call("quiet", idle=1.0, timeout=120)
            LOG(
                f"    (window timed out after {timeout:.0f}s; then "
                f"{max(x['waited'] for x in q):.0f}s until no more frames)"
            )
        s1, n1 = proc_cpu(self.server_pid), proc_cpu(self.nats_pid)
        t_done = max(r["t_done"] for r in rs) or t_end
        elapsed = max(t_done - t0, 1e-6)
        wall = t_end - t0
        out: dict[str, Any] = {
            k: sum(r[k] for r in rs)
            for k in (
                "conns",
                "closed",
                "complete",
                "delivered",
                "expected",
                "lost",
                "seq_holes",
                "reordered",
                "frames",
            )
        }
        out.update(
            elapsed=elapsed,
            publish_s=t_pub,
            rate=out["delivered"] / elapsed,
            timed_out=any(r["timed_out"] for r in rs),
            client_cpu=[r["cpu"] / elapsed for r in rs],
            server_cpu=(s1 - s0) / wall,
            nats_cpu=(n1 - n0) / wall,
        )
        # the server side's CPU (peer: nats-server alone; else the server + nats-server):
        # deliveries per CPU-second hold up better than msg/s when the machine is shared
        side = (s1 - s0) + ((n1 - n0) if self.server_pid != self.nats_pid else 0)
        out["side_cpu_s"] = side
        out["per_cpu_s"] = out["delivered"] / side if side > 0 else float("nan")
        if latency:
            samples = [s for r in rs for s in r["samples"]]
            out.update(
                p50=pct(samples, 50),
                p99=pct(samples, 99),
                max=max(samples, default=0),
                samples=len(samples),
            )
        return out

    async def fanout(self) -> None:
        have = 0
        a = self.args
        for n in a.n:
            o = await self.open("fan", n - have, SUBJECT)
            have = o["total"]
            if not have:
                raise RuntimeError("no subscriber could connect")
            LOG(f"  fan-out N={n}: {have} subscribers ready ({o['elapsed']:.1f}s)")
            await asyncio.sleep(0.5)

            async def burst(rid: int, m: int) -> None:
                for seq in range(m):
                    await self.nc.publish(SUBJECT, message(rid, seq))
                await self.nc.flush()

            await self.window("fan", 50, lambda rid: burst(rid, 50), 30)  # warm-up
            m = a.messages if n < 5000 else a.messages_big
            repeats = a.repeat if n < 5000 else 1
            runs = []
            for _ in range(repeats):
                runs.append(
                    await self.window(
                        "fan", m, lambda rid, m=m: burst(rid, m), min(150.0, 30 + m * have / 50_000)
                    )
                )
                await asyncio.sleep(0.2)
            # the median run by rate; losses of every run count
            tput = sorted(runs, key=lambda w: w["rate"])[len(runs) // 2]
            tput["rates"] = [w["rate"] for w in runs]
            cpu = sum(w["side_cpu_s"] for w in runs)  # over all runs: CPU ticks are 10 ms
            tput["per_cpu_s"] = sum(w["delivered"] for w in runs) / cpu if cpu else float("nan")
            for key in ("lost", "seq_holes", "reordered"):
                tput[key] = sum(w[key] for w in runs)
            tput["closed"] = max(w["closed"] for w in runs)  # a closed one stays closed
            LOG(
                f"    throughput M={m} (median of {repeats}: "
                f"{', '.join(f'{r:,.0f}' for r in tput['rates'])}): "
                f"{tput['delivered']:,}/{tput['expected']:,} in "
                f"{tput['elapsed']:.2f}s = {tput['rate']:,.0f} msg/s, lost {tput['lost']} "
                f"(seq holes {tput['seq_holes']}, closed {tput['closed']}); "
                f"{tput['frames']:,} frames; CPU: server {tput['server_cpu']:.0%} "
                f"nats {tput['nats_cpu']:.0%} clients "
                f"{' '.join(f'{c:.0%}' for c in tput['client_cpu'])}"
            )
            await asyncio.sleep(0.5)

            async def paced(rid: int, k: int) -> None:
                start = time.monotonic()
                for seq in range(k):
                    await self.nc.publish(SUBJECT, message(rid, seq))
                    await self.nc.flush()
                    delay = start + (seq + 1) / a.rate - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)  # the fixed publish rate

            k = a.latency_messages
            lat = await self.window(
                "fan", k, lambda rid, k=k: paced(rid, k), 30 + k / a.rate, latency=True
            )
            LOG(
                f"    latency at {a.rate:g} msg/s, {a.latency_messages} msgs: p50 "
                f"{lat['p50']:.2f} ms p99 {lat['p99']:.2f} ms max {lat['max']:.1f} ms, lost "
                f"{lat['lost']}; CPU: server {lat['server_cpu']:.0%} clients "
                f"{' '.join(f'{c:.0%}' for c in lat['client_cpu'])}"
            )
            self.res["fanout"][n] = {"throughput": tput, "latency": lat, "messages": m}
            await asyncio.sleep(0.5)
        await self.clients.call("close", tag="fan")
        await asyncio.sleep(1.0)

    async def kv(self) -> None:
        """PUT /api/articles/{id} through http_api to the last of N kv_sub clients."""
        a = self.args
        port = free_port()
        api = self.spawn(
            "http_api",
            [sys.executable, "-m", "http_api", "--host", "127.0.0.1", "--port", str(port)],
        )
        await wait_http(port, "/api/readyz", time.monotonic() + 30, api)
        base = f"http://127.0.0.1:{port}/api"
        auth = {"Authorization": f"Bearer {self.token}"}
        async with aiohttp.ClientSession() as http:
            async with http.post(
                f"{base}/articles", headers=auth, json={"title": "bench", "body": "0"}
            ) as r:
                if r.status != 201:
                    raise RuntimeError(f"create article: {r.status} {await r.text()}")
                aid = (await r.json())["id"]
            rs = await self.clients.call(
                "kv_open",
                n=a.kv_clients,
                bucket="articles",
                key=aid,
                **{k: v for k, v in self.conn_params("kv", None).items() if k != "sub"},
                timeout=60,
            )
            errs = [e for r in rs for e in r["errors"]]
            if errs:
                self.res["errors"].append(f"kv: {errs[:2]}")
            n = sum(r["opened"] for r in rs)
            await asyncio.sleep(1.0)  # let catch-up readers hand off to a shared one
            consumers = [await self.consumers("KV_articles")]
            last: list[float] = []
            first: list[float] = []
            http_rtt: list[float] = []
            missing = 0
            for u in range(1, a.kv_updates + 1):
                t0 = time.time()
                async with http.put(
                    f"{base}/articles/{aid}", headers=auth, json={"title": "bench", "body": str(u)}
                ) as r:
                    if r.status != 200:
                        raise RuntimeError(f"PUT: {r.status} {await r.text()}")
                    revision = (await r.json())["revision"]
                http_rtt.append(time.time() - t0)
                ws = await self.clients.call("kv_wait", tag="kv", revision=revision, timeout=10)
                missing += sum(w["of"] - w["got"] for w in ws)
                last.append(max(w["last"] for w in ws) - t0)
                first.append(min(w["first"] for w in ws if w["got"]) - t0)
                await asyncio.sleep(0.05)
            consumers.append(await self.consumers("KV_articles"))
        await self.clients.call("close", tag="kv")
        ms = [x * 1000 for x in last]
        self.res["kv"] = {
            "n": n,
            "updates": a.kv_updates,
            "lost": missing,
            "consumers": consumers,
            "p50": pct(ms, 50),
            "p99": pct(ms, 99),
            "max": max(ms),
            "first_p50": pct([x * 1000 for x in first], 50),
            "http_p50": pct([x * 1000 for x in http_rtt], 50),
        }
        LOG(
            f"  kv fan-out to {n} kv_sub clients, {a.kv_updates} PUTs: to the last client "
            f"p50 {pct(ms, 50):.1f} ms p99 {pct(ms, 99):.1f} ms (first client p50 "
            f"{self.res['kv']['first_p50']:.1f} ms, HTTP response p50 "
            f"{self.res['kv']['http_p50']:.1f} ms), missing {missing}; NATS consumers on "
            f"KV_articles 1 s after all synced: {consumers[0]}, after the PUTs: {consumers[1]}"
        )
        api.terminate()

    async def jetstream(self) -> None:
        a = self.args
        o = await self.open("js", a.js_clients, None)
        if not o["opened"]:
            raise RuntimeError("no client could connect")
        await asyncio.sleep(0.5)

        async def go(rid: int) -> None:
            await self.clients.call(
                "js_go",
                tag="js",
                stream=JS_STREAM,
                filter=JS_SUBJECT,
                start_seq=1,
                batch=a.js_batch,
            )

        async with self.consumer_samples(JS_STREAM) as sampled:
            w = await self.window("js", a.js_messages, go, 180, js=self.kind == "ours", run_id=0)
            end = await self.consumers(JS_STREAM)
        self.res["js"] = {
            **w,
            "n": o["opened"],
            "consumers": end,
            "consumers_max": max([*sampled.counts, end]),
            "consumer_samples": len(sampled.counts),
            "consumer_samples_failed": sampled.failed,
        }
        LOG(
            f"  jetstream catch-up: {o['opened']} clients x {a.js_messages} from start_seq 1: "
            f"{w['delivered']:,}/{w['expected']:,} in {w['elapsed']:.2f}s = {w['rate']:,.0f} "
            f"msg/s, lost {w['lost']}; CPU: server {w['server_cpu']:.0%} "
            f"nats {w['nats_cpu']:.0%} clients {' '.join(f'{c:.0%}' for c in w['client_cpu'])}; "
            f"NATS consumers on stream {JS_STREAM}: max {self.res['js']['consumers_max']} of "
            f"{len(sampled.counts)} samples, {end} at the end"
        )
        await self.clients.call("close", tag="js")

    async def tail(self) -> None:
        """`tail_clients` clients js_sub the tail stream from its end (the default start):
        first all with one filter, then each with its own."""
        self.res["tail"] = {}
        for mode in ("same", "distinct"):
            self.res["tail"][mode] = await self.tail_group(mode)

    async def tail_group(self, mode: str) -> dict[str, Any]:
        """The NATS consumers on the stream while the clients are subscribed, and
        `tail_messages` messages (per filter) to every client."""
        a = self.args
        tag = f"tail_{mode}"
        base = await self.consumers(TAIL_STREAM)
        o = await self.open(tag, a.tail_clients, None)
        if not o["opened"]:
            raise RuntimeError("no client could connect")
        kw = {"filter": TAIL_SAME} if mode == "same" else {"prefix": f"{TAIL_STREAM}.c"}
        subjects: list[str] = []

        async def publish(rid: int) -> None:
            for seq in range(a.tail_messages):
                for subject in subjects:
                    await self.nc.publish(subject, message(rid, seq))
            await self.nc.flush()

        async with self.consumer_samples(TAIL_STREAM) as sampled:
            rs = await self.clients.call(
                "js_tail", tag=tag, stream=TAIL_STREAM, inbox="t", timeout=60, **kw
            )
            subscribed = sum(r["ok"] for r in rs)
            if subscribed < o["opened"]:
                errs = [e for r in rs for e in r["errors"]]
                self.res["errors"].append(
                    f"tail {mode}: {o['opened'] - subscribed} js_sub failed: {errs[:2]}"
                )
            subjects += [TAIL_SAME] if mode == "same" else [f for r in rs for f in r["filters"]]
            await asyncio.sleep(1.0)  # as for KV: time to hand off to whatever is shared
            settled = await self.consumers(TAIL_STREAM) - base
            w = await self.window(tag, a.tail_messages, publish, 30)
        await self.clients.call("close", tag=tag)
        released = await self.until_consumers(TAIL_STREAM, base, 15.0)
        out = {
            **w,
            "n": o["opened"],
            "subscribed": subscribed,
            "filters": len(subjects),
            "consumers": settled,
            "consumers_max": max(sampled.counts, default=base) - base,
            "consumer_samples": len(sampled.counts),
            "released_s": released,
        }
        LOG(
            f"  tail, {'one filter' if mode == 'same' else 'a filter each'}: "
            f"{subscribed}/{o['opened']} js_sub ok; NATS consumers on {TAIL_STREAM}: {settled} "
            f"1 s later (max {out['consumers_max']}); {a.tail_messages} msg per filter: "
            f"{w['delivered']:,}/{w['expected']:,} delivered in {w['elapsed'] * 1000:.0f} ms, "
            f"lost {w['lost']}; consumers gone "
            + (f"{released:.1f} s after close" if released is not None else "NOT within 15 s")
        )
        return out

    async def consumers(self, stream: str) -> int:
        info = await self.nc.jetstream().stream_info(stream)
        return int(info.state.consumer_count)

    @contextlib.asynccontextmanager
    async def consumer_samples(self, stream: str) -> AsyncIterator[Samples]:
        """The stream's NATS consumer count every `SAMPLE_S` while the body runs (bodies
        are bounded in time, so is this)."""
        sampled = Samples()

        async def sample() -> None:
            while True:
                try:
                    sampled.counts.append(await self.consumers(stream))
                except Exception:  # a sample missed is counted, not fatal to the figure
                    sampled.failed += 1
                await asyncio.sleep(SAMPLE_S)

        task = asyncio.create_task(sample())
        try:
            yield sampled
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def until_consumers(self, stream: str, at_most: int, timeout: float) -> float | None:
        """Seconds until the stream has at most `at_most` consumers; None after `timeout`."""
        t0 = time.monotonic()
        while await self.consumers(stream) > at_most:
            if time.monotonic() - t0 > timeout:
                return None
            await asyncio.sleep(0.2)  # polling NATS, bounded by the timeout
        return time.monotonic() - t0

    async def run(self) -> dict[str, Any]:
        LOG(f"== {self.kind}")
        phases: list[tuple[str, Any]] = [("idle", self.idle), ("fanout", self.fanout)]
        if self.kind == "ours" and self.args.kv_clients:
            phases.append(("kv", self.kv))
        if self.kind in ("ours", "peer") and self.args.js_clients:
            phases.append(("js", self.jetstream))
        if self.kind == "ours" and self.args.tail_clients:
            phases.append(("tail", self.tail))
        try:
            await self.setup()
            for name, phase in phases:
                try:
                    await phase()
                except Exception as e:
                    self.res["errors"].append(f"{name}: {type(e).__name__}: {e}")
                    LOG(f"  ! {name} failed: {type(e).__name__}: {e}")
        finally:
            await self.teardown()
        return self.res


async def main(args: argparse.Namespace) -> None:
    load_before = os.getloadavg()[0]
    started = dt.datetime.now(dt.UTC)
    t_start = time.monotonic()
    nofile = raise_nofile()
    # each server process holds N sockets; each load client N/procs
    cap = nofile[0] - 256
    if max([*args.n, args.idle, args.tail_clients]) > cap:
        LOG(f"file descriptor limit {nofile}: capping N at {cap}")
        args.n = sorted({min(n, cap) for n in args.n})
        args.idle, args.tail_clients = min(args.idle, cap), min(args.tail_clients, cap)
    tmp = Path(tempfile.mkdtemp(prefix="bench-suite-"))
    results: dict[str, dict[str, Any]] = {}
    LOG(
        f"bench: {', '.join(args.servers)}; N={args.n}; idle {args.idle}; "
        f"{args.procs} {args.client} load-client processes; nofile {nofile[0]}; logs in {tmp}"
    )
    try:
        for kind in args.servers:
            results[kind] = await Bench(kind, args, tmp).run()
    finally:
        took = time.monotonic() - t_start
        args.out.parent.mkdir(parents=True, exist_ok=True)
        (args.out.with_suffix(".json")).write_text(
            json.dumps(
                {
                    "started": started.isoformat(),
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "results": results,
                },
                indent=1,
                default=str,
            )
        )
        png = args.out.parent / args.png
        chart(results, args, png)
        write_report(results, args, started, took, args.out, png, nofile, load_before)
        LOG(f"wrote {args.out} and {png} in {took:.0f}s")
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    if args.connections:
        # The connections figure (issue 24) after the suite: its own stacks, its section of
        # RESULTS.md.
        from bench import connections

        conn_args = connections.parse(["--n", ",".join(map(str, args.connections))])
        conn_args.client = args.client
        conn_args.out = args.out.with_name("CONNECTIONS.json")
        rows = await connections.main(conn_args)
        with args.out.open("a", encoding="utf-8") as f:
            f.write("\n" + connections.summary(rows))


def default_client() -> str:
    if shutil.which("node") and (ROOT / "bench" / "node_modules" / "ws").is_dir():
        return "node"
    return "python"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--servers", default=",".join(KINDS), type=lambda s: s.split(","))
    p.add_argument(
        "--n", default="100,1000,5000", type=lambda s: sorted(int(x) for x in s.split(","))
    )
    p.add_argument("--messages", type=int, default=2000, help="throughput run length")
    p.add_argument("--messages-big", type=int, default=1000, help="run length at N >= 5000")
    p.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="throughput runs per N < 5000 (the median is reported)",
    )
    p.add_argument("--rate", type=float, default=20.0, help="latency runs: msg/s")
    p.add_argument("--latency-messages", type=int, default=100)
    p.add_argument("--idle", type=int, default=5000)
    p.add_argument("--kv-clients", type=int, default=1000)
    p.add_argument("--kv-updates", type=int, default=100)
    p.add_argument("--js-clients", type=int, default=100)
    p.add_argument("--js-messages", type=int, default=10000)
    p.add_argument("--js-batch", type=int, default=1000)
    p.add_argument(
        "--tail-clients",
        type=int,
        default=1000,
        help="ours: js_sub clients tailing one stream (0: skip the tail phase)",
    )
    p.add_argument("--tail-messages", type=int, default=1, help="tail: messages per filter")
    p.add_argument("--procs", type=int, default=2, help="load-client processes")
    p.add_argument(
        "--client",
        choices=("node", "python"),
        default=default_client(),
        help="load client: bench/loadclient.js (needs `npm install` in bench/) or "
        "bench/loadclient.py; default node when bench/node_modules/ws is there",
    )
    p.add_argument(
        "--connections",
        type=lambda s: [int(x) for x in s.split(",") if x],
        default=[5000, 50000],
        help="N of the connections figure (bench/connections.py); empty: skip it",
    )
    p.add_argument("--concurrency", type=int, default=50, help="handshakes in flight per proc")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "RESULTS.md")
    p.add_argument("--png", default="fanout.png")
    p.add_argument("--keep", action="store_true", help="keep the temp dir with server logs")
    p.add_argument(
        "--quick", action="store_true", help="smoke run: small N, short runs, output under /tmp"
    )
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.idle, args.messages, args.messages_big = [20, 100], 200, 300, 300
        args.latency_messages, args.kv_clients, args.kv_updates = 20, 20, 5
        args.js_clients, args.js_messages, args.tail_clients = 5, 1000, 20
        args.connections = [200]
        if args.out == ROOT / "bench" / "RESULTS.md":
            args.out = Path(tempfile.gettempdir()) / "bench-quick" / "RESULTS.md"
    args.command = shlex.join(
        ["make", "bench"] if os.environ.get("MAKELEVEL") else [Path(sys.executable).name, *sys.argv]
    )
    return args


if __name__ == "__main__":
    uvloop.run(main(parse()))
