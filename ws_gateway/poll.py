"""The long-polling fallback: the same Session over plain HTTP (PROTOCOL.md, Fallback).

websockets' HTTP layer only takes body-less GETs, so the gateway process serves `/poll`
from a second listener (aiohttp) on `poll_port`, beside `/ws`; both share the process's
hub, so a polling session is an ordinary Session with another transport.

    POST /poll/open?sid=S        open (cookie + Origin, or bearer); S chosen by the client
    POST /poll/send?sid=S        body: client envelopes, one per line
    GET  /poll?sid=S&after=N     frames after N (acknowledges ≤ N); waits up to 25 s
    POST /poll/close?sid=S       close (1000)

Frames are numbered; a response carries `Poll-Last-Frame` and the envelopes of every
frame after `after`, one per line, so a lost response is fetched again, never lost. A
session is bound to this process: nginx routes on `sid` (consistent hash), and a request
that reaches another process gets 404 `unknown_session`; the client reopens and resumes.
"""

from __future__ import annotations

import asyncio
import collections
import http
import logging
import re
import time

from aiohttp import web
from websockets.datastructures import Headers

from shared.errors import Disconnects, InvalidToken
from shared.tasks import cancel_and_wait
from ws_gateway.handshake import Refused, admit, token_from
from ws_gateway.hub import Hub
from ws_gateway.outbox import SlowTransport
from ws_gateway.session import Session

log = logging.getLogger("ws_gateway.poll")

SID_RE = re.compile(r"^[A-Za-z0-9_-]{16,64}\Z")
POLL_WAIT = 25.0
IDLE_CLOSE = 60.0  # nobody polled for this long: the session is closed
GONE_KEEP = 60.0  # a closed session's last frames and close code stay fetchable
MAX_BUFFER_BYTES = 1 << 20
MAX_SEND_BYTES = 64 * 1024


def _headers(request: web.Request) -> Headers:
    return Headers(list(request.headers.items()))


def _problem(status: int, code: str, detail: str, **extra: object) -> web.Response:
    return web.json_response(
        {
            "type": "about:blank",
            "title": http.HTTPStatus(status).phrase,
            "status": status,
            "code": code,
            "detail": detail,
            **extra,
        },
        status=status,
        content_type="application/problem+json",
    )


class PollTransport:
    """Numbered frames waiting for the client; the Session writes here via its Outbox.
    A poll buffer never blocks: the flusher writes it directly (a full buffer raises
    SlowTransport: backpressure), so no writer task waits per session."""

    name = "poll"

    def __init__(self, sid: str, uid: str, remote: str) -> None:
        self.sid, self.uid, self.remote = sid, uid, remote
        self.frames: collections.deque[tuple[int, bytes]] = collections.deque()
        self.size = 0
        self.next_no = 1
        self.new = asyncio.Event()
        self.close_code: int | None = None
        self.close_reason = ""
        self.last_poll = time.monotonic()
        self.session: Session | None = None
        self.closed_at: float | None = None

    async def send(self, data: bytes) -> None:
        self.send_now(data)

    def can_send(self) -> bool:
        return True

    def send_now(self, data: bytes) -> None:
        if self.size + len(data) > MAX_BUFFER_BYTES:
            raise SlowTransport("poll buffer full: the client is not polling")
        self.frames.append((self.next_no, data))
        self.next_no += 1
        self.size += len(data)
        self.new.set()

    async def close(self, code: int, reason: str) -> None:
        if self.close_code is None:
            self.close_code, self.close_reason = code, reason
            self.closed_at = time.monotonic()
        self.new.set()

    def ack(self, after: int) -> None:
        while self.frames and self.frames[0][0] <= after:
            _, data = self.frames.popleft()
            self.size -= len(data)


