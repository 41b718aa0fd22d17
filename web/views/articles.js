// The articles view: a live KV bucket, edited over HTTP with If-Match (optimistic concurrency).
import { ApiError } from "natsgate";
import { api, session, h, can, gate, noCommand, announce, describe, when, reconcile, showSubState } from "../ui.js";

/**
 * @param {HTMLElement} main
 * @param {import("natsgate").SyncClient} c
 */
export function articlesView(main, c) {
  /** @type {import("natsgate").KvStore} */
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
    const mine = !!session.me && a.author === session.me.id;
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
