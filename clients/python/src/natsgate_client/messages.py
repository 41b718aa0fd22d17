"""What travels and what a subscription yields (docs/protocol.md, "Envelope").

The server's frames are decoded by one typed decoder into a tagged union of Structs
(`op` is the tag). Unknown fields are ignored, so a newer server that adds one does not
break an older client; an unknown op is skipped by the reader. What a subscription
yields (`Message`, `KvChange`, `KvSynced`, `StreamMessage`, `Gap`) are plain frozen
Structs built from those frames, with the payload decoded.
"""

from __future__ import annotations

import base64
from typing import Any, Literal

import msgspec
from msgspec import UNSET, Raw, Struct, UnsetType

PROTOCOL_VERSION = 1

# ---------------------------------------------------------------- server frames (wire)


class OkData(Struct):
    position: int | None = None
    recovered: bool | None = None
    durable: Literal["created", "resumed"] | None = None
    exp: int | None = None


class ErrorData(Struct):
    code: str
    reason: str = ""


class RevokedRef(Struct, frozen=True):
    inbox: str
    op: str
    target: str


class CapUpdateData(Struct):
    user: str
    capabilities: dict[str, Any]
    revoked: list[RevokedRef] = []


class PayloadData(Struct):
    payload: Raw | UnsetType = UNSET
    payload_b64: str | UnsetType = UNSET


class KvData(Struct):
    op: Literal["put", "delete", "purge", "synced"]
    revision: int
    key: str = ""
    value: Raw | UnsetType = UNSET
    value_b64: str | UnsetType = UNSET


class JsData(Struct):
    seq: int
    subject: str
    time: str
    payload: Raw | UnsetType = UNSET
    payload_b64: str | UnsetType = UNSET


class _Frame(Struct, tag_field="op"):
    pass


class OkFrame(_Frame, tag="ok"):
    target: str | None = None
    inbox: str | None = None
    data: OkData = msgspec.field(default_factory=OkData)


class ErrorFrame(_Frame, tag="error"):
    data: ErrorData
    target: str | None = None
    inbox: str | None = None


class CapUpdateFrame(_Frame, tag="cap_update"):
    data: CapUpdateData


class SubMsgFrame(_Frame, tag="sub_msg"):
    target: str
    data: PayloadData


class KvMsgFrame(_Frame, tag="kv_msg"):
    target: str
    data: KvData
    inbox: str | None = None


class JsMsgFrame(_Frame, tag="js_msg"):
    target: str
    inbox: str
    data: JsData


class PingFrame(_Frame, tag="ping"):
    inbox: str | None = None


class PongFrame(_Frame, tag="pong"):
    inbox: str | None = None


ServerFrame = (
    OkFrame
    | ErrorFrame
    | CapUpdateFrame
    | SubMsgFrame
    | KvMsgFrame
    | JsMsgFrame
    | PingFrame
    | PongFrame
)

_frame_decoder = msgspec.json.Decoder(ServerFrame)
_json = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()


def decode_frame(line: bytes | str) -> ServerFrame:
    """One server envelope (raises msgspec.DecodeError on anything else)."""
    return _frame_decoder.decode(line)


class Request(Struct, omit_defaults=True):
    """A client envelope (`v` omitted: 1)."""

    op: str
    inbox: str | None = None
    target: str | None = None
    data: Any = None


def encode_request(req: Request) -> bytes:
    return _encoder.encode(req)


def _body(raw: Raw | UnsetType, b64: str | UnsetType) -> tuple[Any, bytes]:
    """(the decoded JSON value or None, the message's bytes)."""
    if not isinstance(raw, UnsetType):
        data = bytes(raw)
        return _json.decode(data), data
    if not isinstance(b64, UnsetType):
        return None, base64.b64decode(b64)
    return None, b""


# ---------------------------------------------------------------- what subscriptions yield


class Message(Struct, frozen=True):
    """A core message (`sub`): at-most-once, nothing to resume."""

    subject: str
    payload: Any  # the JSON value, or None when the bytes are not JSON (see `data`)
    data: bytes  # the message's bytes as published

    @classmethod
    def of(cls, frame: SubMsgFrame) -> Message:
        payload, data = _body(frame.data.payload, frame.data.payload_b64)
        return cls(frame.target, payload, data)


class KvChange(Struct, frozen=True):
    """A key's change. `op` "drop": the key was not in a full reload after a resume the
    server could not honour (`recovered: false`), so it no longer exists."""

    bucket: str
    key: str
    op: Literal["put", "delete", "purge", "drop"]
    revision: int
    value: Any = None  # a put's JSON value (None for the others, or when not JSON)
    data: bytes = b""  # a put's bytes

    @classmethod
    def of(cls, frame: KvMsgFrame) -> KvChange:
        d = frame.data
        if d.op == "synced":
            raise ValueError("a synced marker is a KvSynced, not a change")
        value, data = _body(d.value, d.value_b64)
        return cls(frame.target, d.key, d.op, d.revision, value, data)


class KvSynced(Struct, frozen=True):
    """Every current value has arrived (after each (re)subscription). `recovered`: false
    when this round was a full reload rather than the changes since the last one."""

    bucket: str
    revision: int
    recovered: bool


class StreamMessage(Struct, frozen=True):
    """A JetStream message (`js_sub`): each `seq` once, in order, across reconnects."""

    stream: str
    seq: int
    subject: str
    time: str  # RFC 3339 UTC, microseconds
    payload: Any
    data: bytes

    @classmethod
    def of(cls, frame: JsMsgFrame) -> StreamMessage:
        d = frame.data
        payload, data = _body(d.payload, d.payload_b64)
        return cls(frame.target, d.seq, d.subject, d.time, payload, data)


class Gap(Struct, frozen=True):
    """A resume the server could not honour (`recovered: false`): the messages from
    `expected` to `resumed_at` - 1 are gone (purged, aged out, stream recreated)."""

    stream: str
    expected: int
    resumed_at: int


KvEvent = KvChange | KvSynced
StreamEvent = StreamMessage | Gap
