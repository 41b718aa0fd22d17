// SyncClient against a scripted fake WebSocket: subscribe, route, reconnect, resume, revoke.
import { test } from "node:test";
import assert from "node:assert/strict";

import { ApiError, createApi } from "../src/index.js";
import { CAPS, FakeSocket, client, connected, tick, until } from "./fakes.mjs";

test("subscriptions are sent after cap_update, and fan-out reaches every matching one", async () => {
  const c = client();
  const a = [];
  const b = [];
  c.subscribe("chat.room.*", (p) => a.push(p));
  c.subscribe("chat.room.1", (p) => b.push(p));
  const ws = await connected(c);
  const subs = ws.ops("sub");
  assert.deepEqual(subs.map((e) => e.target), ["chat.room.*", "chat.room.1"]);
  assert.equal(new Set(subs.map((e) => e.inbox)).size, 2, "one inbox per subscription");
  // One batched frame: two oks and two messages (the server sends each message once).
  ws.frame(
    { op: "ok", inbox: subs[0].inbox, target: "chat.room.*" },
    { op: "ok", inbox: subs[1].inbox, target: "chat.room.1" },
    { op: "sub_msg", target: "chat.room.1", data: { payload: { n: 1 } } },
    { op: "sub_msg", target: "chat.room.2", data: { payload: { n: 2 } } },
  );
  assert.deepEqual(a, [{ n: 1 }, { n: 2 }]);
  assert.deepEqual(b, [{ n: 1 }]);
  assert.equal(c.user, "u1");
  assert.ok(c.allows("sub", "chat.room.x"));
  c.close();
  assert.equal(c.state, "closed");
});

test("a KV store loads, syncs, applies changes, and seen() waits for a revision", async () => {
  const c = client();
  const store = c.kv("todos", { pattern: "user.u1.>", decode: (v) => v.title });
  assert.equal(store.state, "connecting");
  const ws = await connected(c);
  const [req] = ws.ops("kv_sub");
  assert.deepEqual(req.data, { pattern: "user.u1.>" });
  assert.equal(store.state, "loading");
  const changes = [];
  store.on("change", (cs) => changes.push(...cs.map((x) => `${x.op}:${x.key}`)));
  ws.frame(
    { op: "ok", inbox: req.inbox, target: "todos", data: { position: 1, recovered: false } },
    { op: "kv_msg", target: "todos", data: { key: "user.u1.a", op: "put", revision: 1, value: { title: "A" } } },
    { op: "kv_msg", target: "todos", data: { key: "user.u2.z", op: "put", revision: 2, value: { title: "Z" } } },
    { op: "kv_msg", target: "todos", inbox: req.inbox, data: { op: "synced", revision: 3 } },
  );
  assert.equal(store.state, "synced");
  assert.equal(store.revision, 3);
  assert.deepEqual([...store.values], [["user.u1.a", "A"]], "keys outside the pattern are not routed");
  let seen = null;
  store.seen(5).then((r) => (seen = r));
  await tick();
  assert.equal(seen, null);
  ws.frame({ op: "kv_msg", target: "todos", data: { key: "user.u1.b", op: "put", revision: 5, value: { title: "B" } } });
  await tick();
  assert.equal(seen, 5);
  assert.equal(await store.seen(4), 5, "an older revision is already seen");
  ws.frame({ op: "kv_msg", target: "todos", data: { key: "user.u1.a", op: "delete", revision: 6 } });
  assert.deepEqual(changes, ["put:user.u1.a", "put:user.u1.b", "delete:user.u1.a"]);
  await assert.rejects(store.seen(99, { timeout: 5 }), /timeout/);
  c.close();
});

