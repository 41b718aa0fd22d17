"""The low-level client of the test suites and bench: raw envelopes as dicts, every frame
observable, no reconnect. Users want the Python SDK, clients/python (natsgate-client),
whose transports this shares (natsgate_client.transport; `make install` installs it).

    async with await GatewayClient.connect(url, token=token) as c:
        sub = await c.sub("chat.room.1")
        msg = await sub.get()

Frames are split on `\\n` (the server batches envelopes). Fan-out data (no inbox) is
routed to every local subscription whose pattern matches; replies and per-subscription
data by inbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
from collections.abc import Coroutine, Mapping
from typing import Any

import aiohttp
import msgspec
from natsgate_client.transport import PollTransport, Transport, WsTransport
from websockets.exceptions import ConnectionClosed

from shared.subjects import match
from shared.tasks import cancel_and_wait


class RequestError(Exception):
    """The server answered a request with an `error` frame."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason


# The reason of an `ack` the server refused (acked already, or its ack wait expired).
_ACK_REFUSED = re.compile(r"seq (\d+) is not awaiting an ack")
_ACKED_KEPT = 1024  # duplicates acked by `dedupe` whose refusal is recognised, at most


class ClientSubscription:
    """One subscription. `last_seq` is the highest `js_msg` seq `get()` has returned (or the
    one a resume was told to start after). With `dedupe` (opt-in, js_subs only: a test that
    counts deliveries must see them all), `get()` drops a `js_msg` at or below it and counts
    it in `duplicates`; with `ack: true` it also acks it, else the server would send it again
    after every ack wait (the refusal of such an ack, already acked, is no error here)."""

    def __init__(
        self,
        client: GatewayClient,
        op: str,
        target: str,
        inbox: str,
        pattern: str,
        *,
        dedupe: bool = False,
        last_seq: int = 0,
        ack: bool = False,
    ) -> None:
        self.client, self.op, self.target, self.inbox, self.pattern = (
            client,
            op,
            target,
            inbox,
            pattern,
        )
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.ok: dict[str, Any] = {}
        self.revoked = asyncio.Event()
        self.error: dict[str, Any] | None = None
        self.dedupe = dedupe
        self.last_seq = last_seq
        self.duplicates = 0
        self._ack_mode = ack
        self._acked: dict[int, None] = {}  # duplicates acked by dedupe (insertion order)

    async def get(self, timeout: float = 10.0) -> dict[str, Any]:
        """The next envelope for this subscription (with `dedupe`: no duplicate js_msg)."""
        async with asyncio.timeout(timeout):
            while True:
                env = await self.queue.get()
                if self._fresh(env):
                    return env

    def get_nowait(self) -> dict[str, Any] | None:
        while True:
            try:
                env = self.queue.get_nowait()
            except asyncio.QueueEmpty:
                return None
            if self._fresh(env):
                return env

    def _fresh(self, env: dict[str, Any]) -> bool:
        """Track `last_seq`; False for a js_msg that `dedupe` drops."""
        if env.get("op") != "js_msg":
            return True
        seq = int(env["data"]["seq"])
        if seq > self.last_seq:
            self.last_seq = seq
            return True
        if not self.dedupe:
            return True
        self.duplicates += 1
        if self._ack_mode:
            self._acked[seq] = None
            if len(self._acked) > _ACKED_KEPT:
                del self._acked[next(iter(self._acked))]
            self.client._spawn(self._ack_quietly(seq))
        return False

    async def _ack_quietly(self, seq: int) -> None:
        with contextlib.suppress(ConnectionClosed, ConnectionError, aiohttp.ClientError):
            await self.ack(seq)

    def _refused_ack(self, env: dict[str, Any]) -> bool:
        """The server refused an ack that dedupe sent for a duplicate (acked already)."""
        data = env.get("data") or {}
        m = _ACK_REFUSED.fullmatch(str(data.get("reason", "")))
        if data.get("code") != "not_found" or m is None or int(m[1]) not in self._acked:
            return False
        del self._acked[int(m[1])]
        return True

    async def unsub(self, *, delete_durable: bool = False) -> None:
        """End the subscription; `delete_durable` also deletes its durable (a js_sub with
        one; else the server answers `bad_request` and ends nothing)."""
        data = {"delete_durable": True} if delete_durable else None
        await self.client.request("unsub", inbox=self.inbox, data=data)
        self.client.subs.pop(self.inbox, None)

    async def ack(self, seq: int) -> None:
        await self.client.send(
            {"op": "ack", "target": self.target, "inbox": self.inbox, "data": {"seq": seq}}
        )


