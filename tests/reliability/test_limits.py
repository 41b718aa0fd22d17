"""Security 4-5: injection never reaches NATS; every limit holds at its boundary."""

from __future__ import annotations

import asyncio
import io
import time
import urllib.parse
from typing import Any

import msgspec
from aiohttp.test_utils import TestClient, TestServer
from argon2 import PasswordHasher
from nats.aio.client import Client as NATS
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from http_api import admin
from http_api.app import create_app
from http_api.state import NC, PASSWORDS, STORE
from shared.client import GatewayClient
from shared.settings import Settings
from shared.subjects import validate_pattern
from tests.api.conftest import Api
from tests.gateway.conftest import UserFactory
from tests.reliability.conftest import FULL, Figures, Secrets
from tests.reliability.helpers import rss_kib, split
from tests.reliability.test_security import WIDE_CAPS, _upgrade_status
from ws_gateway.server import Gateway

# ---------------------------------------------------------------------- 4. injection

BAD_VALUES = [
    "a b",
    "a\r\nb",
    "a\nPUB x 1\r\nhi",
    "a\tb",
    "a\x00b",
    "a\x0bb",
    "a\x7fb",
    "a\u2028b",
    "a\u00a0b",
    "..",
    "a..b",
    "../x",
    "a/../b",
    ".a",
    "a.",
    "*",
    ">",
    "a.*",
    "a.>",
    "a*",
    "x" * 4097,
    "x." * 2100 + "x",
    "",
    " ",
]


def _gateway_requests(v: str) -> list[tuple[dict[str, Any], str]]:
    """Requests carrying `v`, with where it goes: a pattern (wildcards allowed) or a name."""
    return [
        ({"op": "sub", "target": v}, "pattern"),
        ({"op": "unsub", "target": v}, "pattern"),
        ({"op": "kv_sub", "target": v}, "name"),
        ({"op": "kv_sub", "target": "todos", "data": {"pattern": v}}, "pattern"),
        ({"op": "js_sub", "target": v}, "name"),
        ({"op": "js_sub", "target": "chat", "data": {"filter": v}}, "pattern"),
        ({"op": "js_sub", "target": "chat", "data": {"durable": v}}, "name"),
        ({"op": "ack", "target": v, "data": {"seq": 1}}, "name"),
        ({"op": "cmd", "target": v}, "name"),
    ]


def _valid_pattern(v: str) -> bool:
    try:
        validate_pattern(v)
    except ValueError:
        return False
    return True


