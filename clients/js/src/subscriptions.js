// The three subscription kinds: core (at-most-once), KV stores and JetStream streams, with
// their resume, de-duplication, acks and read-your-writes waits.

import { RETRYABLE, SyncError } from "./codes.js";
import { KvBook, StreamBook, carried } from "./books.js";
import { Emitter, Waiters, deferred } from "./events.js";

/**
 * What every subscription emits: `revoked` (the capabilities no longer allow it: it ended),
 * `error` (a server error on it: `status` says whether it is retried), `closed`.
 * @typedef {{revoked: [ServerError], error: [ServerError], closed: []}} SubscriptionEvents
 */

/**
 * @typedef {SubscriptionEvents & {message: [any, {subject: string, envelope: Envelope}]}} CoreEvents
 */

/**
 * A KV store's options: the key `pattern` (default `>`), `decode` each value, how to resume
 * after a reconnect (`since`, the default, sends since_revision; `resync` reloads and drops).
 * @template [V=any]
 * @typedef {{pattern?: string, decode?: Decode<V>, resume?: "since" | "resync",
 *            onRevoked?: (e: ServerError) => void}} KvOptions
 */

/**
 * `change` (the changes, puts and deletes), `state` (StoreState).
 * @template [V=any]
 * @typedef {SubscriptionEvents & {change: [KvChange<V>[]], state: [StoreState]}} KvEvents
 */

/**
 * @template [P=any]
 * @typedef {{seq: number, subject: string, payload: P, time: string}} StreamMessage
 */

/**
 * A stream's options. `onMessage` may return a promise: with `ack`, the message is acked
 * once it resolves; if it rejects, it is not acked, and handed on again when it comes again.
 * @template [P=any]
 * @typedef {StreamOptions & {onMessage?: (m: StreamMessage<P>) => unknown,
 *            onRevoked?: (e: ServerError) => void}} StreamSubscriptionOptions
 */

/**
 * `message` (a new message, de-duplicated by seq), `state` (StreamState), `reset` and `gap`
 * (the resume could not be honoured: reload the app's state).
 * @template [P=any]
 * @typedef {SubscriptionEvents & {message: [StreamMessage<P>], state: [StreamState],
 *            reset: [ResumeReport], gap: [ResumeReport]}} StreamEvents
 */

/**
 * @import { Envelope, ServerError, StoreState, StreamState, SubscriptionStatus } from "./codes.js"
 * @import { Decode, KvChange, ResumeReport, StreamOptions } from "./books.js"
 * @import { Deferred } from "./events.js"
 * @import { SyncClient } from "./client.js"
 */

/**
 * What the three kinds share: where they are in their lifetime on the current connection.
 * status: idle (to send) · pending (sent, no ok yet) · active · revoked · denied · failed ·
 * closed.
 * @template {Record<string, any[]>} [E=SubscriptionEvents]
 * @extends {Emitter<E>}
 */
export class Subscription extends Emitter {
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
    /** @type {SubscriptionStatus} */
    this.status = "idle";
    /** @type {ServerError | null} */
    this.error = null;
    this.revoked = false;
    this.retries = 0;
  }

  /** Sent on this connection and not ended: what server messages may reach. */
  get live() {
    return this.status === "pending" || this.status === "active";
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
    this._call("error", [err]);
  }

  /** The capabilities no longer allow it: the server ended it. */
  onRevoked() {
    this.inbox = null;
    this.status = "revoked";
    this.revoked = true;
    this.error = { code: "revoked", reason: "capability revoked" };
    this._call("revoked", [this.error]);
  }

  /** The connection dropped: send it again on the next one. */
  onConnectionLost() {
    this.inbox = null;
    if (this.live) this.status = "idle";
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
    this._call("closed", []);
  }
}

/**
 * A core NATS subscription: at-most-once messages, nothing to resume.
 * @extends {Subscription<CoreEvents>}
 */
export class CoreSubscription extends Subscription {
  /**
   * @param {SyncClient} client
   * @param {string} subject
   * @param {(payload: any, msg: {subject: string, envelope: Envelope}) => void} [handler]
   * @param {{presence?: boolean}} [opts]
   */
  constructor(client, subject, handler, opts = {}) {
    super(client, "sub", subject, subject);
    this.presence = Boolean(opts.presence);
    if (handler) this.on("message", handler);
  }

