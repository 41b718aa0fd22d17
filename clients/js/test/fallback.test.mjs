// SyncClient over long polling: fallback, resume, lost answers, reopen, close codes, and the
// way back to WebSocket. The test plays the server on both transports.
import { test } from "node:test";
import assert from "node:assert/strict";

import { PollingTransport } from "../src/index.js";
import { FakeSocket, client as wsClient, connected, until } from "./fakes.mjs";

/** One poll session on the fake server: numbered frames, the client's envelopes. */
class Session {
  constructor(sid) {
    this.sid = sid;
    this.frames = []; // [n, text]
    this.next = 1;
    this.sent = [];
    this.closeCode = null;
    this.closedByClient = false;
    this.waiters = new Set();
    this.gets = []; // the `after` of every GET
  }

  /** Server → client: one frame holding these envelopes. */
  push(...envs) {
    this.frames.push([this.next++, envs.map((e) => JSON.stringify(e)).join("\n")]);
    this.wake();
  }

  end(code) {
    this.closeCode = code;
    this.wake();
  }

  wake() {
    for (const w of [...this.waiters]) w();
  }

  ops(op) {
    return this.sent.filter((e) => e.op === op);
  }
}

/** The server side of /poll as a `fetch`, with the contract of ws_gateway/poll.py. */
class PollServer {
  constructor() {
    this.sessions = new Map();
    this.opened = []; // sessions in the order they were opened
    this.requests = [];
    this.loseNext = null; // (session, text) => true: that 200 answer is lost on the way
    this.lost = 0;
    this.refuseOpen = 0; // HTTP status for opens, 0 = accept
    this.fetch = (url, init = {}) => this.handle(new URL(url), init);
  }

  last() {
    return this.opened[this.opened.length - 1];
  }

  /** @returns {Promise<Response>} */
  async handle(url, init) {
    const method = init.method || "GET";
    const sid = url.searchParams.get("sid");
    this.requests.push(`${method} ${url.pathname}`);
    const problem = (status, body) =>
      new Response(JSON.stringify(body), { status, headers: { "Content-Type": "application/problem+json" } });
    if (url.pathname === "/poll/open") {
      if (this.refuseOpen) return problem(this.refuseOpen, { code: "unauthorized", detail: "refused" });
      assert.match(sid, /^[A-Za-z0-9_-]{16,64}$/);
      const s = new Session(sid);
      this.sessions.set(sid, s);
      this.opened.push(s);
      queueMicrotask(() => s.push({ op: "cap_update", data: { user: "u1", capabilities: CAPS, revoked: [] } }));
      return new Response(JSON.stringify({ sid, wait: 25 }), { status: 200 });
    }
    const s = this.sessions.get(sid);
    if (!s) return problem(404, { code: "unknown_session", detail: "no such session here: reopen and resume" });
    if (url.pathname === "/poll/send") {
      if (s.closeCode !== null) return problem(410, { code: "closed", close_code: s.closeCode });
      for (const line of String(init.body).split("\n")) s.sent.push(JSON.parse(line));
      return new Response(null, { status: 204 });
    }
    if (url.pathname === "/poll/close") {
      s.closedByClient = true;
      s.end(1000);
      return new Response(null, { status: 204 });
    }
    assert.equal(url.pathname, "/poll");
    const after = Number(url.searchParams.get("after"));
    s.gets.push(after);
    s.frames = s.frames.filter(([n]) => n > after); // acknowledged
    if (!s.frames.length && s.closeCode === null) {
      await new Promise((resolve, reject) => {
        const wake = () => {
          s.waiters.delete(wake);
          resolve();
        };
        s.waiters.add(wake);
        init.signal?.addEventListener("abort", () => {
          s.waiters.delete(wake);
          reject(new DOMException("aborted", "AbortError"));
        });
      });
    }
    if (!s.frames.length && s.closeCode !== null) {
      return problem(410, { code: "closed", detail: "closed", close_code: s.closeCode });
    }
    const last = s.frames.length ? s.frames[s.frames.length - 1][0] : after;
    const text = s.frames.map(([, t]) => t).join("\n");
    if (this.loseNext && this.loseNext(s, text)) {
      this.loseNext = null;
      this.lost++;
      throw new TypeError("Failed to fetch"); // the server did it all; the answer never arrived
    }
    return new Response(text, { status: 200, headers: { "Poll-Last-Frame": String(last) } });
  }
}

/** What every session of these tests grants, over polling and over WebSocket. */
const CAPS = {
  subjects: ["chat.room.*"],
  buckets: { articles: [">"] },
  streams: { chat: [">"] },
  commands: [],
};

