// The chat view: a room is a JetStream subject read from its first message, then live;
// who is in it is the room's presence (docs/protocol.md, "Presence"): this tab announces
// itself with a presence `sub` and lists everyone announced, from any gateway.
import { ApiError } from "natsgate";
import { api, session, h, can, gate, noCommand, describe, when, newId, showSubState } from "../ui.js";

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

/**
 * @param {HTMLElement} main
 * @param {import("natsgate").SyncClient} c
 * @param {string} [arg]
 */
export function chatView(main, c, arg) {
  const room = arg && TOKEN_RE.test(arg) ? arg : "general";
  const subject = `chat.room.${room}`;
  const stream = c.stream("chat", { filter: subject, startSeq: 1, batch: 200 });
  // Announced while the view is open (the messages come from the stream, not this sub).
  const announce = can("sub", subject) ? c.subscribe(subject, undefined, { presence: true }) : null;
  const here = can("kv_sub", "presence", `${subject}.*.*`) ? c.presence(subject) : null;
  const people = h("ul", { id: "chat-presence", class: "presence", "aria-label": `Who is in ${room}`, "aria-live": "polite" });
  function showPeople() {
    if (!here) return;
    const members = [...here.members.values()].sort((a, b) => a.name.localeCompare(b.name));
    people.replaceChildren(
      ...members.map((m) =>
        h("li", { "data-uid": m.uid, title: m.connections > 1 ? `${m.connections} tabs` : null }, m.name),
      ),
    );
  }
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

  /** @param {import("natsgate").StreamMessage} m */
  function append(m) {
    const p = m.payload || {};
    const mine = session.me && p.author === session.me.id;
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
  if (here) offs.push(here.on("change", showPeople));
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
      here ? h("aside", { class: "here" }, h("h2", {}, "Here now"), people) : null,
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
    here?.close();
    announce?.close();
  };
}
