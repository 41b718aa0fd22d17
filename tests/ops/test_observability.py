"""Issue 25 against a running stack (`make start`, JSON logs): the dashboard's and the
alert rules' metrics are in a real scrape of the gateways and the API workers; a request's
id links nginx's access line, the API's line and the response; a connection's id is on the
gateway's lines; every line is JSON with an ISO-8601 UTC time; a login leaves no token and
no cookie in any log (passwords: tests/ops/test_logging.py, and S6 after the suite)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import websockets
import yaml

from deploy.render import ROOT, scrape_targets
from tests.deploy.stackrun import Stack, login
from tests.ops.promql import SYNTHETIC, exposed_names, metric_names
from tests.waits import until_async

DASHBOARD = ROOT / "deploy" / "grafana" / "natsgate.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"


def dashboard_queries() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    assert exprs, "the dashboard has no query"
    return exprs


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    rules = [r for g in doc["groups"] for r in g["rules"]]
    assert rules and all({"alert", "expr", "labels"} <= r.keys() for r in rules)
    return rules


async def scrape(stack: Stack) -> dict[str, str]:
    """Each target of the rendered file_sd list, as Prometheus would scrape it."""
    targets = json.loads((stack.layout.var / "prometheus" / "targets.json").read_text())
    assert targets == scrape_targets(stack.settings)
    pages: dict[str, str] = {}
    async with aiohttp.ClientSession() as http:
        for group in targets:
            path = group["labels"].get("__metrics_path__", "/metrics")
            for target in group["targets"]:
                async with http.get(f"http://{target}{path}") as r:
                    assert r.status == 200, (target, await r.text())
                    pages[f"{group['labels']['job']} {target}"] = await r.text()
    return pages


def _log_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _app_logs(stack: Stack, program: str) -> list[Path]:
    return sorted(stack.layout.log_dir.glob(f"{program}_*.log"))


async def test_dashboard_and_alerts_name_only_scraped_metrics(ops_stack: Stack) -> None:
    """Every metric a panel or an alert reads is on a gateway's or an API worker's page;
    RSS and CPU are on every process's page; the readiness and consumer gauges are set."""
    async with aiohttp.ClientSession(base_url=ops_stack.url) as http:
        await login(http, "alice")  # a request of each kind the API panels show
    pages = await scrape(ops_stack)
    exposed = set().union(*(exposed_names(p) for p in pages.values())) | SYNTHETIC
    wanted = {n for e in dashboard_queries() for n in metric_names(e)}
    wanted |= {n for r in alert_rules() for n in metric_names(r["expr"])}
    assert len(wanted) > 20
    assert wanted - exposed == set()
    for name, page in pages.items():
        for metric in ("process_resident_memory_bytes", "process_cpu_seconds_total"):
            assert re.search(rf"^{metric} \d", page, re.MULTILINE), (name, metric)
        assert re.search(r"^(gateway|http_api)_ready 1\.0$", page, re.MULTILINE), name
    api_page = next(p for n, p in pages.items() if n.startswith("natsgate_api"))
    assert 'http_api_nats_stream_max_consumers{stream="KV_auth_users"} 1000.0' in api_page
    consumers = r'^http_api_nats_stream_consumers\{stream="KV_auth_users"\} [1-9]'
    assert re.search(consumers, api_page, re.MULTILINE)  # the gateways' watches


