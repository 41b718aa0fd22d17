"""Security 7 (API): schemathesis with every check and every phase (stateful included),
driven by GET /api/openapi.json, against one real API process and through nginx, as an admin
and as a user: no 5xx, no valid request refused, no invalid one taken, answers as documented."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest

from http_api.authz import is_admin
from shared import natsio
from shared.kvlist import live_entries
from shared.settings import Settings
from shared.users import USERS_BUCKET, UserRecord
from tests.api.conftest import Api
from tests.deploy.stackrun import login, started
from tests.natsd import free_port
from tests.reliability.conftest import FULL, Figures, Secrets, scale
from tests.reliability.helpers import ROOT, until_async

CONFIG = Path(__file__).with_name("schemathesis.toml")
# The run writes far faster than a person: its 429s would hide the answers.
UNLIMITED = {
    "LOGIN_ATTEMPTS_PER_MINUTE": "1000",
    "API_WRITES_PER_MINUTE": "100000",
    "API_WRITES_BURST": "100000",
}
STATELESS = "examples,coverage,fuzzing"
PHASES = f"{STATELESS},stateful"
# logout and refresh revoke the token the run uses: they have a run of their own.
TOKEN_ENDING = ("logout", "refresh")


@dataclass
class Run:
    """One schemathesis run: its exit code, its text output and its JSON report."""

    label: str
    returncode: int
    text: str
    report: dict[str, Any]
    elapsed: float

    @property
    def summary(self) -> str:
        return f"{self.label}: {_summary(self.report)} in {self.elapsed:.0f} s"


async def schemathesis(
    base: str,
    token: str,
    tmp_path: Path,
    label: str,
    *,
    operations: tuple[str, ...] = (),
    examples: int | None = None,
    phases: str = PHASES,
) -> Run:
    """`st run` with every check and every phase against `base`'s own document, as the
    holder of `token`; `operations`: only these operation ids (default: all but those
    ending the token)."""
    n = examples or scale(8, 60)
    report = tmp_path / f"schemathesis-{label}.json"
    select: list[str] = []
    for op in operations:
        select += ["--include-operation-id", op]
    if not operations:
        for op in TOKEN_ENDING:
            select += ["--exclude-operation-id", op]
    t0 = time.monotonic()
    st = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "st"),
        "--config-file",
        str(CONFIG),
        "run",
        f"{base}/api/openapi.json",
        "--checks",
        "all",
        "--phases",
        phases,
        "--max-examples",
        str(n),
        "--seed",
        "8" if not FULL else str(int(time.time())),
        "--workers",
        "2",
        "--request-timeout",
        "10",
        *select,
        "--header",
        f"Authorization: Bearer {token}",
        "--report",
        "json",
        "--report-json-path",
        str(report),
        "--output-truncate",
        "true",
        "--no-color",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=tmp_path,
    )
    try:
        async with asyncio.timeout(900 if FULL else 240):
            out, _ = await st.communicate()
    except TimeoutError:
        st.kill()
        raise
    text = out.decode(errors="replace")
    (tmp_path / f"schemathesis-{label}.txt").write_text(text)
    assert st.returncode is not None
    return Run(label, st.returncode, text, _report(report), time.monotonic() - t0)


def check(run: Run) -> None:
    assert run.returncode == 0, run.text[-6000:]
    # A pattern schemathesis cannot use is one no client generator can use either.
    assert not (run.report.get("warnings") or {}).get("unsupported_regex"), run.text[-3000:]


@contextlib.asynccontextmanager
async def api_process(
    settings: Settings, tmp_path: Path, secrets_seen: Secrets
) -> AsyncIterator[str]:
    """One API process on a free loopback port; yields its base URL."""
    port = free_port()
    env = {
        **os.environ,
        "NATS_URL": settings.nats_url[0],
        "VAR_DIR": settings.var_dir,
        "LOG_FORMAT": "json",
        **UNLIMITED,
    }
    log_path = tmp_path / "api.log"
    secrets_seen.extra_logs.append(log_path)
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "http_api",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            env=env,
            stdout=log,
            stderr=log,
            cwd=ROOT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:

            async def ready() -> bool:
                assert proc.returncode is None, log_path.read_text()[-2000:]
                try:
                    async with http.get(f"{base}/api/readyz") as r:
                        return r.status == 200
                except aiohttp.ClientError:
                    return False

            await until_async(ready, "the API process", 30)
        yield base
    finally:
        if proc.returncode is None:
            proc.terminate()
            await proc.wait()


async def admins_left(settings: Settings) -> list[str]:
    """The enabled users who may still manage users, read from NATS (not through the API:
    the run may have disabled, or changed the password of, the admin whose token it had)."""
    nc = await natsio.connect(settings, "schema-test", role="api")
    try:
        users = [
            msgspec.json.decode(e.value or b"", type=UserRecord)
            for e in await live_entries(nc.jetstream(), USERS_BUCKET, values=True)
        ]
    finally:
        await nc.close()
    return [u.username for u in users if is_admin(u)]


@pytest.mark.parametrize("role", ["admin", "alice"])
async def test_schemathesis_against_one_api_process(
    role: str,
    api: Api,
    settings: Settings,
    tmp_path: Path,
    figures: Figures,
    secrets_seen: Secrets,
) -> None:
    """Every check, every phase (stateful included), as an admin and as a user: no 5xx, no
    answer the document does not list, no valid request refused, none invalid taken."""
    async with api_process(settings, tmp_path, secrets_seen) as base:
        run = await schemathesis(base, api.token(role), tmp_path, f"api-{role}")
        # However the run went (it may create admins, and then disable the first), someone
        # is left to administer the stack.
        admins = await admins_left(settings)
        assert admins, "the run left no enabled admin"
    figures.add(
        "S7",
        f"test_schemathesis_against_one_api_process[{role}]",
        f"schemathesis --checks all, phases {PHASES} (up to {scale(8, 60)} cases per "
        f"operation), every operation of /api/openapi.json but {'/'.join(TOKEN_ENDING)}, "
        f"as {role}, against one API process",
        f"{run.summary}; exit {run.returncode}; enabled admins after: {len(admins)}",
        output_tail=run.text[-3000:],
    )
    check(run)


async def test_schemathesis_on_the_operations_that_end_a_token(
    api: Api, settings: Settings, tmp_path: Path, figures: Figures, secrets_seen: Secrets
) -> None:
    """logout and refresh revoke the token they are given: a run of their own, with a token
    that nothing else needs; after the first success every later case is a documented 401."""
    async with api_process(settings, tmp_path, secrets_seen) as base:
        # No stateful phase: these two link to nothing and nothing links to them.
        run = await schemathesis(
            base,
            api.token("bob"),
            tmp_path,
            "token-ending",
            operations=TOKEN_ENDING,
            phases=STATELESS,
        )
    figures.add(
        "S7",
        "test_schemathesis_on_the_operations_that_end_a_token",
        f"schemathesis --checks all, phases {STATELESS}, on {', '.join(TOKEN_ENDING)} as bob",
        f"{run.summary}; exit {run.returncode}",
        output_tail=run.text[-3000:],
    )
    check(run)


async def test_schemathesis_through_nginx(
    tmp_path: Path, figures: Figures, secrets_seen: Secrets
) -> None:
    """The same runs through the deployed stack: what nginx answers by itself (413, TRACE's
    405, paths its other locations would take) must be as documented as the API's own."""
    runs = []
    with started(tmp_path / "var", **UNLIMITED) as stack:
        secrets_seen.extra_logs += sorted(stack.layout.log_dir.glob("*.log"))
        async with aiohttp.ClientSession(base_url=stack.url) as http:
            await _nginx_answers_are_problems(http, stack.settings.max_body_bytes)
            tokens = {role: (await login(http, role))[0] for role in ("admin", "alice")}
        for role, token in tokens.items():
            runs.append(await schemathesis(stack.url, token, tmp_path, f"nginx-{role}"))
        assert await admins_left(stack.settings), "the run left no enabled admin"
    for run in runs:
        figures.add(
            "S7",
            "test_schemathesis_through_nginx",
            f"schemathesis --checks all, phases {PHASES} (up to {scale(8, 60)} cases per "
            f"operation) through nginx (make start), as {run.label.removeprefix('nginx-')}",
            f"{run.summary}; exit {run.returncode}",
            output_tail=run.text[-3000:],
        )
    for run in runs:
        check(run)


