"""Small real-world tools for the hardening suite: process figures, a TCP
relay we can cut, the client's reconnect backoff, a gateway in a subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import statistics
import subprocess
import sys
from pathlib import Path

import aiohttp
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect

from shared.settings import Settings
from tests.natsd import free_port
from tests.waits import split, until, until_async  # noqa: F401  (re-exported for the suite)

ROOT = Path(__file__).resolve().parents[2]


def rss_kib(pid: int | str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def fd_count(pid: int | str = "self") -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def pct(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of `values`, nearest rank; 0 for no values."""
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def summary(values: list[float]) -> str:
    if not values:
        return "n=0"
    return (
        f"p50 {ms(pct(values, 0.5))}, p99 {ms(pct(values, 0.99))}, max {ms(max(values))}"
        f" (n={len(values)}, mean {ms(statistics.fmean(values))})"
    )


def backoff_delay(
    attempt: int,
    rnd: random.Random,
    initial: float = 0.25,
    cap: float = 10.0,
    factor: float = 2.0,
    jitter: float = 0.5,
) -> float:
    """The JS client's `backoffDelay` (clients/js/src/policy.js): in [base·(1-jitter), base],
    base = min(cap, initial·f^n)."""
    base = min(cap, initial * factor**attempt)
    return base * (1 - jitter * rnd.random())


class TcpRelay:
    """A loopback TCP relay in front of a server. `cut()` drops every relayed connection
    and refuses new ones until `restore()`: the far side of the relay sees a network
    failure while the server behind it keeps running."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.cut_now = False

    async def start(self, port: int = 0) -> TcpRelay:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _accept(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        if self.cut_now:
            w.transport.abort()
            return
        try:
            ur, uw = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            w.transport.abort()
            return
        pair = (w, uw)
        self._pairs.add(pair)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.transport.abort()

        for coro in (pipe(r, uw), pipe(ur, w)):
            t = asyncio.ensure_future(coro)
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)

    def cut(self) -> None:
        self.cut_now = True
        for a, b in list(self._pairs):
            a.transport.abort()
            b.transport.abort()
        self._pairs.clear()

    def restore(self) -> None:
        self.cut_now = False

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class GatewayProcess:
    """`python -m ws_gateway` on a free port, for figures of its own (RSS, restart)."""

    def __init__(self, settings: Settings, log_path: Path, **env: str) -> None:
        self.settings = settings
        self.port = free_port()
        self.poll_port = free_port()
        self.log_path = log_path
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("RELIABILITY")},
            "NATS_URL": ",".join(settings.nats_url),
            "VAR_DIR": settings.var_dir,
            "LOG_FORMAT": "json",
            **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def spawn(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "ws_gateway",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--poll-port",
                    str(self.poll_port),
                ],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )

    async def start(self) -> None:
        self.spawn()
        async with aiohttp.ClientSession() as http:

            async def ready() -> bool:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise AssertionError("gateway exited:\n" + self.log_path.read_text()[-3000:])
                try:
                    async with http.get(f"http://127.0.0.1:{self.port}/readyz") as r:
                        return r.status == 200
                except aiohttp.ClientError:
                    return False

            await until_async(ready, "the gateway subprocess to be ready", 30)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@contextlib.asynccontextmanager
async def gateway_process(settings: Settings, log_path: Path, **env: str):  # type: ignore[no-untyped-def]
    gp = GatewayProcess(settings, log_path, **env)
    await gp.start()
    try:
        yield gp
    finally:
        gp.stop()


async def open_raw(url: str, token: str) -> ClientConnection:
    """A plain websockets client with a bearer token, past its first cap_update."""
    ws = await ws_connect(
        url,
        additional_headers={"Authorization": f"Bearer {token}"},
        ping_interval=None,
        max_size=None,
        open_timeout=30,
    )
    await ws.recv()  # cap_update
    return ws


async def subscribe_raw(ws: ClientConnection, subject: str) -> None:
    """`sub` on a plain client; returns at its ok (other frames are skipped)."""
    await ws.send(f'{{"op":"sub","target":"{subject}","inbox":"{subject}"}}')
    async with asyncio.timeout(30):
        while True:
            frame = await ws.recv()
            if isinstance(frame, str) and f'"op":"ok","target":"{subject}"' in frame:
                return
