// src/vue.js against a stand-in of Vue's contract (standins.mjs): the composable's
// shallow ref follows the subscription, and stopping the component's effect scope (its
// unmount) unsubscribes.
import { test } from "node:test";
import assert from "node:assert/strict";

import { bindVue } from "../src/vue.js";
import { client, connected } from "./fakes.mjs";
import { answerKv, vueStandIn } from "./standins.mjs";

test("useKv's ref follows the store, and the scope's end unsubscribes", async () => {
  const { Vue, effectScope } = vueStandIn();
  const { useKv } = bindVue(Vue);
  const c = client();
  const ws = await connected(c);
  const scope = effectScope(); // what a component's setup runs in
  const todos = scope.run(() => useKv(c, "todos", { pattern: "user.u1.>" }));
  const [req] = ws.ops("kv_sub");
  assert.deepEqual(req.data, { pattern: "user.u1.>" });
  assert.equal(todos.value.state, "loading");

  answerKv(ws, req, { "user.u1.a": { title: "A" }, "user.u1.b": { title: "B" } });
  assert.equal(todos.value.state, "synced");
  assert.deepEqual([...todos.value.values.keys()], ["user.u1.a", "user.u1.b"]);
  const writes = todos.writes;
  assert.ok(writes >= 3, "each change is a new value (a shallow ref only triggers on assignment)");

  scope.stop(); // unmount
  assert.deepEqual(ws.ops("unsub").map((e) => e.inbox), [req.inbox]);
  ws.frame({ op: "kv_msg", target: "todos", data: { key: "user.u1.c", op: "put", revision: 3, value: {} } });
  assert.equal(todos.writes, writes, "nothing is written after unmount");
});

test("useStream, useSubject and useConnection in one scope end together", async () => {
  const { Vue, effectScope } = vueStandIn();
  const { useConnection, useStream, useSubject } = bindVue(Vue);
  const c = client();
  const scope = effectScope();
  const { chat, rooms, conn } = scope.run(() => ({
    chat: useStream(c, "chat", { filter: "chat.room.a" }),
    rooms: useSubject(c, "chat.room.*"),
    conn: useConnection(c),
  }));
  assert.equal(conn.value.state, "connecting");
  const ws = await connected(c);
  assert.equal(conn.value.state, "open");
  const [js] = ws.ops("js_sub");
  const [sub] = ws.ops("sub");
  ws.frame(
    { op: "ok", inbox: js.inbox, data: { position: 1, recovered: true } },
    { op: "js_msg", target: "chat", inbox: js.inbox, data: { seq: 4, subject: "chat.room.a", payload: "hi", time: "t" } },
    { op: "ok", inbox: sub.inbox, target: "chat.room.*" },
    { op: "sub_msg", target: "chat.room.z", data: { payload: 1 } },
  );
  assert.equal(chat.value.lastSeq, 4);
  assert.equal(rooms.value.last.payload, 1);
  scope.stop();
  assert.deepEqual(new Set(ws.ops("unsub").map((e) => e.inbox)), new Set([js.inbox, sub.inbox]));
  assert.equal(c.state, "open", "the client is the app's: still open");
});

test("outside a component (no active scope) it fails loudly, as Vue warns", () => {
  const { Vue } = vueStandIn();
  const { useKv } = bindVue(Vue);
  const c = client({ connect: false });
  assert.throws(() => useKv(c, "todos"), /no active effect scope/);
  assert.equal(c.subs.size, 0, "and opens no subscription that nothing would close");
});
