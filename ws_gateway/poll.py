"""The long-polling fallback: the same Session over HTTP (docs/protocol.md, "Fallback transport").

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

Every request checks its token as an upgrade does (signature, expiry, revocation by id or
by the user's mark) before the sid is looked up, and the sid must be the token's user's.
Bounds: a session's buffer holds at most MAX_BUFFER_BYTES (then `backpressure`); a closed
session stays fetchable for GONE_KEEP, but at most `poll_closed_keep_max` of them and
`poll_closed_keep_bytes` of their buffers per process (the oldest closed are dropped first,
their sid then answers 404). Concurrent GETs of one buffer share one body, built once.
"""

from __future__ import annotations

import asyncio
import collections
import http
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from websockets.datastructures import Headers

from shared import logs
from shared.auth import session_cookie_name
from shared.errors import Disconnects, InvalidToken
from shared.tasks import cancel_and_wait
from ws_gateway.handshake import Refused, admit, token_from
from ws_gateway.hub import Hub
from ws_gateway.outbox import SlowTransport
from ws_gateway.session import Session

log = logging.getLogger("ws_gateway.poll")

SID_RE = re.compile(r"^[A-Za-z0-9_-]{16,64}\Z")
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
POLL_WAIT = 25.0
IDLE_CLOSE = 60.0  # nobody polled for this long: the session is closed
GONE_KEEP = 60.0  # a closed session's last frames and close code stay fetchable
MAX_BUFFER_BYTES = 1 << 20
MAX_SEND_BYTES = 64 * 1024
AFTER_RE = re.compile(r"^[0-9]{1,15}\Z")  # a frame number (≤ 2^53: exact in JSON too)


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


def _refused(e: Refused) -> web.Response:
    """A refused token or open: `unauthorized` (401, 403), `limit` (429), `unavailable` (503)."""
    response = web.json_response(
        e.problem(), status=e.status.value, content_type="application/problem+json"
    )
    if e.retry_after is not None:
        response.headers["Retry-After"] = str(e.retry_after)
    return response


def _closed(t: PollTransport) -> web.Response:
    return _problem(410, "closed", t.close_reason, close_code=t.close_code)


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
        self.on_closed: Callable[[PollTransport], None] | None = None
        self.on_release: Callable[[int], None] | None = None  # bytes freed once closed
        # The body of the current buffer: (first frame, last frame, bytes). Concurrent
        # GETs of one state share it instead of each joining a copy of their own.
        self._body: tuple[int, int, bytes] | None = None
        self.joins = 0  # bodies built (one per buffer state, not per request)

    @property
    def retained(self) -> int:
        """Bytes this transport holds: its frames and the cached body."""
        return self.size + (len(self._body[2]) if self._body is not None else 0)

    async def send(self, data: bytes) -> None:
        self.send_now(data)

    def can_send(self) -> bool:
        return True

    def buffered(self) -> int:
        return self.size

    def unacked(self) -> int:
        return 0  # `buffered` is what a GET has not taken yet

    def ping(self) -> None:
        pass  # no transport-level keepalive: the session's `ping` envelope is the heartbeat

    def send_now(self, data: bytes) -> None:
        if self.size + len(data) > MAX_BUFFER_BYTES:
            raise SlowTransport("poll buffer full: the client is not polling")
        before = self.retained
        self.frames.append((self.next_no, data))
        self.next_no += 1
        self.size += len(data)
        self._body = None  # stale from now on: not kept beside the frames
        self._released(before)  # (after the close: the final error frame)
        self.new.set()

    async def close(self, code: int, reason: str) -> None:
        if self.close_code is None:
            self.close_code, self.close_reason = code, reason
            self.closed_at = time.monotonic()
            if self.on_closed is not None:
                self.on_closed(self)
        self.new.set()

    def ack(self, after: int) -> None:
        before = self.retained
        while self.frames and self.frames[0][0] <= after:
            _, data = self.frames.popleft()
            self.size -= len(data)
            self._body = None  # stale
        self._released(before)

    def body(self) -> bytes:
        """Every buffered envelope, one per line; built once per buffer state."""
        if not self.frames:
            return b""
        first, last = self.frames[0][0], self.frames[-1][0]
        if self._body is None or self._body[:2] != (first, last):
            before = self.retained
            self._body = (first, last, b"\n".join(data for _, data in self.frames))
            self.joins += 1
            self._released(before)
        return self._body[2]

    def _released(self, before: int) -> None:
        if self.closed_at is not None and self.on_release is not None:
            self.on_release(before - self.retained)


@web.middleware
async def _correlate(request: web.Request, handler: _Handler) -> web.StreamResponse:
    """Every line logged for a long-poll request carries its session (`conn`: the sid, the
    connection's id across its requests) and nginx's request id."""
    sid = request.query.get("sid", "")
    rid = logs.correlation_id(request.headers.get("X-Request-Id"))
    with logs.bound(conn=sid if SID_RE.match(sid) else None, request_id=rid):
        return await handler(request)


