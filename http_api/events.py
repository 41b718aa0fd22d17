"""What every write tells the rest of the system, besides the write itself.

- an event on core NATS, `<resource>.<id>.<created|updated|deleted>`, for subject subscribers;
- an audit record in stream `audit`, `audit.<resource>.<action>` = {who, what, when}.

Both happen after the write succeeded. A failure here is logged and counted, never turned
into an error response: the write is done, and a client retrying it would repeat it.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

import msgspec
from nats.aio.client import Client as NATS
from nats.js.client import JetStreamContext

from http_api.metrics import Metrics
from http_api.schemas import Actor, AuditRecord, AuditWhat

log = logging.getLogger("http_api.events")
_encoder = msgspec.json.Encoder()


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Events:
    def __init__(self, nc: NATS, js: JetStreamContext, metrics: Metrics) -> None:
        self._nc, self._js, self._metrics = nc, js, metrics

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
        subject = f"audit.{resource}.{action}"
        try:
            await self._js.publish(subject, _encoder.encode(record), stream="audit")
        except Exception as e:
            self._metrics.event_failures.labels("audit").inc()
            log.error(
                "audit record not stored",
                extra={"event": "audit_failed", "subject": subject, "error": type(e).__name__},
            )

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
