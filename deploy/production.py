"""A production host without `make` or supervisord: systemd units, the environment file
they read, and an nginx snippet, all rendered from the same settings as the dev stack.

    python -m deploy systemd [--out DIR] [--user natsgate] [--env-dir /etc/natsgate]

writes into DIR (default VAR_DIR/systemd) and renders the stack's NATS configs as `render`
does. deploy/README.md ("Running on a host without make") says where each file goes.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from deploy.render import DEPLOY, Layout, _write, fill, nats_server_binary, render, stack_env
from shared.settings import Settings

TEMPLATES = DEPLOY / "templates" / "systemd"

HARDENING = """NoNewPrivileges=yes
PrivateTmp=yes
ProtectSystem=strict
ProtectHome=read-only
ReadWritePaths={var}"""

# The part of the stack's nginx.conf that belongs in the distro's `http {}` (through
# conf.d/): its own log format, upstreams, maps and server. The rest of that file (types,
# sendfile, gzip, temp paths, pid) is the distro's own and would be a duplicate there.
_SNIPPET_START = re.compile(r"^\s*# One JSON line per request", re.MULTILINE)


def units(settings: Settings) -> list[str]:
    """Every unit instance natsgate.target starts, in start order."""
    return [
        *(f"natsgate-nats@{i}.service" for i in range(settings.nats_cluster)),
        "natsgate-provision.service",
        *(f"natsgate-api@{p}.service" for p in settings.api_ports),
        *(f"natsgate-gateway@{p}.service" for p in settings.gateway_ports),
    ]


def environment(settings: Settings, layout: Layout) -> str:
    """The environment file every unit reads: the settings that place the stack (ports,
    NATS URLs, VAR_DIR). No secret: role passwords go in their role's own file."""
    env = stack_env(settings, layout)
    env.pop("PYTHONUNBUFFERED")
    lines = [
        "# natsgate settings of this host (shared/settings.py; .env.example lists them all).",
        "# No secret here: each role's NATS password goes in its own file beside this one",
        "# (api.env: NATS_API_PASSWORD, gateway.env, provision.env), mode 0600.",
        *(f"{k}={v}" for k, v in env.items()),
        "PYTHONUNBUFFERED=1",
    ]
    return "\n".join(lines) + "\n"


def nginx_snippet(nginx_conf: str) -> str:
    """The `http {}`-level part of the stack's rendered nginx.conf."""
    m = _SNIPPET_START.search(nginx_conf)
    end = nginx_conf.rstrip().rfind("}")  # the closing brace of `http {`
    if m is None or end < m.start():
        raise SystemExit("nginx template: cannot find the log format that starts the snippet")
    body = nginx_conf[m.start() : end].rstrip()
    lines = [line[4:] if line.startswith("    ") else line for line in body.splitlines()]
    head = (
        "# natsgate for the distro's nginx: include it inside `http {}` (Debian: save it as\n"
        "# /etc/nginx/conf.d/natsgate.conf). Rendered by `python -m deploy systemd` from\n"
        "# deploy/templates/nginx.conf; TLS: see deploy/README.md, Production.\n"
    )
    return head + "\n".join(lines) + "\n"


def render_systemd(
    settings: Settings,
    layout: Layout,
    out: Path,
    *,
    user: str = "natsgate",
    group: str | None = None,
    env_dir: Path = Path("/etc/natsgate"),
    bin_dir: Path | None = None,
) -> list[Path]:
    """Write the units, `natsgate.env` and `nginx-natsgate.conf` into `out`; returns them."""
    render(settings, layout)  # NATS configs (and the nginx.conf the snippet comes from)
    bin_dir = bin_dir or _bin_dir()
    values: dict[str, object] = {
        "user": user,
        "group": group or user,
        "env_dir": env_dir,
        "bin_dir": bin_dir,
        "host": settings.host,
        "nats_server": nats_server_binary(),
        "nats_dir": layout.nats_dir,
        "nats_units": " ".join(u for u in units(settings) if u.startswith("natsgate-nats@")),
        "wants": " ".join(units(settings)),
        "first_api_port": settings.api_port,
        "first_gateway_port": settings.gateway_port,
        "hardening": HARDENING.format(var=layout.var),
    }
    written = []
    for template in sorted(TEMPLATES.iterdir()):
        path = out / template.name
        _write(path, fill(template.read_text(), values))
        written.append(path)
    written.append(out / "natsgate.env")
    _write(written[-1], environment(settings, layout))
    written.append(out / "nginx-natsgate.conf")
    _write(written[-1], nginx_snippet(layout.nginx_conf.read_text()))
    return written


def _bin_dir() -> Path:
    """Where the console scripts are: `pip install` puts them beside its python."""
    return Path(sys.executable).parent
