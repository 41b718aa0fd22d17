"""How a NATS KV bucket lies on JetStream: written here once for both processes.

A bucket `b` is the stream `KV_b`; key `k` is stored on subject `$KV.b.k`; the operation
(put, delete, purge) travels in the `KV-Operation` header, or as a marker reason when the
server itself removed the value (max age, purge).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

KvOp = Literal["put", "delete", "purge"]

OPERATION_HEADER = "KV-Operation"


def stream_of(bucket: str) -> str:
    return f"KV_{bucket}"


def subject_of(bucket: str, key_or_pattern: str) -> str:
    return f"$KV.{bucket}.{key_or_pattern}"


def key_offset(bucket: str) -> int:
    """Where the key starts in a subject of `bucket` (`subject[key_offset(b):]` is the key)."""
    return len(bucket) + 5  # "$KV." + bucket + "."


def kv_op(headers: Mapping[str, str] | None) -> KvOp:
    headers = headers or {}
    op = headers.get(OPERATION_HEADER)
    marker = headers.get("Nats-Marker-Reason")
    if op == "DEL" or marker == "Remove":
        return "delete"
    if op == "PURGE" or marker in ("MaxAge", "Purge"):
        return "purge"
    return "put"
