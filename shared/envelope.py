"""The wire envelope (docs/protocol.md, "Envelope"): client ops in, server messages out.

Client frames are decoded by one module-level typed decoder into a tagged union of
Structs. Server messages are encoded once into bytes; fan-out messages carry no inbox,
so the same bytes go to every connection. `SERVER_FRAMES` describes each server frame
as a Struct: docs/asyncapi.json is generated from these and `ClientOp`
(`python -m http_api.asyncapi`), and tests check real frames against it.
"""

from __future__ import annotations

import base64
import datetime as dt
from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, Raw, Struct, UnsetType

from shared.capabilities import Capabilities
from shared.errors import DisconnectError, Disconnects, ErrorCode, ReplyError

PROTOCOL_VERSION = 1
Inbox = Annotated[str, Meta(min_length=1, max_length=128)]
Name = Annotated[str, Meta(min_length=1, max_length=512)]


class Empty(Struct, forbid_unknown_fields=True):
    pass


class _Op(Struct, tag_field="op", forbid_unknown_fields=True, kw_only=True):
    v: int = PROTOCOL_VERSION
    inbox: Inbox | None = None


class SubData(Struct, forbid_unknown_fields=True):
    # Announce this connection on the (literal) subject while the sub lasts: a key of KV
    # `presence` (docs/protocol.md, "Presence").
    presence: bool = False


class Sub(_Op, kw_only=True, tag="sub"):
    """A core NATS subscription to a subject or pattern."""

    target: Name
    data: SubData | None = None


class UnsubData(Struct, forbid_unknown_fields=True):
    # Also delete the durable of the js_sub ended (it is gone: a later js_sub of that
    # durable starts afresh, `recovered: false`).
    delete_durable: bool = False


class Unsub(_Op, kw_only=True, tag="unsub"):
    """End the subscription named by `inbox`, else every one on `target`."""

    target: Name | None = None
    data: UnsubData | None = None


class KvSubData(Struct, forbid_unknown_fields=True):
    pattern: Name = ">"
    since_revision: Annotated[int, Meta(ge=0)] | None = None


class KvSub(_Op, kw_only=True, tag="kv_sub"):
    """Watch a KV bucket: current values, `synced`, then changes."""

    target: Name
    data: KvSubData = msgspec.field(default_factory=KvSubData)


class JsSubData(Struct, forbid_unknown_fields=True):
    filter: Name = ">"
    start_seq: Annotated[int, Meta(ge=1)] | None = None
    time_delta: Annotated[float, Meta(gt=0, le=10 * 365 * 86400)] | None = None
    start_time: dt.datetime | None = None
    batch: Annotated[int, Meta(ge=1, le=1000)] = 100
    ack: bool = False
    durable: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")] | None = None


class JsSub(_Op, kw_only=True, tag="js_sub"):
    """Read a JetStream stream from a start point, then live."""

    target: Name
    data: JsSubData = msgspec.field(default_factory=JsSubData)


class AckData(Struct, forbid_unknown_fields=True):
    seq: Annotated[int, Meta(ge=1)]


class Ack(_Op, kw_only=True, tag="ack"):
    """Acknowledge one message of an `ack: true` js_sub (no reply unless refused)."""

    target: Name
    data: AckData


class Ping(_Op, kw_only=True, tag="ping"):
    """A heartbeat: answered by `pong` with the same inbox."""

    target: Name | None = None
    data: Empty | None = None


class Pong(_Op, kw_only=True, tag="pong"):
    """The answer to the server's `ping`."""

    target: Name | None = None
    data: Empty | None = None


class RefreshData(Struct, forbid_unknown_fields=True):
    token: Annotated[str, Meta(min_length=1, max_length=8192)]


class Refresh(_Op, kw_only=True, tag="refresh"):
    """Replace the session's token by a newer one of the same user."""

    target: Name | None = None
    data: RefreshData


class Cmd(_Op, kw_only=True, tag="cmd"):
    """Not supported: answered `use_http` (commands go through the HTTP API)."""

    target: Name | None = None
    data: Any = None


