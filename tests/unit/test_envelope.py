"""The wire envelope: decoding client frames and encoding server messages."""

from __future__ import annotations

import base64
import datetime as dt
import json
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared import envelope as env
from shared.capabilities import decode as decode_caps
from shared.errors import CloseCode, DisconnectError, ErrorCode, ReplyError


def frame(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


# ------------------------------------------------------------------------ client ops


def test_decode_sub() -> None:
    """`sub` decodes with its target and inbox; v defaults to 1."""
    op = env.decode_client_frame(frame(op="sub", target="chat.room.*", inbox="i1"))
    assert isinstance(op, env.Sub)
    assert (op.target, op.inbox, op.v, op.data) == ("chat.room.*", "i1", 1, None)


def test_decode_accepts_str_frames_and_explicit_v1() -> None:
    """A str frame and an explicit `"v": 1` decode the same as bytes without v."""
    op = env.decode_client_frame('{"v": 1, "op": "sub", "target": "a", "data": {}}')
    assert isinstance(op, env.Sub)
    assert op.data == env.SubData()


def test_decode_unsub_with_inbox_or_target() -> None:
    """`unsub` takes an inbox, a target, or both; both are optional."""
    a = env.decode_client_frame(frame(op="unsub", inbox="i1"))
    b = env.decode_client_frame(frame(op="unsub", target="chat.room.1"))
    assert isinstance(a, env.Unsub) and a.inbox == "i1" and a.target is None
    assert isinstance(b, env.Unsub) and b.target == "chat.room.1" and b.inbox is None


def test_decode_kv_sub_defaults() -> None:
    """`kv_sub` without data watches every key (`>`) from the current state."""
    op = env.decode_client_frame(frame(op="kv_sub", target="todos", inbox="k"))
    assert isinstance(op, env.KvSub)
    assert op.data.pattern == ">"
    assert op.data.since_revision is None


def test_decode_kv_sub_with_data() -> None:
    """`kv_sub` carries its key pattern and since_revision."""
    op = env.decode_client_frame(
        frame(
            op="kv_sub",
            target="todos",
            inbox="k",
            data={"pattern": "user.u1.>", "since_revision": 7},
        )
    )
    assert isinstance(op, env.KvSub)
    assert (op.data.pattern, op.data.since_revision) == ("user.u1.>", 7)


def test_decode_js_sub_defaults() -> None:
    """`js_sub` defaults: filter `>`, batch 100, ack False, new messages only."""
    op = env.decode_client_frame(frame(op="js_sub", target="chat", inbox="j"))
    assert isinstance(op, env.JsSub)
    d = op.data
    assert (d.filter, d.batch, d.ack) == (">", 100, False)
    assert d.start_seq is None and d.time_delta is None and d.start_time is None
    assert d.durable is None


def test_decode_js_sub_with_every_field() -> None:
    """`js_sub` decodes every documented option, start_time as an aware datetime."""
    op = env.decode_client_frame(
        frame(
            op="js_sub",
            target="chat",
            inbox="j",
            data={
                "filter": "chat.room.1",
                "start_time": "2024-05-01T12:00:00Z",
                "batch": 1000,
                "ack": True,
                "durable": "my-reader_1",
            },
        )
    )
    assert isinstance(op, env.JsSub)
    d = op.data
    assert d.filter == "chat.room.1"
    assert d.start_time == dt.datetime(2024, 5, 1, 12, tzinfo=dt.UTC)
    assert (d.batch, d.ack, d.durable) == (1000, True, "my-reader_1")
    op2 = env.decode_client_frame(frame(op="js_sub", target="chat", data={"start_seq": 5}))
    op3 = env.decode_client_frame(frame(op="js_sub", target="chat", data={"time_delta": 2.5}))
    assert isinstance(op2, env.JsSub) and op2.data.start_seq == 5
    assert isinstance(op3, env.JsSub) and op3.data.time_delta == 2.5


def test_decode_ack_ping_pong_refresh_cmd() -> None:
    """The remaining ops decode to their own types with their data."""
    ack = env.decode_client_frame(frame(op="ack", target="chat", inbox="j", data={"seq": 3}))
    assert isinstance(ack, env.Ack) and ack.data.seq == 3
    ping = env.decode_client_frame(frame(op="ping", inbox="p"))
    assert isinstance(ping, env.Ping) and ping.inbox == "p"
    pong = env.decode_client_frame(frame(op="pong"))
    assert isinstance(pong, env.Pong)
    ref = env.decode_client_frame(frame(op="refresh", data={"token": "a.b.c"}))
    assert isinstance(ref, env.Refresh) and ref.data.token == "a.b.c"
    cmd = env.decode_client_frame(frame(op="cmd", target="chat.send", data={"text": "hi"}))
    assert isinstance(cmd, env.Cmd) and cmd.target == "chat.send" and cmd.data == {"text": "hi"}


# ------------------------------------------------------------------------ bad frames

BAD_FRAMES = [
    pytest.param(b"", id="empty"),
    pytest.param(b"not json", id="not-json"),
    pytest.param(b"[1,2]", id="array"),
    pytest.param(b'"sub"', id="string"),
    pytest.param(b"null", id="null"),
    pytest.param(b'{"op":"sub","target":"a"}{"op":"ping"}', id="two-envelopes"),
    pytest.param(b'{"op":"sub","target":"a"}\n{"op":"ping"}', id="two-lines"),
    pytest.param(b"\xff\xfe", id="invalid-utf8"),
    pytest.param(b'{"op":"sub","target":"\xff"}', id="invalid-utf8-in-string"),
    pytest.param(b'{"op":"sub","inbox":"\xff","target":"a"}', id="invalid-utf8-in-inbox"),
    pytest.param(b'{"op":"cmd","data":"\xc3"}', id="truncated-utf8-in-data"),
    pytest.param('{"op":"sub","target":"\ud800"}', id="lone-surrogate-str"),
    pytest.param("{" * 5000, id="unterminated-nesting"),
    pytest.param(b'{"op":"cmd","data":' + b"[" * 5000 + b"]" * 5000 + b"}", id="deep-nesting"),
    pytest.param(b'{"x":' + b"[" * 5000 + b"]" * 5000 + b"}", id="deep-unknown-field"),
]


@pytest.mark.parametrize("raw", BAD_FRAMES)
def test_malformed_frames_are_bad_request(raw: bytes | str) -> None:
    """Frames that are not one JSON object raise ReplyError bad_request, nothing else."""
    with pytest.raises(ReplyError) as ei:
        env.decode_client_frame(raw)
    assert ei.value.code == ErrorCode.BAD_REQUEST


BAD_REQUESTS = [
    pytest.param({"target": "a"}, id="missing-op"),
    pytest.param({"op": "publish", "target": "a"}, id="unknown-op"),
    pytest.param({"op": "msg", "target": "a"}, id="seed-msg-op"),
    pytest.param({"op": 1, "target": "a"}, id="op-not-string"),
    pytest.param({"op": "sub"}, id="sub-missing-target"),
    pytest.param({"op": "sub", "target": ""}, id="sub-empty-target"),
    pytest.param({"op": "sub", "target": 5}, id="sub-target-int"),
    pytest.param({"op": "sub", "target": "a" * 513}, id="sub-target-too-long"),
    pytest.param({"op": "sub", "target": "a", "extra": 1}, id="unknown-top-field"),
    pytest.param({"op": "sub", "target": "a", "data": {"x": 1}}, id="sub-data-not-empty"),
    pytest.param({"op": "sub", "target": "a", "inbox": 5}, id="inbox-int"),
    pytest.param({"op": "sub", "target": "a", "inbox": ""}, id="inbox-empty"),
    pytest.param({"op": "kv_sub", "target": "t", "data": {"pattern": ""}}, id="kv-empty-pattern"),
    pytest.param({"op": "kv_sub", "target": "t", "data": {"since_revision": -1}}, id="kv-neg-rev"),
    pytest.param({"op": "kv_sub", "target": "t", "data": {"patern": ">"}}, id="kv-unknown"),
    pytest.param({"op": "kv_sub", "data": {}}, id="kv-missing-target"),
    pytest.param({"op": "js_sub", "target": "s", "data": {"batch": 0}}, id="batch-0"),
    pytest.param({"op": "js_sub", "target": "s", "data": {"batch": 1001}}, id="batch-1001"),
    pytest.param({"op": "js_sub", "target": "s", "data": {"batch": -5}}, id="batch-negative"),
    pytest.param({"op": "js_sub", "target": "s", "data": {"batch": "10"}}, id="batch-str"),
    pytest.param({"op": "js_sub", "target": "s", "data": {"batch": 1.5}}, id="batch-float"),
    pytest.param({"op": "js_sub", "target": "s", "data": {"ack": 1}}, id="ack-int"),
    pytest.param({"op": "js_sub", "target": "s", "data": {"ack": "true"}}, id="ack-str"),
    pytest.param({"op": "js_sub", "target": "s", "data": {"start_seq": 0}}, id="start-seq-0"),
    pytest.param({"op": "js_sub", "target": "s", "data": {"time_delta": 0}}, id="time-delta-0"),
    pytest.param({"op": "js_sub", "target": "s", "data": {"time_delta": -1}}, id="time-delta-neg"),
    pytest.param({"op": "js_sub", "target": "s", "data": {"start_time": "yesterday"}}, id="time"),
    pytest.param({"op": "js_sub", "target": "s", "data": {"durable": "a.b"}}, id="durable-dot"),
    pytest.param({"op": "js_sub", "target": "s", "data": {"durable": ""}}, id="durable-empty"),
    pytest.param({"op": "js_sub", "target": "s", "data": {"durable": "d" * 65}}, id="durable-long"),
    pytest.param({"op": "js_sub", "target": "s", "data": {"speed": 1}}, id="js-unknown"),
    pytest.param({"op": "ack", "target": "s"}, id="ack-missing-data"),
    pytest.param({"op": "ack", "target": "s", "data": {"seq": 0}}, id="ack-seq-0"),
    pytest.param({"op": "ack", "target": "s", "data": {}}, id="ack-missing-seq"),
    pytest.param({"op": "refresh", "data": {"token": ""}}, id="refresh-empty-token"),
    pytest.param({"op": "refresh"}, id="refresh-missing-data"),
    pytest.param({"op": "refresh", "data": {"token": "t" * 8193}}, id="refresh-token-long"),
    pytest.param({"op": "ping", "data": {"x": 1}}, id="ping-data"),
]


@pytest.mark.parametrize("fields", BAD_REQUESTS)
def test_bad_requests_raise_bad_request_and_echo_inbox(fields: dict[str, Any]) -> None:
    """Ill-formed requests are bad_request, echoing a string inbox so the client can match."""
    fields = {"inbox": "req-7", **fields}
    with pytest.raises(ReplyError) as ei:
        env.decode_client_frame(frame(**fields))
    assert ei.value.code == ErrorCode.BAD_REQUEST
    expected_inbox = fields["inbox"] if isinstance(fields["inbox"], str) else None
    assert ei.value.inbox == expected_inbox
    assert ei.value.reason


def test_non_string_or_oversized_inbox_is_not_echoed() -> None:
    """An inbox that is not a string of at most 128 chars is never echoed back."""
    for inbox in (5, ["x"], {"a": 1}, "i" * 129):
        with pytest.raises(ReplyError) as ei:
            env.decode_client_frame(frame(op="nope", inbox=inbox))
        assert ei.value.inbox is None


@settings(max_examples=500, derandomize=True, database=None, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=200),
        st.text(max_size=200),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
            lambda kids: (
                st.lists(kids, max_size=4)
                | st.dictionaries(
                    st.sampled_from(["v", "op", "inbox", "target", "data", "x"]), kids, max_size=5
                )
            ),
            max_leaves=20,
        ).map(lambda v: json.dumps(v)),
    )
)
def test_decoder_raises_only_protocol_errors(raw: bytes | str) -> None:
    """Whatever arrives, the decoder returns a ClientOp, a bad_request ReplyError, or the
    unsupported-version disconnect."""
    try:
        op = env.decode_client_frame(raw)
    except ReplyError as e:
        assert e.code == ErrorCode.BAD_REQUEST
    except DisconnectError as e:
        assert e.disconnect.error == ErrorCode.UNSUPPORTED_VERSION
    else:
        assert isinstance(op, env.ClientOp)
        assert op.v == 1


