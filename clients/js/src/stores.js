// natsgate/stores: live values over the client's subscriptions, for UI frameworks
// (docs/guide.md, "Using the JS client from React, Vue and Svelte"). No framework here: the
// adapters beside this file (react.js, vue.js, svelte.js) wrap these stores in each
// framework's own contract.
//
// A store is Svelte's store contract plus `get()`: `subscribe(run)` calls `run(value)` at
// once and after every change, and returns the function that stops it. The client's
// subscription behind a store is opened by its first subscriber and closed when the last
// one leaves (a component unmounted), so a store costs nothing until something shows it.
// Every change publishes a new snapshot object (never mutated later): compare by identity.
//
//   const todos = kvStore(client, "todos", { pattern: `user.${uid}.>` });
//   const stop = todos.subscribe(({ state, values }) => render(state, values));
//   stop(); // the last one: `unsub` is sent

/**
 * @template T
 * @typedef {{subscribe(run: (value: T) => void): () => void, get(): T}} Readable
 */

/**
 * A store whose `start(set)` runs when the first subscriber comes and returns what to do
 * when the last one leaves (as Svelte's `readable`).
 * @template T
 * @param {T} initial
 * @param {(set: (value: T) => void) => () => void} start
 * @returns {Readable<T>}
 */
export function readable(initial, start) {
  let value = initial;
  /** @type {(() => void) | null} */
  let stop = null;
  /** @type {Set<{run: (value: T) => void}>} one entry per subscribe call */
  const subscribers = new Set();
  /** @param {T} next */
  const set = (next) => {
    if (Object.is(next, value)) return;
    value = next;
    for (const s of [...subscribers]) if (subscribers.has(s)) s.run(value);
  };
  return {
    subscribe(run) {
      const entry = { run };
      subscribers.add(entry);
      if (subscribers.size === 1) stop = start(set);
      run(value);
      return () => {
        if (!subscribers.delete(entry) || subscribers.size > 0 || !stop) return;
        const end = stop;
        stop = null;
        end();
      };
    },
    get: () => value,
  };
}

/**
 * Open a subscription with `make`, publish `snapshot(sub)` after each of its events (after
 * `on[event]`, if any, has seen the event's arguments); return what closes it.
 * @template S, T
 * @param {() => S & {on: Function, close: Function}} make
 * @param {(sub: S) => T} snapshot
 * @param {(value: T) => void} set
 * @param {(error: {code: string, reason: string}) => T} failed what to show when `make` throws
 * @param {Record<string, ((...args: any[]) => void) | null>} on
 */
function follow(make, snapshot, set, failed, on) {
  let sub;
  try {
    sub = make();
  } catch (e) {
    // e.g. a SyncError "closed": the client was closed before this component mounted
    const err = /** @type {any} */ (e);
    set(failed({ code: err?.code || "error", reason: err?.reason || String(e) }));
    return () => {};
  }
  const s = sub;
  const offs = Object.entries(on).map(([event, fn]) =>
    s.on(event, (/** @type {any[]} */ ...args) => {
      if (fn) fn(...args);
      set(snapshot(s));
    }),
  );
  set(snapshot(s));
  return () => {
    for (const off of offs) off();
    s.close();
  };
}

const ENDINGS = { revoked: null, error: null, closed: null };

/**
 * @typedef {{state: string, status: string, values: Map<string, any>, revision: number,
 *            error: {code: string, reason: string} | null}} KvSnapshot
 */

/**
 * A KV bucket (or the keys of `opts.pattern`), as `client.kv` keeps it: `values` is a copy
 * made at each change.
 * @param {import("./index.js").SyncClient} client
 * @param {string} bucket
 * @param {import("./index.js").KvOptions<any>} [opts]
 * @returns {Readable<KvSnapshot>}
 */
export function kvStore(client, bucket, opts) {
  /** @param {any} kv @returns {KvSnapshot} */
  const snapshot = (kv) => ({
    state: kv.state,
    status: kv.status,
    values: new Map(kv.values),
    revision: kv.revision,
    error: kv.error,
  });
  /** @type {KvSnapshot} */
  const initial = { state: "connecting", status: "idle", values: new Map(), revision: 0, error: null };
  /** @param {{code: string, reason: string}} error */
  const failed = (error) => ({ ...initial, state: "error", status: "failed", error });
  return readable(initial, (set) =>
    follow(() => client.kv(bucket, opts), snapshot, set, failed, { change: null, state: null, ...ENDINGS }),
  );
}

