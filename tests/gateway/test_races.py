"""Subscriptions with one owner: a setup raced by a revocation, an unsub or a close.

A test hook (ws_gateway/checkpoints.py) holds a subscription's setup right after each of
its awaits; the test revokes, unsubscribes or closes there, then lets the setup go on.
Afterwards: nothing of that subscription reaches the client after the `cap_update` that
ended it or the `unsub`'s `ok`, and the gateway holds nothing more (subscription gauges,
core subscriptions, KV feeds, JetStream consumers back to where they were).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from nats.aio.client import Client as NATS
from prometheus_client import REGISTRY

from shared.client import GatewayClient, RequestError
from shared.users import REVOKED_BUCKET
from tests.gateway.conftest import ALICE_CAPS, ClientFactory, UserFactory
from tests.waits import until, until_async
from ws_gateway.checkpoints import Hold
from ws_gateway.server import Gateway

Env = dict[str, Any]


@dataclass(frozen=True)
class Case:
    name: str
    kind: str  # the checkpoint prefix: sub, kv_sub, js_sub
    request: dict[str, Any]
    steps: tuple[str, ...]  # the setup's await points, in order
    revoke: dict[str, Any]  # capabilities without the right to it
    stream: str | None = None  # whose consumers are counted
    durable: str | None = None


NO_CHAT = {**ALICE_CAPS, "subjects": ["articles.>"]}
NO_ARTICLES = {**ALICE_CAPS, "buckets": {"todos": ["user.{uid}.>"]}}
NO_STREAMS = {**ALICE_CAPS, "streams": {}}

CASES = [
    Case("sub", "sub", {"op": "sub", "target": "chat.room.1"}, ("join", "live"), NO_CHAT),
    Case(
        "kv_sub",
        "kv_sub",
        {"op": "kv_sub", "target": "articles", "data": {"pattern": "a.>"}},
        ("feed", "stream_info", "catchup", "live"),
        NO_ARTICLES,
        stream="KV_articles",
    ),
    Case(
        "kv_sub-since",
        "kv_sub",
        {"op": "kv_sub", "target": "articles", "data": {"pattern": "a.>", "since_revision": 0}},
        ("feed", "stream_info", "catchup", "live"),
        NO_ARTICLES,
        stream="KV_articles",
    ),
    Case(
        "js_sub",
        "js_sub",
        {"op": "js_sub", "target": "chat", "data": {"filter": "chat.room.123", "start_seq": 1}},
        ("stream_info", "tail", "live"),
        NO_STREAMS,
        stream="chat",
    ),
    Case(
        "js_sub-time",
        "js_sub",
        {"op": "js_sub", "target": "chat", "data": {"filter": "chat.room.123", "time_delta": 60}},
        ("stream_info", "first_at", "tail", "live"),
        NO_STREAMS,
        stream="chat",
    ),
    Case(
        "js_sub-durable",
        "js_sub",
        {"op": "js_sub", "target": "chat", "data": {"filter": "chat.room.123", "durable": "d1"}},
        ("stream_info", "durable", "tail", "live"),
        NO_STREAMS,
        stream="chat",
    ),
    Case(
        "js_sub-ack",
        "js_sub",
        {
            "op": "js_sub",
            "target": "chat",
            "data": {"filter": "chat.room.123", "start_seq": 1, "ack": True},
        },
        ("stream_info", "tail", "live"),
        NO_STREAMS,
        stream="chat",
    ),
]

POINTS = [pytest.param(c, step, id=f"{c.name}@{step}") for c in CASES for step in c.steps]
INBOX = "raced"


class Recorder:
    """Every envelope the client got, in order, and a way to await one."""

    def __init__(self, client: GatewayClient) -> None:
        assert client.envelopes is not None
        self._queue = client.envelopes
        self.seen: list[Env] = []

    async def until(self, pred: Callable[[Env], bool], what: str, after: int = 0) -> int:
        """The index of the first envelope at or after `after` satisfying `pred`."""
        try:
            async with asyncio.timeout(10):
                while True:
                    for i in range(after, len(self.seen)):
                        if pred(self.seen[i]):
                            return i
                    after = len(self.seen)
                    self.seen.append(await self._queue.get())
        except TimeoutError:
            raise AssertionError(f"never got {what}; got {self.seen}") from None


def _closes(code: int) -> float:
    return REGISTRY.get_sample_value("gateway_closes_total", {"code": str(code)}) or 0.0


def _gauge(kind: str) -> float:
    value = REGISTRY.get_sample_value("gateway_subscriptions", {"kind": kind})
    return value or 0.0


async def _consumers(nc: NATS, stream: str | None) -> set[str]:
    if stream is None:
        return set()
    return {c.name for c in await nc.jetstream().consumers_info(stream)}


async def _produce(nc: NATS, case: Case, n: int) -> None:
    """Data the raced subscription would receive if it were still alive."""
    js = nc.jetstream()
    if case.kind == "sub":
        await nc.publish("chat.room.1", f'"after {n}"'.encode())
    elif case.kind == "kv_sub":
        await (await js.key_value("articles")).put(f"a.k{n}", f'"after {n}"'.encode())
    else:
        await js.publish("chat.room.123", f'"after {n}"'.encode())


def _of_raced(case: Case) -> Callable[[Env], bool]:
    """Whether an envelope belongs to the raced subscription."""

    def of(env: Env) -> bool:
        if env.get("inbox") == INBOX:
            return True
        if case.kind == "sub":
            return env["op"] == "sub_msg" and env.get("target") == "chat.room.1"
        if case.kind == "kv_sub":
            return env["op"] == "kv_msg" and env.get("target") == "articles"
        return False  # js_msg carries its inbox

    return of


async def _held_nothing(gw: Gateway, nc: NATS, case: Case, consumers: set[str]) -> None:
    hub = gw.hub
    assert hub is not None
    expected = consumers | ({case.durable} if case.durable else set())

    async def released() -> bool:
        return (
            not hub.sessions
            and not hub.closing
            and len(hub.router) == 0
            and len(hub.kv_feeds) == 0
            and len(hub.js_tails) == 0
            and _gauge(case.kind) == 0
            and await _consumers(nc, case.stream) <= expected
        )

    await until_async(released, "the raced subscription to hold nothing", 15)
    if case.durable and case.durable in await _consumers(nc, case.stream):
        info = await nc.jetstream().consumer_info("chat", case.durable)
        assert info.num_waiting == 0  # parked: no pull request of ours outlives us


@dataclass
class Raced:
    """Alice, with a witness subscription, whose raced request is held at a checkpoint."""

    client: GatewayClient
    rec: Recorder
    token: str
    consumers: set[str]  # of the case's stream, before
    hold: Hold
    sent: asyncio.Future[None]


async def _raced(
    gw: Gateway,
    nc: NATS,
    make_user: UserFactory,
    connect: ClientFactory,
    case: Case,
    step: str,
) -> Raced:
    assert gw.hub is not None
    js = nc.jetstream()
    await js.publish("chat.room.123", b'"before"')
    await (await js.key_value("articles")).put("a.k0", b'"before"')
    consumers = await _consumers(nc, case.stream)
    token = await make_user()
    c = await connect(token, record=True)
    rec = Recorder(c)
    await rec.until(lambda e: e["op"] == "cap_update", "the first cap_update")
    await c.send({"op": "sub", "target": "articles.>", "inbox": "witness"})
    await rec.until(lambda e: e["op"] == "ok" and e.get("inbox") == "witness", "witness ok")
    hold = gw.hub.checkpoint.hold(f"{case.kind}.{step}")
    # Not awaited: over long polling the send returns once the request was handled.
    sent = asyncio.ensure_future(c.send({**case.request, "inbox": INBOX}))
    await hold.reached()
    return Raced(c, rec, token, consumers, hold, sent)


async def _nothing_after(nc: NATS, rec: Recorder, case: Case, mark: int) -> None:
    """Produce, then a witness behind it: nothing of the raced subscription after `mark`."""
    for n in range(3):
        await _produce(nc, case, n)
    await nc.publish("articles.witness", b'"w"')
    await rec.until(
        lambda e: e["op"] == "sub_msg" and e.get("target") == "articles.witness",
        "the witness",
        mark,
    )
    late = [e for e in rec.seen[mark + 1 :] if _of_raced(case)(e)]
    assert late == [], f"delivered after the end: {late}"


@pytest.mark.parametrize(("case", "step"), POINTS)
async def test_revoked_during_setup_delivers_nothing_and_holds_nothing(
    gateway: Gateway,
    nc: NATS,
    make_user: UserFactory,
    connect: ClientFactory,
    case: Case,
    step: str,
) -> None:
    """A revocation landing at any await of the setup ends the subscription there: the
    cap_update lists it, nothing of it follows (no ok, no data), nothing is held."""
    r = await _raced(gateway, nc, make_user, connect, case, step)
    await make_user("alice", case.revoke)
    mark = await r.rec.until(
        lambda e: e["op"] == "cap_update" and bool(e["data"]["revoked"]), "the revoking cap_update"
    )
    assert [x["inbox"] for x in r.rec.seen[mark]["data"]["revoked"]] == [INBOX]
    r.hold.release()
    await r.sent
    await _nothing_after(nc, r.rec, case, mark)
    await r.client.close()
    await _held_nothing(gateway, nc, case, r.consumers)


@pytest.mark.parametrize(("case", "step"), POINTS)
async def test_unsub_sent_during_setup_waits_for_it_and_ends_it(
    gateway: Gateway,
    nc: NATS,
    make_user: UserFactory,
    connect: ClientFactory,
    case: Case,
    step: str,
) -> None:
    """An unsub sent while its subscription is being set up is handled after it, never
    before: the subscription's ok, then the unsub's ok, then nothing of it."""
    r = await _raced(gateway, nc, make_user, connect, case, step)
    unsub = asyncio.ensure_future(r.client.send({"op": "unsub", "inbox": INBOX}))
    r.hold.release()
    await r.sent
    await unsub

    def ok(e: Env) -> bool:
        return e["op"] == "ok" and e.get("inbox") == INBOX

    first = await r.rec.until(ok, "the subscription's ok")
    assert r.rec.seen[first].get("target") == case.request["target"]
    mark = await r.rec.until(ok, "the unsub's ok", first + 1)
    assert not [e for e in r.rec.seen if e["op"] == "error"]
    await _nothing_after(nc, r.rec, case, mark)
    await r.client.close()
    await _held_nothing(gateway, nc, case, r.consumers)


@pytest.mark.parametrize(("case", "step"), POINTS)
async def test_session_closed_during_setup_holds_nothing(
    gateway: Gateway,
    nc: NATS,
    make_user: UserFactory,
    connect: ClientFactory,
    case: Case,
    step: str,
) -> None:
    """The session closing (here: its token revoked by a logout) at any await of a setup
    leaves nothing behind: what the setup acquired after the close is released as soon
    as it has it, and the setup delivers nothing."""
    hub = gateway.hub
    assert hub is not None
    r = await _raced(gateway, nc, make_user, connect, case, step)
    jti = hub.verifier.verify(r.token).jti
    await (await nc.jetstream().key_value(REVOKED_BUCKET)).put(jti, b"1")
    assert await r.client.wait_closed() == 4401
    await until(lambda: not hub.sessions, "the session to close", 10)
    r.hold.release()
    with contextlib.suppress(Exception):
        await r.sent  # over long polling: 410, the session is gone
    await _held_nothing(gateway, nc, case, r.consumers)


@pytest.mark.parametrize("change", ["reduced", "disabled"])
async def test_a_record_change_during_the_handshake_read_is_applied(
    gateway: Gateway, nc: NATS, make_user: UserFactory, connect: ClientFactory, change: str
) -> None:
    """A capability change or a disable that lands while the handshake reads the user's
    record is applied to the new session, and no later handshake gets the stale record."""
    assert gateway.hub is not None
    token = await make_user()
    closed_4403 = _closes(4403)
    hold = gateway.hub.checkpoint.hold("admit.read")
    connecting = asyncio.ensure_future(connect(token, record=True))
    await hold.reached()
    if change == "reduced":
        await make_user("alice", NO_CHAT)
    else:
        await make_user("alice", disabled=True)
    seen = await nc.jetstream().key_value("auth_users")
    last = (await seen.get("alice")).revision
    # The watch has delivered the change before the handshake goes on.
    hub = gateway.hub
    await until(lambda: hub._seen.get("alice", 0) >= last, "the watch to see the change", 10)
    hold.release()
    if change == "disabled":
        # Closed 4403 before its first cap_update: the client never sees it open.
        with pytest.raises(ConnectionError):
            await connecting
        assert _closes(4403) == closed_4403 + 1
        assert not hub.sessions
        return
    c = await connecting
    assert c.capabilities["subjects"] == ["articles.>"]
    again = await connect(token)
    assert again.capabilities["subjects"] == ["articles.>"]


async def test_the_python_client_hears_revoked_for_a_subscription_revoked_in_setup(
    gateway: Gateway, make_user: UserFactory, connect: ClientFactory
) -> None:
    """The SDK's pending kv_sub fails with `revoked` when the cap_update lists it: no ok
    will come, and the caller is not left waiting for its timeout."""
    assert gateway.hub is not None
    c = await connect(await make_user())
    await c.cap_updates.get()  # the connect-time one
    hold = gateway.hub.checkpoint.hold("kv_sub.feed")
    pending = asyncio.ensure_future(c.kv_sub("articles", "a.>"))
    await hold.reached()
    await make_user("alice", NO_ARTICLES)
    await c.cap_updates.get()
    hold.release()  # over long polling the request's POST returns only now
    with pytest.raises(RequestError) as e:
        await pending
    assert e.value.code == "revoked"
