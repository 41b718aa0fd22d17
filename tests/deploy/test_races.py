"""Issue 13: races between a subscription's setup and its end, on `make start`'s stack.

Everything a client does goes through nginx (WebSocket `/ws`, long polling `/poll`, the
API `/api/`); the test reads NATS directly only to count JetStream consumers and to
publish the control messages of the last test. One stack serves the whole module.

1. A capability revoked while a `kv_sub` is being set up (WebSocket): nothing of that
   subscription may reach the client after the `cap_update` that no longer allows it.
2. `kv_sub` and `unsub` of the same inbox racing on two HTTP connections (long polling):
   nothing after the `unsub`'s `ok`, and no ghost left that a later revocation misses.
3. Once every session of 1 and 2 is closed, `KV_articles` holds no consumer of theirs.
4. A user subscribed to wide legal patterns (`*.*`, `*.*.*.*`, `>`) receives nothing
   while other users replay history and nobody publishes: the gateway's own pull-consumer
   deliveries (to `_INBOX.<id>`, carrying the stored message's subject) are not core traffic.

Each kv_sub in 1 and 2 names a key no other subscription in the gateway covers (the key
of an article created for that attempt), so the gateway has to create a new shared feed
consumer for it: a real wait on NATS in the middle of the setup, where the race lives.
Figures are printed (run with `-s` to see them when everything passes).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from nats.aio.client import Client as NATS
from websockets.asyncio.client import ClientConnection, connect

from shared import natsio
from shared.subjects import match
from tests.deploy.stackrun import Stack, chat_send_acked, login
from tests.waits import split, until_async

pytestmark = pytest.mark.asyncio(loop_scope="module")

ATTEMPTS = 200  # per race (1 and 2)
REPLAY_ROUNDS = 20  # per replaying connection (4)
CHAT_MESSAGES = 6
ARTICLES = 4
# Seconds between starting the revocation's HTTP request and sending the kv_sub (1).
STAGGER = (0.0, 0.0005, 0.001, 0.0015, 0.002, 0.003)
WAIT = 10.0  # bound of every wait for an envelope
RELEASE_WAIT = 15.0  # bound of the wait for the consumers to be released (3)
PASSWORD = "race-password-13"
WIDE_PATTERNS = ("*.*", "*.*.*.*", ">")
# Published directly on core NATS after the replay window: one legitimate message for
# each wide pattern, so each wide subscription proves it was live all along.
CONTROLS = ("race13.control", "race13.control.four.tokens")
INTERNAL_PREFIXES = ("$", "_INBOX.", "cmd.")
# The races send hundreds of requests per connection, and hundreds of API writes per user,
# within seconds; those rate limits are not what these tests are about: raised out of the way.
STACK_SETTINGS = {
    "CLIENT_OPS_PER_SECOND": "2000",
    "CLIENT_OPS_BURST": "4000",
    "API_WRITES_PER_MINUTE": "60000",
    "API_WRITES_BURST": "5000",
}

Envelope = dict[str, Any]
Pred = Callable[[Envelope], bool]


# ---------------------------------------------------------------------- clients


class Inbound:
    """Every envelope one client received, in order; waiters wake on each arrival."""

    def __init__(self) -> None:
        self.items: list[Envelope] = []
        self.ended: str | None = None
        self._changed = asyncio.Event()

    def add(self, envelopes: list[Envelope]) -> None:
        self.items.extend(envelopes)
        self._changed.set()

    def end(self, why: str) -> None:
        self.ended = why
        self._changed.set()

    def __len__(self) -> int:
        return len(self.items)

    async def wait(self, pred: Pred, what: str, start: int = 0, timeout: float = WAIT) -> int:
        """The index of the first envelope at or after `start` that satisfies `pred`."""
        i = start
        try:
            async with asyncio.timeout(timeout):
                while True:
                    while i < len(self.items):
                        if pred(self.items[i]):
                            return i
                        i += 1
                    if self.ended is not None:
                        raise AssertionError(f"connection ended ({self.ended}) before {what}")
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            seen = self.items[start:][-6:]
            raise AssertionError(
                f"timed out after {timeout} s waiting for {what}; the last envelopes: {seen}"
            ) from None

    def since(self, start: int) -> list[Envelope]:
        return self.items[start:]


class WsPeer:
    """One WebSocket through nginx (bearer token), read continuously into `inbound`."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.inbound = Inbound()
        self._reader = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def open(cls, stack: Stack, token: str) -> WsPeer:
        ws = await connect(
            stack.ws_url,
            additional_headers={"Authorization": f"Bearer {token}"},
            proxy=None,
            open_timeout=10,
            max_size=None,
        )
        peer = cls(ws)
        await peer.inbound.wait(lambda e: e["op"] == "cap_update", "the first cap_update")
        return peer

    async def _read(self) -> None:
        try:
            async for frame in self.ws:
                assert isinstance(frame, str)
                self.inbound.add(split(frame))
        except Exception as e:
            self.inbound.end(repr(e))
        finally:
            self.inbound.end(f"closed {self.ws.close_code}")

    async def send(self, *envelopes: Envelope) -> None:
        for env in envelopes:
            await self.ws.send(json.dumps(env))

    async def close(self) -> None:
        await self.ws.close()
        await self._reader