class PollServer:
    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.transports: dict[str, PollTransport] = {}
        # Closed transports still fetchable, oldest first, and the bytes they hold.
        self.gone: collections.OrderedDict[str, PollTransport] = collections.OrderedDict()
        self.gone_bytes = 0
        self.app = web.Application(client_max_size=MAX_SEND_BYTES, middlewares=[_correlate])
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
            for t in list(self.transports.values()):
                if t.closed_at is not None and now - t.closed_at > GONE_KEEP:
                    self._forget(t)
                elif t.closed_at is None and now - t.last_poll > IDLE_CLOSE and t.session:
                    t.session.close(Disconnects.POLL_IDLE)

    # ------------------------------------------------------------------ closed sessions

    def _on_closed(self, t: PollTransport) -> None:
        """A session closed: keep its buffer fetchable, within the per-process bounds."""
        if self.transports.get(t.sid) is not t:
            return
        self.gone[t.sid] = t
        self.gone_bytes += t.retained
        self._bound_gone()

    def _on_release(self, freed: int) -> None:
        self.gone_bytes -= freed
        if freed < 0:
            self._bound_gone()

    def _bound_gone(self) -> None:
        settings = self.hub.settings
        dropped = 0
        while self.gone and (
            len(self.gone) > settings.poll_closed_keep_max
            or self.gone_bytes > settings.poll_closed_keep_bytes
        ):
            _, oldest = next(iter(self.gone.items()))
            self._forget(oldest)
            dropped += 1
        if dropped:
            log.info(
                "closed poll sessions dropped",
                extra={
                    "event": "poll_gone_dropped",
                    "dropped": dropped,
                    "kept": len(self.gone),
                    "bytes": self.gone_bytes,
                },
            )

    def _forget(self, t: PollTransport) -> None:
        if self.transports.get(t.sid) is t:
            del self.transports[t.sid]
        if self.gone.get(t.sid) is t:
            del self.gone[t.sid]
            self.gone_bytes -= t.retained
        t.on_release = None
        t.new.set()  # a GET waiting on it answers now

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
            token = request.cookies.get(session_cookie_name(self.hub.settings))
            if token:
                return token
        settings = self.hub.settings
        return token_from(headers, settings.allowed_origins, session_cookie_name(settings))

    async def _transport(self, request: web.Request) -> PollTransport | web.Response:
        """The request's session, once its token is checked like an upgrade's token: first
        the token (so that no sid is disclosed to a caller without one), then the sid.
        Revocation is read from the hub's mirror (the same one handshakes use; no KV read
        per poll, and a NATS outage does not stop a session's requests)."""
        try:
            claims = await self.hub.verifier.check(self._auth_token(request))
        except Refused as e:
            return _refused(e)
        except InvalidToken as e:
            return _problem(401, "unauthorized", str(e))
        t = self.transports.get(request.query.get("sid", ""))
        if self.hub.known_revoked(claims):
            if t is not None and claims.sub == t.uid and t.close_code is not None:
                # Its own session, closed (by this revocation, typically): how it ended,
                # as a WebSocket close would say, but none of its frames.
                return _closed(t)
            return _problem(401, "unauthorized", "token revoked")
        if t is None or claims.sub != t.uid:
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
            return _refused(e)
        if sid in self.transports:  # taken while this one was being admitted
            return _problem(409, "bad_request", "sid in use: choose another")
        remote = request.headers.get("X-Real-IP") or (request.remote or "")
        t = PollTransport(sid, admitted.claims.sub, remote)
        t.on_closed, t.on_release = self._on_closed, self._on_release
        self.transports[sid] = t
        t.session = await self.hub.open(admitted.claims, admitted.user, t)
        return web.json_response({"sid": sid, "wait": POLL_WAIT})

    async def send(self, request: web.Request) -> web.StreamResponse:
        t = await self._transport(request)
        if isinstance(t, web.Response):
            return t
        if t.session is None or t.close_code is not None:
            return _closed(t)
        body = await request.read()
        t.last_poll = time.monotonic()
        lines = [line.decode("utf-8", "replace") for line in body.split(b"\n") if line.strip()]
        # Handled in order after those of any other /poll/send of this session still in
        # hand: a request never overtakes one sent before it (an unsub its kv_sub).
        await t.session.handle_frames(lines)
        return web.Response(status=204)

    async def receive(self, request: web.Request) -> web.StreamResponse:
        t = await self._transport(request)
        if isinstance(t, web.Response):
            return t
        after_text = request.query.get("after", "0")
        if not AFTER_RE.match(after_text):
            return _problem(400, "bad_request", "after: a frame number (0 to 15 digits)")
        after = int(after_text)
        if after >= t.next_no:
            return _problem(
                400, "bad_request", f"after: past the last frame sent ({t.next_no - 1})"
            )
        try:
            wait = float(request.query.get("wait", POLL_WAIT))
        except ValueError:
            wait = math.nan
        if not (math.isfinite(wait) and wait >= 0):
            return _problem(400, "bad_request", "wait: seconds, a finite number from 0")
        wait = min(wait, POLL_WAIT)
        t.last_poll = time.monotonic()
        if t.session is not None:
            t.session.touch()  # a polling client is alive even between its pongs
        t.ack(after)
        if t.session is not None:
            t.session.outbox.room_freed()  # paced sources may ask NATS for more now
        if not t.frames and t.close_code is None:
            t.new.clear()
            try:
                async with asyncio.timeout(wait):
                    await t.new.wait()
            except TimeoutError:
                pass
        t.last_poll = time.monotonic()
        if self.transports.get(t.sid) is not t:  # dropped while this request waited
            return _problem(404, "unknown_session", "no such session here: reopen and resume")
        if not t.frames and t.close_code is not None:
            return _closed(t)
        last = t.frames[-1][0] if t.frames else after
        body = t.body()
        return web.Response(
            body=body,
            content_type="application/x-ndjson",
            headers={"Poll-Last-Frame": str(last), "Cache-Control": "no-store"},
        )

    async def close(self, request: web.Request) -> web.StreamResponse:
        t = await self._transport(request)
        if isinstance(t, web.Response):
            return t
        if t.session is not None:
            await t.session.close(Disconnects.CLIENT_CLOSED)
        return web.Response(status=204)
