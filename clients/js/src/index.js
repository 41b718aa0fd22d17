// natsgate: the client of natsgate's wire protocol (docs/protocol.md, v1).
//
// One session per app, authenticated by the `session` cookie (same origin) or a bearer
// `token`, carried by a WebSocket (`/ws`) or, where WebSocket keeps failing (3 failed opens
// in a row) or does not exist, by HTTP long polling (`/poll`): the same envelopes, the same
// resume rules, one connection state for the app plus `client.transport`; while polling,
// WebSocket is tried again every minute. Client state changes only from server messages;
// HTTP writes (`createApi`) acknowledge and return a position that `store.seen()` /
// `stream.seen()` wait for.
//
//   const client = createClient();
//   const todos = client.kv("todos", { pattern: `user.${uid}.>` });
//   todos.on("change", () => render(todos.values));
//   const chat = client.stream("chat", { filter: "chat.room.general", startSeq: 1 });
//   chat.on("message", (m) => append(m.payload));
//   const jobs = client.stream("jobs", { durable: "inbox", ack: true, onMessage: handle });
//   jobs.on("error", (e) => e.code === "taken_over" && showTakenOver()); // another tab took it
//   await jobs.close({ deleteDurable: true }); // or close(): the durable waits on the server
//
// Modules, one concern each: codes.js (version, shared types, error and close codes, the
// errors), match.js (frames, wildcards, capabilities, routing), books.js (KV and JetStream
// resume bookkeeping), policy.js (backoff, the fallback decision), transports.js (WebSocket,
// long polling), events.js, subscriptions.js, client.js (the connection), api.js (the HTTP
// helper). No dependencies, no build step; the framework adapters are the subpaths
// `natsgate/react`, `natsgate/vue`, `natsgate/svelte` over `natsgate/stores`.

export * from "./codes.js";
export * from "./match.js";
export * from "./books.js";
export * from "./policy.js";
export * from "./transports.js";
export * from "./subscriptions.js";
export * from "./client.js";
export * from "./presence.js";
export * from "./api.js";