class PollPeer:
    """One long-polling session through nginx (bearer token), polled continuously."""

    def __init__(self, http: aiohttp.ClientSession, sid: str, token: str) -> None:
        self.http, self.sid = http, sid
        self.headers = {"Authorization": f"Bearer {token}"}
        self.inbound = Inbound()
        self._reader = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def open(cls, stack: Stack, token: str) -> PollPeer:
        http = aiohttp.ClientSession(base_url=stack.url, timeout=aiohttp.ClientTimeout(total=60))
        sid = secrets.token_urlsafe(24)
        try:
            async with http.post(
                "/poll/open", params={"sid": sid}, headers={"Authorization": f"Bearer {token}"}
            ) as r:
                assert r.status == 200, f"poll open: {r.status} {await r.text()}"
        except BaseException:
            await http.close()
            raise
        peer = cls(http, sid, token)
        await peer.inbound.wait(lambda e: e["op"] == "cap_update", "the first cap_update")
        return peer

    async def _read(self) -> None:
        after = 0
        try:
            while True:
                async with self.http.get(
                    "/poll", params={"sid": self.sid, "after": str(after)}, headers=self.headers
                ) as r:
                    if r.status == 410:
                        self.inbound.end("closed (410)")
                        return
                    if r.status != 200:
                        self.inbound.end(f"poll failed: {r.status} {await r.text()}")
                        return
                    body = await r.read()
                    after = int(r.headers.get("Poll-Last-Frame", after))
                if body:
                    self.inbound.add(split(body))
        except Exception as e:
            self.inbound.end(repr(e))

    async def send(self, *envelopes: Envelope, via: aiohttp.ClientSession | None = None) -> None:
        """POST /poll/send, on `via` (another session: another TCP connection) if given."""
        body = "\n".join(json.dumps(e) for e in envelopes)
        async with (via or self.http).post(
            "/poll/send", params={"sid": self.sid}, data=body, headers=self.headers
        ) as r:
            assert r.status == 204, f"poll send: {r.status} {await r.text()}"

    async def close(self) -> None:
        try:
            async with self.http.post(
                "/poll/close", params={"sid": self.sid}, headers=self.headers
            ) as r:
                assert r.status == 204, f"poll close: {r.status} {await r.text()}"
            async with asyncio.timeout(WAIT):
                await self._reader
        finally:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            await self.http.close()


Peer = WsPeer | PollPeer


# ---------------------------------------------------------------------- the API


class Api:
    """The HTTP API through nginx, as admin unless another token is given."""

    def __init__(self, http: aiohttp.ClientSession, admin_token: str) -> None:
        self.http, self.admin = http, admin_token

    async def call(self, method: str, path: str, body: Any = None, token: str | None = None) -> Any:
        async with self.http.request(
            method, path, json=body, headers={"Authorization": f"Bearer {token or self.admin}"}
        ) as r:
            assert r.status in (200, 201), f"{method} {path}: {r.status} {await r.text()}"
            return await r.json()

    async def new_user(self, username: str, caps: dict[str, Any]) -> tuple[str, str]:
        """(id, token) of a new user with these capabilities."""
        body = {"username": username, "password": PASSWORD, "capabilities": caps}
        uid = (await self.call("POST", "/api/users", body))["id"]
        login = {"username": username, "password": PASSWORD}
        async with self.http.post("/api/auth/login", json=login) as r:
            assert r.status == 200, await r.text()
            return uid, (await r.json())["token"]

    async def set_caps(self, uid: str, caps: dict[str, Any]) -> None:
        await self.call("PUT", f"/api/users/{uid}", {"capabilities": caps})

    async def new_article(self, title: str, token: str | None = None) -> tuple[str, int]:
        """(id = its KV key, revision)."""
        out = await self.call("POST", "/api/articles", {"title": title, "body": "x"}, token)
        return out["id"], out["revision"]

    async def touch_article(self, aid: str, title: str) -> int:
        out = await self.call("PUT", f"/api/articles/{aid}", {"title": title, "body": "y"})
        return int(out["revision"])

    async def todo(self, token: str, item: str) -> tuple[str, int]:
        """A todo written by the token's user: (KV key, revision)."""
        body = {"id": item, "title": "barrier", "done": False}
        out = await self.call("POST", "/api/commands/todos.put", body, token)
        return out["key"], out["revision"]


