"""NATS connection and credentials. Provisioning: shared/provision.py (re-exported here)."""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Literal, get_args

from nats.aio.client import Client as NATS

# Re-exported: provisioning lived here, and callers still reach it as natsio.provision.
from shared.provision import Bucket as Bucket
from shared.provision import Report as Report
from shared.provision import Stream as Stream
from shared.provision import buckets as buckets
from shared.provision import limits as limits
from shared.provision import provision as provision
from shared.provision import streams as streams
from shared.settings import Settings

log = logging.getLogger("shared.natsio")


# ---------------------------------------------------------------- credentials

# One NATS user per role, each with its own subject permissions (deploy/render.py):
# gateway (reads, consumers), api (writes), provision (creates streams and buckets), and
# service: the team's own backend services, which answer `cmd.>` (docs/guide.md, "A command
# service"). No process of the stack runs as `service`: a service presents it with
# NATS_USER/NATS_PASSWORD.
Role = Literal["gateway", "api", "provision", "service"]
ROLES: tuple[Role, ...] = get_args(Role)


# The inboxes of the `service` user: it may not subscribe to `_INBOX.>`, where every other
# client's replies go (deploy/render.py), so its requests (JetStream, KV) carry this prefix.
SERVICE_INBOX_PREFIX = "_INBOX.service"


def role_of(name: str) -> Role | None:
    """The role of a connection by its name: `ws_gateway:<port>`, `http_api`, and the admin
    CLI `http_api-admin` (provision, seed users); any other name has none."""
    if name.startswith("ws_gateway"):
        return "gateway"
    if name.startswith("http_api-admin"):
        return "provision"
    if name.startswith("http_api"):
        return "api"
    return None


def dev_credentials_path(settings: Settings) -> Path:
    return Path(settings.var_dir) / "nats" / "credentials.json"


# The setting (environment variable) holding each role's password.
PASSWORD_ENV: dict[Role, str] = {
    "gateway": "NATS_GATEWAY_PASSWORD",
    "api": "NATS_API_PASSWORD",
    "provision": "NATS_PROVISION_PASSWORD",
    "service": "NATS_SERVICE_PASSWORD",
}


def configured_passwords(settings: Settings) -> dict[Role, str]:
    """Each role's password as set in the settings ("" where unset)."""
    return {
        "gateway": settings.nats_gateway_password,
        "api": settings.nats_api_password,
        "provision": settings.nats_provision_password,
        "service": settings.nats_service_password,
    }


def _read_dev_credentials(path: Path) -> dict[Role, str] | None:
    """The roles' passwords in the file; a file from before a role was added lacks it
    (`ensure_dev_credentials` adds it, keeping the others)."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    if (
        not isinstance(raw, dict)
        or not any(r in raw for r in ROLES)
        or not all(isinstance(raw[r], str) for r in ROLES if r in raw)
    ):
        raise SystemExit(f"{path} is not a NATS credentials file: delete it to regenerate")
    return {r: str(raw[r]) for r in ROLES if r in raw}


def ensure_dev_credentials(settings: Settings) -> dict[Role, str]:
    """Generate one password per role into <var_dir>/nats/credentials.json (0600) on first
    use, like the dev JWT keys; a role's password set in the settings wins. A file lacking a
    role (made before the role existed) gets one for it, the others kept. Never in
    production: there every role's password comes from the settings."""
    configured = configured_passwords(settings)
    if settings.production:
        missing = [PASSWORD_ENV[r] for r in ROLES if not configured[r]]
        if missing:
            raise SystemExit("refusing to start in production: set " + ", ".join(missing))
        return configured
    path = dev_credentials_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        stored = _read_dev_credentials(path) or {}
        if any(r not in stored for r in ROLES):
            stored = {r: stored.get(r) or secrets.token_urlsafe(24) for r in ROLES}
            tmp = path.with_suffix(".tmp")
            tmp.touch(mode=0o600)
            tmp.chmod(0o600)
            tmp.write_text(json.dumps(stored, indent=2) + "\n", encoding="utf-8")
            tmp.replace(path)
    return {r: configured[r] or stored[r] for r in ROLES}


def role_passwords(settings: Settings) -> dict[Role, str] | None:
    """Every role's password, as the NATS server is configured with them; None: no NATS
    auth (nothing set and no dev credentials file: the test suite's own nats-server)."""
    configured = configured_passwords(settings)
    if all(configured.values()):
        return configured
    stored = None if settings.production else _read_dev_credentials(dev_credentials_path(settings))
    if stored is None:
        if any(configured.values()):
            missing = [PASSWORD_ENV[r] for r in ROLES if not configured[r]]
            raise SystemExit(
                "invalid settings: set every role's password or none: " + ", ".join(missing)
            )
        return None
    lacking = [r for r in ROLES if not configured[r] and r not in stored]
    if lacking:  # a file older than a role, not yet completed by ensure_dev_credentials
        raise SystemExit(
            f"{dev_credentials_path(settings)} has no password for {', '.join(lacking)}: "
            "`make start` adds it"
        )
    return {r: configured[r] or stored[r] for r in ROLES}


