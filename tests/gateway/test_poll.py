"""What only the long-polling transport has: numbered frames, re-fetch, session binding."""

from __future__ import annotations

import asyncio
import gc
import warnings

import aiohttp
from nats.aio.client import Client as NATS

from shared.client import GatewayClient
from tests.gateway.conftest import UserFactory
from ws_gateway.server import Gateway

SID = "test-session-0123456789"


async def _open(http: aiohttp.ClientSession, gw: Gateway, headers: dict[str, str]) -> int:
    async with http.post(f"{gw.poll_url}/open", params={"sid": SID}, headers=headers) as r:
        return r.status


async def _poll(
    http: aiohttp.ClientSession, gw: Gateway, headers: dict[str, str], after: int
) -> tuple[int, list[str]]:
    async with http.get(
        gw.poll_url, params={"sid": SID, "after": str(after), "wait": "5"}, headers=headers
    ) as r:
        assert r.status == 200
        return int(r.headers["Poll-Last-Frame"]), (await r.text()).split("\n")


async def test_lost_response_is_fetched_again(gateway: Gateway, make_user: UserFactory, nc: NATS):
    """A response the client never acknowledged comes back whole; acknowledged frames don't."""
    headers = {"Authorization": f"Bearer {await make_user()}"}
    async with aiohttp.ClientSession() as http:
        assert await _open(http, gateway, headers) == 200
        last, lines = await _poll(http, gateway, headers, 0)
        assert '"cap_update"' in lines[0]
        again, lines2 = await _poll(http, gateway, headers, 0)  # the first one was "lost"
        assert (again, lines2) == (last, lines)
        body = '{"op":"sub","target":"chat.room.1","inbox":"s"}'
        async with http.post(
            f"{gateway.poll_url}/send", params={"sid": SID}, data=body, headers=headers
        ) as r:
            assert r.status == 204
        await nc.publish("chat.room.1", b'"hello"')
        seen: list[str] = []
        while not any('"sub_msg"' in x for x in seen):
            last, more = await _poll(http, gateway, headers, last)
            assert not any('"cap_update"' in x for x in more)  # acknowledged: never again
            seen += more
        assert any('"ok"' in x for x in seen)


async def test_unknown_session_and_wrong_user_get_404(gateway: Gateway, make_user: UserFactory):
    """A sid this process does not hold, or another user's, is unknown_session (reopen)."""
    alice = {"Authorization": f"Bearer {await make_user()}"}
    bob = {"Authorization": f"Bearer {await make_user('bob')}"}
    async with aiohttp.ClientSession() as http:
        async with http.get(gateway.poll_url, params={"sid": SID}, headers=alice) as r:
            assert r.status == 404
            assert (await r.json(content_type=None))["code"] == "unknown_session"
        assert await _open(http, gateway, alice) == 200
        async with http.get(gateway.poll_url, params={"sid": SID}, headers=bob) as r:
            assert r.status == 404
        assert await _open(http, gateway, alice) == 409  # a live sid is never taken over


async def test_open_with_cookie_needs_allowed_origin(gateway: Gateway, make_user: UserFactory):
    """Cookie-authenticated opens are refused without an allowed Origin (CSRF)."""
    cookie = {"Cookie": f"session={await make_user()}"}
    async with aiohttp.ClientSession() as http:
        assert await _open(http, gateway, {**cookie, "Origin": "http://evil.example"}) == 403
        assert await _open(http, gateway, cookie) == 403
        assert await _open(http, gateway, {**cookie, "Origin": "http://127.0.0.1:8080"}) == 200
        async with http.post(
            f"{gateway.poll_url}/open",
            params={"sid": "short"},
            headers={**cookie, "Origin": "http://127.0.0.1:8080"},
        ) as r:
            assert r.status == 400


async def test_browser_same_origin_get_needs_no_origin_header(
    gateway: Gateway, make_user: UserFactory
):
    """Browsers send no Origin on a same-origin GET: `Sec-Fetch-Site: same-origin` (which no
    page can set) stands in for it; without either, or cross-site, the poll is refused."""
    cookie = {"Cookie": f"session={await make_user()}"}
    origin = {"Origin": "http://127.0.0.1:8080"}
    async with aiohttp.ClientSession() as http:
        assert await _open(http, gateway, {**cookie, **origin}) == 200
        params = {"sid": SID, "after": "0", "wait": "0"}
        for headers, status in [
            ({**cookie, "Sec-Fetch-Site": "same-origin"}, 200),
            (cookie, 403),
            ({**cookie, "Sec-Fetch-Site": "cross-site"}, 403),
            ({**cookie, "Sec-Fetch-Site": "same-site"}, 403),
            ({**cookie, "Sec-Fetch-Site": "same-origin", "Origin": "http://evil.example"}, 403),
        ]:
            async with http.get(gateway.poll_url, params=params, headers=headers) as r:
                assert r.status == status, (headers, await r.text())


async def test_the_python_client_leaves_no_unclosed_session(
    gateway: Gateway, make_user: UserFactory
) -> None:
    """A client closed with its long poll in flight, and one whose session the server ended
    (user disabled: 4403) that nobody closes, leave no unclosed aiohttp session or connector
    behind: nothing for the garbage collector to warn about."""
    warned: list[str] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _, ctx: warned.append(str(ctx.get("message"))))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for url in (gateway.poll_url, gateway.url):
                token = await make_user()
                async with await GatewayClient.connect(url, token=token) as c:
                    await c.ping()  # the reader's next long poll is now waiting
                ended = await GatewayClient.connect(url, token=token)
                await make_user(disabled=True)
                assert await ended.wait_closed() == 4403
                del c, ended  # the second one never closed by its user
                gc.collect()
    finally:
        loop.set_exception_handler(None)
    assert warned == []
    assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)] == []
