"""One settings object, read once from the environment at startup and passed down.

Every field maps to the upper-cased environment variable of its name
(`nats_url` ← `NATS_URL`). Lists are comma-separated. See the README's table.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import msgspec

DEFAULT_DEMO_PASSWORD = "demo"


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    app_env: Literal["dev", "production"] = "dev"
    var_dir: str = "var"
    # NATS
    nats_url: tuple[str, ...] = ("nats://127.0.0.1:4222",)
    nats_replicas: int = 1
    # How long a request rides out a NATS failover (a leader election, a reconnect): writes
    # are retried with the same Nats-Msg-Id, subscriptions wait; past it, 503 / `unavailable`.
    nats_failover_wait: float = 10.0
    # tokens
    jwt_private_key_file: str = ""  # default: <var_dir>/keys/jwt_ed25519.pem (dev keys)
    jwt_public_key_file: str = ""  # default: <var_dir>/keys/jwt_ed25519.pub.pem
    jwt_issuer: str = "natsgate"
    jwt_audience: str = "natsgate"
    jwt_leeway: float = 5.0
    token_ttl: int = 3600
    # buckets, streams, roles and trusted external issuers (shared/resources.py)
    resources_file: str = ""  # default: deploy/resources.toml of this checkout
    # browsers
    allowed_origins: tuple[str, ...] = ("http://127.0.0.1:8080", "http://localhost:8080")
    cookie_secure: bool = False
    # processes and ports: every port derives from BASE_PORT unless set itself (PORT_OFFSETS)
    host: str = "127.0.0.1"
    base_port: int = 8080  # nginx, the one public entry point
    gateway_port: int = 8201  # first gateway; the others follow
    gateway_procs: int = 2
    poll_port: int = 8301  # long-polling listener of the first gateway; the others follow
    api_port: int = 8101  # first API worker; the others follow
    api_procs: int = 2
    # NATS nodes run by deploy/: 1, or 3 for the loopback cluster; 0: none, this host joins
    # the NATS of another (NATS_URL, required then; deploy/README.md "N hosts").
    nats_cluster: int = 1
    nats_port: int = 4222  # node i listens on nats_port + i
    nats_monitor_port: int = 8222  # node i: nats_monitor_port + i
    nats_cluster_port: int = 6222  # node i routes on nats_cluster_port + i
    # gateway limits
    # Bytes queued per connection before it is closed 1013 (backpressure); pulled sources
    # (JetStream, KV catch-up) ask NATS only for what fits.
    send_queue_bytes: int = 1 << 20
    write_timeout: float = 0.25
    # Kernel send buffer of each client socket (bytes; 0: the kernel's autotuning, up to
    # 4 MiB on Linux). Bounded, a client that stops reading is detected after ~0.5 MiB
    # instead of ~4 MiB of queued frames; 256 KiB still carries ~5 MB/s at 100 ms RTT.
    socket_send_buffer: int = 256 * 1024
    max_frame_bytes: int = 65536
    max_subscriptions: int = 256
    # kv_sub + js_sub of one user in one gateway process (each holds a JetStream consumer
    # or a share of one); `limit` beyond.
    max_readers_per_user: int = 64
    # Durable js_subs one user may keep per stream (they outlive connections), and how
    # long an unused durable is kept by the server.
    max_durables_per_user: int = 16
    durable_inactive: float = 3 * 86400.0
    # JetStream history blocks kept per gateway process for catch-ups (bytes), and how
    # long a message of an `ack: true` js_sub waits for its ack before it is sent again.
    js_history_bytes: int = 64 << 20
    js_ack_wait: float = 30.0
    client_ops_per_second: float = 50.0
    client_ops_burst: int = 100
    max_bad_frames: int = 10
    ping_interval: float = 25.0
    max_connections_per_user: int = 64
    # Live connections (WebSockets and long-poll sessions) this host holds, spread evenly over
    # its gateways; nginx's and supervisord's fd limits derive from it (deploy/limits.py).
    # Past it, 503 with Retry-After. 10,000 fits a 20,000 fd hard limit.
    max_connections: int = 10000
    # presence (issue 19, docs/protocol.md "Presence"): a key lives PRESENCE_TTL seconds
    # unless its gateway re-puts it (every PRESENCE_REFRESH): a dead gateway's users leave
    # within PRESENCE_TTL. Patterns in PRESENCE_REFUSE announce nobody.
    presence_ttl: int = 30
    presence_refresh: float = 10.0
    presence_refuse: tuple[str, ...] = ()
    # api limits
    login_attempts_per_minute: int = 10
    max_body_bytes: int = 256 * 1024
    hash_concurrency: int = 4
    command_timeout: float = 5.0
    # demo data and logs
    demo_password: str = DEFAULT_DEMO_PASSWORD
    log_level: str = "INFO"
    log_format: Literal["auto", "pretty", "json"] = "auto"  # auto: json in production
    # api bounds (issue 14)
    # Unsafe requests (POST/PUT/PATCH/DELETE) per authenticated user and API process: a
    # sustained rate, with bursts of up to `api_writes_burst` at once; beyond it 429.
    api_writes_per_minute: int = 120
    api_writes_burst: int = 120
    # token and poll bounds (issue 14)
    token_rotation_grace: float = 30.0  # a refreshed token's sockets may send `refresh` this long
    poll_closed_keep_max: int = 1000  # closed long-poll sessions kept fetchable, per process
    poll_closed_keep_bytes: int = 64 << 20  # their buffered bytes, per process
    # NATS credentials and storage limits (issue 14)
    # One NATS user per role (gateway, api, provision, service: deploy/render.py). Empty in dev:
    # `make start` generates them into <var_dir>/nats/credentials.json (0600). Production
    # sets them, and each process needs only its own role's; nothing set = no NATS auth.
    nats_gateway_password: str = ""
    nats_api_password: str = ""
    nats_provision_password: str = ""
    nats_service_password: str = ""  # the team's command services (never the stack's own)
    # Explicit credentials of this process (any role or user), over the role's password.
    nats_user: str = ""
    nats_password: str = ""
    # Storage limits of every bucket and stream (provisioning applies them to existing ones).
    nats_auth_max_bytes: int = 64 * 1024 * 1024  # each auth_* bucket
    nats_data_max_bytes: int = 256 * 1024 * 1024  # each data bucket (articles, todos)
    nats_stream_max_bytes: int = 256 * 1024 * 1024  # each stream (chat, audit)
    nats_max_value_bytes: int = 1024 * 1024  # one KV value or stream message
    nats_max_consumers: int = 1000  # per stream and bucket
    nats_chat_max_age: float = 30 * 86400.0  # seconds
    nats_audit_max_age: float = 90 * 86400.0

    @property
    def production(self) -> bool:
        return self.app_env == "production"

    @property
    def log_json(self) -> bool:
        """JSON lines unless asked otherwise: a collector reads them; a person in dev the
        pretty ones."""
        return self.log_format == "json" or (self.log_format == "auto" and self.production)

    @property
    def gateway_max_connections(self) -> int:
        """One gateway process's share of MAX_CONNECTIONS."""
        return -(-self.max_connections // max(1, self.gateway_procs))

    @property
    def api_ports(self) -> range:
        return range(self.api_port, self.api_port + self.api_procs)

    @property
    def gateway_ports(self) -> range:
        return range(self.gateway_port, self.gateway_port + self.gateway_procs)

    @property
    def poll_ports(self) -> range:
        return range(self.poll_port, self.poll_port + self.gateway_procs)

    @property
    def public_url(self) -> str:
        return f"http://{self.host}:{self.base_port}"

    @property
    def private_key_path(self) -> Path:
        return Path(self.jwt_private_key_file or Path(self.var_dir) / "keys" / "jwt_ed25519.pem")

    @property
    def public_key_path(self) -> Path:
        return Path(self.jwt_public_key_file or Path(self.var_dir) / "keys" / "jwt_ed25519.pub.pem")

    def check(self) -> None:
        """Refuse unsafe production settings."""
        if not self.production:
            return
        problems = []
        if not self.jwt_private_key_file or not self.jwt_public_key_file:
            problems.append("JWT_PRIVATE_KEY_FILE and JWT_PUBLIC_KEY_FILE must be set")
        if self.demo_password == DEFAULT_DEMO_PASSWORD:
            problems.append("DEMO_PASSWORD is the default (demo users are never seeded)")
        if not self.cookie_secure:
            problems.append("COOKIE_SECURE must be true")
        if problems:
            raise SystemExit("refusing to start in production: " + "; ".join(problems))


# Ports derived from BASE_PORT (8080 → API 8101…, gateways 8201…, NATS 4222…, monitoring
# 8222…, routes 6222…), so a whole second stack runs beside the first by changing one number.
PORT_OFFSETS = {
    "api_port": 21,
    "gateway_port": 121,
    "poll_port": 221,
    "nats_port": -3858,
    "nats_monitor_port": 142,
    "nats_cluster_port": -1858,
}

# What each setting does, one entry per field (a test keeps them in step): `.env.example`
# is generated from these (`make env-example`, deploy/envfile.py).
DESCRIPTIONS: dict[str, str] = {
    "app_env": "dev or production; production refuses default secrets and never seeds demo users",
    "var_dir": "where a stack keeps rendered configs, dev keys, NATS data, logs and pids",
    "nats_url": "NATS server URLs, comma-separated (derived from NATS_PORT and NATS_CLUSTER)",
    "nats_replicas": "replicas of every bucket and stream (derived: NATS_CLUSTER, at most 3)",
    "nats_failover_wait": "seconds a request rides out a NATS failover before 503 / unavailable",
    "jwt_private_key_file": "Ed25519 PEM key signing tokens (empty: <VAR_DIR>/keys, dev keys)",
    "jwt_public_key_file": "Ed25519 PEM key verifying tokens (empty: <VAR_DIR>/keys, dev keys)",
    "jwt_issuer": "the tokens' iss claim",
    "jwt_audience": "the tokens' aud claim",
    "jwt_leeway": "seconds of clock skew accepted when checking a token's times",
    "token_ttl": "seconds a token (and the session cookie) is valid",
    "resources_file": "TOML of buckets, streams, roles, external issuers (empty: the demo's)",
    "allowed_origins": "Origins allowed to use the session cookie, comma-separated (derived)",
    "cookie_secure": "the cookie becomes __Host-session, Secure (required in production)",
    "host": "the address every process of the stack listens on",
    "base_port": "nginx, the one public entry point; every port not set derives from it",
    "gateway_port": "the first gateway's WebSocket port; the others follow (derived)",
    "gateway_procs": "gateway processes",
    "poll_port": "the first gateway's long-polling port; the others follow (derived)",
    "api_port": "the first API worker's port; the others follow (derived)",
    "api_procs": "API worker processes",
    "nats_cluster": "NATS nodes run by the stack: 1, or 3 for the loopback cluster; 0: none, "
    "NATS_URL names the shared cluster (another host's)",
    "nats_port": "client port of NATS node 0; node i listens on NATS_PORT + i (derived)",
    "nats_monitor_port": "monitoring port of NATS node 0; node i: + i (derived)",
    "nats_cluster_port": "route port of NATS node 0; node i: + i (derived)",
    "send_queue_bytes": "bytes queued per connection before it is closed 1013 (backpressure)",
    "write_timeout": "seconds one socket write may take before the client counts as slow",
    "socket_send_buffer": "kernel send buffer of each client socket, bytes (0: autotuning)",
    "max_frame_bytes": "largest frame a client may send, bytes",
    "max_subscriptions": "subscriptions per connection",
    "max_readers_per_user": "kv_sub + js_sub of one user in one gateway process",
    "max_durables_per_user": "durable js_subs one user may keep per stream",
    "durable_inactive": "seconds an unused durable is kept",
    "js_history_bytes": "JetStream history blocks kept per gateway process for catch-ups, bytes",
    "js_ack_wait": "seconds an ack: true js_sub message waits for its ack before it is resent",
    "client_ops_per_second": "requests per second a connection may send, sustained",
    "client_ops_burst": "requests a connection may send at once",
    "max_bad_frames": "undecodable or invalid frames before a connection is closed",
    "ping_interval": "seconds between pings; a client silent for two is closed 1008",
    "max_connections_per_user": "connections one user may hold per gateway process (then 429)",
    "max_connections": "live connections this host holds, over all its gateways (then 503); "
    "nginx and fd limits derive from it",
    "presence_ttl": "seconds a presence key outlives its last refresh (a dead gateway's "
    "users leave within it); whole seconds, at least 1",
    "presence_refresh": "seconds between a gateway's re-puts of its presence keys (< PRESENCE_TTL)",
    "presence_refuse": "subject patterns on which sub data.presence is refused, comma-separated",
    "login_attempts_per_minute": "logins per username and API process (5x per address), then 429",
    "max_body_bytes": "largest request body, bytes (nginx answers 413 beyond it)",
    "hash_concurrency": "password hashes computed at once per API process",
    "command_timeout": "seconds the API waits for NATS: a command's reply, a JetStream call",
    "demo_password": "password of the demo users admin, alice and bob (dev only)",
    "log_level": "DEBUG, INFO, WARNING or ERROR",
    "log_format": "json (one object per line), pretty (one readable line), or auto: json "
    "in production, pretty in dev",
    "api_writes_per_minute": "unsafe requests per user and API process, sustained (then 429)",
    "api_writes_burst": "unsafe requests per user and API process at once",
    "token_rotation_grace": "seconds a refreshed token's sockets may still send refresh",
    "poll_closed_keep_max": "closed long-poll sessions kept fetchable, per process",
    "poll_closed_keep_bytes": "the buffered bytes of those sessions, per process",
    "nats_gateway_password": "NATS password of the gateway role (empty in dev: generated)",
    "nats_api_password": "NATS password of the API role (empty in dev: generated)",
    "nats_provision_password": "NATS password of the provisioning role (empty in dev: generated)",
    "nats_service_password": "NATS password of the service role, for your command services "
    "(empty in dev: generated)",
    "nats_user": "this process's own NATS user, over its role's",
    "nats_password": "this process's own NATS password, over its role's",
    "nats_auth_max_bytes": "storage limit of each auth_* bucket, bytes",
    "nats_data_max_bytes": "storage limit of each data bucket (articles, todos), bytes",
    "nats_stream_max_bytes": "storage limit of each stream (chat, audit), bytes",
    "nats_max_value_bytes": "largest KV value or stream message, bytes",
    "nats_max_consumers": "consumers per stream and bucket",
    "nats_chat_max_age": "seconds a chat message is kept",
    "nats_audit_max_age": "seconds an audit record is kept",
}


def _derive(raw: dict[str, Any]) -> None:
    """Fill every port, NATS URL and origin that was not set explicitly from BASE_PORT."""
    defaults = {f.name: f.default for f in msgspec.structs.fields(Settings)}
    try:
        base = int(raw.get("base_port", defaults["base_port"]))
        nodes = int(raw.get("nats_cluster", defaults["nats_cluster"]))
    except (TypeError, ValueError):
        return  # msgspec reports the ill-typed field
    for name, offset in PORT_OFFSETS.items():
        raw.setdefault(name, base + offset)
    host = raw.get("host", defaults["host"])
    first = int(raw["nats_port"])
    raw.setdefault("nats_url", [f"nats://127.0.0.1:{first + i}" for i in range(nodes)])
    raw.setdefault("nats_replicas", max(1, min(nodes, 3)))
    raw.setdefault("allowed_origins", [f"http://{host}:{base}", f"http://localhost:{base}"])


def _field_types() -> dict[str, Any]:
    return {f.name: f.type for f in msgspec.structs.fields(Settings)}


def load(env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Settings from `env` (default: os.environ), then keyword overrides."""
    env = os.environ if env is None else env
    raw: dict[str, Any] = {}
    for name, typ in _field_types().items():
        value = env.get(name.upper())
        if value is None:
            continue
        if typ == tuple[str, ...]:
            raw[name] = [v.strip() for v in value.split(",") if v.strip()]
        else:
            raw[name] = value
    raw.update(overrides)
    _derive(raw)
    try:
        settings = msgspec.convert(raw, Settings, strict=False)
    except msgspec.ValidationError as e:
        raise SystemExit(f"invalid settings: {e}") from None
    last_nats = settings.nats_cluster - 1
    ports = [
        settings.base_port,
        *settings.api_ports,
        *settings.gateway_ports,
        settings.nats_port + last_nats,
        settings.nats_monitor_port + last_nats,
        settings.nats_cluster_port + last_nats,
    ]
    if not 0 < settings.presence_refresh < settings.presence_ttl:
        raise SystemExit("invalid settings: 0 < PRESENCE_REFRESH < PRESENCE_TTL")
    if settings.nats_cluster == 0 and not settings.nats_url:
        raise SystemExit("invalid settings: NATS_CLUSTER=0 (no NATS of its own) needs NATS_URL")
    if settings.nats_cluster < 0 or not all(1 <= p <= 65535 for p in ports):
        raise SystemExit(f"invalid settings: a derived port is out of range ({ports})")
    return settings
