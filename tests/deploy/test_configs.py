"""The deploy configs, checked by the real tools: nginx -t, nats-server -t, supervisord.

These need neither the API nor the gateway: NATS runs under the rendered supervisord.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from nats.js import api

from deploy import stack
from deploy.limits import HEADROOM, Limits, hard_nofile
from deploy.render import Layout, nats_server_binary, nginx_binary, render, script_hashes
from deploy.render import stack_env as make_stack_env
from shared.natsio import nats_connect
from shared.settings import Settings, load
from tests.deploy.stackrun import ROOT, clean_env, free_base_port, nats_node_down


def _settings(tmp_path: Path, **env: str) -> Settings:
    return load(clean_env(VAR_DIR=str(tmp_path / "var"), **env))


def test_every_port_derives_from_base_port() -> None:
    """One BASE_PORT moves nginx, API workers, gateways, NATS, origins; explicit values win."""
    s = load({"BASE_PORT": "9080", "NATS_CLUSTER": "3", "GATEWAY_PROCS": "3"})
    assert s.base_port == 9080
    assert list(s.api_ports) == [9101, 9102]
    assert list(s.gateway_ports) == [9201, 9202, 9203]
    assert s.nats_url == tuple(f"nats://127.0.0.1:{p}" for p in (5222, 5223, 5224))
    assert (s.nats_monitor_port, s.nats_cluster_port, s.nats_replicas) == (9222, 7222, 3)
    assert s.allowed_origins == ("http://127.0.0.1:9080", "http://localhost:9080")
    d = load({})
    assert (d.base_port, d.api_port, d.gateway_port, d.nats_port) == (8080, 8101, 8201, 4222)
    assert d.nats_url == ("nats://127.0.0.1:4222",) and d.nats_replicas == 1
    assert load({"BASE_PORT": "9080", "API_PORT": "7000"}).api_port == 7000
    with pytest.raises(SystemExit):
        load({"BASE_PORT": "1000"})  # NATS would land below port 1


def test_rendered_nginx_config_is_valid(tmp_path: Path) -> None:
    """nginx -t accepts the config; upstreams, limits and security headers are in it."""
    s = _settings(tmp_path, BASE_PORT="9080", GATEWAY_PROCS="3")
    layout = Layout.of(s)
    render(s, layout)
    nginx = nginx_binary()
    assert nginx
    res = subprocess.run(
        [
            nginx,
            "-t",
            "-p",
            str(layout.nginx_prefix),
            "-c",
            str(layout.nginx_conf),
            "-e",
            str(layout.log_dir / "nginx-error.log"),
        ],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    conf = layout.nginx_conf.read_text()
    assert "listen 127.0.0.1:9080 reuseport;" in conf
    for port in (9101, 9102, 9201, 9202, 9203):
        assert f"server 127.0.0.1:{port} " in conf
    assert re.search(r"upstream ws_gateway \{\s*least_conn;", conf)
    assert "client_max_body_size 256k;" in conf
    csp = re.search(r"''\s+\"([^\"]+)\";", conf)
    assert csp and "unsafe-inline" not in csp.group(1) and "unsafe-eval" not in csp.group(1)
    for header in ("X-Content-Type-Options nosniff", "X-Frame-Options DENY", "Referrer-Policy"):
        assert header in conf
    assert "proxy_set_header X-Forwarded-For $remote_addr;" in conf


def test_fd_limits_derive_from_max_connections(tmp_path: Path) -> None:
    """MAX_CONNECTIONS sizes nginx (two connections per WebSocket, spread over its workers),
    supervisord's minfds and each gateway's share, within the fd limit the stack inherits."""
    s = _settings(tmp_path, BASE_PORT="9080", MAX_CONNECTIONS="30000", GATEWAY_PROCS="3")
    layout = Layout.of(s)
    render(s, layout)
    limits = Limits.of(s)
    assert limits.gateway_cap * 3 >= 30000 and s.gateway_max_connections == limits.gateway_cap
    assert limits.nginx_workers * (limits.worker_connections - HEADROOM) >= 2 * 30000
    assert limits.nginx_nofile > limits.worker_connections
    assert limits.minfds <= hard_nofile()
    conf = layout.nginx_conf.read_text()
    assert f"worker_processes {limits.nginx_workers};" in conf
    assert f"worker_connections {limits.worker_connections};" in conf
    assert f"worker_rlimit_nofile {limits.nginx_nofile};" in conf
    assert f"minfds = {limits.minfds}" in layout.supervisord_conf.read_text()
    assert 'MAX_CONNECTIONS="30000"' in layout.supervisord_conf.read_text()


def test_start_refuses_more_connections_than_the_fd_limit_allows(tmp_path: Path) -> None:
    """`make start` says which limit to raise, and starts nothing."""
    s = _settings(tmp_path, BASE_PORT="9080", MAX_CONNECTIONS="30000", GATEWAY_PROCS="1")
    problem = Limits.of(s, hard=20000).problem(s, hard=20000)
    assert problem is not None
    assert "ulimit -Hn 31024" in problem and "GATEWAY_PROCS=2" in problem
    assert Limits.of(s, hard=40000).problem(s, hard=40000) is None
    huge = str(hard_nofile() * 4)
    env = clean_env(
        VAR_DIR=str(tmp_path / "huge"), BASE_PORT=str(free_base_port()), MAX_CONNECTIONS=huge
    )
    res = subprocess.run(
        ["make", "-s", "--no-print-directory", "start"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert res.returncode != 0
    assert f"MAX_CONNECTIONS={huge} needs" in res.stderr and "`ulimit -Hn`" in res.stderr
    assert not (tmp_path / "huge" / "supervisord.conf").exists()


@pytest.mark.parametrize("env", [{}, {"NATS_CLUSTER": "3", "GATEWAY_PROCS": "3", "API_PROCS": "4"}])
def test_gixy_finds_nothing_in_the_rendered_nginx_config(
    tmp_path: Path, env: dict[str, str]
) -> None:
    """gixy (gixy-next), every plugin at every severity, on the config `make start` renders:
    its findings are bugs (a header set in a location that drops the server's, buffering
    turned off, an unanchored regex, ...). The report is JSON, so a failure names each."""
    s = _settings(tmp_path, BASE_PORT="9080", **env)
    layout = Layout.of(s)
    render(s, layout)
    gixy = Path(sys.executable).parent / "gixy"
    res = subprocess.run(
        [str(gixy), "--format", "json", str(layout.nginx_conf)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode in (0, 1), res.stderr  # 2+: gixy could not read the config
    findings = json.loads(res.stdout or "[]")
    assert findings == [], json.dumps(findings, indent=1)[:4000]
    assert res.returncode == 0
    # Each proxied location sets every forwarded header itself (none is inherited).
    conf = layout.nginx_conf.read_text()
    for location in ("^~ /api/", "= /api/metrics", "= /ws", "= /poll", "/poll/"):
        block = conf.split(f"location {location} {{", 1)[1].split("}", 1)[0]
        for header in ("Host", "X-Real-IP", "X-Forwarded-For", "X-Request-Id"):
            assert f"proxy_set_header {header} " in block, (location, header)


def test_inline_scripts_of_the_spa_get_csp_hashes(tmp_path: Path) -> None:
    """An inline import map is allowed by its hash, never by 'unsafe-inline'."""
    (tmp_path / "index.html").write_text(
        '<script type="importmap">{"imports": {}}</script><script src="/app.js"></script>'
    )
    digest = base64.b64encode(hashlib.sha256(b'{"imports": {}}').digest()).decode()
    assert script_hashes(tmp_path) == [f"'sha256-{digest}'"]
    assert script_hashes(tmp_path / "missing") == []


@pytest.mark.parametrize("nodes", [1, 3])
def test_rendered_nats_configs_are_valid(tmp_path: Path, nodes: int) -> None:
    """nats-server -t accepts every node's config; JetStream syncs every write."""
    s = _settings(tmp_path, NATS_CLUSTER=str(nodes))
    layout = Layout.of(s)
    render(s, layout)
    confs = sorted(layout.nats_dir.glob("n*.conf"))
    assert len(confs) == nodes
    for conf in confs:
        res = subprocess.run(
            [nats_server_binary(), "-t", "-c", str(conf)], capture_output=True, text=True
        )
        assert res.returncode == 0, res.stdout + res.stderr
        assert "sync_interval: always" in conf.read_text()