/** A client that polls `server` once WebSocket fails (closed after the test). */
function client(server, extra = {}) {
  return wsClient({ fetch: server.fetch, ...extra });
}

const jsMsg = (inbox, seq) => ({
  op: "js_msg",
  target: "chat",
  inbox,
  data: { seq, subject: "chat.room.a", payload: { seq }, time: "t" },
});
const kvPut = (key, revision) => ({ op: "kv_msg", target: "articles", data: { key, op: "put", revision, value: revision } });

/** A client on polling with a stream and a store, synced; returns what the test needs. */
async function onPolling(extra = {}) {
  const server = new PollServer();
  FakeSocket.refuse = true;
  const c = client(server, extra);
  const got = [];
  const chat = c.stream("chat", { filter: "chat.room.a", startSeq: 1, onMessage: (m) => got.push(m.seq) });
  const store = c.kv("articles");
  await until(() => server.last()?.ops("js_sub").length === 1 && server.last().ops("kv_sub").length === 1, "subs over polling");
  const s = server.last();
  const [js] = s.ops("js_sub");
  const [kv] = s.ops("kv_sub");
  s.push(
    { op: "ok", inbox: js.inbox, data: { position: 1, recovered: true } },
    { op: "ok", inbox: kv.inbox, data: { position: 1, recovered: true } },
    kvPut("a", 1),
    { op: "kv_msg", target: "articles", inbox: kv.inbox, data: { op: "synced", revision: 1 } },
    jsMsg(js.inbox, 1),
  );
  await until(() => got.length === 1 && store.state === "synced", "first data over polling");
  return { server, c, got, chat, store, s, js, kv };
}

test("three failed WebSocket opens fall back to polling; every subscription resumes there", async () => {
  const server = new PollServer();
  const c = client(server);
  const got = [];
  const transports = [];
  c.on("transport", (t, d) => transports.push([t, d.previous]));
  c.stream("chat", { filter: "chat.room.a", startSeq: 1, onMessage: (m) => got.push(m.seq) });
  const store = c.kv("articles");
  const ws = await connected(c, CAPS);
  assert.equal(c.transport, "websocket");
  const [js] = ws.ops("js_sub");
  const [kv] = ws.ops("kv_sub");
  ws.frame(
    { op: "ok", inbox: js.inbox, data: { position: 1, recovered: true } },
    { op: "ok", inbox: kv.inbox, data: { position: 1, recovered: false } },
    kvPut("a", 4),
    { op: "kv_msg", target: "articles", inbox: kv.inbox, data: { op: "synced", revision: 4 } },
    jsMsg(js.inbox, 1),
    jsMsg(js.inbox, 2),
  );
  // The network starts refusing WebSocket: the live one drops, three new ones fail.
  FakeSocket.refuse = true;
  ws.close(1006);
  await until(() => server.opened.length === 1, "a poll session");
  assert.equal(FakeSocket.all.length, 4, "the first socket and three failed ones");
  const s = server.last();
  await until(() => s.ops("js_sub").length === 1 && s.ops("kv_sub").length === 1, "subs resent over polling");
  assert.equal(c.state, "open");
  assert.equal(c.transport, "polling");
  assert.deepEqual(transports, [["polling", "websocket"]]);
  assert.deepEqual(s.ops("js_sub")[0].data, { filter: "chat.room.a", start_seq: 3 }, "resume at last + 1");
  assert.deepEqual(s.ops("kv_sub")[0].data, { pattern: ">", since_revision: 4 });
  const [js2] = s.ops("js_sub");
  s.push({ op: "ok", inbox: js2.inbox, data: { position: 3, recovered: true } }, jsMsg(js2.inbox, 3));
  await until(() => got.length === 3, "a message over polling");
  assert.deepEqual(got, [1, 2, 3]);
  assert.equal(store.get("a"), 4);
  c.close();
  await until(() => s.closedByClient, "POST /poll/close");
});

test("a WebSocket constructor that throws counts as a failed open too", async () => {
  const server = new PollServer();
  FakeSocket.throws = true;
  const c = client(server);
  await until(() => c.state === "open", "open over polling");
  assert.equal(c.transport, "polling");
  assert.equal(server.opened.length, 1);
});

test("a lost poll answer is fetched again: nothing lost, nothing twice", async () => {
  const { server, got, s, js } = await onPolling();
  server.loseNext = (sess, text) => text.includes('"seq":3');
  s.push(jsMsg(js.inbox, 2));
  await until(() => got.length === 2, "seq 2");
  s.push(jsMsg(js.inbox, 3), jsMsg(js.inbox, 4));
  await until(() => server.lost === 1, "the answer lost");
  s.push(jsMsg(js.inbox, 5));
  await until(() => got.length === 5, "seqs 3-5", 3000);
  assert.deepEqual(got, [1, 2, 3, 4, 5]);
  // The GET after the lost one asked for the same frames again.
  const afterLost = s.gets.slice(-3);
  assert.equal(afterLost[0], afterLost[1], `the same after twice: ${s.gets}`);
  assert.equal(server.opened.length, 1, "the same session all along");
});

