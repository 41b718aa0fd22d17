// The connection: one session per app, shared by every store and stream, carried by a
// WebSocket or long polling, reconnecting with backoff and resuming every subscription.

import { AUTH_CLOSES, CloseCode, FINAL_CLOSES, SyncError } from "./codes.js";
import { allows, isFanOut, recipients, splitFrame } from "./match.js";
import { TransportPolicy, backoffDelay } from "./policy.js";
import { PollingTransport, WebSocketTransport, pollUrlFor } from "./transports.js";
import { CoreSubscription, KvStore, StreamSubscription } from "./subscriptions.js";
import { Emitter } from "./events.js";
import { PRESENCE_BUCKET, Presence } from "./presence.js";

/**
 * The connection's events: `state` (ConnectionState and what else is known), `transport`
 * (the session moved to another transport), `capabilities` (the current ones, and the
 * subscriptions they revoked), `error` (a server error that names no subscription).
 * @typedef {{state: [ConnectionState, StateDetails],
 *            transport: [TransportKind, {previous: TransportKind}],
 *            capabilities: [Capabilities, Subscription<any>[]],
 *            error: [ServerError]}} ClientEvents
 */

/**
 * @import { BackoffOptions, Capabilities, ConnectionState, Envelope, ServerError, StateDetails } from "./codes.js"
 * @import { FallbackOptions, TransportKind } from "./policy.js"
 * @import { Transport } from "./transports.js"
 * @import { KvOptions, StreamSubscriptionOptions, Subscription } from "./subscriptions.js"
 * @import { Deferred } from "./events.js"
 */

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
 *   token?: string,
 * }} ClientOptions
 */

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
 * @extends {Emitter<ClientEvents>}
 */