@pytest.mark.parametrize("batch", [1, 1000])
def test_batch_bounds_are_inclusive(batch: int) -> None:
    """batch 1 and 1000 are both accepted."""
    op = env.decode_client_frame(frame(op="js_sub", target="s", data={"batch": batch}))
    assert isinstance(op, env.JsSub) and op.data.batch == batch


@pytest.mark.parametrize("v", [True, False, "1", 2, 0, -1, 1.0, 1.5, None, [1], {"v": 1}])
def test_unsupported_version_disconnects(v: object) -> None:
    """Any v other than the integer 1 is unsupported_version with close code 1002."""
    with pytest.raises(DisconnectError) as ei:
        env.decode_client_frame(frame(v=v, op="sub", target="a", inbox="i9"))
    assert ei.value.disconnect.error == ErrorCode.UNSUPPORTED_VERSION
    assert ei.value.disconnect.close_code == CloseCode.PROTOCOL_ERROR == 1002
    assert ei.value.inbox == "i9"


def test_version_is_checked_before_the_op() -> None:
    """A v2 frame with an op this version does not know is still a version error."""
    with pytest.raises(DisconnectError) as ei:
        env.decode_client_frame(frame(v=2, op="future_op", whatever=True))
    assert ei.value.disconnect.error == ErrorCode.UNSUPPORTED_VERSION
    assert ei.value.inbox is None


