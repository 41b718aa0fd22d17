"""`supervisorctl restart ws_gateway:*` under load: clients reconnect through nginx and
resume their JetStream subscription; every message published meanwhile arrives once."""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path

import aiohttp

from shared.client import GatewayClient
from tests.deploy.stackrun import Stack, chat_send, chat_send_acked, login


class ResumingReader:
    """A client that reconnects through nginx and re-`js_sub`s from the last seq + 1
    (docs/protocol.md, "After a reconnect (client side)")."""

    def __init__(
        self, url: str, token: str, start_seq: int, subject: str = "chat.room.restart"
    ) -> None:
        self.url, self.token, self.next_seq, self.subject = url, token, start_seq, subject
        self.seqs: list[int] = []
        self.times: list[float] = []  # time.monotonic() of each delivery
        self.connections = 0
        self.subscribed = asyncio.Event()
        self.changed = asyncio.Event()

    async def run(self) -> None:
        while True:
            try:
                client = await GatewayClient.connect(self.url, token=self.token, open_timeout=5)
            except Exception:
                await asyncio.sleep(0.1)  # no gateway up yet (502 from nginx): retry
                continue
            self.connections += 1
            try:
                sub = await client.js_sub(
                    "chat", self.subject, start_seq=self.next_seq, batch=100
                )
                self.subscribed.set()
                while client.close_code is None:
                    try:
                        env = await sub.get(timeout=0.5)
                    except TimeoutError:
                        continue
                    if env["op"] == "js_msg":
                        seq = int(env["data"]["seq"])
                        self.seqs.append(seq)
                        self.times.append(time.monotonic())
                        self.next_seq = seq + 1
                        self.changed.set()
            except Exception:
                pass  # closed mid-request: reconnect
            finally:
                await client.close()


async def test_restarting_every_gateway_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    stack = Stack(tmp_path / "var")
    stack.start()
    try:
        async with aiohttp.ClientSession(base_url=stack.url) as http:
            alice, _ = await login(http, "alice")
            bob, _ = await login(http, "bob")
            keys = (f"m{i}" for i in itertools.count())
            first = await chat_send(http, bob, "restart", "first", next(keys))
            assert first is not None
            published = [first]
            reader = ResumingReader(stack.ws_url, alice, first)
            task = asyncio.create_task(reader.run())
            try:
                async with asyncio.timeout(15):
                    await reader.subscribed.wait()

                async def publish_until(done: asyncio.Future[object]) -> None:
                    while not done.done():
                        key = next(keys)
                        published.append(await chat_send_acked(http, bob, "restart", key, key, 20))
                        await asyncio.sleep(0.01)  # pacing, not synchronisation

                restart = asyncio.ensure_future(
                    asyncio.to_thread(stack.ctl, "restart", "ws_gateway:*")
                )
                await publish_until(restart)
                res = await restart
                assert res.returncode == 0, res.stdout + res.stderr
                after = asyncio.get_running_loop().create_future()
                asyncio.get_running_loop().call_later(1.0, after.set_result, None)
                await publish_until(after)

                async with asyncio.timeout(30):
                    while set(reader.seqs) < set(published):
                        reader.changed.clear()
                        await reader.changed.wait()
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        assert reader.connections >= 2, "the restart never disconnected the client"
        assert len(published) > 20
        assert sorted(reader.seqs) == sorted(published), "a message was lost or duplicated"
    finally:
        stack.stop()
    assert stack.leftovers() == []
