"""The frame transcript in docs/protocol.md is what a real session sends and receives.

One session of the demo user alice, from login to logout, against the API and a gateway on
a real nats-server: every HTTP call, every envelope both ways, every close. Volatile values
(ids, tokens, times) are replaced by names; revisions and sequence numbers are not (the
streams start empty). `make transcript` (UPDATE_TRANSCRIPT=1) rewrites the block.

The same frames, unreplaced, are checked against docs/asyncapi.json.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from shared.settings import Settings
from tests.api.conftest import Api
from tests.asyncapi import problems, validators
from ws_gateway.server import Gateway

ROOT = Path(__file__).resolve().parents[2]
PROTOCOL_MD = ROOT / "docs" / "protocol.md"
BEGIN = "<!-- transcript:begin (make transcript) -->"
END = "<!-- transcript:end -->"
TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$")
VOLATILE_KEYS = {"expires_at": "<expires_at>", "exp": "<exp>"}
WAIT = 10.0  # bounds each wait for a frame; not a speed assertion

Envelope = dict[str, Any]


@pytest.fixture
def settings(settings: Settings) -> Settings:
    # No heartbeat `ping` from the server in the middle of the transcript.
    return msgspec.structs.replace(settings, ping_interval=3600.0)


@dataclass
class Recorder:
    """The transcript's lines (normalised) and the raw envelopes, both ways."""

    names: dict[str, str] = field(default_factory=dict)  # volatile value → its name
    lines: list[str] = field(default_factory=list)
    sent: list[Envelope] = field(default_factory=list)
    received: list[Envelope] = field(default_factory=list)

    def name(self, value: str, as_: str) -> None:
        self.names[value] = as_

    def _norm(self, v: Any, key: str = "") -> Any:
        if key in VOLATILE_KEYS:
            return VOLATILE_KEYS[key]
        if isinstance(v, dict):
            return {k: self._norm(x, k) for k, x in v.items()}
        if isinstance(v, list):
            return [self._norm(x) for x in v]
        if isinstance(v, str):
            if TIME.match(v):
                return "<time>"
            for value, name in self.names.items():
                v = v.replace(value, name)
        return v

    def show(self, prefix: str, v: Any) -> str:
        return f"{prefix} {msgspec.json.encode(self._norm(v)).decode()}"

    def note(self, text: str) -> None:
        self.lines.append(f"# {text}")


@dataclass
class Conn:
    """A WebSocket of the transcript: sends and reads envelopes, recording each."""

    ws: ClientConnection
    rec: Recorder
    pending: list[Envelope] = field(default_factory=list)

    async def send(self, env: Envelope) -> None:
        self.rec.sent.append(env)
        self.rec.lines.append(self.rec.show("→", env))
        await self.ws.send(json.dumps(env, separators=(",", ":")))

    async def _next(self) -> Envelope:
        while not self.pending:
            async with asyncio.timeout(WAIT):
                frame = await self.ws.recv()
            assert isinstance(frame, str), "the server sends text frames only"
            self.pending += [json.loads(line) for line in frame.split("\n") if line]
        env = self.pending.pop(0)
        self.rec.received.append(env)
        self.rec.lines.append(self.rec.show("←", env))
        return env

    async def until(self, done: Callable[[Envelope], bool]) -> Envelope:
        """Read (and record) envelopes up to the first that `done` accepts."""
        while not done(env := await self._next()):
            pass
        return env

    async def closed_by_server(self) -> int:
        """Read what is left, then the close: its code."""
        try:
            while True:
                await self._next()
        except ConnectionClosed:
            pass
        code, reason = self.ws.close_code, self.ws.close_reason
        assert code is not None
        self.rec.lines.append(f"CLOSE {code} {reason!r} (by the server)")
        return code


def is_(kind: str, **data: Any) -> Callable[[Envelope], bool]:
    """An envelope of op `kind` whose data has these values."""

    def check(env: Envelope) -> bool:
        got = env.get("data", {})
        return env["op"] == kind and all(got.get(k) == v for k, v in data.items())

    return check