ClientOp = Sub | Unsub | KvSub | JsSub | Ack | Ping | Pong | Refresh | Cmd


class _Head(Struct):
    """Just enough of a frame to check the version and echo the inbox on errors."""

    v: Any = PROTOCOL_VERSION
    inbox: Any = None


_head_decoder = msgspec.json.Decoder(_Head)
_op_decoder = msgspec.json.Decoder(ClientOp)


def decode_client_frame(frame: bytes | str) -> ClientOp:
    """Decode one client envelope or raise ReplyError/DisconnectError with its code."""
    try:
        head = _head_decoder.decode(frame)
    except (msgspec.DecodeError, RecursionError, UnicodeError) as e:  # deep or not UTF-8
        raise ReplyError(ErrorCode.BAD_REQUEST, f"malformed envelope: {e}") from None
    inbox = head.inbox if isinstance(head.inbox, str) and len(head.inbox) <= 128 else None
    if type(head.v) is not int or head.v != PROTOCOL_VERSION:
        raise DisconnectError(Disconnects.UNSUPPORTED_VERSION, inbox)
    try:
        return _op_decoder.decode(frame)
    except (msgspec.DecodeError, RecursionError, UnicodeError) as e:
        raise ReplyError(ErrorCode.BAD_REQUEST, str(e), inbox) from None


# ---------------------------------------------------------------- server → client


# The data of each server frame. `forbid_unknown_fields` changes nothing when encoding; it
# makes the schemas generated from these (docs/asyncapi.json) closed, so a field the
# server sends and the document lacks fails the tests that validate real frames.


class ErrorData(Struct, forbid_unknown_fields=True):
    code: ErrorCode
    reason: str


class RevokedRef(Struct, forbid_unknown_fields=True):
    inbox: str
    op: Annotated[str, Meta(description="sub, kv_sub or js_sub")]
    target: str


class CapUpdateData(Struct, forbid_unknown_fields=True):
    user: str
    capabilities: Capabilities
    revoked: list[RevokedRef] = []


class PayloadData(Struct, omit_defaults=True, forbid_unknown_fields=True):
    """`payload`: the message, when it is JSON; else `payload_b64`: its bytes."""

    payload: Raw | UnsetType = UNSET
    payload_b64: str | UnsetType = UNSET


class KvData(Struct, omit_defaults=True, forbid_unknown_fields=True):
    """A change of `key` (put: `value`, or `value_b64` when not JSON), or `synced`."""

    op: Literal["put", "delete", "purge", "synced"]
    revision: int
    key: str | UnsetType = UNSET
    value: Raw | UnsetType = UNSET
    value_b64: str | UnsetType = UNSET


class JsData(Struct, omit_defaults=True, forbid_unknown_fields=True):
    """What `js_body` writes (by hand, for speed)."""

    seq: Annotated[int, Meta(ge=1)]
    subject: str
    time: Annotated[str, Meta(description="RFC 3339, UTC, microseconds")]
    payload: Raw | UnsetType = UNSET
    payload_b64: str | UnsetType = UNSET


class OkData(Struct, forbid_unknown_fields=True):
    """`ok` of a kv_sub or js_sub (`position`, `recovered`, a js_sub's `durable`) or of a
    `refresh` (`exp`); `sub` and `unsub` get an `ok` without data."""

    position: (
        Annotated[int, Meta(ge=0, description="the first revision / seq it delivers, at least")]
        | UnsetType
    ) = UNSET
    recovered: (
        Annotated[bool, Meta(description="false: the resume point is gone: reload the state")]
        | UnsetType
    ) = UNSET
    durable: Literal["created", "resumed"] | UnsetType = UNSET
    exp: Annotated[int, Meta(description="the new token's expiry (Unix s)")] | UnsetType = UNSET


# Each server frame as a Struct (the encoders below write the same bytes directly; these
# describe them for docs/asyncapi.json). A frame omits `v` (always 1) and null fields.


