// The load client of bench/run.py in Node (`ws` from npm): the same commands, modes and
// counting as bench/loadclient.py (read its docstring), at a fraction of the CPU per frame.
//
//   node bench/loadclient.js     # driven by bench/run.py: JSON commands on stdin, replies on stdout
//
// Every benchmark message carries `"run":R,"seq":N` exactly once (R numbers the measured
// windows, so stragglers of an earlier window are never counted), so counting that marker
// counts messages in every mode without splitting or parsing frames; peer frames may cut a NATS
// message in two, so the bytes either side of a frame boundary are searched too. The `seq` of
// the last message of each frame is parsed to count sequence holes and reordering, and in
// latency mode that message's send timestamp `ts`.
"use strict";

const readline = require("node:readline");
const { performance } = require("node:perf_hooks");
const WebSocket = require("ws");

const SEQ = Buffer.from('"seq":');
const TS = Buffer.from('"ts":');
const JS_MARK = Buffer.from('"js_msg"');
const APP_PING = Buffer.from('"op":"ping"');
const COMMA = 0x2c;
const PEER_CONNECT = 'CONNECT {"verbose":false,"pedantic":false,"protocol":1}\r\n';

let lastFrame = 0; // performance.now() of the last frame on any connection
const now = () => (performance.timeOrigin + performance.now()) / 1000; // epoch seconds
const cpuSeconds = () => {
  const u = process.cpuUsage();
  return (u.user + u.system) / 1e6;
};

function countOf(buf, marker) {
  let n = 0;
  let i = buf.indexOf(marker);
  while (i !== -1) {
    n++;
    i = buf.indexOf(marker, i + marker.length);
  }
  return n;
}

function numberAt(buf, i, marker, maxLen) {
  if (i < 0) return null;
  const start = i + marker.length;
  const end = buf.indexOf(COMMA, start);
  if (end < 0 || end - start > maxLen) return null;
  return Number(buf.toString("latin1", start, end));
}

class Run {
  constructor(conns, expect, latency, marker) {
    this.expect = expect;
    this.latency = latency;
    this.marker = marker;
    this.seqMarker = marker === JS_MARK ? SEQ : marker;
    this.samples = [];
    this.remaining = conns.filter((c) => !c.closed).length;
    this.cpu0 = cpuSeconds();
    this.cpu1 = null;
    this.tDone = 0;
    this.doneP = new Promise((resolve) => (this.resolve = resolve));
    this.isDone = false;
    if (this.remaining === 0) this.finish();
  }
  connDone() {
    if (--this.remaining <= 0) this.finish();
  }
  finish() {
    if (this.isDone) return;
    this.isDone = true;
    this.tDone = now();
    this.cpu1 = cpuSeconds();
    this.resolve();
  }
}