async def http(
    api: Api,
    rec: Recorder,
    method: str,
    path: str,
    status: int,
    token: str | None = None,
    body: Any = None,
) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    resp = await api.client.request(method, path, json=body, headers=headers)
    assert resp.status == status, await resp.text()
    answer = await resp.json() if status != 204 else None
    auth = " (bearer)" if token else ""
    request = f"HTTP {method} {path}{auth}" + (f" {rec.show('', body)[1:]}" if body else "")
    rec.lines.append(rec._norm(request))
    rec.lines.append(rec.show(f"  {status}", answer) if answer is not None else f"  {status}")
    return answer


async def open_ws(gateway: Gateway, rec: Recorder, token: str) -> Conn:
    rec.lines.append("WS GET /ws (Authorization: Bearer <alice-token>): 101 Switching Protocols")
    ws = await connect(gateway.url, additional_headers={"Authorization": f"Bearer {token}"})
    return Conn(ws, rec)


async def record_session(api: Api, gateway: Gateway) -> Recorder:
    """The session of the transcript; asserts what each step must show as it goes."""
    rec = Recorder()
    login = await http(
        api,
        rec,
        "POST",
        "/api/auth/login",
        200,
        body={"username": "alice", "password": api.settings.demo_password},
    )
    alice, token = login["user"]["id"], login["token"]
    rec.name(token, "<alice-token>")
    rec.name(alice, "<alice>")
    # The login line was written before the names were known: write it again.
    rec.lines[-1] = rec.show("  200", login)

    rec.note("Connect: the first frame is the capabilities, {uid} replaced by the user's id.")
    c = await open_ws(gateway, rec, token)
    first = await c.until(lambda e: True)
    assert first["op"] == "cap_update" and first["data"]["user"] == alice
    await c.send({"op": "ping", "inbox": "hb1"})
    await c.until(is_("pong"))

    rec.note("A core subscription, then a message published on its subject (a chat.send).")
    await c.send({"op": "sub", "target": "chat.room.123", "inbox": "room"})
    await c.until(is_("ok"))
    await c.send({"op": "sub", "target": "audit.>", "inbox": "spy"})
    denied = await c.until(is_("error"))
    assert denied["data"]["code"] == "forbidden" and denied["inbox"] == "spy"
    await http(
        api, rec, "POST", "/api/commands/chat.send", 200, token, {"room": "123", "text": "hello"}
    )
    msg = await c.until(is_("sub_msg"))
    assert msg["target"] == "chat.room.123" and msg["data"]["payload"]["text"] == "hello"

    rec.note("A KV watch: the current values, then `synced`, then changes as they happen.")
    for todo, title in (("t1", "try natsgate"), ("t2", "read the protocol")):
        await http(
            api, rec, "POST", "/api/commands/todos.put", 200, token, {"id": todo, "title": title}
        )
    kv = {
        "op": "kv_sub",
        "target": "todos",
        "inbox": "todos",
        "data": {"pattern": f"user.{alice}.>"},
    }
    await c.send(kv)
    await c.until(is_("ok"))
    synced = await c.until(is_("kv_msg", op="synced"))
    assert synced["data"]["revision"] == 2

    rec.note("A stream read from its first message (start_seq 1), then live.")
    await c.send(
        {
            "op": "js_sub",
            "target": "chat",
            "inbox": "chat",
            "data": {"filter": "chat.room.123", "start_seq": 1},
        }
    )
    await c.until(is_("ok"))
    assert (await c.until(is_("js_msg")))["data"]["seq"] == 1
    await c.send({"op": "cmd", "target": "chat.send", "data": {"text": "hi"}})
    refused = await c.until(is_("error"))
    assert refused["data"]["code"] == "use_http"

    rec.note("The client goes away (a network change); meanwhile the data moves on.")
    await c.ws.close()
    rec.lines.append(f"CLOSE {c.ws.close_code} (by the client)")
    await http(
        api,
        rec,
        "POST",
        "/api/commands/todos.put",
        200,
        token,
        {"id": "t1", "title": "try natsgate", "done": True},
    )
    await http(
        api,
        rec,
        "POST",
        "/api/commands/chat.send",
        200,
        token,
        {"room": "123", "text": "are you there?"},
    )

    rec.note("Reconnect and resume: KV after the last revision seen, the stream after the")
    rec.note("last seq seen. `recovered: true`: nothing was lost in between.")
    c = await open_ws(gateway, rec, token)
    await c.until(is_("cap_update"))
    await c.send({**kv, "data": {**kv["data"], "since_revision": 2}})
    ok = await c.until(is_("ok"))
    assert ok["data"] == {"position": 3, "recovered": True}
    await c.until(is_("kv_msg", op="synced"))
    await c.send(
        {
            "op": "js_sub",
            "target": "chat",
            "inbox": "chat",
            "data": {"filter": "chat.room.123", "start_seq": 2},
        }
    )
    ok = await c.until(is_("ok"))
    assert ok["data"] == {"position": 2, "recovered": True}
    assert (await c.until(is_("js_msg")))["data"]["seq"] == 2

    rec.note("An admin takes the stream away: the js_sub ends, the kv_sub stays.")
    admin = await http(
        api,
        rec,
        "POST",
        "/api/auth/login",
        200,
        body={"username": "admin", "password": api.settings.demo_password},
    )
    rec.name(admin["token"], "<admin-token>")
    rec.name(admin["user"]["id"], "<admin>")
    rec.lines[-1] = rec.show("  200", {"token": admin["token"], "...": "..."})
    caps = {**login["user"]["capabilities"], "streams": {}}
    await http(api, rec, "PUT", f"/api/users/{alice}", 200, admin["token"], {"capabilities": caps})
    update = await c.until(is_("cap_update"))
    assert update["data"]["revoked"] == [{"inbox": "chat", "op": "js_sub", "target": "chat"}]

    rec.note("Logout revokes the token: its sockets get `unauthorized` and close 4401.")
    await http(api, rec, "POST", "/api/auth/logout", 204, token)
    assert await c.closed_by_server() == 4401
    assert rec.received[-1]["data"]["code"] == "unauthorized"
    return rec


