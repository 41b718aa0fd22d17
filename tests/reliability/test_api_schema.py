"""Security 7 (API): schemathesis, driven by GET /api/openapi.json, against the real API
process on a free loopback port: no 500, every response matches the document."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from shared.settings import Settings
from tests.api.conftest import Api
from tests.natsd import free_port
from tests.reliability.conftest import FULL, Figures, Secrets, scale
from tests.reliability.helpers import ROOT, until_async

CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_headers_conformance",
        "response_schema_conformance",
    ]
)


async def test_schemathesis_against_the_openapi_document(
    api: Api, settings: Settings, tmp_path: Path, figures: Figures, secrets_seen: Secrets
) -> None:
    """Generated and mutated requests for every operation: no 5xx, responses as documented."""
    port = free_port()
    env = {
        **os.environ,
        "NATS_URL": settings.nats_url[0],
        "VAR_DIR": settings.var_dir,
        "LOG_FORMAT": "json",
        "LOGIN_ATTEMPTS_PER_MINUTE": "1000",
        # the run writes far faster than a person: its 429s would hide the answers
        "API_WRITES_PER_MINUTE": "100000",
        "API_WRITES_BURST": "100000",
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
    report = tmp_path / "schemathesis.json"
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
        token = api.token("admin")
        n = scale(8, 60)
        t0 = time.monotonic()
        st = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).parent / "st"),
            "run",
            f"{base}/api/openapi.json",
            "--checks",
            CHECKS,
            "--max-examples",
            str(n),
            "--seed",
            "8" if not FULL else str(int(time.time())),
            "--phases",
            "examples,coverage,fuzzing",
            "--workers",
            "2",
            "--request-timeout",
            "10",
            "--exclude-operation-id",
            "logout",  # it would revoke the token of the run
            "--exclude-operation-id",
            "refresh",  # so would it: a refresh rotates (the old token is revoked)
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
        elapsed = time.monotonic() - t0
    finally:
        if proc.returncode is None:
            proc.terminate()
            await proc.wait()
    text = out.decode(errors="replace")
    (tmp_path / "schemathesis.txt").write_text(text)
    doc = _report(report)
    summary = _summary(doc)
    figures.add(
        "S7",
        "test_schemathesis_against_the_openapi_document",
        f"schemathesis (examples, coverage, fuzzing; up to {n} cases per operation) over every "
        f"operation of /api/openapi.json but logout, as admin, checks: {CHECKS}",
        f"{summary} in {elapsed:.0f} s; exit {st.returncode}",
        output_tail=text[-3000:],
    )
    assert st.returncode == 0, text[-6000:]
    # A pattern schemathesis cannot use is one no client generator can use either.
    assert not (doc.get("warnings") or {}).get("unsupported_regex"), text[-3000:]


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
