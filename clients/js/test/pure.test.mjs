// The client's pure parts: frames, wildcards, routing, backoff, resume bookkeeping.
import { test } from "node:test";
import assert from "node:assert/strict";

import {
  KvBook,
  StreamBook,
  allows,
  backoffDelay,
  isSubset,
  match,
  recipients,
  splitFrame,
  validPattern,
} from "../src/index.js";

test("splitFrame splits batched envelopes on newlines and skips blank lines", () => {
  const frame =
    '{"op":"kv_msg","target":"b","data":{"key":"k","op":"put","revision":1,"value":1}}\n' +
    '\n{"op":"kv_msg","target":"b","inbox":"c1","data":{"op":"synced","revision":1}}\n';
  const envs = splitFrame(frame);
  assert.equal(envs.length, 2);
  assert.equal(envs[0].data.key, "k");
  assert.equal(envs[1].inbox, "c1");
});

test("splitFrame reports a bad line and keeps the good ones", () => {
  const bad = [];
  const envs = splitFrame('{"op":"ping"}\nnot json\n[1]\n{"nop":1}\n{"op":"pong"}', (line) => bad.push(line));
  assert.deepEqual(envs.map((e) => e.op), ["ping", "pong"]);
  assert.deepEqual(bad, ["not json", "[1]", '{"nop":1}']);
});

test("splitFrame of a single envelope (no newline) is that envelope", () => {
  assert.deepEqual(splitFrame('{"op":"cap_update","data":{}}'), [{ op: "cap_update", data: {} }]);
});

test("match: * is exactly one token, > one or more trailing tokens", () => {
  const cases = [
    ["a.b.c", "a.b.c", true],
    ["a.b.c", "a.b", false],
    ["a.b", "a.b.c", false],
    ["a.*.c", "a.b.c", true],
    ["a.*.c", "a.b.d", false],
    ["a.*", "a.b.c", false],
    ["a.*", "a", false],
    ["a.>", "a.b", true],
    ["a.>", "a.b.c.d", true],
    ["a.>", "a", false],
    [">", "a", true],
    [">", "a.b", true],
    ["*", "a", true],
    ["*", "a.b", false],
    ["*.*", "a.b", true],
    ["*.>", "a", false],
    ["*.>", "a.b", true],
    ["user.u1.>", "user.u1.x", true],
    ["user.u1.>", "user.u12.x", false],
    ["user.u1.>", "user.u1", false],
    ["chat.room.*", "chat.room.general", true],
    ["chat.room.*", "chat.rooms.general", false],
  ];
  for (const [p, s, want] of cases) assert.equal(match(p, s), want, `${p} ~ ${s}`);
});

test("isSubset follows the capability rule and agrees with match", () => {
  const cases = [
    ["chat.room.*", "chat.>", true],
    ["chat.>", "chat.room.*", false],
    ["chat.room.1", "chat.room.*", true],
    ["chat.room.*", "chat.room.*", true],
    ["chat.room.>", "chat.room.*", false],
    ["a.*", "*.*", true],
    ["a.b", "a.b.c", false],
    ["a.b.c", "a.b", false],
    [">", ">", true],
    ["a", ">", true],
    [">", "a.>", false],
    ["a.>", ">", true],
    ["user.u1.>", "user.u1.>", true],
    ["user.u2.>", "user.u1.>", false],
  ];
  for (const [a, b, want] of cases) assert.equal(isSubset(a, b), want, `${a} ⊆ ${b}`);
  // Whenever a ⊆ b, every subject matched by a is matched by b.
  const toks = ["a", "b", "*", ">"];
  const subjects = [];
  for (const x of ["a", "b", "c"]) {
    subjects.push(x);
    for (const y of ["a", "b", "c"]) {
      subjects.push(`${x}.${y}`);
      for (const z of ["a", "b"]) subjects.push(`${x}.${y}.${z}`);
    }
  }
  const patterns = [];
  for (const x of toks) {
    patterns.push(x);
    for (const y of toks) patterns.push(`${x}.${y}`);
  }
  for (const a of patterns.filter(validPattern)) {
    for (const b of patterns.filter(validPattern)) {
      const sub = subjects.every((s) => !match(a, s) || match(b, s));
      assert.equal(isSubset(a, b), sub, `${a} ⊆ ${b}`);
    }
  }
});

