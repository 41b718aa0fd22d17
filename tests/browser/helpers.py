"""What the browser tests (and tests/browser/shots.py, tests/reliability) share: the browser
they launch, and the steps of the demo SPA that several tests take."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

from playwright.async_api import Locator, expect

if TYPE_CHECKING:
    from tests.browser.conftest import Person

CHROMIUM = "/usr/bin/chromium"
# Debian's chromium, headless, with nothing that reaches out to the network.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def unique(prefix: str) -> str:
    """A title no other test (or run) uses."""
    return f"{prefix} {uuid.uuid4().hex[:8]}"


def article(who: Person, text: str) -> Locator:
    """The items of `who`'s article list that contain `text`."""
    return who.page.locator("#articles li", has_text=text)


async def say(who: Person, text: str) -> None:
    """Send a chat message from `who`'s page; the field empties once the API took it."""
    await who.page.fill("#chat-text", text)
    await who.page.press("#chat-text", "Enter")
    await expect(who.page.locator("#chat-text")).to_have_value("")


async def chat_seqs(who: Person) -> list[int]:
    """The stream seqs of the chat messages on `who`'s page, in page order."""
    seqs = await who.page.locator("#messages li").evaluate_all(
        "els => els.map(e => Number(e.dataset.seq))"
    )
    return [int(s) for s in seqs]


async def in_room(*people: Person) -> str:
    """Everyone in a new chat room, its history loaded; the room's name."""
    room = "r" + uuid.uuid4().hex[:8]
    for p in people:
        await p.go(f"chat/{room}")
        await expect(p.page.locator("#chat-h")).to_have_text(f"Chat: #{room}")
        await expect(p.page.locator("#chat-state")).to_be_hidden()
    return room
