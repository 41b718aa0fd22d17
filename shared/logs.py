"""Structured logs: one line per event, JSON in production, key=value in dev.

Call sites pass fields with `extra={...}`; never a token or a password.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from shared.settings import Settings

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **_fields(record),
        }
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
    handler.setFormatter(JsonFormatter() if settings.log_format == "json" else PrettyFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    # Library chatter (per-frame websockets logs, aiohttp access lines) stays out by default.
    logging.getLogger("websockets").setLevel(logging.WARNING)
