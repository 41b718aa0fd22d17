"""Settings: read once from an environment mapping, typed, and checked for production."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.settings import DEFAULT_DEMO_PASSWORD, Settings, load
from ws_gateway.presence import refusal

PRODUCTION_OK = {
    "APP_ENV": "production",
    "JWT_PRIVATE_KEY_FILE": "/etc/natsgate/jwt.pem",
    "JWT_PUBLIC_KEY_FILE": "/etc/natsgate/jwt.pub.pem",
    "DEMO_PASSWORD": "a-long-random-secret",
    "COOKIE_SECURE": "true",
}


def test_empty_env_gives_the_defaults() -> None:
    """load({}) ignores the process environment and returns the documented defaults."""
    s = load({})
    assert s == Settings()
    assert s.app_env == "dev" and not s.production
    assert s.nats_url == ("nats://127.0.0.1:4222",)
    assert s.token_ttl == 3600
    assert s.demo_password == DEFAULT_DEMO_PASSWORD


def test_values_are_converted_to_their_types() -> None:
    """Ints, floats and bools are parsed from their environment strings."""
    s = load(
        {
            "NATS_REPLICAS": "3",
            "TOKEN_TTL": "120",
            "JWT_LEEWAY": "2.5",
            "WRITE_TIMEOUT": "1",
            "COOKIE_SECURE": "true",
            "LOG_FORMAT": "json",
            "JWT_ISSUER": "issuer-x",
        }
    )
    assert s.nats_replicas == 3 and type(s.nats_replicas) is int
    assert s.token_ttl == 120
    assert s.jwt_leeway == 2.5
    assert s.write_timeout == 1.0 and type(s.write_timeout) is float
    assert s.cookie_secure is True
    assert s.log_format == "json"
    assert s.jwt_issuer == "issuer-x"


@pytest.mark.parametrize(
    ("text", "value"), [("true", True), ("false", False), ("1", True), ("0", False)]
)
def test_bool_spellings(text: str, value: bool) -> None:
    """Booleans accept true/false/1/0."""
    assert load({"COOKIE_SECURE": text}).cookie_secure is value


def test_comma_lists_become_tuples() -> None:
    """Comma-separated lists are split, stripped, emptied of blanks and made tuples."""
    s = load(
        {
            "NATS_URL": " nats://a:4222 , nats://b:4222,,",
            "ALLOWED_ORIGINS": "https://app.example",
        }
    )
    assert s.nats_url == ("nats://a:4222", "nats://b:4222")
    assert s.allowed_origins == ("https://app.example",)


def test_only_upper_case_names_are_read() -> None:
    """Variables map to upper-cased field names; others are ignored."""
    s = load({"nats_replicas": "9", "NATS_REPLICAS": "2", "UNRELATED": "x"})
    assert s.nats_replicas == 2


def test_overrides_win_over_env() -> None:
    """Keyword overrides replace values from the environment."""
    s = load({"TOKEN_TTL": "10", "VAR_DIR": "/a"}, token_ttl=20, nats_url=["nats://x:1"])
    assert s.token_ttl == 20
    assert s.var_dir == "/a"
    assert s.nats_url == ("nats://x:1",)


def test_default_env_is_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """load() without a mapping reads os.environ."""
    monkeypatch.setenv("GATEWAY_PROCS", "7")
    assert load().gateway_procs == 7


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("NATS_REPLICAS", "three"),
        ("NATS_REPLICAS", "1.5"),
        ("NATS_REPLICAS", ""),
        ("JWT_LEEWAY", "fast"),
        ("COOKIE_SECURE", "yes"),
        ("COOKIE_SECURE", ""),
        ("APP_ENV", "staging"),
        ("APP_ENV", "Production"),
        ("LOG_FORMAT", "xml"),
    ],
)
def test_invalid_values_exit(name: str, value: str) -> None:
    """An unparseable value stops the process with a message naming the setting."""
    with pytest.raises(SystemExit) as ei:
        load({name: value})
    assert name.lower() in str(ei.value.code)


def test_settings_are_frozen() -> None:
    """Settings cannot be changed after load."""
    s = load({})
    with pytest.raises(AttributeError):
        s.token_ttl = 1  # type: ignore[misc]


def test_key_paths_default_under_var_dir() -> None:
    """Key paths default to <var_dir>/keys/…, and explicit files win."""
    s = load({"VAR_DIR": "/srv/var"})
    assert s.private_key_path == Path("/srv/var/keys/jwt_ed25519.pem")
    assert s.public_key_path == Path("/srv/var/keys/jwt_ed25519.pub.pem")
    t = load(PRODUCTION_OK)
    assert t.private_key_path == Path("/etc/natsgate/jwt.pem")
    assert t.public_key_path == Path("/etc/natsgate/jwt.pub.pem")


def test_dev_check_passes_with_defaults() -> None:
    """Outside production the defaults are fine."""
    s = load({})
    assert not s.production
    s.check()  # raises SystemExit on failure


def test_production_check_passes_when_everything_is_set() -> None:
    """A production environment with keys, a real demo password and secure cookies starts."""
    s = load(PRODUCTION_OK)
    assert s.production
    s.check()


@pytest.mark.parametrize(
    ("drop", "message"),
    [
        ("JWT_PRIVATE_KEY_FILE", "JWT_PRIVATE_KEY_FILE"),
        ("JWT_PUBLIC_KEY_FILE", "JWT_PUBLIC_KEY_FILE"),
        ("DEMO_PASSWORD", "DEMO_PASSWORD"),
        ("COOKIE_SECURE", "COOKIE_SECURE"),
    ],
)
def test_production_check_refuses_defaults(drop: str, message: str) -> None:
    """Production refuses to start with a default secret, dev keys or insecure cookies."""
    env = {k: v for k, v in PRODUCTION_OK.items() if k != drop}
    with pytest.raises(SystemExit) as ei:
        load(env).check()
    assert message in str(ei.value.code)


def test_production_check_lists_every_problem() -> None:
    """With all defaults, production lists every problem at once."""
    with pytest.raises(SystemExit) as ei:
        load({"APP_ENV": "production"}).check()
    text = str(ei.value.code)
    for word in ("JWT_PRIVATE_KEY_FILE", "DEMO_PASSWORD", "COOKIE_SECURE"):
        assert word in text


def test_production_refuses_the_demo_password_spelled_out() -> None:
    """Setting DEMO_PASSWORD explicitly to the default value is still refused."""
    with pytest.raises(SystemExit):
        load({**PRODUCTION_OK, "DEMO_PASSWORD": DEFAULT_DEMO_PASSWORD}).check()


def test_every_port_derives_from_base_port() -> None:
    """BASE_PORT moves every port, the NATS URL and the origins together."""
    s = load({"BASE_PORT": "9080"})
    assert (s.api_port, s.gateway_port) == (9101, 9201)
    assert (s.nats_port, s.nats_monitor_port, s.nats_cluster_port) == (5222, 9222, 7222)
    assert s.nats_url == ("nats://127.0.0.1:5222",)
    assert s.allowed_origins == ("http://127.0.0.1:9080", "http://localhost:9080")
    assert list(s.api_ports) == [9101, 9102]
    assert list(s.gateway_ports) == [9201, 9202]
    assert s.public_url == "http://127.0.0.1:9080"


def test_explicit_ports_win_over_derived_ones() -> None:
    """A port set on its own is kept; the rest still follow BASE_PORT."""
    s = load({"BASE_PORT": "9080", "API_PORT": "7000", "NATS_URL": "nats://n:1"})
    assert s.api_port == 7000
    assert s.gateway_port == 9201
    assert s.nats_url == ("nats://n:1",)


def test_nats_cluster_gives_one_url_per_node() -> None:
    """NATS_CLUSTER=3 lists the three node URLs and defaults replicas to 3."""
    s = load({"NATS_CLUSTER": "3"})
    assert s.nats_url == tuple(f"nats://127.0.0.1:{4222 + i}" for i in range(3))
    assert s.nats_replicas == 3
    assert load({"NATS_CLUSTER": "3", "NATS_REPLICAS": "1"}).nats_replicas == 1


@pytest.mark.parametrize(
    "env",
    [{"BASE_PORT": "65530"}, {"BASE_PORT": "0"}, {"NATS_CLUSTER": "0"}, {"API_PORT": "70000"}],
)
def test_out_of_range_ports_exit(env: dict[str, str]) -> None:
    """A port outside 1..65535, derived or explicit, or no NATS node, stops the process."""
    with pytest.raises(SystemExit):
        load(env)


@pytest.mark.parametrize(
    "env",
    [
        {"PRESENCE_REFRESH": "30"},
        {"PRESENCE_TTL": "5", "PRESENCE_REFRESH": "6"},
        {"PRESENCE_REFRESH": "0"},
    ],
)
def test_a_presence_refresh_not_below_the_ttl_exits(env: dict[str, str]) -> None:
    """Keys would expire between refreshes: present users would flicker out."""
    with pytest.raises(SystemExit) as ei:
        load(env)
    assert "PRESENCE_REFRESH" in str(ei.value.code)


def test_presence_refusal_reasons() -> None:
    """Wildcards, non-key characters and PRESENCE_REFUSE patterns refuse; the rest pass."""
    s = load({"PRESENCE_REFUSE": "chat.private.>, ops.*"})
    assert refusal(s, "chat.room.1") is None
    assert "literal" in (refusal(s, "chat.room.*") or "")
    assert "literal" in (refusal(s, "chat.>") or "")
    assert "KV key" in (refusal(s, "chat.room.é") or "")
    assert "refused" in (refusal(s, "chat.private.a.b") or "")
    assert "refused" in (refusal(s, "ops.x") or "")
    assert s.presence_refuse == ("chat.private.>", "ops.*")