def caps(*, articles: bool, todos: bool = True) -> dict[str, Any]:
    buckets: dict[str, list[str]] = {}
    if todos:
        buckets["todos"] = ["user.{uid}.>"]
    if articles:
        buckets["articles"] = [">"]
    return {"buckets": buckets, "commands": ["todos.put"] if todos else []}


def allows_articles(env: Envelope) -> bool:
    return "articles" in (env["data"]["capabilities"].get("buckets") or {})


def is_cap_update(allowing: bool) -> Pred:
    return lambda e: e["op"] == "cap_update" and allows_articles(e) == allowing


def reply_to(inbox: str) -> Pred:
    return lambda e: e["op"] in ("ok", "error") and e.get("inbox") == inbox


def is_kv_synced(inbox: str) -> Pred:
    return lambda e: (
        e["op"] == "kv_msg" and e.get("inbox") == inbox and e["data"].get("op") == "synced"
    )


def kv_data(env: Envelope, bucket: str) -> str | None:
    """The key of a kv_msg put/delete/purge on `bucket`, else None."""
    if env["op"] != "kv_msg" or env.get("target") != bucket:
        return None
    data = env.get("data") or {}
    return data.get("key") if data.get("op") in ("put", "delete", "purge") else None


async def barrier(api: Api, peer: Peer, token: str, item: str) -> None:
    """Write a todo of the peer's user and wait for it on the peer's own `todos` kv_sub:
    what the gateway received from NATS before that write has reached the peer by then."""
    key, revision = await api.todo(token, item)
    await peer.inbound.wait(
        lambda e: kv_data(e, "todos") == key and e["data"]["revision"] == revision,
        f"barrier todo {key}",
    )


async def open_todos(peer: Peer, uid: str) -> None:
    """The peer's permanent kv_sub on its own todos (the barriers arrive on it)."""
    mark = len(peer.inbound)
    data = {"pattern": f"user.{uid}.>"}
    await peer.send({"op": "kv_sub", "target": "todos", "inbox": "todos", "data": data})
    reply = await peer.inbound.wait(reply_to("todos"), "todos kv_sub reply", mark)
    assert peer.inbound.items[reply]["op"] == "ok", peer.inbound.items[reply]
    await peer.inbound.wait(is_kv_synced("todos"), "todos synced", mark)


async def consumers(nc: NATS, stream: str = "KV_articles") -> int:
    info = await nc.jetstream().stream_info(stream)
    return int(info.state.consumer_count)


# ---------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(Path(tmp_path_factory.mktemp("races")) / "var", **STACK_SETTINGS)
    s.start()
    try:
        yield s
    finally:
        s.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def http(stack: Stack) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(
        base_url=stack.url, timeout=aiohttp.ClientTimeout(total=30)
    ) as session:
        yield session


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def api(http: aiohttp.ClientSession) -> Api:
    token, _ = await login(http, "admin")
    return Api(http, token)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def nc(stack: Stack) -> AsyncIterator[NATS]:
    # NATS asks for credentials: the admin CLI's user (provision) reads consumers too.
    user, password = natsio.credentials(stack.settings, "provision") or (None, None)
    conn = await natsio.nats_connect(
        f"nats://127.0.0.1:{stack.settings.nats_port}", user=user, password=password
    )
    try:
        yield conn
    finally:
        await conn.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def baseline(nc: NATS) -> int:
    """Consumers of KV_articles before any test's session (gateways' own ones included)."""
    return await consumers(nc)