test("validPattern refuses what the server refuses", () => {
  for (const ok of ["a", "a.b", "*", ">", "a.*.c", "a.>", "user.u1.>"]) assert.ok(validPattern(ok), ok);
  for (const bad of ["", ".a", "a.", "a..b", "a.>.b", "a*", "a.b>", "a b", "a\tb", "a.\n"]) {
    assert.ok(!validPattern(bad), JSON.stringify(bad));
  }
});

test("allows mirrors the server's subset checks on names and patterns", () => {
  const caps = {
    subjects: ["chat.room.*", "articles.>"],
    buckets: { todos: ["user.u1.>"], articles: [">"] },
    streams: { chat: [">"] },
    commands: ["articles.create", "chat.send"],
  };
  assert.ok(allows(caps, "sub", "chat.room.1"));
  assert.ok(allows(caps, "sub", "chat.room.*"));
  assert.ok(!allows(caps, "sub", "chat.>"));
  assert.ok(allows(caps, "kv_sub", "todos", "user.u1.>"));
  assert.ok(!allows(caps, "kv_sub", "todos", "user.u2.>"));
  assert.ok(!allows(caps, "kv_sub", "todos", ">"));
  assert.ok(allows(caps, "kv_sub", "articles"));
  assert.ok(!allows(caps, "kv_sub", "other"));
  assert.ok(allows(caps, "js_sub", "chat", "chat.room.x"));
  assert.ok(allows(caps, "cmd", "chat.send"));
  assert.ok(!allows(caps, "cmd", "users.manage"));
  const admin = { subjects: [">"], buckets: { "*": [">"] }, streams: { "*": [">"] }, commands: [">"] };
  assert.ok(allows(admin, "kv_sub", "auth_users"));
  assert.ok(!allows(admin, "kv_sub", "auth_credentials"));
  assert.ok(!allows(admin, "sub", "$KV.x.>"));
  assert.ok(!allows(null, "sub", "a"));
});

test("recipients: fan-out by pattern to every matching subscription, the rest by inbox", () => {
  const subs = [
    { op: "sub", target: "chat.room.*", pattern: "chat.room.*", inbox: "c1" },
    { op: "sub", target: "chat.>", pattern: "chat.>", inbox: "c2" },
    { op: "sub", target: "news", pattern: "news", inbox: "c3" },
    { op: "kv_sub", target: "todos", pattern: "user.u1.>", inbox: "c4" },
    { op: "kv_sub", target: "todos", pattern: ">", inbox: "c5" },
    { op: "kv_sub", target: "articles", pattern: ">", inbox: "c6" },
    { op: "js_sub", target: "chat", pattern: ">", inbox: "c7" },
  ];
  const names = (env) => recipients(env, subs).map((s) => s.inbox);
  assert.deepEqual(names({ op: "sub_msg", target: "chat.room.1", data: { payload: 1 } }), ["c1", "c2"]);
  assert.deepEqual(names({ op: "sub_msg", target: "chat.x.y", data: {} }), ["c2"]);
  assert.deepEqual(names({ op: "sub_msg", target: "other", data: {} }), []);
  const put = { op: "kv_msg", target: "todos", data: { key: "user.u1.a", op: "put", revision: 3 } };
  assert.deepEqual(names(put), ["c4", "c5"]);
  const del = { op: "kv_msg", target: "todos", data: { key: "user.u2.a", op: "delete", revision: 4 } };
  assert.deepEqual(names(del), ["c5"]);
  const synced = { op: "kv_msg", target: "todos", inbox: "c4", data: { op: "synced", revision: 4 } };
  assert.deepEqual(names(synced), ["c4"]);
  assert.deepEqual(names({ op: "js_msg", target: "chat", inbox: "c7", data: { seq: 1 } }), ["c7"]);
  assert.deepEqual(names({ op: "ok", inbox: "c3" }), ["c3"]);
  assert.deepEqual(names({ op: "error", data: { code: "x" } }), []);
  // A sub_msg is never routed to a KV subscription whose pattern happens to match.
  assert.deepEqual(names({ op: "sub_msg", target: "user.u1.a", data: {} }), []);
});

test("backoffDelay grows exponentially, is capped, and is jittered within bounds", () => {
  const opts = { initial: 100, max: 5000, factor: 2, jitter: 0.5 };
  assert.equal(backoffDelay(0, opts, () => 0), 100);
  assert.equal(backoffDelay(0, opts, () => 1), 50);
  assert.equal(backoffDelay(3, opts, () => 0), 800);
  assert.equal(backoffDelay(30, opts, () => 0), 5000);
  assert.equal(backoffDelay(30, opts, () => 0.999999), 2500);
  for (let a = 0; a < 20; a++) {
    const d = backoffDelay(a, opts);
    const base = Math.min(5000, 100 * 2 ** a);
    assert.ok(d >= base / 2 && d <= base, `attempt ${a}: ${d}`);
  }
  const spread = new Set(Array.from({ length: 50 }, () => backoffDelay(4, opts)));
  assert.ok(spread.size > 10, "jitter spreads clients out");
  assert.equal(backoffDelay(0, { jitter: 0 }), 250);
});

