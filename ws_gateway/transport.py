"""What a session writes to: a WebSocket or a long-polling buffer, behind one interface.

The session never asks which one it has (docs/protocol.md, "Fallback transport").
Both can be written without awaiting (`send_now`, while `can_send`), which the per-tick
flusher does; `send` awaits room, with the outbox's write timeout around it.
"""

from __future__ import annotations

from typing import Protocol


class Transport(Protocol):
    name: str  # for logs: "ws" or "poll"
    remote: str  # the client's address, for logs

    async def send(self, data: bytes) -> None: ...

    def can_send(self) -> bool: ...

    def send_now(self, data: bytes) -> None: ...

    def buffered(self) -> int:
        """Bytes written but not yet taken by the client, that the transport itself holds
        (a long-poll buffer until the next GET; a socket's are bounded by the kernel)."""
        ...

    def unacked(self) -> int | None:
        """Bytes written that the client's end has not acknowledged yet (None: the
        connection is closed, it cannot say any more)."""
        ...

    def ping(self) -> None:
        """A transport-level keepalive, if it has one (a WebSocket ping), without awaiting."""
        ...

    async def close(self, code: int, reason: str) -> None: ...
