"""The gateway process: serve WebSockets, own the hub and the NATS connection, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import gc
import logging
import signal
import socket
import struct
import termios
from typing import cast

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from shared import natsio, resources
from shared.errors import Disconnect, Disconnects, ErrorCode, ReplyError
from shared.issuers import Verifiers
from shared.settings import Settings
from ws_gateway import metrics
from ws_gateway.handshake import GatewayConnection, process_request
from ws_gateway.hub import Hub
from ws_gateway.poll import PollServer

log = logging.getLogger("ws_gateway.server")

_OPEN_TCP_STATES = (1, 8)  # TCP_ESTABLISHED, TCP_CLOSE_WAIT (linux/tcp_states.h)
WRITE_HIGH = 1 << 16  # socket buffer above which a client counts as not keeping up


def limit_send_buffer(transport: asyncio.BaseTransport, size: int) -> None:
    """Bound the kernel's send buffer of a client socket: on Linux it otherwise grows to
    4 MiB, which a client that stops reading fills before the write timeout can start."""
    sock = transport.get_extra_info("socket")
    if size > 0 and sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)


class WsTransport:
    """A session's WebSocket: writes without awaiting while the socket buffer has room (what
    websockets.broadcast does), else awaits it; closes with a bounded wait."""

    name = "ws"

    def __init__(self, ws: ServerConnection, remote: str) -> None:
        self._ws = ws
        self._protocol = ws.protocol
        self._transport = ws.transport
        self.remote = remote

    async def send(self, data: bytes) -> None:
        await self._ws.send(data, text=True)

    def can_send(self) -> bool:
        return (
            self._protocol.state is State.OPEN
            and self._transport.get_write_buffer_size() < WRITE_HIGH
        )

    def send_now(self, data: bytes) -> None:
        # websockets frames it: writing a frame built once for a room's sockets ourselves
        # (tried in c22064e) measured 25 % slower at N=1,000 (1.45-1.62M vs 2.0-2.2M msg/s).
        self._protocol.send_text(data)
        self._ws.send_data()

    def buffered(self) -> int:
        return 0  # bounded by WRITE_HIGH and SOCKET_SEND_BUFFER: can_send says when full

    def unacked(self) -> int | None:
        # What asyncio still holds, plus the kernel's unacknowledged bytes (SIOCOUTQ:
        # write_seq - snd_una on Linux). Counted as frame bytes, this over-counts by the
        # frame headers: a durable's floor errs towards sending again, never skipping.
        sock = self._transport.get_extra_info("socket")
        if sock is None or self._transport.is_closing():
            # Closed by the client with a close frame (an orderly TCP close follows): it
            # read everything before it; cut without one, the socket can no longer say.
            return 0 if self._protocol.close_rcvd is not None else None
        try:
            raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
            # Read after the count: a reset purges the queue (a count of 0 that means
            # nothing) and moves the state past these two, never back.
            state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
        except OSError:
            return None
        if state not in _OPEN_TCP_STATES:
            return None
        return int(struct.unpack("i", raw)[0]) + self._transport.get_write_buffer_size()

    def ping(self) -> None:
        # A WebSocket ping from the hub's clock, instead of websockets' keepalive task per
        # connection; a client that stops answering is closed by the session's heartbeat.
        if self._protocol.state is State.OPEN:
            self._protocol.send_ping(b"")
            self._ws.send_data()

    async def close(self, code: int, reason: str) -> None:
        try:
            async with asyncio.timeout(1.0):
                await self._ws.close(code, reason[:120])
        except TimeoutError:
            self._transport.abort()


class Gateway:
    """One gateway: `async with Gateway(settings, port=0) as gw:` in tests, `run()` in prod."""

    def __init__(
        self,
        settings: Settings,
        host: str | None = None,
        port: int | None = None,
        poll_port: int | None = None,
    ):
        self.settings = settings
        self.host = host or settings.host
        self.port = settings.gateway_port if port is None else port
        if poll_port is None:
            # gateway i of the group gets poll port i; port 0 (tests) gets any free one
            poll_port = settings.poll_port + (self.port - settings.gateway_port) if port else 0
        self.poll_port = poll_port
        self.poll: PollServer | None = None
        self.hub: Hub | None = None
        self.server: Server | None = None

    async def start(self) -> None:
        res = resources.load_or_exit(self.settings)
        verifier = Verifiers.from_settings(self.settings, res)

        async def on_disconnect() -> None:
            if self.hub:
                await self.hub.on_disconnect()

        async def on_reconnect() -> None:
            metrics.NATS_RECONNECTS.inc()
            if self.hub:
                await self.hub.on_reconnect()

        nc = await natsio.connect(
            self.settings,
            f"ws_gateway:{self.port}",
            on_disconnect=on_disconnect,
            on_reconnect=on_reconnect,
        )
        self.hub = Hub(self.settings, nc, verifier)
        await self.hub.start()
        self.server = await serve(
            self._handler,
            self.host,
            self.port,
            process_request=functools.partial(process_request, self.hub),
            create_connection=GatewayConnection,
            compression=None,  # compressing secrets beside attacker-chosen data leaks them
            max_size=self.settings.max_frame_bytes,
            max_queue=16,
            ping_interval=None,  # the hub's clock pings every connection (Session.tick)
            ping_timeout=None,
            close_timeout=2,
            write_limit=WRITE_HIGH,
            server_header=None,
        )
        sock = next(iter(self.server.sockets))
        self.port = sock.getsockname()[1]
        self.poll = PollServer(self.hub)
        await self.poll.start(self.host, self.poll_port)
        self.poll_port = self.poll.port
        log.info(
            "gateway listening",
            extra={"host": self.host, "port": self.port, "poll_port": self.poll_port},
        )

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}/ws"

    @property
    def poll_url(self) -> str:
        return f"http://{self.host}:{self.poll_port}/poll"

    async def _handler(self, ws: ServerConnection) -> None:
        admitted = cast(GatewayConnection, ws).admitted
        assert self.hub is not None and admitted is not None
        limit_send_buffer(ws.transport, self.settings.socket_send_buffer)
        remote = ws.request.headers.get("X-Real-IP") if ws.request else None
        # The handshake's request and response (headers, cookies, the token) are not
        # needed past this point; an idle connection should not keep ~2.5 KB of them.
        # (websockets keeps `request` itself as its handshake-done marker.)
        if ws.request is not None:
            ws.request.headers.clear()
        ws.response = None
        transport = WsTransport(
            ws, remote or str(ws.remote_address[0] if ws.remote_address else "")
        )
        session = await self.hub.open(admitted.claims, admitted.user, transport)
        disconnect = Disconnects.CLIENT_CLOSED
        try:
            async for frame in ws:
                if session.closed:
                    break
                if isinstance(frame, bytes):
                    session.refuse_frame(ReplyError(ErrorCode.BAD_REQUEST, "text frames only"))
                else:
                    await session.handle_frame(frame)
                if session.closed:
                    break
        except ConnectionClosed as e:
            if e.rcvd is not None:
                disconnect = Disconnect(e.rcvd.code, e.rcvd.reason or "client closed")
        finally:
            if ws.close_code is not None and not session.closed and ws.close_code != 1000:
                disconnect = Disconnect(ws.close_code, disconnect.reason)
            await session.close(disconnect)

    async def stop(self) -> None:
        """Stop accepting, close every client with 1001, drain NATS."""
        if self.server is not None:
            self.server.close(close_connections=False)
        if self.poll is not None:
            await self.poll.stop()
        if self.hub is not None:
            closing = [s.close(Disconnects.SHUTDOWN) for s in list(self.hub.sessions)]
            if closing:
                await asyncio.gather(*closing, return_exceptions=True)
        if self.server is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    await self.server.wait_closed()
        if self.hub is not None:
            await self.hub.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await self.hub.nc.drain()
            if not self.hub.nc.is_closed:
                await self.hub.nc.close()

    async def __aenter__(self) -> Gateway:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def run(
    settings: Settings, host: str | None, port: int | None, poll_port: int | None = None
) -> None:
    gateway = Gateway(settings, host, port, poll_port)
    await gateway.start()
    # Fan-out allocates in bursts (a frame per connection per tick); the default gen-0
    # threshold of 700 runs a collection several times per burst, over every live
    # connection object. Startup objects are frozen out of collection for good, and
    # collections run ~10x less often: the latency tail comes mostly from these pauses.
    gc.freeze()
    gc.set_threshold(7000, 20, 50)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    try:
        async with asyncio.timeout(4.5):
            await gateway.stop()
    except TimeoutError:
        log.warning("shutdown timed out")
