"""`python -m http_api`: serve the API, or run an admin command.

    python -m http_api [--host H] [--port N]          serve (SIGTERM: finish requests, exit)
    python -m http_api provision                      create every bucket and stream
    python -m http_api create-user --username U --password P|- [--display-name D]
                                   [--capabilities JSON]
    python -m http_api seed-demo                      admin, alice, bob (dev mode only)

Settings come from the environment (see shared/settings.py).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

import msgspec
from aiohttp import web
from argon2 import PasswordHasher

from http_api import admin
from http_api.app import create_app
from http_api.passwords import Passwords
from shared import capabilities, logs
from shared.errors import CapabilityError
from shared.settings import Settings, load

log = logging.getLogger("http_api")
SHUTDOWN_TIMEOUT = 30.0  # seconds in-flight requests get after SIGTERM


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m http_api",
        description="The natsgate HTTP API. Without a command: serve it.",
    )
    p.add_argument("--host", help="address to listen on (default: HOST setting)")
    p.add_argument("--port", type=int, help="port to listen on (default: API_PORT setting)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser(
        "provision",
        help="create every NATS bucket and stream (idempotent)",
        description="Create every NATS bucket and stream we use; safe to repeat.",
    )
    cu = sub.add_parser(
        "create-user",
        help="create a user",
        description="Create a user with a password and capabilities.",
    )
    cu.add_argument("--username", required=True)
    cu.add_argument("--password", required=True, help="the password, or '-' to read stdin")
    cu.add_argument("--display-name", default="")
    cu.add_argument(
        "--capabilities",
        default="{}",
        help='capability document as JSON, e.g. \'{"commands": ["chat.send"]}\'',
    )
    sub.add_parser(
        "seed-demo",
        help="create or reset the demo users (dev mode only)",
        description="Create or reset admin, alice and bob with DEMO_PASSWORD. "
        "Idempotent. Refused in production.",
    )
    return p


def serve(settings: Settings, host: str, port: int) -> None:
    import uvloop

    app = create_app(settings)

    def announce(msg: str) -> None:
        log.info("listening", extra={"event": "listening", "host": host, "port": port})

    web.run_app(
        app,
        host=host,
        port=port,
        access_log=None,  # the problem middleware logs one line per request
        print=announce,
        shutdown_timeout=SHUTDOWN_TIMEOUT,
        loop=uvloop.new_event_loop(),
    )
    log.info("stopped", extra={"event": "stopped"})


async def _create_user(settings: Settings, args: argparse.Namespace) -> None:
    password = sys.stdin.readline().rstrip("\n") if args.password == "-" else args.password
    try:
        caps = capabilities.decode(args.capabilities)
    except (msgspec.DecodeError, CapabilityError) as e:
        raise admin.AdminError(f"invalid capabilities: {e}") from None
    async with admin.connected_store(settings) as store:
        passwords = Passwords(PasswordHasher(), settings.hash_concurrency)
        user = await admin.create_user(
            store, passwords, args.username, password, args.display_name, caps
        )
    print(msgspec.json.encode(user).decode())


async def _seed_demo(settings: Settings) -> None:
    async with admin.connected_store(settings) as store:
        for user, created in await admin.seed_demo(settings, store):
            print(f"{'created' if created else 'updated'} {user.username} ({user.id})")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    settings = load()
    logs.setup(settings)
    try:
        if args.command is None:
            settings.check()
            serve(settings, args.host or settings.host, args.port or settings.api_port)
        elif args.command == "provision":
            asyncio.run(admin.provision(settings))
            print("provisioned")
        elif args.command == "create-user":
            asyncio.run(_create_user(settings, args))
        elif args.command == "seed-demo":
            asyncio.run(_seed_demo(settings))
    except admin.AdminError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