# ---------------------------------------------------------------------- 1. revocation


@dataclass
class RevocationFigures:
    attempts: int = 0
    refused: int = 0  # the revocation came first: the kv_sub was answered `forbidden`
    ended_live: int = 0  # set up before the revocation, ended by it (listed in `revoked`)
    overlapped: int = 0  # the revocation ended it while its setup was still running
    ok_after: int = 0  # of those, answered `ok` after the cap_update (reported, not checked)
    unanswered: int = 0  # of those, never answered: the cap_update's listing ended it
    other: list[str] = field(default_factory=list)
    deliveries: int = 0  # kv_msg put/delete/purge of its key after that cap_update
    synced_after: int = 0  # its `synced` marker after that cap_update
    leaked_attempts: list[int] = field(default_factory=list)

    def __str__(self) -> str:
        return (
            f"revocation race (WebSocket): {self.attempts} attempts: {self.refused} refused, "
            f"{self.ended_live} ended after setup, {self.overlapped} revoked mid-setup "
            f"({self.ok_after} of them answered ok after the cap_update, {self.unanswered} "
            "not answered) "
            f"(other: {self.other[:5]}); kv_msg after revocation: {self.deliveries} "
            f"(+{self.synced_after} synced markers) in {len(self.leaked_attempts)} attempts"
        )


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def revocation_race(stack: Stack, api: Api, baseline: int) -> RevocationFigures:
    """Scenario 1; the WebSocket is closed when it returns."""
    fig = RevocationFigures()
    uid, token = await api.new_user("racer", caps(articles=False))
    ws = await WsPeer.open(stack, token)
    # attempt -> (article id, index of the revoking cap_update, inbox)
    ledger: list[tuple[str, int, str]] = []
    try:
        await open_todos(ws, uid)
        for i in range(ATTEMPTS):
            mark = len(ws.inbound)
            await api.set_caps(uid, caps(articles=True))
            await ws.inbound.wait(is_cap_update(True), f"#{i}: the grant", mark)
            aid, revision = await api.new_article(f"race {i}")
            inbox = f"r{i}"
            mark = len(ws.inbound)
            # The revocation is on its way while the gateway sets the subscription up (new
            # feed consumer, stream info, catch-up reader). The kv_sub leaves at a spread of
            # offsets after the revocation's request, so that the revocation lands in every
            # step of the setup over the attempts: a spread, not a synchronisation (no
            # outcome depends on it; the checks below hold for any interleaving).
            revoke = asyncio.ensure_future(api.set_caps(uid, caps(articles=False)))
            if offset := STAGGER[i % len(STAGGER)]:
                await asyncio.sleep(offset)
            await ws.send(
                {
                    "op": "kv_sub",
                    "target": "articles",
                    "inbox": inbox,
                    "data": {"pattern": aid, "since_revision": revision},
                }
            )
            # The gateway handles one socket's frames in order: the pong says the kv_sub
            # was handled (answered, or ended by the revocation listing it) before it.
            await ws.send({"op": "ping", "inbox": f"p{i}"})
            await revoke
            cap_at = await ws.inbound.wait(is_cap_update(False), f"#{i}: the revocation", mark)
            pong_at = await ws.inbound.wait(
                lambda e, i=i: e["op"] == "pong" and e.get("inbox") == f"p{i}", "pong", mark
            )
            revoked = ws.inbound.items[cap_at]["data"].get("revoked") or []
            listed = any(r.get("inbox") == inbox for r in revoked)
            replies = [k for k in range(mark, pong_at) if reply_to(inbox)(ws.inbound.items[k])]
            reply = ws.inbound.items[replies[0]] if replies else {"op": "none"}
            fig.attempts += 1
            if reply["op"] == "error" and reply["data"]["code"] == "forbidden" and not listed:
                fig.refused += 1
            elif listed and replies and replies[0] < cap_at:
                fig.ended_live += 1
            elif listed:
                fig.overlapped += 1
                fig.ok_after += reply["op"] == "ok"
                fig.unanswered += not replies
            else:
                fig.other.append(f"#{i}: {reply['op']} listed={listed} replies at {replies}")
            ledger.append((aid, cap_at, inbox))
            # A write the revoked subscription must not see; then a barrier so that a
            # delivery of it, if any, is in the log before the next attempt.
            await api.touch_article(aid, f"race {i} after revocation")
            await barrier(api, ws, token, f"r{i}")
        # Every key written once more: a subscription set up too late for its first write
        # (a ghost) still shows here.
        for aid, _, _ in ledger:
            await api.touch_article(aid, "swept")
        await barrier(api, ws, token, "sweep")
    finally:
        await ws.close()
    log = ws.inbound.items
    for i, (aid, cap_at, inbox) in enumerate(ledger):
        late = log[cap_at + 1 :]
        n = sum(1 for e in late if kv_data(e, "articles") == aid)
        s = sum(1 for e in late if is_kv_synced(inbox)(e))
        fig.deliveries += n
        fig.synced_after += s
        if n or s:
            fig.leaked_attempts.append(i)
    print(fig)
    return fig