# ------------------------------------------------------------------------ encoders


def one_line(raw: bytes) -> dict[str, Any]:
    """Assert a server message is one line of valid UTF-8 JSON; return it decoded."""
    assert isinstance(raw, bytes)
    assert b"\n" not in raw and b"\r" not in raw
    msg = json.loads(raw.decode("utf-8"))
    assert isinstance(msg, dict)
    return msg


PRETTY = json.dumps({"a": [1, 2, {"b": "c\nd"}], "e": None}, indent=2).encode()

JSON_PAYLOADS: list[tuple[bytes, Any]] = [
    (b'{"text":"hi"}', {"text": "hi"}),
    (b"[1,2,3]", [1, 2, 3]),
    (b"42", 42),
    (b"-1.5e3", -1500.0),
    (b'"a string"', "a string"),
    (b"true", True),
    (b"null", None),
    ('{"emoji":"😀","é":1}'.encode(), {"emoji": "😀", "é": 1}),
    (b'  {"padded": 1}  ', {"padded": 1}),
    (b'{"a":\r\n1}', {"a": 1}),
    (PRETTY, json.loads(PRETTY)),
    (b'"line\\nbreak"', "line\nbreak"),
]

B64_PAYLOADS: list[bytes] = [
    b"",
    b"hello world",
    b"\xff\xfe\x00",
    b'"\xff"',
    b"{bad json}",
    b"1 2",
    b'{"a":1}\n{"b":2}',
    b"NaN",
    b"[" * 3000 + b"]" * 3000,
    b'{"a":' + b"[" * 3000 + b"]" * 3000 + b"}",
    b"\n",
]


