"""`python -m http_api`: serve the API, or run an admin command.

    python -m http_api [--host H] [--port N]          serve (SIGTERM: finish requests, exit)
    python -m http_api provision                      apply the resources file (idempotent)
    python -m http_api token --user ID [--ttl S]      print a token for a user (app backends)
    python -m http_api create-user --username U --password P|- [--display-name D]
                                   [--capabilities JSON]
    python -m http_api seed-demo                      admin, alice, bob (dev mode only)
    python -m http_api check-config [--role api|gateway]   exit 1 with each problem
    python -m http_api print-config                   the settings in effect, secrets masked

Installed, `natsgate-api` is `python -m http_api` and `natsgate-gateway` `python -m ws_gateway`.

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
from shared import capabilities, configview, logs
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
        help="apply the resources file: buckets, streams, roles (idempotent)",
        description="Create every NATS bucket and stream (the stack's and RESOURCES_FILE's), "
        "update in place what may change, write the file's roles, and report what differs "
        "and was kept (nothing stored is destroyed); safe to repeat.",
    )
    tk = sub.add_parser(
        "token",
        help="print a short-lived token for a user",
        description="Mint a token for an existing user id (as POST /api/auth/tokens does).",
    )
    tk.add_argument("--user", required=True, help="the user's id")
    tk.add_argument("--ttl", type=int, default=300, help="seconds (default 300)")
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
    cc = sub.add_parser(
        "check-config",
        help="check the settings before starting (exit 1 with each problem)",
        description="Load the settings from the environment as a process would, apply "
        "production's refusals and check the key file the role needs.",
    )
    cc.add_argument("--role", choices=["api", "gateway"], default="api")
    sub.add_parser(
        "print-config",
        help="print the settings in effect as NAME=value lines, secrets masked",
        description="Every setting as the process would see it, derived ports included; "
        "passwords and NATS URL credentials are masked.",
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
            for line in asyncio.run(admin.provision(settings)):
                print(line)
            print("provisioned")
        elif args.command == "token":
            token, exp = asyncio.run(admin.mint_token(settings, args.user, args.ttl))
            print(token)
            print(f"expires {exp}", file=sys.stderr)
        elif args.command == "create-user":
            asyncio.run(_create_user(settings, args))
        elif args.command == "seed-demo":
            asyncio.run(_seed_demo(settings))
        elif args.command == "print-config":
            print(configview.print_config(settings), end="")
        elif args.command == "check-config":
            found = configview.problems(settings, args.role)
            for problem in found:
                print(f"error: {problem}", file=sys.stderr)
            if found:
                return 1
            print(f"config ok ({settings.app_env}, role {args.role})")
    except admin.AdminError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
