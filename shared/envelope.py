"""The wire envelope of PROTOCOL.md: client ops in, server messages out.

Client frames are decoded by one module-level typed decoder into a tagged union of
Structs. Server messages are encoded once into bytes; fan-out messages carry no inbox,
so the same bytes go to every connection.
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


class Sub(_Op, kw_only=True, tag="sub"):
    target: Name
    data: Empty | None = None


class UnsubData(Struct, forbid_unknown_fields=True):
    # Also delete the durable of the js_sub ended (it is gone: a later js_sub of that
    # durable starts afresh, `recovered: false`).
    delete_durable: bool = False


class Unsub(_Op, kw_only=True, tag="unsub"):
    target: Name | None = None
    data: UnsubData | None = None


class KvSubData(Struct, forbid_unknown_fields=True):
    pattern: Name = ">"
    since_revision: Annotated[int, Meta(ge=0)] | None = None


class KvSub(_Op, kw_only=True, tag="kv_sub"):
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
    target: Name
    data: JsSubData = msgspec.field(default_factory=JsSubData)


class AckData(Struct, forbid_unknown_fields=True):
    seq: Annotated[int, Meta(ge=1)]


class Ack(_Op, kw_only=True, tag="ack"):
    target: Name
    data: AckData


class Ping(_Op, kw_only=True, tag="ping"):
    target: Name | None = None
    data: Empty | None = None


class Pong(_Op, kw_only=True, tag="pong"):
    target: Name | None = None
    data: Empty | None = None


class RefreshData(Struct, forbid_unknown_fields=True):
    token: Annotated[str, Meta(min_length=1, max_length=8192)]


class Refresh(_Op, kw_only=True, tag="refresh"):
    target: Name | None = None
    data: RefreshData


class Cmd(_Op, kw_only=True, tag="cmd"):
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


class ErrorData(Struct):
    code: str
    reason: str


class RevokedRef(Struct):
    inbox: str
    op: str
    target: str


class CapUpdateData(Struct):
    user: str
    capabilities: Capabilities
    revoked: list[RevokedRef] = []


class PayloadData(Struct, omit_defaults=True):
    payload: Raw | UnsetType = UNSET
    payload_b64: str | UnsetType = UNSET


class KvData(Struct, omit_defaults=True):
    op: str
    revision: int
    key: str | UnsetType = UNSET
    value: Raw | UnsetType = UNSET
    value_b64: str | UnsetType = UNSET


class JsData(Struct, omit_defaults=True):
    seq: int
    subject: str
    time: str
    payload: Raw | UnsetType = UNSET
    payload_b64: str | UnsetType = UNSET


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
        ServerMessage("error", target=target, inbox=inbox, data=ErrorData(str(code), reason))
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
