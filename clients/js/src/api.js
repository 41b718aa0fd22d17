// A small JSON client for the HTTP API: writes acknowledge and return a position that a
// store's or stream's `seen()` waits for.

import { ApiError } from "./codes.js";

/**
 * @typedef {{json?: any, ifMatch?: number | string, headers?: Record<string, string>,
 *            idempotencyKey?: string, signal?: AbortSignal}} RequestOptions
 * @typedef {{status: number, etag: string | null, location: string | null,
 *            headers: Headers, body: any}} ApiResponse
 */

/**
 * A small JSON client for the HTTP API (same origin, the session cookie). It never touches
 * a SyncClient's state: a write's answer carries the position to `seen()`, nothing more.
 * Non-2xx answers throw ApiError with the problem's fields; network failures throw
 * ApiError with status 0.
 * Where there is no page cookie (Node), `token` (or a function returning the current one)
 * is sent as `Authorization: Bearer`.
 * @param {{base?: string, fetch?: typeof fetch, token?: string | (() => string | null | undefined)}} [opts]
 */
export function createApi(opts = {}) {
  const base = opts.base ?? "/api";
  const doFetch = opts.fetch || globalThis.fetch.bind(globalThis);
  const token = typeof opts.token === "function" ? opts.token : () => /** @type {string | undefined} */ (opts.token);
  // A refresh rotates the session cookie: the old token is revoked for new requests at
  // once. A request sent with the old cookie while the refresh was under way would get
  // 401 "token revoked" for a session that is fine. So requests wait for a refresh in
  // flight, and one answered 401 that a refresh overtook is sent once more.
  /** @type {Promise<unknown> | null} */
  let refreshing = null;
  let refreshes = 0;

  /**
   * @param {string} method
   * @param {string} path
   * @param {RequestOptions} [o]
   * @returns {Promise<ApiResponse>}
   */
  async function request(method, path, o = {}) {
    /** @type {Record<string, string>} */
    const headers = { Accept: "application/json, application/problem+json", ...(o.headers || {}) };
    /** @type {RequestInit} */
    const init = { method, headers, credentials: "same-origin", signal: o.signal };
    if (o.json !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(o.json);
    }
    if (o.ifMatch !== undefined && o.ifMatch !== null) {
      const tag = String(o.ifMatch);
      headers["If-Match"] = tag.startsWith('"') || tag === "*" ? tag : `"${tag}"`;
    }
    if (o.idempotencyKey) headers["Idempotency-Key"] = o.idempotencyKey;
    const bearer = token();
    if (bearer && !headers.Authorization) headers.Authorization = `Bearer ${bearer}`;
    const isRefresh = method === "POST" && path === "/auth/refresh";
    if (!isRefresh && refreshing) await refreshing.catch(() => {});
    const generation = refreshes;
    let resp;
    try {
      const sent = doFetch(base + path, init);
      if (isRefresh) {
        const mine = sent
          .then(
            (r) => {
              if (r.ok) refreshes++;
            },
            () => {},
          )
          .finally(() => {
            if (refreshing === mine) refreshing = null;
          });
        refreshing = mine;
      }
      resp = await sent;
      if (resp.status === 401 && !isRefresh && (refreshing || refreshes !== generation)) {
        if (refreshing) await refreshing.catch(() => {});
        if (refreshes !== generation) resp = await doFetch(base + path, init); // the new cookie
      }
    } catch (e) {
      if (e && /** @type {any} */ (e).name === "AbortError") throw e;
      throw new ApiError(0, { title: "Network error", detail: `the server could not be reached (${e})` });
    }
    const text = resp.status === 204 ? "" : await resp.text();
    let body = null;
    if (text) {
      try {
        body = JSON.parse(text);
      } catch {
        body = text;
      }
    }
    if (!resp.ok) {
      const problem =
        body && typeof body === "object" ? body : { title: resp.statusText, detail: body ? String(body) : "" };
      throw new ApiError(resp.status, { status: resp.status, ...problem });
    }
    return {
      status: resp.status,
      etag: resp.headers.get("ETag"),
      location: resp.headers.get("Location"),
      headers: resp.headers,
      body,
    };
  }

  /** @param {string} method */
  const verb = (method) =>
    /**
     * @param {string} path
     * @param {any} [json]
     * @param {RequestOptions} [o]
     */
    async (path, json, o = {}) => (await request(method, path, json === undefined ? o : { ...o, json })).body;

  return {
    request,
    /** @param {string} path @param {RequestOptions} [o] */
    get: async (path, o = {}) => (await request("GET", path, o)).body,
    post: verb("POST"),
    put: verb("PUT"),
    /** @param {string} path @param {RequestOptions} [o] */
    del: async (path, o = {}) => (await request("DELETE", path, o)).body,
  };
}
