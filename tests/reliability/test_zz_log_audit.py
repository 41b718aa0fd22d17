"""Security 6: after the whole suite, no issued token and no password used by it appears
in any log: the in-process gateways and APIs (captured at INFO through the project's
formatter), the gateway and API subprocesses, and every log of the stacks the suite ran."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.reliability.conftest import Figures, Secrets

JWT = re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{20,}")


def _log_files(base: Path, secrets_seen: Secrets) -> list[Path]:
    found = {secrets_seen.log_file, *secrets_seen.extra_logs}
    for p in base.rglob("*"):
        if p.is_file() and (p.suffix in (".log", ".txt") or p.parent.name == "log"):
            found.add(p)
    return sorted(p for p in found if p.exists())


@pytest.mark.audit_last
def test_no_token_or_password_in_any_log(
    tmp_path_factory: pytest.TempPathFactory, secrets_seen: Secrets, figures: Figures
) -> None:
    """Every log written during the suite is free of the tokens and passwords it used."""
    files = _log_files(tmp_path_factory.getbasetemp(), secrets_seen)
    needles = set(secrets_seen.values)
    # A token cut short in a log still leaks its signature: look for that part too.
    needles |= {v.rsplit(".", 1)[-1] for v in secrets_seen.values if v.count(".") == 2}
    needles = {n for n in needles if len(n) >= 16 or n in secrets_seen.values}
    hits: list[str] = []
    jwt_like: list[str] = []
    total = 0
    for f in files:
        text = f.read_bytes().decode("utf-8", "replace")
        total += len(text)
        for n in needles:
            if n in text:
                hits.append(f"{f.name}: {n[:12]}…")
        jwt_like += [f"{f.name}: {m[:16]}…" for m in JWT.findall(text)]
    figures.add(
        "S6",
        "test_no_token_or_password_in_any_log",
        f"after the suite: {len(files)} log files ({total // 1024} KiB) searched for the "
        f"{len(secrets_seen.values)} tokens and passwords the suite issued or used (and each "
        "token's signature alone), and for anything shaped like a JWT",
        f"{len(hits)} secrets found, {len(jwt_like)} JWT-shaped strings found",
        hits=hits[:20],
        jwt_like=jwt_like[:20],
    )
    assert secrets_seen.values, "the suite recorded no secret to look for"
    assert hits == [] and jwt_like == []
