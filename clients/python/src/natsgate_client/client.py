"""The client: one logical session over many connections.

It connects (WebSocket or long polling), waits for the first `cap_update`, makes every
subscription again with its resume point (docs/protocol.md, "After a reconnect"), keeps
the token fresh, and on a loss reconnects with exponential backoff and jitter until the
server says the end is final (close 1002, 4403; 4401 or HTTP 401 with no token provider;
HTTP 403) or `close()` is called.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import re
import time
from collections.abc import Callable, Coroutine
from typing import Any, Literal, TypeVar

import aiohttp
import msgspec
from websockets.exceptions import ConnectionClosed

from natsgate_client.errors import (
    ClientClosed,
    ConnectionLost,
    HandshakeRefused,
    LoginError,
    NatsgateError,
    RequestError,
    SubscriptionEnded,
)
from natsgate_client.events import (
    CapabilitiesChanged,
    Connected,
    Disconnected,
    Event,
    Resubscribed,
    ServerError,
    State,
    StateChanged,
    SubscriptionClosed,
    TokenRefreshed,
    TokenRefreshFailed,
)
from natsgate_client.messages import (
    CapUpdateFrame,
    ErrorData,
    ErrorFrame,
    JsMsgFrame,
    KvMsgFrame,
    Message,
    OkFrame,
    PingFrame,
    PongFrame,
    Request,
    ServerFrame,
    SubMsgFrame,
    decode_frame,
    encode_request,
)
from natsgate_client.presence import PRESENCE_BUCKET, Presence
from natsgate_client.subscription import (
    CoreSubscription,
    KvSubscription,
    StreamSubscription,
    Subscription,
    match,
)
from natsgate_client.tokens import TokenProvider, refresh_at, token_times
from natsgate_client.transport import Transport, open_transport, refused_status

log = logging.getLogger("natsgate_client")

E = TypeVar("E", bound=Event)
S = TypeVar("S", bound=Subscription[Any])

FINAL_CODES = frozenset({1002, 4403})  # reconnecting cannot help (docs/protocol.md, close codes)
_ACK_REFUSED = re.compile(r"seq (\d+) is not awaiting an ack")
_SEND_ERRORS = (ConnectionClosed, ConnectionError, aiohttp.ClientError)


def backoff(attempt: int, base: float, cap: float) -> float:
    """Exponential, capped, with jitter (half to all of it): clients that lost the same
    gateway do not all come back at the same instant."""
    delay = min(cap, base * 2 ** max(0, attempt - 1))
    return random.uniform(delay / 2, delay)


def gateway_url(url: str, transport: Literal["websocket", "polling"]) -> str:
    """The gateway endpoint: a `ws(s)://…` or `…/poll` URL as it is; a site's base URL
    (`https://app.example`) becomes `wss://app.example/ws` or `https://app.example/poll`."""
    if url.startswith(("ws://", "wss://")) or url.rstrip("/").endswith("/poll"):
        return url
    base = url.rstrip("/")
    if transport == "polling":
        return f"{base}/poll"
    return "ws" + base.removeprefix("http") + "/ws"


class Client:
    """A natsgate client. `token`: a JWT, or a token provider (`async () -> str`, e.g.
    `PasswordLogin`) called for the first connection, before the token expires (the new
    one is handed to the live session with `refresh`), and on a reconnect after the token
    was refused or is near its expiry.

        async with Client("https://app.example", PasswordLogin(...)) as client:
            async for msg in await client.sub("chat.room.1"):
                ...
    """

    def __init__(
        self,
        url: str,
        token: str | TokenProvider | None = None,
        *,
        transport: Literal["websocket", "polling"] = "websocket",
        headers: dict[str, str] | None = None,
        queue_size: int = 1000,
        open_timeout: float = 10.0,
        request_timeout: float = 10.0,
        backoff_base: float = 0.2,
        backoff_max: float = 20.0,
    ) -> None:
        self.url = gateway_url(url, transport)
        self._provider: TokenProvider | None = None if isinstance(token, str | None) else token
        self._token: str | None = token if isinstance(token, str) else None
        self._headers = dict(headers or {})
        self.queue_size, self.open_timeout, self.request_timeout = (
            queue_size,
            open_timeout,
            request_timeout,
        )
        self._backoff = (backoff_base, backoff_max)
        self.state = State.DISCONNECTED
        self.user: str | None = None
        self.capabilities: dict[str, Any] = {}
        self.closed: ClientClosed | None = None  # why it is CLOSED
        self._subs: dict[str, Subscription[Any]] = {}
        self._pending: dict[str, asyncio.Future[OkFrame | ErrorFrame | PongFrame]] = {}
        self._listeners: list[Callable[[Event], None]] = []
        self._ids = itertools.count(1)
        self._gen = 0
        self._transport: Transport | None = None
        self._connected = asyncio.Event()
        self._state_changed = asyncio.Event()
        self._send_lock = asyncio.Lock()
        self._runner: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        self._need_token = True
        self._last_error: ServerError | None = None

    # ------------------------------------------------------------------ lifecycle

    async def connect(self, timeout: float = 30.0) -> Client:
        """Start, and wait for the first session (retrying with backoff meanwhile). Raises
        ClientClosed when refused for good, TimeoutError (and closes) after `timeout`."""
        if self._runner is None:
            self._runner = asyncio.get_running_loop().create_task(self._run())
        try:
            await self.wait_state(State.CONNECTED, timeout)
        except BaseException:
            await self.close()
            raise
        return self

    async def __aenter__(self) -> Client:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close for good (close code 1000); every subscription's iteration stops."""
        if self._closing:
            return
        self._closing = True
        if self._transport is not None:
            with contextlib.suppress(*_SEND_ERRORS, TimeoutError):
                async with asyncio.timeout(self.open_timeout):
                    await self._transport.close()
        await _cancel_and_wait(self._runner)
        for task in list(self._tasks):
            await _cancel_and_wait(task)
        self._set_closed(ClientClosed("closed by the client", 1000), "client_closed")

    async def wait_state(self, state: State, timeout: float | None = None) -> None:
        """Until the client is in `state`; ClientClosed if it closes first."""
        async with asyncio.timeout(timeout):
            while self.state != state:
                if self.state == State.CLOSED:
                    assert self.closed is not None
                    raise self.closed
                self._state_changed.clear()
                await self._state_changed.wait()

    # ------------------------------------------------------------------ events

    def on(self, listener: Callable[[Event], None]) -> Callable[[], None]:
        """Call `listener` with every event (see events.py); returns its remover."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def expect(
        self, kind: type[E], predicate: Callable[[E], bool] = lambda _: True
    ) -> asyncio.Future[E]:
        """A future of the next event of type `kind` that `predicate` accepts: armed now,
        before the action that causes it (no task; cancelling it disarms it)."""
        fut: asyncio.Future[E] = asyncio.get_running_loop().create_future()

        def listener(ev: Event) -> None:
            if isinstance(ev, kind) and not fut.done() and predicate(ev):
                fut.set_result(ev)

        remove = self.on(listener)
        fut.add_done_callback(lambda _: remove())
        return fut

    async def wait_for(
        self,
        kind: type[E],
        predicate: Callable[[E], bool] = lambda _: True,
        timeout: float | None = None,
    ) -> E:
        """The next event of type `kind` (that `predicate` accepts)."""
        fut = self.expect(kind, predicate)
        try:
            async with asyncio.timeout(timeout):
                return await fut
        finally:
            fut.cancel()

    def _emit(self, event: Event) -> None:
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:
                log.exception("event listener failed")

    def _set_state(self, new: State) -> None:
        old, self.state = self.state, new
        if old != new:
            self._state_changed.set()
            self._emit(StateChanged(old, new))

    # ------------------------------------------------------------------ subscribing

    async def sub(
        self, subject: str, *, presence: bool = False, queue_size: int | None = None
    ) -> CoreSubscription:
        """A core subscription (a subject or pattern). At-most-once: what is published
        while the client is disconnected is not delivered. `presence`: announce this
        connection on the (literal) subject while the subscription lasts, made again on
        each reconnect (docs/protocol.md, "Presence")."""
        sub = CoreSubscription(self, subject, subject, self._inbox(), queue_size or self.queue_size)
        sub.presence = presence
        return await self._subscribe(sub)

    async def presence(self, subject: str, *, queue_size: int | None = None) -> Presence:
        """Who is on `subject` (announced by `sub(subject, presence=True)` anywhere): a
        kv_sub of bucket `presence`, one member per user however many connections, with
        `Joined` and `Left` events."""
        return Presence(await self.kv_sub(PRESENCE_BUCKET, f"{subject}.*.*", queue_size=queue_size))

    async def kv_sub(
        self,
        bucket: str,
        pattern: str = ">",
        *,
        since_revision: int | None = None,
        queue_size: int | None = None,
    ) -> KvSubscription:
        """Watch a KV bucket: every current value (with `since_revision`: only the keys
        changed since, when the server still has them), `KvSynced`, then each change;
        resumed after a reconnect from the last revision seen."""
        sub = KvSubscription(self, bucket, pattern, self._inbox(), queue_size or self.queue_size)
        sub.revision = since_revision
        return await self._subscribe(sub)

    async def js_sub(
        self,
        stream: str,
        filter: str = ">",
        *,
        start_seq: int | None = None,
        time_delta: float | None = None,
        start_time: str | None = None,
        durable: str | None = None,
        ack: bool = False,
        batch: int | None = None,
        queue_size: int | None = None,
    ) -> StreamSubscription:
        """Read a stream from a start point (default: new messages only), then live;
        resumed after a reconnect at the last seq + 1 (a durable: by its name)."""
        options: dict[str, Any] = {
            k: v
            for k, v in (
                ("start_seq", start_seq),
                ("time_delta", time_delta),
                ("start_time", start_time),
                ("durable", durable),
                ("batch", batch),
            )
            if v is not None
        }
        if ack:
            options["ack"] = True
        return await self._subscribe(
            StreamSubscription(
                self, stream, filter, self._inbox(), queue_size or self.queue_size, options
            )
        )

    async def _subscribe(self, sub: S) -> S:
        if self.closed is not None:
            raise self.closed
        self._subs[sub.inbox] = sub
        try:
            async with asyncio.timeout(self.request_timeout):
                if self.state == State.CONNECTED:
                    await self._activate(sub, self._gen)
                # else: the next session makes it (with every other subscription)
                await asyncio.shield(sub._first_ok)
        except TimeoutError:
            self._end(sub, "timeout", "no reply", quiet=True)
            raise
        return sub

    async def _activate(self, sub: Subscription[Any], gen: int) -> None:
        """Make `sub` on session `gen` (its first time, or again with its resume point)."""
        if sub._gen == gen or sub.ended is not None:
            return
        sub._gen = gen
        try:
            await self._request(sub.kind, sub.target, sub._request_data(), inbox=sub.inbox)
        except RequestError as e:
            self._end(sub, e.code, e.reason, first=sub._ok_count == 0)
        except (ConnectionLost, TimeoutError):
            pass  # the session is going: the next one makes it again

    async def _unsub(self, sub: Subscription[Any], data: dict[str, Any]) -> None:
        if sub.ended is None and self.state == State.CONNECTED:
            with contextlib.suppress(ConnectionLost):
                await self._request("unsub", sub.target, data or None, inbox=sub.inbox)
        self._end(sub, "unsubscribed", quiet=True)

    def _end(
        self,
        sub: Subscription[Any],
        reason: str,
        detail: str = "",
        *,
        quiet: bool = False,
        first: bool = False,
    ) -> None:
        """End `sub` here (the server has, or is told to); an overflow also tells it."""
        if self._subs.get(sub.inbox) is sub:
            del self._subs[sub.inbox]
        if sub.ended is not None:
            return
        if first:  # refused at once: the caller gets the error, no event
            sub._finish(SubscriptionEnded(reason, detail), RequestError(reason, detail))
            return
        sub._finish(SubscriptionEnded(reason, detail))
        if reason == "overflow" and self.state == State.CONNECTED:
            self._spawn(self._unsub_quietly(sub.inbox, sub.target))
        if not quiet:
            self._emit(SubscriptionClosed(sub.inbox, sub.kind, sub.target, reason, detail))

    async def _unsub_quietly(self, inbox: str, target: str) -> None:
        with contextlib.suppress(NatsgateError, TimeoutError):
            await self._request("unsub", target, inbox=inbox)

    async def _ack(self, sub: StreamSubscription, seq: int) -> None:
        await self._send(Request("ack", sub.inbox, sub.target, {"seq": seq}))

    async def _ack_quietly(self, sub: StreamSubscription, seq: int) -> None:
        with contextlib.suppress(NatsgateError):
            await self._ack(sub, seq)

    # ------------------------------------------------------------------ requests

    def _inbox(self) -> str:
        return f"c{next(self._ids)}"

    async def _send(self, req: Request) -> None:
        transport = self._transport
        if transport is None or self.state != State.CONNECTED:
            raise ConnectionLost("not connected")
        async with self._send_lock:  # one at a time: long polling keeps them in order
            try:
                await transport.send(encode_request(req).decode())
            except _SEND_ERRORS as e:
                raise ConnectionLost(str(e)) from e

    async def _request(
        self, op: str, target: str | None = None, data: Any = None, *, inbox: str | None = None
    ) -> OkFrame:
        inbox = inbox or self._inbox()
        fut: asyncio.Future[OkFrame | ErrorFrame | PongFrame]
        fut = asyncio.get_running_loop().create_future()
        self._pending[inbox] = fut
        try:
            await self._send(Request(op, inbox, target, data))
            async with asyncio.timeout(self.request_timeout):
                reply = await fut
        finally:
            if self._pending.get(inbox) is fut:
                del self._pending[inbox]
        if isinstance(reply, ErrorFrame):
            raise RequestError(reply.data.code, reply.data.reason)
        return reply if isinstance(reply, OkFrame) else OkFrame(inbox=reply.inbox)

    async def ping(self) -> None:
        """A round trip to the gateway (its `pong`)."""
        await self._request("ping")

    # ------------------------------------------------------------------ the connection loop

    async def _run(self) -> None:
        attempt = 0
        while not self._closing:
            self._set_state(State.CONNECTING)
            code: int | None = None
            reason = ""
            opened = False
            try:
                token = await self._token_for_connect()
                headers = dict(self._headers)
                if token:
                    headers["Authorization"] = f"Bearer {token}"
                transport = await open_transport(self.url, headers, self.open_timeout)
            except Exception as e:
                status = refused_status(e)
                final = self._final_refusal(e, status)
                if final is not None:
                    self._set_closed(final, "closed")
                    return
                if status == 401:
                    self._need_token = True
                reason = str(HandshakeRefused(status)) if status else f"{type(e).__name__}: {e}"
            else:
                code, reason, opened = await self._session(transport, attempt)
                if self._closing:
                    return
                if code in FINAL_CODES or (code == 4401 and self._provider is None):
                    self._emit(Disconnected(code, reason, False))
                    self._set_closed(ClientClosed(reason or "closed by the server", code), "closed")
                    return
                if code == 4401:
                    self._need_token = True
            attempt = 1 if opened else attempt + 1
            delay = backoff(attempt, *self._backoff)
            self._set_state(State.DISCONNECTED)
            self._emit(Disconnected(code, reason, True, delay))
            await asyncio.sleep(delay)  # the backoff itself

    def _final_refusal(self, e: Exception, status: int | None) -> ClientClosed | None:
        if status == 403 or (status == 401 and self._provider is None):
            return ClientClosed(str(HandshakeRefused(status)), status)
        if isinstance(e, LoginError) and e.status in (400, 401, 403):
            return ClientClosed(f"token provider refused: {e}", e.status)
        return None

    async def _token_for_connect(self) -> str | None:
        if self._provider is None:
            return self._token
        at = refresh_at(self._token) if self._token else None
        if self._need_token or self._token is None or (at is not None and time.time() >= at):
            self._token = await self._provider()
            self._need_token = False
        return self._token

    async def _session(self, transport: Transport, attempt: int) -> tuple[int | None, str, bool]:
        """Run one session until its transport ends: (close code, reason, opened)."""
        self._gen += 1
        gen = self._gen
        self._transport = transport
        self._last_error = None
        first: asyncio.Future[CapUpdateFrame] = asyncio.get_running_loop().create_future()
        loop = asyncio.get_running_loop()
        reader = loop.create_task(self._read(transport, first, gen))
        helpers: list[asyncio.Task[None]] = []
        opened = False
        try:
            async with asyncio.timeout(self.open_timeout):
                waits: set[asyncio.Future[Any]] = {reader, first}
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            if first.done() and not first.cancelled():
                opened = True
                cap = first.result().data
                self.user, self.capabilities = cap.user, cap.capabilities
                self._set_state(State.CONNECTED)
                self._connected.set()
                self._emit(Connected(transport.name, cap.user, attempt))
                helpers.append(loop.create_task(self._resubscribe_all(gen)))
                helpers.append(loop.create_task(self._refresh_loop(transport)))
                await reader
        except TimeoutError:
            pass  # no cap_update in time: counted as a failed attempt
        finally:
            self._connected.clear()
            if self.state == State.CONNECTED and not self._closing:
                self._set_state(State.DISCONNECTED)
            for task in helpers:
                await _cancel_and_wait(task)
            with contextlib.suppress(Exception):
                await transport.close()
            await _cancel_and_wait(reader)
            if not first.done():
                first.cancel()
            self._transport = None
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(ConnectionLost("connection closed"))
        reason = self._last_error.reason if self._last_error else ""
        if self._last_error and not reason:
            reason = self._last_error.code
        return transport.close_code, reason, opened

    async def _resubscribe_all(self, gen: int) -> None:
        await asyncio.gather(*(self._activate(s, gen) for s in list(self._subs.values())))

    async def _refresh_loop(self, transport: Transport) -> None:
        """Hand the session a new token before the current one expires."""
        provider = self._provider
        while provider is not None and self._token is not None:
            at = refresh_at(self._token)
            if at is None:
                return
            await asyncio.sleep(max(0.0, at - time.time()))  # until the refresh is due
            try:
                token = await provider()
                reply = await self._request("refresh", data={"token": token})
            except (NatsgateError, aiohttp.ClientError, OSError, TimeoutError) as e:
                self._emit(TokenRefreshFailed(f"{type(e).__name__}: {e}"))
                exp, _ = token_times(self._token)
                if exp is not None and time.time() >= exp:
                    return  # the server closes 4401 now; the reconnect asks again
                await asyncio.sleep(1.0)  # a pause before trying again
                continue
            self._token = token
            transport.set_token(token)
            self._emit(TokenRefreshed(reply.data.exp or int(token_times(token)[0] or 0)))

    async def _read(
        self, transport: Transport, first: asyncio.Future[CapUpdateFrame], gen: int
    ) -> None:
        async for frame in transport.frames():
            lines = frame.split("\n") if isinstance(frame, str) else frame.split(b"\n")
            for line in lines:
                if not line:
                    continue
                try:
                    env = decode_frame(line)
                except msgspec.DecodeError:
                    log.warning("skipped a frame this client does not know")
                    continue
                self._route(env, first, gen)

    def _route(self, env: ServerFrame, first: asyncio.Future[CapUpdateFrame], gen: int) -> None:
        if isinstance(env, JsMsgFrame):
            sub = self._subs.get(env.inbox)
            if isinstance(sub, StreamSubscription) and sub._live_gen == gen:
                sub._on_msg(env)
        elif isinstance(env, KvMsgFrame):
            self._route_kv(env, gen)
        elif isinstance(env, SubMsgFrame):
            msg: Message | None = None
            for sub in self._subs.values():
                if isinstance(sub, CoreSubscription) and sub._live_gen == gen:
                    if match(sub.pattern, env.target):
                        msg = msg or Message.of(env)
                        sub._push(msg)
        elif isinstance(env, OkFrame | PongFrame):
            self._reply(env, gen)
        elif isinstance(env, ErrorFrame):
            self._route_error(env, gen)
        elif isinstance(env, CapUpdateFrame):
            self._route_cap(env, first)
        elif isinstance(env, PingFrame):
            self._spawn(self._pong(env.inbox))

    def _reply(self, env: OkFrame | PongFrame, gen: int) -> None:
        inbox = env.inbox or ""
        fut = self._pending.get(inbox)
        if fut is None or fut.done():
            return
        sub = self._subs.get(inbox)
        if isinstance(env, OkFrame) and sub is not None and sub._gen == gen:
            # Here, not in the waiting task: the subscription's first data follows its ok
            # in the same read, and must find it live.
            resumed = sub._ok_count > 0
            sub._live_gen = gen
            sub._on_ok(env.data)
            if resumed:
                self._emit(
                    Resubscribed(sub.inbox, sub.kind, sub.target, sub.position, sub.recovered)
                )
        fut.set_result(env)

    def _route_kv(self, env: KvMsgFrame, gen: int) -> None:
        if env.data.op == "synced":
            sub = self._subs.get(env.inbox or "")
            if isinstance(sub, KvSubscription) and sub._live_gen == gen:
                sub._on_synced(env.data.revision)
            return
        for sub in list(self._subs.values()):
            if (
                isinstance(sub, KvSubscription)
                and sub._live_gen == gen
                and sub.target == env.target
                and match(sub.pattern, env.data.key)
            ):
                sub._on_change(env)

    def _route_error(self, env: ErrorFrame, gen: int) -> None:
        inbox, code, reason = env.inbox, env.data.code, env.data.reason
        fut = self._pending.get(inbox or "")
        if fut is not None and not fut.done():
            fut.set_result(env)
            return
        sub = self._subs.get(inbox or "")
        if sub is not None:
            m = _ACK_REFUSED.fullmatch(reason)
            if code == "not_found" and m is not None:
                return  # an ack of a resent message, acked already: nothing ended
            self._end(sub, code, reason)
            return
        self._last_error = ServerError(code, reason)
        self._emit(self._last_error)

    def _route_cap(self, env: CapUpdateFrame, first: asyncio.Future[CapUpdateFrame]) -> None:
        if not first.done():
            first.set_result(env)
            return
        self.user, self.capabilities = env.data.user, env.data.capabilities
        self._emit(CapabilitiesChanged(env.data.capabilities, env.data.revoked))
        for ref in env.data.revoked:
            fut = self._pending.get(ref.inbox)
            if fut is not None and not fut.done():
                # Revoked while being made: this is its answer (no ok will come).
                fut.set_result(ErrorFrame(ErrorData("revoked", "capability revoked")))
            sub = self._subs.get(ref.inbox)
            if sub is not None:
                self._end(sub, "revoked", "capability revoked")

    async def _pong(self, inbox: str | None) -> None:
        with contextlib.suppress(ConnectionLost):
            await self._send(Request("pong", inbox))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _set_closed(self, why: ClientClosed, sub_reason: str) -> None:
        if self.closed is None:
            self.closed = why
        for sub in list(self._subs.values()):
            self._end(sub, sub_reason, str(why), quiet=sub_reason == "client_closed")
        self._set_state(State.CLOSED)


async def _cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel a task this client owns and wait until it has finished (its outcome dropped);
    the caller's own cancellation still propagates."""
    if task is None or task is asyncio.current_task() or task.done():
        return
    task.cancel()
    await asyncio.wait({task})
    if not task.cancelled():
        task.exception()
