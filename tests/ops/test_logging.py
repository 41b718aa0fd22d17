"""The JSON log line's contract, and the config commands: no field can pose as the line's
own keys, time is ISO-8601 UTC, ids bound to a task reach its lines, a field named like a
secret is never written, production means JSON; print-config masks every secret."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
from datetime import UTC, datetime

from shared import configview, logs
from shared.settings import load
from tests.deploy.stackrun import clean_env


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logs.JsonFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def _line(msg: str = "hello", **fields: object) -> dict[str, object]:
    """What `log.info(msg, extra=fields)` writes, through the JSON formatter."""
    log = logging.getLogger("tests.ops.logging")
    capture = _Capture()
    log.addHandler(capture)
    try:
        log.warning(msg, extra=fields)
    finally:
        log.removeHandler(capture)
    out: dict[str, object] = json.loads(capture.lines[-1])
    return out


def test_reserved_keys_cannot_be_overwritten_by_fields() -> None:
    line = _line(level="spoofed", time="yesterday", logger="x", exc="boom")
    assert (line["level"], line["msg"], line["logger"]) == ("warning", "hello", "tests.ops.logging")
    assert line["field_level"] == "spoofed" and line["field_logger"] == "x"
    assert line["field_time"] == "yesterday" and line["field_exc"] == "boom"
    assert "exc" not in line


def test_time_is_iso_8601_utc() -> None:
    line = _line()
    when = datetime.fromisoformat(str(line["time"]))
    assert when.tzinfo is not None and when.utcoffset() == UTC.utcoffset(None)
    assert abs((datetime.now(UTC) - when).total_seconds()) < 60


def test_fields_named_like_secrets_are_redacted() -> None:
    line = _line(token="eyJhbGciOi.eyJzdWIi.c2lnbmF0dXJl", new_password="hunter22", user="u1")
    assert line["token"] == line["new_password"] == logs.REDACTED
    assert line["user"] == "u1"
    assert "hunter22" not in json.dumps(line)


async def test_bound_ids_follow_the_task_and_its_children_only() -> None:
    """An id bound in one task reaches the lines of that task and of the tasks it starts,
    never a sibling's; a detached task carries none."""
    seen: dict[str, object] = {}

    async def child(name: str) -> None:
        seen[name] = _line().get("request_id")

    async def request(rid: str) -> None:
        with logs.bound(request_id=rid):
            await asyncio.create_task(child(rid))
            await asyncio.get_running_loop().create_task(
                child(rid + "-detached"), context=logs.detached()
            )

    await asyncio.gather(request("a"), request("b"))
    assert seen == {"a": "a", "b": "b", "a-detached": None, "b-detached": None}
    assert "request_id" not in _line()


def test_correlation_ids_are_taken_only_when_plain() -> None:
    assert logs.correlation_id("0123abcdef") == "0123abcdef"
    for bad in (None, "", "x\ny", "a" * 65, '"};{'):
        made = logs.correlation_id(bad)
        assert made != bad and len(made) == 32


def test_json_by_default_in_production_pretty_in_dev() -> None:
    assert load({"APP_ENV": "production"}).log_json
    assert not load({"APP_ENV": "dev"}).log_json
    assert not load({"APP_ENV": "production", "LOG_FORMAT": "pretty"}).log_json
    assert load({"APP_ENV": "dev", "LOG_FORMAT": "json"}).log_json


def test_print_config_masks_every_secret() -> None:
    secret = "s3cret-Value-42"
    env = {
        "NATS_API_PASSWORD": secret,
        "NATS_PASSWORD": secret,
        "DEMO_PASSWORD": secret,
        "NATS_URL": f"nats://api:{secret}@10.0.0.5:4222,nats://10.0.0.6:4222",
    }
    out = subprocess.run(
        [sys.executable, "-m", "http_api", "print-config"],
        env=clean_env(**env),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert secret not in out
    shown = dict(line.split("=", 1) for line in out.splitlines())
    assert shown["NATS_API_PASSWORD"] == shown["DEMO_PASSWORD"] == configview.MASK
    assert shown["NATS_GATEWAY_PASSWORD"] == ""
    assert shown["NATS_URL"] == f"nats://{configview.MASK}@10.0.0.5:4222,nats://10.0.0.6:4222"
    assert shown["API_PORT"] == "8101" and shown["TOKEN_TTL"] == "3600"


def test_check_config_names_each_problem() -> None:
    def check(**env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "http_api", "check-config", "--role", "gateway"],
            env=clean_env(**env),
            capture_output=True,
            text=True,
        )

    bad = check(APP_ENV="production", JWT_PUBLIC_KEY_FILE="/nonexistent.pem")
    assert bad.returncode == 1
    assert "COOKIE_SECURE must be true" in bad.stderr
    assert "key file /nonexistent.pem is missing" in bad.stderr
    ok = check(APP_ENV="dev", JWT_PUBLIC_KEY_FILE=__file__)
    assert ok.returncode == 0 and "config ok" in ok.stdout, ok.stderr
