"""The README's screenshot of the demo SPA, made in the same browser as the tests.

    python -m tests.browser.shots                    # own stack on free ports → docs/screenshot.png
    python -m tests.browser.shots --url http://127.0.0.1:8080 --out /tmp/shot.png

It logs in as bob and alice, writes a little content through the UI, and puts alice's
articles page (capabilities open) beside bob's chat at phone width.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import tempfile
import uuid
from pathlib import Path

from playwright.async_api import Page, async_playwright, expect

from tests.browser.helpers import CHROMIUM, CHROMIUM_ARGS

ROOT = Path(__file__).resolve().parents[2]
WIDE = {"width": 1000, "height": 760}
PHONE = {"width": 380, "height": 760}


async def _login(page: Page, base: str, name: str) -> None:
    await page.goto(base + "/")
    await page.fill("#username", name)
    await page.fill("#password", "demo")
    await page.press("#password", "Enter")
    await expect(page.locator("#conn")).to_have_attribute("data-state", "open")


async def demo_screenshot(base: str, out: Path) -> None:
    """alice's live articles page beside bob's chat at phone width, as one PNG."""
    tag = uuid.uuid4().hex[:4]
    room = f"demo{tag}"
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            bob_ctx = await browser.new_context(viewport=PHONE, color_scheme="light")
            bob = await bob_ctx.new_page()
            await _login(bob, base, "bob")
            await bob.goto(base + "/#/articles")
            for title, body in (
                ("Welcome to natsgate", "Every list on this page is live over one WebSocket."),
                (f"Release notes {tag}", "Gateways share one KV watch per bucket and pattern."),
            ):
                await bob.fill("#article-title", title)
                await bob.fill("#article-body", body)
                await bob.press("#article-title", "Enter")
                await expect(bob.locator("#article-status")).to_contain_text("Saved")

            alice_ctx = await browser.new_context(viewport=WIDE, color_scheme="light")
            alice = await alice_ctx.new_page()
            await _login(alice, base, "alice")
            await alice.goto(f"{base}/#/chat/{room}")
            await bob.goto(f"{base}/#/chat/{room}")
            lines = [
                (alice, "Anyone up for a review of the gateway PR?"),
                (bob, "Sure, the resume after a restart looks right to me."),
                (alice, "Great: every message arrives once, in order."),
            ]
            for page, text in lines:
                await page.fill("#chat-text", text)
                await page.press("#chat-text", "Enter")
                await expect(bob.locator("#messages li", has_text=text)).to_be_visible()

            await alice.goto(base + "/#/articles")
            await expect(alice.locator("main")).to_have_attribute("data-synced", "true")
            await alice.locator("#caps summary").click()
            await alice.fill("#article-title", "Draft: what read-your-writes means")
            await alice.locator("h1").first.focus()
            left = await alice.screenshot()
            right = await bob.screenshot()

            # Side by side, through the same browser (no image library needed).
            canvas = await browser.new_page(viewport={"width": 1440, "height": 820})
            html = _COMPOSITE.format(left=_data_url(left), right=_data_url(right))
            await canvas.set_content(html)
            await canvas.locator("img").last.wait_for()
            await canvas.screenshot(path=str(out))
        finally:
            await browser.close()


def _data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


_COMPOSITE = """<!doctype html><html><head><style>
body {{ margin: 0; padding: 20px; background: #cfd6e4; font: 15px system-ui, sans-serif;
        display: flex; gap: 20px; align-items: flex-start; }}
figure {{ margin: 0; }}
img {{ display: block; border-radius: 10px; box-shadow: 0 4px 18px rgba(0, 0, 0, .25); }}
figcaption {{ margin-top: 6px; color: #333; }}
</style></head><body>
<figure><img src="{left}" width="1000" height="760">
  <figcaption>alice: articles, live</figcaption></figure>
<figure><img src="{right}" width="380" height="760">
  <figcaption>bob on a phone: chat</figcaption></figure>
</body></html>"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running stack; default: start one on free ports")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshot.png")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.url:
        asyncio.run(demo_screenshot(args.url.rstrip("/"), args.out))
    else:
        from tests.deploy.stackrun import Stack

        with tempfile.TemporaryDirectory() as tmp:
            stack = Stack(Path(tmp) / "var")
            stack.start()
            try:
                asyncio.run(demo_screenshot(stack.url, args.out))
            finally:
                stack.stop()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
