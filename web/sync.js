// sync.js: the browser client of natsgate's wire protocol (PROTOCOL.md v1).
//
// One WebSocket per app, authenticated by the `session` cookie (same origin, `/ws`).
// Client state changes only from WebSocket messages; HTTP writes (the `api` helper at the
// end) acknowledge and return a position that `store.seen()` / `stream.seen()` wait for.
//
//   const client = createClient();
//   const todos = client.kv("todos", { pattern: `user.${uid}.>` });
//   todos.on("change", () => render(todos.values));
//   const chat = client.stream("chat", { filter: "chat.room.general", startSeq: 1 });
//   chat.on("message", (m) => append(m.payload));
//
// Layout: pure parts first (frame splitting, wildcard matching, routing, backoff, resume
// bookkeeping — exported and unit-tested with node:test), then the connection, then the
// three subscription kinds, then the HTTP helper. No dependencies, no build step.

// ---------------------------------------------------------------- types

/**
 * @typedef {{v?: number, op: string, target?: string, inbox?: string, data?: any}} Envelope
 * @typedef {"connecting" | "open" | "reconnecting" | "closed" | "unauthorized"} ConnectionState
 * @typedef {"connecting" | "loading" | "synced" | "error"} StoreState
 * @typedef {{code: string, reason: string}} ServerError
 * @typedef {{subjects?: string[], buckets?: Record<string, string[]>,
 *            streams?: Record<string, string[]>, commands?: string[]}} Capabilities
 * @typedef {{initial?: number, max?: number, factor?: number, jitter?: number}} BackoffOptions
 */

export const PROTOCOL_VERSION = 1;

// ---------------------------------------------------------------- pure: frames

/**
 * Split one server frame into envelopes (the server batches them, newline-separated).
 * A line that is not a JSON object is reported to `onBad` and skipped.
 * @param {string} frame
 * @param {(line: string, error: unknown) => void} [onBad]
 * @returns {Envelope[]}
 */
export function splitFrame(frame, onBad) {
  /** @type {Envelope[]} */
  const out = [];
  for (const line of String(frame).split("\n")) {
    if (!line.trim()) continue;
    try {
      const env = JSON.parse(line);
      if (env === null || typeof env !== "object" || typeof env.op !== "string") {
        throw new TypeError("not an envelope");
      }
      out.push(env);
    } catch (e) {
      if (onBad) onBad(line, e);
    }
  }
  return out;
}

// ---------------------------------------------------------------- pure: NATS wildcards

/**
 * True if `pattern` is a valid subject pattern: `.`-separated non-empty tokens, `*` a whole
 * token, `>` a whole token and the last one, no whitespace (the server's grammar).
 * @param {string} pattern
 */
export function validPattern(pattern) {
  if (typeof pattern !== "string" || !pattern || pattern.length > 512) return false;
  if (/[\s\u0000-\u001f\u007f]/.test(pattern)) return false;
  const toks = pattern.split(".");
  for (let i = 0; i < toks.length; i++) {
    const t = toks[i];
    if (!t) return false;
    if (t === ">") {
      if (i !== toks.length - 1) return false;
    } else if (t !== "*" && (t.includes("*") || t.includes(">"))) {
      return false;
    }
  }
  return true;
}

/**
 * NATS wildcard match of a literal `subject` by `pattern`: `*` is exactly one token, `>` one
 * or more trailing tokens.
 * @param {string} pattern
 * @param {string} subject
 */
export function match(pattern, subject) {
  const p = pattern.split(".");
  const s = subject.split(".");
  for (let i = 0; i < p.length; i++) {
    const t = p[i];
    if (t === ">") return s.length > i;
    if (i >= s.length) return false;
    if (t !== "*" && t !== s[i]) return false;
  }
  return p.length === s.length;
}

/**
 * True if every subject matched by `pattern` is also matched by `of` (how capabilities are
 * checked: `chat.room.*` ⊆ `chat.>`, but `chat.>` ⊄ `chat.room.*`).
 * @param {string} pattern
 * @param {string} of
 */
export function isSubset(pattern, of) {
  const a = pattern.split(".");
  const b = of.split(".");
  for (let i = 0; i < a.length; i++) {
    if (i >= b.length) return false;
    const bt = b[i];
    if (bt === ">") return true;
    if (a[i] === ">") return false;
    if (bt !== "*" && a[i] !== bt) return false;
  }
  return a.length === b.length;
}

/**
 * Would these capabilities allow the request? A hint for the UI and for re-subscribing after
 * a grant; the server decides (it also hides internal subjects and buckets).
 * @param {Capabilities | null | undefined} caps
 * @param {"sub" | "kv_sub" | "js_sub" | "cmd"} op
 * @param {string} target subject pattern (sub), bucket (kv_sub), stream (js_sub), command
 * @param {string} [pattern] key pattern (kv_sub) or filter (js_sub); default `>`
 */
export function allows(caps, op, target, pattern = ">") {
  if (!caps) return false;
  const any = (/** @type {string[] | undefined} */ list, /** @type {string} */ p) =>
    validPattern(p) && (list || []).some((c) => validPattern(c) && isSubset(p, c));
  const named = (/** @type {Record<string, string[]> | undefined} */ table) =>
    Object.entries(table || {}).some(
      ([name, list]) => (name === "*" || name === ">" || name === target) && any(list, pattern),
    );
  switch (op) {
    case "sub":
      return !target.startsWith("$") && any(caps.subjects, target);
    case "kv_sub":
      return !(target.startsWith("auth_") && target !== "auth_users") && named(caps.buckets);
    case "js_sub":
      return named(caps.streams);
    case "cmd":
      return any(caps.commands, target);
    default:
      return false;
  }
}

// ---------------------------------------------------------------- pure: routing

/**
 * @typedef {{op: string, target: string, pattern: string, inbox: string | null}} Routable
 */