test("404 unknown_session reopens with a new sid and resumes", async () => {
  const { server, c, got, store, s } = await onPolling();
  let states = [];
  c.on("state", (st) => states.push(st));
  server.sessions.delete(s.sid); // the gateway holding it went away
  s.wake();
  await until(() => server.opened.length === 2, "a new session");
  const s2 = server.last();
  assert.notEqual(s2.sid, s.sid);
  await until(() => s2.ops("js_sub").length === 1 && s2.ops("kv_sub").length === 1, "resubscribed");
  assert.deepEqual(s2.ops("js_sub")[0].data, { filter: "chat.room.a", start_seq: 2 });
  assert.deepEqual(s2.ops("kv_sub")[0].data, { pattern: ">", since_revision: 1 });
  assert.equal(c.transport, "polling");
  assert.deepEqual(states.filter((x, i) => x !== states[i - 1]), ["reconnecting", "open"]);
  const [js] = s2.ops("js_sub");
  s2.push({ op: "ok", inbox: js.inbox, data: { position: 2, recovered: true } }, jsMsg(js.inbox, 1), jsMsg(js.inbox, 2));
  await until(() => got.length === 2, "seq 2");
  assert.deepEqual(got, [1, 2], "a redelivered seq is dropped");
  assert.equal(store.state, "loading");
});

test("410 with 4401 asks the refresh hook, then reopens; 410 with 4403 is final", async () => {
  let calls = 0;
  const { server, c, s } = await onPolling({
    refresh: async () => {
      calls++;
      return { token: "t", expires_at: Math.floor(Date.now() / 1000) + 3600 };
    },
  });
  const before = calls; // three failed WebSocket opens asked once already (authCheckAfter)
  s.push({ op: "error", data: { code: "token_expired", reason: "expired" } });
  s.end(4401);
  await until(() => server.opened.length === 2, "reopened after refresh");
  assert.equal(calls, before + 1);
  assert.equal(server.last().sid !== s.sid, true);
  await until(() => c.state === "open", "open again");
  const details = [];
  c.on("state", (st, d) => details.push([st, d.code]));
  server.last().end(4403);
  await until(() => c.state === "unauthorized", "unauthorized");
  assert.deepEqual(details, [["unauthorized", 4403]]);
  await new Promise((r) => setTimeout(r, 20));
  assert.equal(server.opened.length, 2, "no reopen after 4403");
});

test("a 401 at open is 4401: no refresh hook means signed out", async () => {
  const server = new PollServer();
  server.refuseOpen = 401;
  FakeSocket.refuse = true;
  const c = client(server);
  await until(() => c.state === "unauthorized", "unauthorized");
  assert.equal(server.opened.length, 0);
});

test("when polling fails too, WebSocket is tried again and taken when it works", async () => {
  const server = new PollServer();
  server.refuseOpen = 502;
  FakeSocket.refuse = true;
  const c = client(server);
  await until(() => server.requests.filter((r) => r === "POST /poll/open").length === 2, "two poll opens");
  FakeSocket.refuse = false;
  server.refuseOpen = 0;
  await until(() => FakeSocket.last()?.readyState === 1, "a WebSocket attempt that opens", 3000);
  await connected(c, CAPS);
  assert.equal(c.transport, "websocket");
});