@pytest.mark.parametrize(("payload", "value"), JSON_PAYLOADS)
def test_sub_msg_embeds_json_payloads(payload: bytes, value: Any) -> None:
    """JSON payloads are embedded as JSON under `payload`, equal to the original value."""
    msg = one_line(env.sub_msg("chat.room.1", payload))
    assert msg["op"] == "sub_msg"
    assert msg["target"] == "chat.room.1"
    assert msg["data"] == {"payload": value}


@pytest.mark.parametrize("payload", B64_PAYLOADS)
def test_sub_msg_sends_other_payloads_as_base64(payload: bytes) -> None:
    """Non-JSON, invalid UTF-8, empty and too-deep payloads travel as exact payload_b64."""
    msg = one_line(env.sub_msg("chat.room.1", payload))
    assert set(msg["data"]) == {"payload_b64"}
    assert base64.b64decode(msg["data"]["payload_b64"]) == payload


def test_pretty_json_is_reencoded_without_raw_newlines() -> None:
    """Indented JSON keeps its value but loses the newlines that would split the frame."""
    assert b"\n" in PRETTY
    raw = env.sub_msg("s", PRETTY)
    assert b"\n" not in raw
    assert json.loads(raw)["data"]["payload"] == json.loads(PRETTY)
    embedded = env.embed_json(PRETTY)
    assert embedded is not None and b"\n" not in bytes(embedded)


