// The client's pure transport parts: the fallback decision and the long-poll bookkeeping.
import { test } from "node:test";
import assert from "node:assert/strict";

import { PollCursor, TransportPolicy, newSid, pollOutcome, pollUrlFor } from "../src/index.js";

test("three WebSocket opens in a row that fail move the next attempt to polling", () => {
  const p = new TransportPolicy();
  assert.equal(p.mode, "websocket");
  p.failed("websocket");
  p.failed("websocket");
  assert.equal(p.mode, "websocket");
  p.failed("websocket");
  assert.equal(p.mode, "polling");
  p.connected("polling");
  assert.equal(p.mode, "polling", "a polling session that ends reconnects over polling");
  assert.ok(p.probes("polling"));
  assert.ok(!p.probes("websocket"));
});

test("a WebSocket session in between starts the count again", () => {
  const p = new TransportPolicy({ fallbackAfter: 2 });
  p.failed("websocket");
  p.connected("websocket");
  p.failed("websocket");
  assert.equal(p.mode, "websocket");
  p.failed("websocket");
  assert.equal(p.mode, "polling");
  p.connected("websocket"); // a probe worked
  assert.equal(p.mode, "websocket");
  assert.equal(p.wsFailures, 0);
});

test("when polling fails too, WebSocket and polling alternate until one works", () => {
  const p = new TransportPolicy();
  for (let i = 0; i < 3; i++) p.failed("websocket");
  const tried = [];
  for (let i = 0; i < 6; i++) {
    tried.push(p.mode);
    p.failed(p.mode);
  }
  assert.deepEqual(tried, ["polling", "websocket", "polling", "websocket", "polling", "websocket"]);
  assert.equal(p.pollFailures, 3);
  p.connected("polling");
  assert.equal(p.pollFailures, 0);
});

test("polling: false never falls back; probeInterval 0 never probes; preferPolling starts there", () => {
  const off = new TransportPolicy({ polling: false });
  for (let i = 0; i < 10; i++) off.failed("websocket");
  assert.equal(off.mode, "websocket");
  off.preferPolling();
  assert.equal(off.mode, "websocket");
  assert.ok(!new TransportPolicy({ probeInterval: 0 }).probes("polling"));
  const pre = new TransportPolicy();
  pre.preferPolling();
  assert.equal(pre.mode, "polling");
  pre.failed("polling");
  assert.equal(pre.mode, "websocket");
  pre.failed("websocket");
  assert.equal(pre.mode, "polling", "one more WebSocket failure goes back to polling");
});

test("the first WebSocket try of a polling session comes soon, then every probeInterval", () => {
  const p = new TransportPolicy();
  assert.equal(p.probeDelay(0, () => 0), 5000);
  assert.equal(p.probeDelay(1, () => 0), 60000);
  assert.equal(p.probeDelay(7, () => 1), 48000, "at most 20 % earlier");
  const fast = new TransportPolicy({ probeInterval: 1000 });
  assert.equal(fast.probeDelay(0, () => 0), 1000, "never later than the interval");
});

test("PollCursor: `after` moves only with an answer that was read; a lost one is asked again", () => {
  const c = new PollCursor();
  assert.equal(c.query("S", 25), "sid=S&after=0&wait=25");
  assert.equal(c.accept("3", "a\nb\nc"), "a\nb\nc");
  assert.equal(c.after, 3);
  const q = c.query("S", 25);
  // The answer to q (frames 4-5) is lost: accept() is never called, the next GET is the same.
  assert.equal(c.query("S", 25), q);
  // The server answers it again, with what came since too.
  assert.equal(c.accept("6", "d\ne\nf"), "d\ne\nf");
  assert.equal(c.query("S", 25), "sid=S&after=6&wait=25");
});

test("PollCursor: an empty answer hands over nothing; a bad or older header is refused", () => {
  const c = new PollCursor();
  c.accept("5", "x");
  assert.equal(c.accept("5", ""), "");
  assert.equal(c.accept("5", "stale"), "", "nothing after 5 can be in it");
  for (const bad of [null, "", "x", "-1", "4", "1.5"]) {
    assert.equal(c.accept(bad, "y"), null, `header ${bad}`);
  }
  assert.equal(c.after, 5);
  assert.equal(c.query("a b", 1), "sid=a%20b&after=5&wait=1");
});

test("pollOutcome: 410 is the session's close code, 404 reopens, 401 refreshes, 5xx retries", () => {
  assert.deepEqual(pollOutcome(410, { close_code: 4401, detail: "token revoked" }), {
    retry: false,
    code: 4401,
    reason: "token revoked",
  });
  assert.equal(pollOutcome(410, { close_code: 4403 }).code, 4403);
  assert.equal(pollOutcome(410, { close_code: 1013 }).code, 1013);
  assert.equal(pollOutcome(410, null).code, 1006);
  const gone = pollOutcome(404, { code: "unknown_session", detail: "no such session here" });
  assert.equal(gone.retry, false);
  assert.equal(gone.code, 1006);
  assert.match(gone.reason, /^unknown_session/);
  assert.equal(pollOutcome(401, {}).code, 4401);
  assert.equal(pollOutcome(403, {}).code, 1008);
  assert.equal(pollOutcome(400, { detail: "bad" }).code, 1006);
  for (const s of [0, 429, 500, 502, 503, 504]) assert.equal(pollOutcome(s).retry, true, `status ${s}`);
});

test("newSid fits the server's grammar; pollUrlFor derives /poll from /ws", () => {
  const a = newSid();
  assert.match(a, /^[A-Za-z0-9_-]{16,64}$/);
  assert.notEqual(a, newSid());
  assert.equal(pollUrlFor("ws://h:8080/ws"), "http://h:8080/poll");
  assert.equal(pollUrlFor("wss://h/ws?x=1"), "https://h/poll");
  assert.equal(pollUrlFor("ws://h/"), "http://h/poll");
  assert.equal(pollUrlFor("ws://h/app/ws"), "http://h/app/poll");
});
