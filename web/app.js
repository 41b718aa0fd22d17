// The demo SPA: articles, chat, todos, admin — every list is live from the one connection
// (sync.js: a WebSocket, or long polling where WebSocket fails); every write goes over HTTP
// and the UI waits for the connection to show it.
// No framework, no inline script or style (the CSP forbids them).
import { ApiError, allows, createApi, createClient, validPattern } from "./sync.js";

const api = createApi();
const SESSION_FLAG = "natsgate.session"; // "probably logged in": skip a 401 probe otherwise
const TRANSPORT_KEY = "natsgate.transport"; // this tab fell back to polling: start there
const ROOMS = ["general", "random", "help"];
const TOKEN_RE = /^[A-Za-z0-9_-]{1,64}$/;
const JOINED_KEY = "natsgate.rooms"; // rooms this tab joined: listed again in every chat view

/** @returns {string[]} */
function joinedRooms() {
  try {
    const rooms = JSON.parse(sessionStorage.getItem(JOINED_KEY) || "[]");
    return Array.isArray(rooms) ? rooms.filter((r) => typeof r === "string" && TOKEN_RE.test(r)) : [];
  } catch {
    return [];
  }
}

/** @type {import("./sync.js").SyncClient | null} */
let client = null;
/** @type {{id: string, username: string, display_name: string} | null} */
let me = null;
/** @type {(() => void) | null} cleanup of the current view */
let unmount = null;

// ---------------------------------------------------------------- DOM helpers

/**
 * Build an element: h("button", {type: "button", onclick: fn, class: "x"}, "text", child).
 * Text is always set as text (never HTML).
 * @param {string} tag
 * @param {Record<string, any> | null} [attrs]
 * @param {...any} children
 * @returns {any} the element (typed loosely: inputs, buttons and lists alike)
 */
