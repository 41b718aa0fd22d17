"""Core NATS fan-out: one NATS subscription per distinct pattern per process.

A core subscription first *acquires* the shared NATS subscription of its pattern (reference
counted: subscribed on the first, unsubscribed with the last) and, once live, *attaches* its
session as a member. Each NATS message is checked once against what the pattern may deliver
(rules.CoreFilter), encoded once, and the same bytes are queued to every member. A session
whose patterns overlap receives a message only through the smallest of its matching
patterns, so it gets it once.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from shared import envelope, natsio
from ws_gateway import metrics
from ws_gateway.rules import CoreFilter, Tokens, is_primary

log = logging.getLogger("ws_gateway.core")


class Member(Protocol):
    """A session, as the router sees it: its live core patterns, and where frames go."""

    core_patterns: dict[str, Tokens]

    def push(self, frame: bytes) -> bool: ...


class Shared:
    """One NATS subscription, shared by every core subscription on its pattern."""

    __slots__ = ("filter", "live", "pattern", "ready", "refs", "sub")

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        self.filter = CoreFilter(pattern)
        self.refs = 0  # core subscriptions holding it, live or still setting up
        self.live: dict[Member, int] = {}  # member -> its live subscriptions on the pattern
        self.sub: Subscription | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()


class CoreRouter:
    def __init__(self, nc: NATS, pending_msgs_limit: int = 1 << 16) -> None:
        self._nc = nc
        self._shared: dict[str, Shared] = {}
        self._pending_limit = pending_msgs_limit
        # Closed while capabilities are being re-read after a NATS outage: core traffic is
        # at-most-once, so what arrives meanwhile is dropped rather than risk a revoked
        # subscriber getting it.
        self.open = True

    def __len__(self) -> int:
        return len(self._shared)

    async def acquire(self, pattern: str) -> Shared:
        """A reference to the pattern's shared subscription, once the server has its SUB
        (`ok` must mean subscribed). Give it back with `release`, whatever happens."""
        shared = self._shared.get(pattern)
        if shared is not None:
            shared.refs += 1
            try:
                await asyncio.shield(shared.ready)
            except BaseException:
                shared.refs -= 1
                raise
            return shared
        shared = Shared(pattern)
        shared.refs = 1
        self._shared[pattern] = shared
        try:
            shared.sub = await self._nc.subscribe(
                pattern,
                cb=self._callback(shared),
                pending_msgs_limit=self._pending_limit,
                pending_bytes_limit=self._pending_limit * 4096,
            )
            await natsio.settle(self._nc)
        except BaseException as e:
            if self._shared.get(pattern) is shared:
                del self._shared[pattern]
            cause = e if isinstance(e, Exception) else ConnectionError("subscribe cancelled")
            shared.ready.set_exception(cause)
            shared.ready.exception()  # retrieved: waiters re-raise their own
            await asyncio.shield(self._unsubscribe(shared))
            raise
        shared.ready.set_result(None)
        metrics.NATS_SUBSCRIPTIONS.set(len(self._shared))
        return shared

    async def release(self, shared: Shared) -> None:
        """Give back one reference; the last one unsubscribes from NATS."""
        shared.refs -= 1
        if shared.refs > 0:
            return
        if self._shared.get(shared.pattern) is shared:
            del self._shared[shared.pattern]
            metrics.NATS_SUBSCRIPTIONS.set(len(self._shared))
        await self._unsubscribe(shared)

    @staticmethod
    def attach(shared: Shared, member: Member) -> None:
        """`member` receives the pattern's messages from now on."""
        shared.live[member] = shared.live.get(member, 0) + 1
        member.core_patterns[shared.pattern] = shared.filter.tokens

    @staticmethod
    def detach(shared: Shared, member: Member) -> None:
        """One of `member`'s live subscriptions on the pattern ended: with the last, the
        member receives nothing more from it, from this instant."""
        count = shared.live.get(member, 0) - 1
        if count > 0:
            shared.live[member] = count
            return
        shared.live.pop(member, None)
        member.core_patterns.pop(shared.pattern, None)

    async def _unsubscribe(self, shared: Shared) -> None:
        sub, shared.sub = shared.sub, None
        if sub is not None and not self._nc.is_closed:
            try:
                await sub.unsubscribe()
            except Exception as e:
                log.info("unsubscribe failed", extra={"pattern": shared.pattern, "error": repr(e)})

    def _callback(self, shared: Shared):  # type: ignore[no-untyped-def]
        pattern = shared.pattern
        live = shared.live
        check = shared.filter.check

        async def on_msg(msg: Msg) -> None:
            if not self.open:
                return
            subject = msg.subject
            st = check(subject, msg.reply)
            if st is None:
                return
            frame = envelope.sub_msg(subject, msg.data)
            n = 0
            for member in tuple(live):
                patterns = member.core_patterns
                if len(patterns) > 1 and not is_primary(patterns, pattern, st):
                    continue
                member.push(frame)
                n += 1
            metrics.ENVELOPES_OUT.inc(n)

        return on_msg
