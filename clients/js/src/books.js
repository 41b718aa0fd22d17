// Resume bookkeeping, independent of any socket: what a KV store holds and where a
// JetStream subscription is (docs/protocol.md, "Resume").

// ---------------------------------------------------------------- KV bookkeeping

/**
 * One change of a KV store: a put (with the decoded value) or a delete, and the value before.
 * @template [V=any]
 * @typedef {{key: string, op: "put" | "delete", value?: V, previous?: V, revision: number}} KvChange
 */

/**
 * Turns a value as carried (JSON, or bytes for a `value_b64`) into the app's value.
 * @template [V=any]
 * @typedef {(value: any, meta: {key: string, revision: number}) => V} Decode
 */

/**
 * The state of one KV subscription, independent of any socket: values by key, per-key
 * revisions (deletes included, so a late older put cannot resurrect a key), the store's
 * revision, and what a re-subscription must do at `synced`.
 */
/** @template [V=any] */
export class KvBook {
  /** @param {Decode<V>} [decode] */
  constructor(decode) {
    /** @type {Decode<V>} */
    this.decode = decode || ((v) => v);
    /** @type {Map<string, V>} */
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
   * @returns {KvChange<V> | null}
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
   * @returns {KvChange<V>[]}
   */
  markSynced(revision) {
    /** @type {KvChange<V>[]} */
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

  /** Forget everything (revoked): returns the deletions. @returns {KvChange<V>[]} */
  clear() {
    /** @type {KvChange<V>[]} */
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
export function carried(json, base64) {
  return json !== undefined ? json : base64 !== undefined ? b64(base64) : null;
}

/** @param {string} s */
function b64(s) {
  const bin = atob(s);
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

// ---------------------------------------------------------------- JetStream bookkeeping

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