async def test_injection_never_reaches_nats(
    lenient_gateway: Gateway, make_user: UserFactory, api: Api, nc: NATS, figures: Figures
) -> None:
    """Bad subjects, keys, names and ids are refused before NATS; no NATS link is hurt."""
    hub = lenient_gateway.hub
    assert hub is not None
    gw_stats = dict(hub.nc.stats)
    api_nc = api.app[NC]
    api_stats = dict(api_nc.stats)
    c = await GatewayClient.connect(
        lenient_gateway.url, token=await make_user("root", WIDE_CAPS), record=True
    )
    codes: dict[str, int] = {}
    sent: dict[str, tuple[str, str]] = {}
    for i, v in enumerate(BAD_VALUES):
        for j, (req, where) in enumerate(_gateway_requests(v)):
            await c.send({**req, "inbox": f"i{i}-{j}"})
            sent[f"i{i}-{j}"] = (where, v)
    await c.send({"op": "ping", "inbox": "done"})
    assert c.envelopes is not None
    replies = {}
    async with asyncio.timeout(30):
        while True:
            env = await c.envelopes.get()
            if env.get("op") in ("ok", "error") and env.get("inbox"):
                replies[env["inbox"]] = env
            if env.get("op") == "pong" and env.get("inbox") == "done":
                break
    wrongly_ok = []
    for inbox, env in replies.items():
        code = env["data"]["code"] if env["op"] == "error" else "ok"
        codes[code] = codes.get(code, 0) + 1
        where, v = sent[inbox]
        if code == "ok" and not (where == "pattern" and _valid_pattern(v)):
            wrongly_ok.append((where, v[:40]))
    assert c.close_code is None
    await c.close()

    # The API: article ids, command names, rooms, todo ids, usernames, explain targets.
    admin_h = api.auth("admin")
    http: dict[int, int] = {}

    explained: dict[int, int] = {}

    async def count(resp: Any, into: dict[int, int] = http) -> None:
        into[resp.status] = into.get(resp.status, 0) + 1
        resp.release()

    admin_id = api.users["admin"].id
    for v in BAD_VALUES:
        q = urllib.parse.quote(v, safe="")
        if q:
            for method in ("GET", "PUT", "DELETE"):
                await count(
                    await api.client.request(
                        method,
                        f"/api/articles/{q}",
                        json={"title": "t", "body": "b"},
                        headers=admin_h,
                    )
                )
            await count(await api.client.post(f"/api/commands/{q}", json={}, headers=admin_h))
        for cmd, body in [
            ("chat.send", {"room": v, "text": "x"}),
            ("todos.put", {"id": v, "title": "t", "done": False}),
            ("todos.delete", {"id": v}),
        ]:
            await count(await api.client.post(f"/api/commands/{cmd}", json=body, headers=admin_h))
        await count(
            await api.client.post(
                "/api/users", json={"username": v, "password": "long-enough-1"}, headers=admin_h
            )
        )
        for op in ("sub", "kv_sub", "js_sub", "cmd"):
            await count(
                await api.client.get(
                    f"/api/users/{admin_id}/explain",
                    params={"op": op, "target": v or "x", "pattern": v[:1000] or "x"},
                    headers=admin_h,
                ),
                explained,
            )
    await nc.flush()
    gw_after, api_after = dict(hub.nc.stats), dict(api_nc.stats)
    figures.add(
        "S4",
        "test_injection_never_reaches_nats",
        f"{len(BAD_VALUES)} hostile values (spaces, CR/LF, tab, NUL, `..`, wildcards where "
        "literals are required, > 4 KiB) as subjects, bucket/stream names, key patterns, "
        "filters, durable names, ack targets over the gateway, and as article ids, command "
        "names, rooms, todo ids, usernames, explain targets over the API",
        f"{len(sent)} gateway requests -> {codes} (ok only for valid patterns); "
        f"{sum(http.values())} HTTP writes/reads -> {dict(sorted(http.items()))}, "
        f"{sum(explained.values())} explain -> {dict(sorted(explained.items()))} (answers, "
        "nothing sent to NATS); NATS protocol errors gateway "
        f"{gw_after['errors_received'] - gw_stats['errors_received']}, API "
        f"{api_after['errors_received'] - api_stats['errors_received']}; reconnects "
        f"{gw_after['reconnects'] - gw_stats['reconnects']} / "
        f"{api_after['reconnects'] - api_stats['reconnects']}",
        gateway_codes=codes,
        http=http,
    )
    assert len(replies) == len(sent)
    assert wrongly_ok == []
    assert set(codes) <= {"ok", "bad_request", "not_found", "use_http"}, codes
    assert all(s in (400, 404, 422) for s in http), http
    assert all(s in (200, 400) for s in explained), explained
    assert gw_after["errors_received"] == gw_stats["errors_received"]
    assert api_after["errors_received"] == api_stats["errors_received"]
    assert gw_after["reconnects"] == gw_stats["reconnects"]
    assert api_after["reconnects"] == api_stats["reconnects"]
    assert hub.nc.is_connected and api_nc.is_connected


# ---------------------------------------------------------------------- 5. limits


async def test_frame_size_limit_and_no_compression(
    gateway: Gateway, make_user: UserFactory, settings: Settings, figures: Figures
) -> None:
    """Frames of limit-1 and limit bytes are served; limit+1 closes 1009; no deflate."""
    token = await make_user()
    limit = settings.max_frame_bytes
    outcome = {}
    for size in (limit - 1, limit, limit + 1):
        head = '{"op":"ping","inbox":"f"}'
        frame = head + " " * (size - len(head))
        assert len(frame.encode()) == size
        async with ws_connect(
            gateway.url,
            additional_headers={"Authorization": f"Bearer {token}"},
            max_size=None,
            compression="deflate",  # offered; the server must decline it
        ) as ws:
            ext = ws.response.headers.get("Sec-WebSocket-Extensions") if ws.response else None
            assert ext is None and ws.protocol.extensions == []
            await ws.send(frame)
            try:
                async with asyncio.timeout(10):
                    while True:
                        envs = split(await ws.recv())
                        if any(e["op"] == "pong" for e in envs):
                            outcome[size] = "pong"
                            break
            except ConnectionClosed:
                outcome[size] = f"closed {ws.close_code}"
    figures.add(
        "S5",
        "test_frame_size_limit_and_no_compression",
        f"text frames of limit-1, limit, limit+1 bytes (MAX_FRAME_BYTES={limit}); the client "
        "offers permessage-deflate",
        "; ".join(f"{k} B: {v}" for k, v in outcome.items()) + "; deflate declined",
    )
    assert outcome == {limit - 1: "pong", limit: "pong", limit + 1: "closed 1009"}