class OkFrame(Struct, forbid_unknown_fields=True):
    op: Literal["ok"]
    target: str | UnsetType = UNSET
    inbox: str | UnsetType = UNSET
    data: OkData | UnsetType = UNSET


class ErrorFrame(Struct, forbid_unknown_fields=True):
    """A reply error (echoes the request's inbox), a subscription the server ended (its
    inbox and target), or the last frame before a close (neither)."""

    op: Literal["error"]
    data: ErrorData
    target: str | UnsetType = UNSET
    inbox: str | UnsetType = UNSET


class CapUpdateFrame(Struct, forbid_unknown_fields=True):
    op: Literal["cap_update"]
    data: CapUpdateData


class SubMsgFrame(Struct, forbid_unknown_fields=True):
    """Fan-out, no inbox: route it to every `sub` whose pattern matches `target`."""

    op: Literal["sub_msg"]
    target: Annotated[str, Meta(description="the subject the message was published on")]
    data: PayloadData


class KvMsgFrame(Struct, forbid_unknown_fields=True):
    """A change (fan-out, no inbox: route it by `target` and `data.key`), or, with the
    inbox of its kv_sub, `synced`: every initial value has been sent."""

    op: Literal["kv_msg"]
    target: Annotated[str, Meta(description="the bucket")]
    data: KvData
    inbox: str | UnsetType = UNSET


class JsMsgFrame(Struct, forbid_unknown_fields=True):
    op: Literal["js_msg"]
    target: Annotated[str, Meta(description="the stream")]
    inbox: str
    data: JsData


class PingFrame(Struct, forbid_unknown_fields=True):
    """The server's heartbeat (answer `pong`), or the answer to a client's `ping`."""

    op: Literal["ping", "pong"]
    inbox: str | UnsetType = UNSET


# Every frame the server sends: its op → its Struct (tests hold the encoders to this).
SERVER_FRAMES: dict[str, type[Struct]] = {
    "ok": OkFrame,
    "error": ErrorFrame,
    "cap_update": CapUpdateFrame,
    "sub_msg": SubMsgFrame,
    "kv_msg": KvMsgFrame,
    "js_msg": JsMsgFrame,
    "ping": PingFrame,
    "pong": PingFrame,
}


class ServerMessage(Struct, omit_defaults=True):
    op: str
    v: int = PROTOCOL_VERSION
    target: str | None = None
    inbox: str | None = None
    data: Any = None


_encoder = msgspec.json.Encoder()
_raw_decoder = msgspec.json.Decoder(Raw)
_any_decoder = msgspec.json.Decoder()


def embed_json(data: bytes) -> Raw | None:
    """The payload as embeddable JSON, or None when it must travel as base64.

    Raw bytes are embedded as they are when they are one valid JSON value in UTF-8 with no
    newline (the frame separator); JSON with newlines in its whitespace is re-encoded.
    """
    if not data:
        return None
    try:
        raw = _raw_decoder.decode(data)
        data.decode("utf-8")
        if b"\n" in data:
            return Raw(_encoder.encode(_any_decoder.decode(data)))
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):  # deep nesting: base64
        return None
    return raw


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def encode(msg: ServerMessage) -> bytes:
    return _encoder.encode(msg)


def ok(inbox: str | None, target: str | None, data: Any = None) -> bytes:
    return encode(ServerMessage("ok", target=target, inbox=inbox, data=data))


def error(
    code: ErrorCode | str, reason: str, inbox: str | None = None, target: str | None = None
) -> bytes:
    return encode(
        ServerMessage("error", target=target, inbox=inbox, data=ErrorData(ErrorCode(code), reason))
    )


def cap_update(user: str, caps: Capabilities, revoked: list[RevokedRef] | None = None) -> bytes:
    return encode(ServerMessage("cap_update", data=CapUpdateData(user, caps, revoked or [])))


def sub_msg(subject: str, payload: bytes) -> bytes:
    raw = embed_json(payload)
    data = PayloadData(payload=raw) if raw is not None else PayloadData(payload_b64=_b64(payload))
    return encode(ServerMessage("sub_msg", target=subject, data=data))