test("on polling, a WebSocket is tried every probeInterval; the session moves to it", async () => {
  const { server, c, got, store, s, js } = await onPolling({ probeInterval: 30 });
  const transports = [];
  c.on("transport", (t) => transports.push(t));
  const states = [];
  c.on("state", (st) => states.push(st));
  // The first tries fail: the polling session goes on undisturbed.
  await until(() => FakeSocket.all.length >= 5, "two probes", 3000);
  s.push(jsMsg(js.inbox, 2));
  await until(() => got.length === 2, "seq 2 over polling");
  assert.equal(c.transport, "polling");
  // WebSocket works again: the next probe gets its cap_update and the session moves.
  FakeSocket.refuse = false;
  await until(() => FakeSocket.last()?.readyState === 1, "a probe that opens", 3000);
  const ws = FakeSocket.last();
  assert.equal(ws.sent.length, 0, "nothing sent on a probe before it is taken");
  ws.frame({ op: "cap_update", data: { user: "u1", capabilities: CAPS, revoked: [] } });
  assert.equal(c.transport, "websocket");
  assert.deepEqual(transports, ["websocket"]);
  assert.deepEqual(states, [], "the app saw no disconnection");
  await until(() => s.closedByClient, "the poll session closed");
  assert.deepEqual(ws.ops("js_sub")[0].data, { filter: "chat.room.a", start_seq: 3 });
  assert.deepEqual(ws.ops("kv_sub")[0].data, { pattern: ">", since_revision: 1 });
  const [js2] = ws.ops("js_sub");
  ws.frame({ op: "ok", inbox: js2.inbox, data: { position: 3, recovered: true } }, jsMsg(js2.inbox, 3));
  assert.deepEqual(got, [1, 2, 3]);
  assert.equal(store.get("a"), 1);
  assert.equal(c.connects, 2);
  const probes = FakeSocket.all.length;
  await new Promise((r) => setTimeout(r, 80));
  assert.equal(FakeSocket.all.length, probes, "no more probes once on WebSocket");
});

test("retryWebSocket() tries at once; a probe that never says cap_update is given up", async () => {
  const { c, s, js, got } = await onPolling({ probeInterval: 0, probeTimeout: 20 });
  FakeSocket.refuse = false;
  assert.equal(c.retryWebSocket(), true);
  assert.equal(c.retryWebSocket(), false, "one try at a time");
  await until(() => FakeSocket.last()?.readyState === 1, "the probe opens");
  const probe = FakeSocket.last();
  await until(() => probe.readyState === 3, "given up after probeTimeout");
  assert.equal(c.transport, "polling");
  s.push(jsMsg(js.inbox, 2));
  await until(() => got.length === 2, "polling still delivers");
});

test("leaving the page closes the polling session on the server, and comes back if shown again", async () => {
  const { server, c, s } = await onPolling();
  c._onPageHide(); // what the pagehide event calls
  await until(() => s.closedByClient, "POST /poll/close");
  await until(() => server.opened.length === 2 && c.state === "open", "back from the bfcache: a new session");
});

test("client envelopes keep their order; those queued during a send go in one POST", async () => {
  const { server, c, s } = await onPolling();
  const before = server.requests.filter((r) => r === "POST /poll/send").length;
  for (let i = 0; i < 5; i++) c.subscribe(`chat.room.r${i}`);
  await until(() => s.ops("sub").length === 5, "five subs");
  assert.deepEqual(s.ops("sub").map((e) => e.target), [0, 1, 2, 3, 4].map((i) => `chat.room.r${i}`));
  const posts = server.requests.filter((r) => r === "POST /poll/send").length - before;
  assert.ok(posts <= 2, `${posts} POSTs for 5 envelopes`);
});

test("PollingTransport: repeated network failures end the session with 1006", async () => {
  let gets = 0;
  const fetch = async (url, init) => {
    if (url.includes("/open")) return new Response("{}", { status: 200 });
    if (url.includes("/close")) return new Response(null, { status: 204 });
    gets++;
    throw new TypeError("offline");
  };
  const t = new PollingTransport("http://x/poll", { fetch, retries: 2, retryDelay: 1 });
  const closed = new Promise((r) => (t.onclose = (code, reason) => r([code, reason])));
  const [code, reason] = await closed;
  assert.equal(code, 1006);
  assert.match(reason, /3 times/);
  assert.equal(gets, 3);
  assert.equal(t.cursor.after, 0);
});


test("with a token and no WebSocket that carries it, the client polls with the token as a bearer", async () => {
  const server = new PollServer();
  /** @type {[string, string | undefined][]} */
  const auth = [];
  const fetch = (url, init = {}) => {
    auth.push([new URL(url).pathname, init.headers?.Authorization]);
    return server.fetch(url, init);
  };
  const c = client(server, { fetch, token: "tok1", WebSocket: undefined, refresh: async () => ({ token: "tok2" }) });
  await until(() => c.state === "open", "open over polling");
  assert.equal(c.transport, "polling");
  assert.equal(FakeSocket.all.length, 0, "no WebSocket tried: it could not carry the token");
  assert.ok(auth.length >= 2 && auth.every(([, a]) => a === "Bearer tok1"), JSON.stringify(auth));
  // The token expires (4401): the refresh hook's new token is the one the next session sends.
  server.last().end(4401);
  await until(() => server.opened.length === 2 && c.state === "open", "reopened after the refresh");
  const opens = auth.filter(([path]) => path === "/poll/open").map(([, a]) => a);
  assert.deepEqual(opens, ["Bearer tok1", "Bearer tok2"]);
  assert.equal(c.token, "tok2");
});
