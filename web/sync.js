// sync.js: the browser client of natsgate's wire protocol (docs/protocol.md, v1).
//
// One session per app, authenticated by the `session` cookie (same origin), carried by a
// WebSocket (`/ws`) or, where WebSocket keeps failing (3 failed opens in a row), by HTTP long
// polling (`/poll`): the same envelopes, the same resume rules, one connection state for the
// app plus `client.transport`; while polling, WebSocket is tried again every minute.
// Client state changes only from server messages; HTTP writes (the `api` helper at the end)
// acknowledge and return a position that `store.seen()` / `stream.seen()` wait for.
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
// Layout: pure parts first (frame splitting, wildcard matching, routing, backoff, resume
// bookkeeping, the fallback decision, long-poll bookkeeping — exported and unit-tested with
// node:test), then events and the three subscription kinds, then the two transports and
// the connection, then the HTTP helper. No dependencies, no build step.

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
  if (!isFanOut(env)) {
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

/**
 * True for fan-out data (`sub_msg`, `kv_msg` put/delete/purge), which carries no inbox and is
 * routed by pattern; everything else names the one subscription it belongs to by its inbox.
 * @param {Envelope} env
 */
function isFanOut(env) {
  return env.op === "sub_msg" || (env.op === "kv_msg" && (env.data || {}).op !== "synced");
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
      const raw = carried(d.value, d.value_b64);
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

/**
 * What a message carries (docs/protocol.md, "Payloads"): the embedded JSON when there is one, else
 * the bytes of its base64 form (`payload_b64`, `value_b64`), else null.
 * @param {any} json @param {string | undefined} base64
 */
function carried(json, base64) {
  return json !== undefined ? json : base64 !== undefined ? b64(base64) : null;
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
 * @typedef {{reset: boolean, gap: boolean, expected: number | null, position: number}} ResumeReport
 */

/**
 * Where a JetStream subscription is: the last seq delivered to the app (dedupe: a seq at or
 * below it is a redelivery, also across a reconnect), and where a re-subscription starts
 * (`last + 1`, or the first `ok`'s position when nothing came yet).
 *
 * A durable (`durable`) keeps its position on the server (its floor in KV `gw_durables`):
 * the first subscription sends the start options (used only if the durable is created), a
 * re-subscription sends the durable alone and the server resumes after its floor, unacked
 * messages first (at-least-once: what the app already had is dropped here by `seq`).
 */
export class StreamBook {
  /** @param {StreamOptions} [opts] */
  constructor(opts = {}) {
    this.opts = opts;
    this.lastSeq = 0;
    /** @type {number | null} the seq the next subscription starts at, once known */
    this.next = null;
    /** whether the subscription being sent is a resume (an `ok` came before) */
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
    this.resumed = this.next !== null;
    if (this.resumed && o.durable) return data; // the server knows where it stands
    if (this.resumed) data.start_seq = this.next;
    else if (o.startSeq !== undefined) data.start_seq = o.startSeq;
    else if (o.timeDelta !== undefined) data.time_delta = o.timeDelta;
    else if (o.startTime !== undefined) data.start_time = o.startTime;
    return data;
  }

  /**
   * The `ok` of the js_sub. Returns what the app must know: `reset` when the stream was
   * recreated (seqs start again: forget what we had), `gap` when messages we had not seen
   * are gone (purged; for a durable also: the durable was deleted or expired, and started
   * afresh): both only for a resume that the server could not honour. A resumed durable's
   * `position` may lie at or below `lastSeq` (unacked messages come again): no reset.
   * @param {{position?: number, recovered?: boolean, durable?: "created" | "resumed"}} data
   * @returns {ResumeReport}
   */
  ok(data) {
    const position = Number(data && data.position) || 1;
    const expected = this.resumed ? this.next : null;
    // A durable that had to be created again lost its position, whatever `recovered` says.
    const lost =
      !!data && (data.recovered === false || (!!this.opts.durable && data.durable === "created"));
    let reset = false;
    let gap = false;
    if (this.resumed && lost && expected !== null) {
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

// ---------------------------------------------------------------- pure: which transport

/**
 * @typedef {"websocket" | "polling"} TransportKind
 * @typedef {{fallbackAfter?: number, probeInterval?: number, firstProbe?: number,
 *            polling?: boolean}} FallbackOptions
 */

/**
 * The fallback decision (docs/protocol.md, "Fallback transport"), with no timers and no sockets:
 * which transport the next connection attempt uses. WebSocket first; after `fallbackAfter`
 * WebSocket attempts in a row that never became a session, long polling. A polling attempt
 * that fails too says the server is away rather than WebSocket blocked: the next attempt is
 * WebSocket again, and one more WebSocket failure goes back to polling, so during an outage
 * the two alternate and whichever works first wins. While a session runs over polling, a
 * WebSocket is tried (the client does that) and taken when it works: first after
 * `firstProbe` ms — a gateway restart also fails a few WebSockets in a row, and should not
 * cost a minute of polling — then every `probeInterval` ms.
 */
export class TransportPolicy {
  /** @param {FallbackOptions} [opts] */
  constructor(opts = {}) {
    this.fallbackAfter = Math.max(1, opts.fallbackAfter ?? 3);
    this.probeInterval = opts.probeInterval ?? 60000;
    this.firstProbe = Math.min(opts.firstProbe ?? 5000, this.probeInterval);
    this.enabled = opts.polling !== false;
    /** @type {TransportKind} the transport of the next attempt */
    this.mode = "websocket";
    /** WebSocket attempts in a row that never became a session */
    this.wsFailures = 0;
    /** polling attempts in a row that never became a session */
    this.pollFailures = 0;
  }

  /** Start with polling (a network known to refuse WebSocket). */
  preferPolling() {
    if (!this.enabled) return;
    this.mode = "polling";
    this.wsFailures = this.fallbackAfter;
  }

  /**
   * An attempt over `kind` ended before its session started (no `cap_update`). Not for
   * auth refusals (4401, 4403): those say nothing about the transport.
   * @param {TransportKind} kind
   */
  failed(kind) {
    if (kind === "websocket") {
      this.wsFailures++;
      if (this.enabled && this.wsFailures >= this.fallbackAfter) this.mode = "polling";
    } else {
      this.pollFailures++;
      this.mode = "websocket";
      this.wsFailures = this.fallbackAfter - 1;
    }
  }

  /**
   * A session started over `kind`: the next attempt (after it ends) uses the same.
   * @param {TransportKind} kind
   */
  connected(kind) {
    this.mode = kind;
    this.pollFailures = 0;
    if (kind === "websocket") this.wsFailures = 0;
  }

  /**
   * Should a WebSocket be tried beside a session that runs over `kind`?
   * @param {TransportKind} kind
   */
  probes(kind) {
    return kind === "polling" && this.probeInterval > 0 && Number.isFinite(this.probeInterval);
  }

  /**
   * ms before WebSocket try `n` (0 = the first) of a polling session, with up to 20 %
   * jitter so that clients that fell back together do not all try at once.
   * @param {number} n
   * @param {() => number} [random]
   */
  probeDelay(n, random = Math.random) {
    const base = n <= 0 ? this.firstProbe : this.probeInterval;
    return Math.round(base * (1 - 0.2 * random()));
  }
}

// ---------------------------------------------------------------- pure: long-poll bookkeeping

/**
 * Where a long-polling session is: `after` is the number of the last server frame handed to
 * the session. Every GET sends it, which acknowledges every frame up to it (the server
 * forgets them) and asks for the ones after it. `after` moves only once a whole response has
 * been read, so a response lost on the way is fetched again, never skipped, and frames are
 * never handed over twice.
 */
export class PollCursor {
  constructor() {
    this.after = 0;
  }

  /**
   * The query of the next GET.
   * @param {string} sid
   * @param {number} wait seconds the server may hold the request
   */
  query(sid, wait) {
    return `sid=${encodeURIComponent(sid)}&after=${this.after}&wait=${wait}`;
  }

  /**
   * A 200 answer, read in full: returns the text to hand to the session (the frames after
   * `after`, newline-separated; "" when there were none) and moves `after` to the answer's
   * last frame. Returns null, moving nothing, when the answer cannot be trusted (no or bad
   * `Poll-Last-Frame`, or one behind what we have): fetch again.
   * @param {string | null} lastFrame the `Poll-Last-Frame` header
   * @param {string} body
   * @returns {string | null}
   */
  accept(lastFrame, body) {
    if (lastFrame === null || !/^\s*\d+\s*$/.test(lastFrame)) return null;
    const last = Number(lastFrame);
    if (!Number.isSafeInteger(last) || last < this.after) return null;
    if (last === this.after) return "";
    this.after = last;
    return body;
  }
}

/**
 * What a long-polling HTTP answer means for the session, as a WebSocket close would:
 * `retry` (the same request again: a network error, 429 or 5xx), or the close `code`.
 * 410 carries the session's own close code (4401 → refresh, 4403 → stop, like a WebSocket
 * close); 404 `unknown_session` (another gateway process got the request) is an abnormal end
 * whose reconnect opens a new session and resumes; 401 is 4401.
 * @param {number} status HTTP status, 0 for no answer at all
 * @param {any} [problem] the problem+json body, when there is one
 * @returns {{retry: true, code?: undefined, reason: string} | {retry: false, code: number, reason: string}}
 */
export function pollOutcome(status, problem) {
  const p = problem && typeof problem === "object" ? problem : {};
  const detail = typeof p.detail === "string" ? p.detail : "";
  if (status === 0 || status === 429 || status >= 500) {
    return { retry: true, reason: status ? `HTTP ${status}` : "no answer" };
  }
  if (status === 410) {
    const code = Number(p.close_code);
    return { retry: false, code: Number.isInteger(code) && code > 0 ? code : 1006, reason: detail || "session closed" };
  }
  if (status === 404) return { retry: false, code: 1006, reason: `${p.code || "not found"}: ${detail || "reopen"}` };
  if (status === 401) return { retry: false, code: 4401, reason: detail || "unauthorized" };
  if (status === 403) return { retry: false, code: 1008, reason: detail || "forbidden" };
  return { retry: false, code: 1006, reason: `HTTP ${status}${detail ? `: ${detail}` : ""}` };
}

/** A session id for `/poll/open`: 24 characters of [A-Za-z0-9_-], from a CSPRNG when there is one. */
export function newSid() {
  const abc = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
  const bytes = new Uint8Array(24);
  const c = globalThis.crypto;
  if (c && typeof c.getRandomValues === "function") c.getRandomValues(bytes);
  else for (let i = 0; i < bytes.length; i++) bytes[i] = Math.floor(Math.random() * 256);
  return Array.from(bytes, (b) => abc[b & 63]).join("");
}

/**
 * The long-polling endpoint that goes with a WebSocket URL: `ws://h/ws` → `http://h/poll`.
 * @param {string} wsUrl
 */
export function pollUrlFor(wsUrl) {
  const u = new URL(wsUrl);
  u.protocol = u.protocol === "wss:" || u.protocol === "https:" ? "https:" : "http:";
  u.pathname = u.pathname.replace(/\/(ws)?$/, "") + "/poll";
  u.search = "";
  u.hash = "";
  return u.toString();
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
    this._call(event, args);
  }

  /**
   * Call every handler of `event`; returns what they returned (nothing for one that threw).
   * @param {string} event @param {any[]} args
   * @returns {any[]}
   */
  _call(event, args) {
    /** @type {any[]} */
    const results = [];
    const set = this._handlers.get(event);
    if (!set) return results;
    for (const fn of [...set]) {
      try {
        results.push(fn(...args));
      } catch (e) {
        // A broken handler must not break the connection: report it asynchronously.
        setTimeout(() => {
          throw e;
        });
      }
    }
    return results;
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

/** Sent on this connection and not ended: what server messages may reach. @param {Subscription} s */
const isLive = (s) => s.status === "pending" || s.status === "active";

/**
 * Retry these server errors on a subscription after a backoff; the rest are final. Among
 * them `taken_over` (a newer subscription holds the durable): sending it again would take
 * the durable back, and two tabs would take it from each other for ever.
 */
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

  /**
   * True for an error with this subscription's inbox that does not end it (the refusal of
   * something else sent with the inbox).
   * @param {ServerError} _err
   */
  ignores(_err) {
    return false;
  }

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
    if (isLive(this)) this.status = "idle";
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
    this.emit("message", carried(d.payload, d.payload_b64), { subject: env.target || "", envelope: env });
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

/** The reason of an `ack` the server refused: the seq was acked already, or comes again. */
const ACK_REFUSED = /^seq \d+ is not awaiting an ack$/;

/** Failed seqs remembered for their redelivery, at most. */
const FAILED_KEPT = 1000;

/**
 * A JetStream subscription: seq tracking, de-duplication by seq (also across reconnects),
 * resume at `last + 1` — or, for a durable, where the server says it stands.
 *
 * With `ack: true` a message is acked once its handlers are done. A redelivery of one the app
 * already has (delivery is at-least-once) is not handed on again but acked, once the first
 * delivery's handlers are done, so that the server does not send it again and again; one
 * whose handler failed is handed on again.
 *
 * A durable taken over by a newer subscription (another tab or device) ends with the
 * `error` event, code `taken_over`, status `failed`: it is never sent again by the client
 * (that would take the durable back). To take it back, close it and open a new stream.
 */
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
    /** @type {string | null} */
    this.durable = opts.durable || null;
    /** @type {"connecting" | "loading" | "live" | "error"} */
    this.state = "connecting";
    this._waiters = new Waiters();
    /** @type {Map<number, Promise<boolean>>} ack mode: seq → its handlers (true: done, false: failed) */
    this._handling = new Map();
    /** @type {Set<number>} ack mode: seqs whose handler failed, handed on again when they come again */
    this._failed = new Set();
    /** @type {Deferred | null} a `close({deleteDurable: true})` waiting for the subscription to be live */
    this._deleting = null;
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
    if (this._deleting) {
      this._sendDelete();
      return;
    }
    const r = this.book.ok(data || {});
    if (r.reset) {
      // seqs start again: the old ones' handlers and failures are not the new ones'
      this._handling.clear();
      this._failed.clear();
      this.emit("reset", r);
    }
    if (r.gap) this.emit("gap", r);
    this._setState("live");
  }

  /** @param {Envelope} env */
  onMessage(env) {
    if (env.op !== "js_msg" || env.inbox !== this.inbox) return;
    const d = env.data || {};
    const seq = Number(d.seq);
    if (!Number.isSafeInteger(seq) || seq < 1) return;
    const inbox = this.inbox;
    /** @type {StreamMessage} */
    const msg = { seq, subject: d.subject, payload: carried(d.payload, d.payload_b64), time: d.time };
    if (this.book.accept(seq)) {
      this._hand(msg, inbox);
      this._waiters.check(this.book.lastSeq);
      return;
    }
    // The app has it already (a resumed durable's unacked ones, an expired ack wait).
    if (!this.ack) return;
    if (this._failed.delete(seq)) {
      this._hand(msg, inbox);
      return;
    }
    const running = this._handling.get(seq);
    if (!running) {
      this.client._ack(this, inbox, seq);
      return;
    }
    running.then((done) => {
      if (this.status === "closed") return;
      if (done) this.client._ack(this, inbox, seq);
      else if (this._failed.delete(seq)) this._hand(msg, inbox);
    });
  }

  /**
   * Hand a message to the app; with acks, ack it (on the inbox it came with, if still
   * current) once every handler is done, or remember that one failed.
   * @param {StreamMessage} msg @param {string | null} inbox
   */
  _hand(msg, inbox) {
    const results = this._call("message", [msg]);
    if (!this.ack) return;
    const seq = msg.seq;
    const running = Promise.all(results).then(
      () => true,
      () => false, // not acked: the server sends it again, and it is handed on again
    );
    this._handling.set(seq, running);
    running.then((done) => {
      if (this._handling.get(seq) === running) this._handling.delete(seq);
      if (this.status === "closed") return;
      if (done) {
        this.client._ack(this, inbox, seq);
        return;
      }
      this._failed.add(seq);
      if (this._failed.size > FAILED_KEPT) this._failed.delete(/** @type {number} */ (this._failed.values().next().value));
    });
  }

  /**
   * An ack the server refused (acked already, or its ack wait expired and it comes again)
   * is no error of the subscription.
   * @param {ServerError} err
   */
  ignores(err) {
    return this.ack && isLive(this) && err.code === "not_found" && ACK_REFUSED.test(err.reason);
  }

  /** @param {ServerError} err */
  onError(err) {
    super.onError(err);
    if (this.status === "idle") return; // retried
    this._setState("error");
    this._failDelete(new SyncError(err.code, err.reason));
  }

  onRevoked() {
    super.onRevoked();
    this._setState("error");
    this._failDelete(new SyncError("revoked", "capability revoked"));
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

  /**
   * End the subscription (idempotent). The durable of a stream stays on the server, to be
   * resumed later; with `{deleteDurable: true}` it is deleted (`unsub` with
   * `delete_durable`): the promise resolves once the server confirmed it, and rejects with a
   * SyncError when it could not be: not a durable, not held here (`taken_over`, `revoked`,
   * ended), the connection lost before the answer (`unavailable`: it may or may not be
   * deleted). While reconnecting, the delete is sent once the stream is subscribed again.
   * @param {{deleteDurable?: boolean}} [opts]
   * @returns {Promise<void>}
   */
  close(opts = {}) {
    if (opts.deleteDurable) return this._delete();
    if (this.status !== "closed") {
      super.close();
      this._closed(new SyncError("closed", "stream closed"));
    }
    return Promise.resolve();
  }

  /** @returns {Promise<void>} */
  _delete() {
    if (!this.durable) return Promise.reject(new SyncError("bad_request", "not a durable stream"));
    if (this._deleting) return this._deleting.promise;
    if (this.status === "closed") return Promise.reject(new SyncError("closed", "stream closed"));
    if (!isLive(this) && this.status !== "idle") {
      const e = this.error || { code: this.status, reason: "" };
      return Promise.reject(new SyncError(e.code, `the durable is not held here${e.reason ? `: ${e.reason}` : ""}`));
    }
    this._deleting = deferred();
    const promise = this._deleting.promise;
    if (isLive(this)) this._sendDelete(); // pending: the server answers the js_sub first
    return promise;
  }

  /** Send the unsub that deletes the durable; the subscription is closed at once. */
  _sendDelete() {
    const deleting = /** @type {Deferred} */ (this._deleting);
    this._deleting = null;
    this.client._remove(this, deleting);
    this.status = "closed";
    this.emit("closed");
    this._closed(new SyncError("closed", "stream closed"));
  }

  /** @param {SyncError} error */
  _failDelete(error) {
    const deleting = this._deleting;
    this._deleting = null;
    if (deleting) deleting.reject(error);
  }

  /** @param {SyncError} error */
  _closed(error) {
    this._waiters.rejectAll(error);
    this._handling.clear();
    this._failed.clear();
    this._failDelete(error);
  }
}

/**
 * @typedef {{promise: Promise<void>, resolve: () => void, reject: (e: Error) => void}} Deferred
 */

/** @returns {Deferred} */
function deferred() {
  /** @type {any} */
  const d = {};
  d.promise = new Promise((resolve, reject) => {
    d.resolve = resolve;
    d.reject = reject;
  });
  return d;
}

// ---------------------------------------------------------------- transports

/**
 * What carries one session: a WebSocket, or long polling. The client only sees this:
 * `send(text)` one envelope (false when not open), `close(code, reason)`, and the handlers
 * it sets: `onopen()` once the carrier is up, `onmessage(text)` per frame (envelopes
 * separated by "\n"; "" is a sign of life with nothing in it), `onclose(code, reason)` once,
 * with the code a WebSocket close would carry. `detach()` drops the handlers (nothing more
 * reaches the client from it).
 * @typedef {{kind: TransportKind, send(text: string): boolean, close(code?: number, reason?: string): void,
 *            detach(): void, onopen: (() => void) | null, onmessage: ((text: string) => void) | null,
 *            onclose: ((code: number, reason: string) => void) | null}} Transport
 */

/** A WebSocket as a Transport. The constructor throws when the WebSocket cannot be made. */
export class WebSocketTransport {
  /** @param {any} WS a WebSocket constructor @param {string} url */
  constructor(WS, url) {
    /** @type {TransportKind} */
    this.kind = "websocket";
    /** @type {(() => void) | null} */ this.onopen = null;
    /** @type {((text: string) => void) | null} */ this.onmessage = null;
    /** @type {((code: number, reason: string) => void) | null} */ this.onclose = null;
    const ws = new WS(url);
    this.ws = ws;
    ws.onopen = () => this.onopen?.();
    ws.onmessage = (/** @type {{data: any}} */ ev) => {
      if (typeof ev.data === "string") this.onmessage?.(ev.data);
      else this.onmessage?.(""); // binary: not ours, but the connection is alive
    };
    ws.onerror = () => {}; // the close event follows and says what to do
    ws.onclose = (/** @type {{code: number, reason: string}} */ ev) => {
      const f = this.onclose;
      this.onclose = null;
      f?.(ev.code, ev.reason);
    };
  }

  /** @param {string} text */
  send(text) {
    if (this.ws.readyState !== 1) return false;
    this.ws.send(text);
    return true;
  }

  /** @param {number} [code] @param {string} [reason] */
  close(code = 1000, reason = "") {
    try {
      this.ws.close(code, reason);
    } catch {
      // already closed
    }
  }

  detach() {
    this.onopen = this.onmessage = this.onclose = null;
  }
}

/**
 * @typedef {{fetch?: typeof fetch, wait?: number, retries?: number, retryDelay?: number,
 *            sid?: string}} PollingOptions
 */

/** Client envelopes per POST /poll/send, at most (and at most ~32 KB; the server takes 64). */
const SEND_BATCH = 100;
const SEND_BYTES = 32 * 1024;

/**
 * One long-polling session as a Transport (docs/protocol.md, "Fallback transport", which
 * has the HTTP contract): POST `/open?sid=S`, a loop of `GET ?sid=S&after=N`
 * (each answer holds the frames after N; N only moves once an answer was read, so a lost one
 * is fetched again), client envelopes in POST `/send` (one request at a time, queued ones
 * batched), POST `/close`. Auth is the page's cookie, as for the WebSocket.
 */
export class PollingTransport {
  /** @param {string} url the endpoint, e.g. `http://host/poll` @param {PollingOptions} [opts] */
  constructor(url, opts = {}) {
    /** @type {TransportKind} */
    this.kind = "polling";
    this.url = url;
    this.sid = opts.sid || newSid();
    this.cursor = new PollCursor();
    this.wait = opts.wait ?? 25;
    this.retries = opts.retries ?? 3;
    this.retryDelay = opts.retryDelay ?? 250;
    this._fetch = opts.fetch || ((/** @type {any} */ u, /** @type {any} */ i) => globalThis.fetch(u, i));
    /** @type {"opening" | "open" | "closed"} */
    this.state = "opening";
    /** @type {(() => void) | null} */ this.onopen = null;
    /** @type {((text: string) => void) | null} */ this.onmessage = null;
    /** @type {((code: number, reason: string) => void) | null} */ this.onclose = null;
    /** @type {string[]} */ this._out = [];
    this._sending = false;
    /** @type {AbortController | null} */ this._get = null;
    /** @type {any} */ this._timer = null;
    queueMicrotask(() => this._start());
  }

  /** @param {string} path @param {string} [query] */
  _href(path, query) {
    return `${this.url}${path}?${query || `sid=${encodeURIComponent(this.sid)}`}`;
  }

  /** @param {string} path */
  _post(path, init = {}) {
    return this._fetch(this._href(path), {
      method: "POST",
      credentials: "same-origin",
      cache: "no-store",
      ...init,
    });
  }

  async _start() {
    if (this.state !== "opening") return;
    let resp;
    try {
      resp = await this._post("/open");
    } catch (e) {
      this._end(1006, `poll open failed (${e})`, false);
      return;
    }
    if (this.state !== "opening") {
      // closed while opening: the server has a session nobody will poll
      if (resp.ok) this._post("/close", { keepalive: true }).catch(() => {});
      return;
    }
    if (resp.status !== 200) {
      const r = pollOutcome(resp.status, await readProblem(resp));
      this._end(r.retry ? 1006 : r.code, `poll open: ${r.reason}`, false);
      return;
    }
    this.state = "open";
    this.onopen?.();
    this._loop();
  }

  async _loop() {
    let errors = 0;
    while (this.state === "open") {
      const ctl = new AbortController();
      this._get = ctl;
      // A request the network silently dropped: give up on it a while after the server's wait.
      const timer = setTimeout(() => ctl.abort(), (this.wait + 15) * 1000);
      /** @type {{retry: boolean, code?: number, reason: string}} */
      let outcome;
      try {
        const resp = await this._fetch(this._href("", this.cursor.query(this.sid, this.wait)), {
          credentials: "same-origin",
          cache: "no-store",
          signal: ctl.signal,
        });
        if (resp.status === 200) {
          const body = await resp.text(); // all of it, or nothing counts
          if (this.state !== "open") return;
          const text = this.cursor.accept(resp.headers.get("Poll-Last-Frame"), body);
          if (text !== null) {
            errors = 0;
            this.onmessage?.(text);
            continue;
          }
          outcome = { retry: true, reason: "answer without Poll-Last-Frame" };
        } else {
          outcome = pollOutcome(resp.status, await readProblem(resp));
        }
      } catch (e) {
        if (this.state !== "open") return;
        outcome = pollOutcome(0);
      } finally {
        clearTimeout(timer);
        if (this._get === ctl) this._get = null;
      }
      if (this.state !== "open") return;
      if (!outcome.retry) {
        // The server said what happened to the session (410, 404, 401…): nothing to free there.
        this._end(/** @type {number} */ (outcome.code), outcome.reason, false);
        return;
      }
      if (++errors > this.retries) {
        this._end(1006, `poll failed ${errors} times (${outcome.reason})`, true);
        return;
      }
      // The same `after` again: what the lost answer held comes again.
      await new Promise((r) => (this._timer = setTimeout(r, this.retryDelay * 2 ** (errors - 1))));
    }
  }

  /** @param {string} text one client envelope */
  send(text) {
    if (this.state !== "open") return false;
    this._out.push(text);
    if (!this._sending) this._flush();
    return true;
  }

  async _flush() {
    this._sending = true;
    try {
      while (this._out.length && this.state === "open") {
        let n = 0;
        let bytes = 0;
        while (n < this._out.length && n < SEND_BATCH && (n === 0 || bytes + this._out[n].length < SEND_BYTES)) {
          bytes += this._out[n++].length + 1;
        }
        const body = this._out.splice(0, n).join("\n");
        let resp;
        try {
          resp = await this._post("/send", { body, headers: { "Content-Type": "application/x-ndjson" } });
        } catch (e) {
          // Did it arrive? Sending it again could do it twice: start a new session instead.
          this._end(1006, `poll send failed (${e})`, true);
          return;
        }
        if (resp.status !== 204) {
          const r = pollOutcome(resp.status, await readProblem(resp));
          this._end(r.retry ? 1006 : /** @type {number} */ (r.code), `poll send: ${r.reason}`, r.retry);
          return;
        }
      }
    } finally {
      this._sending = false;
    }
  }

  /**
   * Close from our side: the server ends the session (1000), `onclose` follows.
   * @param {number} [code] @param {string} [reason]
   */
  close(code = 1000, reason = "") {
    if (this.state === "closed") return;
    const wasOpen = this.state === "open";
    this._stop();
    if (wasOpen) this._post("/close", { keepalive: true }).catch(() => {});
    queueMicrotask(() => this._fire(code, reason));
  }

  detach() {
    this.onopen = this.onmessage = this.onclose = null;
  }

  _stop() {
    this.state = "closed";
    this._out = [];
    clearTimeout(this._timer);
    this._get?.abort();
    this._get = null;
  }

  /**
   * The session ended on its own (the server closed it, or it cannot be reached).
   * @param {number} code @param {string} reason @param {boolean} tellServer
   */
  _end(code, reason, tellServer) {
    if (this.state === "closed") return;
    const wasOpen = this.state === "open";
    this._stop();
    // Free what the server may still hold for us (it would after 60 s without polls).
    if (wasOpen && tellServer) this._post("/close", { keepalive: true }).catch(() => {});
    this._fire(code, reason);
  }

  /** @param {number} code @param {string} reason */
  _fire(code, reason) {
    const f = this.onclose;
    this.onclose = null;
    f?.(code, reason);
  }
}

/** The problem+json body of a refused request, or null. @param {Response} resp */
async function readProblem(resp) {
  try {
    const text = await resp.text();
    return text ? JSON.parse(text) : null;
  } catch {
    return null;
  }
}

// ---------------------------------------------------------------- the connection

/**
 * @typedef {FallbackOptions & {
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
 *   probeTimeout?: number,
 *   transport?: TransportKind,
 *   pollUrl?: string,
 *   pollWait?: number,
 *   fetch?: typeof fetch,
 * }} ClientOptions
 */

/** Close codes after which reconnecting cannot help. */
const FINAL_CLOSES = new Set([1002, 4403]);
/** Closes that are about who we are, not about the transport (no fallback on those). */
const AUTH_CLOSES = new Set([1002, 4401, 4403]);

/** The default `/ws` URL of the page's own origin. */
function defaultUrl() {
  const loc = globalThis.location;
  if (!loc) throw new Error("no location: pass options.url");
  return `${loc.protocol === "https:" ? "wss:" : "ws:"}//${loc.host}/ws`;
}

/**
 * One connection per app, shared by every store and stream: one session, carried by a
 * WebSocket or, where WebSocket fails, by long polling (`transport`). Events: `state`
 * (ConnectionState, details), `transport` (the transport of the session in use changed),
 * `capabilities` (caps, revoked refs), `error` (a server error that names no subscription).
 */
export class SyncClient extends Emitter {
  /** @param {ClientOptions} [options] */
  constructor(options = {}) {
    super();
    this.options = options;
    this.url = options.url || defaultUrl();
    this.pollUrl = options.pollUrl || pollUrlFor(this.url);
    this._WS = options.WebSocket || globalThis.WebSocket;
    this.policy = new TransportPolicy(options);
    if (options.transport === "polling") this.policy.preferPolling();
    /** @type {TransportKind} the transport of the session in use (or of the first attempt) */
    this.transport = this.policy.mode;
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
    /** @type {Map<string, Deferred>} unsubs that delete a durable, by inbox, until answered */
    this._replies = new Map();
    this._ids = 0;
    this.attempt = 0;
    this.connects = 0; // connections that got their first cap_update
    /** @type {number | null} ms until the next reconnect, while waiting */
    this.retryIn = null;
    /** @type {Transport | null} the connection: current session or attempt */
    this._conn = null;
    /** @type {Transport | null} a WebSocket tried beside a polling session */
    this._probing = null;
    /** @type {any} */ this._probeTimer = null;
    /** @type {any} */ this._probeGiveUp = null;
    this._probes = 0; // WebSocket tries during the current polling session
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
    // A page that goes away closes its WebSocket by itself, not its polling session, which
    // the server would keep (subscriptions, a connection of the user's) for another minute.
    // Back from the back/forward cache, the close leads to a reconnect like any other.
    this._onPageHide = () => {
      if (this._conn && this._conn.kind === "polling") this._conn.close(1001, "page hidden");
    };
    if (typeof globalThis.addEventListener === "function") {
      globalThis.addEventListener("online", this._onOnline);
      globalThis.addEventListener("pagehide", this._onPageHide);
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
    this._dropReplies("client closed before the server answered: the durable may or may not be deleted");
    this._stopTimers();
    this._endProbe();
    clearTimeout(this._refreshTimer);
    if (typeof globalThis.removeEventListener === "function") {
      globalThis.removeEventListener("online", this._onOnline);
      globalThis.removeEventListener("pagehide", this._onPageHide);
    }
    const conn = this._conn;
    this._conn = null;
    if (conn) {
      conn.detach();
      conn.close(1000, "client closed");
    }
    this._setState("closed", { code: 1000, reason: "client closed" });
  }

  /** Reconnect now (e.g. from a "retry" button), skipping the backoff wait. */
  reconnect() {
    if (this._closed) return;
    if (this._conn) {
      this._conn.close(4000, "reconnect");
      return;
    }
    clearTimeout(this._retryTimer);
    this._retryTimer = null;
    this._open();
  }

  /**
   * While the session runs over long polling: try a WebSocket now instead of at the next
   * periodic probe; the session moves to it if it works. Returns false when there is
   * nothing to try (not polling, not connected, or a try already running).
   */
  retryWebSocket() {
    if (this._closed || !this._ready || !this._conn || this._conn.kind !== "polling" || this._probing) return false;
    clearTimeout(this._probeTimer);
    this._probeTimer = null;
    this._probe();
    return true;
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

  /**
   * Forget a subscription; if it is live on this connection, `unsub` it. The unsub names
   * the inbox alone: with a target, one the server had just ended would end every other
   * subscription of ours on that target instead. With `deleting` it deletes the durable
   * too, and `deleting` settles with the server's answer (see `_settle`).
   * @param {Subscription} sub @param {Deferred} [deleting]
   */
  _remove(sub, deleting) {
    this.subs.delete(sub);
    const inbox = sub.inbox;
    sub.inbox = null;
    if (inbox !== null) this._inboxes.delete(inbox);
    if (inbox === null || !this._ready || !isLive(sub)) {
      deleting?.reject(new SyncError("unavailable", "not subscribed: nothing deleted"));
      return;
    }
    /** @type {Envelope} */
    const env = { op: "unsub", inbox };
    if (deleting) {
      env.data = { delete_durable: true };
      this._replies.set(inbox, deleting);
    }
    this._send(env);
  }

  /**
   * The answer to an unsub that deletes a durable (its inbox is no subscription's any more):
   * true if it was one.
   * @param {Envelope} env @param {ServerError | null} error
   */
  _settle(env, error) {
    const waiting = env.inbox != null ? this._replies.get(env.inbox) : undefined;
    if (!waiting) return false;
    this._replies.delete(/** @type {string} */ (env.inbox));
    if (error) waiting.reject(new SyncError(error.code, error.reason));
    else waiting.resolve();
    return true;
  }

  /** The connection is gone: no answer will come to what waits for one. @param {string} reason */
  _dropReplies(reason) {
    for (const waiting of this._replies.values()) waiting.reject(new SyncError("unavailable", reason));
    this._replies.clear();
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
    const conn = this._conn;
    return conn ? conn.send(JSON.stringify(env)) : false;
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
    const kind = this.policy.mode;
    let conn;
    try {
      conn = this._makeTransport(kind);
    } catch (e) {
      // e.g. a page or extension that forbids WebSocket: a failed attempt like any other
      this._conn = null;
      this._onClose(1006, String(e), kind);
      return;
    }
    this._attach(conn);
  }

  /** @param {TransportKind} kind @returns {Transport} */
  _makeTransport(kind) {
    if (kind === "polling") {
      return new PollingTransport(this.pollUrl, { fetch: this.options.fetch, wait: this.options.pollWait });
    }
    return new WebSocketTransport(this._WS, this.url);
  }

  /** Make `conn` the connection: its frames go to the session, its close to `_onClose`. @param {Transport} conn */
  _attach(conn) {
    this._conn = conn;
    this._ready = false;
    this._lastError = null;
    conn.onopen = () => this._opened();
    conn.onmessage = (text) => {
      this._lastRx = Date.now();
      this._deliver(conn, splitFrame(text));
    };
    conn.onclose = (code, reason) => {
      if (this._conn !== conn) return;
      this._onClose(code, reason, conn.kind);
    };
  }

  /** The connection is up: the session's clock and heartbeat start. */
  _opened() {
    this._openedAt = Date.now();
    this._lastRx = Date.now();
    this._startHeartbeat();
  }

  /**
   * Hand envelopes to the session, as long as `conn` is its connection.
   * @param {Transport} conn @param {Envelope[]} envs
   */
  _deliver(conn, envs) {
    for (const env of envs) {
      if (this._conn !== conn) return;
      this._dispatch(env);
    }
  }

  /** The session of the connection is over: its timers stop, every subscription is to send again. */
  _endSession() {
    this._ready = false;
    this._stopTimers();
    this._inboxes.clear();
    this._dropReplies("connection lost before the server answered: the durable may or may not be deleted");
    for (const sub of this.subs) sub.onConnectionLost();
  }

  /**
   * The connection ended (or an attempt failed), whatever carried it: the same rules for both.
   * @param {number} code @param {string} reason @param {TransportKind} kind
   */
  _onClose(code, reason, kind) {
    const wasReady = this._ready;
    const lived = this._openedAt ? Date.now() - this._openedAt : 0;
    this._conn = null;
    this._openedAt = 0;
    this._endProbe();
    this._endSession();
    if (this._closed) return;
    const error = this._lastError;
    if (!wasReady) this._failures++;
    else this._failures = 0;
    if (!wasReady && !AUTH_CLOSES.has(code)) this.policy.failed(kind);
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
      const conn = this._conn;
      if (!conn) return;
      if (Date.now() - this._lastRx > interval + timeout) {
        // Nothing heard, not even our pong: the connection is dead without a close.
        conn.detach();
        conn.close(4000, "heartbeat timeout");
        this._onClose(1006, "heartbeat timeout", conn.kind);
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
        const sub = this._byInbox(env);
        if (sub) {
          if (sub.ignores(err)) return;
          this._inboxes.delete(/** @type {string} */ (env.inbox));
          sub.onError(err);
        } else if (!this._settle(env, err)) {
          this._lastError = err;
          this.emit("error", err);
        }
        return;
      }
      case "ok": {
        const sub = this._byInbox(env);
        if (sub) {
          if (sub.status === "pending") sub.onOk(env.data);
        } else {
          this._settle(env, null);
        }
        return;
      }
      default: {
        if (isFanOut(env)) {
          const live = [...this.subs].filter(isLive);
          for (const sub of recipients(env, live)) sub.onMessage(env);
          return;
        }
        // js_msg, a kv_sub's synced: one subscription's, found by its inbox without a scan.
        const sub = this._byInbox(env);
        if (sub && isLive(sub)) sub.onMessage(env);
      }
    }
  }

  /**
   * The subscription an envelope's inbox names on this connection (`_inboxes` holds exactly
   * the subscriptions sent on it that have not ended: errors, revocations, `_remove` and a
   * lost connection take them out).
   * @param {Envelope} env
   */
  _byInbox(env) {
    return env.inbox != null ? this._inboxes.get(env.inbox) : undefined;
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
    if (first && this._conn) {
      const kind = this._conn.kind;
      const previous = this.transport;
      this._ready = true;
      this._failures = 0;
      this.connects++;
      this.policy.connected(kind);
      this.transport = kind;
      this._setState("open", { connects: this.connects, transport: kind });
      if (kind !== previous) this.emit("transport", kind, { previous });
      this._probes = 0;
      this._scheduleProbe();
    }
    this.emit("capabilities", this.capabilities, revoked);
    this._syncSubs();
  }

  // ---------------------------------------------------------------- internals: back to WebSocket

  /** While on polling: try a WebSocket again in a while (TransportPolicy.probeDelay). */
  _scheduleProbe() {
    clearTimeout(this._probeTimer);
    this._probeTimer = null;
    if (this._closed || !this._conn || !this.policy.probes(this._conn.kind)) return;
    const delay = this.policy.probeDelay(this._probes, this.options.random);
    this._probeTimer = setTimeout(() => {
      this._probeTimer = null;
      this._probe();
    }, Math.min(delay, 2 ** 31 - 1));
  }

  /**
   * Open a WebSocket beside the polling session. It is a session of its own: once its
   * `cap_update` comes, it replaces the polling one and every subscription resumes on it
   * (the resume rules of a reconnect). If it fails, the polling session goes on untouched.
   */
  _probe() {
    if (this._closed || !this._ready || !this._conn || this._conn.kind !== "polling" || this._probing) return;
    let probe;
    this._probes++;
    try {
      probe = new WebSocketTransport(this._WS, this.url);
    } catch {
      this._scheduleProbe();
      return;
    }
    this._probing = probe;
    const failed = () => {
      if (this._probing !== probe) return;
      this._endProbe();
      this._scheduleProbe();
    };
    this._probeGiveUp = setTimeout(failed, this.options.probeTimeout ?? 10000);
    probe.onclose = failed;
    probe.onmessage = (text) => {
      const envs = splitFrame(text);
      if (this._probing === probe && envs.some((e) => e.op === "cap_update")) this._adopt(probe, envs);
    };
  }

  /** Stop a probe (if any) and its timers. */
  _endProbe() {
    clearTimeout(this._probeTimer);
    clearTimeout(this._probeGiveUp);
    this._probeTimer = this._probeGiveUp = null;
    const probe = this._probing;
    this._probing = null;
    if (probe) {
      probe.detach();
      probe.close(1000, "not needed");
    }
  }

  /**
   * The probe works: move the session to it. The polling session is closed (the server
   * frees its subscriptions); every subscription is sent again on the new one, resuming
   * where the app is, exactly as after a reconnect.
   * @param {Transport} conn @param {Envelope[]} envs its first frame
   */
  _adopt(conn, envs) {
    clearTimeout(this._probeGiveUp);
    this._probeGiveUp = null;
    this._probing = null;
    const old = this._conn;
    if (old) {
      old.detach();
      old.close(1000, "moving to WebSocket");
    }
    this._endSession();
    this._attach(conn);
    this._opened();
    this._deliver(conn, envs);
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
  // A refresh rotates the session cookie: the old token is revoked for new requests at
  // once. A request sent with the old cookie while the refresh was under way would get
  // 401 "token revoked" for a session that is fine. So requests wait for a refresh in
  // flight, and one answered 401 that a refresh overtook is sent once more.
  /** @type {Promise<unknown> | null} */
  let refreshing = null;
  let refreshes = 0;

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
    const isRefresh = method === "POST" && path === "/auth/refresh";
    if (!isRefresh && refreshing) await refreshing.catch(() => {});
    const generation = refreshes;
    let resp;
    try {
      const sent = doFetch(base + path, init);
      if (isRefresh) {
        const mine = sent
          .then(
            (r) => {
              if (r.ok) refreshes++;
            },
            () => {},
          )
          .finally(() => {
            if (refreshing === mine) refreshing = null;
          });
        refreshing = mine;
      }
      resp = await sent;
      if (resp.status === 401 && !isRefresh && (refreshing || refreshes !== generation)) {
        if (refreshing) await refreshing.catch(() => {});
        if (refreshes !== generation) resp = await doFetch(base + path, init); // the new cookie
      }
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