test("after a reconnect a KV store resumes with since_revision and drops keys not re-sent", async () => {
  const c = client();
  const store = c.kv("articles");
  let ws = await connected(c);
  let [req] = ws.ops("kv_sub");
  ws.frame(
    { op: "ok", inbox: req.inbox, data: { position: 1, recovered: false } },
    { op: "kv_msg", target: "articles", data: { key: "a", op: "put", revision: 1, value: 1 } },
    { op: "kv_msg", target: "articles", data: { key: "b", op: "put", revision: 2, value: 2 } },
    { op: "kv_msg", target: "articles", inbox: req.inbox, data: { op: "synced", revision: 2 } },
  );
  const states = [];
  c.on("state", (s) => states.at(-1) !== s && states.push(s));
  ws.drop(1001, "going away");
  assert.equal(c.state, "reconnecting");
  assert.equal(store.state, "connecting");
  assert.deepEqual([...store.values.keys()], ["a", "b"], "values stay while reconnecting");
  await until(() => FakeSocket.all.length === 2, "a new socket");
  ws = await connected(c);
  [req] = ws.ops("kv_sub");
  assert.deepEqual(req.data, { pattern: ">", since_revision: 2 });
  // The server no longer has revision 3 onwards: full state, b is gone.
  ws.frame(
    { op: "ok", inbox: req.inbox, data: { position: 1, recovered: false } },
    { op: "kv_msg", target: "articles", data: { key: "a", op: "put", revision: 1, value: 1 } },
    { op: "kv_msg", target: "articles", data: { key: "c", op: "put", revision: 7, value: 3 } },
    { op: "kv_msg", target: "articles", inbox: req.inbox, data: { op: "synced", revision: 7 } },
  );
  assert.deepEqual([...store.values], [["a", 1], ["c", 3]]);
  assert.equal(store.state, "synced");
  assert.deepEqual(states, ["reconnecting", "open"]);
  assert.equal(c.connects, 2);
  c.close();
});

test("a stream de-duplicates by seq and resumes at last + 1 after a reconnect", async () => {
  const c = client();
  const got = [];
  const chat = c.stream("chat", { filter: "chat.room.a", startSeq: 1, onMessage: (m) => got.push(m.seq) });
  let ws = await connected(c);
  let [req] = ws.ops("js_sub");
  assert.deepEqual(req.data, { filter: "chat.room.a", start_seq: 1 });
  const msg = (inbox, seq) => ({ op: "js_msg", target: "chat", inbox, data: { seq, subject: "chat.room.a", payload: { seq }, time: "t" } });
  ws.frame({ op: "ok", inbox: req.inbox, data: { position: 1, recovered: true } }, msg(req.inbox, 1), msg(req.inbox, 2));
  ws.frame(msg(req.inbox, 2), msg("other-inbox", 3));
  assert.deepEqual(got, [1, 2]);
  const waiting = chat.seen(4);
  ws.drop(1006);
  await until(() => FakeSocket.all.length === 2, "a new socket");
  ws = await connected(c);
  [req] = ws.ops("js_sub");
  assert.deepEqual(req.data, { filter: "chat.room.a", start_seq: 3 });
  ws.frame({ op: "ok", inbox: req.inbox, data: { position: 3, recovered: true } }, msg(req.inbox, 3), msg(req.inbox, 4));
  assert.deepEqual(got, [1, 2, 3, 4]);
  assert.equal(await waiting, 4);
  c.close();
});

test("js_msg and synced reach only the subscription their inbox names, and none once it ended", async () => {
  const c = client();
  const a = [];
  const b = [];
  const sa = c.stream("chat", { filter: "chat.room.a", onMessage: (m) => a.push(m.seq) });
  c.stream("chat", { filter: "chat.room.a", onMessage: (m) => b.push(m.seq) });
  const store = c.kv("articles");
  const ws = await connected(c);
  const [ra, rb] = ws.ops("js_sub");
  const [rk] = ws.ops("kv_sub");
  const msg = (inbox, seq) => ({ op: "js_msg", target: "chat", inbox, data: { seq, subject: "chat.room.a", payload: { seq }, time: "t" } });
  ws.frame(
    { op: "ok", inbox: ra.inbox, data: { position: 1, recovered: true } },
    { op: "ok", inbox: rb.inbox, data: { position: 1, recovered: true } },
    { op: "ok", inbox: rk.inbox, data: { position: 1, recovered: true } },
    msg(ra.inbox, 1),
    msg(rb.inbox, 1),
    msg(rb.inbox, 2),
    { op: "kv_msg", target: "articles", inbox: ra.inbox, data: { op: "synced", revision: 1 } },
  );
  assert.deepEqual(a, [1]);
  assert.deepEqual(b, [1, 2]);
  assert.equal(store.state, "loading", "a synced with another subscription's inbox is not this store's");
  ws.frame({ op: "kv_msg", target: "articles", inbox: rk.inbox, data: { op: "synced", revision: 1 } });
  assert.equal(store.state, "synced");
  sa.close();
  ws.frame({ op: "error", inbox: rb.inbox, data: { code: "not_found", reason: "gone" } });
  ws.frame(msg(ra.inbox, 3), msg(rb.inbox, 3));
  assert.deepEqual(a, [1], "closed: nothing more");
  assert.deepEqual(b, [1, 2], "failed: nothing more");
  c.close();
});