def test_embed_json_returns_none_for_non_json() -> None:
    """embed_json is None exactly for payloads that must be base64."""
    for p in B64_PAYLOADS:
        assert env.embed_json(p) is None, p
    for p, _ in JSON_PAYLOADS:
        assert env.embed_json(p) is not None, p


def test_fan_out_messages_carry_no_inbox() -> None:
    """sub_msg and kv_msg put/delete/purge are identical bytes for every connection: no inbox."""
    msgs = [
        env.sub_msg("chat.room.1", b'{"t":1}'),
        env.kv_msg("todos", "user.u1.a", "put", 4, b'{"done":false}'),
        env.kv_msg("todos", "user.u1.a", "delete", 5, None),
        env.kv_msg("todos", "user.u1.a", "purge", 6, None),
    ]
    for raw in msgs:
        assert "inbox" not in one_line(raw)
    assert env.sub_msg("a", b"1") == env.sub_msg("a", b"1")


def test_kv_msg_put_delete_purge() -> None:
    """kv_msg carries key/op/revision and the value (JSON or base64) only for put."""
    put = one_line(env.kv_msg("todos", "k1", "put", 4, b'{"done":false}'))
    assert put == {
        "op": "kv_msg",
        "target": "todos",
        "data": {"op": "put", "revision": 4, "key": "k1", "value": {"done": False}},
    }
    binary = one_line(env.kv_msg("todos", "k1", "put", 5, b"\x00\x01"))
    assert binary["data"]["value_b64"] == base64.b64encode(b"\x00\x01").decode()
    assert "value" not in binary["data"]
    empty = one_line(env.kv_msg("todos", "k1", "put", 6, b""))
    assert empty["data"]["value_b64"] == ""
    for op in ("delete", "purge"):
        m = one_line(env.kv_msg("todos", "k1", op, 7, b"ignored"))  # type: ignore[arg-type]
        assert m["data"] == {"op": op, "revision": 7, "key": "k1"}


def test_kv_synced_carries_inbox_and_revision() -> None:
    """The synced marker belongs to one kv_sub: it carries that inbox and the revision."""
    m = one_line(env.kv_synced("todos", "k-inbox", 0))
    assert m == {
        "op": "kv_msg",
        "target": "todos",
        "inbox": "k-inbox",
        "data": {"op": "synced", "revision": 0},
    }