async def test_client_op_rate_limit(
    gateway: Gateway, make_user: UserFactory, settings: Settings, figures: Figures
) -> None:
    """A flood of requests is answered `limit` past the burst; the connection stays."""
    n = 400
    async with ws_connect(
        gateway.url, additional_headers={"Authorization": f"Bearer {await make_user()}"}
    ) as ws:
        t0 = time.monotonic()
        for i in range(n):
            await ws.send(f'{{"op":"ping","inbox":"p{i}"}}')
        pongs = limited = 0
        async with asyncio.timeout(20):
            while pongs + limited < n:
                for e in split(await ws.recv()):
                    if e["op"] == "pong":
                        pongs += 1
                    elif e["op"] == "error" and e["data"]["code"] == "limit":
                        limited += 1
        elapsed = time.monotonic() - t0
        await ws.send('{"op":"ping","inbox":"after"}')
        assert ws.close_code is None
    figures.add(
        "S5",
        "test_client_op_rate_limit",
        f"{n} pings sent back to back (CLIENT_OPS_PER_SECOND={settings.client_ops_per_second:g}, "
        f"burst {settings.client_ops_burst})",
        f"{pongs} answered, {limited} refused `limit` in {elapsed * 1000:.0f} ms; connection kept",
    )
    allowed = settings.client_ops_burst + settings.client_ops_per_second * elapsed + 1
    assert settings.client_ops_burst <= pongs <= allowed
    assert limited == n - pongs


async def test_connections_per_user(
    gateway: Gateway, make_user: UserFactory, settings: Settings, figures: Figures
) -> None:
    """MAX_CONNECTIONS_PER_USER sockets open; the next upgrade gets 429; other users don't."""
    token = await make_user()
    limit = settings.max_connections_per_user
    socks = []
    try:
        for _ in range(limit):
            socks.append(
                await ws_connect(
                    gateway.url, additional_headers={"Authorization": f"Bearer {token}"}
                )
            )
        over = await _upgrade_status(gateway.url, {"Authorization": f"Bearer {token}"})
        other = await _upgrade_status(
            gateway.url, {"Authorization": f"Bearer {await make_user('bob')}"}
        )
    finally:
        for s in socks:
            await s.close()
    figures.add(
        "S5",
        "test_connections_per_user",
        f"{limit} sockets of one user, then one more, then one of another user",
        f"{len(socks)} open; connection {limit + 1}: HTTP {over}; other user: HTTP {other}",
    )
    assert (over, other) == (429, 101)