const put = (key, revision, value) => ({ key, op: "put", revision, value });

test("KvBook: initial values, stale and duplicate puts ignored, deletes remembered", () => {
  const book = new KvBook((v) => v.n);
  assert.equal(book.begin(), undefined);
  assert.deepEqual(book.apply(put("a", 1, { n: 1 })), { key: "a", op: "put", value: 1, previous: undefined, revision: 1 });
  assert.equal(book.apply(put("b", 2, { n: 2 })).value, 2);
  assert.equal(book.apply(put("a", 1, { n: 1 })), null, "a duplicate");
  assert.deepEqual(book.markSynced(5), []);
  assert.equal(book.revision, 5);
  assert.ok(book.synced);
  assert.equal(book.apply(put("a", 6, { n: 10 })).previous, 1);
  assert.equal(book.apply({ key: "b", op: "delete", revision: 7 }).op, "delete");
  assert.equal(book.apply(put("b", 2, { n: 2 })), null, "an older put cannot resurrect a deleted key");
  assert.equal(book.apply({ key: "zz", op: "purge", revision: 8 }), null, "deleting an unknown key changes nothing");
  assert.deepEqual([...book.values], [["a", 10]]);
  assert.equal(book.revision, 8);
});

test("KvBook: re-subscribing without since drops every key not seen before synced", () => {
  const book = new KvBook();
  book.begin();
  book.apply(put("a", 1, "A"));
  book.apply(put("b", 2, "B"));
  book.apply(put("c", 3, "C"));
  book.markSynced(3);
  assert.equal(book.begin(false), undefined);
  book.ok({ position: 1, recovered: true }, false);
  book.apply(put("a", 1, "A")); // unchanged: no event, but seen
  book.apply(put("c", 9, "C2"));
  const dropped = book.markSynced(10);
  assert.deepEqual(dropped.map((c) => [c.key, c.op, c.previous]), [["b", "delete", "B"]]);
  assert.deepEqual([...book.values], [["a", "A"], ["c", "C2"]]);
  assert.equal(book.revision, 10);
});

test("KvBook: resume with since_revision; recovered keeps state, not recovered reloads", () => {
  const book = new KvBook();
  book.begin();
  book.apply(put("a", 1, "A"));
  book.apply(put("b", 2, "B"));
  book.markSynced(4);
  // recovered: only later changes come, nothing is dropped
  assert.equal(book.begin(true), 4);
  book.ok({ position: 5, recovered: true }, true);
  book.apply(put("c", 5, "C"));
  assert.deepEqual(book.markSynced(5), []);
  assert.deepEqual([...book.values.keys()], ["a", "b", "c"]);
  // not recovered (bucket recreated: revisions start again): full state, drop the rest
  assert.equal(book.begin(true), 5);
  book.ok({ position: 1, recovered: false }, true);
  assert.equal(book.revision, 0);
  assert.ok(book.apply(put("a", 1, "A-new")), "revision 1 applies again after a reset");
  const dropped = book.markSynced(1);
  assert.deepEqual(dropped.map((c) => c.key).sort(), ["b", "c"]);
  assert.deepEqual([...book.values], [["a", "A-new"]]);
  assert.equal(book.revision, 1);
});

test("KvBook: clear (revoked) forgets everything and starts over without since", () => {
  const book = new KvBook();
  book.begin();
  book.apply(put("a", 1, "A"));
  book.markSynced(1);
  assert.deepEqual(book.clear().map((c) => [c.key, c.op]), [["a", "delete"]]);
  assert.equal(book.values.size, 0);
  assert.equal(book.begin(true), undefined, "nothing to resume from");
});

test("KvBook decodes base64 values and hands the key and revision to decode", () => {
  const seen = [];
  const book = new KvBook((v, meta) => {
    seen.push(meta);
    return new TextDecoder().decode(v);
  });
  book.begin();
  const change = book.apply({ key: "k", op: "put", revision: 3, value_b64: btoa("hello") });
  assert.equal(change.value, "hello");
  assert.deepEqual(seen, [{ key: "k", revision: 3 }]);
});