@pytest.fixture
def nats_only(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[Settings, Layout]]:
    """supervisord from the rendered config with only its autostart group (NATS) running."""
    nodes = request.param
    s = _settings(tmp_path, BASE_PORT=str(free_base_port(nodes)), NATS_CLUSTER=str(nodes))
    layout = Layout.of(s)
    render(s, layout)
    env = {**clean_env(), **make_stack_env(s, layout)}
    subprocess.run([stack.SUPERVISORD, "-c", str(layout.supervisord_conf)], env=env, check=True)
    try:
        deadline = time.monotonic() + 30
        stack._poll("NATS", lambda: stack._nats_healthy(s), deadline)
        yield s, layout
    finally:
        stack.stop(layout, quiet=True)
        assert stack.stack_pids(layout) == []


@pytest.mark.parametrize("nats_only", [3], indirect=True)
async def test_nats_cluster_keeps_acknowledged_writes_when_a_node_is_killed(
    nats_only: tuple[Settings, Layout],
) -> None:
    """3 nodes form a cluster; SIGKILL one during R3 writes: no acked write is lost and the
    node rejoins (supervisord restarts it)."""
    s, layout = nats_only
    nc = await nats_connect(
        servers=list(s.nats_url), max_reconnect_attempts=-1, reconnect_time_wait=0.2
    )
    try:
        js = nc.jetstream()
        deadline = asyncio.get_running_loop().time() + 20
        while True:  # the meta leader may still be electing
            try:
                await js.add_stream(
                    api.StreamConfig(
                        name="t", subjects=["t.>"], num_replicas=3, storage=api.StorageType.FILE
                    )
                )
                break
            except Exception:
                if asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(0.2)
        info = await js.stream_info("t")
        assert info.cluster is not None and len(info.cluster.replicas or []) == 2

        acked: list[int] = []
        acked_while_down = 0

        async def write(n: int) -> int:
            count = 0
            deadline = asyncio.get_running_loop().time() + 30
            while count < n and asyncio.get_running_loop().time() < deadline:
                try:
                    ack = await js.publish("t.x", str(len(acked)).encode(), timeout=2)
                except Exception:
                    await asyncio.sleep(0.05)  # not acknowledged: never counted
                    continue
                acked.append(ack.seq)
                count += 1
            return count

        await write(50)
        async with nats_node_down(s, layout, 1):  # n1 killed and kept down: write meanwhile
            acked_while_down = await write(100)
            assert acked_while_down == 100, "the cluster stopped taking writes with one node down"
        await write(20)
        for seq in acked:  # every acknowledged write is stored
            assert (await js.get_msg("t", seq)).seq == seq
    finally:
        await nc.close()


@pytest.mark.parametrize("nats_only", [1], indirect=True)
def test_stop_ends_what_a_killed_supervisord_left(nats_only: tuple[Settings, Layout]) -> None:
    """supervisord SIGKILLed leaves NATS orphaned: `stop` finds it by marker and ends it."""
    _, layout = nats_only
    pid = stack._read_pid(layout.supervisord_pid)
    assert pid
    orphans = [p for p in stack.stack_pids(layout) if p != pid]
    assert orphans  # nats-server
    os.kill(pid, signal.SIGKILL)
    stack._poll("supervisord to die", lambda: not stack._pid_alive(pid), time.monotonic() + 10)
    assert set(orphans) <= set(stack.stack_pids(layout))
    stack.stop(layout, quiet=True)
    assert stack.stack_pids(layout) == []


def test_shim_config_points_supervisorctl_at_var() -> None:
    """`supervisorctl -c deploy/supervisord.conf` talks to the default stack under var/."""
    text = (ROOT / "deploy" / "supervisord.conf").read_text()
    assert "unix://%(here)s/../var/run/supervisor.sock" in text
    assert "files = ../var/supervisord.conf" in text
