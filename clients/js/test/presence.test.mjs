// presence(subject): a kv store on bucket `presence` folded into one member per user, with
// join and leave events; subscribe(…, {presence: true}) asks the gateway to announce.
import { test } from "node:test";
import assert from "node:assert/strict";

import { membersOf, presenceUid } from "../src/index.js";
import { CAPS, client, connected } from "./fakes.mjs";

const PCAPS = { ...CAPS, buckets: { ...CAPS.buckets, presence: ["chat.room.*.>"] } };
const ROOM = "chat.room.7";

/** A presence kv_msg put (`key` = <room>.<uid>.<conn>) or delete. */
function change(op, uid, conn, revision) {
  const data = { key: `${ROOM}.${uid}.${conn}`, op, revision };
  if (op === "put") data.value = { uid, name: uid.toUpperCase(), since: revision };
  return { op: "kv_msg", target: "presence", data };
}

test("the uid is the key's second-to-last token; members fold connections by uid", () => {
  assert.equal(presenceUid("chat.room.7.u1.a1b2-3"), "u1");
  const values = new Map([
    ["chat.room.7.u1.c1", { uid: "u1", name: "Ann", since: 5 }],
    ["chat.room.7.u1.c2", { uid: "u1", name: "Ann", since: 3 }],
    ["chat.room.7.u2.c3", { uid: "u2", name: "", since: 9 }],
  ]);
  assert.deepEqual([...membersOf(values).values()], [
    { uid: "u1", name: "Ann", since: 3, connections: 2 },
    { uid: "u2", name: "u2", since: 9, connections: 1 },
  ]);
});

test("presence: one member per user, join on the first connection, leave on the last", async () => {
  const c = client();
  const here = c.presence(ROOM);
  const mine = c.subscribe(ROOM, () => {}, { presence: true });
  assert.equal(mine.presence, true);
  const ws = await connected(c, PCAPS);
  const [kvReq] = ws.ops("kv_sub");
  assert.equal(kvReq.target, "presence");
  assert.deepEqual(kvReq.data, { pattern: `${ROOM}.*.*` });
  const [subReq] = ws.ops("sub");
  assert.deepEqual(subReq.data, { presence: true });
  const events = [];
  here.on("join", (m) => events.push(`join:${m.uid}`));
  here.on("leave", (m) => events.push(`leave:${m.uid}`));
  ws.frame(
    { op: "ok", inbox: kvReq.inbox, target: "presence", data: { position: 1, recovered: false } },
    change("put", "u1", "c1", 1),
    { op: "kv_msg", target: "presence", inbox: kvReq.inbox, data: { op: "synced", revision: 1 } },
  );
  ws.frame(change("put", "u2", "c2", 2), change("put", "u2", "c3", 3));
  assert.deepEqual(events, ["join:u1", "join:u2"], "a second tab is no second join");
  assert.equal(here.members.get("u2").connections, 2);
  ws.frame(change("put", "u2", "c2", 4)); // a refresh: nothing changes
  ws.frame(change("delete", "u2", "c2", 5));
  assert.deepEqual(events, ["join:u1", "join:u2"], "still here on the other tab");
  ws.frame(change("delete", "u2", "c3", 6), change("delete", "u1", "c1", 7));
  assert.deepEqual(events, ["join:u1", "join:u2", "leave:u2", "leave:u1"]);
  assert.equal(here.members.size, 0);
  here.close();
});