async def test_revoked_kv_sub_delivers_nothing_after_the_cap_update(
    revocation_race: RevocationFigures,
) -> None:
    """200 times: a kv_sub on a new key and the revocation of the user's capability race;
    after the cap_update that no longer allows it, no kv_msg of it (write, sweep, synced)."""
    fig = revocation_race
    assert fig.attempts == ATTEMPTS
    assert fig.deliveries + fig.synced_after == 0, str(fig)


# ---------------------------------------------------------------------- 2. unsub


@dataclass
class UnsubFigures:
    attempts: int = 0
    unsub_first: int = 0  # unsub answered not_found: the kv_sub was not there yet
    unsub_mid_setup: int = 0  # unsub ok, and the kv_sub's reply came after it
    unsub_after: int = 0  # the kv_sub was set up (ok) before the unsub's ok
    deliveries: int = 0  # kv_msg put/delete/purge of its key after the unsub's ok
    synced_after: int = 0  # its `synced` marker after the unsub's ok
    leaked_attempts: list[int] = field(default_factory=list)
    ghost_deliveries: int = 0  # after the capability was revoked at the end

    def __str__(self) -> str:
        return (
            f"unsub race (long polling): {self.attempts} attempts: {self.unsub_first} unsub "
            f"first, {self.unsub_mid_setup} unsub mid-setup, {self.unsub_after} unsub after "
            f"setup; kv_msg after the unsub's ok: {self.deliveries} (+{self.synced_after} "
            f"synced markers) in {len(self.leaked_attempts)} attempts; after revoking the "
            f"capability at the end: {self.ghost_deliveries}"
        )


