"""Run a whole second stack from the repo with `make`, on free ports and a temp VAR_DIR.

Every port derives from BASE_PORT (shared/settings.py), so a free base whose derived ports
are all free is enough to run beside a `make run` that may be up.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import signal
import socket
import subprocess
import time
import xmlrpc.client
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import msgspec

from deploy import stack as ops
from deploy.render import Layout
from shared.client import ClientSubscription
from shared.settings import Settings, load
from tests.metrics import scrape_metric
from tests.waits import until_async

ROOT = Path(__file__).resolve().parents[2]


def _free(port: int) -> bool:
    """Nothing listens on it (TIME_WAIT leftovers of closed connections do not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_base_port(nats_cluster: int = 1) -> int:
    """A BASE_PORT whose every derived port is free right now, all of them between 10000
    and the kernel's ephemeral range (where any outgoing connection could take one)."""
    low, high = 10000 + 3858, _ephemeral_start() - 145
    for _ in range(200):
        base = random.randrange(low, high)
        settings = load({"BASE_PORT": str(base), "NATS_CLUSTER": str(max(1, nats_cluster))})
        ports = [
            base,
            *settings.api_ports,
            *settings.gateway_ports,
            *(settings.nats_port + i for i in range(nats_cluster)),
            *(settings.nats_monitor_port + i for i in range(nats_cluster)),
            *(settings.nats_cluster_port + i for i in range(nats_cluster)),
        ]
        if all(_free(p) for p in ports):
            return base
    raise RuntimeError("no free base port found")


def clean_env(**settings: str) -> dict[str, str]:
    """The caller's environment without any setting of ours, plus `settings`."""
    names = {f.name.upper() for f in msgspec.structs.fields(Settings)}
    env = {k: v for k, v in os.environ.items() if k not in names and k != "NATSGATE_STACK"}
    env.update(settings)
    return env


class Stack:
    """One stack started by `make start` and stopped by `make stop`."""

    def __init__(self, var_dir: Path, *, nats_cluster: int = 1, **extra: str) -> None:
        self.env = clean_env(
            BASE_PORT=str(free_base_port(nats_cluster)),
            VAR_DIR=str(var_dir),
            NATS_CLUSTER=str(nats_cluster),
            APP_ENV="dev",
            DEMO_PASSWORD="demo",
            **extra,
        )
        self.settings = load(self.env)
        self.layout = Layout.of(self.settings, ROOT)

    @property
    def url(self) -> str:
        return self.settings.public_url

    @property
    def ws_url(self) -> str:
        return f"ws://{self.settings.host}:{self.settings.base_port}/ws"

    @property
    def origin(self) -> str:
        return self.settings.allowed_origins[0]

    def make(
        self, target: str, *args: str, timeout: float = 180
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["make", "-s", "--no-print-directory", target, *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    def start(self) -> None:
        t0 = time.monotonic()
        res = self.make("start")
        assert res.returncode == 0, f"make start failed:\n{res.stdout}\n{res.stderr}"
        self.start_seconds = time.monotonic() - t0

    def ctl(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """supervisorctl on this stack (as an operator would type it)."""
        return self.make("ctl", "ARGS=" + " ".join(args), timeout=timeout)

    async def gateways_serving(self, timeout: float = 30.0) -> None:
        """Until every gateway answers /readyz and nginx passes a WebSocket upgrade on to
        one (an unauthenticated upgrade gets the gateway's 401, not nginx's 502: after a
        restart nginx may hold every gateway as failed for its fail_timeout). A test that
        restarts the gateways leaves the stack like this for the next one."""

        async def serving() -> bool:
            async with aiohttp.ClientSession() as http:
                for port in self.settings.gateway_ports:
                    try:
                        async with http.get(f"http://{self.settings.host}:{port}/readyz") as r:
                            if r.status != 200:
                                return False
                    except aiohttp.ClientError:
                        return False
                headers = {
                    "Upgrade": "websocket",
                    "Connection": "Upgrade",
                    "Sec-WebSocket-Version": "13",
                    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                }
                async with http.get(f"{self.url}/ws", headers=headers) as r:
                    return r.status == 401

        await until_async(serving, "every gateway serving through nginx", timeout)

    def stop(self) -> None:
        res = self.make("stop")
        assert res.returncode == 0, f"make stop failed:\n{res.stdout}\n{res.stderr}"

    def leftovers(self) -> list[str]:
        """Every process of this stack still alive: by marker and by its VAR_DIR on the
        command line (nats-server, nginx and supervisord name their config there)."""
        found = [f"pid {p} (NATSGATE_STACK)" for p in ops.stack_pids(self.layout)]
        res = subprocess.run(["pgrep", "-af", str(self.layout.var)], capture_output=True, text=True)
        found += [line for line in res.stdout.splitlines() if line.strip()]
        return found

    def busy_ports(self) -> list[int]:
        s = self.settings
        ports = [
            s.base_port,
            *s.api_ports,
            *s.gateway_ports,
            *(s.nats_port + i for i in range(s.nats_cluster)),
        ]
        return [p for p in ports if not _free(p)]


@contextlib.contextmanager
def started(var_dir: Path, **kwargs: Any) -> Iterator[Stack]:
    """A stack started for the block and stopped after it (the stack fixtures' body)."""
    s = Stack(var_dir, **kwargs)
    s.start()
    try:
        yield s
    finally:
        s.stop()  # idempotent: the test may have stopped it already


async def login(http: aiohttp.ClientSession, username: str) -> tuple[str, str]:
    """(token, session cookie value) of a demo user, through nginx."""
    async with http.post(
        "/api/auth/login", json={"username": username, "password": "demo"}
    ) as resp:
        assert resp.status == 200, await resp.text()
        body = await resp.json()
        return body["token"], resp.cookies["session"].value


async def article_reaches(
    sub: ClientSubscription, http: aiohttp.ClientSession, token: str, title: str
) -> dict[str, Any]:
    """Once `sub` (a kv_sub of `articles`) is synced, an article created through `http`'s
    API with `token`: the kv_msg envelope of it that `sub` receives."""
    while (await sub.get())["data"]["op"] != "synced":
        pass
    async with http.post(
        "/api/articles",
        json={"title": title, "body": "through nginx"},
        headers={"Authorization": f"Bearer {token}"},
    ) as resp:
        assert resp.status == 201, await resp.text()
        revision = (await resp.json())["revision"]
    while (env := await sub.get())["data"].get("revision") != revision:
        pass
    return env


async def chat_send(
    http: aiohttp.ClientSession, token: str, room: str, text: str, key: str
) -> int | None:
    """POST /api/commands/chat.send; the stream seq, or None when not acknowledged.
    The Idempotency-Key makes a retry of the same message store it once."""
    try:
        async with http.post(
            "/api/commands/chat.send",
            json={"room": room, "text": text},
            headers={"Authorization": f"Bearer {token}", "Idempotency-Key": key},
            timeout=aiohttp.ClientTimeout(total=5),
        ) as resp:
            if resp.status != 200:
                return None
            return int((await resp.json())["seq"])
    except (aiohttp.ClientError, TimeoutError):
        return None


async def chat_send_acked(
    http: aiohttp.ClientSession, token: str, room: str, text: str, key: str, timeout: float
) -> int:
    """`chat_send` retried with the same Idempotency-Key until acknowledged (stored once
    however many tries it takes); its stream seq. AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while (seq := await chat_send(http, token, room, text, key)) is None:
        assert time.monotonic() < deadline, f"chat.send not acknowledged for {timeout:.0f} s"
        await asyncio.sleep(0.05)  # a pause between retries, not synchronisation
    return seq


async def todo_command(
    http: aiohttp.ClientSession, token: str, op: str, body: dict[str, Any], timeout: float = 30
) -> int:
    """todos.put / todos.delete through nginx, retried until the API answers (its NATS write
    is idempotent: a put of the same value; a delete of a deleted key is 404); the KV
    revision, 0 for a delete of nothing."""
    deadline = time.monotonic() + timeout
    while True:
        async with http.post(
            f"/api/commands/todos.{op}", json=body, headers={"Authorization": f"Bearer {token}"}
        ) as r:
            if r.status == 200:
                return int((await r.json())["revision"])
            if r.status == 404 and op == "delete":
                return 0
        assert time.monotonic() < deadline, f"todos.{op} not acknowledged: {r.status}"
        await asyncio.sleep(0.05)  # a pause between retries, not synchronisation


class MixedWrites:
    """Chat messages and one user's todo puts and deletes, written together through nginx,
    remembering what a reader of both must end with (the client kill -9 tests)."""

    def __init__(
        self,
        http: aiohttp.ClientSession,
        writer: str,
        todo_writer: str,
        room: str,
        uid: str,
        prefix: str,
        published: list[int],
    ) -> None:
        self.http, self.writer, self.todo_writer = http, writer, todo_writer
        self.room, self.uid = room, uid
        self.keys = (f"{room}-{i}" for i in itertools.count(len(published)))
        self.published = published  # stream seqs, in order
        self.ids = [f"{prefix}-{i}" for i in range(10)]
        self.expected: dict[str, str] = {}  # key -> title, as the writes left it
        self.last_rev = 0

    async def write(self, n: int) -> None:
        for i in range(n):
            key = next(self.keys)
            self.published.append(
                await chat_send_acked(self.http, self.writer, self.room, key, key, 30)
            )
            todo_id = self.ids[i % len(self.ids)]
            if i % 4 == 3:
                rev = await todo_command(self.http, self.todo_writer, "delete", {"id": todo_id})
                self.expected.pop(f"user.{self.uid}.{todo_id}", None)
            else:
                body = {"id": todo_id, "title": key}
                rev = await todo_command(self.http, self.todo_writer, "put", body)
                self.expected[f"user.{self.uid}.{todo_id}"] = key
            self.last_rev = max(self.last_rev, rev)


async def gateway_of(ports: list[int]) -> int:
    """The port of the one gateway of `ports` holding a session (the test's one client)."""
    found: list[int] = []

    async def one() -> bool:
        found[:] = [p for p in ports if await scrape_metric(p, "gateway_connections") == 1]
        return len(found) == 1

    await until_async(one, "one gateway with the client's session", 10)
    return found[0]


def keep_down(server: Any, name: str) -> None:
    """Stop a killed program for good: supervisord may already be restarting it."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        state = server.supervisor.getProcessInfo(name)["statename"]
        if state in ("STOPPED", "EXITED", "FATAL"):
            return
        if state == "STARTING":
            # Just forked: a SIGTERM before its exec is lost (supervisord's handler in the
            # child), and the stop then waits stopwaitsecs for SIGKILL. Stop it once started.
            time.sleep(0.1)
            continue
        try:
            server.supervisor.stopProcess(name, True)
        except xmlrpc.client.Fault:
            time.sleep(0.1)  # not stoppable in this state (BACKOFF): ask again
    raise AssertionError(f"{name} would not stay down")


def bring_back(server: Any, name: str) -> None:
    """Start a program kept down; already started (supervisord was quicker) is fine."""
    try:
        server.supervisor.startProcess(name, True)
    except xmlrpc.client.Fault as e:
        if e.faultCode != 60:  # ALREADY_STARTED
            raise


@contextlib.asynccontextmanager
async def nats_node_down(
    settings: Settings, layout: Layout, node: int, rejoin_timeout: float = 30
) -> AsyncIterator[None]:
    """NATS node n<node> killed (SIGKILL) and kept down for the body (supervisord would
    restart it at once); then started again, and waited for until its /healthz says it
    rejoined and caught up (bounded by `rejoin_timeout`)."""
    name = f"nats_{node}"
    victim = next(p for p in ops._process_info(layout) if p["name"] == name)
    os.kill(victim["pid"], signal.SIGKILL)
    with ops.rpc(layout) as server:
        keep_down(server, f"nats:{name}")
    yield
    with ops.rpc(layout) as server:
        bring_back(server, f"nats:{name}")
    monitor = f"http://127.0.0.1:{settings.nats_monitor_port + node}/healthz"
    await asyncio.to_thread(
        ops._poll,
        f"node n{node} to rejoin and catch up",
        lambda: ops._http_status(monitor) == 200,
        time.monotonic() + rejoin_timeout,
    )