class Conn {
  constructor(ws, mode) {
    this.ws = ws;
    this.mode = mode;
    this.closed = false;
    this.run = null;
    this.kv = null;
    this.tail = Buffer.alloc(0);
    this.pullName = "";
    this.pendingName = "";
    this.pullInbox = "";
    this.pullStream = "";
    this.requested = 0;
    this.batch = 0;
    this.reply = null; // ours: a request waiting for its ok/error ({ inbox, key, resolve })
    this.reset();
    ws.on("message", (data) => this.onFrame(data));
    ws.on("close", () => {
      this.closed = true;
      if (this.reply) this.onReply(null);
      if (this.run && !this.done) {
        this.done = true;
        this.run.connDone();
      }
    });
    ws.on("error", () => {});
  }
  reset() {
    this.count = 0;
    this.frames = 0;
    this.lastSeq = -1;
    this.maxSeq = -1;
    this.holes = 0;
    this.reordered = 0;
    this.done = false;
    this.tLast = 0;
  }
  send(data) {
    if (this.ws.readyState === WebSocket.OPEN) this.ws.send(data, { binary: this.mode !== "ours" });
  }
  onFrame(buf) {
    lastFrame = performance.now();
    if (this.reply && buf.includes(this.reply.key)) this.onReply(buf);
    const run = this.run;
    let n = 0;
    if (this.mode === "peer") {
      if (buf.includes("PING\r\n")) this.send("PONG\r\n");
      if (this.pullInbox && !this.pullName && buf.includes("consumer_create_response")) {
        this.peerCreated(buf);
      }
      if (run && !this.done) {
        // a marker cut by the frame boundary: starts in the tail (one byte shorter than
        // the marker) and ends in this frame
        const keep = run.marker.length - 1;
        if (this.tail.length) {
          const edge = Buffer.concat([this.tail, buf.subarray(0, keep)]);
          let i = edge.indexOf(run.marker);
          while (i !== -1 && i < this.tail.length) {
            n++;
            i = edge.indexOf(run.marker, i + 1);
          }
        }
        this.tail = Buffer.from(buf.length >= keep ? buf.subarray(buf.length - keep)
          : Buffer.concat([this.tail, buf]).subarray(-keep));
      }
    } else if (this.mode === "ours" && buf.includes(APP_PING)) {
      this.send('{"op":"pong"}');
    }
    if (this.kv) {
      this.kv.onFrame(buf);
      return;
    }
    if (!run || this.done) return;
    n += countOf(buf, run.marker);
    if (!n) return;
    const t = now();
    this.count += n;
    this.frames++;
    this.tLast = t;
    const i = buf.lastIndexOf(run.seqMarker);
    const seq = numberAt(buf, i, run.seqMarker, 24);
    if (seq !== null) {
      if (seq <= this.lastSeq) this.reordered++;
      else {
        this.holes += Math.max(0, seq - this.lastSeq - n);
        this.lastSeq = seq;
      }
      if (seq > this.maxSeq) this.maxSeq = seq;
    }
    if (run.latency && i >= 0) {
      const ts = numberAt(buf, buf.indexOf(TS, i), TS, 32); // the send time of that message
      if (ts !== null) run.samples.push(t - ts);
    }
    if (this.batch && this.count >= this.requested && this.count < run.expect) {
      this.requested += this.batch;
      this.send(this.pull());
    }
    if (this.count >= run.expect) {
      this.done = true;
      run.connDone();
    }
  }
  // the ok (null) or error (its text) answering the pending request; frames hold one
  // envelope per line; null: the connection closed first
  onReply(buf) {
    const reply = this.reply;
    const lines = buf ? buf.toString().split("\n") : [];
    for (const line of lines) {
      let env;
      try {
        env = JSON.parse(line);
      } catch {
        continue;
      }
      if (env.inbox !== reply.inbox || (env.op !== "ok" && env.op !== "error")) continue;
      this.reply = null;
      reply.resolve(env.op === "ok" ? null : line.slice(0, 300));
      return;
    }
    if (!buf) {
      this.reply = null;
      reply.resolve("closed before the reply");
    }
  }
  // peer JetStream: a named pull consumer per connection, batches of `batch`
  pull() {
    const body = `{"batch":${this.batch}}`;
    return `PUB $JS.API.CONSUMER.MSG.NEXT.${this.pullStream}.${this.pullName} ${this.pullInbox} ${body.length}\r\n${body}\r\n`;
  }
  peerCreated(buf) {
    if (buf.includes('"error"')) {
      process.stderr.write(`loadclient: consumer create failed: ${buf.toString().slice(0, 300)}\n`);
      return;
    }
    this.pullName = this.pendingName;
    this.requested = this.batch;
    this.send(this.pull());
  }
}

class KvWatch {
  constructor(n) {
    this.n = n;
    this.seen = new Map(); // revision -> [arrival times]
    this.waiters = new Map();
    this.synced = 0;
    this.onSynced = null;
  }
  onFrame(buf) {
    if (!buf.includes("kv_msg")) {
      if (buf.includes('"error"')) process.stderr.write(`loadclient: ${buf.toString().slice(0, 300)}\n`);
      return;
    }
    const t = now();
    for (const line of buf.toString().split("\n")) {
      const env = JSON.parse(line);
      if (env.op !== "kv_msg") continue;
      const d = env.data;
      if (d.op === "synced") {
        if (++this.synced >= this.n && this.onSynced) this.onSynced();
      } else if (d.op === "put") {
        let times = this.seen.get(d.revision);
        if (!times) this.seen.set(d.revision, (times = []));
        times.push(t);
        if (times.length >= this.n && this.waiters.has(d.revision)) this.waiters.get(d.revision)();
      }
    }
  }
}

const withTimeout = (p, seconds) =>
  Promise.race([p.then(() => true), new Promise((r) => setTimeout(() => r(false), seconds * 1000))]);

class Client {
  constructor() {
    this.groups = new Map();
    this.runs = new Map();
    this.kv = new Map();
    this.opened = 0;
  }

