"""Reading request bodies into Structs and writing JSON responses, both with msgspec."""

from __future__ import annotations

import re
from typing import Any, TypeVar

import msgspec
from aiohttp import web

from http_api.problems import Problem

T = TypeVar("T")

_encoder = msgspec.json.Encoder()
_decoders: dict[Any, msgspec.json.Decoder[Any]] = {}


def _decoder(typ: type[T]) -> msgspec.json.Decoder[T]:
    dec = _decoders.get(typ)
    if dec is None:
        dec = _decoders[typ] = msgspec.json.Decoder(typ)
    return dec


_REGEX = re.compile(r"matching regex '.*' - at")


def _readable(message: str) -> str:
    """msgspec names the regex a field missed; a person needs the field, and the document
    (GET /api/openapi.json) states the pattern."""
    return _REGEX.sub("matching its documented pattern - at", message)


def _integral(doc: Any) -> Any:
    """`doc` with every float that has no fraction made an int."""
    if isinstance(doc, float) and doc.is_integer():
        return int(doc)
    if isinstance(doc, list):
        return [_integral(v) for v in doc]
    if isinstance(doc, dict):
        return {k: _integral(v) for k, v in doc.items()}
    return doc


def decode(raw: bytes, typ: type[T]) -> T:
    """Malformed JSON is a 400; JSON of the wrong shape is a 422 naming the field."""
    if not raw:
        raise Problem(400, "a JSON request body is required")
    try:
        return _decoder(typ).decode(raw)
    except msgspec.ValidationError as e:
        try:  # typed decoding stops at the first mismatch: is the JSON itself well-formed?
            doc = msgspec.json.decode(raw)
        except msgspec.DecodeError:
            raise Problem(400, "request body is not valid JSON") from None
        if "got `float`" in str(e):
            # JSON Schema's integer is any number without a fraction (3.0 is one): the
            # document says integer, so such a number is taken as the integer it is.
            try:
                return msgspec.convert(_integral(doc), typ)
            except msgspec.ValidationError as again:
                e = again
        raise Problem(422, _readable(str(e))) from None
    except msgspec.DecodeError:
        raise Problem(400, "request body is not valid JSON") from None


async def read_json(request: web.Request, typ: type[T]) -> T:
    # request.read() enforces the app's client_max_size (settings.max_body_bytes): 413.
    return decode(await request.read(), typ)


def encode(data: Any) -> bytes:
    return _encoder.encode(data)


def json_response(
    data: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status, body=_encoder.encode(data), content_type="application/json", headers=headers
    )
