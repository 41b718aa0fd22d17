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
from shared.capabilities import DURABLES_BUCKET, PRESENCE_BUCKET
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
    assert set(first) == {"gateway", "api", "provision", "service"}
    assert len(set(first.values())) == 4
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
    with pytest.raises(
        SystemExit, match="NATS_API_PASSWORD, NATS_PROVISION_PASSWORD, NATS_SERVICE_PASSWORD"
    ):
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
        nats_service_password="s",
    )
    assert natsio.ensure_dev_credentials(full) == PASSWORDS
    assert natsio.role_passwords(full) == PASSWORDS
    assert natsio.credentials(full, "service") == ("service", "s")


def test_a_credentials_file_from_before_the_service_role_gets_it_and_keeps_the_others(
    tmp_path: Path,
) -> None:
    """A VAR_DIR from before the `service` role: its file lacks the key. Rendering asks
    for `make start`, which adds a password for it without rotating the others (the
    running NATS config and programs still hold them)."""
    s = load({}, var_dir=str(tmp_path))
    path = natsio.dev_credentials_path(s)
    path.parent.mkdir(parents=True)
    old = {"gateway": "old-g", "api": "old-a", "provision": "old-p"}
    path.write_text(json.dumps(old))
    path.chmod(0o600)
    assert natsio.credentials(s, "api") == ("api", "old-a")
    assert natsio.credentials(s, "service") is None
    with pytest.raises(SystemExit, match="no password for service"):
        natsio.role_passwords(s)
    filled = natsio.ensure_dev_credentials(s)
    assert {r: filled[r] for r in old} == old
    assert filled["service"] and filled["service"] not in old.values()
    assert json.loads(path.read_text()) == filled == natsio.role_passwords(s)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert natsio.ensure_dev_credentials(s) == filled  # once
    path.write_text(json.dumps({"unrelated": "x"}))
    with pytest.raises(SystemExit, match="not a NATS credentials file"):
        natsio.ensure_dev_credentials(s)


PASSWORDS: dict[natsio.Role, str] = {"gateway": "g", "api": "a", "provision": "p", "service": "s"}


def _rules(role: natsio.Role, kind: str = "publish") -> dict[str, list[str]]:
    """The role's allow and deny lists of `kind`, read back from the rendered NATS config."""
    text = nats_authorization(PASSWORDS)
    block = text.split(f"{{user: {role}, ", 1)[1].split("{user: ", 1)[0]
    line = next(x for x in block.splitlines() if x.strip().startswith(f"{kind}:"))
    return {k: json.loads(f"[{v}]") for k, v in re.findall(r"(allow|deny): \[([^]]*)\]", line)}


def _may_publish(role: natsio.Role, subject: str) -> bool:
    """nats-server's rule: allowed by some allow entry and by no deny entry (deny wins)."""
    rules = _rules(role)
    allowed = any(match(p, subject) for p in rules.get("allow", [">"]))
    return allowed and not any(match(p, subject) for p in rules.get("deny", []))


def test_the_gateway_user_writes_its_durables_bucket_and_no_other() -> None:
    """The gateway may publish to $KV.gw_durables (its durable records) and $KV.presence
    (who is here) and to no other bucket, present or future, nor create or purge a stream;
    the API still writes buckets."""
    assert _may_publish("gateway", f"$KV.{DURABLES_BUCKET}.x")
    assert _may_publish("gateway", f"$KV.{DURABLES_BUCKET}.chat.u1.d")
    assert not _may_publish("gateway", "$KV.articles.x")
    for b in natsio.buckets(load({})):
        assert _may_publish("gateway", f"$KV.{b.name}.x") == (
            b.name in (DURABLES_BUCKET, PRESENCE_BUCKET)
        )
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


def _may_subscribe(role: natsio.Role, subject: str) -> bool:
    rules = _rules(role, "subscribe")
    allowed = any(match(p, subject) for p in rules.get("allow", [">"]))
    return allowed and not any(match(p, subject) for p in rules.get("deny", []))


def test_the_service_user_answers_commands_and_publishes_events_but_is_no_api() -> None:
    """`service` (the team's command services) subscribes to commands and its own inboxes,
    publishes application subjects and writes and reads application buckets and streams;
    never sends a command, answers another's inbox, writes the audit trail, touches an
    auth bucket or the gateway's durables (by $KV or the JetStream API), makes consumers,
    manages streams, nor reaches $SYS. Its replies: allow_responses."""
    for subject in ("cmd.polls.vote", "cmd.x", "_INBOX.service.abc.1"):
        assert _may_subscribe("service", subject), subject
    for subject in ("_INBOX.abc.1", "$KV.auth_users.u1", "$SYS.ACCOUNT.x", "polls.lunch"):
        assert not _may_subscribe("service", subject), subject
    for subject in (
        "polls.lunch",
        "chat.room.1",
        "orders.42.created",
        "$KV.articles.a1",
        "$KV.polls.lunch",
        "$JS.API.INFO",
        "$JS.API.STREAM.INFO.KV_articles",
        "$JS.API.DIRECT.GET.KV_articles.$KV.articles.a1",
        "$JS.API.STREAM.MSG.GET.orders",
    ):
        assert _may_publish("service", subject), subject
    internal = [b.name for b in natsio.buckets(load({})) if b.name.startswith("auth_")]
    assert "auth_credentials" in internal
    for bucket in (*internal, DURABLES_BUCKET):
        for subject in (
            f"$KV.{bucket}.x",
            f"$JS.API.DIRECT.GET.KV_{bucket}",
            f"$JS.API.DIRECT.GET.KV_{bucket}.$KV.{bucket}.x",
            f"$JS.API.STREAM.MSG.GET.KV_{bucket}",
            f"$JS.API.STREAM.INFO.KV_{bucket}",
        ):
            assert not _may_publish("service", subject), subject
    for subject in (
        "cmd.x",
        "cmd.users.manage",
        "_INBOX.abc.1",
        "audit.commands.x",
        "$GW.durables.chat.u1.d",
        "$JS.API.CONSUMER.CREATE.chat",
        "$JS.API.CONSUMER.DURABLE.CREATE.orders.d",
        "$JS.API.CONSUMER.DELETE.chat.gw1",
        "$JS.ACK.chat.gw1.1.1.1.1.0",
        "$JS.API.STREAM.CREATE.rogue",
        "$JS.API.STREAM.PURGE.chat",
        "$SYS.REQ.SERVER.PING",
    ):
        assert not _may_publish("service", subject), subject
    block = nats_authorization(PASSWORDS).split("{user: service, ", 1)[1]
    assert "allow_responses: true" in block
