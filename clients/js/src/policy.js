// When and over what to connect: reconnect backoff and the WebSocket → long-polling fallback
// decision (docs/protocol.md, "Fallback transport"). Pure: no timers, no sockets.

/** @import { BackoffOptions } from "./codes.js" */

// ---------------------------------------------------------------- backoff

/**
 * Delay before reconnect attempt `attempt` (0 = first retry): exponential, capped, with
 * jitter so that a restarted gateway is not hit by every client at the same instant.
 * The delay lies in [base·(1−jitter), base] with base = min(max, initial·factor^attempt).
 * @param {number} attempt
 * @param {BackoffOptions} [opts]
 * @param {() => number} [random]
 */
export function backoffDelay(attempt, opts = {}, random = Math.random) {
  const { initial = 250, max = 10000, factor = 2, jitter = 0.5 } = opts;
  const base = Math.min(max, initial * Math.pow(factor, Math.max(0, attempt)));
  return Math.round(base * (1 - jitter * random()));
}

// ---------------------------------------------------------------- which transport

/**
 * @typedef {"websocket" | "polling"} TransportKind
 * @typedef {{fallbackAfter?: number, probeInterval?: number, firstProbe?: number,
 *            polling?: boolean}} FallbackOptions
 */

/**
 * The fallback decision (docs/protocol.md, "Fallback transport"), with no timers and no sockets:
 * which transport the next connection attempt uses. WebSocket first; after `fallbackAfter`
 * WebSocket attempts in a row that never became a session, long polling. A polling attempt
 * that fails too says the server is away rather than WebSocket blocked: the next attempt is
 * WebSocket again, and one more WebSocket failure goes back to polling, so during an outage
 * the two alternate and whichever works first wins. While a session runs over polling, a
 * WebSocket is tried (the client does that) and taken when it works: first after
 * `firstProbe` ms — a gateway restart also fails a few WebSockets in a row, and should not
 * cost a minute of polling — then every `probeInterval` ms.
 */
export class TransportPolicy {
  /** @param {FallbackOptions} [opts] */
  constructor(opts = {}) {
    this.fallbackAfter = Math.max(1, opts.fallbackAfter ?? 3);
    this.probeInterval = opts.probeInterval ?? 60000;
    this.firstProbe = Math.min(opts.firstProbe ?? 5000, this.probeInterval);
    this.enabled = opts.polling !== false;
    /** @type {TransportKind} the transport of the next attempt */
    this.mode = "websocket";
    /** WebSocket attempts in a row that never became a session */
    this.wsFailures = 0;
    /** polling attempts in a row that never became a session */
    this.pollFailures = 0;
  }

  /** Start with polling (a network known to refuse WebSocket). */
  preferPolling() {
    if (!this.enabled) return;
    this.mode = "polling";
    this.wsFailures = this.fallbackAfter;
  }

  /**
   * An attempt over `kind` ended before its session started (no `cap_update`). Not for
   * auth refusals (4401, 4403): those say nothing about the transport.
   * @param {TransportKind} kind
   */
  failed(kind) {
    if (kind === "websocket") {
      this.wsFailures++;
      if (this.enabled && this.wsFailures >= this.fallbackAfter) this.mode = "polling";
    } else {
      this.pollFailures++;
      this.mode = "websocket";
      this.wsFailures = this.fallbackAfter - 1;
    }
  }

  /**
   * A session started over `kind`: the next attempt (after it ends) uses the same.
   * @param {TransportKind} kind
   */
  connected(kind) {
    this.mode = kind;
    this.pollFailures = 0;
    if (kind === "websocket") this.wsFailures = 0;
  }

  /**
   * Should a WebSocket be tried beside a session that runs over `kind`?
   * @param {TransportKind} kind
   */
  probes(kind) {
    return kind === "polling" && this.probeInterval > 0 && Number.isFinite(this.probeInterval);
  }

  /**
   * ms before WebSocket try `n` (0 = the first) of a polling session, with up to 20 %
   * jitter so that clients that fell back together do not all try at once.
   * @param {number} n
   * @param {() => number} [random]
   */
  probeDelay(n, random = Math.random) {
    const base = n <= 0 ? this.firstProbe : this.probeInterval;
    return Math.round(base * (1 - 0.2 * random()));
  }
}
