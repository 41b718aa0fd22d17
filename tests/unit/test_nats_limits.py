"""Storage limits of every bucket and stream (security review finding 10), on a real
nats-server: provisioning sets them, re-provisioning moves existing ones to new settings,
and what a client sees at each limit."""

from __future__ import annotations

import pytest
from nats.js.client import JetStreamContext
from nats.js.errors import APIError

from shared import natsio
from shared.settings import Settings, load

MIB = 1024 * 1024


def _other(settings: Settings, **overrides: object) -> Settings:
    return load({}, nats_url=list(settings.nats_url), var_dir=settings.var_dir, **overrides)


async def _config(js: JetStreamContext, stream: str) -> dict[str, object]:
    info = await js._api_request(f"$JS.API.STREAM.INFO.{stream}")
    config: dict[str, object] = info["config"]
    return config


async def test_provisioning_sets_every_limit_of_the_settings(
    js: JetStreamContext, settings: Settings
) -> None:
    """Every bucket and stream carries max_bytes, max_msg_size and max_consumers; chat and
    audit a max_age; buckets their history as max_msgs_per_subject."""
    d = settings
    assert (d.nats_data_max_bytes, d.nats_auth_max_bytes, d.nats_stream_max_bytes) == (
        256 * MIB,
        64 * MIB,
        256 * MIB,
    )
    assert (d.nats_chat_max_age, d.nats_audit_max_age) == (30 * 86400, 90 * 86400)
    assert d.nats_max_consumers == 1000
    expected = natsio.limits(settings)
    assert set(expected) == {
        "KV_auth_users",
        "KV_auth_credentials",
        "KV_auth_revoked",
        "KV_auth_roles",
        "KV_articles",
        "KV_todos",
        "KV_presence",
        "KV_gw_durables",
        "chat",
        "audit",
    }
    for stream, want in expected.items():
        config = await _config(js, stream)
        assert {k: config.get(k) for k in want} == want, stream
        assert config["max_consumers"] == 1000
    assert (await _config(js, "KV_articles"))["max_bytes"] == 256 * MIB
    assert (await _config(js, "KV_auth_users"))["max_bytes"] == 64 * MIB
    assert (await _config(js, "KV_articles"))["max_msgs_per_subject"] == 5
    assert (await _config(js, "chat"))["max_age"] == 30 * 86400 * 10**9
    assert (await _config(js, "audit"))["max_age"] == 90 * 86400 * 10**9
    # Presence: per-message TTLs whose expiries leave markers watchers see (marker_ttl 60 s).
    presence = await _config(js, "KV_presence")
    assert presence["allow_msg_ttl"] is True
    assert presence["subject_delete_marker_ttl"] == 60 * 10**9


async def test_reprovisioning_moves_existing_buckets_and_streams_to_new_limits(
    js: JetStreamContext, settings: Settings
) -> None:
    """Provisioning again with other settings updates every limit in place: data stays,
    the rest of the config (KV's rollups, deny_delete) stays, and a third run changes nothing."""
    kv = await js.key_value("articles")
    revision = await kv.put("a1", b"kept")
    created = await _config(js, "KV_articles")
    other = _other(
        settings,
        nats_data_max_bytes=2 * MIB,
        nats_auth_max_bytes=MIB,
        nats_stream_max_bytes=3 * MIB,
        nats_max_value_bytes=64 * 1024,
        nats_max_consumers=50,
        nats_chat_max_age=3600.0,
        nats_audit_max_age=7200.0,
    )
    await natsio.provision(js, other)
    articles = await _config(js, "KV_articles")
    assert (articles["max_bytes"], articles["max_msg_size"], articles["max_consumers"]) == (
        2 * MIB,
        64 * 1024,
        50,
    )
    limited = set(natsio.limits(other)["KV_articles"])
    assert articles["allow_rollup_hdrs"] is True and articles["deny_delete"] is True
    assert {k: v for k, v in articles.items() if k not in limited} == {
        k: v for k, v in created.items() if k not in limited
    }
    assert (await _config(js, "KV_auth_credentials"))["max_bytes"] == MIB
    chat = await _config(js, "chat")
    assert (chat["max_bytes"], chat["max_age"], chat["max_consumers"]) == (
        3 * MIB,
        3600 * 10**9,
        50,
    )
    assert (await _config(js, "audit"))["max_age"] == 7200 * 10**9
    assert chat["duplicate_window"] == 120 * 10**9  # the chat.send idempotency window stays
    entry = await kv.get("a1")
    assert (entry.value, entry.revision) == (b"kept", revision)

    before = {s: await _config(js, s) for s in natsio.limits(other)}
    await natsio.provision(js, other)
    assert {s: await _config(js, s) for s in natsio.limits(other)} == before


async def test_a_full_bucket_refuses_writes_and_leaves_the_auth_buckets_writable(
    js: JetStreamContext, settings: Settings
) -> None:
    """At max_bytes a bucket refuses the write (503, err_code 10077 "maximum bytes
    exceeded"): its stored values stay, and the auth_* buckets, limited separately, still
    take writes (a revocation still works when todos is full)."""
    await natsio.provision(js, _other(settings, nats_data_max_bytes=4096))
    todos = await js.key_value("todos")
    stored = 0
    with pytest.raises(APIError) as full:
        for i in range(100):
            await todos.put(f"user.u1.{i}", b"x" * 500)
            stored += 1
    assert (full.value.code, full.value.err_code) == (503, 10077)
    assert "maximum bytes exceeded" in str(full.value.description)
    assert 0 < stored < 100
    assert (await todos.get("user.u1.0")).value == b"x" * 500
    revoked = await js.key_value("auth_revoked")
    assert await revoked.put("jti1", b"1") > 0


async def test_a_full_stream_drops_its_oldest_messages(
    js: JetStreamContext, settings: Settings
) -> None:
    """A stream (a log: chat, audit) at max_bytes keeps taking messages and drops the
    oldest ones."""
    await natsio.provision(js, _other(settings, nats_stream_max_bytes=4096))
    for i in range(50):
        ack = await js.publish("chat.room.1", str(i).encode() * 100)
        assert ack.seq == i + 1
    info = await js.stream_info("chat")
    assert info.state.bytes <= 4096
    assert info.state.last_seq == 50 and info.state.first_seq > 1


async def test_a_stream_refuses_consumers_beyond_max_consumers(
    js: JetStreamContext, settings: Settings
) -> None:
    """max_consumers bounds the consumers of a stream (durables left by users included)."""
    await natsio.provision(js, _other(settings, nats_max_consumers=2))
    for name in ("d1", "d2"):
        await js.add_consumer("chat", durable_name=name)
    with pytest.raises(APIError) as refused:
        await js.add_consumer("chat", durable_name="d3")
    assert refused.value.err_code == 10026  # maximum consumers limit reached
