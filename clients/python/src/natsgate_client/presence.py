"""Who is here: presence on a subject read from KV bucket `presence` (docs/protocol.md,
"Presence"). A key per connection, `<subject>.<uid>.<connection>`; a user is a member while
any of their connections' keys exists, so two tabs are one member and the user leaves when
the last one goes (closed, or expired with a crashed gateway)."""

from __future__ import annotations

import asyncio
from typing import Any

from msgspec import Struct

from natsgate_client.messages import KvChange
from natsgate_client.subscription import KvSubscription

PRESENCE_BUCKET = "presence"


class Member(Struct, frozen=True):
    uid: str
    name: str
    since: float  # unix seconds: the earliest join of the user's connections here
    connections: int


class Joined(Struct, frozen=True):
    member: Member


class Left(Struct, frozen=True):
    uid: str


PresenceEvent = Joined | Left


def members_of(entries: dict[str, KvChange]) -> dict[str, Member]:
    """uid → Member from a presence kv_sub's current keys (`<subject>.<uid>.<conn>`)."""
    by_uid: dict[str, list[dict[str, Any]]] = {}
    for key, change in entries.items():
        value = change.value if isinstance(change.value, dict) else {}
        uid = key.rsplit(".", 2)[-2]
        by_uid.setdefault(uid, []).append(value)
    return {
        uid: Member(
            uid,
            str(values[0].get("name") or uid),
            min(float(v.get("since") or 0.0) for v in values),
            len(values),
        )
        for uid, values in by_uid.items()
    }


class Presence:
    """`Client.presence(subject)`: `members` is who is here now (kept current by the
    kv_sub); iterating yields a `Joined` or `Left` each time that set changes."""

    def __init__(self, sub: KvSubscription) -> None:
        self.sub = sub
        self._known: set[str] = set()  # members as of the last event handed out

    @property
    def members(self) -> dict[str, Member]:
        return members_of(self.sub.entries)

    async def synced(self, timeout: float | None = None) -> None:
        """Until everyone already here is in `members` (their joins are then pending)."""
        await self.sub.synced(timeout)

    def __aiter__(self) -> Presence:
        return self

    async def __anext__(self) -> PresenceEvent:
        while True:
            event = await self.sub.__anext__()
            if not isinstance(event, KvChange):
                continue
            uid = event.key.rsplit(".", 2)[-2]
            now = self.members.get(uid)
            if now is not None and uid not in self._known:
                self._known.add(uid)
                return Joined(now)
            if now is None and uid in self._known:
                self._known.discard(uid)
                return Left(uid)

    async def get(self, timeout: float | None = None) -> PresenceEvent:
        """The next join or leave."""
        async with asyncio.timeout(timeout):
            return await self.__anext__()

    async def unsub(self) -> None:
        await self.sub.unsub()
