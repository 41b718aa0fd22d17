"""docs/asyncapi.json: current, complete both ways, and served by the API.

Client side: every op the decoder accepts is a message of the document, and a valid frame
of each op is accepted by both the decoder and the document; server side: every encoder of
`shared/envelope.py` makes frames the document describes, and the document describes no
frame that no encoder makes. Real frames of a whole session are checked in
tests/e2e/test_transcript.py.
"""

from __future__ import annotations

import datetime as dt
import inspect
import json
from typing import Any

import msgspec
import pytest

from http_api import asyncapi
from shared import envelope
from shared.capabilities import Capabilities
from shared.errors import DisconnectError, ErrorCode, ReplyError
from tests.api.conftest import Api, api, api_settings  # noqa: F401
from tests.asyncapi import ASYNCAPI_JSON, problems

DOC: dict[str, Any] = json.loads(ASYNCAPI_JSON.read_text())

# One valid frame per op the decoder accepts.
CLIENT_EXAMPLES: dict[str, dict[str, Any]] = {
    "sub": {"op": "sub", "target": "chat.room.*", "inbox": "a"},
    "unsub": {"op": "unsub", "inbox": "a", "data": {"delete_durable": True}},
    "kv_sub": {"v": 1, "op": "kv_sub", "target": "todos", "data": {"since_revision": 4}},
    "js_sub": {
        "op": "js_sub",
        "target": "chat",
        "data": {"filter": "chat.>", "start_seq": 3, "batch": 10, "ack": True, "durable": "d1"},
    },
    "ack": {"op": "ack", "target": "chat", "inbox": "c", "data": {"seq": 3}},
    "ping": {"op": "ping", "inbox": "p"},
    "pong": {"op": "pong"},
    "refresh": {"op": "refresh", "data": {"token": "eyJ…"}},
    "cmd": {"op": "cmd", "target": "chat.send", "data": {"anything": 1}},
}


def client_messages() -> set[str]:
    return {n.partition(".")[2] for n in DOC["components"]["messages"] if n.startswith("client.")}


def server_messages() -> set[str]:
    return {n.partition(".")[2] for n in DOC["components"]["messages"] if n.startswith("server.")}


def test_committed_document_is_current() -> None:
    """docs/asyncapi.json is what `make asyncapi` generates from shared/envelope.py now."""
    assert ASYNCAPI_JSON.read_bytes() == asyncapi.encoded(), "stale: run `make asyncapi`"
    assert DOC["asyncapi"] == "3.0.0"


def test_every_op_the_decoder_accepts_is_documented() -> None:
    """The decoder's tags, the document's client messages and the examples are one set."""
    union = msgspec.inspect.type_info(envelope.ClientOp)
    assert isinstance(union, msgspec.inspect.UnionType)
    tags = {t.tag for t in union.types if isinstance(t, msgspec.inspect.StructType)}
    assert tags == client_messages() == set(CLIENT_EXAMPLES)


@pytest.mark.parametrize("op", sorted(CLIENT_EXAMPLES))
def test_client_examples_pass_decoder_and_document(op: str) -> None:
    """A frame the decoder accepts is valid against its message, and the reverse."""
    frame = CLIENT_EXAMPLES[op]
    assert envelope.decode_client_frame(json.dumps(frame)).__struct_config__.tag == op
    assert problems(f"client.{op}", frame) == []


@pytest.mark.parametrize(
    "frame",
    [
        {"op": "publish", "target": "chat.room.1"},  # no such op
        {"op": "sub"},  # no target
        {"op": "sub", "target": "x", "extra": 1},  # unknown field
        {"op": "js_sub", "target": "chat", "data": {"batch": 0}},  # out of range
        {"op": "ack", "target": "chat", "data": {}},  # seq missing
    ],
)
def test_frames_the_decoder_refuses_are_invalid_in_the_document(frame: dict[str, Any]) -> None:
    """Refused by the decoder (bad_request) and by every client message of the document."""
    with pytest.raises(ReplyError) as e:
        envelope.decode_client_frame(json.dumps(frame))
    assert e.value.code == ErrorCode.BAD_REQUEST
    assert all(problems(f"client.{op}", frame) for op in client_messages())


def test_other_versions_are_documented_as_refused() -> None:
    """`v` other than 1 ends the session (1002): the document's `v` says 1 is the default."""
    with pytest.raises(DisconnectError):
        envelope.decode_client_frame(json.dumps({**CLIENT_EXAMPLES["sub"], "v": 2}))
    assert DOC["components"]["schemas"]["Sub"]["properties"]["v"]["default"] == 1


