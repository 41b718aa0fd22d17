"""Security 7 (frames): hypothesis-driven random and mutated client frames against a real
gateway. Only documented error codes come back, the connection survives every frame
except the ones docs/protocol.md closes on (another `v`: 1002), no exception escapes a handler."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nats.aio.client import Client as NATS
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from shared.errors import ErrorCode
from tests.gateway.conftest import UserFactory
from tests.reliability.conftest import FULL, Figures, scale
from tests.reliability.helpers import split
from ws_gateway.server import Gateway

SERVER_OPS = {"ok", "error", "cap_update", "sub_msg", "kv_msg", "js_msg", "ping", "pong"}
DOCUMENTED = {c.value for c in ErrorCode}

_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda ch: st.lists(ch, max_size=4) | st.dictionaries(st.text(max_size=8), ch, max_size=4),
    max_leaves=10,
)
_ops = (
    st.sampled_from(["sub", "unsub", "kv_sub", "js_sub", "ack", "ping", "pong", "refresh", "cmd"])
    | st.sampled_from(["SUB", "pub", "", "ok", "error", "cap_update", "sub_msg"])
    | st.text(max_size=10)
)
_targets = st.sampled_from(
    [
        "chat.room.1",
        "chat.room.*",
        "chat.>",
        ">",
        "*",
        "todos",
        "chat",
        "audit",
        "articles",
        "auth_users",
        "auth_credentials",
        "KV_todos",
        "$SYS.>",
        "$JS.API.>",
        "_INBOX.x",
        "cmd.x",
        "a..b",
        " ",
        "",
        "user.fuzz.>",
        "chat.room.123",
    ]
) | st.text(max_size=30)
_inbox = st.none() | st.text(max_size=10) | st.integers() | st.text(min_size=129, max_size=140)
_data = (
    st.none()
    | _json
    | st.fixed_dictionaries(
        {},
        optional={
            "pattern": _targets,
            "since_revision": st.integers(-5, 2**66),
            "filter": _targets,
            "start_seq": st.integers(-2, 2**66),
            "time_delta": st.floats(allow_nan=False, allow_infinity=False),
            "start_time": st.sampled_from(["2020-01-01T00:00:00Z", "yesterday", "2020-13-45"])
            | st.text(max_size=25),
            "batch": st.integers(-1, 2000),
            "ack": st.booleans() | _json,
            "durable": st.text(max_size=70) | st.sampled_from(["d1", "fuzz-d"]),
            "seq": st.integers(-1, 2**66),
            "token": st.text(max_size=50),
            "extra": _json,
        },
    )
)
_version = st.sampled_from([1, 1, 1, 1, 1, 1, 1, 1, 2, 0, "1", None, 1.0, True, -1])
_envelope = st.fixed_dictionaries(
    {"op": _ops},
    optional={"v": _version, "target": _targets, "inbox": _inbox, "data": _data, "x": _json},
)


_small_inbox = st.sampled_from([f"c{i}" for i in range(8)])
_subjects = st.sampled_from(
    ["chat.room.1", "chat.room.*", "chat.>", "user.fuzz.>", "user.fuzz.a", "chat.x.y", ">"]
)
_kv_patterns = st.sampled_from(["user.fuzz.>", "user.fuzz.*", ">", "user.other.>", "x.*"])
_js_data = st.fixed_dictionaries(
    {"filter": st.sampled_from(["chat.room.1", "chat.>", ">", "chat.room.*", "audit.>"])},
    optional={
        "start_seq": st.integers(1, 50),
        "batch": st.integers(1, 1000),
        "ack": st.booleans(),
        "durable": st.sampled_from(["d1", "d2"]),
        "time_delta": st.floats(0.001, 3600),
    },
)
# Well-formed requests, so that the handlers behind the decoder run too.
_valid = st.one_of(
    st.builds(lambda t, i: {"op": "sub", "target": t, "inbox": i}, _subjects, _small_inbox),
    st.builds(
        lambda b, p, i: {"op": "kv_sub", "target": b, "inbox": i, "data": {"pattern": p}},
        st.sampled_from(["todos", "articles", "nope"]),
        _kv_patterns,
        _small_inbox,
    ),
    st.builds(
        lambda t, d, i: {"op": "js_sub", "target": t, "inbox": i, "data": d},
        st.sampled_from(["chat", "audit", "nope"]),
        _js_data,
        _small_inbox,
    ),
    st.builds(lambda i: {"op": "unsub", "inbox": i}, _small_inbox),
    st.builds(lambda t: {"op": "unsub", "target": t}, _subjects),
    st.builds(
        lambda i, n: {"op": "ack", "target": "chat", "inbox": i, "data": {"seq": n}},
        _small_inbox,
        st.integers(1, 30),
    ),
    st.builds(lambda i: {"op": "ping", "inbox": i}, _small_inbox),
    st.builds(lambda t: {"op": "refresh", "data": {"token": t}}, st.text(min_size=1, max_size=40)),
    st.builds(lambda t: {"op": "cmd", "target": t}, _subjects),
)


def _encode(env: dict[str, Any]) -> str:
    return msgspec.json.encode(env).decode()


def _mutate(frame: str, pos: int, cut: int, insert: str) -> str:
    pos = pos % (len(frame) + 1)
    return frame[:pos] + insert + frame[pos + cut :]


_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200)
FRAMES = st.one_of(
    _valid.map(_encode),
    _valid.map(_encode),
    _valid.map(_encode),
    _envelope.map(_encode),
    _envelope.map(_encode),
    st.tuples(
        _envelope.map(_encode),
        st.integers(0, 400),
        st.integers(0, 5),
        st.sampled_from(
            ['"', "{", "}", ",", ":", "[", "\\", "\x00", "\n", "null", "1e999", "", "é"]
        ),
    ).map(lambda t: _mutate(*t)),
    _text,
    st.binary(max_size=64),  # binary frames: bad_request
    st.lists(_envelope.map(_encode), min_size=2, max_size=3).map("\n".join),
    st.integers(1, 60).map(lambda n: "[" * n + "]" * n),
    st.sampled_from(["{}", "[]", "null", "1", '""', '{"op":null}', '{"op":"sub","target":null}']),
)


def closes(frame: str | bytes) -> bool:
    """docs/protocol.md, "Envelope": another `v` gets unsupported_version + 1002."""
    if isinstance(frame, bytes):
        return False
    try:
        head = msgspec.json.decode(frame)
    except (msgspec.DecodeError, RecursionError):
        return False
    if not isinstance(head, dict) or "v" not in head:
        return False
    v = head["v"]
    return not (type(v) is int and v == 1)


def generate(n_frames: int) -> list[str | bytes]:
    """At least `n_frames` frames drawn by hypothesis (a new draw per example)."""
    out: list[str | bytes] = []

    @settings(
        max_examples=max(10, n_frames // 12),
        database=None,
        derandomize=not FULL,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(st.lists(FRAMES, min_size=1, max_size=40))
    def collect(frames: list[str | bytes]) -> None:
        out.extend(frames)

    while len(out) < n_frames:
        collect()
    return out


class ErrorCounter(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


FUZZ_CAPS = {
    "subjects": ["chat.>", "user.fuzz.>"],
    "buckets": {"todos": ["user.{uid}.>"], "articles": [">"]},
    "streams": {"chat": [">"], "audit": [">"]},
    "commands": [],
}


async def test_fuzzed_frames_get_documented_answers(
    lenient_gateway: Gateway, make_user: UserFactory, nc: NATS, figures: Figures
) -> None:
    """Random and mutated frames: documented codes only, closes only where docs/protocol.md says."""
    target = scale(400, 10_000)
    t_gen = time.monotonic()
    frames = generate(target)
    gen_seconds = time.monotonic() - t_gen
    token = await make_user("fuzz", FUZZ_CAPS)
    errors = ErrorCounter()
    logging.getLogger("ws_gateway").addHandler(errors)
    codes: dict[str, int] = {}
    ops: dict[str, int] = {}
    closes_seen: dict[int, int] = {}
    unexpected: list[str] = []
    connections = 0
    t0 = time.monotonic()

    async def open_ws() -> ClientConnection:
        nonlocal connections
        connections += 1
        ws = await ws_connect(
            lenient_gateway.url,
            additional_headers={"Authorization": f"Bearer {token}"},
            max_size=None,
            ping_interval=None,
        )
        first = split(await ws.recv())
        assert first[0]["op"] == "cap_update"
        return ws

    def record(envs: list[dict[str, Any]]) -> None:
        for e in envs:
            op = e.get("op")
            ops[str(op)] = ops.get(str(op), 0) + 1
            if op not in SERVER_OPS:
                unexpected.append(f"op {op!r}")
            if op == "error":
                code = e["data"]["code"]
                codes[code] = codes.get(code, 0) + 1
                if code not in DOCUMENTED or code == "internal":
                    unexpected.append(f"code {code!r}")

    async def read_until(ws: ClientConnection, marker: str) -> None:
        async with asyncio.timeout(30):
            while True:
                envs = split(await ws.recv())
                record(envs)
                if any(e.get("op") == "pong" and e.get("inbox") == marker for e in envs):
                    return

    ws = await open_ws()
    try:
        batch = 0
        i = 0
        while i < len(frames):
            # pipeline frames up to the next one that must close the connection
            j = i
            while j < len(frames) and not closes(frames[j]) and j - i < 50:
                j += 1
            for f in frames[i:j]:
                await ws.send(f)
            batch += 1
            marker = f"m{batch}"
            await ws.send(f'{{"op":"ping","inbox":"{marker}"}}')
            try:
                await read_until(ws, marker)
            except ConnectionClosed:
                unexpected.append(f"closed {ws.close_code} within frames {frames[i:j]!r:.300}")
                ws = await open_ws()
            i = j
            if i < len(frames) and closes(frames[i]):
                await ws.send(frames[i])
                got: list[dict[str, Any]] = []
                try:
                    async with asyncio.timeout(10):
                        while True:
                            got += split(await ws.recv())
                except ConnectionClosed:
                    pass
                record(got)
                closes_seen[ws.close_code or 0] = closes_seen.get(ws.close_code or 0, 0) + 1
                last = [e for e in got if e.get("op") == "error"]
                if (
                    ws.close_code != 1002
                    or not last
                    or last[-1]["data"]["code"] != ("unsupported_version")
                ):
                    unexpected.append(f"frame {frames[i]!r:.200}: {ws.close_code}, {last!r:.200}")
                ws = await open_ws()
                i += 1
    finally:
        await ws.close()
        logging.getLogger("ws_gateway").removeHandler(errors)
    elapsed = time.monotonic() - t0
    figures.add(
        "S7",
        "test_fuzzed_frames_get_documented_answers",
        f"{len(frames)} hypothesis-drawn frames (random envelopes, mutated JSON, random "
        "text/binary, several envelopes in one frame, deep nesting, other `v`) over "
        f"{connections} connections",
        f"{len(frames)} frames in {elapsed:.1f} s (+{gen_seconds:.1f} s drawing): error codes "
        f"{dict(sorted(codes.items()))}; closes {closes_seen} (all 1002 after "
        f"unsupported_version); {len(errors.records)} handler exceptions logged; "
        f"{len(unexpected)} unexpected",
        ops=ops,
        unexpected=unexpected[:20],
    )
    # the malformed frames reached the gateway's validation (answered, not dropped)
    assert codes.get("bad_request", 0) > 0, codes
    assert unexpected == []
    assert errors.records == []
    assert lenient_gateway.hub is not None and lenient_gateway.hub.nc.is_connected


async def test_fuzzed_frames_over_long_polling(
    lenient_gateway: Gateway, make_user: UserFactory, figures: Figures
) -> None:
    """The same frames through POST /poll/send: documented codes only, the session survives
    every frame but another `v` (then 410 with close code 1002)."""
    import secrets as _secrets

    import aiohttp

    target = scale(200, 3_000)
    lines: list[str] = []
    for f in generate(target):
        text = f.decode("utf-8", "replace") if isinstance(f, bytes) else f
        lines += [line for line in text.split("\n") if line.strip() and not closes(line)]
    token = await make_user("fuzz", FUZZ_CAPS)
    headers = {"Authorization": f"Bearer {token}"}
    base = lenient_gateway.poll_url
    codes: dict[str, int] = {}
    statuses: dict[int, int] = {}
    unexpected: list[str] = []
    t0 = time.monotonic()
    async with aiohttp.ClientSession() as http:
        sid = _secrets.token_urlsafe(18)
        async with http.post(f"{base}/open", params={"sid": sid}, headers=headers) as r:
            assert r.status == 200
        after = 0

        async def fetch_until(marker: str) -> None:
            nonlocal after
            async with asyncio.timeout(30):
                while True:
                    async with http.get(
                        base,
                        params={"sid": sid, "after": str(after), "wait": "5"},
                        headers=headers,
                    ) as r:
                        assert r.status == 200, await r.text()
                        after = int(r.headers["Poll-Last-Frame"])
                        envs = split(await r.read())
                    for e in envs:
                        if e.get("op") not in SERVER_OPS:
                            unexpected.append(f"op {e.get('op')!r}")
                        if e.get("op") == "error":
                            code = e["data"]["code"]
                            codes[code] = codes.get(code, 0) + 1
                            if code not in DOCUMENTED or code == "internal":
                                unexpected.append(code)
                    if any(e.get("op") == "pong" and e.get("inbox") == marker for e in envs):
                        return

        for b, i in enumerate(range(0, len(lines), 40)):
            body = "\n".join(lines[i : i + 40]) + f'\n{{"op":"ping","inbox":"m{b}"}}'
            async with http.post(
                f"{base}/send", params={"sid": sid}, data=body.encode(), headers=headers
            ) as r:
                statuses[r.status] = statuses.get(r.status, 0) + 1
            await fetch_until(f"m{b}")
        # another version closes the session: 410 with close code 1002 from then on
        async with http.post(
            f"{base}/send", params={"sid": sid}, data=b'{"v":2,"op":"ping"}', headers=headers
        ) as r:
            statuses[r.status] = statuses.get(r.status, 0) + 1
        async with asyncio.timeout(10):
            while True:
                async with http.get(
                    base, params={"sid": sid, "after": str(after), "wait": "2"}, headers=headers
                ) as r:
                    if r.status == 410:
                        gone = await r.json(content_type=None)
                        break
                    after = int(r.headers["Poll-Last-Frame"])
                    for e in split(await r.read()):
                        if e.get("op") == "error":
                            codes[e["data"]["code"]] = codes.get(e["data"]["code"], 0) + 1
    elapsed = time.monotonic() - t0
    figures.add(
        "S7",
        "test_fuzzed_frames_over_long_polling",
        f"{len(lines)} hypothesis-drawn frames (those that do not end a session) posted to "
        "/poll/send 40 at a time, then one with another `v`",
        f"{len(lines)} frames in {elapsed:.1f} s: /poll/send {statuses}; error codes "
        f"{dict(sorted(codes.items()))}; after `v`:2 -> 410 close_code {gone.get('close_code')}; "
        f"{len(unexpected)} unexpected",
        unexpected=unexpected[:20],
    )
    assert unexpected == []
    assert set(statuses) == {204}
    assert gone.get("close_code") == 1002


async def test_durable_resumed_while_its_last_connection_parks_it(
    gateway: Gateway, make_user: UserFactory, figures: Figures
) -> None:
    """Found by the fuzzer: resume a durable from a new connection right as the old one
    closes. Every attempt must get `ok` (or a documented refusal), never `internal`."""
    from shared.client import GatewayClient, RequestError

    token = await make_user("alice", FUZZ_CAPS)
    codes: dict[str, int] = {}
    rounds = scale(60, 200)
    for _ in range(rounds):
        a = await GatewayClient.connect(gateway.url, token=token)
        await a.js_sub("chat", "chat.room.123", start_seq=1, durable="d")
        closing = asyncio.ensure_future(a.close())
        b = await GatewayClient.connect(gateway.url, token=token)
        try:
            await b.js_sub("chat", "chat.room.123", durable="d")
            codes["ok"] = codes.get("ok", 0) + 1
        except RequestError as e:
            codes[e.code] = codes.get(e.code, 0) + 1
        await closing
        await b.close()
    figures.add(
        "S7",
        "test_durable_resumed_while_its_last_connection_parks_it",
        f"{rounds} times: a connection js_subs durable 'd' and closes; a second connection of "
        "the same user resumes 'd' at once (the race the fuzzer found)",
        f"answers {codes}",
    )
    assert set(codes) <= {"ok"}, codes
