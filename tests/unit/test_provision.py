"""Provisioning from a resources file (shared/provision.py) on a real nats-server: a
changed file applied twice is idempotent, reports what it cannot change, loses no data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nats.js.client import JetStreamContext

from shared import natsio, resources
from shared.settings import Settings

DEMO = (Path(__file__).resolve().parents[2] / "deploy" / "resources.toml").read_text()
CHANGED = """
[buckets.articles]
history = 5
storage = "memory"          # cannot change in place: drift

[buckets.todos]
history = 10                # may change: updated
max_bytes = 64              # below what is stored: drift, not applied

[buckets.notes]             # new: created
history = 2
max_age = 3600

[streams.chat]
subjects = ["chat.>", "chat2.>"]   # may change: updated
max_bytes = 1048576

# audit left out: reported, kept
"""


async def _config(js: JetStreamContext, stream: str) -> dict[str, Any]:
    """The stream's info as the server sends it: its config and its state."""
    info: dict[str, Any] = await js._api_request(f"$JS.API.STREAM.INFO.{stream}")
    return info


async def test_a_changed_file_applied_twice(js: JetStreamContext, settings: Settings) -> None:
    todos = await js.key_value("todos")
    await todos.put("user.u1.t1", b"x" * 200)
    await js.publish("chat.room.1", b"hello")
    await js.publish("audit.x", b"kept")
    res = resources.parse(CHANGED.encode(), settings)
    first = await natsio.provision(js, settings, res)
    assert first.created == ["bucket notes"]
    assert sorted(line.split(":")[0] for line in first.updated) == ["KV_todos", "chat"]
    assert any("max_msgs_per_subject 5 → 10" in line for line in first.updated)
    assert any("subjects" in line for line in first.updated)
    drift = "\n".join(first.drift)
    assert "KV_articles: storage is file, declared memory" in drift
    assert "KV_todos: max_bytes" in drift and "bytes are stored" in drift
    assert "audit: in NATS, not declared" in drift
    second = await natsio.provision(js, settings, res)
    assert (second.created, second.updated, second.drift) == ([], [], first.drift)
    # Nothing stored was lost, and the changes made are in place.
    assert (await todos.get("user.u1.t1")).value == b"x" * 200
    chat = await _config(js, "chat")
    assert chat["state"]["messages"] == 1
    assert chat["config"]["subjects"] == ["chat.>", "chat2.>"]
    assert (await _config(js, "audit"))["state"]["messages"] == 1
    assert (await _config(js, "KV_todos"))["config"]["max_msgs_per_subject"] == 10
    notes = await _config(js, "KV_notes")
    assert (notes["config"]["max_age"], notes["config"]["max_msgs_per_subject"]) == (
        3600 * 10**9,
        2,
    )
    # Back to the demo file: the same, once, then nothing.
    demo = resources.parse(DEMO.encode(), settings)
    back = await natsio.provision(js, settings, demo)
    assert back.created == [] and "notes" in "\n".join(back.drift)
    assert (await natsio.provision(js, settings, demo)).updated == []


async def test_a_limit_on_an_unlimited_stream_never_drops_what_it_holds(
    js: JetStreamContext, settings: Settings
) -> None:
    """An app's own stream made without a byte limit (NATS says -1): declaring one below
    what it holds is drift, not applied (applying it made NATS drop the oldest messages)."""
    await js.add_stream(name="orders", subjects=["orders.>"])
    assert (await _config(js, "orders"))["config"]["max_bytes"] == -1
    for i in range(50):
        await js.publish(f"orders.{i}", b"x" * 100)
    res = resources.parse(
        b'[streams.orders]\nsubjects = ["orders.>"]\nmax_bytes = 1024\n', settings
    )
    report = await natsio.provision(js, settings, res)
    assert any(line.startswith("orders: max_bytes") for line in report.drift), report.drift
    orders = await _config(js, "orders")
    assert orders["state"]["messages"] == 50
    assert orders["config"]["max_bytes"] == -1
    await js.delete_stream("orders")