CAPS = Capabilities(subjects=["chat.>"], buckets={"todos": [">"]}, streams={}, commands=[])
JSON, NOT_JSON = b'{"text":"hi"}', b"\xff\x00binary"
NS = 1_714_566_600_123_456_789

# Every encoder of shared/envelope.py (a public function returning frame bytes), with the
# frames it makes in each of its cases.
SERVER_EXAMPLES: dict[str, list[bytes]] = {
    "ok": [
        envelope.ok("a", "chat.room.1"),
        envelope.ok(None, None),
        envelope.ok("t", "todos", {"position": 3, "recovered": False}),
        envelope.ok("c", "chat", {"position": 9, "recovered": True, "durable": "resumed"}),
        envelope.ok("r", None, {"exp": 1_714_570_000}),
    ],
    "error": [
        envelope.error(ErrorCode.FORBIDDEN, "no", "a"),
        envelope.error(ErrorCode.TAKEN_OVER, "durable taken over", "c", "chat"),
        envelope.error("token_expired", "token expired"),
    ],
    "cap_update": [
        envelope.cap_update("u1", CAPS),
        envelope.cap_update("u1", CAPS, [envelope.RevokedRef("c", "js_sub", "chat")]),
    ],
    "sub_msg": [envelope.sub_msg("chat.room.1", JSON), envelope.sub_msg("chat.room.1", NOT_JSON)],
    "kv_msg": [
        envelope.kv_msg("todos", "k", "put", 4, JSON),
        envelope.kv_msg("todos", "k", "put", 5, NOT_JSON),
        envelope.kv_msg("todos", "k", "delete", 6, None),
        envelope.kv_msg("todos", "k", "purge", 7, None),
    ],
    "kv_synced": [envelope.kv_synced("todos", "t", 7), envelope.kv_synced("todos", "t", 0)],
    "js_msg": [
        envelope.js_msg("chat", "c", 1, "chat.room.1", JSON, dt.datetime.now(dt.UTC)),
        envelope.JsEncoder("chat", "c").encode(2, "chat.room.1", NOT_JSON, NS),
    ],
    "ping": [envelope.ping(), envelope.ping("p")],
    "pong": [envelope.pong(), envelope.pong("p")],
}
NOT_ENCODERS = {"encode", "js_body"}  # the parts the encoders are made of


def test_every_encoder_is_exercised() -> None:
    """SERVER_EXAMPLES covers every function of envelope.py that makes a frame."""
    encoders = {
        name
        for name, f in inspect.getmembers(envelope, inspect.isfunction)
        if f.__module__ == envelope.__name__
        and inspect.signature(f).return_annotation == "bytes"
        and not name.startswith("_")
    } - NOT_ENCODERS
    assert encoders == set(SERVER_EXAMPLES)


def test_server_frames_and_document_agree_both_ways() -> None:
    """Each encoder's frames are valid against the message of their op, and every
    server message of the document is made by some encoder."""
    made: set[str] = set()
    for frames in SERVER_EXAMPLES.values():
        for frame in frames:
            env = json.loads(frame)
            assert "\n" not in frame.decode() and "v" not in env
            made.add(env["op"])
            assert problems(f"server.{env['op']}", env) == [], env
    assert made == server_messages()


@pytest.mark.parametrize(
    ("name", "env"),
    [
        ("server.ok", {"op": "ok", "data": {"position": 1, "resumed_from": 0}}),
        ("server.error", {"op": "error", "data": {"code": "oops", "reason": "?"}}),
        ("server.kv_msg", {"op": "kv_msg", "target": "b", "data": {"op": "set", "revision": 1}}),
        ("server.js_msg", {"op": "js_msg", "target": "s", "data": {"seq": 1}}),
    ],
)
def test_document_rejects_frames_the_server_does_not_send(name: str, env: Any) -> None:
    """An unknown field, an undocumented error code or op, a missing field: invalid."""
    assert problems(name, env)


async def test_api_serves_the_document(api: Api) -> None:  # noqa: F811
    """GET /api/asyncapi.json (no token) is docs/asyncapi.json, listed in the OpenAPI one."""
    resp = await api.client.get("/api/asyncapi.json")
    assert resp.status == 200 and resp.content_type == "application/json"
    assert await resp.read() == ASYNCAPI_JSON.read_bytes()
    openapi = await (await api.client.get("/api/openapi.json")).json()
    assert "get" in openapi["paths"]["/api/asyncapi.json"]