def is_unsub_ok(inbox: str) -> Pred:
    # Both replies carry the inbox; only a kv_sub's (or js_sub's) ok says where it starts.
    return lambda e: (
        e["op"] == "ok" and e.get("inbox") == inbox and "position" not in (e.get("data") or {})
    )


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def unsub_race(stack: Stack, api: Api, baseline: int) -> UnsubFigures:
    """Scenario 2; the poll session is closed when it returns."""
    fig = UnsubFigures()
    uid, token = await api.new_user("unsubber", caps(articles=True))
    poll = await PollPeer.open(stack, token)
    # Two more HTTP clients: the kv_sub and the unsub travel on separate TCP connections.
    lanes = [aiohttp.ClientSession(base_url=stack.url) for _ in range(2)]
    ledger: list[tuple[str, int, str]] = []  # (article id, index of the unsub's ok, inbox)
    try:
        await open_todos(poll, uid)
        for n, lane in enumerate(lanes):  # both connections open (and routed) before racing
            mark = len(poll.inbound)
            await poll.send({"op": "ping", "inbox": f"warm{n}"}, via=lane)
            await poll.inbound.wait(lambda e, n=n: e.get("inbox") == f"warm{n}", "pong", mark)
        for i in range(ATTEMPTS):
            aid, revision = await api.new_article(f"unsub {i}")
            inbox = f"u{i}"
            mark = len(poll.inbound)
            kv_sub = {
                "op": "kv_sub",
                "target": "articles",
                "inbox": inbox,
                "data": {"pattern": aid, "since_revision": revision},
            }
            await asyncio.gather(
                poll.send(kv_sub, via=lanes[0]),
                poll.send({"op": "unsub", "inbox": inbox}, via=lanes[1]),
            )
            first = await poll.inbound.wait(reply_to(inbox), f"#{i}: a reply", mark)
            second = await poll.inbound.wait(reply_to(inbox), f"#{i}: the second reply", first + 1)
            replies = {first: poll.inbound.items[first], second: poll.inbound.items[second]}
            unsub_at = next((k for k, e in replies.items() if is_unsub_ok(inbox)(e)), None)
            sub_at = next((k for k in replies if k != unsub_at), None)
            fig.attempts += 1
            if unsub_at is None:
                fig.unsub_first += 1
                if any(e["op"] == "ok" for e in replies.values()):
                    # The kv_sub is live: end it the ordinary way (nothing racing).
                    mark = len(poll.inbound)
                    await poll.send({"op": "unsub", "inbox": inbox})
                    unsub_at = await poll.inbound.wait(is_unsub_ok(inbox), "unsub ok", mark)
                else:
                    unsub_at = second
            elif sub_at is not None and sub_at > unsub_at:
                fig.unsub_mid_setup += 1
            else:
                fig.unsub_after += 1
            ledger.append((aid, unsub_at, inbox))
            await api.touch_article(aid, f"unsub {i} after unsub")
            await barrier(api, poll, token, f"u{i}")
        # Ghosts (set up after their unsub, unknown to the session) would outlive a
        # revocation too: revoke, write every key again, and look.
        mark = len(poll.inbound)
        await api.set_caps(uid, caps(articles=False))
        revoked_at = await poll.inbound.wait(is_cap_update(False), "the revocation", mark)
        for aid, _, _ in ledger:
            await api.touch_article(aid, "after the revocation")
        await barrier(api, poll, token, "sweep")
    finally:
        try:
            await poll.close()
        finally:
            for lane in lanes:
                await lane.close()
    log = poll.inbound.items
    keys = set()
    for i, (aid, unsub_at, inbox) in enumerate(ledger):
        keys.add(aid)
        late = log[unsub_at + 1 : revoked_at]
        n = sum(1 for e in late if kv_data(e, "articles") == aid)
        s = sum(1 for e in log[unsub_at + 1 :] if is_kv_synced(inbox)(e))
        fig.deliveries += n
        fig.synced_after += s
        if n or s:
            fig.leaked_attempts.append(i)
    fig.ghost_deliveries = sum(1 for e in log[revoked_at + 1 :] if kv_data(e, "articles") in keys)
    print(fig)
    return fig


async def test_unsubscribed_kv_sub_delivers_nothing_after_the_unsub_ok(
    unsub_race: UnsubFigures,
) -> None:
    """200 times: kv_sub and unsub of one inbox as two concurrent /poll/send requests;
    after the unsub's ok, no kv_msg of it; after a revocation at the end, none either."""
    fig = unsub_race
    assert fig.attempts == ATTEMPTS
    assert fig.deliveries + fig.synced_after == 0, str(fig)
    assert fig.ghost_deliveries == 0, str(fig)


# ---------------------------------------------------------------------- 3. release


async def test_closed_sessions_hold_no_consumer(
    revocation_race: RevocationFigures, unsub_race: UnsubFigures, baseline: int, nc: NATS
) -> None:
    """After every session of 1 and 2 closed, KV_articles is back to its consumers from
    before them (the gateways' own watch consumers are on other streams, but counted)."""
    right_after = await consumers(nc)
    latest = right_after

    async def released() -> bool:
        nonlocal latest
        latest = await consumers(nc)
        return latest <= baseline

    try:
        await until_async(released, "KV_articles consumers back to baseline", RELEASE_WAIT)
    finally:
        print(
            f"consumers of KV_articles: baseline {baseline}, right after close {right_after}, "
            f"{RELEASE_WAIT:.0f} s later {latest} ({latest - baseline} left)"
        )
    assert latest == baseline


# ---------------------------------------------------------------------- 4. wide patterns


