"""The pretty log format keeps one record on one line, whatever the client sent."""

from __future__ import annotations

import logging
import re
import sys

from shared.logs import PrettyFormatter, escape

FORGED = "x\n12:00:00 INFO    ws_gateway.hub: user admin granted"


def _record(
    msg: str, *args: object, exc: bool = False, fields: dict[str, object] | None = None
) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError(FORGED)
        except ValueError:
            exc_info = sys.exc_info()
    record = logging.LogRecord("ws_gateway.session", logging.INFO, "f", 1, msg, args, exc_info)
    record.__dict__.update(fields or {})
    return record


def test_control_characters_in_fields_and_messages_are_escaped() -> None:
    """A close reason or a message carrying newlines, CR, ESC or U+2028 stays on its line."""
    line = PrettyFormatter().format(
        _record(
            "closed %s",
            "by\rclient\x1b[2J",
            fields={"reason": FORGED + "\u2028\u0085\x00\t", "k\ney": "v"},
        )
    )
    assert line.splitlines() == [line]
    assert not re.search(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]", line)
    assert "closed by\\rclient\\x1b[2J" in line
    assert "reason=x\\n12:00:00 INFO    ws_gateway.hub: user admin granted" in line
    assert line.endswith("\\u2028\\x85\\x00\\t k\\ney=v")
    printable = "naïve café — 東京, a \\ stays"
    assert escape(printable) == printable


def test_traceback_lines_cannot_pass_for_records() -> None:
    """Every line of a traceback is indented (records start with the time at column 0)."""
    first, *rest = PrettyFormatter().format(_record("failed", exc=True)).split("\n")
    assert first.endswith("failed")
    assert rest and all(line.startswith("  ") for line in rest)
    assert "  12:00:00 INFO    ws_gateway.hub: user admin granted" in rest  # demoted
