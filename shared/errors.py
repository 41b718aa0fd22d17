"""Errors and codes shared by both processes.

    Exception
     └── ProtocolError            one request failed; carries an ErrorCode
          └── Disconnect          the connection must end; also carries a CloseCode
    InvalidToken                  a JWT failed verification (HTTP 401 / no upgrade)
    CapabilityError (ValueError)  a capability document is malformed; names the pattern

Reply errors keep the connection; disconnects close it with their code.
"""

from __future__ import annotations

import enum


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
    INTERNAL = "internal"


class CloseCode(enum.IntEnum):
    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    POLICY = 1008
    TOO_BIG = 1009
    INTERNAL = 1011
    TRY_AGAIN_LATER = 1013
    TOKEN = 4401
    USER_DISABLED = 4403


class ProtocolError(Exception):
    """A request failed; the connection stays open."""

    def __init__(self, code: ErrorCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.inbox: str | None = None  # the request's inbox, echoed on the error frame


class Disconnect(ProtocolError):
    """The connection must be closed with `close_code` after the error frame."""

    def __init__(self, code: ErrorCode, reason: str, close_code: CloseCode) -> None:
        super().__init__(code, reason)
        self.close_code = close_code


class InvalidToken(Exception):
    """A token failed verification. The message is safe to log (never the token)."""


class CapabilityError(ValueError):
    def __init__(self, where: str, pattern: str, reason: str) -> None:
        super().__init__(f"{where}: invalid pattern {pattern!r}: {reason}")
        self.where = where
        self.pattern = pattern
        self.reason = reason