def kv_msg(
    bucket: str, key: str, op: Literal["put", "delete", "purge"], revision: int, value: bytes | None
) -> bytes:
    data = KvData(op=op, revision=revision, key=key)
    if op == "put" and value is not None:
        raw = embed_json(value)
        if raw is not None:
            data.value = raw
        else:
            data.value_b64 = _b64(value)
    return encode(ServerMessage("kv_msg", target=bucket, data=data))


def kv_synced(bucket: str, inbox: str, revision: int) -> bytes:
    return encode(
        ServerMessage(
            "kv_msg", target=bucket, inbox=inbox, data=KvData(op="synced", revision=revision)
        )
    )


_second_cache: list[tuple[int, str]] = [(-1, "")]


def rfc3339_ns(ns: int) -> str:
    """`2024-05-01T12:30:00.123000Z` from nanoseconds since the epoch (UTC, microseconds)."""
    sec, rem = divmod(ns, 1_000_000_000)
    cached_sec, prefix = _second_cache[0]
    if sec != cached_sec:  # messages of one second share the formatted date and time
        prefix = dt.datetime.fromtimestamp(sec, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")
        _second_cache[0] = (sec, prefix)
    return f"{prefix}.{rem // 1000:06d}Z"


def rfc3339_from_header(stamp: str) -> str:
    """JetStream's `Nats-Time-Stamp` (`…T12:30:00.1234567Z`, up to nanoseconds) in the form
    `rfc3339_ns` writes (microseconds, truncated): history and live bytes are identical."""
    base, _, frac = stamp.rstrip("Z").partition(".")
    return f"{base}.{(frac + '000000')[:6]}Z"


_subject_cache: dict[str, bytes] = {}


def js_body(seq: int, subject: str, payload: bytes, time: str) -> bytes:
    """The part of a js_msg that is the same for every subscription that gets the message:
    everything after `"data":{"seq":`. Encoded once per message, sent after each
    subscription's own prefix (`JsEncoder.prefix`)."""
    subj = _subject_cache.get(subject)
    if subj is None:
        if len(_subject_cache) > 4096:
            _subject_cache.clear()
        subj = _subject_cache[subject] = b',"subject":' + _encoder.encode(subject)
    raw = embed_json(payload)
    if raw is not None:
        body = b',"payload":' + bytes(raw)
    else:
        body = b',"payload_b64":"' + _b64(payload).encode() + b'"'
    return b"".join((str(seq).encode(), subj, b',"time":"', time.encode(), b'"', body, b"}}"))


class JsEncoder:
    """Encodes the js_msg envelopes of one subscription.

    Unlike fan-out data, a js_msg carries its subscription's inbox, so the frame is this
    subscription's `prefix` (op, target, inbox; encoded once here) followed by the
    message's `js_body`, which is shared by every subscription that gets the message.
    """

    __slots__ = ("prefix",)

    def __init__(self, stream: str, inbox: str) -> None:
        self.prefix = (
            b'{"op":"js_msg","target":'
            + _encoder.encode(stream)
            + b',"inbox":'
            + _encoder.encode(inbox)
            + b',"data":{"seq":'
        )

    def encode(self, seq: int, subject: str, payload: bytes, time_ns: int) -> bytes:
        return self.prefix + js_body(seq, subject, payload, rfc3339_ns(time_ns))


def js_msg(
    stream: str, inbox: str, seq: int, subject: str, payload: bytes, time: dt.datetime
) -> bytes:
    ns = int(time.timestamp()) * 1_000_000_000 + time.microsecond * 1000
    return JsEncoder(stream, inbox).encode(seq, subject, payload, ns)


def ping(inbox: str | None = None) -> bytes:
    return encode(ServerMessage("ping", inbox=inbox))


def pong(inbox: str | None = None) -> bytes:
    return encode(ServerMessage("pong", inbox=inbox))
