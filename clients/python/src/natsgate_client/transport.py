"""The two transports of one session (docs/protocol.md): WebSocket, and long polling for
networks where WebSocket fails ("Fallback transport"). Both carry the same envelopes and
report the same close codes; `Client` does not know which one it drives.

`open()` raises what the handshake raised (`websockets.exceptions.InvalidStatus`,
`PollRefused`); `refused_status` reads the HTTP status out of either.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator

import aiohttp
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

# A frame can batch many envelopes (the server's send queue is 1 MiB).
MAX_FRAME = 16 * 1024 * 1024
_POLL_FAILURES = 5  # polls in a row that got no answer before the session counts as lost


class PollRefused(Exception):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"poll open refused: {status} {body}")
        self.status = status


def refused_status(exc: BaseException) -> int | None:
    """The HTTP status of a refused handshake, else None."""
    if isinstance(exc, InvalidStatus):
        return exc.response.status_code
    if isinstance(exc, PollRefused):
        return exc.status
    return None


class WsTransport:
    """One WebSocket: one envelope per send, frames as they arrive."""

    name = "websocket"

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws

    @classmethod
    async def open(
        cls,
        url: str,
        headers: dict[str, str],
        open_timeout: float,
        *,
        ping_interval: float | None = 20.0,
        max_size: int | None = MAX_FRAME,
    ) -> WsTransport:
        """`ping_interval`: WebSocket pings that notice a dead path from this side (the
        server pings every 25 s); None: none (a test that wants the client silent)."""
        ws = await connect(
            url,
            additional_headers=headers,
            compression=None,
            max_size=max_size,
            open_timeout=open_timeout,
            ping_interval=ping_interval,
            ping_timeout=ping_interval,
        )
        return cls(ws)

    def set_token(self, token: str) -> None:
        """Nothing to do: a socket is authenticated once, at the upgrade."""

    async def send(self, data: str | bytes) -> None:
        await self.ws.send(data)

    async def frames(self) -> AsyncIterator[str | bytes]:
        try:
            async for frame in self.ws:
                yield frame
        except ConnectionClosed:
            pass

    async def close(self) -> None:
        await self.ws.close()

    async def wait_closed(self) -> None:
        await self.ws.wait_closed()

    @property
    def close_code(self) -> int | None:
        return self.ws.close_code


class PollTransport:
    """One long-polling session (docs/protocol.md, "Fallback transport"): `open` with a
    fresh sid, `send` posts envelopes, `frames` polls; every request carries the token."""

    name = "polling"

    def __init__(
        self, http: aiohttp.ClientSession, base: str, sid: str, headers: dict[str, str]
    ) -> None:
        self.http, self.base, self.sid, self.headers = http, base, sid, headers
        self.after = 0
        self._close_code: int | None = None
        self._closed = asyncio.Event()

    @classmethod
    async def open(cls, url: str, headers: dict[str, str], open_timeout: float) -> PollTransport:
        http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
        sid = secrets.token_urlsafe(18)
        try:
            async with http.post(
                f"{url}/open",
                params={"sid": sid},
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=open_timeout),
            ) as r:
                if r.status != 200:
                    raise PollRefused(r.status, await r.text())
        except BaseException:
            await http.close()
            raise
        return cls(http, url, sid, dict(headers))

    def set_token(self, token: str) -> None:
        """Every later request carries the new token (after `refresh` accepted it)."""
        self.headers["Authorization"] = f"Bearer {token}"

    async def send(self, data: str | bytes) -> None:
        if self._closed.is_set():
            raise ConnectionError("session closed")
        body = data.encode() if isinstance(data, str) else data
        try:
            async with self.http.post(
                f"{self.base}/send", params={"sid": self.sid}, data=body, headers=self.headers
            ) as r:
                if r.status == 410:
                    await self._gone(r)
                    raise ConnectionError("session closed")
                if r.status != 204:
                    raise ConnectionError(f"poll send failed: {r.status} {await r.text()}")
        except aiohttp.ClientError as e:
            raise ConnectionError(f"poll send failed: {e}") from e

    async def _gone(self, r: aiohttp.ClientResponse) -> None:
        try:
            body = await r.json(content_type=None)
            self._close_code = int(body.get("close_code") or 1006)
        except Exception:
            self._close_code = 1006
        self._closed.set()

    async def frames(self) -> AsyncIterator[str | bytes]:
        try:
            async for body in self._polls():
                yield body
        finally:
            # The session is over (either end closed it): nothing more goes over HTTP, so
            # the HTTP session goes too, whether or not the client is ever closed.
            await self.http.close()

    async def _polls(self) -> AsyncIterator[str]:
        failures = 0
        while not self._closed.is_set():
            try:
                async with self.http.get(
                    self.base,
                    params={"sid": self.sid, "after": str(self.after)},
                    headers=self.headers,
                ) as r:
                    if r.status == 410:
                        await self._gone(r)
                        return
                    if r.status != 200:
                        # 401: the token was revoked or expired (a socket's 4401); 404: the
                        # process that held the session is gone (1006: reopen and resume).
                        self._close_code = 4401 if r.status == 401 else 1006
                        self._closed.set()
                        return
                    body = await r.text()
                    self.after = int(r.headers.get("Poll-Last-Frame", self.after))
                failures = 0
            except (TimeoutError, aiohttp.ClientError):
                failures += 1
                if self._closed.is_set() or failures > _POLL_FAILURES:
                    self._close_code = self._close_code or 1006
                    self._closed.set()
                    return
                await asyncio.sleep(0.2 * failures)  # backoff between failed polls
                continue
            if body:
                yield body

    async def close(self) -> None:
        if not self._closed.is_set():
            with contextlib.suppress(Exception):
                async with self.http.post(
                    f"{self.base}/close", params={"sid": self.sid}, headers=self.headers
                ) as r:
                    await r.read()
            if self._close_code is None:
                self._close_code = 1000
            self._closed.set()
        await self.http.close()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    @property
    def close_code(self) -> int | None:
        return self._close_code


Transport = WsTransport | PollTransport


async def open_transport(url: str, headers: dict[str, str], open_timeout: float) -> Transport:
    """WebSocket for `ws://`/`wss://` URLs, long polling for `http://`/`https://` ones."""
    if url.startswith(("http://", "https://")):
        return await PollTransport.open(url, headers, open_timeout)
    return await WsTransport.open(url, headers, open_timeout)