def credentials(settings: Settings, role: Role | None) -> tuple[str, str] | None:
    """(user, password) this connection presents: NATS_USER/NATS_PASSWORD if set, else its
    role's password (settings, or the dev credentials file); None: connect without."""
    if settings.nats_user:
        return settings.nats_user, settings.nats_password
    if role is None:
        return None
    password = configured_passwords(settings)[role]
    if not password and not settings.production:
        stored = _read_dev_credentials(dev_credentials_path(settings))
        password = stored.get(role, "") if stored else ""
    if not password:
        if settings.production:
            raise SystemExit(f"refusing to start in production: set {PASSWORD_ENV[role]}")
        return None
    return role, password


# ---------------------------------------------------------------- connection


class Client(NATS):
    """nats-py's client, minus a socket leak: a connection attempt that fails after the TCP
    connect (the server refuses the CONNECT, or goes away mid-handshake while it restarts)
    leaves its socket open, and the next attempt reuses the transport over it (nats-py
    2.x). Found by the test suite as an unraisable "unclosed StreamWriter" warning."""

    async def _connect_to_server(self, s: Any) -> None:
        if self._transport is not None:
            self._transport.close()  # type: ignore[no-untyped-call]  # idempotent
        await super()._connect_to_server(s)

    async def connect(self, *args: Any, **options: Any) -> None:
        try:
            await super().connect(*args, **options)
        except BaseException:
            if self._transport is not None:
                self._transport.close()  # type: ignore[no-untyped-call]
            raise


async def nats_connect(servers: str | list[str], **options: Any) -> NATS:
    """`nats.connect`, with the client above: every connection of the gateway, the API and
    the tests is made here."""
    nc = Client()
    await nc.connect(servers, **options)
    return nc


async def connect(
    settings: Settings,
    name: str,
    *,
    role: Role | None = None,
    on_disconnect: Callable[[], Awaitable[None]] | None = None,
    on_reconnect: Callable[[], Awaitable[None]] | None = None,
    connect_timeout: float = 30.0,
) -> NATS:
    """Connect to any of the configured servers; once connected, reconnect forever.

    As `role` (default: by `name`, `role_of`) when credentials are configured."""
    role = role or role_of(name)
    user, password = credentials(settings, role) or (None, None)
    inbox = {"inbox_prefix": SERVICE_INBOX_PREFIX} if role == "service" else {}

    # While NATS is down every reconnect attempt (each 0.5 s) reports an error: one line
    # for the first of a kind, then a count when the link is back, not 240 lines a minute.
    failures: dict[str, int] = {}
    down = False

    async def error_cb(e: Exception) -> None:
        kind = type(e).__name__
        if down:
            failures[kind] = failures.get(kind, 0) + 1
            if failures[kind] > 1:
                return
        log.warning("nats error", extra={"event": "nats_error", "error": kind})

    async def disconnected_cb() -> None:
        nonlocal down
        down = True
        log.warning("nats disconnected", extra={"event": "nats_disconnected"})
        if on_disconnect:
            await on_disconnect()

    async def reconnected_cb() -> None:
        nonlocal down
        down = False
        log.info("nats reconnected", extra={"event": "nats_reconnected", "errors": dict(failures)})
        failures.clear()
        if on_reconnect:
            await on_reconnect()

    deadline = asyncio.get_running_loop().time() + connect_timeout
    while True:
        try:
            return await nats_connect(
                servers=list(settings.nats_url),
                name=name,
                # nats-py's default gives up after ~60 attempts; a gateway must outlive
                # any outage and resume by itself.
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,
                connect_timeout=2,
                ping_interval=10,
                max_outstanding_pings=3,
                allow_reconnect=True,
                error_cb=error_cb,
                disconnected_cb=disconnected_cb,
                reconnected_cb=reconnected_cb,
                user=user,
                password=password,
                **inbox,
            )
        except Exception as e:
            if asyncio.get_running_loop().time() > deadline:
                raise
            log.warning("nats not reachable yet: %s", type(e).__name__)
            await asyncio.sleep(0.5)


async def settle(nc: NATS, timeout: float = 5.0) -> None:
    """Return once the server has processed everything this client sent so far.

    nats-py's `flush()` writes its PING straight to the socket while earlier commands (a
    SUB) may still sit in the client's pending buffer, so a PONG can come back before the
    server has the SUB: under load, "subscribed" was then not true yet. Writing the
    pending buffer out first restores the order.
    """
    await nc._flush_pending(force_flush=True)
    await nc.flush(timeout=int(max(1, timeout)))
