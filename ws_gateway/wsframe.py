"""Server WebSocket text frames built once and written as the same bytes to every socket.

Server frames are unmasked and the gateway negotiates no extension (compression off), so a
payload's frame is the same bytes for every connection. When one loop tick's data for a
room of connections is the same object (outbox.py joins identical queues into one object),
its frame is built here once and each socket gets one `transport.write` of it, instead of
websockets building a frame per connection.
"""

from __future__ import annotations

_MEMO_BYTES = 4 << 20  # data and frames kept for reuse within a tick or two; then forgotten
_MEMO_MAX = 64 << 10  # larger data is framed each time (a tick's fan-out frames are small)

_memo: dict[int, tuple[bytes, bytes]] = {}
_memo_bytes = [0]


def text_frame(data: bytes) -> bytes:
    """The complete frame (FIN, opcode text, unmasked) carrying `data`."""
    hit = _memo.get(id(data))
    if hit is not None and hit[0] is data:
        return hit[1]
    n = len(data)
    if n < 126:
        head = bytes((0x81, n))
    elif n < 65536:
        head = b"\x81\x7e" + n.to_bytes(2, "big")
    else:
        head = b"\x81\x7f" + n.to_bytes(8, "big")
    framed = head + data
    if n > _MEMO_MAX:
        return framed
    if _memo_bytes[0] + 2 * n > _MEMO_BYTES:
        _memo.clear()
        _memo_bytes[0] = 0
    _memo[id(data)] = (data, framed)  # holding `data` keeps its id from being reused
    _memo_bytes[0] += 2 * n
    return framed
