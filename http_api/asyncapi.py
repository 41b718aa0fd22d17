"""The AsyncAPI 3.0 document of the WebSocket protocol, generated from `shared/envelope.py`.

As `openapi.py` does for the HTTP API: nothing is written by hand per message. Client
messages are the members of `envelope.ClientOp` (what the one decoder accepts), server
messages are `envelope.SERVER_FRAMES`; schemas come from `msgspec.json.schema_components`.
The document describes the gateway: it `receive`s client envelopes and `send`s server ones.
docs/asyncapi.json is this document (`make asyncapi`; a test checks it is current) and the
API serves it at `/api/asyncapi.json`. The prose is docs/protocol.md.

    python -m http_api.asyncapi [FILE]     write the document (default: stdout)
"""

from __future__ import annotations

import sys
import typing
from pathlib import Path
from typing import Any

import msgspec

from shared import __version__, envelope

REF = "#/components/schemas/{name}"
CHANNEL = "session"


def client_ops() -> dict[str, type[msgspec.Struct]]:
    """op → Struct, for every op the decoder accepts."""
    ops: dict[str, type[msgspec.Struct]] = {}
    for t in typing.get_args(envelope.ClientOp):
        tag = t.__struct_config__.tag
        assert isinstance(tag, str)
        ops[tag] = t
    return ops


def _summary(t: type[msgspec.Struct]) -> str:
    return (t.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")


def build(cookie_name: str = "session") -> dict[str, Any]:
    """The document; `cookie_name`: the session cookie's (`shared.auth.session_cookie_name`)."""
    received = {f"client.{op}": t for op, t in client_ops().items()}
    sent = {f"server.{op}": t for op, t in envelope.SERVER_FRAMES.items()}
    unique = list(dict.fromkeys([*received.values(), *sent.values()]))
    schemas, components = msgspec.json.schema_components(unique, ref_template=REF)
    schema_of = dict(zip(unique, schemas, strict=True))

    messages: dict[str, Any] = {}
    for name, t in {**received, **sent}.items():
        op = name.partition(".")[2]
        msg: dict[str, Any] = {"name": op, "title": op, "payload": schema_of[t]}
        if summary := _summary(t):
            msg["summary"] = summary
        messages[name] = msg

    def operation(action: str, names: list[str], summary: str) -> dict[str, Any]:
        return {
            "action": action,
            "channel": {"$ref": f"#/channels/{CHANNEL}"},
            "summary": summary,
            "messages": [{"$ref": f"#/channels/{CHANNEL}/messages/{n}"} for n in names],
        }

    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "natsgate WebSocket protocol",
            "version": __version__,
            "description": "The gateway's side of one session: it receives client envelopes "
            "and sends server envelopes, each one JSON object per line of a text frame "
            "(the server may batch several lines into one frame). The same envelopes travel "
            "over the long-polling fallback (`/poll`). Prose, close codes, the resume "
            "contract and a recorded transcript: docs/protocol.md.",
            "license": {"name": "MIT"},
        },
        "defaultContentType": "application/json",
        "servers": {
            "websocket": {
                "host": "127.0.0.1:8080",
                "pathname": "/ws",
                "protocol": "ws",
                "description": "Through nginx in `make run`; the token as a bearer header "
                "or the session cookie (with an allowed Origin).",
                "security": [
                    {"$ref": "#/components/securitySchemes/bearer"},
                    {"$ref": "#/components/securitySchemes/cookie"},
                ],
            },
            "polling": {
                "host": "127.0.0.1:8080",
                "pathname": "/poll",
                "protocol": "http",
                "description": "The long-polling fallback: the same envelopes, one per line "
                "(docs/protocol.md, Fallback transport).",
                "security": [
                    {"$ref": "#/components/securitySchemes/bearer"},
                    {"$ref": "#/components/securitySchemes/cookie"},
                ],
            },
        },
        "channels": {
            CHANNEL: {
                "address": "/ws",
                "title": "One session",
                "messages": {n: {"$ref": f"#/components/messages/{n}"} for n in messages},
            }
        },
        "operations": {
            "receiveClientEnvelope": operation(
                "receive", list(received), "A client envelope: one request"
            ),
            "sendServerEnvelope": operation(
                "send", list(sent), "A server envelope: a reply, data or a notice"
            ),
        },
        "components": {
            "messages": messages,
            "schemas": components,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
                "cookie": {"type": "httpApiKey", "in": "cookie", "name": cookie_name},
            },
        },
    }


def encoded(cookie_name: str = "session") -> bytes:
    """The document as committed: indented, keys in the order built, one final newline."""
    return msgspec.json.format(msgspec.json.encode(build(cookie_name)), indent=2) + b"\n"


def main(argv: list[str]) -> None:
    if argv:
        Path(argv[0]).write_bytes(encoded())
    else:
        sys.stdout.buffer.write(encoded())


if __name__ == "__main__":
    main(sys.argv[1:])