function h(tag, attrs, ...children) {
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
function can(op, target, pattern) {
  return allows((client && client.capabilities) || (me && /** @type {any} */ (me).capabilities), op, target, pattern);
}

/**
 * Enable `el` when `allowed`; otherwise disable it and say why (tooltip and accessible
 * description), so a user learns before trying rather than from a refusal.
 * @param {HTMLElement} el
 * @param {boolean} allowed
 * @param {string} reason
 */
function gate(el, allowed, reason) {
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
const noCommand = (command) => `You may not do this: your capabilities have no ${command} command.`;

/** @param {string} id */
const $ = (id) => /** @type {HTMLElement} */ (document.getElementById(id));

/** @param {string} text */
function announce(text) {
  const el = $("announce");
  el.textContent = "";
  setTimeout(() => (el.textContent = text), 50);
}

/** @param {unknown} e */
function describe(e) {
  if (e instanceof ApiError) {
    if (e.status === 0) return "The server could not be reached. Try again.";
    return e.detail || e.title || `HTTP ${e.status}`;
  }
  return e instanceof Error ? e.message : String(e);
}

/** @param {string} iso */
function when(iso) {
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return "";
  const sameDay = d.toDateString() === new Date().toDateString();
  return sameDay
    ? d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" })
    : d.toLocaleString([], { dateStyle: "short", timeStyle: "short" });
}

function newId() {
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
function reconcile(list, items, key, render) {
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
function showSubState(el, sub, what) {
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

// ---------------------------------------------------------------- session

async function boot() {
  $("logout").addEventListener("click", logout);
  window.addEventListener("hashchange", route);
  if (localStorage.getItem(SESSION_FLAG)) {
    try {
      const r = await api.post("/auth/refresh");
      start(r);
      return;
    } catch (e) {
      localStorage.removeItem(SESSION_FLAG);
      if (!(e instanceof ApiError && (e.status === 401 || e.status === 403))) {
        showLogin(describe(e));
        return;
      }
    }
  }
  showLogin();
}

/** @param {string} [message] */
function showLogin(message) {
  if (unmount) unmount();
  unmount = null;
  $("nav").hidden = true;
  $("session").hidden = true;
  $("caps").hidden = true;
  const err = h("p", { id: "login-error", class: "notice error", role: "alert", hidden: !message }, message || "");
  const user = h("input", { id: "username", name: "username", autocomplete: "username", required: true, autocapitalize: "none" });
  const pass = h("input", { id: "password", name: "password", type: "password", autocomplete: "current-password", required: true });
  const button = h("button", { type: "submit", class: "primary" }, "Log in");
  const form = h(
    "form",
    {
      class: "card login",
      "aria-labelledby": "login-title",
      onsubmit: async (/** @type {Event} */ ev) => {
        ev.preventDefault();
        button.disabled = true;
        err.hidden = true;
        try {
          const r = await api.post("/auth/login", { username: user.value.trim(), password: pass.value });
          localStorage.setItem(SESSION_FLAG, "1");
          start(r);
        } catch (e) {
          err.textContent = e instanceof ApiError && e.status === 401 ? "Wrong username or password." : describe(e);
          err.hidden = false;
          button.disabled = false;
          pass.select();
        }
      },
    },
    h("h1", { id: "login-title", tabindex: "-1" }, "Log in"),
    h("p", { class: "hint" }, "Demo users: admin, alice, bob — password ", h("code", null, "demo"), "."),
    h("label", { for: "username" }, "Username"),
    user,
    h("label", { for: "password" }, "Password"),
    pass,
    err,
    button,
  );
  $("main").replaceChildren(form);
  user.focus();
}

/** @param {{token: string, expires_at: number, user: any}} login */
function start(login) {
  me = login.user;
  if (client) client.close();
  client = createClient({
    refresh: () => api.post("/auth/refresh"),
    expiresAt: login.expires_at,
    // A reload on a network that refuses WebSocket need not fail three times again; the
    // client tries WebSocket a few seconds later anyway and moves back if it works.
    transport: sessionStorage.getItem(TRANSPORT_KEY) === "polling" ? "polling" : "websocket",
  });
  /** @type {any} */ (window).natsgate = { client, api }; // for the console (and the browser tests)
  client.on("state", renderConn);
  client.on("transport", (/** @type {string} */ transport) => {
    sessionStorage.setItem(TRANSPORT_KEY, transport);
    if (!client) return;
    renderConn(client.state, {});
    announce(transport === "polling" ? "WebSocket unavailable: live updates by long polling" : "Live updates by WebSocket again");
  });
  client.on("capabilities", (/** @type {any} */ caps, /** @type {any[]} */ revoked) => {
    renderCaps(caps, revoked);
  });
  renderConn(client.state, {});
  $("who").textContent = login.user.display_name || login.user.username;
  $("who").title = `${login.user.username} (${login.user.id})`;
  $("nav").hidden = false;
  $("session").hidden = false;
  $("caps").hidden = false;
  renderCaps(login.user.capabilities, []);
  if (!location.hash || location.hash === "#/") location.hash = "#/articles";
  else route();
}

async function logout() {
  // The client goes first: the logout revokes the token, and the gateway then closes the
  // socket 4401 ("token revoked"). A client still open when that close arrives takes it for
  // an involuntary sign-out, tries a refresh (401) and says the session ended.
  const closing = client;
  if (!closing) return; // a second click while the first one is under way
  client = null;
  me = null;
  closing.close();
  localStorage.removeItem(SESSION_FLAG);
  try {
    await api.post("/auth/logout");
  } catch {
    // logged out anyway: the cookie may be gone already
  }
  // Only now: a login typed before the logout's answer would have its cookie cleared by it.
  showLogin();
  announce("Logged out");
}

/**
 * @param {string} state
 * @param {{retryIn?: number, code?: number, error?: any, connects?: number}} details
 */
function renderConn(state, details) {
  const conn = $("conn");
  conn.dataset.state = state;
  const polling = !!client && client.transport === "polling";
  if (client) {
    conn.dataset.connects = String(client.connects);
    conn.dataset.transport = client.transport;
  }
  const text = {
    connecting: "Connecting…",
    open: polling ? "Live (polling)" : "Live",
    reconnecting:
      details && details.retryIn ? `Reconnecting in ${(details.retryIn / 1000).toFixed(1)} s…` : "Reconnecting…",
    closed: "Disconnected",
    unauthorized: "Signed out",
  }[state];
  $("conn-text").textContent = text || state;
  const titles = [];
  if (polling) titles.push("WebSocket is unavailable: updates come by HTTP long polling; WebSocket is tried again every minute");
  if (details && details.code) titles.push(`last close code ${details.code}`);
  conn.title = titles.join(" · ");
  if (state === "unauthorized") {
    localStorage.removeItem(SESSION_FLAG);
    const reason = details && details.error ? details.error.reason : "";
    if (client) client.close();
    client = null;
    showLogin(`Your session ended${reason ? ` (${reason})` : ""}. Please log in again.`);
  }
}

/**
 * @param {import("./sync.js").Capabilities} caps
 * @param {any[]} revoked
 */
function renderCaps(caps, revoked) {
  const list = $("caps-list");
  const before = list.dataset.json;
  const json = JSON.stringify(caps);
  list.dataset.json = json;
  /** @param {string} name @param {any} value */
  const row = (name, value) => [
    h("dt", null, name),
    h("dd", null, Array.isArray(value) ? value.join(", ") || "—" : Object.entries(value || {}).map(([k, v]) => `${k}: ${v.join(", ")}`).join(" · ") || "—"),
  ];
  list.replaceChildren(
    ...row("subjects", caps.subjects || []),
    ...row("buckets", caps.buckets || {}),
    ...row("streams", caps.streams || {}),
    ...row("commands", caps.commands || []),
  );
  const adminLink = /** @type {HTMLElement} */ (document.querySelector('[data-route="admin"]'));
  adminLink.hidden = !can("cmd", "users.manage");
  if (before !== undefined && before !== json) {
    $("caps-changed").hidden = false;
    const what = revoked.map((s) => `${s.op} ${s.target}`).join(", ");
    announce(what ? `Capabilities changed: ${what} revoked` : "Capabilities changed");
    setTimeout(() => ($("caps-changed").hidden = true), 8000);
  }
}

// ---------------------------------------------------------------- routing

function route() {
  if (!client || !me) return;
  const [, name = "articles", arg] = (location.hash || "#/articles").split("/");
  if (unmount) unmount();
  unmount = null;
  for (const a of document.querySelectorAll("#nav a")) {
    if (/** @type {HTMLElement} */ (a).dataset.route === name) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  const main = $("main");
  main.replaceChildren();
  const views = { articles: articlesView, chat: chatView, todos: todosView, admin: adminView };
  const view = views[/** @type {keyof typeof views} */ (name)] || articlesView;
  unmount = view(main, client, arg ? decodeURIComponent(arg) : undefined);
  const title = main.querySelector("h1");
  if (title) /** @type {HTMLElement} */ (title).focus({ preventScroll: true });
}

// ---------------------------------------------------------------- articles

/**
 * @param {HTMLElement} main
 * @param {import("./sync.js").SyncClient} c
 */
function articlesView(main, c) {
  /** @type {import("./sync.js").KvStore} */
  const store = c.kv("articles", { decode: (v, meta) => ({ ...v, revision: meta.revision }) });
  const banner = h("p", { id: "articles-state", class: "notice", hidden: true });
  const list = h("ul", { id: "articles", class: "items", "aria-label": "Articles" });
  const empty = h("p", { class: "hint", hidden: true }, "No articles yet: write the first one.");

  /** @type {{id: string, revision: number} | null} */
  let editing = null;
  const title = /** @type {HTMLInputElement} */ (h("input", { id: "article-title", name: "title", required: true, maxlength: "200" }));
  const body = /** @type {HTMLTextAreaElement} */ (h("textarea", { id: "article-body", name: "body", rows: "4" }));
  const formTitle = h("h2", { id: "article-form-title" }, "New article");
  const save = h("button", { type: "submit", class: "primary" }, "Publish");
  const cancel = h("button", { type: "button", hidden: true, onclick: () => resetForm() }, "Cancel");
  const status = h("p", { id: "article-status", class: "status", role: "status" });
  const conflict = h("div", { id: "article-conflict", class: "notice warn", role: "alert", hidden: true });

  function resetForm() {
    editing = null;
    title.value = "";
    body.value = "";
    formTitle.textContent = "New article";
    save.textContent = "Publish";
    cancel.hidden = true;
    conflict.hidden = true;
  }

  /** @param {any} a */
  function edit(a) {
    editing = { id: a.id, revision: a.revision };
    title.value = a.title;
    body.value = a.body;
    formTitle.textContent = `Edit “${a.title}”`;
    save.textContent = "Save changes";
    cancel.hidden = false;
    conflict.hidden = true;
    status.textContent = "";
    title.focus();
  }

  const UNREADABLE = "Saved. It will not appear here: you may no longer read the articles bucket.";
  const unreadable = () => store.status === "revoked" || store.status === "denied";

  /** @param {number} revision */
  async function confirmSeen(revision) {
    if (unreadable()) {
      status.textContent = UNREADABLE;
      return;
    }
    status.textContent = "Saved — waiting for the live update…";
    try {
      await store.seen(revision, { timeout: 10000 });
      status.textContent = "Saved: every open tab shows it now.";
    } catch {
      status.textContent = unreadable() ? UNREADABLE : "Saved (the live update is late).";
    }
  }

  /** @param {boolean} [overwrite] */
  async function submit(overwrite = false) {
    status.textContent = "Saving…";
    save.disabled = true;
    try {
      const json = { title: title.value.trim(), body: body.value };
      if (editing) {
        const current = store.revisionOf(editing.id);
        const ifMatch = overwrite && current !== undefined ? current : editing.revision;
        const r = await api.put(`/articles/${encodeURIComponent(editing.id)}`, json, { ifMatch });
        resetForm();
        await confirmSeen(r.revision);
      } else {
        const r = await api.post("/articles", json);
        resetForm();
        await confirmSeen(r.revision);
      }
    } catch (e) {
      if (e instanceof ApiError && e.status === 412 && editing) {
        showConflict();
        status.textContent = "";
      } else {
        status.textContent = `Not saved: ${describe(e)}`;
      }
    } finally {
      save.disabled = false;
    }
  }

  function showConflict() {
    if (!editing) return;
    const latest = store.get(editing.id);
    conflict.replaceChildren(
      h("strong", null, "Conflict: "),
      latest
        ? `someone else changed this article while you were editing it (it is now at revision ${latest.revision}, you started from ${editing.revision}). Your text is still in the form above.`
        : "this article was deleted while you were editing it.",
      h(
        "span",
        { class: "actions" },
        latest &&
          h("button", { type: "button", onclick: () => edit(store.get(/** @type {any} */ (editing).id)) }, "Load the latest version"),
        latest && h("button", { type: "button", class: "danger", onclick: () => submit(true) }, "Overwrite with my text"),
      ),
    );
    conflict.hidden = false;
    /** @type {HTMLElement | null} */ (conflict.querySelector("button"))?.focus();
  }

  /** @param {any} a @param {HTMLElement | undefined} el */
  function renderItem(a, el) {
    const mine = !!me && a.author === me.id;
    const may = (/** @type {string} */ command) => can("cmd", command) && (mine || can("cmd", "articles.moderate"));
    const sig = `${a.revision}|${may("articles.update")}|${may("articles.delete")}`;
    if (el && el.dataset.sig === sig) return el; // unchanged: keep it (and focus)
    /** @param {string} command */
    const why = (command) => (can("cmd", command) ? "Only its author or a moderator (articles.moderate) may change it." : noCommand(command));
    const del = h("button", { type: "button", class: "danger", "aria-label": `Delete “${a.title}”` }, "Delete");
    del.addEventListener("click", async () => {
      if (del.dataset.armed !== "1") {
        del.dataset.armed = "1";
        del.textContent = "Really delete?";
        del.setAttribute("aria-label", `Really delete “${a.title}”?`);
        setTimeout(() => {
          del.dataset.armed = "";
          del.textContent = "Delete";
          del.setAttribute("aria-label", `Delete “${a.title}”`);
        }, 4000);
        return;
      }
      try {
        const r = await api.del(`/articles/${encodeURIComponent(a.id)}`, { ifMatch: a.revision });
        await confirmSeen(r.revision);
        status.textContent = "Deleted.";
      } catch (e) {
        status.textContent =
          e instanceof ApiError && e.status === 412 ? "Not deleted: it changed meanwhile — look again." : `Not deleted: ${describe(e)}`;
      }
    });
    const editButton = h("button", { type: "button", onclick: () => edit(store.get(a.id)), "aria-label": `Edit “${a.title}”` }, "Edit");
    const li = h(
      "li",
      { class: "item article", "data-id": a.id, "data-revision": a.revision, "data-sig": sig },
      h("h3", null, a.title),
      h(
        "p",
        { class: "meta" },
        mine
          ? "by you"
          : h("span", { class: "author", title: a.author }, a.author_name ? `by ${a.author_name}` : `by user ${String(a.author).slice(0, 7)}…`),
        ` · ${when(a.updated_at)} · revision ${a.revision}`,
      ),
      a.body ? h("p", { class: "body" }, a.body) : null,
      h(
        "div",
        { class: "actions" },
        editButton,
        del,
      ),
    );
    gate(editButton, may("articles.update"), why("articles.update"));
    gate(del, may("articles.delete"), why("articles.delete"));
    if (el) el.replaceWith(li);
    return li;
  }

  function render() {
    const items = [...store.values.values()].sort((a, b) => String(b.updated_at).localeCompare(String(a.updated_at)));
    reconcile(list, items, (a) => a.id, renderItem);
    empty.hidden = !(store.state === "synced" && items.length === 0);
    showSubState(banner, store, "articles");
    main.dataset.synced = String(store.state === "synced");
  }

  const offs = [
    store.on("change", render),
    store.on("state", render),
    store.on("revoked", () => {
      render();
      announce("Your access to articles was revoked");
    }),
    store.on("error", render),
    c.on("capabilities", () => {
      /** @type {HTMLElement} */ (main.querySelector("#article-form")).hidden = !can("cmd", "articles.create");
      render(); // Edit and Delete follow the new capabilities
    }),
  ];
  main.append(
    h(
      "section",
      { class: "view articles-view", "aria-labelledby": "articles-h" },
      h("h1", { id: "articles-h", tabindex: "-1" }, "Articles"),
      h("p", { class: "hint" }, "Live from KV bucket ", h("code", null, "articles"), ": changes by anyone appear here without reload."),
      banner,
      h(
        "form",
        {
          id: "article-form",
          class: "card editor",
          "aria-labelledby": "article-form-title",
          hidden: !can("cmd", "articles.create"),
          onsubmit: (/** @type {Event} */ ev) => {
            ev.preventDefault();
            submit();
          },
        },
        formTitle,
        h("label", { for: "article-title" }, "Title"),
        title,
        h("label", { for: "article-body" }, "Text"),
        body,
        conflict,
        h("div", { class: "actions" }, save, cancel),
        status,
      ),
      h("div", { class: "list" }, empty, list),
    ),
  );
  render();
  return () => {
    offs.forEach((off) => off());
    store.close();
  };
}

// ---------------------------------------------------------------- chat

/**
 * @param {HTMLElement} main
 * @param {import("./sync.js").SyncClient} c
 * @param {string} [arg]
 */
function chatView(main, c, arg) {
  const room = arg && TOKEN_RE.test(arg) ? arg : "general";
  const stream = c.stream("chat", { filter: `chat.room.${room}`, startSeq: 1, batch: 200 });
  const banner = h("p", { id: "chat-state", class: "notice", hidden: true });
  const log = h("ol", { id: "messages", class: "messages", "aria-label": `Messages in ${room}`, "aria-live": "polite" });
  const joined = joinedRooms();
  if (!ROOMS.includes(room) && !joined.includes(room)) {
    joined.push(room);
    sessionStorage.setItem(JOINED_KEY, JSON.stringify(joined));
  }
  const rooms = [...ROOMS, ...joined];
  const text = /** @type {HTMLInputElement} */ (h("input", { id: "chat-text", name: "text", autocomplete: "off", required: true, maxlength: "4000", placeholder: `Message #${room}` }));
  const status = h("p", { id: "chat-status", class: "status", role: "status" });
  const sendButton = h("button", { type: "submit", class: "primary" }, "Send");
  const join = /** @type {HTMLInputElement} */ (h("input", { id: "chat-room", name: "room", placeholder: "room name", pattern: "[A-Za-z0-9_\\-]{1,64}", "aria-label": "Join a room" }));

  /** @type {HTMLElement | null} the newest message, to scroll to at the next frame */
  let newest = null;
  let scrollFrame = 0;
  function scrollToNewest() {
    scrollFrame = 0;
    if (newest && newest.isConnected) newest.scrollIntoView({ block: "nearest" });
    newest = null;
  }

  /** @param {import("./sync.js").StreamMessage} m */
  function append(m) {
    const p = m.payload || {};
    const mine = me && p.author === me.id;
    newest = h(
      "li",
      { class: mine ? "msg mine" : "msg", "data-seq": m.seq },
      h("span", { class: "from" }, p.author_name || p.author || "?"),
      h("time", { datetime: m.time }, when(p.time || m.time)),
      h("span", { class: "text" }, p.text ?? JSON.stringify(m.payload)),
    );
    log.append(newest);
    // One scroll (one layout) per frame: a history replay appends hundreds at once.
    if (!scrollFrame) scrollFrame = requestAnimationFrame(scrollToNewest);
  }

  let pending = 0;
  /** @type {Promise<void>} one message after the other: bob's lines arrive in his order */
  let queue = Promise.resolve();
  function send() {
    const value = text.value.trim();
    if (!value) return;
    const key = newId();
    text.value = "";
    pending++;
    status.textContent = "Sending…";
    queue = queue.then(() => post(value, key));
  }

  /** @param {string} value @param {string} key */
  async function post(value, key) {
    let r = null;
    // Retry with the same Idempotency-Key: the API stores a retried message once.
    for (let attempt = 0; attempt < 5 && !r; attempt++) {
      try {
        r = await api.post("/commands/chat.send", { room, text: value }, { idempotencyKey: key });
      } catch (e) {
        if (!(e instanceof ApiError) || (e.status !== 0 && e.status < 500)) {
          status.textContent = `Not sent: ${describe(e)}`;
          text.value = text.value || value;
          pending--;
          return;
        }
        await new Promise((res) => setTimeout(res, 300 * (attempt + 1)));
      }
    }
    if (!r) {
      status.textContent = "Not sent: the server could not be reached.";
      text.value = text.value || value;
      pending--;
      return;
    }
    pending--;
    const seq = r.seq;
    // "Sending…" stays until the WebSocket delivered it (or, offline, for at most 30 s).
    const done = () => {
      if (!pending) status.textContent = "";
    };
    stream.seen(seq, { timeout: 30000 }).then(done, done);
  }

  const offs = [
    stream.on("message", append),
    stream.on("reset", () => log.replaceChildren()),
    stream.on("gap", () => log.append(h("li", { class: "msg gap" }, "Some older messages are no longer stored."))),
    stream.on("state", () => showSubState(banner, stream, "this chat")),
    stream.on("revoked", () => showSubState(banner, stream, "this chat")),
    stream.on("error", () => showSubState(banner, stream, "this chat")),
  ];
  main.append(
    h(
      "section",
      { class: "view chat", "aria-labelledby": "chat-h" },
      h("h1", { id: "chat-h", tabindex: "-1" }, `Chat: #${room}`),
      h(
        "nav",
        { class: "rooms", "aria-label": "Rooms" },
        rooms.map((r) => h("a", { href: `#/chat/${r}`, "aria-current": r === room ? "page" : null }, `#${r}`)),
        h(
          "form",
          {
            class: "join",
            onsubmit: (/** @type {Event} */ ev) => {
              ev.preventDefault();
              if (TOKEN_RE.test(join.value)) location.hash = `#/chat/${join.value}`;
            },
          },
          join,
          h("button", { type: "submit" }, "Join"),
        ),
      ),
      banner,
      log,
      h(
        "form",
        {
          id: "chat-form",
          class: "send",
          onsubmit: (/** @type {Event} */ ev) => {
            ev.preventDefault();
            send();
          },
        },
        h("label", { for: "chat-text", class: "visually-hidden" }, "Message"),
        text,
        sendButton,
      ),
      status,
    ),
  );
  showSubState(banner, stream, "this chat");
  const gateSend = () => {
    for (const el of [text, sendButton]) gate(el, can("cmd", "chat.send"), noCommand("chat.send"));
  };
  gateSend();
  offs.push(c.on("capabilities", gateSend));
  return () => {
    offs.forEach((off) => off());
    cancelAnimationFrame(scrollFrame);
    stream.close();
  };
}

// ---------------------------------------------------------------- todos

/**
 * @param {HTMLElement} main
 * @param {import("./sync.js").SyncClient} c
 */
function todosView(main, c) {
  const uid = /** @type {any} */ (me).id;
  const prefix = `user.${uid}.`;
  const store = c.kv("todos", { pattern: `${prefix}>` });
  const banner = h("p", { id: "todos-state", class: "notice", hidden: true });
  const list = h("ul", { id: "todos", class: "items todos", "aria-label": "Your todos" });
  const empty = h("p", { class: "hint", hidden: true }, "Nothing to do.");
  const title = /** @type {HTMLInputElement} */ (h("input", { id: "todo-title", name: "title", required: true, maxlength: "200", autocomplete: "off", placeholder: "What needs doing?" }));
  const status = h("p", { id: "todo-status", class: "status", role: "status" });

  /** @param {any} t */
  async function put(t) {
    try {
      const r = await api.post("/commands/todos.put", { id: t.id, title: t.title, done: t.done });
      await store.seen(r.revision, { timeout: 10000 }).catch(() => {});
      status.textContent = "";
    } catch (e) {
      status.textContent = `Not saved: ${describe(e)}`;
    }
  }

  /** @param {any} t @param {HTMLElement | undefined} el */
  function renderItem(t, el) {
    const sig = `${t.title}|${t.done}|${can("cmd", "todos.put")}|${can("cmd", "todos.delete")}`;
    if (el && el.dataset.sig === sig) return el;
    const box = h("input", { type: "checkbox", id: `todo-${t.id}`, checked: !!t.done, onchange: () => put({ ...t, done: !t.done }) });
    gate(box, can("cmd", "todos.put"), noCommand("todos.put"));
    const li = h(
      "li",
      { class: t.done ? "item todo done" : "item todo", "data-id": t.id, "data-sig": sig },
      box,
      h("label", { for: `todo-${t.id}` }, t.title),
      h(
        "button",
        {
          type: "button",
          class: "danger small",
          "aria-label": `Delete “${t.title}”`,
          onclick: async () => {
            try {
              const r = await api.post("/commands/todos.delete", { id: t.id });
              await store.seen(r.revision, { timeout: 10000 }).catch(() => {});
            } catch (e) {
              status.textContent = `Not deleted: ${describe(e)}`;
            }
          },
        },
        "Delete",
      ),
    );
    gate(/** @type {HTMLElement} */ (li.querySelector("button")), can("cmd", "todos.delete"), noCommand("todos.delete"));
    if (el) {
      const focused = el.contains(document.activeElement) ? document.activeElement : null;
      el.replaceWith(li);
      if (focused && focused.tagName === "INPUT") box.focus();
    }
    return li;
  }

  function render() {
    const items = [...store.values.entries()]
      .map(([key, v]) => ({ ...v, id: v && v.id ? v.id : key.slice(prefix.length) }))
      .sort((a, b) => Number(a.done) - Number(b.done) || String(a.title).localeCompare(String(b.title)));
    reconcile(list, items, (t) => t.id, renderItem);
    empty.hidden = !(store.state === "synced" && items.length === 0);
    showSubState(banner, store, "your todos");
    main.dataset.synced = String(store.state === "synced");
  }

  const addButton = h("button", { type: "submit", class: "primary" }, "Add");
  const gateAdd = () => {
    for (const el of [title, addButton]) gate(el, can("cmd", "todos.put"), noCommand("todos.put"));
    render();
  };
  const offs = ["change", "state", "revoked", "error"].map((ev) => store.on(/** @type {any} */ (ev), render));
  offs.push(c.on("capabilities", gateAdd));
  main.append(
    h(
      "section",
      { class: "view", "aria-labelledby": "todos-h" },
      h("h1", { id: "todos-h", tabindex: "-1" }, "Todos"),
      h("p", { class: "hint" }, "Yours only: KV ", h("code", null, "todos"), " keys ", h("code", null, `${prefix}>`), "."),
      banner,
      h(
        "form",
        {
          id: "todo-form",
          class: "card inline",
          onsubmit: async (/** @type {Event} */ ev) => {
            ev.preventDefault();
            const t = { id: newId(), title: title.value.trim(), done: false };
            if (!t.title) return;
            title.value = "";
            await put(t);
          },
        },
        h("label", { for: "todo-title", class: "visually-hidden" }, "New todo"),
        title,
        addButton,
      ),
      status,
      empty,
      list,
    ),
  );
  gateAdd();
  return () => {
    offs.forEach((off) => off());
    store.close();
  };
}

// ---------------------------------------------------------------- admin

const CAP_FIELDS = ["subjects", "buckets", "streams", "commands"];

/**
 * Check a capability document before sending it; the API validates again (422).
 * @param {string} text
 * @returns {{caps?: any, error?: string}}
 */
export function checkCapabilities(text) {
  let caps;
  try {
    caps = JSON.parse(text);
  } catch (e) {
    return { error: `Not valid JSON: ${e instanceof Error ? e.message : e}` };
  }
  if (!caps || typeof caps !== "object" || Array.isArray(caps)) return { error: "Capabilities must be a JSON object." };
  for (const k of Object.keys(caps)) {
    if (!CAP_FIELDS.includes(k)) return { error: `Unknown field “${k}”: use ${CAP_FIELDS.join(", ")}.` };
  }
  /** @param {string} where @param {any} list */
  const patterns = (where, list) => {
    if (!Array.isArray(list) || list.some((p) => typeof p !== "string")) return `${where} must be a list of strings.`;
    const bad = list.find((p) => !validPattern(p.replaceAll("{uid}", "uid")));
    return bad !== undefined ? `${where}: “${bad}” is not a valid pattern.` : null;
  };
  for (const k of ["subjects", "commands"]) {
    if (k in caps) {
      const e = patterns(k, caps[k]);
      if (e) return { error: e };
    }
  }
  for (const k of ["buckets", "streams"]) {
    if (!(k in caps)) continue;
    if (!caps[k] || typeof caps[k] !== "object" || Array.isArray(caps[k])) return { error: `${k} must be an object of name → patterns.` };
    for (const [name, list] of Object.entries(caps[k])) {
      const e = patterns(`${k}.${name}`, list);
      if (e) return { error: e };
    }
  }
  return { caps };
}

/**
 * The admin's "new user" form (POST /api/users). A new user may do nothing until given
 * capabilities: they can start as a copy of an existing user's, and the editor opens on them.
 * @param {() => Map<string, any>} users the users known now
 * @param {(user: any) => void} created
 */
function newUserForm(users, created) {
  const field = (/** @type {string} */ id, /** @type {string} */ label, /** @type {Record<string, any>} */ attrs) => [
    h("label", { for: id }, label),
    h("input", { id, name: id, required: true, autocomplete: "off", ...attrs }),
  ];
  const [nameLabel, username] = field("new-username", "Username", { maxlength: "32", autocapitalize: "none" });
  const [displayLabel, display] = field("new-display-name", "Display name", { maxlength: "100", required: false });
  const [passLabel, password] = field("new-password", "Password (at least 8 characters)", { type: "password", minlength: "8", autocomplete: "new-password" });
  const copy = h("select", { id: "new-caps-from" }, h("option", { value: "" }, "none (set them below)"));
  const status = h("p", { id: "new-user-status", class: "status", role: "status" });
  const submit = h("button", { type: "submit", class: "primary" }, "Create user");
  const details = h(
    "details",
    {
      class: "card",
      ontoggle: () => {
        const options = [...users().values()].sort((a, b) => a.username.localeCompare(b.username));
        copy.replaceChildren(copy.firstChild, ...options.map((u) => h("option", { value: u.id }, u.username)));
      },
    },
    h("summary", null, "New user"),
    h(
      "form",
      {
        id: "new-user-form",
        onsubmit: async (/** @type {Event} */ ev) => {
          ev.preventDefault();
          submit.disabled = true;
          status.textContent = "Creating…";
          const from = users().get(copy.value);
          try {
            const u = await api.post("/users", {
              username: username.value.trim(),
              display_name: display.value.trim(),
              password: password.value,
              ...(from ? { capabilities: from.capabilities } : {}),
            });
            status.textContent = `Created ${u.username}${from ? ` with the capabilities of ${from.username}` : ": give them capabilities below"}.`;
            /** @type {HTMLFormElement} */ (ev.target).reset();
            created(u);
          } catch (e) {
            status.textContent = `Not created: ${describe(e)}`;
          } finally {
            submit.disabled = false;
          }
        },
      },
      nameLabel,
      username,
      displayLabel,
      display,
      passLabel,
      password,
      h("label", { for: "new-caps-from" }, "Start with the capabilities of"),
      copy,
      h("div", { class: "actions" }, submit),
      status,
    ),
  );
  return details;
}

/**
 * @param {HTMLElement} main
 * @param {import("./sync.js").SyncClient} c
 * @param {string} [arg]
 */
function adminView(main, c, arg) {
  const section = h("section", { class: "view", "aria-labelledby": "admin-h" }, h("h1", { id: "admin-h", tabindex: "-1" }, "Admin: users"));
  main.append(section);
  if (!can("cmd", "users.manage")) {
    section.append(h("p", { class: "notice warn" }, "You need the users.manage command capability."));
    return () => {};
  }
  const banner = h("p", { id: "users-state", class: "notice", hidden: true });
  const rows = h("tbody", { id: "users" });
  const editor = h("div", { id: "user-editor", class: "card", hidden: true });
  /** @type {Map<string, any>} */
  let users = new Map();
  /** @type {string | null} */
  let selected = arg || null;
  /** @type {(() => void) | null} */
  let closeStore = null;

  function renderRows() {
    const list = [...users.values()].sort((a, b) => a.username.localeCompare(b.username));
    rows.replaceChildren(
      ...list.map((u) =>
        h(
          "tr",
          { "data-id": u.id, "data-username": u.username, class: u.id === selected ? "selected" : "" },
          h("td", null, u.username),
          h("td", null, u.display_name),
          h("td", null, h("code", null, u.id)),
          h("td", null, u.disabled ? "disabled" : "active"),
          h("td", null, h("button", { type: "button", onclick: () => select(u.id), "aria-label": `Edit capabilities of ${u.username}` }, "Edit")),
        ),
      ),
    );
  }

  /** @param {string} id */
  function select(id) {
    selected = id;
    renderRows();
    renderEditor(true);
  }

  /** @param {boolean} fresh */
  function renderEditor(fresh) {
    const u = selected ? users.get(selected) : null;
    if (!u) {
      editor.hidden = true;
      return;
    }
    if (!fresh && editor.dataset.id === u.id) {
      // A live change of the user being edited: keep the admin's text, say whether the
      // stored capabilities now differ from it.
      const note = /** @type {HTMLElement | null} */ (editor.querySelector(".live-note"));
      const area = /** @type {HTMLTextAreaElement | null} */ (editor.querySelector("textarea"));
      let same = false;
      try {
        same = !!area && JSON.stringify(JSON.parse(area.value)) === JSON.stringify(u.capabilities);
      } catch {
        same = false;
      }
      if (note) note.hidden = same;
      return;
    }
    editor.dataset.id = u.id;
    const area = /** @type {HTMLTextAreaElement} */ (h("textarea", { id: "caps-json", rows: "14", spellcheck: "false", "aria-describedby": "caps-error" }));
    area.value = JSON.stringify(u.capabilities, null, 2);
    const error = h("p", { id: "caps-error", class: "notice error", role: "alert", hidden: true });
    const status = h("p", { id: "caps-status", class: "status", role: "status" });
    const save = h("button", { type: "submit", class: "primary" }, "Save capabilities");
    editor.replaceChildren(
      h(
        "form",
        {
          id: "caps-form",
          "aria-labelledby": "editor-h",
          onsubmit: async (/** @type {Event} */ ev) => {
            ev.preventDefault();
            error.hidden = true;
            status.textContent = "";
            const checked = checkCapabilities(area.value);
            if (checked.error) {
              error.textContent = checked.error;
              error.hidden = false;
              area.focus();
              return;
            }
            save.disabled = true;
            try {
              const r = await api.put(`/users/${encodeURIComponent(u.id)}`, { capabilities: checked.caps });
              users.set(u.id, { ...users.get(u.id), ...r });
              status.textContent = `Saved (revision ${r.revision}): open sockets of ${u.username} apply it now.`;
            } catch (e) {
              const p = e instanceof ApiError ? e.problem : {};
              error.textContent = `Refused: ${describe(e)}${p.where ? ` (at ${p.where}${p.pattern ? `: “${p.pattern}”` : ""})` : ""}`;
              error.hidden = false;
            } finally {
              save.disabled = false;
            }
          },
        },
        h("h2", { id: "editor-h" }, `Capabilities of ${u.username}`),
        h("label", { for: "caps-json" }, "JSON (", h("code", null, "{uid}"), " stands for the user's id)"),
        area,
        error,
        h("p", { class: "notice live-note", hidden: true }, "This user changed meanwhile (see the list)."),
        h(
          "div",
          { class: "actions" },
          save,
          h("button", { type: "button", onclick: () => renderEditor(true) }, "Reset"),
        ),
        status,
      ),
    );
    editor.hidden = false;
  }

  async function loadOverHttp() {
    try {
      const r = await api.get("/users");
      users = new Map(r.items.map((/** @type {any} */ u) => [u.id, u]));
      renderRows();
      renderEditor(false);
    } catch (e) {
      banner.textContent = `Could not load users: ${describe(e)}`;
      banner.hidden = false;
    }
  }

  if (can("kv_sub", "auth_users")) {
    // Live: the user records themselves (capabilities as stored, `{uid}` included).
    const store = c.kv("auth_users");
    const sync = () => {
      users = new Map([...store.values.values()].map((u) => [u.id, u]));
      renderRows();
      renderEditor(false);
      showSubState(banner, store, "users");
    };
    const offs = ["change", "state", "revoked", "error"].map((ev) => store.on(/** @type {any} */ (ev), sync));
    closeStore = () => {
      offs.forEach((off) => off());
      store.close();
    };
    sync();
  } else {
    loadOverHttp();
  }

  section.append(
    h("p", { class: "hint" }, "Changes apply live: a user's open subscriptions that the new capabilities no longer allow end at once."),
    banner,
    newUserForm(
      () => users,
      (u) => {
        users.set(u.id, u); // the live list may show it a moment later: select it now
        select(u.id);
      },
    ),
    h(
      "div",
      { class: "table-wrap" },
      h(
        "table",
        { class: "users" },
        h("thead", null, h("tr", null, ...["Username", "Name", "Id", "Status", ""].map((t) => h("th", { scope: "col" }, t)))),
        rows,
      ),
    ),
    editor,
  );
  return () => {
    if (closeStore) closeStore();
  };
}

boot();
