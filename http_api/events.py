"""What every write tells the rest of the system, besides the write itself.

- an event on core NATS, `<resource>.<id>.<created|updated|deleted>`, for subject subscribers;
- an audit record in stream `audit`, `audit.<resource>.<action>` = {who, what, when}.

Both happen after the write succeeded. A failure here is logged and counted, never turned
into an error response: the write is done, and a client retrying it would repeat it.

An audit record JetStream cannot take now (a leader election, a reconnect) waits in a
bounded buffer (AUDIT_BUFFER records per process), sent again in order, each under its own
Nats-Msg-Id so a repeat is stored once. Only a record that finds the buffer full, or is
still there when the process stops, is dropped: with a WARNING each and a metric.
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import logging
import secrets
from typing import Any

import msgspec
from nats.aio.client import Client as NATS
from nats.js.client import JetStreamContext

from http_api.metrics import Metrics
from http_api.schemas import Actor, AuditRecord, AuditWhat
from shared.failover import TRY_TIMEOUT, backoff, transient
from shared.tasks import cancel_and_wait

log = logging.getLogger("http_api.events")
_encoder = msgspec.json.Encoder()
AUDIT_BUFFER = 10_000  # records (each a few hundred bytes): a few MiB at most


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Events:
    def __init__(
        self, nc: NATS, js: JetStreamContext, metrics: Metrics, buffer: int = AUDIT_BUFFER
    ) -> None:
        self._nc, self._js, self._metrics = nc, js, metrics
        # (subject, Nats-Msg-Id, record) not stored yet, oldest first; `_resend` owns them.
        self._pending: collections.deque[tuple[str, str, bytes]] = collections.deque()
        self._buffer = buffer
        self._resend: asyncio.Task[None] | None = None

    async def emit(self, resource: str, id: str, action: str, payload: Any) -> None:
        subject = f"{resource}.{id}.{action}"
        try:
            await self._nc.publish(subject, _encoder.encode(payload))
        except Exception as e:
            self._metrics.event_failures.labels("event").inc()
            log.error(
                "event not published",
                extra={"event": "event_failed", "subject": subject, "error": type(e).__name__},
            )

    async def audit(
        self,
        who: Actor | None,
        resource: str,
        action: str,
        id: str,
        *,
        revision: int | None = None,
        fields: list[str] | None = None,
    ) -> None:
        record = AuditRecord(
            who=who,
            what=AuditWhat(resource, action, id, revision, fields),
            when=now(),
        )
        item = (f"audit.{resource}.{action}", secrets.token_urlsafe(16), _encoder.encode(record))
        if not self._pending:
            try:
                await self._store(item)
                return
            except Exception as e:
                if not transient(e):
                    self._drop(item, e)
                    return
        if len(self._pending) >= self._buffer:
            self._drop(item, OverflowError("audit buffer full"))
            return
        self._pending.append(item)
        self._metrics.audit_pending.set(len(self._pending))
        if self._resend is None or self._resend.done():
            self._resend = asyncio.get_running_loop().create_task(self._resend_loop())

    async def _store(self, item: tuple[str, str, bytes]) -> None:
        subject, msg_id, data = item
        async with asyncio.timeout(TRY_TIMEOUT):
            await self._js.publish(subject, data, stream="audit", headers={"Nats-Msg-Id": msg_id})

    async def _resend_loop(self) -> None:
        """Send the buffered records again, oldest first, until none is left."""
        attempt = 0
        while self._pending:
            item = self._pending[0]
            try:
                await self._store(item)
            except Exception as e:
                if transient(e):
                    self._metrics.nats_retries.labels("audit").inc()
                    await asyncio.sleep(backoff(attempt))  # a pause between tries
                    attempt += 1
                    continue
                self._drop(item, e)
            else:
                attempt = 0
            self._pending.popleft()
            self._metrics.audit_pending.set(len(self._pending))
        log.info("audit records stored after an outage", extra={"event": "audit_resent"})

    def _drop(self, item: tuple[str, str, bytes], e: BaseException) -> None:
        self._metrics.event_failures.labels("audit").inc()
        log.warning(
            "audit record not stored",
            extra={"event": "audit_failed", "subject": item[0], "error": type(e).__name__},
        )

    async def close(self) -> None:
        """Stop resending; what is still buffered is dropped, each said."""
        await cancel_and_wait(self._resend)
        while self._pending:
            self._drop(self._pending.popleft(), ConnectionError("process stopping"))
        self._metrics.audit_pending.set(0)

    async def write(
        self,
        who: Actor | None,
        resource: str,
        id: str,
        action: str,
        payload: Any,
        *,
        revision: int | None = None,
        fields: list[str] | None = None,
    ) -> None:
        """The event and the audit record of one write."""
        await self.emit(resource, id, action, payload)
        await self.audit(who, resource, action, id, revision=revision, fields=fields)
