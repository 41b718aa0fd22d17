"""The load client of `bench/run.py`: one process holding a share of the WebSocket connections.

    python bench/loadclient.py    # driven by bench/run.py: JSON commands in, replies out

The same client measures all three servers; only the handshake and the subscription request
differ by `mode`:

- `ours`: `ws_gateway` — bearer JWT on the upgrade, `cap_update`, then `sub`/`kv_sub`/`js_sub`
  envelopes of docs/protocol.md; it answers the gateway's app-level `ping` with `pong`.
- `ceiling`: `bench/ceiling.py` — every connection gets every message; a first frame says the
  server has registered the connection.
- `peer`: nats-server's own WebSocket listener — the NATS client protocol over WebSocket
  (`CONNECT`, `SUB`, `PING`/`PONG`; JetStream through `$JS.API` requests and pull batches).

Cheap per message, so that the client is not what is measured: a frame is never split into
messages or JSON-parsed (except `kv_msg`s, a few per run). Every benchmark message carries
`"run":R,"seq":N` exactly once (the payload is our own compact JSON; R numbers the measured
windows, so a straggler of an earlier window is never counted), so counting that marker with
`bytes.count` counts messages in every mode (peer frames may cut a NATS message in two: a
carry-over of the marker's length less one byte covers that). The `seq` of the last message
of each frame is parsed to count sequence holes and reordering; in latency mode that message's
send timestamp `ts` too. The process's own
CPU time over each measured window is reported so that a client bottleneck is visible.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import sys
import time
from typing import Any

import uvloop
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

SEQ = b'"seq":'
TS = b'"ts":'
JS_MARK = b'"js_msg"'
APP_PING = b'"op":"ping"'
PEER_CONNECT = b'CONNECT {"verbose":false,"pedantic":false,"protocol":1}\r\n'


_tasks: set[asyncio.Task[None]] = set()
last_frame = 0.0  # monotonic time of the last frame on any connection


def background(coro: Any) -> None:
    task = asyncio.get_running_loop().create_task(coro)
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Run:
    """One measured window over a group: every connection expects `expect` messages."""

    def __init__(self, conns: list[Conn], expect: int, latency: bool, marker: bytes) -> None:
        self.expect = expect
        self.latency = latency
        self.marker = marker
        self.seq_marker = SEQ if marker == JS_MARK else marker
        self.samples: list[float] = []
        self.remaining = sum(1 for c in conns if not c.closed)
        self.done = asyncio.Event()
        self.t_done = 0.0
        self.cpu0 = cpu_seconds()
        self.cpu1: float | None = None
        if self.remaining == 0:
            self._finish()

    def conn_done(self) -> None:
        self.remaining -= 1
        if self.remaining <= 0:
            self._finish()

    def _finish(self) -> None:
        self.t_done = time.time()
        self.cpu1 = cpu_seconds()
        self.done.set()


class Conn:
    __slots__ = (
        "batch",
        "closed",
        "count",
        "done",
        "frames",
        "holes",
        "kv",
        "last_seq",
        "max_seq",
        "mode",
        "pending_name",
        "pull_inbox",
        "pull_name",
        "pull_stream",
        "reader",
        "reordered",
        "reply",
        "requested",
        "run",
        "t_last",
        "tail",
        "ws",
    )

    def __init__(self, ws: ClientConnection, mode: str) -> None:
        self.ws = ws
        self.mode = mode
        self.closed = False
        self.run: Run | None = None
        self.tail = b""
        self.kv: KvWatch | None = None
        self.pull_name = ""
        self.pull_inbox = ""
        self.requested = 0
        self.batch = 0
        self.pull_stream = ""
        self.pending_name = ""
        # ours: a request waiting for its ok/error: (inbox, its bytes in a frame, future)
        self.reply: tuple[str, bytes, asyncio.Future[str | None]] | None = None
        self.reset()

    def reset(self) -> None:
        self.count = 0
        self.frames = 0
        self.last_seq = -1
        self.max_seq = -1
        self.holes = 0
        self.reordered = 0
        self.done = False
        self.t_last = 0.0
        self.tail = b""

    def start_reader(self) -> None:
        self.reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        recv = self.ws.recv
        try:
            while True:
                frame = await recv(decode=False)
                self.on_frame(frame)  # type: ignore[arg-type]
        except ConnectionClosed:
            pass
        finally:
            self.closed = True
            if self.reply is not None and not self.reply[2].done():
                self.reply[2].set_result("closed before the reply")
            run = self.run
            if run is not None and not self.done:
                self.done = True
                run.conn_done()

    def on_frame(self, frame: bytes) -> None:
        global last_frame
        last_frame = time.monotonic()
        if self.reply is not None and self.reply[1] in frame:
            self._on_reply(frame)
        mode = self.mode
        run = self.run
        if mode == "peer":
            buf = self.tail + frame
            # a marker cut by the frame boundary: keep one byte less than the marker
            self.tail = buf[-(len(run.marker) - 1) :] if run is not None else b""
            if b"PING\r\n" in frame:
                background(self._send(b"PONG\r\n"))
            if self.pull_name == "" and self.pull_inbox and b"consumer_create_response" in frame:
                self._peer_created(frame)
        else:
            buf = frame
            if mode == "ours" and APP_PING in frame:
                background(self._send(b'{"op":"pong"}'))
        if self.kv is not None:
            self.kv.on_frame(self, frame)
            return
        if run is None or self.done:
            return
        n = buf.count(run.marker)
        if not n:
            return
        now = time.time()
        self.count += n
        self.frames += 1
        self.t_last = now
        i = buf.rfind(run.seq_marker)
        start = i + len(run.seq_marker)
        j = buf.find(b",", start, start + 24)
        if i >= 0 and j > 0:
            seq = int(buf[start:j])
            if seq <= self.last_seq:
                self.reordered += 1
            else:
                # messages the sequence says came before this frame's last, minus those counted
                self.holes += max(0, (seq - self.last_seq) - n)
                self.last_seq = seq
            if seq > self.max_seq:
                self.max_seq = seq
        if run.latency and i >= 0:
            k = buf.find(TS, i)  # the send time of that same message
            e = buf.find(b",", k + 5, k + 40)
            if k >= 0 and e > 0:
                run.samples.append(now - float(buf[k + 5 : e]))
        if self.batch and self.count >= self.requested and self.count < run.expect:
            self.requested += self.batch
            background(self._send(self._pull()))
        if self.count >= run.expect:
            self.done = True
            run.conn_done()

    def _on_reply(self, frame: bytes) -> None:
        """The ok (None) or error (its text) answering the pending request; a frame holds
        one envelope per line."""
        assert self.reply is not None
        inbox, _, fut = self.reply
        for line in frame.split(b"\n"):
            try:
                env = json.loads(line)
            except ValueError:
                continue
            if env.get("inbox") == inbox and env.get("op") in ("ok", "error"):
                self.reply = None
                if not fut.done():
                    fut.set_result(
                        None if env["op"] == "ok" else line[:300].decode(errors="replace")
                    )
                return

    async def _send(self, data: bytes) -> None:
        try:
            await self.ws.send(data, text=self.mode == "ours")
        except ConnectionClosed:
            pass

    # ---- peer JetStream: a named pull consumer per connection, batches of `batch`

    def _pull(self) -> bytes:
        body = b'{"batch":%d}' % self.batch
        subj = f"$JS.API.CONSUMER.MSG.NEXT.{self.pull_stream}.{self.pull_name}".encode()
        return b"PUB %s %s %d\r\n%s\r\n" % (subj, self.pull_inbox.encode(), len(body), body)

    def _peer_created(self, frame: bytes) -> None:
        if b'"error"' in frame:
            sys.stderr.write(f"loadclient: consumer create failed: {frame[:300]!r}\n")
            return
        self.pull_name = self.pending_name
        self.requested = self.batch
        background(self._send(self._pull()))


class KvWatch:
    """Arrival times of `kv_msg` puts per revision across a group of connections."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.seen: dict[int, list[float]] = {}
        self.events: dict[int, asyncio.Event] = {}
        self.synced = 0
        self.all_synced = asyncio.Event()

    def on_frame(self, conn: Conn, frame: bytes) -> None:
        if b"kv_msg" not in frame:
            if b'"error"' in frame:
                sys.stderr.write(f"loadclient: {frame[:300]!r}\n")
            return
        now = time.time()
        for line in frame.split(b"\n"):
            env = json.loads(line)
            if env.get("op") != "kv_msg":
                continue
            data = env["data"]
            if data["op"] == "synced":
                self.synced += 1
                if self.synced >= self.n:
                    self.all_synced.set()
            elif data["op"] == "put":
                times = self.seen.setdefault(data["revision"], [])
                times.append(now)
                if len(times) >= self.n:
                    self.event(data["revision"]).set()

    def event(self, revision: int) -> asyncio.Event:
        return self.events.setdefault(revision, asyncio.Event())