  requestData() {
    return this.presence ? { presence: true } : undefined;
  }

  /** @param {Envelope} env */
  onMessage(env) {
    if (env.op !== "sub_msg") return;
    const d = env.data || {};
    this.emit("message", carried(d.payload, d.payload_b64), { subject: env.target || "", envelope: env });
  }
}

/**
 * A live KV bucket (or the keys of `pattern` in it), kept in step with the server:
 * `state`, `revision`, `values` (a Map of decoded values), `change` events.
 * @template [V=any]
 * @extends {Subscription<KvEvents<V>>}
 */
export class KvStore extends Subscription {
  /**
   * @param {SyncClient} client
   * @param {string} bucket
   * @param {KvOptions<V>} [opts]
   */
  constructor(client, bucket, opts = {}) {
    super(client, "kv_sub", bucket, opts.pattern || ">");
    this.book = new KvBook(opts.decode);
    this.useSince = opts.resume !== "resync";
    /** @private */
    this._resumed = false;
    /** @type {StoreState} */
    this.state = "connecting";
    /** @private */
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

  /** @private @param {StoreState} state */
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
 * @template [P=any]
 * @extends {Subscription<StreamEvents<P>>}
 */
export class StreamSubscription extends Subscription {
  /**
   * @param {SyncClient} client
   * @param {string} name
   * @param {StreamSubscriptionOptions<P>} [opts]
   */
  constructor(client, name, opts = {}) {
    super(client, "js_sub", name, opts.filter || ">");
    this.book = new StreamBook(opts);
    this.ack = !!opts.ack;
    /** @type {string | null} */
    this.durable = opts.durable || null;
    /** @type {StreamState} */
    this.state = "connecting";
    /** @private */
    this._waiters = new Waiters();
    /** @private @type {Map<number, Promise<boolean>>} ack mode: seq → its handlers (true: done, false: failed) */
    this._handling = new Map();
    /** @private @type {Set<number>} ack mode: seqs whose handler failed, handed on again when they come again */
    this._failed = new Set();
    /** @private @type {Deferred | null} a `close({deleteDurable: true})` waiting for the subscription to be live */
    this._deleting = null;
    if (opts.onMessage) this.on("message", opts.onMessage);
    if (opts.onRevoked) this.on("revoked", opts.onRevoked);
  }

  /** The last seq delivered to the app. */
  get lastSeq() {
    return this.book.lastSeq;
  }

  /** @private @param {StreamState} state */
  _setState(state) {
    if (this.state === state) return;
    this.state = state;
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
    /** @type {StreamMessage<P>} */
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
   * @private
   * @param {StreamMessage<P>} msg @param {string | null} inbox
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
    return this.ack && this.live && err.code === "not_found" && ACK_REFUSED.test(err.reason);
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

  /** @private @returns {Promise<void>} */
  _delete() {
    if (!this.durable) return Promise.reject(new SyncError("bad_request", "not a durable stream"));
    if (this._deleting) return this._deleting.promise;
    if (this.status === "closed") return Promise.reject(new SyncError("closed", "stream closed"));
    if (!this.live && this.status !== "idle") {
      const e = this.error || { code: this.status, reason: "" };
      return Promise.reject(new SyncError(e.code, `the durable is not held here${e.reason ? `: ${e.reason}` : ""}`));
    }
    this._deleting = deferred();
    const promise = this._deleting.promise;
    if (this.live) this._sendDelete(); // pending: the server answers the js_sub first
    return promise;
  }

  /** Send the unsub that deletes the durable; the subscription is closed at once. @private */
  _sendDelete() {
    const deleting = /** @type {Deferred} */ (this._deleting);
    this._deleting = null;
    this.client._remove(this, deleting);
    this.status = "closed";
    this.emit("closed");
    this._closed(new SyncError("closed", "stream closed"));
  }

  /** @private @param {SyncError} error */
  _failDelete(error) {
    const deleting = this._deleting;
    this._deleting = null;
    if (deleting) deleting.reject(error);
  }

  /** @private @param {SyncError} error */
  _closed(error) {
    this._waiters.rejectAll(error);
    this._handling.clear();
    this._failed.clear();
    this._failDelete(error);
  }
}