/**
 * @typedef {{state: string, status: string, messages: import("./index.js").StreamMessage[],
 *            lastSeq: number, error: {code: string, reason: string} | null}} StreamSnapshot
 */

/**
 * A JetStream stream: its last `opts.limit` (default 100) messages, oldest first. A `reset`
 * (the stream was made again) empties the list; the other options are `client.stream`'s.
 * @param {import("./index.js").SyncClient} client
 * @param {string} name
 * @param {import("./index.js").StreamSubscriptionOptions<any> & {limit?: number}} [opts]
 * @returns {Readable<StreamSnapshot>}
 */
export function streamStore(client, name, opts = {}) {
  const { limit = 100, ...streamOpts } = opts;
  /** @type {StreamSnapshot} */
  const initial = { state: "connecting", status: "idle", messages: [], lastSeq: 0, error: null };
  /** @param {{code: string, reason: string}} error */
  const failed = (error) => ({ ...initial, state: "error", status: "failed", error });
  return readable(initial, (set) => {
    /** @type {import("./index.js").StreamMessage[]} */
    let messages = [];
    /** @param {any} s @returns {StreamSnapshot} */
    const snapshot = (s) => ({ state: s.state, status: s.status, messages, lastSeq: s.lastSeq, error: s.error });
    return follow(() => client.stream(name, streamOpts), snapshot, set, failed, {
      message: (/** @type {import("./index.js").StreamMessage} */ m) => {
        messages = [...messages, m].slice(-limit);
      },
      reset: () => {
        messages = [];
      },
      state: null,
      gap: null,
      ...ENDINGS,
    });
  });
}

/**
 * @typedef {{subject: string, payload: any}} SubjectMessage
 * @typedef {{status: string, messages: SubjectMessage[], last: SubjectMessage | null,
 *            error: {code: string, reason: string} | null}} SubjectSnapshot
 */

/**
 * A core subject or pattern: its last `opts.limit` (default 50) messages, oldest first, and
 * the `last` one. Core messages are at-most-once and have no history: the list starts empty.
 * @param {import("./index.js").SyncClient} client
 * @param {string} subject
 * @param {{limit?: number}} [opts]
 * @returns {Readable<SubjectSnapshot>}
 */
export function subjectStore(client, subject, opts = {}) {
  const limit = opts.limit ?? 50;
  /** @type {SubjectSnapshot} */
  const initial = { status: "idle", messages: [], last: null, error: null };
  /** @param {{code: string, reason: string}} error */
  const failed = (error) => ({ ...initial, status: "failed", error });
  return readable(initial, (set) => {
    /** @type {SubjectMessage[]} */
    let messages = [];
    /** @param {any} s @returns {SubjectSnapshot} */
    const snapshot = (s) => ({ status: s.status, messages, last: messages.at(-1) ?? null, error: s.error });
    return follow(() => client.subscribe(subject), snapshot, set, failed, {
      message: (/** @type {any} */ payload, /** @type {{subject: string}} */ meta) => {
        messages = [...messages, { subject: meta.subject, payload }].slice(-limit);
      },
      ...ENDINGS,
    });
  });
}

/**
 * @typedef {{state: import("./index.js").ConnectionState, user: string | null,
 *            capabilities: import("./index.js").Capabilities | null,
 *            transport: import("./index.js").TransportKind}} ConnectionSnapshot
 */

/**
 * The client's connection: state, user id, capabilities, transport. Leaving never closes
 * the client (the app owns it).
 * @param {import("./index.js").SyncClient} client
 * @returns {Readable<ConnectionSnapshot>}
 */
export function connectionStore(client) {
  /** @returns {ConnectionSnapshot} */
  const snapshot = () => ({
    state: client.state,
    user: client.user,
    capabilities: client.capabilities,
    transport: client.transport,
  });
  let shown = snapshot();
  /** @param {ConnectionSnapshot} a @param {ConnectionSnapshot} b */
  const same = (a, b) =>
    a.state === b.state && a.user === b.user && a.capabilities === b.capabilities && a.transport === b.transport;
  return readable(shown, (set) => {
    const update = () => {
      const next = snapshot();
      if (same(next, shown)) return;
      shown = next;
      set(next);
    };
    const offs = ["state", "capabilities", "transport"].map((event) => client.on(/** @type {any} */ (event), update));
    update();
    return () => {
      for (const off of offs) off();
    };
  });
}
