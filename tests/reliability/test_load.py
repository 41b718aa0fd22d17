"""Reliability 5-6 against a gateway subprocess (its own RSS, its own restart): a slow
consumer among many readers, and a reconnect storm."""

from __future__ import annotations

import asyncio
import random
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
from nats.aio.client import Client as NATS
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from bench.run import LoadClients
from shared.settings import Settings
from tests.gateway.conftest import UserFactory
from tests.metrics import scrape_metric
from tests.reliability.conftest import Figures, scale
from tests.reliability.helpers import (
    GatewayProcess,
    backoff_delay,
    ms,
    open_raw,
    pct,
    rss_kib,
    subscribe_raw,
    summary,
    until,
    until_async,
)

_decode = msgspec.json.decode


async def test_slow_consumer_among_readers(
    settings: Settings, nc: NATS, make_user: UserFactory, tmp_path: Path, figures: Figures
) -> None:
    """Clients that stop reading are closed 1013 (backpressure); the readers' latency over
    equal windows without and with them, and the gateway's memory, are reported. The
    readers live in the benchmark's load-client processes (bench/loadclient.py: no JSON
    parsing per message), so what the test process does meanwhile (open the slow clients,
    publish their bulk) is not in the readers' figures."""
    n_readers = scale(50, 500)
    n_slow = scale(2, 5)
    rate = 20  # messages per second, each fanned out to every reader
    phase = scale(3, 15)  # seconds of each window (readers only; with the slow clients)
    pad = "x" * 1024
    users = [await make_user(f"r{i}") for i in range(max(1, n_readers // 50))]
    slow_token = await make_user("slow", {"subjects": ["chat.>"]})
    log_path = tmp_path / "gateway.log"
    gp = GatewayProcess(settings, log_path)
    await gp.start()
    clients = LoadClients(2, "python")
    await clients.start()
    slow: list[ClientConnection] = []
    rss: list[int] = []
    paused_at: list[float] = []
    windows: dict[str, dict[str, Any]] = {}
    stop = asyncio.Event()

    async def window(name: str, run: int, during: Any = None) -> None:
        """One measured window: `phase` seconds of the steady feed, `during` beside it."""
        expect = int(phase * rate)
        marker = f'"run":{run},"seq":'
        await clients.call("arm", tag="r", expect=expect, latency=True, marker=marker)
        t0 = time.monotonic()
        side = asyncio.create_task(during()) if during else None
        for seq in range(expect):
            payload = b'{"run":%d,"seq":%d,"ts":%f,"pad":"%s"}' % (
                run, seq, time.time(), pad.encode()
            )
            await nc.publish("chat.room.1", payload)
            await asyncio.sleep(max(0.0, t0 + (seq + 1) / rate - time.monotonic()))
        rs = await clients.call("collect", tag="r", timeout=30)
        if side is not None:
            await side
        windows[name] = {
            "samples": [x / 1000 for r in rs for x in r["samples"]],
            **{k: sum(r[k] for r in rs) for k in ("delivered", "expected", "closed")},
        }

    try:
        for i, token in enumerate(users):  # each user has its own connection limit
            n = n_readers // len(users) + (i < n_readers % len(users))
            opened = await clients.call(
                "open", n=n, tag="r", mode="ours", url=gp.url, token=token, sub="chat.room.1"
            )
            assert sum(o["failed"] for o in opened) == 0, opened

        async def sample() -> None:
            while not stop.is_set():
                rss.append(rss_kib(gp.pid))
                await asyncio.sleep(0.2)

        sampler = asyncio.create_task(sample())
        await window("warm-up", 1)
        await window("without", 2)
        rss_before = max(rss)
        before = await scrape_metric(gp.port, "gateway_backpressure_closes_total")

        async def slow_clients() -> None:
            # One at a time, spread over the window (a schedule, not synchronisation): each
            # subscribes, stops reading, and gets a stream of its own (64 KiB messages),
            # once, no more than fills its kernel buffers (the gateway's send buffer and its
            # own receive window) three times over; from then on the steady feed finds its
            # socket full and the write timeout runs.
            bulk = b'{"pad":"' + b"y" * 65536 + b'"}'
            buffered = settings.socket_send_buffer or 4 << 20  # 0: autotuning, to 4 MiB
            gap = phase / (n_slow + 2)
            for k in range(n_slow):
                await asyncio.sleep(gap)
                ws = await open_raw(gp.url, slow_token)
                await subscribe_raw(ws, "chat.room.1")
                await subscribe_raw(ws, f"chat.bulk.{k}")
                ws.transport.pause_reading()
                paused_at.append(time.time())
                slow.append(ws)
                for _ in range(3 * buffered // len(bulk) + 1):
                    await nc.publish(f"chat.bulk.{k}", bulk)

            async def all_closed() -> bool:
                done = await scrape_metric(gp.port, "gateway_backpressure_closes_total")
                return done >= before + n_slow

            await until_async(all_closed, "the slow clients to be closed", 60)

        await window("with", 3, slow_clients)
        stop.set()
        await sampler
    finally:
        stop.set()
        for ws in slow:
            ws.transport.abort()
        await clients.stop()
        gp.stop()
    # The gateway's own log says when it gave up on each slow session, and why.
    events = [_decode(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    opened_ids = [e["session"] for e in events if e.get("msg") == "session open"]
    slow_ids = opened_ids[n_readers : n_readers + n_slow]
    gave_up = {e["session"]: e for e in events if e.get("msg") == "slow client"}
    closes = [
        datetime.fromisoformat(gave_up[sid]["time"]).timestamp() - t
        for sid, t in zip(slow_ids, paused_at, strict=True)
        if sid in gave_up
    ]
    why = sorted({gave_up[sid]["why"] for sid in slow_ids if sid in gave_up})
    base, with_slow = windows["without"]["samples"], windows["with"]["samples"]
    p99a, p99b = pct(base, 0.99), pct(with_slow, 0.99)
    change = (p99b - p99a) / p99a * 100 if p99a else 0.0
    lost = {k: w["expected"] - w["delivered"] for k, w in windows.items()}
    figures.add(
        "R5",
        "test_slow_consumer_among_readers",
        f"{n_readers} reading clients (2 load-client processes) on chat.room.1 at {rate} msg/s "
        f"of 1 KiB; {phase} s windows without, then with {n_slow} clients joining one by one that "
        "subscribe to it and to a stream of their own (64 KiB messages) and stop reading; "
        "gateway in its own "
        f"process (WRITE_TIMEOUT 250 ms, SEND_QUEUE_BYTES 1 MiB, SOCKET_SEND_BUFFER "
        f"{settings.socket_send_buffer // 1024} KiB)",
        f"slow clients closed 1013: {len(closes)}/{n_slow} ({', '.join(why)}); stop-reading "
        f"-> close {summary(closes)} (the socket buffer fills, then the write timeout runs); "
        f"readers p50/p99 {ms(pct(base, 0.5))}/{ms(p99a)} without, {ms(pct(with_slow, 0.5))}/"
        f"{ms(p99b)} with ({change:+.0f}% p99; {len(base)} and {len(with_slow)} frames "
        f"sampled); messages not delivered to a reader {lost}; readers closed "
        f"{windows['with']['closed']}/{n_readers}; gateway RSS max {rss_before // 1024} MiB "
        f"before, {max(rss) // 1024} MiB with the slow clients",
        closes=closes,
    )
    assert len(closes) == n_slow
    assert windows["with"]["closed"] == 0
    assert lost == {"warm-up": 0, "without": 0, "with": 0}


async def test_reconnect_storm(
    settings: Settings, nc: NATS, make_user: UserFactory, tmp_path: Path, figures: Figures
) -> None:
    """Every client dropped at once (gateway kill -9 + restart) reconnects with the client's
    backoff and jitter; time to 99 %, failed handshakes, capability reads per reconnect."""
    n = scale(200, 2000)
    per_user = 40
    tokens = [await make_user(f"s{i}") for i in range(n // per_user)]
    gp = GatewayProcess(settings, tmp_path / "gateway.log")
    await gp.start()
    reads = {"auth_users": 0, "auth_revoked": 0}

    async def count(msg: Any) -> None:
        for bucket in reads:
            if f"KV_{bucket}" in msg.subject:
                reads[bucket] += 1

    spy = await nc.subscribe("$JS.API.>", cb=count)
    connected: list[float] = []
    failures = {"refused": 0, "http": 0, "other": 0}
    phase = {"storm": False}
    done = asyncio.Event()

    async def client(i: int) -> None:
        rnd = random.Random(i)
        token = tokens[i % len(tokens)]
        attempt = 0
        while not done.is_set():
            try:
                ws = await ws_connect(
                    gp.url,
                    additional_headers={"Authorization": f"Bearer {token}"},
                    ping_interval=None,
                    open_timeout=20,
                )
                await ws.recv()  # cap_update: connected
            except (OSError, TimeoutError) as e:
                failures["refused" if isinstance(e, ConnectionRefusedError) else "other"] += 1
            except InvalidStatus:
                failures["http"] += 1
            except ConnectionClosed:
                failures["other"] += 1
            else:
                attempt = 0
                if phase["storm"]:
                    connected.append(time.monotonic())
                try:
                    await ws.wait_closed()
                finally:
                    ws.transport.abort()
                if done.is_set():
                    return
            await asyncio.sleep(backoff_delay(attempt, rnd))
            attempt += 1

    tasks: list[asyncio.Task[None]] = []
    try:
        for i in range(n):
            tasks.append(asyncio.create_task(client(i)))
        await until_async(lambda: _connections(gp.port, n), "every client connected", 120)
        await nc.flush()
        for k in reads:
            reads[k] = 0
        for k in failures:
            failures[k] = 0
        phase["storm"] = True
        t0 = time.monotonic()
        gp.kill()
        gp.spawn()
        await until(lambda: len(connected) >= n * 0.99, "99% reconnected", 120)
        t99 = max(sorted(connected)[: int(n * 0.99)]) - t0
        await until(lambda: len(connected) >= n, "every client reconnected", 120)
        t100 = max(connected) - t0
        await nc.flush()
        rss = rss_kib(gp.pid)
    finally:
        done.set()
        gp.stop()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await spy.unsubscribe()
    per = {k: v / n for k, v in reads.items()}
    figures.add(
        "R6",
        "test_reconnect_storm",
        f"{n} clients ({len(tokens)} users) on a gateway process that is killed (-9) and "
        "restarted on the same port; clients reconnect with the JS client's backoff "
        "(250 ms x 2^n, cap 10 s, jitter 50 %)",
        f"99 % reconnected after {t99:.2f} s, 100 % after {t100:.2f} s; failed handshakes "
        f"{failures} ({sum(failures.values()) / n:.2f} per client); KV reads per reconnect: "
        + ", ".join(f"{k} {v:.2f}" for k, v in per.items())
        + f"; gateway RSS after {rss // 1024} MiB",
        reads=reads,
    )
    # (every client reconnected: the wait above fails otherwise.) The gateway keeps the
    # revoked token ids in memory: a handshake reads no auth_revoked, so the storm's reads
    # are those of the restarted gateway listing the bucket, not one per reconnect.
    assert reads["auth_revoked"] < n, reads


async def _connections(port: int, n: int) -> bool:
    try:
        return await scrape_metric(port, "gateway_connections") >= n
    except aiohttp.ClientError:
        return False
