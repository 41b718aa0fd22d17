// What every view of the demo SPA shares: the API helper, the session (the one connection and
// who is logged in), and DOM helpers. No framework, no inline script or style (the CSP).
import { ApiError, allows, createApi } from "natsgate";

export const api = createApi();

/**
 * The session: set by app.js at login, cleared at logout.
 * @type {{client: import("natsgate").SyncClient | null,
 *         me: {id: string, username: string, display_name: string, capabilities?: any} | null}}
 */
export const session = { client: null, me: null };

// ---------------------------------------------------------------- DOM helpers

/**
 * Build an element: h("button", {type: "button", onclick: fn, class: "x"}, "text", child).
 * Text is always set as text (never HTML).
 * @param {string} tag
 * @param {Record<string, any> | null} [attrs]
 * @param {...any} children
 * @returns {any} the element (typed loosely: inputs, buttons and lists alike)
 */
export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else if (k in el && k !== "list" && typeof v !== "string") /** @type {any} */ (el)[k] = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

/**
 * What the current capabilities allow: the socket's once it has them, the login's before.
 * @param {"sub" | "kv_sub" | "js_sub" | "cmd"} op
 * @param {string} target
 * @param {string} [pattern]
 */
export function can(op, target, pattern) {
  const { client, me } = session;
  return allows((client && client.capabilities) || (me && me.capabilities), op, target, pattern);
}

/**
 * Enable `el` when `allowed`; otherwise disable it and say why (tooltip and accessible
 * description), so a user learns before trying rather than from a refusal.
 * @param {HTMLElement} el
 * @param {boolean} allowed
 * @param {string} reason
 */
export function gate(el, allowed, reason) {
  /** @type {any} */ (el).disabled = !allowed;
  if (allowed) {
    el.removeAttribute("title");
    el.removeAttribute("aria-description");
  } else {
    el.title = reason;
    el.setAttribute("aria-description", reason);
  }
}

/** @param {string} command */
export const noCommand = (command) => `You may not do this: your capabilities have no ${command} command.`;

/** @param {string} id */
export const $ = (id) => /** @type {HTMLElement} */ (document.getElementById(id));

/** @param {string} text */
export function announce(text) {
  const el = $("announce");
  el.textContent = "";
  setTimeout(() => (el.textContent = text), 50);
}

/** @param {unknown} e */
export function describe(e) {
  if (e instanceof ApiError) {
    if (e.status === 0) return "The server could not be reached. Try again.";
    return e.detail || e.title || `HTTP ${e.status}`;
  }
  return e instanceof Error ? e.message : String(e);
}

/** @param {string} iso */
export function when(iso) {
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return "";
  const sameDay = d.toDateString() === new Date().toDateString();
  return sameDay
    ? d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" })
    : d.toLocaleString([], { dateStyle: "short", timeStyle: "short" });
}

export function newId() {
  const bytes = crypto.getRandomValues(new Uint8Array(9));
  return btoa(String.fromCharCode(...bytes)).replace(/\+/g, "-").replace(/\//g, "_");
}

/**
 * Keyed list update: reuse each item's element, insert/move only what changed (keeps focus).
 * @template T
 * @param {HTMLElement} list
 * @param {T[]} items
 * @param {(item: T) => string} key
 * @param {(item: T, el: HTMLElement | undefined) => HTMLElement} render
 */
export function reconcile(list, items, key, render) {
  /** @type {Map<string, HTMLElement>} */
  const old = new Map();
  for (const el of /** @type {HTMLElement[]} */ ([...list.children])) old.set(el.dataset.key || "", el);
  let i = 0;
  for (const item of items) {
    const k = key(item);
    const prev = old.get(k);
    const el = render(item, prev);
    el.dataset.key = k;
    old.delete(k);
    const at = list.children[i];
    if (at !== el) list.insertBefore(el, at || null);
    i++;
  }
  for (const el of old.values()) el.remove();
}

/**
 * A status banner for a store or stream: revoked, denied, failed, loading.
 * @param {HTMLElement} el
 * @param {any} sub
 * @param {string} what
 */
export function showSubState(el, sub, what) {
  const err = sub.error;
  el.className = "notice";
  if (sub.status === "revoked") {
    el.textContent = `Your access to ${what} was revoked. It comes back here as soon as an admin restores it.`;
    el.classList.add("warn");
    el.dataset.state = "revoked";
  } else if (sub.status === "denied") {
    el.textContent = `You have no access to ${what} (${err ? err.reason : "forbidden"}).`;
    el.classList.add("warn");
    el.dataset.state = "denied";
  } else if (sub.status === "failed") {
    el.textContent = `Could not load ${what}: ${err ? `${err.code}: ${err.reason}` : "error"}.`;
    el.classList.add("error");
    el.dataset.state = "failed";
  } else if (sub.state === "loading" || sub.state === "connecting") {
    el.textContent = `Loading ${what}…`;
    el.dataset.state = "loading";
  } else {
    el.textContent = "";
    el.dataset.state = "ok";
  }
  el.hidden = !el.textContent;
}