  openOne(p) {
    const mode = p.mode;
    // `local`: source addresses (127.0.0.x) taken in turn, past one address's ephemeral ports
    const localAddress = p.local && p.local.length ? p.local[this.opened++ % p.local.length] : undefined;
    return new Promise((resolve, reject) => {
      const headers = p.token ? { Authorization: `Bearer ${p.token}` } : {};
      const ws = new WebSocket(p.url, {
        headers,
        localAddress,
        perMessageDeflate: false,
        skipUTF8Validation: true,
        handshakeTimeout: 60000,
      });
      let step = 0;
      let buf = "";
      const fail = (e) => {
        ws.removeAllListeners();
        ws.on("error", () => {});
        ws.terminate();
        reject(e instanceof Error ? e : new Error(String(e)));
      };
      ws.on("error", fail);
      ws.on("unexpected-response", (req, res) => fail(new Error(`HTTP ${res.statusCode}`)));
      ws.on("close", () => fail(new Error("closed during handshake")));
      const done = () => {
        ws.removeAllListeners();
        resolve(new Conn(ws, mode));
      };
      ws.on("message", (data) => {
        const s = data.toString("latin1");
        if (mode === "ours") {
          if (step === 0) {
            if (!s.includes("cap_update")) return fail(new Error(`expected cap_update: ${s.slice(0, 200)}`));
            if (!p.sub) return done();
            step = 1;
            ws.send(JSON.stringify({ op: "sub", target: p.sub, inbox: "s" }));
          } else if (s.includes('"ok"')) done();
          else fail(new Error(`sub refused: ${s.slice(0, 200)}`));
        } else if (mode === "peer") {
          if (step === 0) {
            if (!s.startsWith("INFO")) return fail(new Error(`expected INFO: ${s.slice(0, 200)}`));
            step = 1;
            ws.send(PEER_CONNECT + (p.sub ? `SUB ${p.sub} 1\r\n` : "") + "PING\r\n");
          } else {
            buf += s;
            if (buf.includes("-ERR")) fail(new Error(buf.slice(0, 200)));
            else if (buf.includes("PONG")) done();
          }
        } else done(); // ceiling: the first frame says we are registered
      });
    });
  }

  async open(p) {
    if (!this.groups.has(p.tag)) this.groups.set(p.tag, []);
    const group = this.groups.get(p.tag);
    const failed = [];
    const cpu0 = cpuSeconds();
    const t0 = now();
    let next = 0;
    const worker = async () => {
      while (next < p.n) {
        next++;
        try {
          group.push(await this.openOne(p));
        } catch (e) {
          failed.push(String(e.message || e));
        }
      }
    };
    await Promise.all(Array.from({ length: Math.min(p.concurrency || 64, p.n) }, worker));
    return {
      opened: p.n - failed.length, failed: failed.length, errors: failed.slice(0, 3),
      t0, t1: now(), cpu: cpuSeconds() - cpu0, total: group.length,
    };
  }

  async close(p) {
    const group = this.groups.get(p.tag) || [];
    this.groups.delete(p.tag);
    await Promise.all(group.map((c) => new Promise((resolve) => {
      if (c.closed) return resolve();
      const timer = setTimeout(() => { c.ws.terminate(); resolve(); }, 5000);
      c.ws.once("close", () => { clearTimeout(timer); resolve(); });
      c.ws.close();
    })));
    return { closed: group.length };
  }

  arm(p) {
    const conns = this.groups.get(p.tag) || [];
    for (const c of conns) {
      c.reset();
      c.run = null;
      c.tail = Buffer.alloc(0);
    }
    const run = new Run(conns, p.expect, !!p.latency, p.marker === "js" ? JS_MARK : Buffer.from(p.marker));
    for (const c of conns) c.run = run;
    this.runs.set(p.tag, run);
    return { armed: conns.length };
  }

  async collect(p) {
    const run = this.runs.get(p.tag);
    this.runs.delete(p.tag);
    const conns = this.groups.get(p.tag) || [];
    await withTimeout(run.doneP, p.timeout);
    const cpu1 = run.cpu1 !== null ? run.cpu1 : cpuSeconds();
    for (const c of conns) c.run = null;
    const sum = (f) => conns.reduce((a, c) => a + f(c), 0);
    const out = {
      conns: conns.length,
      closed: sum((c) => (c.closed ? 1 : 0)),
      complete: sum((c) => (c.count >= run.expect ? 1 : 0)),
      delivered: sum((c) => c.count),
      expected: run.expect * conns.length,
      lost: sum((c) => Math.max(0, run.expect - c.count)),
      seq_holes: sum((c) => c.holes + Math.max(0, run.expect - 1 - c.maxSeq)),
      reordered: sum((c) => c.reordered),
      frames: sum((c) => c.frames),
      t_done: run.tDone || conns.reduce((a, c) => Math.max(a, c.tLast), 0),
      timed_out: !run.isDone,
      cpu: cpu1 - run.cpu0,
    };
    if (run.latency) out.samples = run.samples.map((s) => Math.round(s * 1e6) / 1e3);
    return out;
  }

  async quiet(p) {
    const t0 = performance.now();
    while (performance.now() - lastFrame < p.idle * 1000 && performance.now() - t0 < p.timeout * 1000) {
      await new Promise((r) => setTimeout(r, 200));
    }
    return { waited: (performance.now() - t0) / 1000 };
  }