export class SyncClient extends Emitter {
  /** @param {ClientOptions} [options] */
  constructor(options = {}) {
    super();
    this.options = options;
    this.url = options.url || defaultUrl();
    this.pollUrl = options.pollUrl || pollUrlFor(this.url);
    /** @private */
    this._WS = options.WebSocket || globalThis.WebSocket;
    /** @type {string | null} the bearer token, where the page's cookie is not (Node) */
    this.token = options.token || null;
    this.policy = new TransportPolicy(options);
    // A browser's WebSocket cannot send a bearer token, and Node 20 has no WebSocket: both
    // go over long polling, unless given a WebSocket constructor that carries the token.
    /** @private */
    this._pollingOnly = !this._WS || (this.token !== null && !options.WebSocket);
    if (this._pollingOnly) this.policy.probeInterval = Infinity; // nothing to probe
    if (options.transport === "polling" || this._pollingOnly) this.policy.preferPolling();
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
    /** @private @type {Map<string, Subscription>} */
    this._inboxes = new Map();
    /** @private @type {Map<string, Deferred>} unsubs that delete a durable, by inbox, until answered */
    this._replies = new Map();
    /** @private */
    this._ids = 0;
    this.attempt = 0;
    this.connects = 0; // connections that got their first cap_update
    /** @type {number | null} ms until the next reconnect, while waiting */
    this.retryIn = null;
    /** @private @type {Transport | null} the connection: current session or attempt */
    this._conn = null;
    /** @private @type {Transport | null} a WebSocket tried beside a polling session */
    this._probing = null;
    /** @private @type {any} */ this._probeTimer = null;
    /** @private @type {any} */ this._probeGiveUp = null;
    /** @private */
    this._probes = 0; // WebSocket tries during the current polling session
    /** @private */
    this._openedAt = 0;
    /** @private */
    this._lastRx = 0;
    /** @private */
    this._ready = false;
    /** @private */
    this._closed = false;
    /** @private */
    this._failures = 0; // connection attempts in a row that never got a cap_update
    /** @private @type {ServerError | null} the error frame that preceded a close */
    this._lastError = null;
    /** @private @type {any} */ this._retryTimer = null;
    /** @private @type {any} */ this._heartbeat = null;
    /** @private @type {any} */ this._refreshTimer = null;
    this.expiresAt = options.expiresAt || null;
    /** @private */
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
    /** @private */
    this._onPageHide = () => {
      if (this._conn && this._conn.kind === "polling") this._conn.close(CloseCode.GOING_AWAY, "page hidden");
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
   * @template [V=any]
   * @param {KvOptions<V>} [opts]
   * @returns {KvStore<V>}
   */
  kv(bucket, opts) {
    return this._add(new KvStore(this, bucket, opts));
  }

  /**
   * A core subscription; `handler(payload, {subject, envelope})` per message. With
   * `presence: true` this connection is announced on the (literal) subject while it lasts.
   * @param {string} subject subject or pattern
   * @param {(payload: any, msg: {subject: string, envelope: Envelope}) => void} [handler]
   * @param {{presence?: boolean}} [opts]
   */
  subscribe(subject, handler, opts) {
    return this._add(new CoreSubscription(this, subject, handler, opts));
  }

  /**
   * Who is on `subject` (announced anywhere with `subscribe(subject, h, {presence: true})`):
   * one member per user, with `join` and `leave` events.
   * @param {string} subject
   * @returns {Presence}
   */
  presence(subject) {
    return new Presence(this.kv(PRESENCE_BUCKET, { pattern: `${subject}.*.*` }), subject);
  }

  /**
   * A JetStream subscription (history + live), de-duplicated by seq.
   * @param {string} name stream
   * @template [P=any]
   * @param {StreamSubscriptionOptions<P>} [opts]
   * @returns {StreamSubscription<P>}
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
      conn.close(CloseCode.NORMAL, "client closed");
    }
    this._setState("closed", { code: CloseCode.NORMAL, reason: "client closed" });
  }

  /** Reconnect now (e.g. from a "retry" button), skipping the backoff wait. */
  reconnect() {
    if (this._closed) return;
    if (this._conn) {
      this._conn.close(CloseCode.RECONNECT, "reconnect");
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
   * @private
   * @template {Subscription} S
   * @param {S} sub
   * @returns {S}
   */
  _add(sub) {
    if (this._closed) throw new SyncError("closed", "client closed");
    this.subs.add(sub);
    if (this._ready) this._sendSub(sub);
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
    if (inbox === null || !this._ready || !sub.live) {
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
   * @private
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

  /** The connection is gone: no answer will come to what waits for one. @private @param {string} reason */
  _dropReplies(reason) {
    for (const waiting of this._replies.values()) waiting.reject(new SyncError("unavailable", reason));
    this._replies.clear();
  }

  /** @private @param {Subscription} sub */
  _sendSub(sub) {
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
      if (this._ready && sub.status === "idle" && this.subs.has(sub)) this._sendSub(sub);
    }, delay);
  }

  /** Send every subscription that needs it on this connection (after cap_update). @private */
  _syncSubs() {
    for (const sub of this.subs) {
      if (sub.status === "idle") {
        this._sendSub(sub);
      } else if (
        (sub.status === "revoked" || sub.status === "denied") &&
        this.allows(/** @type {any} */ (sub.op), sub.target, sub.pattern)
      ) {
        sub.onRestoring();
        this._sendSub(sub);
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

  /** @private @param {Envelope} env */
  _send(env) {
    const conn = this._conn;
    return conn ? conn.send(JSON.stringify(env)) : false;
  }

  /** @private @param {ConnectionState} state @param {StateDetails} [details] */
  _setState(state, details = {}) {
    const changed = this.state !== state;
    this.state = state;
    if (changed || details.retryIn !== undefined) this.emit("state", state, details);
  }

  /** @private */
  _open() {
    if (this._closed) return;
    this.retryIn = null;
    if (this.state !== "connecting") this._setState("reconnecting", { retryIn: 0 });
    /** @type {TransportKind} */
    const kind = this._pollingOnly ? "polling" : this.policy.mode;
    let conn;
    try {
      conn = this._makeTransport(kind);
    } catch (e) {
      // e.g. a page or extension that forbids WebSocket: a failed attempt like any other
      this._conn = null;
      this._onClose(CloseCode.ABNORMAL, String(e), kind);
      return;
    }
    this._attach(conn);
  }

  /** @private @param {TransportKind} kind @returns {Transport} */
  _makeTransport(kind) {
    if (kind === "polling" || this._pollingOnly) {
      return new PollingTransport(this.pollUrl, {
        fetch: this.options.fetch,
        wait: this.options.pollWait,
        token: () => this.token,
      });
    }
    return new WebSocketTransport(this._WS, this.url);
  }

  /** Make `conn` the connection: its frames go to the session, its close to `_onClose`. @private @param {Transport} conn */
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

  /** The connection is up: the session's clock and heartbeat start. @private */
  _opened() {
    this._openedAt = Date.now();
    this._lastRx = Date.now();
    this._startHeartbeat();
  }

  /**
   * Hand envelopes to the session, as long as `conn` is its connection.
   * @private
   * @param {Transport} conn @param {Envelope[]} envs
   */
  _deliver(conn, envs) {
    for (const env of envs) {
      if (this._conn !== conn) return;
      this._dispatch(env);
    }
  }

  /** The session of the connection is over: its timers stop, every subscription is to send again. @private */
  _endSession() {
    this._ready = false;
    this._stopTimers();
    this._inboxes.clear();
    this._dropReplies("connection lost before the server answered: the durable may or may not be deleted");
    for (const sub of this.subs) sub.onConnectionLost();
  }

  /**
   * The connection ended (or an attempt failed), whatever carried it: the same rules for both.
   * @private
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
      this._setState(code === CloseCode.USER_DISABLED ? "unauthorized" : "closed", { code, reason, error });
      return;
    }
    if (code === CloseCode.TOKEN) {
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

  /** @private @param {number} code @param {string} reason @param {ServerError | null} error */
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
        if (r && r.token && this.token !== null) this.token = r.token;
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

  /** @private @param {number} code @param {string} reason @param {ServerError | null} [error] */
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

  /** @private */
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
        conn.close(CloseCode.RECONNECT, "heartbeat timeout");
        this._onClose(CloseCode.ABNORMAL, "heartbeat timeout", conn.kind);
        return;
      }
      this._send({ op: "ping", inbox: `p${++this._ids}` });
    }, interval);
  }

  /** @private */
  _stopTimers() {
    clearInterval(this._heartbeat);
    this._heartbeat = null;
    clearTimeout(this._retryTimer);
    this._retryTimer = null;
  }

  /** @private */
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
          if (r && r.token && this.token !== null) this.token = r.token;
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

  /** @private @param {Envelope} env */
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
          const live = [...this.subs].filter((s) => s.live);
          for (const sub of recipients(env, live)) sub.onMessage(env);
          return;
        }
        // js_msg, a kv_sub's synced: one subscription's, found by its inbox without a scan.
        const sub = this._byInbox(env);
        if (sub && sub.live) sub.onMessage(env);
      }
    }
  }

  /**
   * The subscription an envelope's inbox names on this connection (`_inboxes` holds exactly
   * the subscriptions sent on it that have not ended: errors, revocations, `_remove` and a
   * lost connection take them out).
   * @private
   * @param {Envelope} env
   */
  _byInbox(env) {
    return env.inbox != null ? this._inboxes.get(env.inbox) : undefined;
  }

  /** @private @param {{user?: string, capabilities?: Capabilities, revoked?: {inbox: string}[]}} data */
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

  /** While on polling: try a WebSocket again in a while (TransportPolicy.probeDelay). @private */
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
   * @private
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

  /** Stop a probe (if any) and its timers. @private */
  _endProbe() {
    clearTimeout(this._probeTimer);
    clearTimeout(this._probeGiveUp);
    this._probeTimer = this._probeGiveUp = null;
    const probe = this._probing;
    this._probing = null;
    if (probe) {
      probe.detach();
      probe.close(CloseCode.NORMAL, "not needed");
    }
  }

  /**
   * The probe works: move the session to it. The polling session is closed (the server
   * frees its subscriptions); every subscription is sent again on the new one, resuming
   * where the app is, exactly as after a reconnect.
   * @private
   * @param {Transport} conn @param {Envelope[]} envs its first frame
   */
  _adopt(conn, envs) {
    clearTimeout(this._probeGiveUp);
    this._probeGiveUp = null;
    this._probing = null;
    const old = this._conn;
    if (old) {
      old.detach();
      old.close(CloseCode.NORMAL, "moving to WebSocket");
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
