"""The latency the long-polling fallback adds: from an HTTP write to the app seeing it.

    .venv/bin/python bench/fallback_latency.py --writes 200 --rounds 2

Starts a whole stack with `make start` on free loopback ports (tests/deploy/stackrun.py, a
temp VAR_DIR), opens one page of it in Debian's chromium and, in that page, imports the real
JS client (clients/js at /natsgate/) twice: one forced onto WebSocket and one forced onto
long polling (no fallback, no WebSocket tries), both through nginx as the SPA is. Per
write, in the page's own clock: `performance.now()` just before the HTTP request is sent,
and when the client hands
the result to the app (a `js_msg` with the message's text for `POST /api/commands/chat.send`;
a `kv_msg` put with the new title for `PUT /api/articles/{id}`). Writes are sequential with a
random 20-80 ms pause between them (so a long poll is usually waiting, as with sparse real
traffic); transports alternate by round so that drift hits both alike. Prints p50/p99/max
per transport and kind, and the HTTP response time alongside. Bounded: rounds x writes x 4.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from playwright.async_api import Page, async_playwright  # noqa: E402

from bench.common import pct  # noqa: E402
from tests.browser.conftest import CHROMIUM, CHROMIUM_ARGS  # noqa: E402
from tests.deploy.stackrun import Stack  # noqa: E402

# Runs in the page: one client on `transport`, `writes` chat messages then `writes` article
# updates; returns [[kind, ms to the app, ms to the HTTP response], ...].
MEASURE = """
async ({transport, writes, room, articleId, password}) => {
  const m = await import("/natsgate/index.js");
  const api = m.createApi();
  const client = m.createClient({
    transport, polling: transport === "polling", probeInterval: 0,
  });
  const arrived = new Map();  // text -> performance.now()
  const waiters = new Map();
  const arrive = (text) => {
    if (arrived.has(text)) return;
    arrived.set(text, performance.now());
    const w = waiters.get(text);
    if (w) w();
  };
  const seen = (text) => arrived.has(text) ? Promise.resolve()
    : new Promise((r, j) => {
        waiters.set(text, r);
        setTimeout(() => j(new Error(`${text} not seen within 10 s`)), 10000);
      });
  const chat = client.stream("chat", { filter: `chat.room.${room}` });
  chat.on("message", (msg) => msg.payload && arrive(msg.payload.text));
  const store = client.kv("articles", { pattern: articleId });
  store.on("change", (cs) => cs.forEach((c) => c.op === "put" && c.value && arrive(c.value.title)));
  const t0 = performance.now();
  while (client.state !== "open" || store.state !== "synced" || chat.state !== "live") {
    if (performance.now() - t0 > 15000) throw new Error(`not live: ${client.state}`);
    await new Promise((r) => setTimeout(r, 20));
  }
  if (client.transport !== transport) throw new Error(`on ${client.transport}`);
  const pause = () => new Promise((r) => setTimeout(r, 20 + Math.random() * 60));
  const out = [];
  for (const kind of ["chat", "kv"]) {
    for (let i = 0; i < writes; i++) {
      await pause();
      const text = `${transport}-${kind}-${i}-${Math.random().toString(36).slice(2)}`;
      const start = performance.now();
      if (kind === "chat") await api.post("/commands/chat.send", { room, text });
      else await api.put(`/articles/${articleId}`, { title: text, body: "bench" });
      const answered = performance.now();
      await seen(text);
      out.push([kind, arrived.get(text) - start, answered - start]);
    }
  }
  client.close();
  return out;
}
"""


async def run(stack: Stack, args: argparse.Namespace) -> dict[str, dict[str, list[float]]]:
    results: dict[str, dict[str, list[float]]] = {}
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page: Page = await (await browser.new_context()).new_page()
            await page.goto(stack.url + "/")  # the login form: the SPA opens no client
            article = await page.evaluate(
                """async (password) => {
                    const m = await import("/natsgate/index.js");
                    const api = m.createApi();
                    await api.post("/auth/login", {username: "alice", password});
                    return (await api.post("/articles", {title: "bench", body: "bench"})).id;
                }""",
                "demo",
            )
            for r in range(args.rounds):
                order = ["websocket", "polling"] if r % 2 == 0 else ["polling", "websocket"]
                for transport in order:
                    rows = await page.evaluate(
                        MEASURE,
                        {
                            "transport": transport,
                            "writes": args.writes,
                            "room": f"bench{r}{transport[0]}",
                            "articleId": article,
                            "password": "demo",
                        },
                    )
                    for kind, seen, answered in rows:
                        d = results.setdefault(f"{transport}/{kind}", {"seen": [], "http": []})
                        d["seen"].append(seen)
                        d["http"].append(answered)
                    print(f"round {r + 1}: {transport} done", file=sys.stderr)
        finally:
            await browser.close()
    return results


def report(results: dict[str, dict[str, list[float]]]) -> str:
    lines = [
        "| transport / write | n | to the app p50 | p99 | max | HTTP answer p50 |",
        "|---|---|---|---|---|---|",
    ]
    for key in ["websocket/chat", "polling/chat", "websocket/kv", "polling/kv"]:
        d = results[key]
        s = d["seen"]
        lines.append(
            f"| {key} | {len(s)} | {pct(s, 50):.1f} ms | {pct(s, 99):.1f} ms | "
            f"{max(s):.1f} ms | {statistics.median(d['http']):.1f} ms |"
        )
    for kind in ["chat", "kv"]:
        ws, lp = results[f"websocket/{kind}"]["seen"], results[f"polling/{kind}"]["seen"]
        lines.append(
            f"\nadded by polling ({kind}): p50 {pct(lp, 50) - pct(ws, 50):+.1f} ms, "
            f"p99 {pct(lp, 99) - pct(ws, 99):+.1f} ms"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--writes", type=int, default=200, help="writes per kind, transport, round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", type=Path, help="also write the raw figures here")
    args = p.parse_args()
    if not (1 <= args.writes <= 2000 and 1 <= args.rounds <= 10):
        p.error("--writes 1..2000, --rounds 1..10")
    with tempfile.TemporaryDirectory(prefix="fallback-bench-") as tmp:
        stack = Stack(Path(tmp) / "var")
        t0 = time.monotonic()
        stack.start()
        try:
            print(f"stack up in {time.monotonic() - t0:.1f} s at {stack.url}", file=sys.stderr)
            results = asyncio.run(run(stack, args))
        finally:
            stack.stop()
    print(report(results))
    if args.json:
        args.json.write_text(json.dumps(results))


if __name__ == "__main__":
    main()