def transcript_block(rec: Recorder) -> str:
    return "\n".join([BEGIN, "```text", *rec.lines, "```", END])


async def test_transcript_in_protocol_md_is_a_real_session(api: Api, gateway: Gateway) -> None:
    """docs/protocol.md's transcript block is exactly what the session records
    (UPDATE_TRANSCRIPT=1, `make transcript`, rewrites it)."""
    rec = await record_session(api, gateway)
    block = transcript_block(rec)
    doc = PROTOCOL_MD.read_text()
    start, end = doc.index(BEGIN), doc.index(END) + len(END)
    if os.environ.get("UPDATE_TRANSCRIPT") == "1":
        doc = doc[:start] + block + doc[end:]
        PROTOCOL_MD.write_text(doc)
    assert doc[start : start + len(block)] == block, "the transcript drifted: `make transcript`"


async def test_real_frames_validate_against_asyncapi(api: Api, gateway: Gateway) -> None:
    """Every envelope of the transcript's session, both ways, is valid against the
    message of docs/asyncapi.json that its op names; each way's ops are all documented."""
    rec = await record_session(api, gateway)
    for way, frames in (("client", rec.sent), ("server", rec.received)):
        for env in frames:
            name = f"{way}.{env['op']}"
            assert name in validators(), f"{name} is not in docs/asyncapi.json"
            assert problems(name, env) == [], env
    # The session shows every kind of frame the transcript is about.
    assert {e["op"] for e in rec.received} == {
        "cap_update",
        "pong",
        "ok",
        "error",
        "sub_msg",
        "kv_msg",
        "js_msg",
    }