def test_js_msg_carries_inbox_seq_subject_time() -> None:
    """js_msg belongs to one consumer: inbox, seq, subject, RFC 3339 UTC time, payload."""
    t = dt.datetime(2024, 5, 1, 12, 30, 0, 123000, tzinfo=dt.UTC)
    m = one_line(env.js_msg("chat", "j1", 9, "chat.room.1", b'{"x":1}', t))
    assert m["op"] == "js_msg"
    assert m["target"] == "chat"
    assert m["inbox"] == "j1"
    assert m["data"] == {
        "seq": 9,
        "subject": "chat.room.1",
        "time": "2024-05-01T12:30:00.123000Z",
        "payload": {"x": 1},
    }
    assert dt.datetime.fromisoformat(m["data"]["time"]) == t
    b = one_line(env.js_msg("chat", "j1", 10, "chat.room.1", b"\xff", t))
    assert b["data"]["payload_b64"] == "/w==" and "payload" not in b["data"]


def test_ok_and_error_echo_inbox_and_target() -> None:
    """ok/error echo the request's inbox and target; error carries code and reason."""
    ok = one_line(env.ok("i1", "chat.room.*", {"position": 3, "recovered": True}))
    assert ok == {
        "op": "ok",
        "target": "chat.room.*",
        "inbox": "i1",
        "data": {"position": 3, "recovered": True},
    }
    err = one_line(env.error(ErrorCode.FORBIDDEN, "no\nway", inbox="i2", target="x"))
    assert err["op"] == "error" and err["inbox"] == "i2" and err["target"] == "x"
    assert err["data"] == {"code": "forbidden", "reason": "no\nway"}
    bare = one_line(env.error("internal", "oops"))
    assert "inbox" not in bare and bare["data"]["code"] == "internal"


def test_cap_update_lists_capabilities_and_revoked() -> None:
    """cap_update carries the user, the effective capabilities and the revoked refs."""
    caps = decode_caps({"subjects": ["chat.>"], "buckets": {"todos": ["user.u1.>"]}})
    m = one_line(env.cap_update("u1", caps, [env.RevokedRef(inbox="i3", op="sub", target="x.y")]))
    assert m["op"] == "cap_update"
    assert "inbox" not in m
    assert m["data"]["user"] == "u1"
    assert m["data"]["capabilities"]["subjects"] == ["chat.>"]
    assert m["data"]["capabilities"]["buckets"] == {"todos": ["user.u1.>"]}
    assert m["data"]["revoked"] == [{"inbox": "i3", "op": "sub", "target": "x.y"}]
    first = one_line(env.cap_update("u1", caps))
    assert first["data"]["revoked"] == []


def test_ping_pong() -> None:
    """ping/pong encode with the optional inbox."""
    assert one_line(env.ping()) == {"op": "ping"}
    assert one_line(env.pong("p1")) == {"op": "pong", "inbox": "p1"}


def test_every_encoder_output_is_one_json_line_with_hostile_strings() -> None:
    """Newlines, separators and control characters in any string field never break a line."""
    nasty = 'a\nb\r\u2028\u2029\x00"\\'
    t = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    outputs = [
        env.ok(nasty, nasty, {"k": nasty}),
        env.error(ErrorCode.BAD_REQUEST, nasty, nasty, nasty),
        env.sub_msg(nasty, nasty.encode()),
        env.sub_msg(nasty, json.dumps({"k": nasty}, indent=1).encode()),
        env.kv_msg(nasty, nasty, "put", 1, nasty.encode()),
        env.kv_synced(nasty, nasty, 1),
        env.js_msg(nasty, nasty, 1, nasty, nasty.encode(), t),
        env.ping(nasty),
        env.pong(nasty),
        env.cap_update(nasty, decode_caps({})),
    ]
    for raw in outputs:
        msg = one_line(raw)
        assert msgspec.json.decode(raw) == msg
    assert json.loads(outputs[0])["inbox"] == nasty
