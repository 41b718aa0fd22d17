// The admin view: users and their capabilities, live from the auth_users bucket.
import { ApiError, validPattern } from "natsgate";
import { api, h, can, describe, showSubState } from "../ui.js";

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
 * The roles a user holds (PUT /api/users/{id}/roles): one checkbox per role of GET /api/roles.
 * A role's capabilities add to the user's own; changing a role reaches every holder live.
 * @param {any} u the user
 */
function rolesForm(u) {
  const boxes = h("div", { id: "roles-boxes", class: "roles" }, "Loading roles…");
  const status = h("p", { id: "roles-status", class: "status", role: "status" });
  api.get("/roles").then(
    (r) =>
      boxes.replaceChildren(
        ...(r.items.length ? [] : ["No roles yet (the resources file declares them)."]),
        ...r.items.map((/** @type {any} */ role) =>
          h("label", { class: "role" }, h("input", { type: "checkbox", name: "role", value: role.name, checked: (u.roles || []).includes(role.name) }), ` ${role.name}`),
        ),
      ),
    (e) => (boxes.textContent = `Could not load roles: ${describe(e)}`),
  );
  return h(
    "form",
    {
      id: "roles-form",
      onsubmit: async (/** @type {Event} */ ev) => {
        ev.preventDefault();
        const roles = [...boxes.querySelectorAll("input:checked")].map((b) => /** @type {HTMLInputElement} */ (b).value);
        try {
          const r = await api.put(`/users/${encodeURIComponent(u.id)}/roles`, { roles });
          status.textContent = `Roles saved (revision ${r.revision}): ${(r.roles || []).join(", ") || "none"}.`;
        } catch (e) {
          status.textContent = `Refused: ${describe(e)}`;
        }
      },
    },
    h("h2", null, `Roles of ${u.username}`),
    boxes,
    h("div", { class: "actions" }, h("button", { type: "submit" }, "Save roles")),
    status,
  );
}

/**
 * "Why may this user …?" — GET /api/users/{id}/explain: allowed or denied, and the deciding pattern.
 * @param {any} u the user
 */
function explainForm(u) {
  const op = h("select", { id: "explain-op" }, ...["kv_sub", "js_sub", "sub", "cmd"].map((o) => h("option", { value: o }, o)));
  const target = h("input", { id: "explain-target", required: true, placeholder: "todos", autocomplete: "off" });
  const pattern = h("input", { id: "explain-pattern", placeholder: "user.x.> (optional)", autocomplete: "off" });
  const answer = h("p", { id: "explain-answer", class: "status", role: "status" });
  return h(
    "form",
    {
      id: "explain-form",
      onsubmit: async (/** @type {Event} */ ev) => {
        ev.preventDefault();
        const q = new URLSearchParams({ op: /** @type {HTMLSelectElement} */ (op).value, target: /** @type {HTMLInputElement} */ (target).value.trim() });
        const p = /** @type {HTMLInputElement} */ (pattern).value.trim();
        if (p) q.set("pattern", p);
        try {
          const r = await api.get(`/users/${encodeURIComponent(u.id)}/explain?${q}`);
          answer.textContent = `${r.allowed ? "Allowed" : "Denied"}: ${r.reason}${r.rule ? ` (rule ${r.rule})` : ""}`;
        } catch (e) {
          answer.textContent = `Could not ask: ${describe(e)}`;
        }
      },
    },
    h("h2", null, `Explain: may ${u.username} …`),
    h("label", { for: "explain-op" }, "Operation"),
    op,
    h("label", { for: "explain-target" }, "Target (bucket, stream, subject or command)"),
    target,
    h("label", { for: "explain-pattern" }, "Pattern"),
    pattern,
    h("div", { class: "actions" }, h("button", { type: "submit" }, "Explain")),
    answer,
  );
}

/**
 * @param {HTMLElement} main
 * @param {import("natsgate").SyncClient} c
 * @param {string} [arg]
 */
export function adminView(main, c, arg) {
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
    editor.append(rolesForm(u), explainForm(u));
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
