"""The ceiling: the least a Python gateway can do — one NATS subscription, broadcast, no protocol.

    python bench/ceiling.py --nats nats://127.0.0.1:4222 --port 9000 --subject bench.fan

No auth, no capabilities, no per-connection queue: each NATS message becomes a pre-encoded
`sub_msg` envelope, and the envelopes queued in one event-loop tick go out as one
newline-delimited frame to every connection with `websockets.broadcast()`.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import nats
import uvloop
from websockets.asyncio.server import ServerConnection, broadcast, serve


async def main(a: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    clients: set[ServerConnection] = set()
    pending: list[bytes] = []

    def flush() -> None:
        frame = b"\n".join(pending)
        pending.clear()
        broadcast(clients, frame, text=True)

    async def on_msg(msg: nats.aio.msg.Msg) -> None:
        if not pending:
            loop.call_soon(flush)
        pending.append(
            b'{"op":"sub_msg","target":"%s","data":{"payload":%s}}'
            % (msg.subject.encode(), msg.data)
        )

    async def handler(ws: ServerConnection) -> None:
        clients.add(ws)
        try:
            await ws.send('{"op":"ok"}')  # registered: the client may start counting
            await ws.wait_closed()
        finally:
            clients.discard(ws)

    nc = await nats.connect(a.nats)
    await nc.subscribe(
        a.subject, cb=on_msg, pending_msgs_limit=1 << 16, pending_bytes_limit=1 << 28
    )
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set_result, None)
    async with serve(handler, "127.0.0.1", a.port, compression=None, max_size=1 << 16):
        print("ready", flush=True)
        await stop
    await nc.close()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nats", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--subject", default="bench.fan")
    uvloop.run(main(p.parse_args()))
