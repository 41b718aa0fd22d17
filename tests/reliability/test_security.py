"""Security 1-3: the Origin matrix (and a real browser), forged tokens at the gateway and
at the API, authorization by subset with canaries on every refused subject."""

from __future__ import annotations

import asyncio
import base64
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import msgspec
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from nats.aio.client import Client as NATS

from http_api.state import ISSUER
from shared.auth import load_private_key
from shared.capabilities import Capabilities
from shared.client import GatewayClient, RequestError
from shared.settings import Settings
from tests.api.conftest import Api
from tests.browser.helpers import CHROMIUM, CHROMIUM_ARGS
from tests.gateway.conftest import ClientFactory, UserFactory
from tests.reliability.conftest import Figures, Secrets
from tests.unit.test_auth import b64url, claims, ed_sign, hs_sign, seg
from ws_gateway.server import Gateway

ALLOWED = "http://127.0.0.1:8080"  # the first of the default ALLOWED_ORIGINS


# ---------------------------------------------------------------------- 1. origin matrix

LOOKALIKES = [
    "http://127.0.0.1:8080.evil.example",  # suffix
    "http://evil.example/http://127.0.0.1:8080",
    "http://127.0.0.1:80800",  # port prefix
    "http://127.0.0.1:808",
    "http://127.0.0.1:8081",  # other port
    "http://127.0.0.1",  # no port
    "https://127.0.0.1:8080",  # other scheme
    "ws://127.0.0.1:8080",
    "http://127.0.0.2:8080",
    "http://x127.0.0.1:8080",
    "http://127.0.0.1:8080@evil.example",
    "http://evil.example@127.0.0.1:8080",
    "http://127.0.0.1:8080/",
    "http://127.0.0.1:8080/app",
    "HTTP://127.0.0.1:8080",
    "http://[::ffff:127.0.0.1]:8080",
    "http://0x7f000001:8080",
    "null",
    "",
    "*",
]


async def _upgrade_status(url: str, headers: dict[str, str]) -> int:
    """The HTTP status of a WebSocket upgrade with these headers (101 = accepted)."""
    hdrs = {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": base64.b64encode(secrets.token_bytes(16)).decode(),
        "Sec-WebSocket-Version": "13",
        **headers,
    }
    async with aiohttp.ClientSession() as http:
        async with http.get(url.replace("ws://", "http://"), headers=hdrs) as r:
            return r.status


async def _poll_open_status(gw: Gateway, headers: dict[str, str]) -> int:
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{gw.poll_url}/open", params={"sid": secrets.token_urlsafe(18)}, headers=headers
        ) as r:
            return r.status


async def test_origin_matrix_on_cookie_upgrade(
    gateway: Gateway, make_user: UserFactory, figures: Figures
) -> None:
    """Only the exact allowed Origin opens a cookie-authenticated socket (ws and poll)."""
    token = await make_user()
    cookie = {"Cookie": f"session={token}"}
    results: dict[str, tuple[int, int]] = {}
    for origin in [ALLOWED, *LOOKALIKES, None]:
        headers = dict(cookie)
        if origin is not None:
            headers["Origin"] = origin
        results[repr(origin)] = (
            await _upgrade_status(gateway.url, headers),
            await _poll_open_status(gateway, headers),
        )
    # two Origin headers, one of them allowed
    async with aiohttp.ClientSession() as http:
        hdrs = [
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Key", base64.b64encode(secrets.token_bytes(16)).decode()),
            ("Sec-WebSocket-Version", "13"),
            ("Cookie", f"session={token}"),
            ("Origin", ALLOWED),
            ("Origin", "http://evil.example"),
        ]
        from multidict import CIMultiDict

        async with http.get(
            gateway.url.replace("ws://", "http://"), headers=CIMultiDict(hdrs)
        ) as r:
            results["two Origin headers"] = (r.status, 0)
    accepted = [o for o, (ws, poll) in results.items() if ws == 101 or poll == 200]
    figures.add(
        "S1",
        "test_origin_matrix_on_cookie_upgrade",
        "cookie upgrade (ws) and poll open with the exact allowed Origin, "
        f"{len(results) - 1} look-alikes (suffix/prefix, null, missing, scheme, port, userinfo)",
        f"{len(accepted)} of {len(results)} origins accepted (the exact one); "
        f"every other refused 403 on both transports",
        results=results,
    )
    assert accepted == [repr(ALLOWED)]
    assert results[repr(ALLOWED)] == (101, 200)
    for origin, (ws, poll) in results.items():
        if origin != repr(ALLOWED):
            assert ws == 403, origin
            assert poll in (0, 403), origin


