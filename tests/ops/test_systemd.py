"""The production path's files, as `python -m deploy systemd` renders them: the units pass
`systemd-analyze verify` (instances of the templates, with their console scripts), the
target starts every process of the settings, no secret is in any of them, and the nginx
snippet is accepted by nginx inside a distro-style `http {}`."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from deploy.production import render_systemd, units
from deploy.render import Layout, nginx_binary
from shared.settings import Settings, load

PASSWORDS = {
    f"NATS_{role}_PASSWORD": f"pw-{role.lower()}-0123456789"
    for role in ("GATEWAY", "API", "PROVISION", "SERVICE")
}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> tuple[Settings, Layout, Path]:
    base = tmp_path_factory.mktemp("systemd")
    settings = load(
        {"VAR_DIR": str(base / "var"), "BASE_PORT": "18080", "API_PROCS": "3", **PASSWORDS}
    )
    layout = Layout.of(settings)
    out = base / "units"
    render_systemd(settings, layout, out, user="root", env_dir=base / "etc")
    return settings, layout, out


def test_units_pass_systemd_analyze_verify(rendered: tuple[Settings, Layout, Path]) -> None:
    settings, _, out = rendered
    tool = shutil.which("systemd-analyze")
    assert tool, "systemd-analyze missing: `make test` installs it (tests/ops/ensure-tools.sh)"
    names = units(settings)
    assert names == [
        "natsgate-nats@0.service",
        "natsgate-provision.service",
        "natsgate-api@18101.service",
        "natsgate-api@18102.service",
        "natsgate-api@18103.service",
        "natsgate-gateway@18201.service",
        "natsgate-gateway@18202.service",
    ]
    for name in names:  # an instance is a link to its template, as systemctl enable makes
        if "@" in name:
            (out / name).unlink(missing_ok=True)
            (out / name).symlink_to(name.split("@")[0] + "@.service")
    res = subprocess.run(
        [tool, "verify", *(str(out / n) for n in [*names, "natsgate.target"])],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0 and res.stderr.strip() == "", res.stderr
    target = (out / "natsgate.target").read_text()
    assert f"Wants={' '.join(names)}" in target
    api = (out / "natsgate-api@.service").read_text()
    assert "ExecStartPre=" in api and "natsgate-api check-config" in api
    assert "--port %i" in api and "ExecStart=" in api


def test_no_secret_in_the_rendered_files(rendered: tuple[Settings, Layout, Path]) -> None:
    """Passwords stay in the role files the operator writes (api.env, …) and the 0600
    NATS configs; the units, natsgate.env and the nginx snippet hold none."""
    settings, layout, out = rendered
    files = sorted(p for p in out.iterdir() if p.is_file() and not p.is_symlink())
    assert {p.name for p in files} >= {"natsgate.env", "nginx-natsgate.conf"}
    for f in files:
        text = f.read_text()
        assert not [pw for pw in PASSWORDS.values() if pw in text], f.name
    env = dict(
        line.split("=", 1)
        for line in (out / "natsgate.env").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert env["BASE_PORT"] == "18080" and env["VAR_DIR"] == str(layout.var)
    assert env["NATS_URL"] == ",".join(settings.nats_url)
    nats_conf = layout.nats_dir / "n0.conf"
    assert PASSWORDS["NATS_API_PASSWORD"] in nats_conf.read_text()
    assert nats_conf.stat().st_mode & 0o077 == 0


def test_nginx_snippet_loads_in_a_distro_http_block(
    rendered: tuple[Settings, Layout, Path], tmp_path: Path
) -> None:
    """Debian's nginx.conf sets sendfile, gzip, types and its own logs in `http {}` and
    includes conf.d/*.conf there: the snippet must not repeat any of those."""
    nginx = nginx_binary()
    assert nginx, "nginx missing: `make test` installs it (deploy/ensure-nginx.sh)"
    _, _, out = rendered
    main = tmp_path / "nginx.conf"
    main.write_text(
        f"""pid {tmp_path}/nginx.pid;
error_log {tmp_path}/error.log;
events {{ worker_connections 64; }}
http {{
    sendfile on;
    tcp_nopush on;
    types_hash_max_size 2048;
    types {{ text/html html; }}
    default_type application/octet-stream;
    access_log {tmp_path}/access.log;
    gzip on;
    client_body_temp_path {tmp_path}/body;
    proxy_temp_path {tmp_path}/proxy;
    fastcgi_temp_path {tmp_path}/fastcgi;
    uwsgi_temp_path {tmp_path}/uwsgi;
    scgi_temp_path {tmp_path}/scgi;
    include {out}/nginx-natsgate.conf;
}}
"""
    )
    res = subprocess.run(
        [nginx, "-t", "-p", str(tmp_path), "-c", str(main), "-e", str(tmp_path / "error.log")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 0, res.stderr
    snippet = (out / "nginx-natsgate.conf").read_text()
    assert "upstream http_api" in snippet and "X-Request-Id $request_id" in snippet
