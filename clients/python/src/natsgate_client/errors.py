"""The client's exceptions. Every one is a `NatsgateError`."""

from __future__ import annotations


class NatsgateError(Exception):
    """Base of every error this package raises."""


class RequestError(NatsgateError):
    """The server answered a request with an `error` frame (docs/protocol.md, "Error
    codes"): `forbidden`, `not_found`, `limit`, `bad_request`, …"""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason


class HandshakeRefused(NatsgateError):
    """The gateway refused the connection with an HTTP status (401 token, 403 user or
    origin, 429 too many sessions, 503 NATS unreachable)."""

    def __init__(self, status: int, body: str = "") -> None:
        super().__init__(f"connection refused: HTTP {status} {body[:200]}".rstrip())
        self.status = status


class ConnectionLost(NatsgateError):
    """The connection ended while a request waited for its reply."""


class ClientClosed(NatsgateError):
    """The client is closed: by `close()`, or for good by the server (`code`: 1002
    unsupported version, 4401 token refused with no token provider, 4403 user disabled,
    or the HTTP refusal of the handshake)."""

    def __init__(self, reason: str, code: int | None = None) -> None:
        super().__init__(reason if code is None else f"{reason} (code {code})")
        self.reason = reason
        self.code = code


class SubscriptionEnded(NatsgateError):
    """A subscription ended otherwise than by its own `unsub()` or the client's `close()`
    (those end iteration quietly). `reason`: `overflow` (its queue was full: the consumer
    is slower than the data), `revoked` (a capability change took it away), `closed` (the
    client closed for good), or the server's error code (`not_found`: stream or bucket
    deleted; `taken_over`: a newer js_sub of the durable; `forbidden` on a resubscribe)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"subscription ended: {reason}" + (f" ({detail})" if detail else ""))
        self.reason = reason
        self.detail = detail


class LoginError(NatsgateError):
    """The HTTP API refused a login or refresh (RFC 9457 problem: `status`, `title`)."""

    def __init__(self, status: int, title: str) -> None:
        super().__init__(f"HTTP {status}: {title}")
        self.status = status
        self.title = title
