"""`python -m ws_gateway [--host H] [--port N]`: run one gateway process."""

from __future__ import annotations

import argparse

import uvloop

from shared import logs
from shared.settings import load
from ws_gateway.server import run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m ws_gateway",
        description="WebSocket gateway: subscriptions to NATS subjects, KV buckets and "
        "JetStream streams, gated by per-user capabilities. Settings come from the "
        "environment (see README).",
    )
    parser.add_argument("--host", help="listen address (default: HOST setting)")
    parser.add_argument("--port", type=int, help="listen port (default: GATEWAY_PORT)")
    parser.add_argument(
        "--poll-port",
        type=int,
        help="long-polling listener (default: POLL_PORT + (port - GATEWAY_PORT))",
    )
    args = parser.parse_args(argv)
    settings = load()
    settings.check()
    logs.setup(settings)
    uvloop.run(run(settings, args.host, args.port, args.poll_port))


if __name__ == "__main__":
    main()
