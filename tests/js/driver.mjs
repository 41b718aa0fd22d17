// The JS client, as installed from the packed tarball, driven by tests/js/test_reconnect.py
// over stdin/stdout (one JSON object a line): it logs in as argv's user, reads a stream and
// a bucket through nginx (over long polling, or over WebSocket with `ws`, whose constructor
// can send the bearer token that a browser's cannot), reports its state changes with their time (Date.now()), and
// answers the test's commands: `wait` (until the client has seen a seq and a revision),
// `check` (its state beside a fresh subscription's), `close`. With `refreshBefore` (seconds)
// it refreshes its token that long before it expires (POST /api/auth/refresh).
import { createInterface } from "node:readline";
import { pathToFileURL } from "node:url";
import { createApi, createClient } from "natsgate";

const [base, user, password, room, startSeq, wsModule, refreshBefore] = process.argv.slice(2);
const out = (ev) => process.stdout.write(`${JSON.stringify({ t: Date.now(), ...ev })}\n`);

let token = "";
const api = createApi({ base: `${base}/api`, token: () => token });
const me = await api.post("/auth/login", { username: user, password });
token = me.token;
const refresh = async () => {
  const r = await api.post("/auth/refresh");
  token = r.token;
  out({ ev: "refreshed", expires_at: r.expires_at });
  return r;
};
/** @type {any} */
let WebSocket;
if (wsModule) {
  const { WebSocket: WS } = await import(pathToFileURL(wsModule).href);
  WebSocket = class extends WS {
    constructor(/** @type {string} */ url) {
      super(url, { headers: { Authorization: `Bearer ${token}` } });
    }
  };
}
const client = createClient({
  url: `${base.replace("http", "ws")}/ws`,
  token,
  WebSocket,
  ...(refreshBefore ? { refresh, expiresAt: me.expires_at, refreshBefore: Number(refreshBefore) } : {}),
});
const pattern = `user.${me.user.id}.>`;
client.on("state", (state, details) => out({ ev: "state", state, code: details.code ?? null }));
const todos = client.kv("todos", { pattern });
todos.on("state", (state) => out({ ev: "kv", state }));
const seqs = [];
// startSeq 0: new messages only
const chat = client.stream("chat", { filter: `chat.room.${room}`, startSeq: Number(startSeq) || undefined });
chat.on("message", (m) => seqs.push(m.seq));
chat.on("state", (state) => out({ ev: "stream", state }));
for (const ev of ["gap", "reset", "error", "revoked"]) {
  chat.on(ev, (r) => out({ ev: `stream_${ev}`, detail: r }));
  todos.on(ev, (r) => out({ ev: `kv_${ev}`, detail: r }));
}
const live = new Promise((resolve) => chat.on("state", (s) => s === "live" && resolve(s)));
await Promise.all([todos.seen(0, { timeout: 30000 }), chat.seen(Number(startSeq), { timeout: 30000 }), live]);
out({ ev: "ready", uid: me.user.id, transport: client.transport, expires_at: me.expires_at });

for await (const line of createInterface({ input: process.stdin })) {
  const cmd = JSON.parse(line);
  if (cmd.op === "wait") {
    await Promise.all([chat.seen(cmd.seq, { timeout: 60000 }), todos.seen(cmd.revision, { timeout: 60000 })]);
    out({ ev: "wait_done", lastSeq: chat.lastSeq, revision: todos.revision, transport: client.transport, state: client.state });
  } else if (cmd.op === "check") {
    const fresh = client.kv("todos", { pattern });
    await fresh.seen(0, { timeout: 30000 });
    out({ ev: "check_done", seqs, values: Object.fromEntries(todos.values), fresh: Object.fromEntries(fresh.values) });
    fresh.close();
  } else if (cmd.op === "status") {
    out({ ev: "status_done", state: client.state, stream: chat.status, kv: todos.status });
  } else if (cmd.op === "close") {
    client.close();
    out({ ev: "close_done" });
    break;
  }
}
