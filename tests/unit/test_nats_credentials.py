"""NATS credentials per role (security review finding 16): which user a process connects
as, the dev credentials file, and production's refusal to run without passwords."""

from __future__ import annotations

import json
import re
import stat
from pathlib import Path

import pytest

from deploy.render import nats_authorization
from shared import natsio
from shared.capabilities import DURABLES_BUCKET
from shared.settings import load
from shared.subjects import match


def test_a_connection_name_gives_its_role() -> None:
    """Gateways, API workers and the admin CLI each connect as their own NATS user."""
    assert natsio.role_of("ws_gateway:8201") == "gateway"
    assert natsio.role_of("http_api") == "api"
    assert natsio.role_of("http_api-admin") == "provision"
    assert natsio.role_of("probe") is None


def test_dev_credentials_are_generated_once_private_and_used_by_role(tmp_path: Path) -> None:
    """The first call writes one password per role (0600); later calls and every process
    read the same ones; a password set in the settings wins over the file."""
    s = load({}, var_dir=str(tmp_path))
    assert natsio.role_passwords(s) is None  # nothing yet: no auth
    assert natsio.credentials(s, "gateway") is None
    first = natsio.ensure_dev_credentials(s)
    path = natsio.dev_credentials_path(s)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert set(first) == {"gateway", "api", "provision"} and len(set(first.values())) == 3
    assert natsio.ensure_dev_credentials(s) == first == natsio.role_passwords(s)
    assert natsio.credentials(s, "gateway") == ("gateway", first["gateway"])
    assert natsio.credentials(s, None) is None

    mine = load({}, var_dir=str(tmp_path), nats_api_password="from-settings")
    assert natsio.credentials(mine, "api") == ("api", "from-settings")
    assert natsio.ensure_dev_credentials(mine)["api"] == "from-settings"
    explicit = load({}, var_dir=str(tmp_path), nats_user="ops", nats_password="pw")
    assert natsio.credentials(explicit, "gateway") == ("ops", "pw")


def test_production_needs_every_role_password_and_generates_none(tmp_path: Path) -> None:
    """In production nothing is generated: a missing role password refuses to start."""
    s = load({}, var_dir=str(tmp_path), app_env="production", nats_gateway_password="g")
    with pytest.raises(SystemExit, match="NATS_API_PASSWORD, NATS_PROVISION_PASSWORD"):
        natsio.ensure_dev_credentials(s)
    assert not natsio.dev_credentials_path(s).exists()
    with pytest.raises(SystemExit, match="NATS_API_PASSWORD"):
        natsio.credentials(s, "api")
    assert natsio.credentials(s, "gateway") == ("gateway", "g")
    full = load(
        {},
        var_dir=str(tmp_path),
        app_env="production",
        nats_gateway_password="g",
        nats_api_password="a",
        nats_provision_password="p",
    )
    assert natsio.ensure_dev_credentials(full) == {"gateway": "g", "api": "a", "provision": "p"}
    assert natsio.role_passwords(full) == {"gateway": "g", "api": "a", "provision": "p"}


def _publish_rules(role: natsio.Role) -> dict[str, list[str]]:
    """The role's publish allow and deny lists, read back from the rendered NATS config."""
    text = nats_authorization({"gateway": "g", "api": "a", "provision": "p"})
    block = text.split(f"{{user: {role}, ", 1)[1]
    line = next(x for x in block.splitlines() if x.strip().startswith("publish:"))
    return {k: json.loads(f"[{v}]") for k, v in re.findall(r"(allow|deny): \[([^]]*)\]", line)}


def _may_publish(role: natsio.Role, subject: str) -> bool:
    """nats-server's rule: allowed by some allow entry and by no deny entry (deny wins)."""
    rules = _publish_rules(role)
    allowed = any(match(p, subject) for p in rules.get("allow", [">"]))
    return allowed and not any(match(p, subject) for p in rules.get("deny", []))


def test_the_gateway_user_writes_its_durables_bucket_and_no_other() -> None:
    """The gateway may publish to $KV.gw_durables (its durable records) and to no other
    bucket, present or future, nor create or purge a stream; the API still writes buckets."""
    assert _may_publish("gateway", f"$KV.{DURABLES_BUCKET}.x")
    assert _may_publish("gateway", f"$KV.{DURABLES_BUCKET}.chat.u1.d")
    assert not _may_publish("gateway", "$KV.articles.x")
    for b in natsio.buckets(load({})):
        assert _may_publish("gateway", f"$KV.{b.name}.x") == (b.name == DURABLES_BUCKET)
    for subject in (
        "$KV.some_new_bucket.x",
        "$JS.API.STREAM.PURGE.KV_gw_durables",
        "$JS.API.STREAM.CREATE.rogue",
        "$SYS.REQ.SERVER.PING",
        "chat.room.1",
    ):
        assert not _may_publish("gateway", subject), subject
    assert _may_publish("gateway", "$JS.API.CONSUMER.INFO.chat.c")
    assert _may_publish("api", "$KV.articles.x")