class GatewayClient:
    def __init__(self, ws: Transport) -> None:
        self.ws = ws
        self.subs: dict[str, ClientSubscription] = {}
        self.capabilities: dict[str, Any] = {}
        self.user: str | None = None
        self.cap_updates: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.errors: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.envelopes: asyncio.Queue[dict[str, Any]] | None = None  # every envelope, if set
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._ids = itertools.count(1)
        self._reader: asyncio.Task[None] | None = None
        self._first = asyncio.get_running_loop().create_future()
        self.frames = 0
        self._tasks: set[asyncio.Task[None]] = set()

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        token: str | None = None,
        headers: Mapping[str, str] | None = None,
        record: bool = False,
        open_timeout: float = 10.0,
    ) -> GatewayClient:
        """Connect and wait for the first `cap_update`."""
        hdrs = dict(headers or {})
        if token:
            hdrs["Authorization"] = f"Bearer {token}"
        transport: Transport
        if url.startswith(("http://", "https://")):
            transport = await PollTransport.open(url, hdrs, open_timeout)
        else:
            # Silent unless asked (tests of the heartbeat), frames of any size (bench).
            transport = await WsTransport.open(
                url, hdrs, open_timeout, ping_interval=None, max_size=None
            )
        client = cls(transport)
        if record:
            client.envelopes = asyncio.Queue()
        client._reader = asyncio.get_running_loop().create_task(client._read())
        try:
            async with asyncio.timeout(open_timeout):
                await asyncio.shield(client._first)
        except BaseException:
            await client.close()  # closed before its first cap_update: release the transport
            raise
        return client

    async def __aenter__(self) -> GatewayClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.ws.close()
        await cancel_and_wait(self._reader)

    @property
    def close_code(self) -> int | None:
        return self.ws.close_code

    async def wait_closed(self, timeout: float = 10.0) -> int | None:
        async with asyncio.timeout(timeout):
            await self.ws.wait_closed()
        return self.ws.close_code

    # ------------------------------------------------------------------ sending

    async def send(self, envelope: Mapping[str, Any] | bytes | str) -> None:
        if isinstance(envelope, Mapping):
            await self.ws.send(msgspec.json.encode(envelope).decode())
        else:
            await self.ws.send(envelope)

    def new_inbox(self) -> str:
        return f"c{next(self._ids)}"

    async def request(
        self,
        op: str,
        target: str | None = None,
        data: Any = None,
        inbox: str | None = None,
        timeout: float = 10.0,
    ) -> dict[str, Any]:
        """Send a request and return its `ok` envelope; raise RequestError on `error`."""
        inbox = inbox or self.new_inbox()
        fut = asyncio.get_running_loop().create_future()
        self._pending[inbox] = fut
        env: dict[str, Any] = {"op": op, "inbox": inbox}
        if target is not None:
            env["target"] = target
        if data is not None:
            env["data"] = data
        try:
            await self.send(env)
            async with asyncio.timeout(timeout):
                reply = await fut
        finally:
            self._pending.pop(inbox, None)
        if reply["op"] == "error":
            raise RequestError(reply["data"]["code"], reply["data"]["reason"])
        result: dict[str, Any] = reply
        return result

    async def _subscribe(
        self, op: str, target: str, pattern: str, data: Any, timeout: float = 10.0, **local: Any
    ) -> ClientSubscription:
        inbox = self.new_inbox()
        sub = ClientSubscription(self, op, target, inbox, pattern, **local)
        self.subs[inbox] = sub
        try:
            reply = await self.request(op, target, data, inbox=inbox, timeout=timeout)
        except BaseException:
            self.subs.pop(inbox, None)
            raise
        sub.ok = reply.get("data") or {}
        return sub

    async def sub(self, subject: str) -> ClientSubscription:
        return await self._subscribe("sub", subject, subject, None)

    async def kv_sub(
        self,
        bucket: str,
        pattern: str = ">",
        since_revision: int | None = None,
        *,
        timeout: float = 10.0,
    ) -> ClientSubscription:
        """`timeout`: for the `ok` (a gateway waits out a NATS failover, NATS_FAILOVER_WAIT)."""
        data: dict[str, Any] = {"pattern": pattern}
        if since_revision is not None:
            data["since_revision"] = since_revision
        return await self._subscribe("kv_sub", bucket, pattern, data, timeout)

    async def js_sub(
        self,
        stream: str,
        filter: str = ">",
        *,
        dedupe: bool = False,
        last_seq: int = 0,
        timeout: float = 10.0,
        **options: Any,
    ) -> ClientSubscription:
        """`options` go to the server (`durable`, `ack`, `start_seq`, …). `dedupe` (client
        side, off by default) makes `get()` drop js_msgs at or below `last_seq`: pass the
        `last_seq` of the subscription a durable is resumed from to drop, across the resume,
        what it had already (a resumed durable sends its unacked messages again)."""
        return await self._subscribe(
            "js_sub",
            stream,
            filter,
            {"filter": filter, **options},
            timeout,
            dedupe=dedupe,
            last_seq=last_seq,
            ack=bool(options.get("ack")),
        )

    async def ping(self) -> None:
        await self.request("ping")

    async def refresh(self, token: str) -> dict[str, Any]:
        """Hand the session a new token; long polling then sends it on every request (the
        old one is revoked by the rotation that issued the new one)."""
        reply = await self.request("refresh", data={"token": token})
        if isinstance(self.ws, PollTransport) and "Authorization" in self.ws.headers:
            self.ws.headers["Authorization"] = f"Bearer {token}"
        return reply

    # ------------------------------------------------------------------ receiving

    async def _read(self) -> None:
        decode = msgspec.json.decode
        try:
            async for frame in self.ws.frames():
                self.frames += 1
                for line in frame.split("\n") if isinstance(frame, str) else [frame]:
                    if line:
                        self._route(decode(line))
        finally:
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(ConnectionError("connection closed"))
            if not self._first.done():
                self._first.set_exception(ConnectionError("closed before cap_update"))

    def _route(self, env: dict[str, Any]) -> None:
        if self.envelopes is not None:
            self.envelopes.put_nowait(env)
        op = env.get("op")
        inbox = env.get("inbox")
        if op in ("ok", "error", "pong") and inbox in self._pending:
            fut = self._pending[inbox]
            if not fut.done():
                fut.set_result(env)
            return
        if op == "cap_update":
            data = env["data"]
            self.user = data["user"]
            self.capabilities = data["capabilities"]
            for r in data.get("revoked", []):
                sub = self.subs.pop(r["inbox"], None)
                if sub:
                    sub.revoked.set()
                # Revoked while being set up: listed here, and never answered with an ok.
                waiting = self._pending.get(r["inbox"])
                if waiting is not None and not waiting.done():
                    waiting.set_exception(RequestError("revoked", "capability revoked"))
            self.cap_updates.put_nowait(env)
            if not self._first.done():
                self._first.set_result(env)
            return
        if op == "ping":
            self._spawn(self._pong(inbox))
            return
        if op == "error":
            sub = self.subs.get(inbox) if inbox else None
            if sub is not None and sub._refused_ack(env):
                return
            if sub is not None:
                sub.error = env
                sub.queue.put_nowait(env)
            self.errors.put_nowait(env)
            return
        if inbox is not None:  # synced marker, js_msg
            sub = self.subs.get(inbox)
            if sub is not None:
                sub.queue.put_nowait(env)
            return
        target = env.get("target", "")
        if op == "sub_msg":
            for sub in self.subs.values():
                if sub.op == "sub" and match(sub.pattern, target):
                    sub.queue.put_nowait(env)
        elif op == "kv_msg":
            key = env["data"].get("key", "")
            for sub in self.subs.values():
                if sub.op == "kv_sub" and sub.target == target and match(sub.pattern, key):
                    sub.queue.put_nowait(env)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _pong(self, inbox: str | None) -> None:
        with contextlib.suppress(ConnectionClosed, ConnectionError, aiohttp.ClientError):
            await self.send({"op": "pong", **({"inbox": inbox} if inbox else {})})
