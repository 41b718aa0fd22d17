"""The process's presence keys (docs/protocol.md, "Presence"): who holds a `sub` with
`data.presence` here, as keys of KV `presence` that expire unless refreshed.

One task owns every write: joins and leaves are queued to it (a leave synchronously, from
a subscription's `end()`), and every PRESENCE_REFRESH it re-puts each key it holds, all in
batches of concurrent JetStream publishes. Every write carries `Nats-TTL: PRESENCE_TTL`,
so a gateway that dies leaves keys that expire on their own (the bucket turns expiries into
delete markers that watchers see); a leave's delete marker expires the same way, so the
bucket keeps nothing of connections long gone.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time

import msgspec
from nats.errors import NoRespondersError
from nats.js.client import JetStreamContext
from nats.js.errors import NoStreamResponseError, NotFoundError

from shared import kvwire
from shared.capabilities import PRESENCE_BUCKET
from shared.errors import ErrorCode, ReplyError
from shared.settings import Settings
from shared.subjects import match, tokens
from shared.tasks import cancel_and_wait
from ws_gateway import metrics

log = logging.getLogger("ws_gateway.presence")

BATCH = 256  # publishes in flight at once
# A KV key token: what nats-py (and every KV client) accepts in a key.
_KEY_TOKEN = re.compile(r"^[-/_=a-zA-Z0-9]+\Z")


class Announcement(msgspec.Struct):
    """The value of a presence key."""

    uid: str
    name: str
    since: float  # unix seconds: when this connection joined


def refusal(settings: Settings, subject: str) -> str | None:
    """Why `sub` with presence is refused on `subject` (already a valid pattern), or None."""
    parts = tokens(subject)
    if "*" in parts or ">" in parts:
        return "presence needs a literal subject (no wildcards)"
    if not all(_KEY_TOKEN.match(t) for t in parts):
        return "presence needs a subject of KV key characters (A-Z a-z 0-9 - / _ =)"
    if any(match(p, subject) for p in settings.presence_refuse):
        return "presence is refused on this subject"
    return None


class _Held:
    __slots__ = ("holders", "value", "written")

    def __init__(self, value: bytes, written: asyncio.Future[None]) -> None:
        self.value = value
        self.holders = 1
        self.written = written


class Presence:
    """Every presence key of this process, and the one task that writes them."""

    def __init__(self, js: JetStreamContext, settings: Settings) -> None:
        self._js = js
        self._ttl = {"Nats-TTL": f"{settings.presence_ttl}s"}
        self._delete = {kvwire.OPERATION_HEADER: "DEL", **self._ttl}
        self._refresh = settings.presence_refresh
        # Unique per process: a key names its connection across every gateway.
        self.instance = secrets.token_hex(4)
        self._held: dict[str, _Held] = {}
        self._pending: dict[str, bool] = {}  # key -> put (True) or delete, in queue order
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.writes = 0  # KV writes made (bench/presence.py counts them per interval)

    def key(self, subject: str, uid: str, session_id: int) -> str:
        return f"{subject}.{uid}.{self.instance}-{session_id}"

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        """Write the leaves still queued (sessions closed before this), then stop."""
        self._closing = True
        self._wake.set()
        task = self._task
        if task is not None:
            try:
                async with asyncio.timeout(2.0):
                    await asyncio.wait({task})
            except TimeoutError:
                log.info("presence leaves not written", extra={"keys": len(self._pending)})
        await cancel_and_wait(task)

    @property
    def held(self) -> int:
        return len(self._held)

    def join(self, key: str, value: Announcement) -> asyncio.Future[None]:
        """Hold `key` (counted: two holders of one key, one key); done once it is written."""
        held = self._held.get(key)
        if held is not None:
            held.holders += 1
            return held.written
        written = asyncio.get_running_loop().create_future()
        self._held[key] = _Held(msgspec.json.encode(value), written)
        self._queue(key, True)
        return written

    def leave(self, key: str) -> None:
        """Synchronous (a subscription's `end()`): the delete is queued to the owner task."""
        held = self._held.get(key)
        if held is None:
            return
        held.holders -= 1
        if held.holders == 0:
            del self._held[key]
            if not held.written.done():
                held.written.set_result(None)  # its holder ended: nothing to wait for
            elif not held.written.cancelled():
                held.written.exception()  # retrieved: its holder has heard it, or ended
            self._queue(key, False)

    def _queue(self, key: str, put: bool) -> None:
        self._pending.pop(key, None)  # the newest op of a key wins, in the newest place
        self._pending[key] = put
        self._wake.set()

    async def _run(self) -> None:
        due = time.monotonic() + self._refresh
        while True:
            try:
                async with asyncio.timeout(max(0.0, due - time.monotonic())):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            if time.monotonic() >= due:
                due = time.monotonic() + self._refresh
                for key in self._held:
                    self._pending.setdefault(key, True)
            batch, self._pending = self._pending, {}
            await self._write(batch)
            if self._closing and not self._pending:
                return

    async def _write(self, batch: dict[str, bool]) -> None:
        items = list(batch.items())
        for i in range(0, len(items), BATCH):
            chunk = items[i : i + BATCH]
            results = await asyncio.gather(
                *(self._write_one(key, put) for key, put in chunk), return_exceptions=True
            )
            for (key, put), result in zip(chunk, results, strict=True):
                self._settle(key, put, result)

    async def _write_one(self, key: str, put: bool) -> None:
        subject = kvwire.subject_of(PRESENCE_BUCKET, key)
        held = self._held.get(key)
        if put and held is None:
            return  # left since: its delete is queued after this
        if held is not None and put:
            await self._js.publish(subject, held.value, headers=self._ttl)
        else:
            await self._js.publish(subject, b"", headers=self._delete)
        self.writes += 1
        metrics.PRESENCE_WRITES.inc()

    def _settle(self, key: str, put: bool, result: BaseException | None) -> None:
        held = self._held.get(key)
        if result is None:
            if put and held is not None and not held.written.done():
                held.written.set_result(None)
            return
        log.info("presence write failed", extra={"key": key, "put": put, "error": repr(result)})
        if put and held is not None and not held.written.done():
            # The join waits for its first write: say why it failed (the next refresh
            # would put it, but the client asked now).
            held.written.set_exception(_reply_error(result))
        # A failed leave is not retried: the key expires within PRESENCE_TTL anyway, and
        # retries would pile up while NATS is away.


def _reply_error(e: BaseException) -> ReplyError:
    if isinstance(e, NoRespondersError | NoStreamResponseError | NotFoundError):
        return ReplyError(ErrorCode.NOT_FOUND, f"no bucket {PRESENCE_BUCKET!r}")
    return ReplyError(ErrorCode.UNAVAILABLE, "presence could not be written: retry later")