def test_alert_rules_parse_and_pass_promtool_when_present() -> None:
    """Every rule parses with a severity and a summary; promtool (Debian's prometheus
    package, ~100 MB, not installed by `make test`) checks them too where it is there."""
    rules = alert_rules()
    assert {r["labels"]["severity"] for r in rules} <= {"page", "warn"}
    assert all(r["annotations"]["summary"] for r in rules)
    assert len({r["alert"] for r in rules}) == len(rules)
    promtool = shutil.which("promtool")
    if promtool is not None:
        res = subprocess.run(
            [promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True
        )
        assert res.returncode == 0, res.stdout + res.stderr
        assert f"SUCCESS: {len(rules)} rules found" in res.stdout


async def test_request_id_links_nginx_api_and_response(ops_stack: Stack) -> None:
    """nginx's $request_id reaches the API (X-Request-Id), which logs it on the request's
    line and returns it; nginx's access line carries the same id."""
    async with aiohttp.ClientSession(base_url=ops_stack.url) as http:
        async with http.get("/api/users/me-not-a-route") as r:
            rid = r.headers["X-Request-Id"]
            status = r.status
    assert re.fullmatch(r"[0-9a-f]{32}", rid)

    def lines_with(files: list[Path]) -> list[dict[str, Any]]:
        return [line for f in files for line in _log_lines(f) if line.get("request_id") == rid]

    async def logged() -> bool:
        return bool(lines_with([ops_stack.layout.log_dir / "nginx-access.log"])) and bool(
            lines_with(_app_logs(ops_stack, "http_api"))
        )

    await until_async(logged, "the request's nginx and API lines", 10)
    (access,) = lines_with([ops_stack.layout.log_dir / "nginx-access.log"])
    assert access["uri"] == "/api/users/me-not-a-route" and access["status"] == status
    api_line = next(x for x in lines_with(_app_logs(ops_stack, "http_api")) if x.get("route"))
    assert api_line["status"] == status and api_line["msg"].startswith("GET ")


async def test_connection_id_on_gateway_lines(ops_stack: Stack) -> None:
    """A WebSocket's upgrade id (nginx's $request_id) is the `conn` of the gateway's lines
    for that connection."""
    async with aiohttp.ClientSession(base_url=ops_stack.url) as http:
        token, _ = await login(http, "bob")
    async with websockets.connect(
        ops_stack.ws_url, additional_headers={"Authorization": f"Bearer {token}"}
    ) as ws:
        assert json.loads(await ws.recv())["op"] == "cap_update"
    access_log = ops_stack.layout.log_dir / "nginx-access.log"

    def upgrades() -> list[dict[str, Any]]:
        return [x for x in _log_lines(access_log) if x["uri"] == "/ws" and x["status"] == 101]

    async def closed() -> bool:
        return bool(upgrades())

    await until_async(closed, "nginx's access line of the WebSocket", 10)
    conn = upgrades()[-1]["request_id"]
    gateway_lines = [x for f in _app_logs(ops_stack, "ws_gateway") for x in _log_lines(f)]
    mine = [x for x in gateway_lines if x.get("conn") == conn]
    assert any(x["msg"] == "session open" for x in mine), gateway_lines[-5:]


async def test_logs_are_json_with_iso_utc_time_and_no_secret(ops_stack: Stack) -> None:
    """Every line the API workers and gateways wrote is a JSON object with an ISO-8601
    UTC time and its own level; after logins, no token and no cookie is in any log of
    the stack."""
    async with aiohttp.ClientSession(base_url=ops_stack.url) as http:
        token, cookie = await login(http, "admin")
        async with http.get("/api/auth/me", headers={"Authorization": f"Bearer {token}"}) as r:
            assert r.status == 200
    app_logs = _app_logs(ops_stack, "http_api") + _app_logs(ops_stack, "ws_gateway")
    assert len(app_logs) == ops_stack.settings.api_procs + ops_stack.settings.gateway_procs
    count = 0
    for f in app_logs:
        for line in _log_lines(f):
            when = datetime.fromisoformat(line["time"])
            assert when.utcoffset() is not None and when.utcoffset().total_seconds() == 0
            assert line["level"] in {"debug", "info", "warning", "error", "critical"}
            count += 1
    assert count > 0
    secrets = [token, token.rsplit(".", 1)[-1], cookie]  # a signature alone leaks too
    logs = sorted(ops_stack.layout.log_dir.iterdir())
    assert any(f.name == "nginx-access.log" for f in logs)
    for f in logs:
        text = f.read_text(errors="replace")
        assert not [s for s in secrets if s in text], f.name