test("ack: true acks each message once its handler finishes, and acks redeliveries", async () => {
  const c = client();
  let release;
  const gate = new Promise((r) => (release = r));
  c.stream("jobs", { ack: true, onMessage: () => gate });
  const ws = await connected(c, { streams: { jobs: [">"] } });
  const [req] = ws.ops("js_sub");
  assert.equal(req.data.ack, true);
  const m = { op: "js_msg", target: "jobs", inbox: req.inbox, data: { seq: 7, subject: "j", payload: 1, time: "t" } };
  ws.frame({ op: "ok", inbox: req.inbox, data: { position: 1, recovered: true } }, m);
  await tick();
  assert.equal(ws.ops("ack").length, 0, "not before the handler is done");
  release();
  await tick();
  assert.deepEqual(ws.ops("ack"), [{ op: "ack", target: "jobs", inbox: req.inbox, data: { seq: 7 } }]);
  ws.frame(m);
  assert.equal(ws.ops("ack").length, 2);
  c.close();
});

test("revocation empties the store and calls back; a later grant re-subscribes it", async () => {
  const c = client();
  const revoked = [];
  const store = c.kv("articles", { onRevoked: (e) => revoked.push(e.code) });
  const ws = await connected(c);
  let [req] = ws.ops("kv_sub");
  ws.frame(
    { op: "ok", inbox: req.inbox, data: { position: 1, recovered: false } },
    { op: "kv_msg", target: "articles", data: { key: "a", op: "put", revision: 1, value: 1 } },
    { op: "kv_msg", target: "articles", inbox: req.inbox, data: { op: "synced", revision: 1 } },
  );
  const without = { ...CAPS, buckets: { todos: ["user.u1.>"] } };
  const caps = [];
  c.on("capabilities", (cp, subs) => caps.push([cp, subs.length]));
  ws.frame({ op: "cap_update", data: { user: "u1", capabilities: without, revoked: [{ inbox: req.inbox, op: "kv_sub", target: "articles" }] } });
  assert.deepEqual(revoked, ["revoked"]);
  assert.equal(store.state, "error");
  assert.ok(store.revoked);
  assert.equal(store.values.size, 0);
  assert.equal(ws.ops("kv_sub").length, 1, "not re-sent while not allowed");
  assert.deepEqual(caps, [[without, 1]]);
  // A message for the revoked store that was already in flight changes nothing.
  ws.frame({ op: "kv_msg", target: "articles", data: { key: "b", op: "put", revision: 2, value: 2 } });
  assert.equal(store.values.size, 0);
  ws.frame({ op: "cap_update", data: { user: "u1", capabilities: CAPS, revoked: [] } });
  assert.equal(ws.ops("kv_sub").length, 2, "re-subscribed once allowed again");
  [, req] = ws.ops("kv_sub");
  assert.deepEqual(req.data, { pattern: ">" }, "from scratch: the revoked state was dropped");
  assert.equal(store.state, "loading");
  assert.ok(!store.revoked);
  c.close();
});

test("a forbidden subscription is an error state until the capabilities allow it", async () => {
  const c = client();
  const errors = [];
  const store = c.kv("todos", { pattern: "user.u2.>" });
  store.on("error", (e) => errors.push(e.code));
  const ws = await connected(c);
  const [req] = ws.ops("kv_sub");
  ws.frame({ op: "error", inbox: req.inbox, data: { code: "forbidden", reason: "no" } });
  assert.equal(store.state, "error");
  assert.equal(store.status, "denied");
  assert.deepEqual(errors, ["forbidden"]);
  ws.frame({ op: "cap_update", data: { user: "u1", capabilities: CAPS, revoked: [] } });
  assert.equal(ws.ops("kv_sub").length, 1, "still not allowed: not retried");
  c.close();
});

test("unavailable is retried after a backoff", async () => {
  const c = client();
  c.subscribe("chat.room.1");
  const ws = await connected(c);
  const [req] = ws.ops("sub");
  ws.frame({ op: "error", inbox: req.inbox, data: { code: "unavailable", reason: "NATS down" } });
  await until(() => ws.ops("sub").length === 2, "the retry");
  c.close();
});

test("server pings are answered with the same inbox; the client pings on its own", async () => {
  const c = client({ pingInterval: 5 });
  const ws = await connected(c);
  ws.frame({ op: "ping", inbox: "srv1" });
  assert.deepEqual(ws.ops("pong"), [{ op: "pong", inbox: "srv1" }]);
  await until(() => ws.ops("ping").length >= 2, "client pings");
  c.close();
});