PAGE = """<!doctype html><title>t</title><script>
window.tryOpen = (url) => new Promise((resolve) => {
  const ws = new WebSocket(url);
  const t = setTimeout(() => resolve("timeout"), 8000);
  ws.onmessage = (e) => { clearTimeout(t); resolve("message:" + e.data.slice(0, 24)); ws.close(); };
  ws.onclose = (e) => { clearTimeout(t); resolve("close:" + e.code); };
});
</script>"""


@pytest.fixture
async def page_sites() -> AsyncIterator[tuple[int, int]]:
    """Two static sites on loopback: ours (allowed) and an attacker's (other port)."""

    async def page(_: web.Request) -> web.Response:
        return web.Response(text=PAGE, content_type="text/html")

    runners = []
    ports = []
    for _ in range(2):
        app = web.Application()
        app.router.add_get("/", page)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        ports.append(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
    try:
        yield ports[0], ports[1]
    finally:
        for r in runners:
            await r.cleanup()


async def test_cross_site_page_in_a_real_browser_cannot_open_a_socket(
    settings: Settings,
    nc: NATS,
    make_user: UserFactory,
    page_sites: tuple[int, int],
    figures: Figures,
) -> None:
    """Chromium with the session cookie: our page opens the socket, another site's cannot."""
    from playwright.async_api import async_playwright

    ours, evil = page_sites
    s = msgspec.structs.replace(settings, allowed_origins=(f"http://127.0.0.1:{ours}",))
    token = await make_user()
    async with Gateway(s, host="127.0.0.1", port=0) as gw, async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            ctx = await browser.new_context()
            await ctx.add_cookies(
                [
                    {
                        "name": "session",
                        "value": token,
                        "domain": "127.0.0.1",
                        "path": "/",
                        "httpOnly": True,
                        "sameSite": "Strict",
                    }
                ]
            )
            outcome = {}
            for name, origin in [
                ("ours", f"http://127.0.0.1:{ours}"),
                ("other port, same host", f"http://127.0.0.1:{evil}"),
                ("other host", f"http://localhost:{evil}"),
            ]:
                page = await ctx.new_page()
                await page.goto(origin + "/")
                outcome[name] = await page.evaluate("(u) => window.tryOpen(u)", gw.url)
                await page.close()
        finally:
            await browser.close()
    figures.add(
        "S1",
        "test_cross_site_page_in_a_real_browser_cannot_open_a_socket",
        "Chromium holding the session cookie opens /ws from our page, from another port "
        "of the same host (cookie sent: same site) and from another host",
        "; ".join(f"{k}: {v}" for k, v in outcome.items()),
        outcome=outcome,
    )
    assert outcome["ours"].startswith('message:{"op":"cap_update"')
    assert outcome["other port, same host"] == "close:1006"
    assert outcome["other host"] == "close:1006"


# ---------------------------------------------------------------------- 2. forged tokens


def forgeries(settings: Settings, sub: str) -> list[tuple[str, str]]:
    """Forged tokens aimed at a real user, built with the deployment's own key where the
    forgery needs a valid signature (so each is refused for its own reason)."""
    key = load_private_key(settings.private_key_path)
    pub_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    pub_raw = key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    other = Ed25519PrivateKey.generate()
    ed = {"alg": "EdDSA", "typ": "JWT"}
    now = int(time.time())

    def c(**over: Any) -> dict[str, Any]:
        return claims(**{"sub": sub, **over})

    def sign(header: dict[str, Any], payload: dict[str, Any], k: Any = key) -> str:
        return ed_sign(header, payload, k)

    good = sign(ed, c())
    h, p, sig = good.split(".")
    nested: Any = "x"
    for _ in range(800):
        nested = [nested]
    out = [
        *[
            (f"alg {a}", f"{seg({'alg': a, 'typ': 'JWT'})}.{seg(c())}.")
            for a in ("none", "None", "NONE", "nOnE")
        ],
        ("alg none + signature", f"{seg({'alg': 'none'})}.{seg(c())}.{sig}"),
        ("alg missing", f"{seg({})}.{seg(c())}."),
        ("HS256 with public key PEM", hs_sign({"alg": "HS256", "typ": "JWT"}, c(), pub_pem)),
        ("HS256 with raw public key", hs_sign({"alg": "HS256"}, c(), pub_raw)),
        ("HS512 with public key PEM", hs_sign({"alg": "HS512"}, c(), pub_pem)),
        ("alg eddsa lowercase", sign({"alg": "eddsa"}, c())),
        ("alg Ed25519", sign({"alg": "Ed25519"}, c())),
        ("wrong key", sign(ed, c(), other)),
        ("empty signature", f"{h}.{p}."),
        ("no signature segment", f"{h}.{p}"),
        ("flipped signature", good[:-4] + ("AAAA" if not good.endswith("AAAA") else "BBBB")),
        ("tampered payload", f"{h}.{seg(c(sub='admin'))}.{sig}"),
        ("tampered exp", f"{h}.{seg(c(exp=now + 10**8))}.{sig}"),
        ("kid", sign({**ed, "kid": "k1"}, c())),
        ("jku", sign({**ed, "jku": "http://127.0.0.1:1/jwks"}, c())),
        ("x5u", sign({**ed, "x5u": "http://127.0.0.1:1/cert"}, c())),
        (
            "jwk (embedded key)",
            sign({**ed, "jwk": {"kty": "OKP", "crv": "Ed25519", "x": b64url(pub_raw)}}, c()),
        ),
        ("crit", sign({**ed, "crit": ["exp"], "exp": 1}, c())),
        ("x5c", sign({**ed, "x5c": ["MII"]}, c())),
        ("deeply nested JSON header", sign({**ed, "n": nested}, c())),
        ("deeply nested JSON payload, other key", sign(ed, c(n=nested), other)),
        ("aud wrong", sign(ed, c(aud="other"))),
        ("aud missing", sign(ed, c(aud=...))),
        ("aud prefix", sign(ed, c(aud="natsgat"))),
        ("aud suffix", sign(ed, c(aud="natsgatex"))),
        ("aud list of other", sign(ed, c(aud=["other"]))),
        ("iss wrong", sign(ed, c(iss="other"))),
        ("iss missing", sign(ed, c(iss=...))),
        ("iss prefix", sign(ed, c(iss="natsgat"))),
        ("iss suffix", sign(ed, c(iss="natsgatex"))),
        ("iss leading", sign(ed, c(iss="xnatsgate"))),
        ("iss case", sign(ed, c(iss="NATSGATE"))),
        ("iss trailing space", sign(ed, c(iss="natsgate "))),
        ("iss list", sign(ed, c(iss=["natsgate"]))),
        ("exp missing", sign(ed, c(exp=...))),
        ("expired", sign(ed, c(iat=now - 7200, exp=now - 3600))),
        ("expired beyond leeway", sign(ed, c(iat=now - 100, exp=now - 20))),
        ("exp as string", sign(ed, c(exp=str(now + 600)))),
        ("not yet valid (nbf)", sign(ed, c(nbf=now + 600))),
        ("issued in the future (iat)", sign(ed, c(iat=now + 600, exp=now + 1200))),
        ("sub missing", sign(ed, c(sub=...))),
        ("jti missing", sign(ed, c(jti=...))),
        ("payload list", f"{h}.{b64url(b'[1]')}.{sig}"),
        ("four segments", good + ".x"),
        ("garbage", "a.b.c"),
        ("over-long (4097)", "a" * 4097),
    ]
    return out


async def test_forged_tokens_get_401_at_gateway_and_api(
    gateway: Gateway,
    make_user: UserFactory,
    api: Api,
    settings: Settings,
    figures: Figures,
    secrets_seen: Secrets,
) -> None:
    """Every forgery is a 401 on /ws, /poll/open and the API (bearer and cookie); never 500."""
    await make_user("alice")
    api_sub = api.users["alice"].id
    gw_cases = forgeries(settings, "alice")
    api_cases = forgeries(settings, api_sub)
    # controls: the same construction with nothing wrong is accepted
    control_gw = ed_sign(
        {"alg": "EdDSA", "typ": "JWT"},
        claims(sub="alice"),
        load_private_key(settings.private_key_path),
    )
    control_api = ed_sign(
        {"alg": "EdDSA", "typ": "JWT"},
        claims(sub=api_sub),
        load_private_key(settings.private_key_path),
    )
    secrets_seen.add(control_gw, control_api, *[t for _, t in gw_cases + api_cases])
    assert await _upgrade_status(gateway.url, {"Authorization": f"Bearer {control_gw}"}) == 101
    assert (
        await api.client.get("/api/auth/me", headers={"Authorization": f"Bearer {control_api}"})
    ).status == 200
    statuses: dict[str, list[int]] = {}
    for (name, tok), (_, api_tok) in zip(gw_cases, api_cases, strict=True):
        bearer = {"Authorization": f"Bearer {tok}"}
        got = [
            await _upgrade_status(gateway.url, bearer),
            await _poll_open_status(gateway, bearer),
            (
                await api.client.get("/api/auth/me", headers={"Authorization": f"Bearer {api_tok}"})
            ).status,
            (await api.client.get("/api/auth/me", headers={"Cookie": f"session={api_tok}"})).status,
        ]
        statuses[name] = got
    bad = {k: v for k, v in statuses.items() if v != [401, 401, 401, 401]}
    figures.add(
        "S2",
        "test_forged_tokens_get_401_at_gateway_and_api",
        f"{len(statuses)} forged tokens (alg none in 4 spellings, HS256/512 with the public "
        "key, wrong key, empty/flipped signature, tampered payload, aud/iss variants, "
        "expired, nbf/iat in the future, kid/jku/x5u/jwk/crit/x5c, nested JSON) x "
        "{/ws upgrade, /poll/open, API bearer, API cookie}",
        f"{sum(len(v) for v in statuses.values())} requests: "
        f"{sum(v.count(401) for v in statuses.values())} x 401, "
        f"{sum(1 for v in statuses.values() for s in v if s >= 500)} x 5xx, "
        f"{sum(1 for v in statuses.values() for s in v if s in (101, 200))} accepted",
        failures=bad,
    )
    assert bad == {}


# ---------------------------------------------------------------------- 3. authorization

NARROW_CAPS = {
    "subjects": ["chat.room.*", "user.{uid}.>", "news.eu"],
    "buckets": {"todos": ["user.{uid}.>"], "articles": ["pub.*"]},
    "streams": {"chat": ["chat.room.123"]},
    "commands": ["chat.send"],
}
# Every capability a document can grant, to show that internal things stay refused.
WIDE_CAPS = {
    "subjects": [">"],
    "buckets": {"*": [">"]},
    "streams": {"*": [">"]},
    "commands": [">"],
}

REFUSED_SUBJECTS = [
    ">",
    "*",
    "*.>",
    "*.*",
    "*.*.*",
    "chat.>",
    "chat.*",
    "chat.*.*",
    "chat.room.>",
    "chat.room.*.*",
    "chat.*.1",
    "chat.room.1.x",
    "chat.room",
    "chat",
    "Chat.room.1",
    "user.>",
    "user.*",
    "user.*.>",
    "user.*.x",
    "user.bob.>",
    "user.bob.x",
    "user.alicex.x",
    "user.alic.x",
    "user.alice",
    "news.*",
    "news.>",
    "news.eu.>",
    "news.eu.x",
    "news.eux",
    "news.e",
    "news.\uff0a",
    "news.\uff1e",
    "news",
    "$SYS.>",
    "$JS.>",
    "$JS.API.>",
    "$KV.>",
    "$KV.todos.>",
    "$O.>",
    "_INBOX.>",
    "_INBOX.x",
    "cmd.>",
    "cmd.chat.send",
    "$SRV.>",
]
BAD_SUBJECTS = [
    "news.e*",
    "news.eu*",
    "chat.room.a*b",
    "chat.>.x",
    "news..eu",
    ".news",
    "news.eu.",
    "news eu",
    "chat.room.1\t",
    "",
]
INTERNAL = [
    "$JS.>",
    "$JS.API.>",
    "$JSC.>",
    "$KV.>",
    "$KV.todos.>",
    "$O.>",
    "$SYS.>",
    "$SYS.REQ.SERVER.PING",
    "$NRG.>",
    "$SRV.>",
    "_INBOX.>",
    "_INBOX.abc",
    "cmd.>",
    "cmd.users.manage",
    "$G",
    "$X.>",
]
REFUSED_KV = [
    ("todos", ">"),
    ("todos", "user.>"),
    ("todos", "user.*.>"),
    ("todos", "user.bob.>"),
    ("todos", "*.alice.>"),
    ("todos", "user.alice"),
    ("todos", "user.*"),
    ("todos", "user.alicex.>"),
    ("articles", ">"),
    ("articles", "pub.>"),
    ("articles", "pub.*.*"),
    ("articles", "*"),
    ("articles", "pub.x.y"),
    ("articles", "pub"),
    ("auth_users", ">"),
    ("auth_credentials", ">"),
    ("auth_revoked", ">"),
    ("users", ">"),
]
REFUSED_JS = [
    ("chat", ">"),
    ("chat", "chat.>"),
    ("chat", "chat.room.*"),
    ("chat", "chat.room.1234"),
    ("chat", "chat.room.12"),
    ("chat", "chat.room.123.x"),
    ("chat", "*.room.123"),
    ("audit", ">"),
    ("KV_todos", ">"),
    ("KV_auth_credentials", ">"),
    ("OBJ_x", ">"),
]
WIDE_REFUSED_KV = [("auth_credentials", ">"), ("auth_revoked", ">"), ("auth_x", ">")]
WIDE_REFUSED_JS = [
    ("KV_auth_credentials", ">"),
    ("KV_auth_users", ">"),
    ("KV_todos", ">"),
    ("OBJ_files", ">"),
]


def _instances(pattern: str, uid: str) -> list[str]:
    """Literal subjects matched by `pattern` that the narrow caps must not deliver."""
    if not pattern or " " in pattern or "\t" in pattern or ".." in pattern:
        return []
    toks = pattern.split(".")
    if any(not t for t in toks):
        return []
    out = []
    for fill in ("x", "bob", "room"):
        subj = ".".join({"*": fill, ">": f"{fill}.deep"}.get(t, t) for t in toks)
        out.append(subj)
    return out


async def _codes(c: GatewayClient, requests: list[tuple[str, str, Any]]) -> dict[str, str]:
    codes = {}
    for op, target, data in requests:
        try:
            await c.request(op, target, data)
            codes[f"{op} {target} {data or ''}"] = "ok"
        except RequestError as e:
            codes[f"{op} {target} {data or ''}"] = e.code
    return codes


async def test_authorization_by_subset_everywhere(
    make_user: UserFactory,
    connect: ClientFactory,
    nc: NATS,
    api: Api,
    figures: Figures,
    request: pytest.FixtureRequest,
) -> None:
    """Wider, sideways and look-alike requests are refused; canaries never arrive."""
    c = await connect(await make_user("alice", NARROW_CAPS), record=True)
    reqs: list[tuple[str, str, Any]] = [("sub", s, None) for s in REFUSED_SUBJECTS + BAD_SUBJECTS]
    reqs += [("kv_sub", b, {"pattern": p}) for b, p in REFUSED_KV]
    reqs += [("js_sub", s, {"filter": f}) for s, f in REFUSED_JS]
    narrow = await _codes(c, reqs)
    wide_client = await connect(await make_user("root", WIDE_CAPS), record=True)
    wreqs: list[tuple[str, str, Any]] = [("sub", s, None) for s in INTERNAL]
    wreqs += [("kv_sub", b, {"pattern": p}) for b, p in WIDE_REFUSED_KV]
    wreqs += [("js_sub", s, {"filter": f}) for s, f in WIDE_REFUSED_JS]
    wide = await _codes(wide_client, wreqs)

    # What they may have, to prove the canaries would have had a way in.
    await c.sub("chat.room.*")
    await c.sub("user.alice.>")
    await c.sub("news.eu")
    await wide_client.sub(">")
    canaries = 0
    for pattern in REFUSED_SUBJECTS + INTERNAL:
        for subj in _instances(pattern, "alice"):
            if subj.startswith("chat.room.") and subj.count(".") == 2:
                continue  # chat.room.<x> is allowed by chat.room.*
            if subj.startswith("user.alice.") or subj == "news.eu":
                continue
            await nc.publish(subj, b'"canary"')
            canaries += 1
    await nc.publish("news.eu", b'"marker"')
    await nc.publish("zz.marker", b'"marker"')
    await nc.flush()
    got_narrow = await _drain_until_marker(c, "news.eu")
    got_wide = await _drain_until_marker(wide_client, "zz.marker")
    leaked = [
        e for e in got_narrow if e.get("op") == "sub_msg" and e["data"].get("payload") == "canary"
    ]
    leaked_internal = [
        e["target"]
        for e in got_wide
        if e.get("op") == "sub_msg" and (e["target"].startswith(("$", "_INBOX.", "cmd.")))
    ]

    # The same rule over HTTP: commands by subset, article reads by KV capability.
    alice_api = await api.add_user("alicecap", msgspec.convert(NARROW_CAPS, Capabilities))
    token = api.app[ISSUER].issue(alice_api.id)[0]
    reached = []

    async def canary_service(msg: Any) -> None:
        reached.append(msg.subject)
        await msg.respond(b"{}")

    svc = await nc.subscribe("cmd.>", cb=canary_service)
    http_codes = {}
    for name in [
        "chat.>",
        "chat.*",
        "chat.send.x",
        "chat",
        "chat.sendx",
        "chat.\uff53end",
        "cmd.chat.send",
        "users.manage",
        "articles.create",
        "todos.put",
        ">",
        "*",
    ]:
        r = await api.client.post(
            f"/api/commands/{name}", json={}, headers={"Authorization": f"Bearer {token}"}
        )
        http_codes[f"POST /api/commands/{name}"] = r.status
    await svc.unsubscribe()
    for aid in ["pub", "other"]:
        r = await api.client.get(
            f"/api/articles/{aid}", headers={"Authorization": f"Bearer {token}"}
        )
        http_codes[f"GET /api/articles/{aid}"] = r.status

    allowed = {k: v for k, v in {**narrow, **wide}.items() if v == "ok"}
    figures.add(
        "S3",
        request.node.name,
        f"{len(narrow)} wider/sideways/look-alike requests (sub, kv_sub, js_sub) under narrow "
        f"caps, {len(wide)} internal subjects/buckets/streams under `>` caps, "
        f"{canaries} canaries published on refused subjects, {len(http_codes)} HTTP requests "
        "(commands by subset, article reads)",
        f"{len(allowed)} requests allowed, {len(leaked)} canaries delivered, "
        f"{len(leaked_internal)} internal subjects delivered under `>`, "
        f"{sum(1 for s in http_codes.values() if s < 400)} HTTP requests allowed, "
        f"{len(reached)} reached a cmd.> service",
        narrow=narrow,
        wide=wide,
        http=http_codes,
    )
    assert allowed == {}
    assert all(v in ("forbidden", "bad_request", "not_found") for v in narrow.values()), narrow
    assert all(v in ("forbidden", "bad_request") for v in wide.values()), wide
    assert leaked == [] and leaked_internal == []
    assert all(s in (400, 403, 404) for s in http_codes.values()), http_codes
    assert reached == []


async def _drain_until_marker(c: GatewayClient, marker_subject: str) -> list[dict[str, Any]]:
    assert c.envelopes is not None
    got = []
    async with asyncio.timeout(15):
        while True:
            env = await c.envelopes.get()
            got.append(env)
            if env.get("op") == "sub_msg" and env.get("target") == marker_subject:
                return got
