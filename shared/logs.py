"""Structured logs: one line per event, JSON in production, key=value in dev.

Call sites pass fields with `extra={...}`; never a token or a password. Fields that follow
a request or a connection (`request_id`, `conn`) are bound once with `bind()` and reach
every line logged from that asyncio task and the tasks it starts (contextvars), so call
sites need not pass them. A JSON line's own keys (`time`, `level`, `logger`, `msg`, `exc`)
cannot be overwritten by a field: one with such a name is written as `field_<name>`.
A field whose name says it holds a secret (`token`, `password`, `authorization`, `cookie`,
`secret`) is written as `[redacted]` whatever the call site passed.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

from shared.settings import Settings

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}
RESERVED = frozenset({"time", "level", "logger", "msg", "exc"})
_SECRET_NAME = re.compile(r"token|password|passwd|secret|authorization|cookie", re.IGNORECASE)
REDACTED = "[redacted]"

# Never mutated: bind() sets a new dict, so a task's binding cannot leak into another's.
_NOTHING: Mapping[str, Any] = MappingProxyType({})
_context: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar(
    "log_context", default=_NOTHING
)


def bind(**fields: Any) -> contextvars.Token[Mapping[str, Any]]:
    """Add `fields` to every line logged from now on in this task (and tasks it starts)."""
    return _context.set({**_context.get(), **fields})


def unbind(token: contextvars.Token[Mapping[str, Any]]) -> None:
    _context.reset(token)


@contextmanager
def bound(**fields: Any) -> Iterator[None]:
    token = bind(**fields)
    try:
        yield
    finally:
        unbind(token)


def detached() -> contextvars.Context:
    """The context for a task shared by many connections (a shared reader, a history
    fill): it must not carry the ids of the connection whose request happened to start it."""
    return contextvars.Context()


# nginx sends its `$request_id` (32 hex digits); without it an id is made here. Only a
# short, plain value is taken: it is written into every log line of the request.
_CORRELATION_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def correlation_id(sent: str | None) -> str:
    """`sent` (an X-Request-Id header) when it is a plain short id, else a new one."""
    return sent if sent and _CORRELATION_ID.fullmatch(sent) else uuid.uuid4().hex


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    out: dict[str, Any] = {}
    bound = ((k, v) for k, v in _context.get().items() if v is not None)
    for k, v in (*bound, *record.__dict__.items()):
        if k in _STANDARD:
            continue
        out[k] = REDACTED if _SECRET_NAME.search(k) else v
    return out


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in _fields(record).items():
            out[f"field_{k}" if k in RESERVED else k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


# Control characters (C0, DEL, C1) and Unicode line/paragraph separators, as escapes:
# a client-chosen string (a close reason, a method, a header) must not start a line of its own.
_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))} | {
    0x2028: "\\u2028",
    0x2029: "\\u2029",
    ord("\n"): "\\n",
    ord("\r"): "\\r",
    ord("\t"): "\\t",
}


def escape(text: str) -> str:
    """`text` on one line: control characters become backslash escapes (`\\n`, `\\x1b`)."""
    return text.translate(_ESCAPES)


class PrettyFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%H:%M:%S", time.localtime(record.created))
        extra = " ".join(f"{escape(k)}={escape(str(v))}" for k, v in _fields(record).items())
        msg = escape(record.getMessage())
        line = f"{ts} {record.levelname:<7} {record.name}: {msg} {extra}".rstrip()
        if record.exc_info:
            # A traceback spans lines by nature; each is indented, so none can pass for a
            # record (records start with the time at column 0), and each is escaped.
            tb = self.formatException(record.exc_info)
            line += "".join(f"\n  {escape(t)}" for t in tb.splitlines())
        return line


def setup(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if settings.log_json else PrettyFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    # Library chatter (per-frame websockets logs, aiohttp access lines) stays out by default.
    logging.getLogger("websockets").setLevel(logging.WARNING)
