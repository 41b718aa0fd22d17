"""Hardening suite (issue 8): every test checks a rule and records a figure.

Two scales. `make test` runs the fast part: every test not marked `full_only`, with counts
scaled down (`scale(fast, full)`). `make reliability` sets RELIABILITY_FULL=1: every test,
at full counts, and the figures land in RELIABILITY_FIGURES (JSON), from which
`tests/reliability/report.py` writes docs/reliability.md. Full-only tests are deselected
(not skipped) in the fast run, so `make test` reports no skips for them.

The session also captures every log record of the in-process gateways and APIs (INFO, the
production level, through the project's own formatter) and collects the tokens and
passwords the tests used; the log audit test runs last and greps the logs for them.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest
from nats.aio.client import Client as NATS

from shared.auth import TokenIssuer
from shared.logs import PrettyFormatter
from shared.settings import Settings
from tests.api.conftest import api  # noqa: F401
from tests.gateway.conftest import connect, connect_ws, gateway, issuer, make_user  # noqa: F401
from ws_gateway.server import Gateway

FULL = os.environ.get("RELIABILITY_FULL", "") not in ("", "0", "false", "no")
HERE = Path(__file__).resolve().parent


@pytest.fixture
def api_settings(settings: Settings) -> Settings:
    """The API tests' settings, with a write budget this suite's bursts of hundreds of
    writes per user never reach (tests/api/test_bounds.py is where the budget is tested)."""
    return msgspec.structs.replace(
        settings,
        login_attempts_per_minute=5,
        command_timeout=1.0,
        api_writes_per_minute=1_000_000,
        api_writes_burst=1_000_000,
    )


def scale(fast: int, full: int) -> int:
    """A count for this run: `full` under RELIABILITY_FULL, else `fast`."""
    return full if FULL else fast


@dataclass
class Figures:
    """Rows of (item, test, what it does, figure), written as JSON at the session's end."""

    path: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
    outcomes: dict[str, str] = field(default_factory=dict)
    started: float = field(default_factory=time.time)

    def add(self, item: str, test: str, what: str, figure: str, **data: Any) -> None:
        self.rows.append({"item": item, "test": test, "what": what, "figure": figure, "data": data})

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        doc = {
            "full": FULL,
            "started": self.started,
            "seconds": round(time.time() - self.started, 1),
            "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores",
            "python": platform.python_version(),
            "rows": self.rows,
            "outcomes": self.outcomes,
        }
        self.path.write_text(json.dumps(doc, indent=1, default=str))


class Secrets:
    """Every token and password the suite handled, and every log it can read."""

    def __init__(self, log_file: Path) -> None:
        self.values: set[str] = set()
        self.log_file = log_file
        self.extra_logs: list[Path] = []

    def add(self, *values: str) -> None:
        for v in values:
            if v and len(v) >= 8:  # shorter ones ("demo") are words, not secrets
                self.values.add(v)


_FIGURES: Figures | None = None
_SECRETS: Secrets | None = None


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "full_only: runs only under RELIABILITY_FULL=1")
    config.addinivalue_line("markers", "audit_last: runs after every other test")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if FULL:  # full counts take minutes: the suite-wide 120 s per test would cut them off
        for i in items:
            if "tests/reliability" in i.nodeid and i.get_closest_marker("timeout") is None:
                i.add_marker(pytest.mark.timeout(1500))
    else:
        keep = [i for i in items if i.get_closest_marker("full_only") is None]
        dropped = [i for i in items if i.get_closest_marker("full_only") is not None]
        if dropped:
            config.hook.pytest_deselected(items=dropped)
            items[:] = keep
    last = [i for i in items if i.get_closest_marker("audit_last") is not None]
    if last:
        items[:] = [i for i in items if i.get_closest_marker("audit_last") is None] + last


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if _FIGURES is None or "tests/reliability" not in report.nodeid:
        return
    if report.when == "call" or report.outcome != "passed":
        outcome = report.outcome
        if hasattr(report, "wasxfail"):
            outcome = "xpassed" if report.outcome == "passed" else "xfailed"
        prev = _FIGURES.outcomes.get(report.nodeid)
        if prev in (None, "passed"):
            _FIGURES.outcomes[report.nodeid] = outcome


@pytest.fixture
async def lenient_gateway(settings: Settings, nc: NATS) -> AsyncIterator[Gateway]:
    """A gateway that keeps a connection through any number of bad frames and requests."""
    s = msgspec.structs.replace(
        settings, max_bad_frames=10**9, client_ops_per_second=1e6, client_ops_burst=10**6
    )
    async with Gateway(s, host="127.0.0.1", port=0) as gw:
        yield gw


@pytest.fixture(scope="session")
def figures(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Figures]:
    global _FIGURES
    default = tmp_path_factory.getbasetemp() / "reliability-figures.json"
    path = Path(os.environ.get("RELIABILITY_FIGURES") or default)
    _FIGURES = Figures(path)
    try:
        yield _FIGURES
    finally:
        _FIGURES.write()


@pytest.fixture(scope="session", autouse=True)
def secrets_seen(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secrets]:
    """Capture the logs of everything in-process; record every token issued in-process."""
    global _SECRETS
    log_file = tmp_path_factory.getbasetemp() / "reliability-logs.txt"
    handler = logging.FileHandler(log_file)
    handler.setFormatter(PrettyFormatter())
    handler.setLevel(logging.INFO)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    _SECRETS = Secrets(log_file)
    # A spy, not a mock: the real issuer runs and we remember what it returned.
    original = TokenIssuer.issue

    def issue(self: TokenIssuer, *a: Any, **kw: Any) -> Any:
        token, claims = original(self, *a, **kw)
        if _SECRETS is not None:
            _SECRETS.add(token)
        return token, claims

    TokenIssuer.issue = issue  # type: ignore[method-assign]
    try:
        yield _SECRETS
    finally:
        TokenIssuer.issue = original  # type: ignore[method-assign]
        root.removeHandler(handler)
        root.setLevel(old_level)
        handler.close()
