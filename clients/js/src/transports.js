// What carries a session: a WebSocket, or HTTP long polling (docs/protocol.md, "Fallback
// transport"), behind one small interface, with the long-poll bookkeeping they need.

/** @import { TransportKind } from "./policy.js" */

import { CloseCode } from "./codes.js";

// ---------------------------------------------------------------- long-poll bookkeeping

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
    return { retry: false, code: Number.isInteger(code) && code > 0 ? code : CloseCode.ABNORMAL, reason: detail || "session closed" };
  }
  if (status === 404) return { retry: false, code: CloseCode.ABNORMAL, reason: `${p.code || "not found"}: ${detail || "reopen"}` };
  if (status === 401) return { retry: false, code: CloseCode.TOKEN, reason: detail || "unauthorized" };
  if (status === 403) return { retry: false, code: CloseCode.POLICY, reason: detail || "forbidden" };
  return { retry: false, code: CloseCode.ABNORMAL, reason: `HTTP ${status}${detail ? `: ${detail}` : ""}` };
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
  close(code = CloseCode.NORMAL, reason = "") {
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
 *            sid?: string, token?: () => string | null | undefined}} PollingOptions
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
    /** @private */
    this._fetch = opts.fetch || ((/** @type {any} */ u, /** @type {any} */ i) => globalThis.fetch(u, i));
    /** @private */
    this._token = opts.token || (() => null);
    /** @type {"opening" | "open" | "closed"} */
    this.state = "opening";
    /** @type {(() => void) | null} */ this.onopen = null;
    /** @type {((text: string) => void) | null} */ this.onmessage = null;
    /** @type {((code: number, reason: string) => void) | null} */ this.onclose = null;
    /** @private @type {string[]} */ this._out = [];
    /** @private */
    this._sending = false;
    /** @private @type {AbortController | null} */ this._get = null;
    /** @private @type {any} */ this._timer = null;
    queueMicrotask(() => this._start());
  }

  /** @private @param {string} path @param {string} [query] */
  _href(path, query) {
    return `${this.url}${path}?${query || `sid=${encodeURIComponent(this.sid)}`}`;
  }

  /**
   * Where there is no page cookie (Node), the bearer token goes in every request.
   * @private
   * @param {Record<string, string>} [headers]
   * @returns {Record<string, string>}
   */
  _headers(headers = {}) {
    const token = this._token();
    return token ? { ...headers, Authorization: `Bearer ${token}` } : headers;
  }

  /** @private @param {string} path @param {{body?: string, headers?: Record<string, string>, keepalive?: boolean}} [init] */
  _post(path, init = {}) {
    return this._fetch(this._href(path), {
      method: "POST",
      credentials: "same-origin",
      cache: "no-store",
      ...init,
      headers: this._headers(init.headers),
    });
  }

  /** @private */
  async _start() {
    if (this.state !== "opening") return;
    let resp;
    try {
      resp = await this._post("/open");
    } catch (e) {
      this._end(CloseCode.ABNORMAL, `poll open failed (${e})`, false);
      return;
    }
    if (this.state !== "opening") {
      // closed while opening: the server has a session nobody will poll
      if (resp.ok) this._post("/close", { keepalive: true }).catch(() => {});
      return;
    }
    if (resp.status !== 200) {
      const r = pollOutcome(resp.status, await readProblem(resp));
      this._end(r.retry ? CloseCode.ABNORMAL : r.code, `poll open: ${r.reason}`, false);
      return;
    }
    this.state = "open";
    this.onopen?.();
    this._loop();
  }

  /** @private */
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
          headers: this._headers(),
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
        this._end(CloseCode.ABNORMAL, `poll failed ${errors} times (${outcome.reason})`, true);
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

  /** @private */
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
          this._end(CloseCode.ABNORMAL, `poll send failed (${e})`, true);
          return;
        }
        if (resp.status !== 204) {
          const r = pollOutcome(resp.status, await readProblem(resp));
          this._end(r.retry ? CloseCode.ABNORMAL : /** @type {number} */ (r.code), `poll send: ${r.reason}`, r.retry);
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
  close(code = CloseCode.NORMAL, reason = "") {
    if (this.state === "closed") return;
    const wasOpen = this.state === "open";
    this._stop();
    if (wasOpen) this._post("/close", { keepalive: true }).catch(() => {});
    queueMicrotask(() => this._fire(code, reason));
  }

  detach() {
    this.onopen = this.onmessage = this.onclose = null;
  }

  /** @private */
  _stop() {
    this.state = "closed";
    this._out = [];
    clearTimeout(this._timer);
    this._get?.abort();
    this._get = null;
  }

  /**
   * The session ended on its own (the server closed it, or it cannot be reached).
   * @private
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

  /** @private @param {number} code @param {string} reason */
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