class PollServer:
    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.transports: dict[str, PollTransport] = {}
        self.app = web.Application(client_max_size=MAX_SEND_BYTES)
        self.app.router.add_post("/poll/open", self.open)
        self.app.router.add_post("/poll/send", self.send)
        self.app.router.add_get("/poll", self.receive)
        self.app.router.add_post("/poll/close", self.close)
        self._runner: web.AppRunner | None = None
        self._reaper: asyncio.Task[None] | None = None
        self.port = 0

    async def start(self, host: str, port: int) -> None:
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        server = site._server
        assert server is not None and server.sockets  # type: ignore[attr-defined]
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        self._reaper = asyncio.get_running_loop().create_task(self._reap())

    async def stop(self) -> None:
        await cancel_and_wait(self._reaper)
        for t in list(self.transports.values()):
            if t.session is not None:
                await t.session.close(Disconnects.SHUTDOWN)
        if self._runner:
            await self._runner.cleanup()

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(5)
            now = time.monotonic()
            for sid, t in list(self.transports.items()):
                if t.closed_at is not None and now - t.closed_at > GONE_KEEP:
                    del self.transports[sid]
                elif t.closed_at is None and now - t.last_poll > IDLE_CLOSE and t.session:
                    t.session.close(Disconnects.POLL_IDLE)

    # ------------------------------------------------------------------ helpers

    def _auth_token(self, request: web.Request) -> str:
        # Cookie-authenticated requests must carry an allowed Origin, as on the upgrade.
        # Browsers send no Origin on a same-origin GET (the poll itself); there the
        # fetch metadata header, which no page can set, says the page is of this origin.
        headers = _headers(request)
        if (
            "Origin" not in headers
            and "Authorization" not in headers
            and headers.get("Sec-Fetch-Site") == "same-origin"
        ):
            token = request.cookies.get("session")
            if token:
                return token
        return token_from(headers, self.hub.settings.allowed_origins)

    def _transport(self, request: web.Request) -> PollTransport | web.Response:
        sid = request.query.get("sid", "")
        t = self.transports.get(sid)
        if t is None:
            return _problem(404, "unknown_session", "no such session here: reopen and resume")
        try:
            claims = self.hub.verifier.verify(self._auth_token(request))
        except Refused as e:
            return _problem(e.status.value, "unauthorized", e.reason)
        except InvalidToken as e:
            return _problem(401, "unauthorized", str(e))
        if claims.sub != t.uid:
            return _problem(404, "unknown_session", "no such session here: reopen and resume")
        return t

    # ------------------------------------------------------------------ routes

    async def open(self, request: web.Request) -> web.StreamResponse:
        sid = request.query.get("sid", "")
        if not SID_RE.match(sid):
            return _problem(400, "bad_request", "sid: 16-64 characters of [A-Za-z0-9_-]")
        if sid in self.transports:
            return _problem(409, "bad_request", "sid in use: choose another")
        try:
            admitted = await admit(self.hub, _headers(request))
        except Refused as e:
            return _problem(e.status.value, "unauthorized", e.reason)
        if sid in self.transports:  # taken while this one was being admitted
            return _problem(409, "bad_request", "sid in use: choose another")
        remote = request.headers.get("X-Real-IP") or (request.remote or "")
        t = PollTransport(sid, admitted.claims.sub, remote)
        self.transports[sid] = t
        t.session = await self.hub.open(admitted.claims, admitted.user, t)
        return web.json_response({"sid": sid, "wait": POLL_WAIT})

    async def send(self, request: web.Request) -> web.StreamResponse:
        t = self._transport(request)
        if isinstance(t, web.Response):
            return t
        if t.session is None or t.close_code is not None:
            return _problem(410, "closed", t.close_reason, close_code=t.close_code)
        body = await request.read()
        t.last_poll = time.monotonic()
        lines = [line.decode("utf-8", "replace") for line in body.split(b"\n") if line.strip()]
        # Handled in order after those of any other /poll/send of this session still in
        # hand: a request never overtakes one sent before it (an unsub its kv_sub).
        await t.session.handle_frames(lines)
        return web.Response(status=204)

    async def receive(self, request: web.Request) -> web.StreamResponse:
        t = self._transport(request)
        if isinstance(t, web.Response):
            return t
        try:
            after = int(request.query.get("after", "0"))
            wait = min(float(request.query.get("wait", POLL_WAIT)), POLL_WAIT)
        except ValueError:
            return _problem(400, "bad_request", "after and wait are numbers")
        t.last_poll = time.monotonic()
        if t.session is not None:
            t.session.touch()  # a polling client is alive even between its pongs
        t.ack(after)
        if not t.frames and t.close_code is None:
            t.new.clear()
            try:
                async with asyncio.timeout(max(wait, 0.0)):
                    await t.new.wait()
            except TimeoutError:
                pass
        t.last_poll = time.monotonic()
        if not t.frames and t.close_code is not None:
            return _problem(410, "closed", t.close_reason, close_code=t.close_code)
        last = t.frames[-1][0] if t.frames else after
        body = b"\n".join(data for _, data in t.frames)
        return web.Response(
            body=body,
            content_type="application/x-ndjson",
            headers={"Poll-Last-Frame": str(last), "Cache-Control": "no-store"},
        )

    async def close(self, request: web.Request) -> web.StreamResponse:
        t = self._transport(request)
        if isinstance(t, web.Response):
            return t
        if t.session is not None:
            await t.session.close(Disconnects.CLIENT_CLOSED)
        return web.Response(status=204)
