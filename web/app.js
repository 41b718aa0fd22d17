// The demo SPA: articles, chat, todos, admin — every list is live from the one connection
// (the `natsgate` package, clients/js: a WebSocket, or long polling where WebSocket fails);
// every write goes over HTTP and the UI waits for the connection to show it. This file is
// the shell (login, connection, capabilities, routing); views/ has one module per view.
// No framework, no inline script or style (the CSP forbids them). `natsgate` resolves
// through index.html's import map to /natsgate/, where nginx serves clients/js/src.
import { ApiError, createClient } from "natsgate";
import { $, announce, api, can, describe, h, session } from "./ui.js";
import { adminView } from "./views/admin.js";
import { articlesView } from "./views/articles.js";
import { chatView } from "./views/chat.js";
import { todosView } from "./views/todos.js";

const SESSION_FLAG = "natsgate.session"; // "probably logged in": skip a 401 probe otherwise
const TRANSPORT_KEY = "natsgate.transport"; // this tab fell back to polling: start there

/** @type {(() => void) | null} cleanup of the current view */
let unmount = null;

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
  session.me = login.user;
  if (session.client) session.client.close();
  const client = createClient({
    refresh: () => api.post("/auth/refresh"),
    expiresAt: login.expires_at,
    // A reload on a network that refuses WebSocket need not fail three times again; the
    // client tries WebSocket a few seconds later anyway and moves back if it works.
    transport: sessionStorage.getItem(TRANSPORT_KEY) === "polling" ? "polling" : "websocket",
  });
  session.client = client;
  /** @type {any} */ (window).natsgate = { client, api }; // for the console (and the browser tests)
  client.on("state", renderConn);
  client.on("transport", (/** @type {string} */ transport) => {
    sessionStorage.setItem(TRANSPORT_KEY, transport);
    if (session.client !== client) return;
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
  const closing = session.client;
  if (!closing) return; // a second click while the first one is under way
  session.client = null;
  session.me = null;
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
  const { client } = session;
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
    session.client = null;
    showLogin(`Your session ended${reason ? ` (${reason})` : ""}. Please log in again.`);
  }
}

/**
 * @param {import("natsgate").Capabilities} caps
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
  const { client, me } = session;
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


boot();
