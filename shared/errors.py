"""Errors and codes shared by both processes.

    Exception
     ├── ReplyError               one request failed; the connection stays (an `error` frame)
     ├── DisconnectError          the connection must end; carries a Disconnect from DISCONNECTS
     ├── InvalidToken             a JWT failed verification (HTTP 401 / no upgrade)
     └── CapabilityError (ValueError)  a capability document is malformed; names the pattern

A reply error and a disconnect are siblings, told apart by type. Every way the server ends a
connection is one row of the `Disconnects` table below: its close code, the error code of the
final `error` frame (if any) and the reason, so no two places spell the same close apart.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace


class ErrorCode(enum.StrEnum):
    BAD_REQUEST = "bad_request"
    UNSUPPORTED_VERSION = "unsupported_version"
    DUPLICATE_INBOX = "duplicate_inbox"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    LIMIT = "limit"
    USE_HTTP = "use_http"
    REVOKED = "revoked"
    TOKEN_EXPIRED = "token_expired"
    UNAUTHORIZED = "unauthorized"
    USER_DISABLED = "user_disabled"
    BACKPRESSURE = "backpressure"
    UNAVAILABLE = "unavailable"
    TAKEN_OVER = "taken_over"
    INTERNAL = "internal"


class CloseCode(enum.IntEnum):
    """WebSocket close codes (docs/protocol.md, "Close codes"). Final: 1002, 4403; 4401 is
    final for the token (get a new one, then reconnect); the others reconnect with backoff."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    POLICY = 1008
    TOO_BIG = 1009
    INTERNAL = 1011
    TRY_AGAIN_LATER = 1013
    TOKEN = 4401
    USER_DISABLED = 4403


class ReplyError(Exception):
    """A request failed; the connection stays open."""

    def __init__(self, code: ErrorCode, reason: str, inbox: str | None = None) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.inbox = inbox  # the request's inbox, echoed on the error frame


@dataclass(frozen=True, slots=True)
class Disconnect:
    """How a connection ends: its close code, the final error frame's code, the reason."""

    close_code: int
    reason: str
    error: ErrorCode | None = None

    def because(self, detail: str) -> Disconnect:
        """The same disconnect with the particular cause appended to its reason."""
        return replace(self, reason=f"{self.reason}: {detail}")


class Disconnects:
    """Every disconnect the server initiates (docs/protocol.md, "Close codes")."""

    CLIENT_CLOSED = Disconnect(CloseCode.NORMAL, "client closed")
    SHUTDOWN = Disconnect(CloseCode.GOING_AWAY, "server shutting down")
    POLL_IDLE = Disconnect(CloseCode.GOING_AWAY, "nobody polled for 60 s")
    UNSUPPORTED_VERSION = Disconnect(
        CloseCode.PROTOCOL_ERROR, "protocol version 1 only", ErrorCode.UNSUPPORTED_VERSION
    )
    HEARTBEAT = Disconnect(CloseCode.POLICY, "heartbeat timeout")
    BAD_FRAMES = Disconnect(CloseCode.POLICY, "too many bad frames")
    BACKPRESSURE = Disconnect(CloseCode.TRY_AGAIN_LATER, "backpressure", ErrorCode.BACKPRESSURE)
    TOKEN_EXPIRED = Disconnect(CloseCode.TOKEN, "token expired", ErrorCode.TOKEN_EXPIRED)
    TOKEN_REVOKED = Disconnect(CloseCode.TOKEN, "token revoked", ErrorCode.UNAUTHORIZED)
    USER_DISABLED = Disconnect(
        CloseCode.USER_DISABLED, "user disabled or deleted", ErrorCode.USER_DISABLED
    )
    UNAVAILABLE = Disconnect(
        CloseCode.TRY_AGAIN_LATER, "NATS unreachable: reconnect later", ErrorCode.UNAVAILABLE
    )
    AUTH_WATCH_LOST = Disconnect(
        CloseCode.GOING_AWAY, "revocation watch lost: reconnect later", ErrorCode.UNAVAILABLE
    )


class DisconnectError(Exception):
    """Raised where a request must end its connection (after the error frame, if any)."""

    def __init__(self, disconnect: Disconnect, inbox: str | None = None) -> None:
        super().__init__(disconnect.reason)
        self.disconnect = disconnect
        self.inbox = inbox


class InvalidToken(Exception):
    """A token failed verification. The message is safe to log (never the token)."""


class CapabilityError(ValueError):
    def __init__(self, where: str, pattern: str, reason: str) -> None:
        super().__init__(f"{where}: invalid pattern {pattern!r}: {reason}")
        self.where = where
        self.pattern = pattern
        self.reason = reason
