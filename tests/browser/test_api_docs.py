"""`/api/docs` in a real browser, through nginx: Swagger UI renders every operation of the
API's OpenAPI document inside the page's CSP, loads nothing from another origin, and its
"Try it out" reaches the API."""

from __future__ import annotations

import aiohttp
from playwright.async_api import expect

from tests.browser.conftest import PersonFactory
from tests.deploy.stackrun import Stack

# Before any script of the page: every CSP violation the page meets, as "directive uri".
RECORD_CSP_VIOLATIONS = r"""
window.__cspViolations = [];
document.addEventListener("securitypolicyviolation", (e) => {
  window.__cspViolations.push(`${e.violatedDirective} ${e.blockedURI}`);
});
"""


async def test_swagger_ui_renders_every_operation_inside_the_csp(
    person: PersonFactory, stack: Stack
) -> None:
    """Every operation of /api/openapi.json is on the page, GET /api/healthz runs from it,
    and neither a CSP violation, a console error nor a request off the stack happened."""
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{stack.url}/api/openapi.json") as r:
            doc = await r.json()
    operations = [(m.upper(), path) for path, ops in doc["paths"].items() for m in ops]
    assert ("GET", "/api/docs") in operations and len(operations) > 10

    reader = await person("reader", login=False)
    page = reader.page
    await reader.context.add_init_script(RECORD_CSP_VIOLATIONS)
    elsewhere: list[str] = []
    page.on("request", lambda r: None if r.url.startswith(stack.url) else elsewhere.append(r.url))

    resp = await page.goto(f"{stack.url}/api/docs")
    assert resp is not None and resp.status == 200
    csp = await resp.header_value("content-security-policy")
    assert csp is not None and "unsafe-inline" not in csp and "unsafe-eval" not in csp

    blocks = page.locator(".opblock")
    await expect(blocks).to_have_count(len(operations))
    for method, path in operations:
        block = page.locator(f'.opblock:has(.opblock-summary-path[data-path="{path}"])')
        await expect(block.locator(".opblock-summary-method", has_text=method)).to_have_count(1)

    healthz = page.locator('.opblock:has(.opblock-summary-path[data-path="/api/healthz"])')
    await healthz.locator(".opblock-summary").click()
    await healthz.get_by_role("button", name="Try it out").click()
    await healthz.get_by_role("button", name="Execute").click()
    answer = healthz.locator(".live-responses-table tbody tr.response")
    await expect(answer.locator(".response-col_status")).to_have_text("200")
    await expect(answer.locator(".response-col_description")).to_contain_text('"status": "ok"')

    assert await page.evaluate("() => window.__cspViolations") == []
    assert reader.unexpected_errors() == []
    assert elsewhere == []