class Client:
    def __init__(self) -> None:
        self.groups: dict[str, list[Conn]] = {}
        self.runs: dict[str, Run] = {}
        self.kv: dict[str, KvWatch] = {}
        self.opened = 0

    # ---------------------------------------------------------------- connections

    async def _open_one(self, p: dict[str, Any]) -> Conn:
        mode = p["mode"]
        headers = {"Authorization": f"Bearer {p['token']}"} if p.get("token") else None
        # `local`: source addresses (127.0.0.x) taken in turn, past one's ephemeral ports
        local = p.get("local") or []
        extra = {"local_addr": (local[self.opened % len(local)], 0)} if local else {}
        self.opened += 1
        ws = await connect(
            p["url"],
            **extra,
            additional_headers=headers,
            compression=None,
            max_size=None,
            ping_interval=None,
            open_timeout=60,
            close_timeout=2,
        )
        try:
            first = await ws.recv(decode=False)
            if mode == "ours":
                if b"cap_update" not in first:  # type: ignore[operator]
                    raise RuntimeError(f"expected cap_update, got {first[:200]!r}")
                sub = p.get("sub")
                if sub:
                    await ws.send(
                        json.dumps(
                            {"op": "sub", "target": sub, "inbox": "s"}, separators=(",", ":")
                        )
                    )
                    reply = await ws.recv(decode=False)
                    if b'"ok"' not in reply:  # type: ignore[operator]
                        raise RuntimeError(f"sub refused: {reply[:200]!r}")
            elif mode == "peer":
                if not first.startswith(b"INFO"):  # type: ignore[union-attr]
                    raise RuntimeError(f"expected INFO, got {first[:200]!r}")
                sub = p.get("sub")
                msg = PEER_CONNECT + (f"SUB {sub} 1\r\n".encode() if sub else b"") + b"PING\r\n"
                await ws.send(msg)
                buf = b""
                while b"PONG" not in buf:
                    buf += await ws.recv(decode=False)  # type: ignore[operator]
                    if b"-ERR" in buf:
                        raise RuntimeError(buf[:200].decode(errors="replace"))
        except BaseException:
            await ws.close()
            raise
        return Conn(ws, mode)

    async def open(self, p: dict[str, Any]) -> dict[str, Any]:
        """Open `n` connections (at most `concurrency` handshakes in flight) into group `tag`."""
        group = self.groups.setdefault(p["tag"], [])
        sem = asyncio.Semaphore(p.get("concurrency", 64))
        failed: list[str] = []
        opened: list[Conn] = []

        async def one() -> None:
            async with sem:
                try:
                    c = await self._open_one(p)
                except Exception as e:
                    failed.append(f"{type(e).__name__}: {e}")
                    return
                opened.append(c)
                c.start_reader()

        cpu0, t0 = cpu_seconds(), time.time()
        await asyncio.gather(*(one() for _ in range(p["n"])))
        t1 = time.time()
        group.extend(opened)
        return {
            "opened": len(opened),
            "failed": len(failed),
            "errors": failed[:3],
            "t0": t0,
            "t1": t1,
            "cpu": cpu_seconds() - cpu0,
            "total": len(group),
        }

    async def quiet(self, p: dict[str, Any]) -> dict[str, Any]:
        """Wait until no frame came for `idle` seconds (at most `timeout`)."""
        t0 = time.monotonic()
        while time.monotonic() - last_frame < p["idle"] and time.monotonic() - t0 < p["timeout"]:  # noqa: ASYNC110
            await asyncio.sleep(0.2)  # polling a timestamp, bounded
        return {"waited": time.monotonic() - t0}

    async def close(self, p: dict[str, Any]) -> dict[str, Any]:
        group = self.groups.pop(p["tag"], [])
        sem = asyncio.Semaphore(256)

        async def one(c: Conn) -> None:
            async with sem:
                try:
                    await asyncio.wait_for(c.ws.close(), 5)
                except Exception:
                    c.ws.transport.abort()
                c.reader.cancel()

        await asyncio.gather(*(one(c) for c in group))
        return {"closed": len(group)}

    # ---------------------------------------------------------------- measured windows

    def arm(self, p: dict[str, Any]) -> dict[str, Any]:
        conns = self.groups.get(p["tag"], [])
        for c in conns:
            c.reset()
            c.run = None
        marker = JS_MARK if p["marker"] == "js" else p["marker"].encode()
        run = Run(conns, p["expect"], p.get("latency", False), marker)
        for c in conns:
            c.run = run
        self.runs[p["tag"]] = run
        return {"armed": len(conns)}

    async def collect(self, p: dict[str, Any]) -> dict[str, Any]:
        run = self.runs.pop(p["tag"])
        conns = self.groups.get(p["tag"], [])
        try:
            await asyncio.wait_for(run.done.wait(), p["timeout"])
        except TimeoutError:
            pass
        cpu1 = run.cpu1 if run.cpu1 is not None else cpu_seconds()
        for c in conns:
            c.run = None
        live = [c for c in conns if not c.closed]
        delivered = sum(c.count for c in conns)
        out: dict[str, Any] = {
            "conns": len(conns),
            "closed": len(conns) - len(live),
            "complete": sum(1 for c in conns if c.count >= run.expect),
            "delivered": delivered,
            "expected": run.expect * len(conns),
            "lost": sum(max(0, run.expect - c.count) for c in conns),
            "seq_holes": sum(c.holes + max(0, run.expect - 1 - c.max_seq) for c in conns),
            "reordered": sum(c.reordered for c in conns),
            "frames": sum(c.frames for c in conns),
            "t_done": run.t_done or max((c.t_last for c in conns), default=0.0),
            "timed_out": not run.done.is_set(),
            "cpu": cpu1 - run.cpu0,
        }
        if run.latency:
            out["samples"] = [round(s * 1000, 3) for s in run.samples]
        return out

    # ---------------------------------------------------------------- JetStream catch-up

    async def js_go(self, p: dict[str, Any]) -> dict[str, Any]:
        """Every connection of the group starts replaying the stream from `start_seq`."""
        conns = self.groups.get(p["tag"], [])
        stream, flt, batch = p["stream"], p["filter"], p["batch"]
        pid = os.getpid()

        async def one(i: int, c: Conn) -> None:
            if c.mode == "ours":
                req = {
                    "op": "js_sub",
                    "target": stream,
                    "inbox": "j",
                    "data": {"filter": flt, "start_seq": p["start_seq"], "batch": batch},
                }
                await c._send(json.dumps(req, separators=(",", ":")).encode())
                return
            name = f"bench_{pid}_{i}"
            c.pull_stream, c.pending_name, c.batch = stream, name, batch
            c.pull_inbox = f"_INBOX.bench.{pid}.{i}.m"
            cfg = json.dumps(
                {
                    "stream_name": stream,
                    "config": {
                        "name": name,
                        "deliver_policy": "by_start_sequence",
                        "opt_start_seq": p["start_seq"],
                        "ack_policy": "none",
                        "filter_subject": flt,
                        "inactive_threshold": 60_000_000_000,
                        "mem_storage": True,
                        "num_replicas": 1,
                    },
                },
                separators=(",", ":"),
            ).encode()
            reply = f"_INBOX.bench.{pid}.{i}.r"
            api = f"$JS.API.CONSUMER.CREATE.{stream}.{name}.{flt}"
            await c._send(
                f"SUB {reply} 2\r\nSUB {c.pull_inbox} 3\r\n".encode()
                + f"PUB {api} {reply} {len(cfg)}\r\n".encode()
                + cfg
                + b"\r\n"
            )

        t0 = time.time()
        await asyncio.gather(*(one(i, c) for i, c in enumerate(conns)))
        return {"t0": t0}

    async def js_tail(self, p: dict[str, Any]) -> dict[str, Any]:
        """Ours: every connection js_subs `stream` from its end (the default start), all with
        `filter`, or each with its own `<prefix>.<pid>.<i>`; once every ok/error is in."""
        conns = [c for c in self.groups.get(p["tag"], []) if not c.closed]
        cpu0, t0 = cpu_seconds(), time.time()
        key = b'"inbox":' + json.dumps(p["inbox"]).encode()
        loop = asyncio.get_running_loop()
        filters: list[str] = []
        errors: list[str] = []

        async def one(i: int, c: Conn) -> None:
            flt = p.get("filter") or f"{p['prefix']}.{os.getpid()}.{i}"
            fut: asyncio.Future[str | None] = loop.create_future()
            c.reply = (p["inbox"], key, fut)
            req = {
                "op": "js_sub",
                "target": p["stream"],
                "inbox": p["inbox"],
                "data": {"filter": flt},
            }
            await c._send(json.dumps(req, separators=(",", ":")).encode())
            try:
                err = await asyncio.wait_for(fut, p["timeout"])
            except TimeoutError:
                c.reply = None
                err = f"no reply within {p['timeout']} s"
            if err is None:
                filters.append(flt)
            else:
                errors.append(err)

        await asyncio.gather(*(one(i, c) for i, c in enumerate(conns)))
        return {
            "ok": len(filters),
            "errors": errors[:3],
            "filters": [] if p.get("filter") else filters,
            "t0": t0,
            "t1": time.time(),
            "cpu": cpu_seconds() - cpu0,
        }

    # ---------------------------------------------------------------- KV fan-out

    async def kv_open(self, p: dict[str, Any]) -> dict[str, Any]:
        """Open `n` connections, each `kv_sub` on one key; reply once all are synced."""
        watch = self.kv[p["tag"]] = KvWatch(p["n"])
        res = await self.open({**p, "sub": None})
        req = json.dumps(
            {"op": "kv_sub", "target": p["bucket"], "inbox": "k", "data": {"pattern": p["key"]}},
            separators=(",", ":"),
        )
        for c in self.groups[p["tag"]]:
            c.kv = watch
        watch.n = len(self.groups[p["tag"]])
        await asyncio.gather(*(c.ws.send(req) for c in self.groups[p["tag"]]))
        try:
            await asyncio.wait_for(watch.all_synced.wait(), p.get("timeout", 60))
        except TimeoutError:
            res["errors"].append(f"only {watch.synced}/{watch.n} synced")
        return res

    async def kv_wait(self, p: dict[str, Any]) -> dict[str, Any]:
        watch = self.kv[p["tag"]]
        try:
            await asyncio.wait_for(watch.event(p["revision"]).wait(), p["timeout"])
        except TimeoutError:
            pass
        times = watch.seen.get(p["revision"], [])
        return {
            "got": len(times),
            "of": watch.n,
            "first": min(times, default=0.0),
            "last": max(times, default=0.0),
        }


async def main() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 24)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    client = Client()
    handlers = {
        "open": client.open,
        "close": client.close,
        "collect": client.collect,
        "js_go": client.js_go,
        "js_tail": client.js_tail,
        "quiet": client.quiet,
        "kv_open": client.kv_open,
        "kv_wait": client.kv_wait,
    }
    while line := await reader.readline():
        p = json.loads(line)
        cmd = p.pop("cmd")
        try:
            if cmd == "arm":
                res = client.arm(p)
            elif cmd == "cpu":
                res = {"cpu": cpu_seconds()}
            elif cmd == "exit":
                break
            else:
                res = await handlers[cmd](p)
        except Exception as e:
            res = {"error": f"{type(e).__name__}: {e}"}
        sys.stdout.write(json.dumps(res) + "\n")
        sys.stdout.flush()
    os._exit(0)  # the open sockets go with the process


if __name__ == "__main__":
    uvloop.run(main())