/**
 * The subscriptions an envelope belongs to. Replies and per-subscription data (`ok`,
 * `error`, `synced`, `js_msg`) name their inbox; fan-out data (`sub_msg`, `kv_msg`
 * put/delete/purge) carries none and goes to every subscription whose pattern matches.
 * @template {Routable} S
 * @param {Envelope} env
 * @param {Iterable<S>} subs
 * @returns {S[]}
 */
export function recipients(env, subs) {
  /** @type {S[]} */
  const out = [];
  const data = env.data || {};
  const fanOut = env.op === "sub_msg" || (env.op === "kv_msg" && data.op !== "synced");
  if (!fanOut) {
    if (env.inbox == null) return out;
    for (const s of subs) if (s.inbox === env.inbox) out.push(s);
    return out;
  }
  const target = env.target || "";
  for (const s of subs) {
    if (env.op === "sub_msg") {
      if (s.op === "sub" && match(s.pattern, target)) out.push(s);
    } else if (s.op === "kv_sub" && s.target === target && typeof data.key === "string") {
      if (match(s.pattern, data.key)) out.push(s);
    }
  }
  return out;
}

// ---------------------------------------------------------------- pure: backoff

/**
 * Delay before reconnect attempt `attempt` (0 = first retry): exponential, capped, with
 * jitter so that a restarted gateway is not hit by every client at the same instant.
 * The delay lies in [base·(1−jitter), base] with base = min(max, initial·factor^attempt).
 * @param {number} attempt
 * @param {BackoffOptions} [opts]
 * @param {() => number} [random]
 */
export function backoffDelay(attempt, opts = {}, random = Math.random) {
  const { initial = 250, max = 10000, factor = 2, jitter = 0.5 } = opts;
  const base = Math.min(max, initial * Math.pow(factor, Math.max(0, attempt)));
  return Math.round(base * (1 - jitter * random()));
}

// ---------------------------------------------------------------- pure: KV bookkeeping

/**
 * @typedef {{key: string, op: "put" | "delete", value?: any, previous?: any,
 *            revision: number}} KvChange
 */

/**
 * The state of one KV subscription, independent of any socket: values by key, per-key
 * revisions (deletes included, so a late older put cannot resurrect a key), the store's
 * revision, and what a re-subscription must do at `synced`.
 */
export class KvBook {
  /** @param {(value: any, meta: {key: string, revision: number}) => any} [decode] */
  constructor(decode) {
    this.decode = decode || ((v) => v);
    /** @type {Map<string, any>} */
    this.values = new Map();
    /** @type {Map<string, number>} revision of each key's last put or delete */
    this.revs = new Map();
    this.revision = 0;
    this.synced = false;
    this.everSynced = false;
    /** @type {Set<string> | null} keys seen since the current (re-)subscription */
    this.seen = null;
    this.dropUnseen = false;
  }

  /**
   * Start a (re-)subscription; returns the `since_revision` to send, or undefined.
   * @param {boolean} useSince resume with `since_revision` when there is a synced state
   */
  begin(useSince = true) {
    this.synced = false;
    this.seen = new Set();
    if (useSince && this.everSynced && this.revision > 0) {
      this.dropUnseen = false; // decided by `recovered` in the ok
      return this.revision;
    }
    this.dropUnseen = this.values.size > 0 || this.revs.size > 0;
    return undefined;
  }

  /**
   * The `ok` of the kv_sub. `recovered: false` means the server sent the full state (our
   * since_revision is gone, or the bucket was recreated): forget per-key revisions and drop
   * every key it does not send again.
   * @param {{position?: number, recovered?: boolean}} data
   * @param {boolean} resumed whether the request carried since_revision
   */
  ok(data, resumed) {
    if (resumed && data && data.recovered === false) {
      this.dropUnseen = true;
      this.revs.clear();
      this.revision = 0;
    }
  }

  /**
   * Apply one put/delete/purge; returns the change, or null for a duplicate or stale one.
   * @param {{key: string, op: string, revision: number, value?: any, value_b64?: string}} d
   * @returns {KvChange | null}
   */
  apply(d) {
    const key = d.key;
    if (this.seen) this.seen.add(key);
    const rev = Number(d.revision) || 0;
    const known = this.revs.get(key);
    if (known !== undefined && rev <= known) return null;
    this.revs.set(key, rev);
    if (rev > this.revision) this.revision = rev;
    const previous = this.values.get(key);
    if (d.op === "put") {
      const raw = d.value !== undefined ? d.value : d.value_b64 !== undefined ? b64(d.value_b64) : null;
      const value = this.decode(raw, { key, revision: rev });
      this.values.set(key, value);
      return { key, op: "put", value, previous, revision: rev };
    }
    if (!this.values.has(key)) return null;
    this.values.delete(key);
    return { key, op: "delete", previous, revision: rev };
  }

  /**
   * The `synced` marker: the initial values are in. Drops keys a full re-sync did not send.
   * @param {number} revision the bucket's revision when the snapshot was taken
   * @returns {KvChange[]}
   */
  markSynced(revision) {
    /** @type {KvChange[]} */
    const changes = [];
    if (this.dropUnseen && this.seen) {
      for (const [key, previous] of [...this.values]) {
        if (!this.seen.has(key)) {
          this.values.delete(key);
          changes.push({ key, op: "delete", previous, revision: Number(revision) || 0 });
        }
      }
      for (const key of [...this.revs.keys()]) if (!this.seen.has(key)) this.revs.delete(key);
    }
    const r = Number(revision) || 0;
    if (r > this.revision) this.revision = r;
    this.synced = true;
    this.everSynced = true;
    this.seen = null;
    this.dropUnseen = false;
    return changes;
  }