test("StreamBook: start options, then start_seq = last + 1 on every resume", () => {
  const book = new StreamBook({ filter: "chat.room.a", startSeq: 1, batch: 50 });
  assert.deepEqual(book.request(), { filter: "chat.room.a", batch: 50, start_seq: 1 });
  book.ok({ position: 1, recovered: true });
  assert.ok(book.accept(1));
  assert.ok(book.accept(2));
  assert.ok(book.accept(5));
  assert.ok(!book.accept(5), "a redelivery");
  assert.ok(!book.accept(3), "an older seq");
  assert.deepEqual(book.request(), { filter: "chat.room.a", batch: 50, start_seq: 6 });
  assert.deepEqual(book.ok({ position: 6, recovered: true }), { reset: false, gap: false, expected: 6, position: 6 });
});

test("StreamBook: new-only or time_delta subscriptions resume from the first ok's position", () => {
  const book = new StreamBook({ filter: "x.>" });
  assert.deepEqual(book.request(), { filter: "x.>" });
  book.ok({ position: 42, recovered: true });
  assert.deepEqual(book.request(), { filter: "x.>", start_seq: 42 }, "nothing came: resume at the position");
  const td = new StreamBook({ timeDelta: 60, ack: true });
  assert.deepEqual(td.request(), { filter: ">", ack: true, time_delta: 60 });
});

test("StreamBook: a durable sends its start once, then resumes on the server and dedupes", () => {
  const durable = new StreamBook({ durable: "d1", startSeq: 1, ack: true });
  assert.deepEqual(durable.request(), { filter: ">", ack: true, durable: "d1", start_seq: 1 });
  assert.equal(durable.resumed, false);
  durable.ok({ position: 1, recovered: true, durable: "created" });
  for (const s of [1, 2, 3]) assert.ok(durable.accept(s));
  assert.deepEqual(durable.request(), { filter: ">", ack: true, durable: "d1" }, "the durable alone: the server knows");
  assert.equal(durable.resumed, true);
  // Resumed after its ack floor (2 was never acked): 2 and 3 come again, no reset.
  assert.deepEqual(durable.ok({ position: 2, recovered: true, durable: "resumed" }), {
    reset: false,
    gap: false,
    expected: 4,
    position: 2,
  });
  assert.ok(!durable.accept(2) && !durable.accept(3), "redeliveries of what the app has");
  assert.ok(durable.accept(4));
  assert.equal(durable.lastSeq, 4);
});

test("StreamBook: a durable that is gone on resume is a gap (or a reset), never silent", () => {
  const deleted = new StreamBook({ durable: "d1", startSeq: 1 });
  deleted.request();
  deleted.ok({ position: 1, recovered: true, durable: "created" });
  for (const s of [1, 2]) deleted.accept(s);
  deleted.request();
  const g = deleted.ok({ position: 9, recovered: false, durable: "created" });
  assert.ok(g.gap && !g.reset, "deleted or expired: started afresh after what we had");
  assert.equal(g.expected, 3);
  // created again although `recovered` says nothing (its record lost): its position is lost too
  const lost = new StreamBook({ durable: "d1" });
  lost.request();
  lost.ok({ position: 5, recovered: true, durable: "created" });
  lost.accept(5);
  lost.request();
  assert.ok(lost.ok({ position: 7, recovered: true, durable: "created" }).gap);
  // the stream was recreated: seqs start again and are not dropped as duplicates
  const recreated = new StreamBook({ durable: "d1" });
  recreated.request();
  recreated.ok({ position: 5, durable: "created" });
  recreated.accept(5);
  recreated.request();
  const r = recreated.ok({ position: 1, recovered: false, durable: "resumed" });
  assert.ok(r.reset && !r.gap);
  assert.ok(recreated.accept(1));
});

test("StreamBook: a resume the server could not honour is a reset or a gap", () => {
  const book = new StreamBook({ startSeq: 1 });
  book.request();
  book.ok({ position: 1, recovered: true });
  for (const s of [1, 2, 3]) book.accept(s);
  // stream recreated: it replays from 1, which must not be dropped as duplicates
  book.request();
  const r = book.ok({ position: 1, recovered: false });
  assert.ok(r.reset && !r.gap);
  assert.ok(book.accept(1));
  // purged: starts after what we expected, messages are missing
  book.accept(2);
  book.request();
  const g = book.ok({ position: 10, recovered: false });
  assert.ok(g.gap && !g.reset);
  assert.equal(g.expected, 3);
  assert.ok(book.accept(10));
});
