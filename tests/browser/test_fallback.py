"""The long-polling fallback in a real browser: alice's page cannot open a WebSocket (its
constructor is pointed at a path that answers plain HTTP, as a proxy that does not speak
WebSocket would), so the JS client falls back to `/poll` through nginx; bob's page is ordinary.
Everything alice sees must still arrive, once each and in order."""

from __future__ import annotations

import asyncio
import json
import re
from urllib.parse import parse_qs, urlparse

import pytest
from playwright.async_api import Route, expect

from tests.browser.conftest import Person, PersonFactory
from tests.browser.helpers import article, chat_seqs, in_room, say, unique
from tests.deploy.stackrun import Stack
from tests.waits import until

pytestmark = pytest.mark.timeout(240)

# Before any script of the page: every WebSocket the page makes goes to /ws-blocked (the SPA's
# index.html, 200, no upgrade) while `window.__blockWebSocket` is true.
BLOCK_WEBSOCKET = r"""
(() => {
  const Real = window.WebSocket;
  window.__blockWebSocket = true;
  window.WebSocket = class extends Real {
    constructor(url, protocols) {
      super(window.__blockWebSocket ? String(url).replace(/\/ws$/, "/ws-blocked") : url, protocols);
    }
  };
})();
"""
WS_FAILED = r"WebSocket connection to .*/ws-blocked.* failed"


async def blocked(person: PersonFactory, name: str) -> Person:
    """A person whose page cannot use WebSocket, logged in and live over polling."""
    p = await person(name, login=False)
    p.allow(WS_FAILED)
    await p.context.add_init_script(BLOCK_WEBSOCKET)
    await p.login()
    conn = p.page.locator("#conn")
    await expect(conn).to_have_attribute("data-transport", "polling")
    await expect(conn).to_have_attribute("data-state", "open")
    await expect(conn).to_contain_text("Live (polling)")
    return p


async def test_websocket_blocked_alice_still_sees_bobs_articles_and_chat(
    person: PersonFactory,
) -> None:
    """With WebSocket blocked alice's page says "Live (polling)", and bob's new article, his
    edit of it and his chat messages all reach her (in order); her own message reaches bob."""
    alice = await blocked(person, "alice")
    bob = await person("bob")
    assert await alice.page.evaluate("() => window.natsgate.client.transport") == "polling"
    assert await bob.page.locator("#conn").get_attribute("data-transport") == "websocket"
    title = await alice.page.locator("#conn").get_attribute("title") or ""
    assert "long polling" in title

    await alice.go("articles")
    await bob.go("articles")
    await expect(alice.page.locator("main")).to_have_attribute("data-synced", "true")
    await expect(bob.page.locator("main")).to_have_attribute("data-synced", "true")
    title = unique("Polled news")
    await bob.page.fill("#article-title", title)
    await bob.page.fill("#article-body", "first version")
    await bob.page.press("#article-title", "Enter")
    await expect(article(alice, title)).to_be_visible()
    await expect(bob.page.locator("#article-status")).to_have_text(
        "Saved: every open tab shows it now."
    )
    edited = title + " (edited)"
    await article(bob, title).get_by_role("button", name=re.compile("^Edit ")).click()
    await bob.page.fill("#article-title", edited)
    await bob.page.get_by_role("button", name="Save changes").click()
    await expect(article(alice, edited)).to_be_visible()

    await in_room(alice, bob)
    sent = [f"bob {i}" for i in range(5)]
    for text in sent:
        await say(bob, text)
    await expect(alice.page.locator("#messages li .text")).to_have_text(sent)
    await say(alice, "alice over polling")
    sent.append("alice over polling")
    await expect(bob.page.locator("#messages li .text")).to_have_text(sent)
    await expect(alice.page.locator("#messages li .text")).to_have_text(sent)
    await expect(alice.page.locator("#chat-status")).to_have_text("")  # seen() resolved
    seqs = await chat_seqs(alice)
    assert seqs == sorted(set(seqs)) and len(seqs) == len(sent), seqs
    assert await alice.page.evaluate("() => window.natsgate.client.transport") == "polling"
    await expect(alice.page.locator("#conn")).to_have_attribute("data-state", "open")