  /** Forget everything (revoked): returns the deletions. @returns {KvChange[]} */
  clear() {
    /** @type {KvChange[]} */
    const changes = [...this.values].map(([key, previous]) => ({
      key,
      op: /** @type {"delete"} */ ("delete"),
      previous,
      revision: this.revision,
    }));
    this.values.clear();
    this.revs.clear();
    this.revision = 0;
    this.synced = false;
    this.everSynced = false;
    this.seen = null;
    this.dropUnseen = false;
    return changes;
  }
}

/** @param {string} s */
function b64(s) {
  const bin = atob(s);
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

// ---------------------------------------------------------------- pure: JetStream bookkeeping

/**
 * @typedef {{filter?: string, startSeq?: number, timeDelta?: number, startTime?: string,
 *            batch?: number, ack?: boolean, durable?: string}} StreamOptions
 */

/**
 * Where a JetStream subscription is: the last seq delivered to the app (dedupe: a seq at or
 * below it is a redelivery), and where a re-subscription starts (`last + 1`, or the first
 * `ok`'s position when nothing came yet).
 */
export class StreamBook {
  /** @param {StreamOptions} [opts] */
  constructor(opts = {}) {
    this.opts = opts;
    this.lastSeq = 0;
    /** @type {number | null} the seq the next subscription starts at, once known */
    this.next = null;
    this.resumed = false;
  }

  /** The js_sub `data` for the next (re-)subscription. */
  request() {
    const o = this.opts;
    /** @type {Record<string, any>} */
    const data = { filter: o.filter || ">" };
    if (o.batch !== undefined) data.batch = o.batch;
    if (o.ack) data.ack = true;
    if (o.durable) data.durable = o.durable;
    this.resumed = this.next !== null && !o.durable; // a durable resumes on the server
    if (this.resumed) data.start_seq = this.next;
    else if (o.startSeq !== undefined) data.start_seq = o.startSeq;
    else if (o.timeDelta !== undefined) data.time_delta = o.timeDelta;
    else if (o.startTime !== undefined) data.start_time = o.startTime;
    return data;
  }

  /**
   * The `ok` of the js_sub. Returns what the app must know: `reset` when the stream was
   * recreated (seqs start again: forget what we had), `gap` when messages we had not seen
   * are gone (purged): both only for a resume that the server could not honour.
   * @param {{position?: number, recovered?: boolean}} data
   * @returns {{reset: boolean, gap: boolean, expected: number | null, position: number}}
   */
  ok(data) {
    const position = Number(data && data.position) || 1;
    const expected = this.resumed ? this.next : null;
    let reset = false;
    let gap = false;
    if (this.resumed && data && data.recovered === false && expected !== null) {
      if (position < expected) {
        reset = true;
        this.lastSeq = position - 1;
      } else {
        gap = true;
      }
    }
    if (this.next === null || reset || position > this.next) this.next = position;
    return { reset, gap, expected, position };
  }

  /**
   * A js_msg arrived: true if it is new (deliver it), false for a duplicate.
   * @param {number} seq
   */
  accept(seq) {
    if (seq <= this.lastSeq) return false;
    this.lastSeq = seq;
    this.next = seq + 1;
    return true;
  }
}

// ---------------------------------------------------------------- events

/** A minimal typed-enough event emitter (`on` returns the function that removes it). */
class Emitter {
  constructor() {
    /** @type {Map<string, Set<Function>>} */
    this._handlers = new Map();
  }

  /**
   * @param {string} event
   * @param {(...args: any[]) => void} fn
   * @returns {() => void}
   */
  on(event, fn) {
    let set = this._handlers.get(event);
    if (!set) this._handlers.set(event, (set = new Set()));
    set.add(fn);
    return () => set.delete(fn);
  }

  /** @param {string} event @param {...any} args */
  emit(event, ...args) {
    const set = this._handlers.get(event);
    if (!set) return;
    for (const fn of [...set]) {
      try {
        fn(...args);
      } catch (e) {
        // A broken handler must not break the connection: report it asynchronously.
        setTimeout(() => {
          throw e;
        });
      }
    }
  }
}

// ---------------------------------------------------------------- waiters (read-your-writes)

class Waiters {
  constructor() {
    /** @type {Set<{pos: number, resolve: (v: number) => void, reject: (e: Error) => void, timer: any}>} */
    this.set = new Set();
  }

  /**
   * @param {number} pos
   * @param {() => number | null} current the position reached, or null when not ready
   * @param {number | undefined} timeout ms
   * @returns {Promise<number>}
   */
  wait(pos, current, timeout) {
    const now = current();
    if (now !== null && now >= pos) return Promise.resolve(now);
    return new Promise((resolve, reject) => {
      const w = { pos, resolve, reject, timer: /** @type {any} */ (null) };
      if (timeout !== undefined && timeout !== null) {
        w.timer = setTimeout(() => {
          this.set.delete(w);
          reject(new SyncError("timeout", `position ${pos} not seen within ${timeout} ms`));
        }, timeout);
      }
      this.set.add(w);
    });
  }

  /** @param {number | null} reached */
  check(reached) {
    if (reached === null) return;
    for (const w of [...this.set]) {
      if (reached >= w.pos) {
        this.set.delete(w);
        clearTimeout(w.timer);
        w.resolve(reached);
      }
    }
  }

  /** @param {Error} error */
  rejectAll(error) {
    for (const w of [...this.set]) {
      clearTimeout(w.timer);
      w.reject(error);
    }
    this.set.clear();
  }
}

/** An error of this client or of the server (`code` is the protocol's error code). */
export class SyncError extends Error {
  /** @param {string} code @param {string} reason */
  constructor(code, reason) {
    super(`${code}: ${reason}`);
    this.name = "SyncError";
    this.code = code;
    this.reason = reason;
  }
}

// ---------------------------------------------------------------- subscriptions

/** Retry these server errors on a subscription after a backoff; the rest are final. */
const RETRYABLE = new Set(["unavailable", "limit", "internal", "backpressure"]);

/**
 * What the three kinds share: where they are in their lifetime on the current connection.
 * status: idle (to send) · pending (sent, no ok yet) · active · revoked · denied · failed ·
 * closed.
 */
class Subscription extends Emitter {
  /**
   * @param {SyncClient} client
   * @param {"sub" | "kv_sub" | "js_sub"} op
   * @param {string} target
   * @param {string} pattern
   */
  constructor(client, op, target, pattern) {
    super();
    this.client = client;
    this.op = op;
    this.target = target;
    this.pattern = pattern;
    /** @type {string | null} the inbox on the current connection */
    this.inbox = null;
    this.status = "idle";
    /** @type {ServerError | null} */
    this.error = null;
    this.revoked = false;
    this.retries = 0;
  }

  /** @returns {Record<string, any> | undefined} the request's data */
  requestData() {
    return undefined;
  }

  /** @param {any} _data */
  onOk(_data) {
    this.status = "active";
    this.retries = 0;
  }

  /** @param {Envelope} _env */
  onMessage(_env) {}

  /** @param {ServerError} err */
  onError(err) {
    this.error = err;
    this.inbox = null;
    if (err.code === "forbidden") {
      this.status = "denied";
    } else if (err.code === "revoked") {
      this.onRevoked();
      return;
    } else if (RETRYABLE.has(err.code)) {
      this.status = "idle";
      this.client._retryLater(this);
    } else {
      this.status = "failed";
    }
    this.emit("error", err);
  }

  /** The capabilities no longer allow it: the server ended it. */
  onRevoked() {
    this.inbox = null;
    this.status = "revoked";
    this.revoked = true;
    this.error = { code: "revoked", reason: "capability revoked" };
    this.emit("revoked", this.error);
  }

  /** The connection dropped: send it again on the next one. */
  onConnectionLost() {
    this.inbox = null;
    if (this.status === "pending" || this.status === "active") this.status = "idle";
  }

  /** Re-sent after a grant: no longer revoked. */
  onRestoring() {
    this.revoked = false;
    this.error = null;
  }

  /** End the subscription (idempotent). */
  close() {
    if (this.status === "closed") return;
    this.client._remove(this);
    this.status = "closed";
    this.emit("closed");
  }
}

/** A core NATS subscription: at-most-once messages, nothing to resume. */
export class CoreSubscription extends Subscription {
  /**
   * @param {SyncClient} client
   * @param {string} subject
   * @param {(payload: any, msg: {subject: string, envelope: Envelope}) => void} [handler]
   */
  constructor(client, subject, handler) {
    super(client, "sub", subject, subject);
    if (handler) this.on("message", handler);
  }

  /** @param {Envelope} env */
  onMessage(env) {
    if (env.op !== "sub_msg") return;
    const d = env.data || {};
    const payload = d.payload !== undefined ? d.payload : d.payload_b64 !== undefined ? b64(d.payload_b64) : null;
    this.emit("message", payload, { subject: env.target || "", envelope: env });
  }
}

/**
 * A live KV bucket (or the keys of `pattern` in it): the counterpart of the seed's `KV`
 * type. `state`, `revision`, `values` (a Map of decoded values), `change` events.
 */
export class KvStore extends Subscription {
  /**
   * @param {SyncClient} client
   * @param {string} bucket
   * @param {{pattern?: string, decode?: (value: any, meta: {key: string, revision: number}) => any,
   *          resume?: "since" | "resync", onRevoked?: (e: ServerError) => void}} [opts]
   */
  constructor(client, bucket, opts = {}) {
    super(client, "kv_sub", bucket, opts.pattern || ">");
    this.book = new KvBook(opts.decode);
    this.useSince = opts.resume !== "resync";
    this._resumed = false;
    /** @type {StoreState} */
    this.state = "connecting";
    this._waiters = new Waiters();
    if (opts.onRevoked) this.on("revoked", opts.onRevoked);
  }

  /** @returns {Map<string, any>} key → decoded value */
  get values() {
    return this.book.values;
  }

  /** The highest KV revision this store has seen (bucket-wide at `synced`). */
  get revision() {
    return this.book.revision;
  }

  /** @param {StoreState} state */
  _setState(state) {
    if (this.state === state) return;
    this.state = state;
    this.emit("state", state);
  }

  requestData() {
    const since = this.book.begin(this.useSince);
    this._resumed = since !== undefined;
    /** @type {Record<string, any>} */
    const data = { pattern: this.pattern };
    if (since !== undefined) data.since_revision = since;
    this._setState("loading");
    return data;
  }

  /** @param {any} data */
  onOk(data) {
    super.onOk(data);
    this.book.ok(data || {}, this._resumed);
  }

  /** @param {Envelope} env */
  onMessage(env) {
    if (env.op !== "kv_msg") return;
    const d = env.data || {};
    if (d.op === "synced") {
      if (this.inbox === null || env.inbox !== this.inbox) return;
      const dropped = this.book.markSynced(d.revision);
      if (dropped.length) this.emit("change", dropped);
      this._setState("synced");
      this._waiters.check(this.book.revision);
      return;
    }
    let change;
    try {
      change = this.book.apply(d);
    } catch (e) {
      this.emit("error", { code: "decode", reason: String(e) });
      return;
    }
    if (change) this.emit("change", [change]);
    if (this.state === "synced") this._waiters.check(this.book.revision);
  }

  /** @param {ServerError} err */
  onError(err) {
    super.onError(err);
    if (this.status !== "idle") this._setState("error");
  }

  onRevoked() {
    const dropped = this.book.clear();
    super.onRevoked();
    if (dropped.length) this.emit("change", dropped);
    this._setState("error");
  }

  onConnectionLost() {
    super.onConnectionLost();
    if (this.status === "idle") this._setState("connecting");
  }

  onRestoring() {
    super.onRestoring();
    this._setState("connecting");
  }

  /**
   * Resolves once this store has seen `revision` (e.g. the one an HTTP write returned) and
   * is synced: from then on every tab with this store shows the write.
   * @param {number} revision
   * @param {{timeout?: number}} [opts]
   * @returns {Promise<number>}
   */
  seen(revision, opts = {}) {
    if (this.status === "closed") return Promise.reject(new SyncError("closed", "store closed"));
    return this._waiters.wait(
      Number(revision),
      () => (this.state === "synced" ? this.book.revision : null),
      opts.timeout,
    );
  }

  /** Read one decoded value. @param {string} key */
  get(key) {
    return this.book.values.get(key);
  }

  /** The KV revision of a key's current value (for `If-Match`). @param {string} key */
  revisionOf(key) {
    return this.book.values.has(key) ? this.book.revs.get(key) : undefined;
  }

  close() {
    super.close();
    this._waiters.rejectAll(new SyncError("closed", "store closed"));
  }
}

/**
 * @typedef {{seq: number, subject: string, payload: any, time: string}} StreamMessage
 */

/** A JetStream consumer: seq tracking, de-duplication, resume at `last + 1`. */
export class StreamSubscription extends Subscription {
  /**
   * @param {SyncClient} client
   * @param {string} name
   * @param {StreamOptions & {onMessage?: (m: StreamMessage) => any,
   *          onRevoked?: (e: ServerError) => void}} [opts]
   */
  constructor(client, name, opts = {}) {
    super(client, "js_sub", name, opts.filter || ">");
    this.book = new StreamBook(opts);
    this.ack = !!opts.ack;
    /** @type {"connecting" | "loading" | "live" | "error"} */
    this.state = "connecting";
    this._waiters = new Waiters();
    if (opts.onMessage) this.on("message", opts.onMessage);
    if (opts.onRevoked) this.on("revoked", opts.onRevoked);
  }

  /** The last seq delivered to the app. */
  get lastSeq() {
    return this.book.lastSeq;
  }

  /** @param {string} state */
  _setState(state) {
    if (this.state === state) return;
    this.state = /** @type {any} */ (state);
    this.emit("state", state);
  }

  requestData() {
    this._setState("loading");
    return this.book.request();
  }

  /** @param {any} data */
  onOk(data) {
    super.onOk(data);
    const r = this.book.ok(data || {});
    if (r.reset) this.emit("reset", r);
    if (r.gap) this.emit("gap", r);
    this._setState("live");
  }

  /** @param {Envelope} env */
  onMessage(env) {
    if (env.op !== "js_msg" || env.inbox !== this.inbox) return;
    const d = env.data || {};
    const seq = Number(d.seq);
    const fresh = this.book.accept(seq);
    const inbox = this.inbox;
    if (!fresh) {
      if (this.ack) this.client._ack(this, inbox, seq); // a redelivery: ack it again
      return;
    }
    const payload = d.payload !== undefined ? d.payload : d.payload_b64 !== undefined ? b64(d.payload_b64) : null;
    /** @type {StreamMessage} */
    const msg = { seq, subject: d.subject, payload, time: d.time };
    const results = [];
    const set = this._handlers.get("message");
    for (const fn of set ? [...set] : []) {
      try {
        results.push(fn(msg));
      } catch (e) {
        setTimeout(() => {
          throw e;
        });
      }
    }
    if (this.ack) {
      Promise.all(results).then(
        () => this.client._ack(this, inbox, seq),
        () => {}, // not acked: the server redelivers it
      );
    }
    this._waiters.check(this.book.lastSeq);
  }

  /** @param {ServerError} err */
  onError(err) {
    super.onError(err);
    if (this.status !== "idle") this._setState("error");
  }

  onRevoked() {
    super.onRevoked();
    this._setState("error");
  }

  onConnectionLost() {
    super.onConnectionLost();
    if (this.status === "idle") this._setState("connecting");
  }

  /**
   * Resolves once the message with this seq (e.g. the one `chat.send` returned) or a later
   * one has been delivered.
   * @param {number} seq
   * @param {{timeout?: number}} [opts]
   * @returns {Promise<number>}
   */
  seen(seq, opts = {}) {
    if (this.status === "closed") return Promise.reject(new SyncError("closed", "stream closed"));
    return this._waiters.wait(Number(seq), () => this.book.lastSeq, opts.timeout);
  }

  close() {
    super.close();
    this._waiters.rejectAll(new SyncError("closed", "stream closed"));
  }
}

// ---------------------------------------------------------------- the connection

/**
 * @typedef {{
 *   url?: string,
 *   WebSocket?: any,
 *   backoff?: BackoffOptions,
 *   pingInterval?: number,
 *   pongTimeout?: number,
 *   stableAfter?: number,
 *   refresh?: () => Promise<{token: string, expires_at?: number}>,
 *   expiresAt?: number,
 *   refreshBefore?: number,
 *   authCheckAfter?: number,
 *   connect?: boolean,
 *   random?: () => number,
 * }} ClientOptions
 */

/** Close codes after which reconnecting cannot help. */
const FINAL_CLOSES = new Set([1002, 4403]);

/** The default `/ws` URL of the page's own origin. */
function defaultUrl() {
  const loc = globalThis.location;
  if (!loc) throw new Error("no location: pass options.url");
  return `${loc.protocol === "https:" ? "wss:" : "ws:"}//${loc.host}/ws`;
}

/**
 * One connection per app, shared by every store and stream. Events: `state`
 * (ConnectionState, details), `capabilities` (caps, revoked refs), `error` (a server error
 * that names no subscription).
 */
export class SyncClient extends Emitter {
  /** @param {ClientOptions} [options] */
  constructor(options = {}) {
    super();
    this.options = options;
    this.url = options.url || defaultUrl();
    this._WS = options.WebSocket || globalThis.WebSocket;
    /** @type {ConnectionState} */
    this.state = "connecting";
    /** @type {string | null} */
    this.user = null;
    /** @type {Capabilities | null} */
    this.capabilities = null;
    /** @type {Set<Subscription>} */
    this.subs = new Set();
    /** @type {Map<string, Subscription>} */
    this._inboxes = new Map();
    this._ids = 0;
    this.attempt = 0;
    this.connects = 0; // connections that got their first cap_update
    /** @type {number | null} ms until the next reconnect, while waiting */
    this.retryIn = null;
    /** @type {any} */
    this.ws = null;
    this._openedAt = 0;
    this._lastRx = 0;
    this._ready = false;
    this._closed = false;
    this._failures = 0; // connection attempts in a row that never got a cap_update
    /** @type {ServerError | null} the error frame that preceded a close */
    this._lastError = null;
    /** @type {any} */ this._retryTimer = null;
    /** @type {any} */ this._heartbeat = null;
    /** @type {any} */ this._refreshTimer = null;
    this.expiresAt = options.expiresAt || null;
    this._onOnline = () => {
      if (this.state === "reconnecting" && this._retryTimer) {
        clearTimeout(this._retryTimer);
        this._retryTimer = null;
        this._open();
      }
    };
    if (typeof globalThis.addEventListener === "function") {
      globalThis.addEventListener("online", this._onOnline);
    }
    this._scheduleRefresh();
    if (options.connect !== false) this._open();
  }

  // ---------------------------------------------------------------- public

  /**
   * A live KV store.
   * @param {string} bucket
   * @param {ConstructorParameters<typeof KvStore>[2]} [opts]
   */
  kv(bucket, opts) {
    return this._add(new KvStore(this, bucket, opts));
  }

  /**
   * A core subscription; `handler(payload, {subject, envelope})` per message.
   * @param {string} subject subject or pattern
   * @param {(payload: any, msg: {subject: string, envelope: Envelope}) => void} [handler]
   */
  subscribe(subject, handler) {
    return this._add(new CoreSubscription(this, subject, handler));
  }

  /**
   * A JetStream subscription (history + live), de-duplicated by seq.
   * @param {string} name stream
   * @param {ConstructorParameters<typeof StreamSubscription>[2]} [opts]
   */
  stream(name, opts) {
    return this._add(new StreamSubscription(this, name, opts));
  }

  /**
   * Do the current capabilities allow this? (A UI hint; the server decides.)
   * @param {"sub" | "kv_sub" | "js_sub" | "cmd"} op
   * @param {string} target
   * @param {string} [pattern]
   */
  allows(op, target, pattern) {
    return allows(this.capabilities, op, target, pattern);
  }

  /** Close the connection for good and end every subscription. */
  close() {
    if (this._closed) return;
    this._closed = true;
    for (const s of [...this.subs]) s.close();
    this._stopTimers();
    clearTimeout(this._refreshTimer);
    if (typeof globalThis.removeEventListener === "function") {
      globalThis.removeEventListener("online", this._onOnline);
    }
    const ws = this.ws;
    this.ws = null;
    if (ws) {
      ws.onopen = ws.onmessage = ws.onerror = ws.onclose = null;
      try {
        ws.close(1000, "client closed");
      } catch {
        // already closed
      }
    }
    this._setState("closed", { code: 1000, reason: "client closed" });
  }

  /** Reconnect now (e.g. from a "retry" button), skipping the backoff wait. */
  reconnect() {
    if (this._closed) return;
    if (this.ws) {
      try {
        this.ws.close(4000, "reconnect");
      } catch {
        // ignore
      }
      return;
    }
    clearTimeout(this._retryTimer);
    this._retryTimer = null;
    this._open();
  }

  // ---------------------------------------------------------------- internals: subscriptions

  /**
   * @template {Subscription} S
   * @param {S} sub
   * @returns {S}
   */
  _add(sub) {
    if (this._closed) throw new SyncError("closed", "client closed");
    this.subs.add(sub);
    if (this._ready) this._send_sub(sub);
    return sub;
  }

  /** @param {Subscription} sub */
  _remove(sub) {
    this.subs.delete(sub);
    if (sub.inbox !== null) {
      this._inboxes.delete(sub.inbox);
      if (this._ready && (sub.status === "pending" || sub.status === "active")) {
        this._send({ op: "unsub", target: sub.target, inbox: sub.inbox });
      }
      sub.inbox = null;
    }
  }

  /** @param {Subscription} sub */
  _send_sub(sub) {
    const inbox = `c${++this._ids}`;
    sub.inbox = inbox;
    sub.status = "pending";
    this._inboxes.set(inbox, sub);
    /** @type {Envelope} */
    const env = { op: sub.op, target: sub.target, inbox };
    const data = sub.requestData();
    if (data !== undefined) env.data = data;
    this._send(env);
  }

  /** A retryable error on one subscription: send it again after a backoff. @param {Subscription} sub */
  _retryLater(sub) {
    const delay = backoffDelay(sub.retries++, this.options.backoff, this.options.random);
    setTimeout(() => {
      if (this._ready && sub.status === "idle" && this.subs.has(sub)) this._send_sub(sub);
    }, delay);
  }

  /** Send every subscription that needs it on this connection (after cap_update). */
  _syncSubs() {
    for (const sub of this.subs) {
      if (sub.status === "idle") {
        this._send_sub(sub);
      } else if (
        (sub.status === "revoked" || sub.status === "denied") &&
        this.allows(/** @type {any} */ (sub.op), sub.target, sub.pattern)
      ) {
        sub.onRestoring();
        this._send_sub(sub);
      }
    }
  }

  /**
   * @param {StreamSubscription} sub
   * @param {string | null} inbox
   * @param {number} seq
   */
  _ack(sub, inbox, seq) {
    if (inbox === null || inbox !== sub.inbox || !this._ready) return; // redelivered later
    this._send({ op: "ack", target: sub.target, inbox, data: { seq } });
  }

  // ---------------------------------------------------------------- internals: socket

  /** @param {Envelope} env */
  _send(env) {
    const ws = this.ws;
    if (!ws || ws.readyState !== 1) return false;
    ws.send(JSON.stringify(env));
    return true;
  }

  /** @param {ConnectionState} state @param {Record<string, any>} [details] */
  _setState(state, details = {}) {
    const changed = this.state !== state;
    this.state = state;
    if (changed || details.retryIn !== undefined) this.emit("state", state, details);
  }

  _open() {
    if (this._closed) return;
    this.retryIn = null;
    if (this.state !== "connecting") this._setState("reconnecting", { retryIn: 0 });
    let ws;
    try {
      ws = new this._WS(this.url);
    } catch (e) {
      this._scheduleReconnect(1006, String(e));
      return;
    }
    this.ws = ws;
    this._ready = false;
    this._lastError = null;
    ws.onopen = () => {
      this._openedAt = Date.now();
      this._lastRx = Date.now();
      this._startHeartbeat();
    };
    ws.onmessage = (/** @type {{data: any}} */ ev) => {
      this._lastRx = Date.now();
      if (typeof ev.data !== "string") return;
      for (const env of splitFrame(ev.data)) this._dispatch(env);
    };
    ws.onerror = () => {}; // the close event follows and says what to do
    ws.onclose = (/** @type {{code: number, reason: string}} */ ev) => {
      if (this.ws !== ws) return;
      this._onClose(ev.code, ev.reason);
    };
  }

  /** @param {number} code @param {string} reason */
  _onClose(code, reason) {
    const wasReady = this._ready;
    const lived = this._openedAt ? Date.now() - this._openedAt : 0;
    this.ws = null;
    this._ready = false;
    this._openedAt = 0;
    this._stopTimers();
    this._inboxes.clear();
    for (const sub of this.subs) sub.onConnectionLost();
    if (this._closed) return;
    const error = this._lastError;
    if (!wasReady) this._failures++;
    else this._failures = 0;
    if (wasReady && lived >= (this.options.stableAfter ?? 5000)) this.attempt = 0;
    if (FINAL_CLOSES.has(code)) {
      this._setState(code === 4403 ? "unauthorized" : "closed", { code, reason, error });
      return;
    }
    if (code === 4401) {
      // Expired or revoked token (logout): a refreshed cookie may let us back in.
      this._reauthenticate(code, reason, error);
      return;
    }
    const checkAfter = this.options.authCheckAfter ?? 3;
    if (!wasReady && this.options.refresh && this._failures >= checkAfter && this._failures % checkAfter === 0) {
      // The upgrade keeps failing: a browser cannot see a 401, so ask the API.
      this._reauthenticate(code, reason, error);
      return;
    }
    this._scheduleReconnect(code, reason, error);
  }

  /** @param {number} code @param {string} reason @param {ServerError | null} error */
  _reauthenticate(code, reason, error) {
    const refresh = this.options.refresh;
    if (!refresh) {
      this._setState("unauthorized", { code, reason, error });
      return;
    }
    this._setState("reconnecting", { code, reason, error });
    refresh().then(
      (r) => {
        if (r && r.expires_at) this.expiresAt = r.expires_at;
        this._scheduleRefresh();
        this._scheduleReconnect(code, reason, error);
      },
      (e) => {
        const status = e && e.status;
        if (status === 401 || status === 403) {
          this._setState("unauthorized", { code, reason, error });
        } else {
          this._scheduleReconnect(code, reason, error); // the API is down: try again later
        }
      },
    );
  }

  /** @param {number} code @param {string} reason @param {ServerError | null} [error] */
  _scheduleReconnect(code, reason, error = null) {
    if (this._closed) return;
    const delay = backoffDelay(this.attempt++, this.options.backoff, this.options.random);
    this.retryIn = delay;
    this._setState("reconnecting", { code, reason, error, retryIn: delay });
    clearTimeout(this._retryTimer);
    this._retryTimer = setTimeout(() => {
      this._retryTimer = null;
      this._open();
    }, delay);
  }

  _startHeartbeat() {
    const interval = this.options.pingInterval ?? 20000;
    const timeout = this.options.pongTimeout ?? 10000;
    clearInterval(this._heartbeat);
    this._heartbeat = setInterval(() => {
      const ws = this.ws;
      if (!ws) return;
      if (Date.now() - this._lastRx > interval + timeout) {
        // Nothing heard, not even our pong: the connection is dead without a close.
        try {
          ws.close(4000, "heartbeat timeout");
        } catch {
          // ignore
        }
        if (this.ws === ws) this._onClose(1006, "heartbeat timeout");
        return;
      }
      this._send({ op: "ping", inbox: `p${++this._ids}` });
    }, interval);
  }

  _stopTimers() {
    clearInterval(this._heartbeat);
    this._heartbeat = null;
    clearTimeout(this._retryTimer);
    this._retryTimer = null;
  }

  _scheduleRefresh() {
    clearTimeout(this._refreshTimer);
    const refresh = this.options.refresh;
    if (!refresh || !this.expiresAt) return;
    const before = this.options.refreshBefore ?? 60;
    const ms = Math.max(1000, (this.expiresAt - before) * 1000 - Date.now());
    this._refreshTimer = setTimeout(() => {
      if (this._closed) return;
      refresh().then(
        (r) => {
          if (r && r.expires_at) this.expiresAt = r.expires_at;
          if (r && r.token) this._send({ op: "refresh", inbox: `r${++this._ids}`, data: { token: r.token } });
          this._scheduleRefresh();
        },
        () => {
          this._refreshTimer = setTimeout(() => this._scheduleRefresh(), 10000);
        },
      );
    }, Math.min(ms, 2 ** 31 - 1));
  }

  // ---------------------------------------------------------------- internals: dispatch

  /** @param {Envelope} env */
  _dispatch(env) {
    switch (env.op) {
      case "cap_update":
        this._capUpdate(env.data || {});
        return;
      case "ping":
        this._send(env.inbox ? { op: "pong", inbox: env.inbox } : { op: "pong" });
        return;
      case "pong":
        return;
      case "error": {
        const err = { code: String((env.data || {}).code || "internal"), reason: String((env.data || {}).reason || "") };
        const sub = env.inbox != null ? this._inboxes.get(env.inbox) : undefined;
        if (sub) {
          this._inboxes.delete(/** @type {string} */ (env.inbox));
          sub.onError(err);
        } else {
          this._lastError = err;
          this.emit("error", err);
        }
        return;
      }
      case "ok": {
        const sub = env.inbox != null ? this._inboxes.get(env.inbox) : undefined;
        if (sub && sub.status === "pending") sub.onOk(env.data);
        return;
      }
      default: {
        const live = [...this.subs].filter((s) => s.status === "pending" || s.status === "active");
        for (const sub of recipients(env, live)) sub.onMessage(env);
      }
    }
  }

  /** @param {{user?: string, capabilities?: Capabilities, revoked?: {inbox: string}[]}} data */
  _capUpdate(data) {
    if (data.user) this.user = data.user;
    this.capabilities = data.capabilities || {};
    const revoked = [];
    for (const ref of data.revoked || []) {
      const sub = this._inboxes.get(ref.inbox);
      if (sub) {
        this._inboxes.delete(ref.inbox);
        revoked.push(sub);
        sub.onRevoked();
      }
    }
    const first = !this._ready;
    if (first) {
      this._ready = true;
      this._failures = 0;
      this.connects++;
      this._setState("open", { connects: this.connects });
    }
    this.emit("capabilities", this.capabilities, revoked);
    this._syncSubs();
  }
}

/**
 * The app's one connection (same origin `/ws`, the session cookie).
 * @param {ClientOptions} [options]
 */
export function createClient(options) {
  return new SyncClient(options);
}

// ---------------------------------------------------------------- HTTP helper

/** An HTTP error: the problem+json body (RFC 9457) as fields. */
export class ApiError extends Error {
  /**
   * @param {number} status
   * @param {{type?: string, title?: string, detail?: string, [k: string]: any}} problem
   */
  constructor(status, problem) {
    super(problem.detail || problem.title || `HTTP ${status}`);
    this.name = "ApiError";
    this.status = status;
    this.type = problem.type || "about:blank";
    this.title = problem.title || "";
    this.detail = problem.detail || "";
    this.problem = problem;
  }
}

/**
 * @typedef {{json?: any, ifMatch?: number | string, headers?: Record<string, string>,
 *            idempotencyKey?: string, signal?: AbortSignal}} RequestOptions
 * @typedef {{status: number, etag: string | null, location: string | null,
 *            headers: Headers, body: any}} ApiResponse
 */

/**
 * A small JSON client for the HTTP API (same origin, the session cookie). It never touches
 * a SyncClient's state: a write's answer carries the position to `seen()`, nothing more.
 * Non-2xx answers throw ApiError with the problem's fields; network failures throw
 * ApiError with status 0.
 * @param {{base?: string, fetch?: typeof fetch}} [opts]
 */
export function createApi(opts = {}) {
  const base = opts.base ?? "/api";
  const doFetch = opts.fetch || globalThis.fetch.bind(globalThis);

  /**
   * @param {string} method
   * @param {string} path
   * @param {RequestOptions} [o]
   * @returns {Promise<ApiResponse>}
   */
  async function request(method, path, o = {}) {
    /** @type {Record<string, string>} */
    const headers = { Accept: "application/json, application/problem+json", ...(o.headers || {}) };
    /** @type {RequestInit} */
    const init = { method, headers, credentials: "same-origin", signal: o.signal };
    if (o.json !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(o.json);
    }
    if (o.ifMatch !== undefined && o.ifMatch !== null) {
      const tag = String(o.ifMatch);
      headers["If-Match"] = tag.startsWith('"') || tag === "*" ? tag : `"${tag}"`;
    }
    if (o.idempotencyKey) headers["Idempotency-Key"] = o.idempotencyKey;
    let resp;
    try {
      resp = await doFetch(base + path, init);
    } catch (e) {
      if (e && /** @type {any} */ (e).name === "AbortError") throw e;
      throw new ApiError(0, { title: "Network error", detail: `the server could not be reached (${e})` });
    }
    const text = resp.status === 204 ? "" : await resp.text();
    let body = null;
    if (text) {
      try {
        body = JSON.parse(text);
      } catch {
        body = text;
      }
    }
    if (!resp.ok) {
      const problem =
        body && typeof body === "object" ? body : { title: resp.statusText, detail: body ? String(body) : "" };
      throw new ApiError(resp.status, { status: resp.status, ...problem });
    }
    return {
      status: resp.status,
      etag: resp.headers.get("ETag"),
      location: resp.headers.get("Location"),
      headers: resp.headers,
      body,
    };
  }

  /** @param {string} method */
  const verb = (method) =>
    /**
     * @param {string} path
     * @param {any} [json]
     * @param {RequestOptions} [o]
     */
    async (path, json, o = {}) => (await request(method, path, json === undefined ? o : { ...o, json })).body;

  return {
    request,
    /** @param {string} path @param {RequestOptions} [o] */
    get: async (path, o = {}) => (await request("GET", path, o)).body,
    post: verb("POST"),
    put: verb("PUT"),
    /** @param {string} path @param {RequestOptions} [o] */
    del: async (path, o = {}) => (await request("DELETE", path, o)).body,
  };
}
