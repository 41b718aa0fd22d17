// createApi and a token refresh: a request must not be refused for a cookie the refresh
// rotated while it was on its way (the API revokes the old token at once).
import { test } from "node:test";
import assert from "node:assert/strict";

import { createApi } from "../src/index.js";

/** A fetch whose answers the test hands out, one request at a time, in any order. */
function controlledFetch() {
  /** @type {{url: string, method: string, cookie: number, answer: (status: number) => void}[]} */
  const calls = [];
  let cookie = 1; // the session cookie's generation, as the browser would send it
  const fetch = (url, init) =>
    new Promise((resolve) => {
      const call = {
        url,
        method: init.method,
        cookie,
        answer: (status) => {
          if (url.endsWith("/auth/refresh") && status === 200) cookie++;
          resolve(new Response(status === 204 ? null : "{}", { status }));
        },
      };
      calls.push(call);
    });
  return { fetch, calls };
}

const settle = () => new Promise((r) => setImmediate(r));

test("a request made while a refresh is under way waits for it and carries the new cookie", async () => {
  const { fetch, calls } = controlledFetch();
  const api = createApi({ fetch });
  const refresh = api.post("/auth/refresh");
  const put = api.put("/articles/a", { title: "t" });
  await settle();
  assert.deepEqual(calls.map((c) => c.method), ["POST"], "the PUT waits for the refresh");
  calls[0].answer(200);
  await refresh;
  await settle();
  assert.equal(calls.length, 2);
  assert.equal(calls[1].cookie, 2, "sent with the refreshed cookie");
  calls[1].answer(200);
  await put;
});

test("a request answered 401 because a refresh overtook it is sent once more", async () => {
  const { fetch, calls } = controlledFetch();
  const api = createApi({ fetch });
  const put = api.put("/articles/a", { title: "t" });
  await settle();
  const refresh = api.post("/auth/refresh");
  await settle();
  calls[1].answer(200); // the refresh lands first: the PUT's cookie is now revoked
  await refresh;
  calls[0].answer(401);
  await settle();
  assert.equal(calls.length, 3, "the PUT is sent again");
  assert.equal(calls[2].cookie, 2);
  calls[2].answer(200);
  await put;
});

test("a 401 with no refresh in between is the caller's answer, not retried", async () => {
  const { fetch, calls } = controlledFetch();
  const api = createApi({ fetch });
  const put = api.put("/articles/a", { title: "t" });
  await settle();
  calls[0].answer(401);
  await assert.rejects(put, (e) => e.status === 401);
  assert.equal(calls.length, 1);
});

test("with a token (Node: no page cookie) every request carries it as a bearer", async () => {
  /** @type {Record<string, string>[]} */
  const sent = [];
  const fetch = async (/** @type {string} */ _url, /** @type {any} */ init) => {
    sent.push(init.headers);
    return new Response("{}", { status: 200 });
  };
  let token = "t1";
  await createApi({ fetch, token: "fixed" }).get("/users");
  await createApi({ fetch, token: () => token }).get("/users");
  token = "t2";
  await createApi({ fetch, token: () => token }).post("/commands/x", {}, { headers: { Authorization: "Bearer mine" } });
  await createApi({ fetch }).get("/users");
  assert.deepEqual(
    sent.map((h) => h.Authorization),
    ["Bearer fixed", "Bearer t1", "Bearer mine", undefined],
  );
});
