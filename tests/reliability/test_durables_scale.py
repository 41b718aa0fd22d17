"""Issue 21 on `make start`'s stack with the 3-node NATS cluster (every stream R3): durable
js_subs are records in KV `gw_durables`, and every js_sub is a cursor on one shared tail
consumer per stream per gateway process (README, "Behaviour the protocol leaves open").

R10  Scale: N users, each with one connection to each of the two gateways, each connection
     one durable (`ack: true` on the first gateway, `ack: false` on the second) and one
     tailer: 2N durables and 2N tailers, every filter distinct, on one stream. All `ok`;
     one message published per filter reaches its subscriber; the stream's NATS consumer
     count, sampled throughout, stays within 1 per gateway process.
R11  kill -9 of the gateway process holding an `ack: true` durable while messages are
     published: the client resumes the durable on the other gateway. Lost 0 (every message
     acked before the kill or delivered after the resume); duplicates counted.
R12  Connect / drop / resume cycles of one durable (clean closes and aborted sockets, on
     either gateway at random; the last one clean), a message published while away and one
     while connected in each: every resume `ok`, nothing lost (duplicates counted, by how
     the last holder left), `ok.position` the first delivery, the floor saved on the last
     leave, exactly one key left in gw_durables and no NATS consumer named for it.

One stack serves the module (started once; ~9 s with the cluster). Clients connect to each
gateway's own port (not through nginx), so the test knows which process holds what. Users
are written to `auth_users` and their tokens issued with the stack's key, as the gateway
tests do: 1,000 argon2 hashes through the API would cost minutes and test nothing here.
The per-user caps need no raising: every user holds at most 2 durables on a stream and 2
JetStream readers per gateway (MAX_DURABLES_PER_USER 16, MAX_READERS_PER_USER 64).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import msgspec
import pytest
import pytest_asyncio
from nats.aio.client import Client as NATS
from nats.js import api
from nats.js.client import JetStreamContext
from websockets.exceptions import ConnectionClosed

from deploy import stack as ops
from shared import kvwire, natsio
from shared.auth import TokenIssuer
from shared.capabilities import DURABLES_BUCKET, Capabilities
from shared.client import ClientSubscription, GatewayClient, RequestError, WsTransport
from shared.settings import Settings
from shared.tasks import cancel_and_wait
from shared.users import USERS_BUCKET, UserRecord, encode_user
from tests.deploy.stackrun import Stack
from tests.reliability.conftest import FULL, Figures, scale
from tests.reliability.helpers import ms, summary
from tests.waits import until, until_async

pytestmark = pytest.mark.asyncio(loop_scope="module")

# The documented bound (README): one shared tail consumer per stream per gateway process.
CONSUMERS_PER_PROCESS = 1
# The acking client of R11 sends one op per message; the default 50 ops/s would refuse acks.
STACK_SETTINGS = {"CLIENT_OPS_PER_SECOND": "5000", "CLIENT_OPS_BURST": "10000"}
SETUP_WORKERS = 50  # users being connected and subscribed at once (R10)
SAMPLE_EVERY = 0.05  # seconds between consumer-count samples (sampling, not synchronisation)
WAIT = 60.0 if FULL else 30.0  # bound of every wait for deliveries
REPLY_WAIT = 30.0 if FULL else 10.0  # bound of the wait for one js_sub's reply (R10)
# Bound of R10's whole subscribing phase (fast: the module stays inside pytest's 120 s).
SETUP_DEADLINE = 300.0 if FULL else 30.0
DURABLES_STREAM = kvwire.stream_of(DURABLES_BUCKET)


# ---------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(tmp_path_factory.mktemp("durables") / "var", nats_cluster=3, **STACK_SETTINGS)
    s.start()
    try:
        yield s
    finally:
        s.stop()
    assert s.leftovers() == []


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack_nc(stack: Stack) -> AsyncIterator[NATS]:
    """The stack's NATS as the admin CLI's user (creates streams, writes users, reads all)."""
    user, password = natsio.credentials(stack.settings, "provision") or (None, None)
    conn = await natsio.nats_connect(
        servers=list(stack.settings.nats_url), user=user, password=password, connect_timeout=5
    )
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def stack_issuer(stack: Stack) -> TokenIssuer:
    return TokenIssuer.from_settings(stack.settings)


# ---------------------------------------------------------------------- helpers


def gateway_urls(s: Settings) -> list[str]:
    return [f"ws://{s.host}:{port}/ws" for port in s.gateway_ports]


async def make_stream(js: JetStreamContext, s: Settings, name: str) -> None:
    """A stream `<name>.>` as provisioning makes one (replicas, allow_direct, limits)."""
    await js.add_stream(
        api.StreamConfig(
            name=name,
            subjects=[f"{name}.>"],
            num_replicas=s.nats_replicas,
            storage=api.StorageType.FILE,
            allow_direct=True,
            max_consumers=s.nats_max_consumers,
        )
    )


async def make_users(
    js: JetStreamContext, issuer: TokenIssuer, uids: list[str], stream: str
) -> dict[str, str]:
    """Write a user record per uid (allowed every filter of `stream`); their tokens."""
    kv = await js.key_value(USERS_BUCKET)
    caps = Capabilities(streams={stream: [f"{stream}.>"]})

    async def one(uid: str) -> None:
        record = UserRecord(id=uid, username=uid, display_name=uid, capabilities=caps)
        await kv.put(uid, encode_user(record))

    for i in range(0, len(uids), 200):
        await asyncio.gather(*(one(uid) for uid in uids[i : i + 200]))
    return {uid: issuer.issue(uid)[0] for uid in uids}


async def one_durable_user(
    js: JetStreamContext, s: Settings, issuer: TokenIssuer, stream: str, uid: str, name: str
) -> tuple[str, str]:
    """A fresh stream and one user allowed it: the user's token and the durable's key."""
    await make_stream(js, s, stream)
    token = (await make_users(js, issuer, [uid], stream))[uid]
    return token, f"{stream}.{uid}.{name}"


async def js_sub(
    client: GatewayClient, stream: str, flt: str, timeout: float = 30.0, **options: Any
) -> ClientSubscription:
    """`GatewayClient.js_sub` with a bound of our own on the reply (the SDK's is 10 s)."""
    inbox = client.new_inbox()
    sub = ClientSubscription(client, "js_sub", stream, inbox, flt)
    client.subs[inbox] = sub
    try:
        reply = await client.request(
            "js_sub", stream, {"filter": flt, **options}, inbox=inbox, timeout=timeout
        )
    except BaseException:
        client.subs.pop(inbox, None)
        raise
    sub.ok = reply.get("data") or {}
    return sub


async def consumer_names(js: JetStreamContext, stream: str) -> list[str]:
    names: list[str] = []
    while True:
        page = await js._api_request(  # nats-py has no consumer-names call
            f"$JS.API.CONSUMER.NAMES.{stream}",
            json.dumps({"offset": len(names)}).encode(),
            timeout=5,
        )
        got = page.get("consumers") or []
        names += got
        if not got or len(names) >= page.get("total", 0):
            return names


async def stream_names(js: JetStreamContext) -> list[str]:
    names: list[str] = []
    while True:
        page = await js._api_request(
            "$JS.API.STREAM.NAMES", json.dumps({"offset": len(names)}).encode(), timeout=5
        )
        got = page.get("streams") or []
        names += got
        if not got or len(names) >= page.get("total", 0):
            return names


async def durable_keys(js: JetStreamContext, stream: str) -> dict[str, int]:
    """Every gw_durables key of `stream` → the messages stored for it (the stream leader's
    count: no consumer, unlike a KV listing, and no replica that lags behind)."""
    subjects = kvwire.subject_of(DURABLES_BUCKET, f"{stream}.>")
    info = await js.stream_info(DURABLES_STREAM, subjects_filter=subjects)
    offset = len(kvwire.subject_of(DURABLES_BUCKET, ""))
    return {subject[offset:]: n for subject, n in (info.state.subjects or {}).items()}


async def consumer_count(js: JetStreamContext, stream: str) -> int:
    return (await js.stream_info(stream)).state.consumer_count


class ConsumerSampler:
    """The NATS consumer count of some streams, sampled every SAMPLE_EVERY s in the body
    (and once more at its end): the maximum and how many samples it took."""

    def __init__(self, js: JetStreamContext, streams: Iterable[str]) -> None:
        self.js = js
        self.max: dict[str, int] = dict.fromkeys(streams, 0)
        self.samples = 0
        self.failed = 0
        self._task: asyncio.Task[None] | None = None

    async def sample(self) -> None:
        for stream in self.max:
            self.max[stream] = max(self.max[stream], await consumer_count(self.js, stream))
        self.samples += 1

    async def _run(self) -> None:
        while True:
            try:
                await self.sample()
            except Exception:
                self.failed += 1  # a slow reply under load: the next sample counts
            await asyncio.sleep(SAMPLE_EVERY)  # the sampling interval

    async def __aenter__(self) -> ConsumerSampler:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        # cancel_and_wait: a cancel landing as a sample's reply does is swallowed by
        # Python 3.11's wait_for (in nats-py): cancelled once, this loop ran on for good.
        await cancel_and_wait(self._task)
        await self.sample()


async def bounded_workers(
    fn: Callable[[int], Awaitable[None]], items: range, workers: int
) -> list[BaseException]:
    """Run fn(i) for every i, at most `workers` at once; the exceptions raised."""
    todo = iter(items)
    errors: list[BaseException] = []

    async def worker() -> None:
        for i in todo:
            try:
                await fn(i)
            except Exception as e:
                errors.append(e)

    await asyncio.gather(*(worker() for _ in range(workers)))
    return errors


async def close_all(clients: list[GatewayClient]) -> None:
    for i in range(0, len(clients), 200):
        await asyncio.gather(*(c.close() for c in clients[i : i + 200]), return_exceptions=True)


def payload(i: int) -> bytes:
    return json.dumps({"i": i}).encode()


async def durable_floor(js: JetStreamContext, key: str) -> int | None:
    """The floor in the durable's record, read from the stream leader: a KV get is a direct
    get, which any replica may answer before it has applied the latest write."""
    try:
        msg = await js.get_last_msg(DURABLES_STREAM, kvwire.subject_of(DURABLES_BUCKET, key))
    except Exception:
        return None
    return int(msgspec.json.decode(msg.data or b"{}").get("floor", -1))


async def placement(stack: Stack, js: JetStreamContext) -> str:
    """Which NATS node each gateway process is connected to (monitoring /connz), and which
    node leads KV_gw_durables (a KV get is a direct get: any of its replicas may answer)."""
    s = stack.settings
    where: dict[str, str] = {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
        for i in range(s.nats_cluster):
            url = f"http://127.0.0.1:{s.nats_monitor_port + i}/connz?limit=1024"
            async with http.get(url) as r:
                for c in (await r.json()).get("connections") or []:
                    if str(c.get("name", "")).startswith("ws_gateway:"):
                        where[c["name"]] = f"n{i}"
    info = await js.stream_info(DURABLES_STREAM)
    leader = info.cluster.leader if info.cluster else None
    return f"gateways on {dict(sorted(where.items()))}, {DURABLES_STREAM} leader {leader}"


def gateway_pid(stack: Stack, port: int) -> int:
    info = next(p for p in ops._process_info(stack.layout) if p["name"] == f"ws_gateway_{port}")
    assert info["statename"] == "RUNNING", info
    return int(info["pid"])


# ---------------------------------------------------------------------- R10 scale


@dataclass
class Held:
    sub: ClientSubscription
    subject: str  # its filter: one literal subject each
    kind: str  # "durable" | "tailer"
    ack: bool = False


async def test_durables_and_tailers_at_scale(
    stack: Stack, stack_nc: NATS, stack_issuer: TokenIssuer, figures: Figures
) -> None:
    s = stack.settings
    js = stack_nc.jetstream(timeout=10)
    stream = "dscale"
    await make_stream(js, s, stream)
    n_users = scale(50, 1000)
    uids = [f"ds-{i:04d}" for i in range(n_users)]
    tokens = await make_users(js, stack_issuer, uids, stream)
    urls = gateway_urls(s)
    bound = CONSUMERS_PER_PROCESS * s.gateway_procs
    clients: list[GatewayClient] = []
    held: list[Held] = []
    connect_t: list[float] = []
    durable_t: list[float] = []
    tailer_t: list[float] = []
    not_created: list[str] = []

    refused: list[str] = []  # js_subs answered with an error (the test goes on without them)

    async def subscribe(
        client: GatewayClient, g: int, kind: str, flt: str, times: list[float], **options: Any
    ) -> ClientSubscription | None:
        t0 = time.monotonic()
        try:
            sub = await js_sub(client, stream, flt, timeout=REPLY_WAIT, **options)
        except (RequestError, TimeoutError) as e:
            why = str(e) or f"no reply within {REPLY_WAIT:.0f} s"
            refused.append(
                f"{kind} {flt} on gateway {g + 1} after {ms(time.monotonic() - t0)}: {why}"
            )
            return None
        times.append(time.monotonic() - t0)
        return sub

    async def setup(u: int) -> None:
        uid = uids[u]
        for g, url in enumerate(urls):
            t0 = time.monotonic()
            client = await GatewayClient.connect(url, token=tokens[uid], open_timeout=30)
            clients.append(client)
            connect_t.append(time.monotonic() - t0)
            flt = f"{stream}.d.{uid}.{g}"
            d = await subscribe(client, g, "durable", flt, durable_t, durable=f"d{g}", ack=g == 0)
            if d is not None:
                if d.ok.get("durable") != "created":
                    not_created.append(f"{flt}: {d.ok}")
                held.append(Held(d, flt, "durable", ack=g == 0))
            flt = f"{stream}.t.{len(urls) * u + g}"
            t = await subscribe(client, g, "tailer", flt, tailer_t)
            if t is not None:
                held.append(Held(t, flt, "tailer"))

    try:
        async with ConsumerSampler(js, [stream, DURABLES_STREAM]) as sampler:
            t0 = time.monotonic()
            try:
                async with asyncio.timeout(SETUP_DEADLINE):
                    errors = await bounded_workers(setup, range(n_users), SETUP_WORKERS)
            except TimeoutError:
                raise AssertionError(
                    f"subscribing not done in {SETUP_DEADLINE:.0f} s: {len(held)} js_subs ok, "
                    f"{len(refused)} refused ({refused[:3]})"
                ) from None
            subscribe_s = time.monotonic() - t0
            assert errors == [], f"{len(errors)} users failed to connect: {errors[:5]!r}"
            asked = 2 * len(urls) * n_users

            # One message per filter, then every subscriber's first envelope.
            t0 = time.monotonic()
            seqs: dict[str, int] = {}
            for i in range(0, len(held), 256):
                chunk = held[i : i + 256]
                acks = await asyncio.gather(
                    *(js.publish(h.subject, payload(i + k)) for k, h in enumerate(chunk))
                )
                seqs.update((h.subject, a.seq) for h, a in zip(chunk, acks, strict=True))
            publish_s = time.monotonic() - t0
            wrong: list[str] = []
            missing: list[str] = []

            async def receive(h: Held) -> bool:
                try:
                    env = await h.sub.get(timeout=WAIT)
                except TimeoutError:
                    missing.append(h.subject)
                    return False
                data = env.get("data") or {}
                if (
                    env["op"] != "js_msg"
                    or data.get("seq") != seqs[h.subject]
                    or data.get("subject") != h.subject
                ):
                    wrong.append(f"{h.subject}: {env}")
                    return False
                if h.ack:
                    await h.sub.ack(int(data["seq"]))
                return True

            got = await asyncio.gather(*(receive(h) for h in held))
            deliver_s = time.monotonic() - t0
            delivered = sum(got)
            extra = sum(h.sub.queue.qsize() for h in held)
        during = dict(sampler.max)
        nodes = await placement(stack, js)
        # Every durable is one key in gw_durables (and nothing else there for this stream).
        keys = await durable_keys(js, stream)
    finally:
        await close_all(clients)
    # The tails go with their last member: no consumer left on the stream.
    left_s = await until_async(
        lambda: _no_consumers(js, stream), f"no consumer left on {stream}", WAIT
    )
    n_durables = sum(1 for h in held if h.kind == "durable")
    n_tailers = len(held) - n_durables
    figures.add(
        "R10",
        "test_durables_and_tailers_at_scale",
        f"3 NATS nodes (R3), 2 gateway processes: {n_users} users, each with one connection "
        f"to each gateway holding one durable js_sub (ack: true on the first, false on the "
        f"second) and one tailer: {n_durables} durables + {n_tailers} tailers on stream "
        f"{stream}, every filter distinct; then one message published per filter; the "
        f"stream's consumer_count sampled every {ms(SAMPLE_EVERY)} throughout",
        f"{len(held)} of {asked} js_subs ok ({len(refused)} refused) in {subscribe_s:.1f} s "
        f"({SETUP_WORKERS} users at a time; "
        f"connect {summary(connect_t)}; durable js_sub {summary(durable_t)}; tailer js_sub "
        f"{summary(tailer_t)}); {len(seqs)} messages published in {ms(publish_s)}, "
        f"delivered {delivered}/{len(held)} ({len(wrong)} wrong, {len(missing)} missing, "
        f"{extra} extra) {ms(deliver_s)} after the first publish; NATS consumers on "
        f"{stream}: max {during[stream]} (bound {bound} = {CONSUMERS_PER_PROCESS} per "
        f"gateway process; {sampler.samples} samples), 0 {ms(left_s)} after all closed; "
        f"{DURABLES_STREAM} consumers max {during[DURABLES_STREAM]} (transient: the "
        f"per-user cap check lists a user's keys); gw_durables keys {len(keys)}; {nodes}",
        max_consumers=during[stream],
        samples=sampler.samples,
        sample_failures=sampler.failed,
        subscribe_seconds=round(subscribe_s, 2),
        delivered=delivered,
        refused=refused[:20],
        wrong=wrong[:10],
        missing=missing[:10],
    )
    assert refused == [], f"{len(refused)} of {asked} js_subs refused: {refused[:5]}"
    assert not_created == [], not_created[:5]
    assert wrong == [] and missing == [] and delivered == len(held)
    assert extra == 0
    assert 0 < during[stream] <= bound, f"{during[stream]} consumers on {stream}"
    assert len(keys) == 2 * n_users


async def _no_consumers(js: JetStreamContext, stream: str) -> bool:
    return await consumer_count(js, stream) == 0


# ---------------------------------------------------------------------- R11 kill -9


@dataclass
class Reader:
    """What one client received on a durable js_sub, acking each message (`ack`)."""

    ack: bool
    seqs: list[int] = field(default_factory=list)
    acked: list[int] = field(default_factory=list)  # acks sent while `counting`
    errors: list[dict[str, Any]] = field(default_factory=list)
    counting: bool = True


async def read(client: GatewayClient, sub: ClientSubscription, r: Reader) -> None:
    """Until the connection closes (then what is queued) or the task is cancelled."""
    closed = asyncio.ensure_future(client.ws.wait_closed())
    getter: asyncio.Future[dict[str, Any]] | None = None
    try:
        while True:
            env = sub.get_nowait()
            if env is None:
                getter = asyncio.ensure_future(sub.queue.get())
                done, _ = await asyncio.wait({getter, closed}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    return
                env = getter.result()
            if env["op"] == "error":
                r.errors.append(env["data"])
                continue
            if env["op"] != "js_msg":
                continue
            seq = int(env["data"]["seq"])
            r.seqs.append(seq)
            if r.ack:
                try:
                    await sub.ack(seq)
                except (ConnectionClosed, ConnectionError):
                    continue
                if r.counting:
                    r.acked.append(seq)
    finally:
        waiting = [f for f in (closed, getter) if f is not None]
        for f in waiting:
            f.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)


async def test_kill_9_of_the_gateway_holding_an_ack_durable(
    stack: Stack, stack_nc: NATS, stack_issuer: TokenIssuer, figures: Figures
) -> None:
    s = stack.settings
    js = stack_nc.jetstream(timeout=10)
    stream, flt, name, uid = "dkill", "dkill.m", "k", "dk-0001"
    token, key = await one_durable_user(js, s, stack_issuer, stream, uid, name)
    urls = gateway_urls(s)
    n = scale(300, 1500)
    after_kill = n // 5  # published only once the kill is done (the rest: around it)
    published: list[int] = []
    killed = asyncio.Event()
    first, second = Reader(ack=True), Reader(ack=True)
    tasks: list[asyncio.Task[Any]] = []
    c1 = c2 = None
    try:
        c1 = await GatewayClient.connect(urls[0], token=token, open_timeout=10)
        sub1 = await js_sub(c1, stream, flt, durable=name, ack=True)
        assert sub1.ok.get("durable") == "created", sub1.ok
        tasks.append(asyncio.create_task(read(c1, sub1, first)))

        async def publish() -> None:
            for i in range(n):
                if i == n - after_kill:
                    await killed.wait()  # bounded by the publisher's await below
                published.append((await js.publish(flt, payload(i))).seq)
                await asyncio.sleep(0.01)  # pacing: ~100 messages a second

        publisher = asyncio.create_task(publish())
        tasks.append(publisher)
        # Kill once the first client has acked a third, and the durable's floor as saved in
        # gw_durables (at most once a second) has moved: the resume has a floor to start from.
        await until(lambda: len(first.acked) >= n // 3, "a third acked by the first client")

        async def floor_moved() -> bool:
            return (await durable_floor(js, key) or 0) >= published[0]

        await until_async(floor_moved, "the durable's floor saved past its start", 10)
        pid = gateway_pid(stack, s.gateway_ports[0])
        first.counting = False
        acked_before = set(first.acked)
        delivered_before = set(first.seqs)
        published_at_kill = len(published)
        t_kill = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        killed.set()
        assert await c1.wait_closed(timeout=10) is not None

        # Resume at once on the other gateway.
        c2 = await GatewayClient.connect(urls[1], token=token, open_timeout=10)
        try:
            sub2 = await js_sub(c2, stream, flt, durable=name, ack=True)
        except RequestError as e:
            figures.add(
                "R11",
                "test_kill_9_of_the_gateway_holding_an_ack_durable",
                "kill -9 of the gateway holding an ack: true durable; resume on the other",
                f"the resume was refused: {e}",
            )
            raise
        resume_s = time.monotonic() - t_kill
        tasks.append(asyncio.create_task(read(c2, sub2, second)))
        async with asyncio.timeout(WAIT):
            await publisher
        try:
            await until(
                lambda: set(published) <= acked_before | set(second.seqs),
                "every message acked before the kill or delivered after the resume",
                WAIT,
            )
        except AssertionError:
            pass  # counted as lost below
        first_after = time.monotonic() - t_kill
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for c in (c1, c2):
            if c is not None:
                await c.close()
        # supervisord restarts the killed gateway: the stack serves again for what follows.
        await stack.gateways_serving(timeout=60)
    lost = sorted(set(published) - acked_before - set(second.seqs))
    everything = first.seqs + second.seqs
    dups = len(everything) - len(set(everything))
    redelivered_acked = len(acked_before & set(second.seqs))
    unacked_at_kill = sorted(delivered_before - acked_before)
    position = sub2.ok.get("position")
    first_seq = second.seqs[0] if second.seqs else None
    figures.add(
        "R11",
        "test_kill_9_of_the_gateway_holding_an_ack_durable",
        f"3 NATS nodes (R3): an ack: true durable js_sub on the first gateway, acking each "
        f"message, while {n} messages are published (~100/s); kill -9 of that gateway once a "
        f"third is acked and the floor saved; the client resumes the durable at once on the "
        f"second gateway (directly) and acks on",
        f"{len(published)} published ({published_at_kill} before the kill); acked before the "
        f"kill {len(acked_before)}, delivered but unacked then {len(unacked_at_kill)}; "
        f"kill -> resumed ok {ms(resume_s)} ({sub2.ok.get('durable')}, position {position}, "
        f"first delivered {first_seq}); lost {len(lost)}, duplicates {dups} (of them acked "
        f"before the kill and delivered again: {redelivered_acked}; a moving floor is saved at "
        f"most once a second); all accounted for {ms(first_after)} after the kill",
        lost=lost[:20],
        duplicates=dups,
        redelivered_acked=redelivered_acked,
        errors=first.errors[:5] + second.errors[:5],
    )
    assert published_at_kill < len(published), "nothing was published after the kill"
    assert sub2.ok.get("durable") == "resumed" and sub2.ok.get("recovered") is True, sub2.ok
    assert lost == [], f"{len(lost)} messages lost: {lost[:20]}"
    assert position == first_seq, f"ok.position {position}, first delivered {first_seq}"
    assert second.errors == [], second.errors[:5]


# ---------------------------------------------------------------------- R12 cycles


async def receive_until(sub: ClientSubscription, seq: int, into: list[int]) -> None:
    """Take js_msgs into `into` until `seq` is among them (each wait bounded)."""
    while seq not in into:
        env = await sub.get(timeout=10)
        assert env["op"] == "js_msg", env
        into.append(int(env["data"]["seq"]))


async def test_durable_connect_drop_resume_cycles(
    stack: Stack, stack_nc: NATS, stack_issuer: TokenIssuer, figures: Figures
) -> None:
    s = stack.settings
    js = stack_nc.jetstream(timeout=10)
    stream, flt, name, uid = "dcycle", "dcycle.c", "cycle21", "dc-0001"
    token, key = await one_durable_user(js, s, stack_issuer, stream, uid, name)
    urls = gateway_urls(s)
    cycles = scale(100, 1000)
    bound = CONSUMERS_PER_PROCESS * s.gateway_procs
    rnd = random.Random(21)
    published: list[int] = []
    delivered: list[int] = []
    oks: Counter[str] = Counter()
    drops: Counter[str] = Counter()
    resume_t: list[float] = []
    bad_position: list[str] = []
    not_recovered: list[int] = []
    refused: list[str] = []  # js_subs answered with an error
    # Cycles that were handed messages an earlier cycle had already received, by how the
    # last holder left (closed / aborted) and where the resume ran (same / other gateway).
    dup_after: Counter[str] = Counter()
    last_holder = ("nothing", -1)  # (how the last cycle that held the durable left, its gw)
    t_start = time.monotonic()
    async with ConsumerSampler(js, [stream]) as sampler:
        for i in range(cycles):
            g = rnd.randrange(len(urls))
            abort = rnd.random() < 0.5 and i < cycles - 1  # the last one leaves cleanly
            how = "aborted" if abort else "closed"
            before = f"{last_holder[0]}, {'same' if g == last_holder[1] else 'other'} gateway"
            if i:
                published.append((await js.publish(flt, payload(2 * i))).seq)  # while away
            client = await GatewayClient.connect(urls[g], token=token, open_timeout=10)
            try:
                t0 = time.monotonic()
                try:
                    sub = await js_sub(client, stream, flt, durable=name)
                except RequestError as e:
                    refused.append(f"cycle {i} (gateway {g + 1}; last holder {before}): {e}")
                    continue  # its message comes with the next cycle's resume
                last_holder = (how, g)
                resume_t.append(time.monotonic() - t0)
                oks[str(sub.ok.get("durable"))] += 1
                if i and sub.ok.get("recovered") is not True:
                    not_recovered.append(i)
                mark = len(delivered)
                if i:
                    await receive_until(sub, published[-1], delivered)
                published.append((await js.publish(flt, payload(2 * i + 1))).seq)  # live
                await receive_until(sub, published[-1], delivered)
                if delivered[mark] != sub.ok.get("position"):
                    bad_position.append(f"cycle {i}: {sub.ok}, first {delivered[mark]}")
                if set(delivered[mark:]) & set(delivered[:mark]):
                    dup_after[before] += 1
            finally:
                if abort and isinstance(client.ws, WsTransport):
                    client.ws.ws.transport.abort()  # no close frame: a dropped connection
                drops[f"gateway {g + 1}, {how}"] += 1
                await client.close()
    cycles_s = time.monotonic() - t_start
    nodes = await placement(stack, js)
    # The last holder (closed cleanly) saves its floor on leaving: after the last delivery.
    try:
        saved_s: float | None = await until_async(
            lambda: _floor_is(js, key, published[-1]), "the floor saved on the last leave", WAIT
        )
    except AssertionError:
        saved_s = None
    floor = await durable_floor(js, key)
    left_s = await until_async(
        lambda: _no_consumers(js, stream), f"no consumer left on {stream}", WAIT
    )
    keys = await durable_keys(js, stream)
    named: list[str] = []
    for st in await stream_names(js):
        named += [f"{st}/{c}" for c in await consumer_names(js, st) if name in c or uid in c]
    lost = sorted(set(published) - set(delivered))
    dups = len(delivered) - len(set(delivered))
    figures.add(
        "R12",
        "test_durable_connect_drop_resume_cycles",
        f"3 NATS nodes (R3): {cycles} cycles of one durable js_sub (ack: false): connect to "
        "either gateway (at random), js_sub, a message published while away and one while "
        "connected, then drop (close frame, or the socket aborted, at random)",
        f"{cycles} cycles in {cycles_s:.1f} s; js_sub ok {summary(resume_t)}; ok said "
        f"{dict(oks)}; refused {len(refused)}; drops {dict(sorted(drops.items()))}; "
        f"{len(published)} published: lost {len(lost)}, duplicates {dups} (cycles handed "
        f"messages again, by how the last holder left and where the resume ran: "
        f"{dict(sorted(dup_after.items()))}); "
        f"ok.position not the first delivery {len(bad_position)}; gw_durables keys {len(keys)} "
        f"({sum(keys.values())} stored messages); consumers on {stream} max "
        f"{sampler.max[stream]} (bound {bound}), 0 {ms(left_s)} after the last drop; "
        f"consumers named for the durable {len(named)}; floor after the last (clean) leave "
        f"{floor} of last seq {published[-1]}"
        + (f", saved {ms(saved_s)} after it" if saved_s is not None else "")
        + f"; {nodes}",
        lost=lost[:20],
        duplicates=dups,
        refused=refused[:10],
        duplicates_after=dict(dup_after),
        bad_position=bad_position[:10],
        keys=keys,
        named=named[:10],
    )
    assert refused == [], f"{len(refused)} of {cycles} js_subs refused: {refused[:5]}"
    assert oks == Counter({"created": 1, "resumed": cycles - 1}), oks
    assert not_recovered == [], not_recovered[:10]
    assert lost == [], lost[:20]
    assert bad_position == [], bad_position[:5]
    assert keys == {key: 1}, keys
    assert floor == published[-1], f"floor {floor} after the last leave, last seq {published[-1]}"
    assert named == [], named
    assert sampler.max[stream] <= bound


async def _floor_is(js: JetStreamContext, key: str, seq: int) -> bool:
    return await durable_floor(js, key) == seq