async def test_a_lost_poll_response_is_fetched_again_nothing_lost_or_doubled(
    person: PersonFactory,
) -> None:
    """The first poll answer holding a chat message is dropped on its way to alice's page
    (after the gateway sent it): her next poll asks for the same frames again (`after`
    unchanged), and every message shows once, in order."""
    alice = await blocked(person, "alice")
    bob = await person("bob")
    alice.allow(r"ERR_CONNECTION_RESET", r"ERR_FAILED")
    await in_room(alice, bob)
    sent = [f"before {i}" for i in range(3)]
    for text in sent:
        await say(bob, text)
    messages = alice.page.locator("#messages li .text")
    await expect(messages).to_have_text(sent)

    origin = alice.base
    polls: list[tuple[int, int, str]] = []  # (after, Poll-Last-Frame, body) after the drop
    dropped: list[tuple[int, str]] = []

    async def lose_one(route: Route) -> None:
        request = route.request
        if request.method != "GET":
            await route.continue_()
            return
        after = int(parse_qs(urlparse(request.url).query)["after"][0])
        # Playwright's own request (no browser fetch metadata): an Origin, as any client.
        response = await route.fetch(timeout=60_000, headers={**request.headers, "origin": origin})
        body = await response.text()
        if response.status == 200 and not dropped and '"js_msg"' in body:
            dropped.append((after, body))
            await route.abort("connectionreset")  # the gateway sent it; the page never gets it
            return
        if response.status == 200 and dropped:
            polls.append((after, int(response.headers["poll-last-frame"]), body))
        await route.fulfill(response=response, body=body)

    await alice.page.route("**/poll?*", lose_one)
    try:
        for i in range(3):
            text = f"lost {i}"
            await say(bob, text)
            sent.append(text)
        for i in range(3):
            text = f"after {i}"
            await say(bob, text)
            sent.append(text)
        await expect(messages).to_have_text(sent, timeout=10_000)
    finally:
        await alice.page.unroute_all(behavior="ignoreErrors")

    assert len(dropped) == 1, "no poll answer with a chat message was dropped"
    lost_after, lost_body = dropped[0]
    again = polls[:1]
    assert again and again[0][0] == lost_after, (
        f"the poll after the lost one did not ask again from after={lost_after}: "
        f"{[p[:2] for p in polls]}"
    )
    lost_seqs = {
        json.loads(line)["data"]["seq"] for line in lost_body.split("\n") if '"js_msg"' in line
    }
    assert lost_seqs <= {
        json.loads(line)["data"]["seq"] for line in again[0][2].split("\n") if '"js_msg"' in line
    }, "the answer after the lost one does not hold its messages"
    seqs = await chat_seqs(alice)
    assert len(seqs) == len(sent) and seqs == sorted(set(seqs)), seqs
    assert lost_seqs <= set(seqs)
    assert await alice.page.evaluate("() => window.natsgate.client.transport") == "polling"


async def test_back_to_websocket_once_it_works_again(person: PersonFactory) -> None:
    """Once WebSocket works again alice's session moves to it (the poll session is closed)
    with no disconnection shown to the app; messages from before, during and after the move
    are all there once each."""
    alice = await blocked(person, "alice")
    bob = await person("bob")
    await in_room(alice, bob)
    sent = [f"polled {i}" for i in range(3)]
    for text in sent:
        await say(bob, text)
    messages = alice.page.locator("#messages li .text")
    await expect(messages).to_have_text(sent)
    await alice.page.evaluate(
        """() => {
            window.__states = [];
            window.natsgate.client.on("state", (s) => window.__states.push(s));
        }"""
    )
    closed = asyncio.Event()
    alice.page.on("request", lambda r: closed.set() if "/poll/close" in r.url else None)

    await alice.page.evaluate("() => { window.__blockWebSocket = false; }")
    conn = alice.page.locator("#conn")
    for _ in range(30):  # a periodic try may be under way: ask until one starts
        if await alice.page.evaluate("() => window.natsgate.client.transport") == "websocket":
            break
        await alice.page.evaluate("() => window.natsgate.client.retryWebSocket()")
        await say(bob, text := f"moving {len(sent)}")
        sent.append(text)
        await asyncio.sleep(0.3)
    await expect(conn).to_have_attribute("data-transport", "websocket")
    await expect(conn).to_have_attribute("data-state", "open")
    await expect(conn).to_have_text("Live")
    for i in range(3):
        await say(bob, text := f"websocket {i}")
        sent.append(text)
    await expect(messages).to_have_text(sent)
    seqs = await chat_seqs(alice)
    assert len(seqs) == len(sent) and seqs == sorted(set(seqs)), seqs
    assert await alice.page.evaluate("() => window.__states") == []
    try:
        await asyncio.wait_for(closed.wait(), 10)
    except TimeoutError:
        raise AssertionError("the poll session was never closed") from None


async def test_a_reload_closes_the_polling_session_on_the_server(
    person: PersonFactory, stack: Stack
) -> None:
    """A page that goes away ends its polling session at once (a keepalive POST /poll/close
    on pagehide), instead of leaving it to the server's 60 s idle reaper; the reloaded page
    starts on polling (the tab remembers) instead of failing three WebSockets again."""
    alice = await blocked(person, "alice")
    sid = await alice.page.evaluate("() => window.natsgate.client._conn.sid")
    failed_before = sum("/ws-blocked" in e for e in alice.console_errors)
    await alice.page.reload()
    await expect(alice.page.locator("#conn")).to_have_attribute("data-transport", "polling")
    await expect(alice.page.locator("#conn")).to_have_attribute("data-state", "open")
    assert sum("/ws-blocked" in e for e in alice.console_errors) == failed_before
    assert await alice.page.evaluate("() => window.natsgate.client.connects") == 1
    log = stack.layout.log_dir / "nginx-access.log"

    def closed() -> bool:
        return any(
            e["uri"] == f"/poll/close?sid={sid}" and e["status"] == 204
            for e in map(json.loads, log.read_text().splitlines())
        )

    # nginx writes the line once the request is done: the log has no event to await
    await until(closed, f"a POST /poll/close for {sid} answered 204 in {log}", 10)
