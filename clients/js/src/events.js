// Events and waiting for a position (read-your-writes): what subscriptions and the client share.

import { SyncError } from "./codes.js";

// ---------------------------------------------------------------- events

/**
 * A minimal event emitter, typed by its map `E` of event → the handler's arguments.
 * @template {Record<string, any[]>} E
 */
export class Emitter {
  constructor() {
    /** @protected @type {Map<string, Set<Function>>} */
    this._handlers = new Map();
  }

  /**
   * Call `fn` on every `event`; returns the function that removes it.
   * @template {keyof E & string} K
   * @param {K} event
   * @param {(...args: E[K]) => unknown} fn
   * @returns {() => void}
   */
  on(event, fn) {
    let set = this._handlers.get(event);
    if (!set) this._handlers.set(event, (set = new Set()));
    set.add(fn);
    return () => set.delete(fn);
  }

  /**
   * @protected
   * @template {keyof E & string} K
   * @param {K} event @param {E[K]} args
   */
  emit(event, ...args) {
    this._call(event, args);
  }

  /**
   * Call every handler of `event`; returns what they returned (nothing for one that threw).
   * @protected
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

export class Waiters {
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

/**
 * @typedef {{promise: Promise<void>, resolve: () => void, reject: (e: Error) => void}} Deferred
 */

/** @returns {Deferred} */
export function deferred() {
  /** @type {any} */
  const d = {};
  d.promise = new Promise((resolve, reject) => {
    d.resolve = resolve;
    d.reject = reject;
  });
  return d;
}
