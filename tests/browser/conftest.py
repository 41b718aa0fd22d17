"""The demo SPA in a real browser: Playwright driving Debian's chromium against a whole stack
started with `make start` on free ports (tests/deploy/stackrun.py), one stack per module.

Each test gets people (`person("alice")`): a browser context of their own (cookies, storage)
with one logged-in page. Every page error fails the test, and so does a console error that
the test did not declare expected (`Person.allow`). On failure every page is saved as a
screenshot under the test's tmp dir.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, BrowserContext, Page, async_playwright, expect

from tests.browser.helpers import CHROMIUM, CHROMIUM_ARGS
from tests.deploy.stackrun import Stack, started

DESKTOP = {"width": 1100, "height": 800}
PHONE = {"width": 390, "height": 844}

expect.set_options(timeout=10_000)


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """Make each phase's report reachable from fixtures (for screenshots on failure)."""
    outcome = yield
    setattr(item, f"rep_{call.when}", outcome.get_result())


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # Logins are rate limited per username (10 a minute): more than the tests' people, who
    # log in and out again and again, may use. The limit has tests of its own (tests/api).
    var = tmp_path_factory.mktemp("stack") / "var"
    with started(var, LOGIN_ATTEMPTS_PER_MINUTE="1000") as s:
        yield s


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as pw:
        b = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            await b.close()


class Person:
    """One user in a browser context of their own."""

    def __init__(self, name: str, context: BrowserContext, page: Page, base: str) -> None:
        self.name, self.context, self.page, self.base = name, context, page, base
        self.console_errors: list[str] = []
        self.page_errors: list[str] = []
        self._allowed: list[re.Pattern[str]] = []
        page.on(
            "console",
            lambda m: self.console_errors.append(m.text) if m.type == "error" else None,
        )
        page.on("pageerror", lambda e: self.page_errors.append(str(e)))

    def allow(self, *patterns: str) -> None:
        """Console errors matching one of these are expected (a 412 the UI handles, …)."""
        self._allowed += [re.compile(p) for p in patterns]

    def unexpected_errors(self) -> list[str]:
        errors = [e for e in self.console_errors if not any(p.search(e) for p in self._allowed)]
        return self.page_errors + errors

    async def login(self, password: str = "demo") -> None:
        page = self.page
        await page.goto(self.base + "/")
        await page.fill("#username", self.name)
        await page.fill("#password", password)
        await page.press("#password", "Enter")
        await expect(page.locator("#conn")).to_have_attribute("data-state", "open")

    async def go(self, route: str) -> None:
        await self.page.goto(f"{self.base}/#/{route}")

    async def user_id(self) -> str:
        uid = await self.page.evaluate("() => window.natsgate.client.user")
        assert isinstance(uid, str)
        return uid


PersonFactory = Callable[..., Awaitable[Person]]


@pytest.fixture
async def person(
    request: pytest.FixtureRequest, stack: Stack, browser: Browser, tmp_path: Path
) -> AsyncIterator[PersonFactory]:
    people: list[Person] = []

    async def make(
        name: str, *, login: bool = True, viewport: dict[str, int] | None = None
    ) -> Person:
        context = await browser.new_context(viewport=viewport or DESKTOP)  # type: ignore[arg-type]
        page = await context.new_page()
        p = Person(name, context, page, stack.url)
        people.append(p)
        if login:
            await p.login()
        return p

    try:
        yield make
    finally:
        failed = any(
            getattr(getattr(request.node, f"rep_{when}", None), "failed", False)
            for when in ("setup", "call")
        )
        if failed:
            for i, p in enumerate(people):
                shot = tmp_path / f"failure-{i}-{p.name}.png"
                try:
                    await p.page.screenshot(path=str(shot), full_page=True)
                    print(f"screenshot of {p.name}'s page: {shot}")
                except Exception as e:  # the page may be gone
                    print(f"no screenshot of {p.name}'s page: {e!r}")
        errors = {p.name: p.unexpected_errors() for p in people}
        for p in people:
            await p.context.close()
        if not failed:
            assert not any(errors.values()), f"errors in the browser console: {errors}"
