// Durable streams against a scripted fake WebSocket: resume on the server, dedupe by seq
// across reconnects, acks of redeliveries, taken_over, deleting the durable.
import { test } from "node:test";
import assert from "node:assert/strict";

import { FakeSocket, client, connected, tick, until } from "./fakes.mjs";

const CAPS = { streams: { chat: [">"], jobs: [">"] } };

const msg = (inbox, seq, target = "chat") => ({
  op: "js_msg",
  target,
  inbox,
  data: { seq, subject: `${target}.x`, payload: { seq }, time: "t" },
});

/** Drop the socket and wait for the next session; returns it. */
async function reconnect(c, ws) {
  const n = FakeSocket.all.length;
  ws.drop(1006);
  await until(() => FakeSocket.all.length === n + 1, "a new socket");
  return connected(c, CAPS);
}

test("a durable re-subscribes with the durable alone and drops what the app already has", async () => {
  const c = client();
  const got = [];
  const gaps = [];
  const chat = c.stream("chat", { durable: "d1", startSeq: 1, onMessage: (m) => got.push(m.seq) });
  chat.on("gap", (r) => gaps.push(r));
  chat.on("reset", (r) => gaps.push(r));
  let ws = await connected(c, CAPS);
  let [req] = ws.ops("js_sub");
  assert.deepEqual(req.data, { filter: ">", durable: "d1", start_seq: 1 });
  ws.frame({ op: "ok", inbox: req.inbox, data: { position: 1, recovered: true, durable: "created" } }, msg(req.inbox, 1), msg(req.inbox, 2), msg(req.inbox, 3));
  ws = await reconnect(c, ws);
  [req] = ws.ops("js_sub");
  assert.deepEqual(req.data, { filter: ">", durable: "d1" }, "no start option: the server knows where it stands");
  // The server resumed after its floor (2: what it had written before the drop), 3 again.
  ws.frame({ op: "ok", inbox: req.inbox, data: { position: 3, recovered: true, durable: "resumed" } }, msg(req.inbox, 3), msg(req.inbox, 4));
  assert.deepEqual(got, [1, 2, 3, 4], "3 once");
  assert.deepEqual(gaps, []);
  assert.equal(chat.lastSeq, 4);
  assert.equal(ws.ops("ack").length, 0, "no acks without ack: true");
  // Gone meanwhile (deleted, expired): created afresh, not recovered: the app must reload.
  ws = await reconnect(c, ws);
  [req] = ws.ops("js_sub");
  assert.deepEqual(req.data, { filter: ">", durable: "d1" });
  ws.frame({ op: "ok", inbox: req.inbox, data: { position: 9, recovered: false, durable: "created" } }, msg(req.inbox, 9));
  assert.equal(gaps.length, 1);
  assert.equal(gaps[0].gap, true);
  assert.equal(gaps[0].expected, 5);
  assert.deepEqual(got, [1, 2, 3, 4, 9]);
  c.close();
});

test("ack: true acks a redelivery of what the app has, once its first delivery's handler is done", async () => {
  const c = client();
  const got = [];
  const gates = new Map();
  c.stream("jobs", {
    durable: "w",
    ack: true,
    onMessage: (m) => {
      got.push(m.seq);
      return new Promise((r) => gates.set(m.seq, r));
    },
  });
  let ws = await connected(c, CAPS);
  let [req] = ws.ops("js_sub");
  ws.frame({ op: "ok", inbox: req.inbox, data: { position: 1, recovered: true, durable: "created" } }, msg(req.inbox, 1, "jobs"), msg(req.inbox, 2, "jobs"));
  gates.get(1)();
  await tick();
  assert.deepEqual(ws.ops("ack").map((a) => a.data.seq), [1]);
  // Dropped while 2 is still being handled: its ack can no longer go on the old inbox.
  ws = await reconnect(c, ws);
  [req] = ws.ops("js_sub");
  assert.deepEqual(req.data, { filter: ">", ack: true, durable: "w" });
  // Resumed after the ack floor: 1 came again too (its ack was not saved yet), then 2, then 3.
  ws.frame(
    { op: "ok", inbox: req.inbox, data: { position: 1, recovered: true, durable: "resumed" } },
    msg(req.inbox, 1, "jobs"),
    msg(req.inbox, 2, "jobs"),
    msg(req.inbox, 3, "jobs"),
  );
  assert.deepEqual(got, [1, 2, 3], "redeliveries are not handed on again");
  await tick();
  const acks = () => ws.ops("ack").map((a) => `${a.inbox}:${a.data.seq}`);
  assert.deepEqual(acks(), [`${req.inbox}:1`], "1 at once (done); 2 not while its handler runs");
  gates.get(2)();
  gates.get(3)();
  await tick();
  assert.deepEqual(acks().sort(), [`${req.inbox}:1`, `${req.inbox}:2`, `${req.inbox}:3`]);
  // A refused ack (acked already, or its ack wait expired) is no error of the stream.
  ws.frame({ op: "error", inbox: req.inbox, data: { code: "not_found", reason: "seq 1 is not awaiting an ack" } });
  ws.frame(msg(req.inbox, 4, "jobs"));
  assert.deepEqual(got, [1, 2, 3, 4], "still live");
  c.close();
});

