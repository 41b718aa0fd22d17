"""The Python client's pure parts: backoff, URLs, subject matching, token times."""

from __future__ import annotations

import base64
import json

import pytest
from natsgate_client import backoff, gateway_url
from natsgate_client.subscription import match
from natsgate_client.tokens import refresh_at, token_times


def test_backoff_doubles_to_its_cap_with_jitter() -> None:
    for attempt, full in [(1, 0.2), (2, 0.4), (3, 0.8), (10, 20.0), (50, 20.0)]:
        delays = {backoff(attempt, 0.2, 20.0) for _ in range(50)}
        assert all(full / 2 <= d <= full for d in delays), (attempt, delays)
        assert len(delays) > 1  # jittered


@pytest.mark.parametrize(
    ("url", "transport", "expected"),
    [
        ("https://app.example", "websocket", "wss://app.example/ws"),
        ("http://127.0.0.1:8080/", "websocket", "ws://127.0.0.1:8080/ws"),
        ("https://app.example", "polling", "https://app.example/poll"),
        ("ws://gw:8201/ws", "polling", "ws://gw:8201/ws"),
        ("http://gw:8201/poll", "websocket", "http://gw:8201/poll"),
    ],
)
def test_gateway_url(url: str, transport: str, expected: str) -> None:
    assert gateway_url(url, transport) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("pattern", "subject", "matches"),
    [
        ("a.b", "a.b", True),
        ("a.*", "a.b", True),
        ("a.*", "a.b.c", False),
        ("a.>", "a.b.c", True),
        ("a.>", "a", False),
        (">", "a", True),
        ("a.*.c", "a.b.d", False),
    ],
)
def test_match(pattern: str, subject: str, matches: bool) -> None:
    assert match(pattern, subject) is matches


def _jwt(claims: dict[str, int]) -> str:
    body = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"e30.{body}.sig"


def test_refresh_is_due_a_third_of_the_lifetime_early_within_2_to_60_s() -> None:
    assert token_times(_jwt({"iat": 100, "exp": 160})) == (160, 100)
    assert refresh_at(_jwt({"iat": 100, "exp": 160})) == 140  # a third of 60 s
    assert refresh_at(_jwt({"iat": 0, "exp": 3600})) == 3540  # at most 60 s early
    assert refresh_at(_jwt({"iat": 100, "exp": 103})) == 101  # at least 2 s early
    assert refresh_at("not a jwt") is None and refresh_at(_jwt({"iat": 1})) is None