async def test_login_rate_limit_body_limit_and_huge_password(
    api: Api, figures: Figures, secrets_seen: Secrets
) -> None:
    """Login attempts past the limit get 429 + Retry-After; a body past MAX_BODY_BYTES 413;
    a 1 MiB password is refused before any hashing."""
    s = api.settings
    statuses = []
    retry_after = None
    for _ in range(s.login_attempts_per_minute + 2):
        r = await api.client.post(
            "/api/auth/login", json={"username": "bob", "password": "wrong-password-x"}
        )
        statuses.append(r.status)
        if r.status == 429:
            retry_after = r.headers.get("Retry-After")
        r.release()
    first_429 = statuses.index(429) + 1 if 429 in statuses else None
    passwords = api.app[PASSWORDS]
    calls = passwords.verify_calls
    huge = "p" * (1 << 20)
    r = await api.client.post(
        "/api/auth/login",
        data=io.BytesIO(msgspec.json.encode({"username": "alice", "password": huge})),
        headers={"Content-Type": "application/json"},
    )
    huge_status = r.status
    r.release()
    long_pw = "p" * 2048
    secrets_seen.add(long_pw)
    r = await api.client.post("/api/auth/login", json={"username": "alice", "password": long_pw})
    long_status = r.status
    r.release()
    hashed = passwords.verify_calls - calls
    h = api.auth("admin")
    limit = s.max_body_bytes
    sizes = {}
    for n in (limit - 64, limit + 1):
        body = b'{"title":"t","body":"' + b"x" * (n - 23) + b'"}'
        body = body[: n - 2] + b'"}' if len(body) > n else body
        r = await api.client.post(
            "/api/articles", data=body, headers={**h, "Content-Type": "application/json"}
        )
        sizes[len(body)] = r.status
        r.release()
    figures.add(
        "S5",
        "test_login_rate_limit_body_limit_and_huge_password",
        f"{len(statuses)} failed logins of one user (LOGIN_ATTEMPTS_PER_MINUTE="
        f"{s.login_attempts_per_minute}); a 1 MiB and a 2 KiB password; request bodies around "
        f"MAX_BODY_BYTES={limit}",
        f"429 from attempt {first_429} (Retry-After {retry_after} s); 1 MiB password: "
        f"{huge_status}, 2 KiB password: {long_status}, argon2 runs for them: {hashed}; "
        f"bodies: " + ", ".join(f"{k} B -> {v}" for k, v in sizes.items()),
    )
    assert first_429 == s.login_attempts_per_minute + 1 and retry_after
    assert huge_status == 413 and long_status == 422 and hashed == 0
    statuses_by_size = list(sizes.values())
    assert statuses_by_size[0] != 413 and statuses_by_size[1] == 413


async def test_argon2_work_is_bounded_under_concurrent_logins(
    settings: Settings, nc: NATS, figures: Figures, secrets_seen: Secrets
) -> None:
    """200 logins at once: at most HASH_CONCURRENCY hashes run together, memory bounded."""
    n = 200
    # Full run: argon2-cffi's defaults (what production uses). Fast run: the same 64 MiB
    # per hash with one pass and one lane, so the memory bound is tested at the same size.
    hasher = PasswordHasher() if FULL else PasswordHasher(time_cost=1, parallelism=1)
    mem_kib = hasher.memory_cost
    s = msgspec.structs.replace(settings, login_attempts_per_minute=100_000)
    app = create_app(s, password_hasher=hasher)
    password = "correct-horse-battery-" + str(time.time_ns())
    secrets_seen.add(password)
    async with TestClient(TestServer(app)) as client:
        await admin.create_user(app[STORE], app[PASSWORDS], "hashy", password)
        passwords = app[PASSWORDS]
        limit = s.hash_concurrency
        peak_inflight = 0
        base_rss = rss_kib()
        peak_rss = base_rss
        stop = asyncio.Event()

        async def sample() -> None:
            nonlocal peak_inflight, peak_rss
            while not stop.is_set():
                peak_inflight = max(peak_inflight, limit - passwords._sem._value)
                peak_rss = max(peak_rss, rss_kib())
                await asyncio.sleep(0.005)

        sampler = asyncio.create_task(sample())
        t0 = time.monotonic()

        async def login(i: int) -> int:
            pw = password if i % 2 == 0 else "wrong-" + password
            r = await client.post("/api/auth/login", json={"username": "hashy", "password": pw})
            r.release()
            return r.status

        statuses = await asyncio.gather(*(login(i) for i in range(n)))
        elapsed = time.monotonic() - t0
        stop.set()
        await sampler
    growth_mib = (peak_rss - base_rss) / 1024
    bound_mib = (limit + 1) * mem_kib / 1024 + 64
    figures.add(
        "S5",
        "test_argon2_work_is_bounded_under_concurrent_logins",
        f"{n} concurrent logins (half wrong passwords), argon2id m={mem_kib // 1024} MiB "
        f"t={hasher.time_cost} p={hasher.parallelism}, HASH_CONCURRENCY={limit}",
        f"peak {peak_inflight} hashes in flight, RSS +{growth_mib:.0f} MiB at peak "
        f"(bound {bound_mib:.0f} MiB), {elapsed:.1f} s for all, "
        f"{statuses.count(200)} x 200 / {statuses.count(401)} x 401",
    )
    assert statuses.count(200) == n // 2 and statuses.count(401) == n // 2
    assert peak_inflight <= limit
    assert growth_mib < bound_mib
