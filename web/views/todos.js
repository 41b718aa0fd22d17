// The todos view: the user's own keys of the todos bucket, written through commands.
import { api, session, h, can, gate, noCommand, describe, newId, reconcile, showSubState } from "../ui.js";

/**
 * @param {HTMLElement} main
 * @param {import("natsgate").SyncClient} c
 */
export function todosView(main, c) {
  const uid = /** @type {any} */ (session.me).id;
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
