// src/react.js against a stand-in of React's hook contract (standins.mjs): a hook's
// subscription opens when the component mounts, survives re-renders with the same
// arguments, moves when they change, and is unsubscribed when the component unmounts.
import { test } from "node:test";
import assert from "node:assert/strict";

import { bindReact } from "../src/react.js";
import { client, connected } from "./fakes.mjs";
import { answerKv, reactStandIn } from "./standins.mjs";

test("useKv renders the store's snapshots and unsubscribes on unmount", async () => {
  const { React, render } = reactStandIn();
  const { useKv } = bindReact(React);
  const c = client();
  const ws = await connected(c);
  const view = render(({ bucket, pattern }) => useKv(c, bucket, { pattern }), { bucket: "todos", pattern: "user.u1.>" });
  const [req] = ws.ops("kv_sub");
  assert.equal(req.target, "todos", "subscribed once mounted");
  assert.deepEqual(req.data, { pattern: "user.u1.>" });
  assert.equal(view.current.state, "loading");

  answerKv(ws, req, { "user.u1.a": { title: "A" } });
  assert.equal(view.current.state, "synced", "a change re-renders");
  assert.deepEqual([...view.current.values], [["user.u1.a", { title: "A" }]]);

  const renders = view.renders;
  view.rerender({ bucket: "todos", pattern: "user.u1.>" }); // a parent re-render: new opts object, same values
  assert.equal(ws.ops("kv_sub").length, 1, "same arguments: same subscription");
  assert.equal(view.current.state, "synced");
  assert.equal(view.renders, renders + 1);

  view.rerender({ bucket: "articles", pattern: ">" });
  assert.deepEqual(ws.ops("unsub").map((e) => e.inbox), [req.inbox], "new arguments: the old one is unsubscribed");
  const [, moved] = ws.ops("kv_sub");
  assert.equal(moved.target, "articles");
  assert.equal(view.current.state, "loading");

  view.unmount();
  assert.deepEqual(ws.ops("unsub").map((e) => e.inbox), [req.inbox, moved.inbox], "unmount unsubscribes");
  const count = view.renders;
  ws.frame({ op: "kv_msg", target: "articles", data: { key: "x", op: "put", revision: 9, value: 1 } });
  assert.equal(view.renders, count, "no render after unmount");
});

test("useStream and useSubject follow their subscriptions; functions are not dependencies", async () => {
  const { React, render } = reactStandIn();
  const { useStream, useSubject } = bindReact(React);
  const c = client();
  const ws = await connected(c);
  const got = [];
  const view = render(
    () => ({
      chat: useStream(c, "chat", { filter: "chat.room.a", startSeq: 1, onMessage: (m) => got.push(m.seq) }),
      rooms: useSubject(c, "chat.room.*"),
    }),
    {},
  );
  view.rerender({}); // a new onMessage function each render
  assert.equal(ws.ops("js_sub").length, 1, "a new function does not resubscribe");
  const [js] = ws.ops("js_sub");
  const [sub] = ws.ops("sub");
  ws.frame(
    { op: "ok", inbox: js.inbox, data: { position: 1, recovered: true } },
    { op: "js_msg", target: "chat", inbox: js.inbox, data: { seq: 1, subject: "chat.room.a", payload: { text: "hi" }, time: "t" } },
    { op: "ok", inbox: sub.inbox, target: "chat.room.*" },
    { op: "sub_msg", target: "chat.room.b", data: { payload: { typing: true } } },
  );
  assert.deepEqual(view.current.chat.messages.map((m) => m.payload), [{ text: "hi" }]);
  assert.deepEqual(got, [1], "the first render's onMessage is the one called");
  assert.deepEqual(view.current.rooms.last, { subject: "chat.room.b", payload: { typing: true } });
  view.unmount();
  assert.deepEqual(new Set(ws.ops("unsub").map((e) => e.inbox)), new Set([js.inbox, sub.inbox]));
});

test("useConnection re-renders on connection changes only", async () => {
  const { React, render } = reactStandIn();
  const { useConnection } = bindReact(React);
  const c = client();
  const view = render(() => useConnection(c), {});
  assert.equal(view.current.state, "connecting");
  await connected(c);
  assert.equal(view.current.state, "open");
  assert.equal(view.current.user, "u1");
  const renders = view.renders;
  c.subscribe("chat.room.1"); // not a connection change
  assert.equal(view.renders, renders);
  view.unmount();
  assert.equal(c.state, "open", "unmounting leaves the client open");
});
