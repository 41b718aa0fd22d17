"""Long-poll bounds (review findings 4 and 19): closed sessions kept within a count and a
byte budget, one body per buffer state for concurrent GETs, bad `wait`/`after` → 400."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import msgspec
import pytest
from nats.aio.client import Client as NATS

from shared.settings import Settings
from tests.gateway.conftest import UserFactory
from tests.waits import until
from ws_gateway.server import Gateway

PAYLOAD = b'"' + b"x" * 10_000 + b'"'


def _sid(i: int) -> str:
    return f"bounds-session-{i:04d}-0123456789"


@pytest.fixture
async def small_gateway(settings: Settings, nc: NATS) -> AsyncIterator[Gateway]:
    bounded = msgspec.structs.replace(
        settings, poll_closed_keep_max=2, poll_closed_keep_bytes=25_000
    )
    async with Gateway(bounded, host="127.0.0.1", port=0) as gw:
        yield gw


async def _open(http: aiohttp.ClientSession, gw: Gateway, sid: str, auth: dict[str, str]) -> None:
    async with http.post(f"{gw.poll_url}/open", params={"sid": sid}, headers=auth) as r:
        assert r.status == 200


async def _close(http: aiohttp.ClientSession, gw: Gateway, sid: str, auth: dict[str, str]) -> None:
    async with http.post(f"{gw.poll_url}/close", params={"sid": sid}, headers=auth) as r:
        assert r.status == 204


async def _get(
    http: aiohttp.ClientSession, gw: Gateway, sid: str, auth: dict[str, str], **params: str
) -> tuple[int, bytes]:
    query = {"sid": sid, "after": "0", "wait": "0", **params}
    async with http.get(gw.poll_url, params=query, headers=auth) as r:
        return r.status, await r.read()


async def test_closed_sessions_are_capped_in_number(
    small_gateway: Gateway, make_user: UserFactory
) -> None:
    """Past `poll_closed_keep_max` closed sessions, the oldest is dropped (404
    unknown_session); the newer ones still answer (their frames, or 410)."""
    gw = small_gateway
    auth = {"Authorization": f"Bearer {await make_user()}"}
    async with aiohttp.ClientSession() as http:
        for i in range(3):
            await _open(http, gw, _sid(i), auth)
            await _close(http, gw, _sid(i), auth)
        status, body = await _get(http, gw, _sid(0), auth)
        assert status == 404 and msgspec.json.decode(body)["code"] == "unknown_session"
        for i in (1, 2):
            status, _ = await _get(http, gw, _sid(i), auth)
            assert status in (200, 410)
    assert gw.poll is not None and len(gw.poll.gone) == 2


async def test_closed_sessions_are_capped_in_bytes(
    small_gateway: Gateway, make_user: UserFactory, nc: NATS
) -> None:
    """Past `poll_closed_keep_bytes` of closed sessions' buffers, the oldest closed ones are
    dropped until the rest fits."""
    gw = small_gateway
    assert gw.poll is not None
    poll = gw.poll
    auth = {"Authorization": f"Bearer {await make_user()}"}
    async with aiohttp.ClientSession() as http:
        for i in range(2):
            await _open(http, gw, _sid(i), auth)
            sub = b'{"op":"sub","target":"chat.room.1","inbox":"s"}'
            async with http.post(
                f"{gw.poll_url}/send", params={"sid": _sid(i)}, data=sub, headers=auth
            ) as r:
                assert r.status == 204
        # The sub's `ok` is written before /poll/send answers: both are subscribed.
        await nc.publish("chat.room.1", PAYLOAD)
        await nc.publish("chat.room.1", PAYLOAD)
        for i in range(2):
            t = poll.transports[_sid(i)]
            await until(lambda t=t: t.size > 2 * len(PAYLOAD), "both messages buffered")
        for i in range(2):
            await _close(http, gw, _sid(i), auth)  # 2 x ~20 KB > 25,000 bytes
        assert list(poll.gone) == [_sid(1)]
        assert 0 < poll.gone_bytes <= 25_000
        status, _ = await _get(http, gw, _sid(0), auth)
        assert status == 404
        status, body = await _get(http, gw, _sid(1), auth)
        assert status == 200 and body.count(b"x" * 10_000) == 2


async def test_concurrent_gets_share_one_body(gateway: Gateway, make_user: UserFactory) -> None:
    """Concurrent GETs of one buffer state get the same bytes, joined once."""
    auth = {"Authorization": f"Bearer {await make_user()}"}
    async with aiohttp.ClientSession() as http:
        await _open(http, gateway, _sid(0), auth)
        assert gateway.poll is not None
        t = gateway.poll.transports[_sid(0)]
        await until(lambda: bool(t.frames), "the cap_update to be buffered")
        answers = await asyncio.gather(*(_get(http, gateway, _sid(0), auth) for _ in range(20)))
        assert set(answers) == {answers[0]} and answers[0][0] == 200
        assert b'"cap_update"' in answers[0][1]
        assert t.joins == 1


@pytest.mark.parametrize(
    ("name", "values"),
    [
        ("wait", ["nan", "NaN", "soon"]),
        ("wait", ["inf", "-inf", "1e999"]),
        ("wait", ["-1", "-0.5"]),
        ("after", ["-1", "one", "1.5"]),
        ("after", ["9" * 40, str(2**53)]),
        ("after", ["1000"]),  # past the last frame sent
    ],
)
async def test_bad_wait_or_after_is_400(
    gateway: Gateway, make_user: UserFactory, name: str, values: list[str]
) -> None:
    """A non-finite, negative or non-numeric `wait`, or an `after` that is no frame number
    this session sent, is 400 problem JSON, never a 500, and acknowledges nothing."""
    auth = {"Authorization": f"Bearer {await make_user()}"}
    async with aiohttp.ClientSession() as http:
        await _open(http, gateway, _sid(0), auth)
        for value in values:
            query = {"sid": _sid(0), "after": "0", "wait": "0", name: value}
            async with http.get(gateway.poll_url, params=query, headers=auth) as r:
                assert r.status == 400, (name, value)
                assert r.content_type == "application/problem+json"
                assert (await r.json())["code"] == "bad_request"
        status, body = await _get(http, gateway, _sid(0), auth)
        assert status == 200 and b'"cap_update"' in body