test("a silent connection is dropped by the heartbeat and reconnected", async () => {
  const c = client({ pingInterval: 5, pongTimeout: 5 });
  await connected(c);
  await until(() => FakeSocket.all.length >= 2, "a reconnect after silence", 3000);
  c.close();
});

test("4401 without a refresh hook is final: unauthorized, no reconnect", async () => {
  const c = client();
  const ws = await connected(c);
  ws.frame({ op: "error", data: { code: "unauthorized", reason: "logged out" } });
  ws.drop(4401, "token revoked");
  assert.equal(c.state, "unauthorized");
  await new Promise((r) => setTimeout(r, 30));
  assert.equal(FakeSocket.all.length, 1);
  c.close();
});

test("4401 with a refresh hook refreshes the cookie and reconnects; a 401 stops", async () => {
  let calls = 0;
  let ok = true;
  const c = client({
    refresh: async () => {
      calls++;
      if (!ok) throw new ApiError(401, { title: "Unauthorized" });
      return { token: "t", expires_at: Math.floor(Date.now() / 1000) + 3600 };
    },
  });
  let ws = await connected(c);
  ws.drop(4401, "token expired");
  await until(() => FakeSocket.all.length === 2, "a reconnect after refresh");
  assert.equal(calls, 1);
  ws = await connected(c);
  ok = false;
  ws.drop(4401, "token revoked");
  await until(() => c.state === "unauthorized", "unauthorized");
  assert.equal(FakeSocket.all.length, 2);
  c.close();
});

test("failed upgrades back off and eventually ask whether we are still logged in", async () => {
  let calls = 0;
  const c = client({
    authCheckAfter: 2,
    refresh: async () => {
      calls++;
      throw new ApiError(401, {});
    },
  });
  for (let i = 0; i < 2; i++) {
    await until(() => FakeSocket.all.length === i + 1, `attempt ${i + 1}`);
    FakeSocket.last().drop(1006);
  }
  await until(() => c.state === "unauthorized", "unauthorized");
  assert.equal(calls, 1);
  c.close();
});

test("close() unsubscribes and a closed store rejects seen()", async () => {
  const c = client();
  const store = c.kv("articles");
  const ws = await connected(c);
  const [req] = ws.ops("kv_sub");
  ws.frame({ op: "ok", inbox: req.inbox, data: { position: 1, recovered: false } });
  const pending = store.seen(10);
  store.close();
  assert.deepEqual(ws.ops("unsub"), [{ op: "unsub", inbox: req.inbox }], "the inbox alone, never every sub on the target");
  await assert.rejects(pending, /closed/);
  ws.frame({ op: "kv_msg", target: "articles", data: { key: "a", op: "put", revision: 1, value: 1 } });
  assert.equal(store.values.size, 0);
  c.close();
});

test("api: JSON in and out, If-Match as a strong ETag, problem+json thrown as ApiError", async () => {
  const calls = [];
  const fetch = async (url, init) => {
    calls.push([url, init]);
    if (init.method === "PUT") {
      return new Response(JSON.stringify({ type: "urn:x:conflict", title: "Precondition Failed", status: 412, detail: "changed" }), {
        status: 412,
        headers: { "Content-Type": "application/problem+json" },
      });
    }
    if (init.method === "DELETE") return new Response(null, { status: 204 });
    return new Response(JSON.stringify({ id: "a", revision: 3 }), { status: 201, headers: { ETag: '"3"', Location: "/api/articles/a" } });
  };
  const api = createApi({ fetch });
  assert.deepEqual(await api.post("/articles", { title: "t" }), { id: "a", revision: 3 });
  assert.equal(calls[0][0], "/api/articles");
  assert.equal(calls[0][1].headers["Content-Type"], "application/json");
  assert.equal(calls[0][1].body, '{"title":"t"}');
  const full = await api.request("GET", "/articles/a");
  assert.equal(full.etag, '"3"');
  assert.equal(full.location, "/api/articles/a");
  const err = await api.put("/articles/a", { title: "u" }, { ifMatch: 3 }).catch((e) => e);
  assert.ok(err instanceof ApiError);
  assert.equal(err.status, 412);
  assert.equal(err.detail, "changed");
  assert.equal(err.type, "urn:x:conflict");
  assert.equal(calls[2][1].headers["If-Match"], '"3"');
  assert.equal(await api.del("/articles/a"), null);
  const down = createApi({ fetch: async () => { throw new TypeError("failed to fetch"); } });
  const netErr = await down.get("/x").catch((e) => e);
  assert.equal(netErr.status, 0);
});
