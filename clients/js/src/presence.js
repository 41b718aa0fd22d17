// Who is here (docs/protocol.md, "Presence"): the keys `<subject>.<uid>.<connection>` of KV
// bucket `presence`, written by the gateways while a connection holds `sub` with
// `data.presence`, folded into one member per user however many connections (tabs) they
// have. A user joins with their first key and leaves with their last (closed, unsubscribed,
// or expired with a gateway that died).

import { Emitter } from "./events.js";

/** The bucket the gateways write presence to. */
export const PRESENCE_BUCKET = "presence";

/**
 * One user here: `since` is the earliest join of their connections (unix seconds).
 * @typedef {{uid: string, name: string, since: number, connections: number}} Member
 */
/**
 * `join` (a user's first connection came), `leave` (their last one went), `change` (the
 * member set or a member's connection count changed), `state` (the store's).
 * @typedef {{join: [Member], leave: [Member], change: [Map<string, Member>],
 *            state: [import("./codes.js").StoreState]}} PresenceEvents
 */

/**
 * The uid in a presence key (`<subject tokens>.<uid>.<connection>`).
 * @param {string} key
 */
export function presenceUid(key) {
  const parts = key.split(".");
  return parts[parts.length - 2] || "";
}

/**
 * Fold a presence store's values (key → {uid, name, since}) into members by uid.
 * @param {Map<string, any>} values
 * @returns {Map<string, Member>}
 */
export function membersOf(values) {
  /** @type {Map<string, Member>} */
  const out = new Map();
  for (const [key, v] of values) {
    const uid = presenceUid(key);
    const since = Number(v && v.since) || 0;
    const had = out.get(uid);
    if (had) {
      out.set(uid, { ...had, since: Math.min(had.since, since), connections: had.connections + 1 });
    } else {
      out.set(uid, { uid, name: String((v && v.name) || uid), since, connections: 1 });
    }
  }
  return out;
}

/**
 * `client.presence(subject)`: `members` (uid → Member), kept current by a kv store on
 * `<subject>.*.*`, with `join`/`leave` events. Announce yourself with
 * `client.subscribe(subject, handler, { presence: true })`.
 * @extends {Emitter<PresenceEvents>}
 */
export class Presence extends Emitter {
  /**
   * @param {import("./subscriptions.js").KvStore} store on bucket `presence`, pattern `<subject>.*.*`
   * @param {string} subject
   */
  constructor(store, subject) {
    super();
    this.store = store;
    this.subject = subject;
    /** @type {Map<string, Member>} */
    this.members = new Map();
    store.on("change", () => this._refold());
    store.on("state", (s) => this.emit("state", s));
  }

  /** @private */
  _refold() {
    const before = this.members;
    const now = membersOf(this.store.values);
    this.members = now;
    let changed = before.size !== now.size;
    for (const [uid, m] of now) {
      const was = before.get(uid);
      if (!was) this.emit("join", m);
      if (!was || was.connections !== m.connections) changed = true;
    }
    for (const [uid, m] of before) if (!now.has(uid)) this.emit("leave", m);
    if (changed) this.emit("change", now);
  }

  close() {
    this.store.close();
  }
}