async def replay(peer: WsPeer, last_chat_seq: int, rounds: int) -> None:
    """js_sub chat from seq 1 (all of it) and kv_sub articles `>` (until synced), each
    ended after it completed; `rounds` times."""
    for r in range(rounds):
        mark = len(peer.inbound)
        js = {"op": "js_sub", "target": "chat", "inbox": f"j{r}", "data": {"start_seq": 1}}
        await peer.send(js)
        await peer.inbound.wait(
            lambda e, r=r: (
                e["op"] == "js_msg"
                and e.get("inbox") == f"j{r}"
                and e["data"]["seq"] == last_chat_seq
            ),
            f"js replay {r} complete",
            mark,
        )
        await peer.send({"op": "unsub", "inbox": f"j{r}"})
        await peer.inbound.wait(is_unsub_ok(f"j{r}"), f"js unsub {r}", mark)
        mark = len(peer.inbound)
        await peer.send({"op": "kv_sub", "target": "articles", "inbox": f"k{r}"})
        await peer.inbound.wait(is_kv_synced(f"k{r}"), f"kv replay {r} synced", mark)
        await peer.send({"op": "unsub", "inbox": f"k{r}"})
        await peer.inbound.wait(is_unsub_ok(f"k{r}"), f"kv unsub {r}", mark)


async def test_wide_patterns_receive_no_foreign_deliveries(
    stack: Stack, api: Api, http: aiohttp.ClientSession, nc: NATS
) -> None:
    """A user with subject capabilities `*.*`, `*.*.*.*` and `>` subscribes to each (three
    WebSockets, and `*.*` over long polling) after every message was written; while alice
    and bob replay chat and articles and nobody publishes, it receives nothing. Then one
    control per pattern, published on core NATS, arrives: the subscriptions were live."""
    alice, _ = await login(http, "alice")
    bob, _ = await login(http, "bob")
    for n in range(CHAT_MESSAGES):
        await chat_send_acked(http, alice, f"room{n % 3}", f"message {n}", f"wide-{n}", WAIT)
    for n in range(ARTICLES):
        await api.new_article(f"wide {n}", alice)
    last_chat_seq = (await nc.jetstream().stream_info("chat")).state.last_seq
    assert last_chat_seq >= CHAT_MESSAGES

    wide_caps = {"subjects": list(WIDE_PATTERNS)}
    _, wide = await api.new_user("wide", wide_caps)
    peers: list[tuple[str, str, Peer]] = []  # (transport, pattern, peer)
    replayers: list[WsPeer] = []
    try:
        for pattern in WIDE_PATTERNS:
            peers.append(("ws", pattern, await WsPeer.open(stack, wide)))
        peers.append(("poll", "*.*", await PollPeer.open(stack, wide)))
        marks: list[int] = []
        for _, pattern, peer in peers:
            mark = len(peer.inbound)
            await peer.send({"op": "sub", "target": pattern, "inbox": "wide"})
            ok = await peer.inbound.wait(reply_to("wide"), f"sub {pattern}", mark)
            assert peer.inbound.items[ok]["op"] == "ok", peer.inbound.items[ok]
            marks.append(ok + 1)

        for token in (alice, alice, bob, bob):
            replayers.append(await WsPeer.open(stack, token))
        await asyncio.gather(*(replay(p, last_chat_seq, REPLAY_ROUNDS) for p in replayers))

        # The window is over (every replay completed). The controls follow it on core NATS.
        for subject in CONTROLS:
            await nc.publish(subject, b'{"control": true}')
        await nc.flush()
        foreign: dict[str, int] = {}
        mismatched: list[str] = []
        for (transport, pattern, peer), mark in zip(peers, marks, strict=True):
            expected = [s for s in CONTROLS if match(pattern, s)]
            for subject in expected:
                await peer.inbound.wait(
                    lambda e, s=subject: e["op"] == "sub_msg" and e.get("target") == s,
                    f"control {subject} on {pattern} ({transport})",
                    mark,
                )
            got = [e for e in peer.inbound.since(mark) if e["op"] == "sub_msg"]
            foreign[f"{pattern} ({transport})"] = sum(1 for e in got if e["target"] not in CONTROLS)
            mismatched += [
                f"{e['target']} on {pattern} ({transport})"
                for e in got
                if not match(pattern, e["target"]) or e["target"].startswith(INTERNAL_PREFIXES)
            ]
    finally:
        for p in [*replayers, *(peer for _, _, peer in peers)]:
            await p.close()
    print(
        f"wide patterns: foreign sub_msg while {len(replayers)} connections replayed "
        f"{REPLAY_ROUNDS} times ({last_chat_seq} chat messages, {ARTICLES}+ articles) and "
        f"nobody published: {foreign} (total {sum(foreign.values())}); subjects outside "
        f"their pattern: {len(mismatched)} {sorted(set(mismatched))[:6]}"
    )
    assert sum(foreign.values()) == 0, foreign
    assert mismatched == []
