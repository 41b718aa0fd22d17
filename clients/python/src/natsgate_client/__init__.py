"""natsgate-client: the Python client of natsgate (docs/protocol.md is the wire protocol).

    async with Client("https://app.example", PasswordLogin(url, "alice", pw)) as client:
        async for change in await client.kv_sub("articles"):
            ...

See README.md for the states, events and errors.
"""

from natsgate_client.client import Client, backoff, gateway_url
from natsgate_client.errors import (
    ClientClosed,
    ConnectionLost,
    HandshakeRefused,
    LoginError,
    NatsgateError,
    RequestError,
    SubscriptionEnded,
)
from natsgate_client.events import (
    CapabilitiesChanged,
    Connected,
    Disconnected,
    Event,
    Resubscribed,
    ServerError,
    State,
    StateChanged,
    SubscriptionClosed,
    TokenRefreshed,
    TokenRefreshFailed,
)
from natsgate_client.messages import (
    PROTOCOL_VERSION,
    Gap,
    KvChange,
    KvEvent,
    KvSynced,
    Message,
    StreamEvent,
    StreamMessage,
)
from natsgate_client.presence import Joined, Left, Member, Presence, PresenceEvent
from natsgate_client.subscription import (
    CoreSubscription,
    KvSubscription,
    StreamSubscription,
    Subscription,
)
from natsgate_client.tokens import Login, PasswordLogin, TokenProvider, login, refresh

__version__ = "0.1.0"

__all__ = [
    "PROTOCOL_VERSION",
    "CapabilitiesChanged",
    "Client",
    "ClientClosed",
    "Connected",
    "ConnectionLost",
    "CoreSubscription",
    "Disconnected",
    "Event",
    "Gap",
    "HandshakeRefused",
    "Joined",
    "KvChange",
    "KvEvent",
    "KvSubscription",
    "KvSynced",
    "Left",
    "Login",
    "LoginError",
    "Member",
    "Message",
    "NatsgateError",
    "PasswordLogin",
    "Presence",
    "PresenceEvent",
    "RequestError",
    "Resubscribed",
    "ServerError",
    "State",
    "StateChanged",
    "StreamEvent",
    "StreamMessage",
    "StreamSubscription",
    "Subscription",
    "SubscriptionClosed",
    "SubscriptionEnded",
    "TokenProvider",
    "TokenRefreshFailed",
    "TokenRefreshed",
    "__version__",
    "backoff",
    "gateway_url",
    "login",
    "refresh",
]
