"""Core NATS fan-out: one NATS subscription per distinct pattern per process.

Every connection that subscribes to a pattern joins the shared subscription (reference
counted; unsubscribed when the last member leaves). Each NATS message is encoded once and
the same bytes are queued to every member. A connection whose patterns overlap receives a
message only through the smallest of its matching patterns, so it gets it once.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from shared import envelope, natsio
from shared.capabilities import is_internal_subject, overlaps_internal
from shared.subjects import match_tokens, tokens
from ws_gateway import metrics

log = logging.getLogger("ws_gateway.core")


class Member(Protocol):
    core_patterns: dict[str, tuple[str, ...]]

    def push(self, frame: bytes) -> bool: ...


class _Shared:
    __slots__ = ("filter_internal", "members", "pattern", "ready", "sub")

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        self.members: dict[Member, int] = {}
        self.sub: Subscription | None = None
        self.filter_internal = overlaps_internal(pattern)
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()


def _is_primary(member: Member, pattern: str, st: tuple[str, ...]) -> bool:
    """True when `pattern` is the smallest of the member's patterns matching the subject."""
    for other, ot in member.core_patterns.items():
        if other < pattern and match_tokens(ot, st):
            return False
    return True


class CoreRouter:
    def __init__(self, nc: NATS, pending_msgs_limit: int = 1 << 16) -> None:
        self._nc = nc
        self._shared: dict[str, _Shared] = {}
        self._pending_limit = pending_msgs_limit
        # Closed while capabilities are being re-read after a NATS outage: core traffic is
        # at-most-once, so what arrives meanwhile is dropped rather than risk a revoked
        # subscriber getting it.
        self.open = True

    def __len__(self) -> int:
        return len(self._shared)

    async def join(self, member: Member, pattern: str) -> None:
        shared = self._shared.get(pattern)
        if shared is None:
            shared = _Shared(pattern)
            self._shared[pattern] = shared
            shared.members[member] = 1
            try:
                shared.sub = await self._nc.subscribe(
                    pattern,
                    cb=self._callback(shared),
                    pending_msgs_limit=self._pending_limit,
                    pending_bytes_limit=self._pending_limit * 4096,
                )
                # `ok` must mean subscribed: wait until the server has the SUB.
                await natsio.settle(self._nc)
            except BaseException as e:
                self._shared.pop(pattern, None)
                if not shared.ready.done():
                    shared.ready.set_exception(e)
                    shared.ready.exception()  # retrieved: waiters re-raise their own
                raise
            shared.ready.set_result(None)
            metrics.NATS_SUBSCRIPTIONS.set(len(self._shared))
        else:
            shared.members[member] = shared.members.get(member, 0) + 1
            try:
                await asyncio.shield(shared.ready)
            except Exception:
                shared.members.pop(member, None)
                raise
        member.core_patterns[pattern] = tokens(pattern)

    def detach(self, member: Member, pattern: str) -> _Shared | None:
        """Stop delivering to `member` now; the shared subscription to release, if last."""
        shared = self._shared.get(pattern)
        if shared is None or member not in shared.members:
            return None
        count = shared.members[member] - 1
        if count > 0:
            shared.members[member] = count
            return None
        del shared.members[member]
        member.core_patterns.pop(pattern, None)
        if shared.members:
            return None
        del self._shared[pattern]
        metrics.NATS_SUBSCRIPTIONS.set(len(self._shared))
        return shared

    async def leave(self, member: Member, pattern: str) -> None:
        await self.release(self.detach(member, pattern))

    async def release(self, shared: _Shared | None) -> None:
        if shared is None:
            return
        pattern = shared.pattern
        if shared.sub is not None and not self._nc.is_closed:
            try:
                await shared.sub.unsubscribe()
            except Exception as e:
                log.info("unsubscribe failed", extra={"pattern": pattern, "error": repr(e)})

    def _callback(self, shared: _Shared):  # type: ignore[no-untyped-def]
        pattern = shared.pattern
        members = shared.members

        async def on_msg(msg: Msg) -> None:
            if not self.open:
                return
            subject = msg.subject
            if shared.filter_internal and is_internal_subject(subject):
                return
            frame = envelope.sub_msg(subject, msg.data)
            n = 0
            st: tuple[str, ...] | None = None  # split once per message, if at all
            for member in tuple(members):
                if len(member.core_patterns) > 1:
                    st = st or tokens(subject)
                    if not _is_primary(member, pattern, st):
                        continue
                member.push(frame)
                n += 1
            metrics.ENVELOPES_OUT.inc(n)

        return on_msg
