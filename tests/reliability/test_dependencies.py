"""Security 8: pip-audit over what the project installs (the venv `make install` builds;
there is no separate lock file). Full run only: it needs PyPI's advisory data, an external
service that `make test` must not depend on."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

from tests.reliability.conftest import Figures

pytestmark = pytest.mark.full_only


async def test_pip_audit_finds_no_known_advisory(tmp_path: Path, figures: Figures) -> None:
    """Every installed distribution audited against the advisory service: none vulnerable.
    When the service cannot be reached the test says so (skip), it never passes blind."""
    out = tmp_path / "audit.json"
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "pip-audit"),
        "--local",
        "--skip-editable",
        "--progress-spinner",
        "off",
        "--format",
        "json",
        "--output",
        str(out),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    async with asyncio.timeout(300):
        text = (await proc.communicate())[0].decode(errors="replace")
    try:
        deps = json.loads(out.read_text())["dependencies"]
    except (OSError, ValueError, KeyError):
        deps = []
    audited = [d for d in deps if "skip_reason" not in d]
    skipped = [d for d in deps if "skip_reason" in d]
    vulnerable = {
        f"{d['name']} {d['version']}": [v["id"] for v in d["vulns"]]
        for d in audited
        if d.get("vulns")
    }
    if not audited:
        reason = (
            f"advisory service unreachable: pip-audit could audit none of {len(deps)} "
            f"installed distributions ({skipped[0]['skip_reason'] if skipped else text[-300:]})"
        )
        figures.add(
            "S8",
            "test_pip_audit_finds_no_known_advisory",
            "pip-audit --local over the project's venv (runtime and dev dependencies)",
            "NOT CHECKED: " + reason,
        )
        pytest.skip(reason)
    figures.add(
        "S8",
        "test_pip_audit_finds_no_known_advisory",
        "pip-audit --local over the project's venv (runtime and dev dependencies)",
        f"{len(audited)} distributions audited, {len(skipped)} could not be, "
        f"{len(vulnerable)} with known advisories {vulnerable or ''}",
    )
    assert vulnerable == {}
    assert not skipped, [d["skip_reason"] for d in skipped]
