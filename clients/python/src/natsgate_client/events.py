"""Connection states and the events a client reports to its listeners (`Client.on`)."""

from __future__ import annotations

import enum
from typing import Any

from msgspec import Struct

from natsgate_client.messages import RevokedRef


class State(enum.StrEnum):
    CONNECTING = "connecting"  # opening a transport, waiting for the first cap_update
    CONNECTED = "connected"  # the session is open; subscriptions are (re)made
    DISCONNECTED = "disconnected"  # lost; waiting out the backoff before the next attempt
    CLOSED = "closed"  # for good: close() was called, or the server refused for good


class StateChanged(Struct, frozen=True):
    old: State
    new: State


class Connected(Struct, frozen=True):
    """A session is open (`attempt`: 1 for the first try after a loss)."""

    transport: str  # "websocket" or "polling"
    user: str
    attempt: int


class Disconnected(Struct, frozen=True):
    """The session ended. `code`: the close code (None: never opened, see `reason`);
    `reconnect`: false when the client is now CLOSED."""

    code: int | None
    reason: str
    reconnect: bool
    delay: float = 0.0  # seconds until the next attempt


class Resubscribed(Struct, frozen=True):
    """A subscription was made again after a reconnect. `recovered`: false when its resume
    point was gone (KV: a full reload follows; stream: a `Gap` was yielded)."""

    inbox: str
    kind: str
    target: str
    position: int | None
    recovered: bool | None


class CapabilitiesChanged(Struct, frozen=True):
    """A `cap_update` after the first: the user's capabilities and what that ended."""

    capabilities: dict[str, Any]
    revoked: list[RevokedRef]


class SubscriptionClosed(Struct, frozen=True):
    """A subscription ended (see `SubscriptionEnded` for `reason`)."""

    inbox: str
    kind: str
    target: str
    reason: str
    detail: str = ""


class TokenRefreshed(Struct, frozen=True):
    exp: int  # the new token's expiry (Unix s)


class TokenRefreshFailed(Struct, frozen=True):
    error: str  # retried until the token expires; then a reconnect asks the provider again


class ServerError(Struct, frozen=True):
    """An `error` frame that answers no request (often the reason of the close after it)."""

    code: str
    reason: str


Event = (
    StateChanged
    | Connected
    | Disconnected
    | Resubscribed
    | CapabilitiesChanged
    | SubscriptionClosed
    | TokenRefreshed
    | TokenRefreshFailed
    | ServerError
)
