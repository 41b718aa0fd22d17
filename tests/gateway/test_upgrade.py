"""Upgrades that pass the gateway's checks and are then refused by the WebSocket layer."""

from __future__ import annotations

import asyncio
import gc

from tests.gateway.conftest import UserFactory
from ws_gateway.handshake import GatewayConnection
from ws_gateway.server import Gateway


def _live_connections() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, GatewayConnection))


async def test_an_upgrade_refused_after_the_checks_leaves_nothing_behind(
    make_user: UserFactory, gateway: Gateway
) -> None:
    """A valid token, then no Sec-WebSocket-Key: websockets answers 400 after our checks
    admitted it. What the checks admitted must go with the connection (it used to stay in
    a side table, with the connection, for the life of the process)."""
    token = await make_user()
    before = _live_connections()
    for _ in range(3):
        r, w = await asyncio.open_connection(gateway.host, gateway.port)
        w.write(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer " + token.encode() + b"\r\n\r\n"
        )
        status = await r.readline()
        assert b" 400 " in status, status
        await r.read()  # until the gateway closes the connection
        w.close()
        await w.wait_closed()
    # The server finishes its side of each connection just after the client saw it close.
    for _ in range(250):
        if _live_connections() <= before:
            break
        await asyncio.sleep(0.02)  # polling a count, bounded (5 s)
    assert _live_connections() == before
