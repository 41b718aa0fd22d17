// src/svelte.js (the stores of src/stores.js) against Svelte's store contract:
// `subscribe(run)` calls `run` at once and on each change and returns the unsubscriber; the
// client subscription lives from the first subscriber to the last unsubscribe.
import { test } from "node:test";
import assert from "node:assert/strict";

import { connection, kv, stream, subject } from "../src/svelte.js";
import { CAPS, client, connected } from "./fakes.mjs";
import { answerKv } from "./standins.mjs";

test("a kv store opens on the first subscriber, is shared, and unsubs after the last", async () => {
  const c = client();
  const ws = await connected(c);
  const todos = kv(c, "todos", { pattern: "user.u1.>" });
  assert.equal(ws.ops("kv_sub").length, 0, "nothing is sent before a subscriber");
  const seen = [];
  const stopA = todos.subscribe((v) => seen.push(v));
  assert.equal(seen[0].state, "loading", "run is called at once with the current value");
  const [req] = ws.ops("kv_sub");
  assert.deepEqual(req.data, { pattern: "user.u1.>" });
  const other = [];
  const stopB = todos.subscribe((v) => other.push(v));
  assert.equal(ws.ops("kv_sub").length, 1, "a second subscriber shares the subscription");

  answerKv(ws, req, { "user.u1.a": { title: "A" } });
  const last = todos.get();
  assert.equal(last.state, "synced");
  assert.deepEqual([...last.values], [["user.u1.a", { title: "A" }]]);
  assert.equal(seen.at(-1), last);
  assert.equal(other.at(-1), last, "every subscriber gets the same snapshot");
  assert.notEqual(seen[0].values, last.values, "a change is a new snapshot, never a mutation");

  stopA();
  stopA(); // idempotent: must not count as the other subscriber leaving
  assert.equal(ws.ops("unsub").length, 0, "one subscriber left: still subscribed");
  stopB();
  assert.deepEqual(ws.ops("unsub").map((e) => e.inbox), [req.inbox], "the last one leaving sends unsub");
  const count = seen.length;
  ws.frame({ op: "kv_msg", target: "todos", data: { key: "user.u1.b", op: "put", revision: 2, value: {} } });
  assert.equal(seen.length, count, "nothing reaches a subscriber that left");

  const again = todos.subscribe(() => {});
  assert.equal(ws.ops("kv_sub").length, 2, "subscribing again opens a new subscription");
  again();
});

test("a revoked kv store shows the error and drops its values", async () => {
  const c = client();
  const ws = await connected(c);
  const store = kv(c, "articles");
  const stop = store.subscribe(() => {});
  const [req] = ws.ops("kv_sub");
  answerKv(ws, req, { a1: { title: "t" } });
  ws.frame({
    op: "cap_update",
    data: { user: "u1", capabilities: { ...CAPS, buckets: {} }, revoked: [{ op: "kv_sub", target: "articles", inbox: req.inbox }] },
  });
  assert.equal(store.get().status, "revoked");
  assert.equal(store.get().error.code, "revoked");
  assert.equal(store.get().values.size, 0);
  stop();
});

test("a stream store keeps the last `limit` messages and empties them on a reset", async () => {
  const c = client();
  const ws = await connected(c);
  const chat = stream(c, "chat", { filter: "chat.room.a", startSeq: 1, limit: 2 });
  const stop = chat.subscribe(() => {});
  const [req] = ws.ops("js_sub");
  assert.deepEqual(req.data, { filter: "chat.room.a", start_seq: 1 }, "`limit` is not sent");
  const msg = (seq) => ({ op: "js_msg", target: "chat", inbox: req.inbox, data: { seq, subject: "chat.room.a", payload: { seq }, time: "t" } });
  ws.frame({ op: "ok", inbox: req.inbox, data: { position: 1, recovered: true } }, msg(1), msg(2), msg(3));
  assert.equal(chat.get().state, "live");
  assert.deepEqual(chat.get().messages.map((m) => m.seq), [2, 3]);
  assert.equal(chat.get().lastSeq, 3);
  // The connection drops; the stream was made again meanwhile: seqs start over.
  ws.drop(1006);
  const next = await connected(c);
  const [again] = next.ops("js_sub");
  next.frame({ op: "ok", inbox: again.inbox, data: { position: 1, recovered: false } });
  assert.deepEqual(chat.get().messages, [], "a reset empties the list");
  stop();
  assert.deepEqual(next.ops("unsub").map((e) => e.inbox), [again.inbox]);
});

test("a subject store keeps the last messages of a pattern, `last` the newest", async () => {
  const c = client();
  const ws = await connected(c);
  const rooms = subject(c, "chat.room.*", { limit: 2 });
  const stop = rooms.subscribe(() => {});
  const [req] = ws.ops("sub");
  assert.equal(req.target, "chat.room.*");
  ws.frame(
    { op: "ok", inbox: req.inbox, target: "chat.room.*" },
    { op: "sub_msg", target: "chat.room.1", data: { payload: { n: 1 } } },
    { op: "sub_msg", target: "chat.room.2", data: { payload: { n: 2 } } },
    { op: "sub_msg", target: "chat.room.3", data: { payload: { n: 3 } } },
  );
  assert.equal(rooms.get().status, "active");
  assert.deepEqual(rooms.get().messages.map((m) => m.subject), ["chat.room.2", "chat.room.3"]);
  assert.deepEqual(rooms.get().last, { subject: "chat.room.3", payload: { n: 3 } });
  stop();
  assert.equal(ws.ops("unsub").length, 1);
});

test("a store of a closed client shows the error instead of throwing", () => {
  const c = client();
  c.close();
  const store = kv(c, "todos");
  let value = null;
  store.subscribe((v) => (value = v))();
  assert.equal(value.state, "error");
  assert.equal(value.error.code, "closed");
});

test("the connection store follows the client and never closes it", async () => {
  const c = client();
  const conn = connection(c);
  const states = [];
  const stop = conn.subscribe((v) => states.push(v.state));
  await connected(c);
  assert.equal(conn.get().state, "open");
  assert.equal(conn.get().user, "u1");
  assert.deepEqual(conn.get().capabilities, CAPS);
  assert.equal(conn.get().transport, "websocket");
  stop();
  assert.equal(c.state, "open", "leaving the store leaves the client alone");
  assert.deepEqual(states, ["connecting", "open"]);
});
