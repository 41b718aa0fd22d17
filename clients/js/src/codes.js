// The protocol version, the shapes every module shares, the error codes and close codes the
// client acts on (docs/protocol.md, "Errors" and "Close codes"), and the two errors it throws.

/**
 * @typedef {{v?: number, op: string, target?: string, inbox?: string, data?: any}} Envelope
 * @typedef {"connecting" | "open" | "reconnecting" | "closed" | "unauthorized"} ConnectionState
 * @typedef {"connecting" | "loading" | "synced" | "error"} StoreState
 * @typedef {"connecting" | "loading" | "live" | "error"} StreamState
 * @typedef {"idle" | "pending" | "active" | "revoked" | "denied" | "failed" | "closed"} SubscriptionStatus
 * @typedef {{code: string, reason: string}} ServerError
 * @typedef {{subjects?: string[], buckets?: Record<string, string[]>,
 *            streams?: Record<string, string[]>, commands?: string[]}} Capabilities
 * @typedef {{initial?: number, max?: number, factor?: number, jitter?: number}} BackoffOptions
 */

/**
 * What a connection `state` event says besides the state: the close code and reason, the
 * error frame before it, the ms until the next attempt, connections so far, the transport.
 * @typedef {{code?: number, reason?: string, error?: ServerError | null, retryIn?: number,
 *            connects?: number, transport?: "websocket" | "polling"}} StateDetails
 */

export const PROTOCOL_VERSION = 1;

/** The package's version: the project's (shared/__init__.py), which a test keeps equal. */
export const VERSION = "0.1.0";

/**
 * The server's error codes (docs/protocol.md, "Error codes"; shared/errors.py `ErrorCode`,
 * which a test keeps equal), as `error` frames and `ServerError.code` carry them.
 */
export const ErrorCode = Object.freeze({
  BAD_REQUEST: "bad_request",
  UNSUPPORTED_VERSION: "unsupported_version",
  DUPLICATE_INBOX: "duplicate_inbox",
  FORBIDDEN: "forbidden",
  NOT_FOUND: "not_found",
  LIMIT: "limit",
  USE_HTTP: "use_http",
  REVOKED: "revoked",
  TOKEN_EXPIRED: "token_expired",
  UNAUTHORIZED: "unauthorized",
  USER_DISABLED: "user_disabled",
  BACKPRESSURE: "backpressure",
  UNAVAILABLE: "unavailable",
  TAKEN_OVER: "taken_over",
  INTERNAL: "internal",
});

/**
 * Close codes (docs/protocol.md, "Close codes"): the server's (shared/errors.py
 * `CloseCode`, which a test keeps equal), and two of the client's own: ABNORMAL, the
 * WebSocket's code for a connection lost without a close (and what a lost poll session
 * counts as), and RECONNECT, the client closing to reconnect at once.
 */
export const CloseCode = Object.freeze({
  NORMAL: 1000,
  GOING_AWAY: 1001,
  PROTOCOL_ERROR: 1002,
  POLICY: 1008,
  TOO_BIG: 1009,
  INTERNAL: 1011,
  TRY_AGAIN_LATER: 1013,
  TOKEN: 4401,
  USER_DISABLED: 4403,
  ABNORMAL: 1006,
  RECONNECT: 4000,
});

/**
 * Retry these server errors on a subscription after a backoff; the rest are final. Among
 * them `taken_over` (a newer subscription holds the durable): sending it again would take
 * the durable back, and two tabs would take it from each other for ever.
 */
/** @type {ReadonlySet<string>} */
export const RETRYABLE = new Set([ErrorCode.UNAVAILABLE, ErrorCode.LIMIT, ErrorCode.INTERNAL, ErrorCode.BACKPRESSURE]);

/** Close codes after which reconnecting cannot help. @type {ReadonlySet<number>} */
export const FINAL_CLOSES = new Set([CloseCode.PROTOCOL_ERROR, CloseCode.USER_DISABLED]);
/** Closes about who we are, not the transport (no fallback on those). @type {ReadonlySet<number>} */
export const AUTH_CLOSES = new Set([CloseCode.PROTOCOL_ERROR, CloseCode.TOKEN, CloseCode.USER_DISABLED]);

/** An error of this client or of the server (`code` is the protocol's error code). */
export class SyncError extends Error {
  /** @param {string} code @param {string} reason */
  constructor(code, reason) {
    super(`${code}: ${reason}`);
    this.name = "SyncError";
    this.code = code;
    this.reason = reason;
  }
}

/** An HTTP error: the problem+json body (RFC 9457) as fields. */
export class ApiError extends Error {
  /**
   * @param {number} status
   * @param {{type?: string, title?: string, detail?: string, [k: string]: any}} problem
   */
  constructor(status, problem) {
    super(problem.detail || problem.title || `HTTP ${status}`);
    this.name = "ApiError";
    this.status = status;
    this.type = problem.type || "about:blank";
    this.title = problem.title || "";
    this.detail = problem.detail || "";
    this.problem = problem;
  }
}