test("ack: true hands a message whose handler failed on again when it comes again", async () => {
  const c = client();
  const got = [];
  let fail = true;
  c.stream("jobs", {
    ack: true,
    onMessage: (m) => {
      got.push(m.seq);
      return fail ? Promise.reject(new Error("busy")) : undefined;
    },
  });
  const ws = await connected(c, CAPS);
  const [req] = ws.ops("js_sub");
  ws.frame({ op: "ok", inbox: req.inbox, data: { position: 1, recovered: true } }, msg(req.inbox, 1, "jobs"));
  await tick();
  assert.equal(ws.ops("ack").length, 0, "not acked");
  fail = false;
  ws.frame(msg(req.inbox, 1, "jobs")); // the ack wait expired: the server sends it again
  await tick();
  assert.deepEqual(got, [1, 1]);
  assert.deepEqual(ws.ops("ack").map((a) => a.data.seq), [1]);
  ws.frame(msg(req.inbox, 1, "jobs"));
  await tick();
  assert.deepEqual(got, [1, 1], "done now: a duplicate");
  assert.deepEqual(ws.ops("ack").map((a) => a.data.seq), [1, 1]);
  c.close();
});

test("taken_over ends the stream and tells the app; it is never re-subscribed", async () => {
  const c = client();
  const errors = [];
  const clientErrors = [];
  const got = [];
  const chat = c.stream("chat", { durable: "d1", onMessage: (m) => got.push(m.seq) });
  chat.on("error", (e) => errors.push(e.code));
  c.on("error", (e) => clientErrors.push(e.code));
  let ws = await connected(c, CAPS);
  const [req] = ws.ops("js_sub");
  ws.frame({ op: "ok", inbox: req.inbox, data: { position: 1, recovered: true, durable: "created" } }, msg(req.inbox, 1));
  ws.frame({ op: "error", inbox: req.inbox, data: { code: "taken_over", reason: "durable taken over by another subscription" } });
  assert.deepEqual(errors, ["taken_over"]);
  assert.deepEqual(clientErrors, [], "the stream's error, not the connection's");
  assert.equal(chat.status, "failed");
  assert.equal(chat.state, "error");
  assert.deepEqual(chat.error, { code: "taken_over", reason: "durable taken over by another subscription" });
  ws.frame(msg(req.inbox, 2));
  assert.deepEqual(got, [1], "nothing more");
  await new Promise((r) => setTimeout(r, 30)); // longer than any retry backoff here
  assert.equal(ws.ops("js_sub").length, 1, "no retry");
  ws = await reconnect(c, ws);
  await new Promise((r) => setTimeout(r, 30));
  assert.equal(ws.ops("js_sub").length, 0, "not after a reconnect either: it would take the durable back");
  await assert.rejects(chat.close({ deleteDurable: true }), (e) => e.code === "taken_over", "not held here: nothing to delete");
  chat.close();
  assert.equal(ws.ops("unsub").length, 0, "ended on the server already");
  c.close();
});

test("close({deleteDurable: true}) sends unsub with delete_durable and resolves on the ok", async () => {
  const c = client();
  const chat = c.stream("chat", { durable: "d1" });
  const plain = c.stream("chat", { filter: "chat.x" });
  const ws = await connected(c, CAPS);
  const [req, preq] = ws.ops("js_sub");
  ws.frame(
    { op: "ok", inbox: req.inbox, data: { position: 1, recovered: true, durable: "created" } },
    { op: "ok", inbox: preq.inbox, data: { position: 1, recovered: true } },
  );
  let closed = 0;
  chat.on("closed", () => closed++);
  let done = false;
  const deleting = chat.close({ deleteDurable: true }).then(() => (done = true));
  assert.deepEqual(ws.ops("unsub"), [{ op: "unsub", inbox: req.inbox, data: { delete_durable: true } }]);
  assert.equal(chat.status, "closed");
  assert.equal(closed, 1);
  await tick();
  assert.equal(done, false, "not before the server confirmed");
  ws.frame({ op: "ok", inbox: req.inbox });
  await deleting;
  assert.equal(done, true);
  await assert.rejects(plain.close({ deleteDurable: true }), (e) => e.code === "bad_request");
  assert.equal(plain.status, "active", "a refused delete ends nothing");
  c.close();
});

test("a delete while reconnecting is sent once the durable is subscribed again; an error rejects it", async () => {
  const c = client();
  const chat = c.stream("chat", { durable: "d1" });
  let ws = await connected(c, CAPS);
  let [req] = ws.ops("js_sub");
  ws.frame({ op: "ok", inbox: req.inbox, data: { position: 1, recovered: true, durable: "created" } });
  const n = FakeSocket.all.length;
  ws.drop(1006);
  const deleting = chat.close({ deleteDurable: true });
  await until(() => FakeSocket.all.length === n + 1, "a new socket");
  ws = await connected(c, CAPS);
  [req] = ws.ops("js_sub");
  assert.deepEqual(ws.ops("unsub"), [], "not before the js_sub's ok");
  ws.frame({ op: "ok", inbox: req.inbox, data: { position: 1, recovered: true, durable: "resumed" } });
  assert.deepEqual(ws.ops("unsub"), [{ op: "unsub", inbox: req.inbox, data: { delete_durable: true } }]);
  ws.frame({ op: "error", inbox: req.inbox, data: { code: "unavailable", reason: "durables unavailable" } });
  await assert.rejects(deleting, (e) => e.code === "unavailable");

  // Lost with the connection before the answer: it may or may not be deleted.
  const other = c.stream("chat", { durable: "d2" });
  const [r2] = ws.ops("js_sub").slice(-1);
  ws.frame({ op: "ok", inbox: r2.inbox, data: { position: 1, recovered: true, durable: "created" } });
  const lost = other.close({ deleteDurable: true });
  ws.drop(1006);
  await assert.rejects(lost, (e) => e.code === "unavailable");
  c.close();
});