  js_go(p) {
    const conns = this.groups.get(p.tag) || [];
    const pid = process.pid;
    conns.forEach((c, i) => {
      if (c.mode === "ours") {
        c.send(JSON.stringify({
          op: "js_sub", target: p.stream, inbox: "j",
          data: { filter: p.filter, start_seq: p.start_seq, batch: p.batch },
        }));
        return;
      }
      const name = `bench_${pid}_${i}`;
      c.pullStream = p.stream;
      c.pendingName = name;
      c.batch = p.batch;
      c.pullInbox = `_INBOX.bench.${pid}.${i}.m`;
      const cfg = JSON.stringify({
        stream_name: p.stream,
        config: {
          name, deliver_policy: "by_start_sequence", opt_start_seq: p.start_seq,
          ack_policy: "none", filter_subject: p.filter, inactive_threshold: 60e9,
          mem_storage: true, num_replicas: 1,
        },
      });
      const reply = `_INBOX.bench.${pid}.${i}.r`;
      c.send(`SUB ${reply} 2\r\nSUB ${c.pullInbox} 3\r\n` +
        `PUB $JS.API.CONSUMER.CREATE.${p.stream}.${name}.${p.filter} ${reply} ${cfg.length}\r\n${cfg}\r\n`);
    });
    return { t0: now() };
  }

  // ours: every connection js_subs `stream` from its end (the default start), all with
  // `filter`, or each with its own `<prefix>.<pid>.<i>`; replies once every ok/error is in
  async js_tail(p) {
    const conns = (this.groups.get(p.tag) || []).filter((c) => !c.closed);
    const cpu0 = cpuSeconds();
    const t0 = now();
    const filters = [];
    const errors = [];
    const key = Buffer.from(`"inbox":${JSON.stringify(p.inbox)}`);
    const replies = conns.map((c, i) => {
      const filter = p.filter || `${p.prefix}.${process.pid}.${i}`;
      return new Promise((resolve) => {
        c.reply = { inbox: p.inbox, key, resolve };
        c.send(JSON.stringify({ op: "js_sub", target: p.stream, inbox: p.inbox, data: { filter } }));
      }).then((err) => (err === null ? filters.push(filter) : errors.push(err)));
    });
    await withTimeout(Promise.all(replies), p.timeout);
    for (const c of conns) {
      if (c.reply) {
        c.reply = null;
        errors.push(`no reply within ${p.timeout} s`);
      }
    }
    return {
      ok: filters.length, errors: errors.slice(0, 3), filters: p.filter ? [] : filters,
      t0, t1: now(), cpu: cpuSeconds() - cpu0,
    };
  }

  async kv_open(p) {
    const watch = new KvWatch(p.n);
    this.kv.set(p.tag, watch);
    const res = await this.open({ ...p, sub: null });
    const group = this.groups.get(p.tag);
    watch.n = group.length;
    const synced = new Promise((r) => (watch.onSynced = r));
    const req = JSON.stringify({ op: "kv_sub", target: p.bucket, inbox: "k", data: { pattern: p.key } });
    for (const c of group) {
      c.kv = watch;
      c.send(req);
    }
    if (watch.n && !(await withTimeout(synced, p.timeout || 60))) {
      res.errors.push(`only ${watch.synced}/${watch.n} synced`);
    }
    return res;
  }

  async kv_wait(p) {
    const watch = this.kv.get(p.tag);
    const have = watch.seen.get(p.revision) || [];
    if (have.length < watch.n) {
      await withTimeout(new Promise((r) => watch.waiters.set(p.revision, r)), p.timeout);
      watch.waiters.delete(p.revision);
    }
    const times = watch.seen.get(p.revision) || [];
    return {
      got: times.length, of: watch.n,
      first: times.length ? Math.min(...times) : 0, last: times.length ? Math.max(...times) : 0,
    };
  }
}

async function main() {
  const client = new Client();
  const rl = readline.createInterface({ input: process.stdin, crlfDelay: Infinity });
  for await (const line of rl) {
    if (!line.trim()) continue;
    const p = JSON.parse(line);
    const cmd = p.cmd;
    let res;
    try {
      if (cmd === "exit") break;
      else if (cmd === "cpu") res = { cpu: cpuSeconds() };
      else if (["open", "close", "arm", "collect", "js_go", "js_tail", "kv_open", "kv_wait", "quiet"].includes(cmd)) {
        res = await client[cmd](p);
      } else throw new Error(`unknown command ${cmd}`);
    } catch (e) {
      res = { error: `${e.name}: ${e.message}` };
    }
    process.stdout.write(JSON.stringify(res) + "\n");
  }
  process.exit(0);
}

main();
