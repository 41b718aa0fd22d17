"""NATS connection and idempotent provisioning of every bucket and stream we use."""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from nats.aio.client import Client as NATS
from nats.js import api
from nats.js.client import JetStreamContext
from nats.js.errors import BucketNotFoundError, NotFoundError

from shared import kvwire
from shared.capabilities import DURABLES_BUCKET, DURABLES_WATCH
from shared.settings import Settings

log = logging.getLogger("shared.natsio")


@dataclass(frozen=True, slots=True)
class Bucket:
    name: str
    history: int = 1
    ttl: float | None = None  # seconds; None = keep forever


@dataclass(frozen=True, slots=True)
class Stream:
    name: str
    subjects: tuple[str, ...]
    max_age: float | None = None


def buckets(settings: Settings) -> tuple[Bucket, ...]:
    return (
        Bucket("auth_users", history=5),
        Bucket("auth_credentials"),
        # A revoked token id only matters until the token would have expired anyway.
        Bucket("auth_revoked", ttl=float(settings.token_ttl + 60)),
        Bucket("articles", history=5),
        Bucket("todos", history=5),
        # Durable js_subs (ws_gateway/durables.py): the latest record per durable (saved every
        # second while held). A delete leaves its marker, and a record unused past
        # DURABLE_INACTIVE is kept as "gone": a later open tells either from a new durable.
        # Both last twice DURABLE_INACTIVE, then go: what a user can leave behind is bounded.
        Bucket(DURABLES_BUCKET, ttl=2 * settings.durable_inactive),
    )


STREAMS: tuple[Stream, ...] = (
    Stream("chat", ("chat.>",)),
    Stream("audit", ("audit.>",)),
)


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


async def _follow_ttl(js: JetStreamContext, b: Bucket) -> None:
    """An existing bucket's TTL follows the settings (auth_revoked: TOKEN_TTL + 60): a TTL
    kept from the bucket's creation would forget revocations of tokens still valid. No
    request when it has it already; the config travels as the server's JSON (as in
    `_apply_limits`), so fields nats-py does not know stay."""
    assert b.ttl is not None
    stream = kvwire.stream_of(b.name)
    info = await js._api_request(f"{js._prefix}.STREAM.INFO.{stream}")
    config: dict[str, object] = info["config"]
    want = int(b.ttl * 1e9)
    old = config.get("max_age")
    if old == want:
        return
    if isinstance(old, int) and old > want:
        # Tokens issued under the longer TTL outlive revocations kept for the shorter one.
        log.warning(
            "bucket ttl lowered",
            extra={"event": "bucket_ttl_lowered", "bucket": b.name, "old": old, "new": want},
        )
    window = config.get("duplicate_window")
    config["max_age"] = want
    config["duplicate_window"] = min(window, want) if isinstance(window, int) and window else want
    await js._api_request(f"{js._prefix}.STREAM.UPDATE.{stream}", json.dumps(config).encode())
    log.info(
        "bucket ttl updated",
        extra={"event": "bucket_ttl_updated", "bucket": b.name, "old": old, "new": want},
    )


def limits(settings: Settings) -> dict[str, dict[str, int]]:
    """The storage limits of every stream (bucket `b` is the stream `KV_b`), as fields of
    JetStream's stream config (`max_age` in nanoseconds; 0 = none). A full bucket refuses
    writes (KV discards new); a full stream drops its oldest messages."""
    out: dict[str, dict[str, int]] = {}
    for b in buckets(settings):
        auth = b.name.startswith("auth_")
        out[kvwire.stream_of(b.name)] = {
            "max_bytes": settings.nats_auth_max_bytes if auth else settings.nats_data_max_bytes,
            "max_msg_size": settings.nats_max_value_bytes,
            "max_msgs_per_subject": b.history,
            "max_consumers": settings.nats_max_consumers,
        }
    ages = {"chat": settings.nats_chat_max_age, "audit": settings.nats_audit_max_age}
    for s in STREAMS:
        out[s.name] = {
            "max_bytes": settings.nats_stream_max_bytes,
            "max_msg_size": settings.nats_max_value_bytes,
            "max_consumers": settings.nats_max_consumers,
            "max_age": int(ages.get(s.name, s.max_age or 0.0) * 1e9),
        }
    return out


def _extra(stream: str) -> dict[str, object]:
    """Config beyond limits: the durables bucket republishes each stored write for the
    gateways that hold durables (ws_gateway/durables.py watches them)."""
    if stream != kvwire.stream_of(DURABLES_BUCKET):
        return {}
    source = kvwire.subject_of(DURABLES_BUCKET, ">")
    return {"republish": {"src": source, "dest": f"{DURABLES_WATCH}.>"}}


async def _apply_limits(js: JetStreamContext, stream: str, want: dict[str, object]) -> None:
    """Bring an existing stream to these limits; no request when it has them already (so
    the API, whose NATS user may not update streams, can run `provision` after the admin
    CLI). The config travels as the server's JSON, so fields nats-py does not know stay."""
    info = await js._api_request(f"{js._prefix}.STREAM.INFO.{stream}")
    config: dict[str, object] = info["config"]
    changed = {k: v for k, v in want.items() if config.get(k) != v}
    if not changed:
        return
    old = {k: config.get(k) for k in changed}
    config.update(changed)
    await js._api_request(f"{js._prefix}.STREAM.UPDATE.{stream}", json.dumps(config).encode())
    log.info(
        "stream limits updated",
        extra={"event": "limits_updated", "stream": stream, "old": old, "new": changed},
    )


async def provision(js: JetStreamContext, settings: Settings) -> None:
    """Create every bucket and stream of ARCHITECTURE.md, with the limits of the settings
    (`limits`), and bring existing ones to them; safe to run any number of times."""
    replicas = settings.nats_replicas
    caps = limits(settings)
    for b in buckets(settings):
        cap = caps[kvwire.stream_of(b.name)]
        config = api.KeyValueConfig(
            bucket=b.name,
            history=b.history,
            ttl=b.ttl,
            replicas=replicas,
            storage=api.StorageType.FILE,
            max_bytes=cap["max_bytes"],
            max_value_size=cap["max_msg_size"],
        )
        try:
            await js.key_value(b.name)
        except BucketNotFoundError:
            await js.create_key_value(config)
            log.info("created bucket %s", b.name)
            continue
        if b.ttl is not None:
            await _follow_ttl(js, b)
    for s in STREAMS:
        cap = caps[s.name]
        config2 = api.StreamConfig(
            name=s.name,
            subjects=list(s.subjects),
            num_replicas=replicas,
            storage=api.StorageType.FILE,
            max_age=cap["max_age"] / 1e9 or None,
            max_bytes=cap["max_bytes"],
            max_msg_size=cap["max_msg_size"],
            max_consumers=cap["max_consumers"],
            duplicate_window=120.0,  # the Idempotency-Key window of chat.send
            allow_direct=True,  # the gateway's shared history reads (direct get batch)
        )
        try:
            await js.stream_info(s.name)
        except NotFoundError:
            await js.add_stream(config2)
            log.info("created stream %s", s.name)
    for stream, want in caps.items():
        # allow_direct: also turned on for streams made before the gateway read history
        # through direct get (and for buckets, where nats-py already sets it).
        await _apply_limits(js, stream, {**want, "allow_direct": True, **_extra(stream)})