async def _nginx_answers_are_problems(http: aiohttp.ClientSession, max_body: int) -> None:
    """What nginx answers by itself under /api is problem+json, with Allow on a 405, and an
    API path with a dot-file segment still reaches the API (its 401, not nginx's 404)."""
    cases = [
        ("TRACE", "/api/articles/abc", None, 405),
        ("POST", "/api/articles", b"x" * (max_body + 1), 413),
        ("GET", "/api/articles/.exe", None, 401),
        ("GET", "/.git/config", None, 404),
    ]
    for method, path, body, status in cases:
        async with http.request(method, path, data=body) as resp:
            assert resp.status == status, (method, path, await resp.text())
            assert resp.content_type == "application/problem+json", (method, path)
            problem = await resp.json()
            assert problem["status"] == status and problem["type"].startswith("urn:natsgate:")
            if status == 405:
                assert resp.headers["Allow"] == "DELETE, GET, HEAD, PUT"
    async with http.get("/api/articles") as resp:
        assert "Allow" not in resp.headers  # only a 405 says what is allowed


def _report(report: Path) -> dict[str, Any]:
    try:
        doc: dict[str, Any] = json.loads(report.read_text())
    except (OSError, ValueError):
        return {}
    return doc


def _summary(doc: dict[str, Any]) -> str:
    if not doc:
        return "no report"
    ops, cases = doc.get("operations", {}), doc.get("test_cases", {})
    warnings = {k: v for k, v in (doc.get("warnings") or {}).items() if v}
    return (
        f"{ops.get('tested')} operations, {cases.get('generated')} test cases, "
        f"{cases.get('with_failures')} with failures, {len(doc.get('errors') or [])} errors; "
        f"schema warnings: {sorted(warnings) or 'none'}"
    )
