// Frames, NATS wildcards, capabilities and routing: pure functions, no state, no I/O.

/** @import { Capabilities, Envelope } from "./codes.js" */

// ---------------------------------------------------------------- frames

/**
 * Split one server frame into envelopes (the server batches them, newline-separated).
 * A line that is not a JSON object is reported to `onBad` and skipped.
 * @param {string} frame
 * @param {(line: string, error: unknown) => void} [onBad]
 * @returns {Envelope[]}
 */
export function splitFrame(frame, onBad) {
  /** @type {Envelope[]} */
  const out = [];
  for (const line of String(frame).split("\n")) {
    if (!line.trim()) continue;
    try {
      const env = JSON.parse(line);
      if (env === null || typeof env !== "object" || typeof env.op !== "string") {
        throw new TypeError("not an envelope");
      }
      out.push(env);
    } catch (e) {
      if (onBad) onBad(line, e);
    }
  }
  return out;
}

// ---------------------------------------------------------------- NATS wildcards

/**
 * True if `pattern` is a valid subject pattern: `.`-separated non-empty tokens, `*` a whole
 * token, `>` a whole token and the last one, no whitespace (the server's grammar).
 * @param {string} pattern
 */
export function validPattern(pattern) {
  if (typeof pattern !== "string" || !pattern || pattern.length > 512) return false;
  if (/[\s\u0000-\u001f\u007f]/.test(pattern)) return false;
  const toks = pattern.split(".");
  for (let i = 0; i < toks.length; i++) {
    const t = toks[i];
    if (!t) return false;
    if (t === ">") {
      if (i !== toks.length - 1) return false;
    } else if (t !== "*" && (t.includes("*") || t.includes(">"))) {
      return false;
    }
  }
  return true;
}

/**
 * NATS wildcard match of a literal `subject` by `pattern`: `*` is exactly one token, `>` one
 * or more trailing tokens.
 * @param {string} pattern
 * @param {string} subject
 */
export function match(pattern, subject) {
  const p = pattern.split(".");
  const s = subject.split(".");
  for (let i = 0; i < p.length; i++) {
    const t = p[i];
    if (t === ">") return s.length > i;
    if (i >= s.length) return false;
    if (t !== "*" && t !== s[i]) return false;
  }
  return p.length === s.length;
}

/**
 * True if every subject matched by `pattern` is also matched by `of` (how capabilities are
 * checked: `chat.room.*` ⊆ `chat.>`, but `chat.>` ⊄ `chat.room.*`).
 * @param {string} pattern
 * @param {string} of
 */
export function isSubset(pattern, of) {
  const a = pattern.split(".");
  const b = of.split(".");
  for (let i = 0; i < a.length; i++) {
    if (i >= b.length) return false;
    const bt = b[i];
    if (bt === ">") return true;
    if (a[i] === ">") return false;
    if (bt !== "*" && a[i] !== bt) return false;
  }
  return a.length === b.length;
}

/**
 * Would these capabilities allow the request? A hint for the UI and for re-subscribing after
 * a grant; the server decides (it also hides internal subjects and buckets).
 * @param {Capabilities | null | undefined} caps
 * @param {"sub" | "kv_sub" | "js_sub" | "cmd"} op
 * @param {string} target subject pattern (sub), bucket (kv_sub), stream (js_sub), command
 * @param {string} [pattern] key pattern (kv_sub) or filter (js_sub); default `>`
 */
export function allows(caps, op, target, pattern = ">") {
  if (!caps) return false;
  const any = (/** @type {string[] | undefined} */ list, /** @type {string} */ p) =>
    validPattern(p) && (list || []).some((c) => validPattern(c) && isSubset(p, c));
  const named = (/** @type {Record<string, string[]> | undefined} */ table) =>
    Object.entries(table || {}).some(
      ([name, list]) => (name === "*" || name === ">" || name === target) && any(list, pattern),
    );
  switch (op) {
    case "sub":
      return !target.startsWith("$") && any(caps.subjects, target);
    case "kv_sub":
      return !(target.startsWith("auth_") && target !== "auth_users") && named(caps.buckets);
    case "js_sub":
      return named(caps.streams);
    case "cmd":
      return any(caps.commands, target);
    default:
      return false;
  }
}

// ---------------------------------------------------------------- routing

/**
 * @typedef {{op: string, target: string, pattern: string, inbox: string | null}} Routable
 */

/**
 * The subscriptions an envelope belongs to. Replies and per-subscription data (`ok`,
 * `error`, `synced`, `js_msg`) name their inbox; fan-out data (`sub_msg`, `kv_msg`
 * put/delete/purge) carries none and goes to every subscription whose pattern matches.
 * @template {Routable} S
 * @param {Envelope} env
 * @param {Iterable<S>} subs
 * @returns {S[]}
 */
export function recipients(env, subs) {
  /** @type {S[]} */
  const out = [];
  const data = env.data || {};
  if (!isFanOut(env)) {
    if (env.inbox == null) return out;
    for (const s of subs) if (s.inbox === env.inbox) out.push(s);
    return out;
  }
  const target = env.target || "";
  for (const s of subs) {
    if (env.op === "sub_msg") {
      if (s.op === "sub" && match(s.pattern, target)) out.push(s);
    } else if (s.op === "kv_sub" && s.target === target && typeof data.key === "string") {
      if (match(s.pattern, data.key)) out.push(s);
    }
  }
  return out;
}

/**
 * True for fan-out data (`sub_msg`, `kv_msg` put/delete/purge), which carries no inbox and is
 * routed by pattern; everything else names the one subscription it belongs to by its inbox.
 * @param {Envelope} env
 */
export function isFanOut(env) {
  return env.op === "sub_msg" || (env.op === "kv_msg" && (env.data || {}).op !== "synced");
}
