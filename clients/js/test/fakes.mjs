// What the SyncClient tests share: a scripted WebSocket (the test plays the server), waits,
// and clients that are closed after every test. Not a test file (node --test runs it too,
// as a file with no tests).
import { afterEach } from "node:test";
import assert from "node:assert/strict";

import { createClient } from "../src/index.js";

/**
 * A WebSocket double. `FakeSocket.refuse` makes every new one fail before it opens,
 * `FakeSocket.throws` makes the constructor throw (both reset after each test).
 */
export class FakeSocket {
  static all = [];
  static refuse = false;
  static throws = false;

  constructor(url) {
    if (FakeSocket.throws) throw new Error("WebSocket is disabled");
    this.url = url;
    this.readyState = 0;
    this.sent = [];
    FakeSocket.all.push(this);
    const refuse = FakeSocket.refuse;
    queueMicrotask(() => {
      if (this.readyState !== 0) return;
      if (refuse) {
        this.readyState = 3;
        this.onerror?.({});
        this.onclose?.({ code: 1006, reason: "" });
        return;
      }
      this.readyState = 1;
      this.onopen?.({});
    });
  }

  send(text) {
    assert.equal(this.readyState, 1, "send on an open socket only");
    this.sent.push(JSON.parse(text));
  }

  close(code = 1000, reason = "") {
    if (this.readyState >= 2) return;
    this.readyState = 3;
    queueMicrotask(() => this.onclose?.({ code, reason }));
  }

  // ---- the server side
  frame(...envs) {
    this.onmessage?.({ data: envs.map((e) => JSON.stringify(e)).join("\n") });
  }

  drop(code = 1006, reason = "") {
    this.readyState = 3;
    this.onclose?.({ code, reason });
  }

  ops(op) {
    return this.sent.filter((e) => e.op === op);
  }

  static last() {
    return FakeSocket.all[FakeSocket.all.length - 1];
  }
}

export const tick = () => new Promise((r) => setTimeout(r, 0));

export async function until(cond, what, ms = 2000) {
  const t0 = Date.now();
  while (!cond()) {
    if (Date.now() - t0 > ms) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 2));
  }
}

/** The capabilities `connected` grants unless told otherwise. */
export const CAPS = {
  subjects: ["chat.room.*"],
  buckets: { todos: ["user.u1.>"], articles: [">"] },
  streams: { chat: [">"] },
  commands: [],
};

const clients = [];
afterEach(() => {
  while (clients.length) clients.pop().close(); // also when a test failed half-way
  FakeSocket.refuse = FakeSocket.throws = false;
});

/** A client on FakeSocket with short backoffs (closed after the test). */
export function client(extra = {}) {
  FakeSocket.all = [];
  const c = createClient({
    url: "ws://test/ws",
    WebSocket: FakeSocket,
    backoff: { initial: 1, max: 5, jitter: 0 },
    pingInterval: 60000,
    ...extra,
  });
  clients.push(c);
  return c;
}

/** Wait for the newest socket to open and start its session with `caps`; returns the socket. */
export async function connected(c, caps = CAPS) {
  await until(() => FakeSocket.last()?.readyState === 1, "open");
  const ws = FakeSocket.last();
  ws.frame({ op: "cap_update", data: { user: "u1", capabilities: caps, revoked: [] } });
  assert.equal(c.state, "open");
  return ws;
}
